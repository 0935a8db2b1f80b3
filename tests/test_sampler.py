"""dg_sampler against the release's sampler (fixtures), EDM's sampler (Algorithm 2 of the paper), and an analytic ODE."""

import numpy as np
import pytest
import torch

from edm_dg import vp
from edm_dg.discriminator import Discriminator
from edm_dg.guidance import dg_correction
from edm_dg.sampling import dg_sampler
from helpers import GaussianDenoiser, assert_close_to_fixture, edm_sampler_spec, fixture_randn, fixture_tol, float32_layers

def _disc_layers(ref_nets, cond):
    return float32_layers(ref_nets['classifier'], ref_nets['head_cond' if cond else 'head_uncond'])

def sampler_layers(ref_nets, steps, guided, cond=False):
    """(depth, fan_in) of a Heun run for fixture_tol: per step two evaluations of the network and, guided,
    the discriminator's gradient (forward and backward)."""
    (net_depth, net_fan), (disc_depth, disc_fan) = float32_layers(ref_nets['net']), _disc_layers(ref_nets, cond)
    return steps * (2 * net_depth + (2 * disc_depth if guided else 0)), max(net_fan, disc_fan if guided else 0)

def test_correction_matches_release(ref, ref_nets):
    g = ref['dg_correction_uncond']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    corr, log_ratio = dg_correction(disc, g['x'], g['sigma'])
    depth, fan_in = _disc_layers(ref_nets, False)
    assert_close_to_fixture(corr, g['discriminator_guidance'], 2 * depth, fan_in)  # a gradient: forward and backward
    assert_close_to_fixture(log_ratio, g['log_ratio'], depth, fan_in)

@pytest.mark.parametrize('run', ['edm_plain', 'edm_churn', 'dg_uncond_w2', 'dg_uncond_window', 'dg_cond_boost'])
def test_sampler_matches_release(ref, ref_nets, run):
    s = ref['sampler']
    r = s['runs'][run]
    p = r['params']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_cond' if p['cond'] else 'head_uncond'])
    img = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(p['noise_seed']),
                     num_steps=p['steps'], S_churn=p['S_churn'], discriminator=disc,
                     dg_weight_1st_order=p['w1'], dg_weight_2nd_order=p['w2'],
                     time_min=p['time_min'], time_max=p['time_max'],
                     disc_labels=s['net_class_labels'] if p['cond'] else None, boosting=bool(p['boosting']),
                     boost_S_churn=p['boosting_S_churn'], boost_period=p['boosting_period'],
                     boost_weight_period=p['boosting_weight_period'])
    assert img.dtype == torch.float64
    layers = sampler_layers(ref_nets, p['steps'], guided=p['w1'] != 0, cond=p['cond'])
    assert_close_to_fixture(img, r['images'], *layers)
    # The bound tells the recorded settings apart: each other run lies outside it.
    bound = fixture_tol(*layers) * r['images'].abs().max()
    assert all((img - o['images']).abs().max() > bound for k, o in s['runs'].items() if k != run)

@pytest.mark.parametrize('S_churn', [0.0, 10.0])
def test_no_guidance_is_edm_exactly(ref, ref_nets, S_churn):
    s = ref['sampler']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    kw = dict(num_steps=8, S_churn=S_churn, S_min=0.05, S_max=50)
    with torch.no_grad():
        expected = edm_sampler_spec(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw)
        a = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw)
        b = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw,
                       discriminator=disc, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0, boosting=True)
    assert torch.equal(a, expected)
    assert torch.equal(b, expected)

def test_second_order_guidance_runs_and_acts(ref, ref_nets):
    """The release crashes for w2 != 0; here it is the same correction at (x_next, t_next)."""
    s = ref['sampler']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    base = dg_sampler(ref_nets['net'], s['latents'], None, fixture_randn(1), num_steps=6,
                      discriminator=disc, dg_weight_1st_order=1.0)
    both = dg_sampler(ref_nets['net'], s['latents'], None, fixture_randn(1), num_steps=6,
                      discriminator=disc, dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0)
    assert torch.isfinite(both).all()
    assert (both - base).abs().max() > 1e-6

def test_second_order_step_by_hand(ref, ref_nets):
    """Schedule 2.0 -> 0.5 -> 0 with w2 only: Heun's average uses the corrected d_prime; the last step lands on D."""
    s = ref['sampler']
    net = ref_nets['net']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    x0 = s['latents'][:2]
    got = dg_sampler(net, x0, None, lambda x: torch.zeros_like(x), num_steps=2, sigma_min=0.5, sigma_max=2.0,
                     discriminator=disc, dg_weight_1st_order=0.0, dg_weight_2nd_order=1.5, time_min=0.0)
    t0, t1 = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        x = x0.double() * t0
        d = (x - net(x, t0).double()) / t0
        x1 = x + (t1 - t0) * d
        d1 = (x1 - net(x1, t1).double()) / t1
    mean, tau = vp.sigma_to_vp(t1.expand(2))
    xv = (mean.reshape(-1, 1, 1, 1) * x1).float().requires_grad_(True)
    dd = disc(xv, tau).clip(1e-5, 1 - 1e-5)
    grad, = torch.autograd.grad(torch.log(dd / (1 - dd)).sum(), xv)
    d1 = d1 + 1.5 * (-(t1 ** 2 * mean.reshape(-1, 1, 1, 1)) * grad) / t1
    x2 = x + (t1 - t0) * (0.5 * d + 0.5 * d1)
    with torch.no_grad():
        expected = net(x2, t1).double()
    assert (got - expected).abs().max() < 1e-5
    assert (got - dg_sampler(net, x0, None, lambda x: torch.zeros_like(x), num_steps=2, sigma_min=0.5,
                             sigma_max=2.0)).abs().max() > 1e-4

def test_euler_and_heun_against_analytic_ode():
    """Gaussian data: x(sigma) = x(sigma_max) sqrt((s^2+sigma^2)/(s^2+sigma_max^2)); Euler converges at order 1, Heun at 2."""
    net = GaussianDenoiser()
    latents = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = latents * 80.0 * np.sqrt(0.25 / (0.25 + 80.0 ** 2))
    def err(solver, n):
        return (dg_sampler(net, latents, None, torch.randn_like, num_steps=n, solver=solver) - exact).abs().max().item()
    euler = err('euler', 32) / err('euler', 64)
    heun = err('heun', 32) / err('heun', 64)
    assert 1.6 < euler < 2.6, euler
    assert 3.2 < heun < 5.0, heun
    assert err('heun', 64) < err('euler', 64) / 5

def test_solver_name_checked(ref_nets):
    with pytest.raises(ValueError, match='solver'):
        dg_sampler(ref_nets['net'], torch.zeros(1, 3, 16, 16), solver='rk4')
