"""NLL by the probability-flow ODE against the closed form for Gaussian data."""

import math

import numpy as np
import torch

from conftest import py, save_edm_pickle, tiny_edm
from edm_dg.nll import bits_per_dim, dequantize, log_likelihood
from test_sampler import GaussianDenoiser

def test_gaussian_closed_form_within_001_bpd():
    s = 0.5
    net = GaussianDenoiser(s)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s
    lp = log_likelihood(net, x, num_steps=128, generator=torch.Generator().manual_seed(1))
    dims = 16
    exact = -0.5 * (x ** 2).flatten(1).sum(1) / s ** 2 - dims * (math.log(s) + 0.5 * math.log(2 * math.pi))
    bpd, bpd_exact = bits_per_dim(lp, dims), bits_per_dim(exact, dims)
    assert (bpd - bpd_exact).abs().max() < 0.01

def test_zero_discriminator_changes_nothing():
    net = GaussianDenoiser()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    zero = lambda x_vp, tau, y: torch.sigmoid(0 * x_vp.flatten(1).sum(1))  # d = 1/2, log-ratio 0 everywhere
    a = log_likelihood(net, x, num_steps=16, generator=torch.Generator().manual_seed(3))
    b = log_likelihood(net, x, num_steps=16, generator=torch.Generator().manual_seed(3), discriminator=zero, w=2.0)
    assert torch.equal(a, b)

def test_guidance_term_enters_divergence():
    """A discriminator with log-ratio a |x_vp|^2 / 2 adds a known linear term to the drift."""
    net = GaussianDenoiser()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    quad = lambda x_vp, tau, y: torch.sigmoid(0.05 * (x_vp.double() ** 2).flatten(1).sum(1) / 2)
    a = log_likelihood(net, x, num_steps=16, generator=torch.Generator().manual_seed(3))
    b = log_likelihood(net, x, num_steps=16, generator=torch.Generator().manual_seed(3), discriminator=quad, w=1.0)
    assert (a - b).abs().min() > 1e-3

def test_dequantize_range():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    x = dequantize(u8, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1 and x[0, 0, 0, 0] < -1 + 1 / 128 and x[0, 0, 0, 1] > 1 - 1 / 128

def test_nll_cli(tmp_path):
    from PIL import Image
    d = tmp_path / 'data'
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f'{i}.png')
    net = save_edm_pickle(tiny_edm(), str(tmp_path / 'n.pkl'))
    p = py('nll.py', f'--network={net}', f'--data={d}', '--steps=4', '--batch=2', f'--json={tmp_path / "r.json"}')
    assert p.returncode == 0, p.stderr
    assert 'bits/dim' in p.stdout
