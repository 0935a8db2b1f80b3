"""The demo's real data: scikit-learn's 1,797 labelled 8x8 handwritten digits, as an EDM dataset.

The originals take 17 grey levels (0-16). Generated images are continuous, so a
discriminator could tell them apart by quantisation alone; the dataset is
therefore dequantised once, with a fixed seed (uniform noise within a grey
level), and stored at 8 bits like every generated PNG.
"""

import os

import numpy as np
import torch

from . import fileio

def digits_u8(seed=0):
    """uint8 images [1797, 1, 8, 8] (dequantised to 8 bits) and int64 labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    rng = np.random.default_rng(seed)
    v = d.images.astype(np.float64) + rng.uniform(-0.5, 0.5, size=d.images.shape)
    u8 = np.clip(np.round(v / 16 * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(u8[:, None]), torch.from_numpy(d.target.astype(np.int64))

def write_dataset(outdir, images_u8, labels):
    """EDM dataset folder: img{i:08d}.png in 1000-image subfolders plus dataset.json."""
    entries = {}
    for i, (im, y) in enumerate(zip(images_u8.permute(0, 2, 3, 1).numpy(), labels.tolist())):
        rel = f'{i // 1000:05d}/img{i:08d}.png'
        path = os.path.join(outdir, rel)
        if not os.path.isfile(path):
            fileio.save_png(path, im)
        entries[rel] = int(y)
    fileio.write_labels(outdir, entries)
    return outdir

#----------------------------------------------------------------------------
# An FID feature network for digits, independent of the discriminator: a plain
# CNN classifier (no noise conditioning, no attention, different architecture
# from ADM) trained on clean digits; its 128-d pooled features replace Inception.

class DigitFeatures(torch.nn.Module):
    """TorchScript-able detector: float images (x - 128) / 128 at `input_size` -> 128-d features."""

    def __init__(self):
        super().__init__()
        self.input_size = 8
        c = torch.nn
        self.body = c.Sequential(c.Conv2d(1, 32, 3, padding=1), c.ReLU(), c.Conv2d(32, 64, 3, padding=1), c.ReLU(),
                                 c.MaxPool2d(2), c.Conv2d(64, 128, 3, padding=1), c.ReLU(), c.AdaptiveAvgPool2d(1), c.Flatten())
        self.fc = c.Linear(128, 10)

    def forward(self, x):
        return self.body(x[:, :1])

def train_feature_net(images_u8, labels, path, epochs=30, seed=0, log=print):
    """Train DigitFeatures as a classifier (random 1-pixel shifts) and save it as TorchScript."""
    torch.manual_seed(seed)
    net = DigitFeatures()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    x_all = (images_u8.float() - 128) / 128
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x_all), generator=g)
        correct = 0
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            x = x_all[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            logits = net.fc(net(x))
            loss = torch.nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == labels[idx]).sum().item()
    log(f'FID feature net: train accuracy {correct / len(x_all):.3f} after {epochs} epochs')
    scripted = torch.jit.script(net.eval())
    with fileio.atomic_open(path) as f:
        torch.jit.save(scripted, f)
    return path
