"""Shared test helpers: tiny seeded networks and files, CLI runners, reference samplers (one module; tests import it)."""

import os
import pickle
import subprocess
import sys

import json

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dnnlib
from edm_dg.adm import EncoderUNet
from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
from edm_dg.discriminator import Discriminator, make_head
from training import loss, networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')

def build_encoder(entry):
    """An EncoderUNet from a fixture entry (create_classifier_args + state_dict)."""
    net = EncoderUNet.from_create_classifier_args(**entry['create_classifier_args']).eval()
    net.load_state_dict(entry['state_dict'])
    return net

def tiny_edm(label_dim=0, res=16, channels=3, seed=0, model_channels=16):
    torch.manual_seed(seed)
    return networks.EDMPrecond(img_resolution=res, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
                               model_channels=model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[res // 2],
                               dropout=0.0).eval()

def save_edm_pickle(net, path):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict()), f)
    return path

def tiny_classifier(res=16, channels=3, seed=0, width=64, num_classes=10):
    torch.manual_seed(seed)
    net = EncoderUNet.from_create_classifier_args(image_size=res, in_channels=channels, classifier_width=width,
                                                  classifier_depth=1, out_channels=num_classes).eval()
    with torch.no_grad():  # Non-zero residual outputs so gradients are informative.
        for p in net.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return net

def tiny_discriminator(classifier, cond=False, seed=1, num_classes=10):
    torch.manual_seed(seed)
    head = make_head(classifier.feature_channels, classifier.feature_resolution, cond=cond, width=64, depth=1, num_classes=num_classes)
    with torch.no_grad():
        for p in head.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return Discriminator(classifier, head.eval()).eval()

def run_cli(args, timeout=600, env=None, cwd=None):
    """Run a command with the project on PYTHONPATH; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)

def py(script, *args, **kwargs):
    return run_cli([sys.executable, os.path.join(ROOT, script), *args], **kwargs)

def torchrun(script, *args, nproc=2, **kwargs):
    return run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                    os.path.join(ROOT, script), *args], **kwargs)

def assert_one_line_error(proc, *needles):
    """Non-zero exit, no traceback, a one-line 'Error:' message containing all needles."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]

def write_tiny_files(folder):
    """A tiny conditional EDM pickle, classifier .pt, head .pt and own-format discriminator .pt in folder."""
    net = tiny_edm(label_dim=10)
    cls = tiny_classifier()
    disc = tiny_discriminator(cls)
    paths = dict(net=save_edm_pickle(net, os.path.join(folder, 'net.pkl')), classifier=os.path.join(folder, 'cls.pt'),
                 disc=os.path.join(folder, 'disc.pt'), head=os.path.join(folder, 'head.pt'))
    torch.save(cls.state_dict(), paths['classifier'])
    torch.save(disc.head.state_dict(), paths['head'])
    _, sha = read_weights(paths['classifier'], 'classifier')
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), paths['disc'])
    return paths

#----------------------------------------------------------------------------
# Reference samplers and noise, written from the papers.

def fixture_randn(seed):
    """The fixtures' noise: one generator, float32 draws cast to the input's dtype."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)

def edm_sampler_spec(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                     sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """Karras et al. (2022), Algorithm 2, as an executable specification of EDM's sampler.

    Noise levels sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < N (rounded by the net), sigma_N = 0. Step i: gamma_i = min(S_churn/N, sqrt 2 - 1) when
    S_min <= sigma_i <= S_max; raise the noise to sigma_hat = sigma_i (1 + gamma_i) with fresh noise of
    variance sigma_hat^2 - sigma_i^2 (scaled by S_noise); Euler step to sigma_{i+1} along
    (x - D(x; sigma)) / sigma; average the two slopes (Heun) unless sigma_{i+1} = 0.
    """
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    frac = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    sigmas = net.round_sigma((hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    sigmas = list(torch.as_tensor(sigmas, dtype=torch.float64).unbind()) + [torch.tensor(0.0, dtype=torch.float64)]
    slope = lambda x, s: (x - net(x, s, class_labels).to(torch.float64)) / s
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= float(s_cur) <= S_max else 0.0
        s_hat = net.round_sigma(s_cur * (1 + gamma))
        x_hat = x + S_noise * (s_hat ** 2 - s_cur ** 2).sqrt() * randn_like(x)
        k1 = slope(x_hat, s_hat)
        x = x_hat + (s_next - s_hat) * k1
        if float(s_next) > 0:
            x = x_hat + (s_next - s_hat) * 0.5 * (k1 + slope(x, s_next))
    return x

class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser for data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.img_resolution, self.img_channels, self.label_dim = 4, 1, 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (x * self.s ** 2 / (self.s ** 2 + sigma ** 2)).float()

#----------------------------------------------------------------------------
# Small data and detectors.

def write_set(folder, x_u8, labels=None):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, im in enumerate(x_u8.permute(0, 2, 3, 1).numpy()):
        names.append(f'{i:05d}.png')
        Image.fromarray(im).save(os.path.join(folder, names[-1]))
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, int(l)] for n, l in zip(names, labels)]}, f)

def sharp_and_blurred(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, 1)
    to_u8 = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8)
    return to_u8(x), to_u8(blurred)

class TinyDetector(torch.nn.Module):
    """A TorchScript stand-in with the offline detector's interface (float [-1,1] 299x299 in, features out)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)
