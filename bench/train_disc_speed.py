"""Discriminator-training throughput: this project's loop vs. one written as the DG release does it.

Same process, same real-size networks (32x32 ADM classifier, released head
layout, seeded random weights), same batch; the loops take turns in every round
(so drift hits all alike), warm-up excluded, median of rounds.

The release-style loop follows the DG release's train.py: images as numpy
arrays fed through a DataLoader (num_workers=0) with a per-sample ToTensor, the
classifier left trainable in train mode (features under no_grad), ADM's einsum
attention with the attention blocks checkpointed, sigmoid + BCELoss, and the
loss and accuracy read back with .item() every step.

    python bench/train_disc_speed.py --batch=32 --steps=3
"""

import os
import sys

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from edm_dg import vp
from edm_dg.bench import release_style, released_discriminator, time_interleaved
from edm_dg.disc_training import train_step

class ReleaseStyle:
    """The release's loop: DataLoader over numpy, per-sample ToTensor, trainable classifier, checkpointed attention."""

    def __init__(self, disc, data_u8_nhwc, targets, batch):
        self.disc = release_style(disc).train()
        class DS(torch.utils.data.Dataset):
            def __len__(self_):
                return len(data_u8_nhwc)
            def __getitem__(self_, i):
                img = torch.from_numpy(np.ascontiguousarray(data_u8_nhwc[i].transpose(2, 0, 1))).float() / 255.0
                return img, targets[i]
        self.loader = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
        self.opt = torch.optim.Adam(disc.head.parameters(), lr=3e-4, weight_decay=1e-7)
        self.loss = torch.nn.BCELoss()
        self.report = []

    def run(self, steps):
        it = iter(self.loader)
        for _ in range(steps):
            x, y = next(it)
            x = 2 * x - 1
            self.opt.zero_grad()
            t = vp.importance_time(torch.rand(x.shape[0])).float()
            z = torch.randn_like(x)
            xt = vp.perturb(x, t, z)
            with torch.no_grad():
                feats = self.disc.classifier.features(xt, t)
            pred = torch.sigmoid(self.disc.head(feats, t)).view(-1)
            out = self.loss(pred, y.float())
            out.backward()
            self.opt.step()
            self.report.append((out.item(), ((pred > 0.5).float() == y).float().mean().item()))

class Ours:
    def __init__(self, disc, data_u8_nchw, targets, batch, precision):
        self.disc = disc.train()
        self.disc.head.requires_grad_(True)
        self.disc.classifier.eval().requires_grad_(False)
        self.images = data_u8_nchw
        self.targets = targets.float()
        self.batch = batch
        self.precision = precision
        self.params = list(disc.head.parameters())
        self.opt = torch.optim.Adam(self.params, lr=3e-4, weight_decay=1e-7)
        self.scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.gen = vp.seeded_generator('cpu', 0, 0)

    def run(self, steps):
        perm = torch.randperm(len(self.images), generator=self.gen)
        for s in range(steps):
            idx = perm[s * self.batch:(s + 1) * self.batch]
            train_step(self.disc, self.opt, self.scaler, self.images[idx], self.targets[idx], None, self.gen,
                       self.params, False, self.precision)

@click.command()
@click.option('--batch', type=int, default=32, show_default=True)
@click.option('--steps', type=int, default=3, show_default=True)
@click.option('--repeats', type=int, default=3, show_default=True)
@click.option('--threads', type=int, default=None, help='torch threads  [default: torch default]')
def main(batch, steps, repeats, threads):
    if threads:
        torch.set_num_threads(threads)
    n = batch * (steps + 1) * 2
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    targets = torch.from_numpy((np.arange(n) % 2).astype(np.float32))
    print(f'Discriminator training, 32x32 ADM classifier + released head layout, batch {batch}, {steps} steps, '
          f'median of {repeats} interleaved rounds, {torch.get_num_threads()} threads')
    nchw = torch.from_numpy(data).permute(0, 3, 1, 2).contiguous()
    loops = {'release-style': ReleaseStyle(released_discriminator(), data, targets, batch),
             'edm-dg fp32': Ours(released_discriminator(), nchw, targets, batch, 'fp32'),
             'edm-dg bf16': Ours(released_discriminator(), nchw, targets, batch, 'bf16')}
    medians, ratios = time_interleaved([lambda l=l: l.run(steps) for l in loops.values()], repeats)
    print(f'{"loop":<16}{"images/s":>10}{"vs release":>12}')
    for name, t, r in zip(loops, medians, ratios):
        print(f'{name:<16}{batch * steps / t:>10.2f}{1 / r:>11.2f}x')

if __name__ == '__main__':
    main()
