"""DGDenoiser: DG as a transform of the denoiser, inside EDM's sampler, as a k-diffusion model, and in dg_sampler."""

import math

import numpy as np
import pytest
import torch

from edm_dg import adm, vp
from edm_dg.discriminator import Discriminator
from edm_dg.guidance import LOG_RATIO_OUTSIDE, DGDenoiser, dg_correction
from edm_dg.sampling import dg_sampler
from helpers import assert_close_to_fixture, edm_sampler_spec, fixture_randn, float32_layers

def _disc(ref_nets, cond=False):
    return Discriminator(ref_nets['classifier'], ref_nets['head_cond' if cond else 'head_uncond'])

@pytest.mark.parametrize('w,window', [(1.5, (0.01, 1.0)), (2.0, (0.05, 0.7))])
def test_dgdenoiser_in_edm_sampler_equals_dg_sampler(ref, ref_nets, w, window):
    """EDM's sampler, written from the paper, over the guided denoiser = dg_sampler with w1 = w2 = w."""
    s = ref['sampler']
    net, disc = ref_nets['net'], _disc(ref_nets)
    kw = dict(num_steps=7, S_churn=5.0, S_min=0.05, S_max=50.0)
    den = DGDenoiser(net, disc, w, time_min=window[0], time_max=window[1])
    expected = edm_sampler_spec(den, s['latents'], s['net_class_labels'], fixture_randn(4), **kw)
    got = dg_sampler(net, s['latents'], s['net_class_labels'], fixture_randn(4), **kw, discriminator=disc,
                     dg_weight_1st_order=w, dg_weight_2nd_order=w, time_min=window[0], time_max=window[1])
    plain = edm_sampler_spec(net, s['latents'], s['net_class_labels'], fixture_randn(4), **kw)
    assert (got - expected).abs().max() < 1e-12
    assert (got - plain).abs().max() > 1e-4  # guidance acted

def test_called_as_k_diffusion_calls_a_model(ref, ref_nets):
    """sigma as an [N] tensor, labels as a keyword, under no_grad: the same as EDM's call."""
    s = ref['sampler']
    den = DGDenoiser(ref_nets['net'], _disc(ref_nets, cond=True), 2.0)
    x = s['latents'].double() * 3.0
    with torch.no_grad():
        a = den(x, torch.full([x.shape[0]], 3.0), class_labels=s['net_class_labels'])
        lr_a = den.log_ratio.clone()
    b = den(x, 3.0, s['net_class_labels'])
    assert a.dtype == x.dtype
    assert (a - b).abs().max() < 1e-12
    assert torch.equal(lr_a, den.log_ratio)
    assert not a.requires_grad

def test_transform_is_the_correction(ref, ref_nets):
    """D' = D - w corr with corr from the release's fixture; attributes pass through."""
    g = ref['dg_correction_uncond']
    net, disc = ref_nets['net'], _disc(ref_nets)
    den = DGDenoiser(net, disc, 0.7, time_min=0.0, time_max=1.0)
    x, sigma = g['x'], g['sigma']
    # The network's part is computed here on this machine; the correction is compared with the recording.
    depth, fan_in = float32_layers(ref_nets['classifier'], ref_nets['head_uncond'])
    assert_close_to_fixture(den(x, sigma) - net(x, sigma).double(), -0.7 * g['discriminator_guidance'].double(),
                            2 * depth, fan_in)  # a gradient: forward and backward
    assert_close_to_fixture(den.log_ratio, g['log_ratio'], depth, fan_in)
    for attr in ('sigma_min', 'sigma_max', 'img_resolution', 'img_channels', 'label_dim'):
        assert getattr(den, attr) == getattr(net, attr)
    assert torch.equal(den.round_sigma(torch.tensor([0.5])), net.round_sigma(torch.tensor([0.5])))

class CountingDisc(torch.nn.Module):
    def __init__(self, disc):
        super().__init__()
        self.disc, self.calls = disc, 0
    def forward(self, x, tau, labels=None):
        self.calls += 1
        return self.disc(x, tau, labels)

def test_window_on_host_skips_the_discriminator(ref, ref_nets):
    net, disc = ref_nets['net'], CountingDisc(_disc(ref_nets))
    den = DGDenoiser(net, disc, 1.0, time_min=0.1, time_max=0.5)
    x = ref['sampler']['latents'].double()
    high = float(vp.tau_to_sigma(torch.tensor(0.9, dtype=torch.float64)))
    out = den(x, high)
    assert disc.calls == 0
    assert torch.equal(out, net(x, high).double())
    assert torch.equal(den.log_ratio, torch.full([x.shape[0]], LOG_RATIO_OUTSIDE))
    inside = float(vp.tau_to_sigma(torch.tensor(0.3, dtype=torch.float64)))
    den(x, inside)
    assert disc.calls == 1
    assert torch.equal(den.log_ratio, dg_correction(disc.disc, x, inside)[1])  # inside the window: the score itself

def test_window_on_device_style_sigma_is_a_mask(ref, ref_nets, monkeypatch):
    """A sigma the host cannot read for free (stand-in: treated as a device tensor) is masked, not read."""
    import edm_dg.sampling.denoisers as G
    monkeypatch.setattr(G, '_host_sigmas', lambda sigma: None)
    net, disc = ref_nets['net'], _disc(ref_nets)
    den = DGDenoiser(net, disc, 1.0, time_min=0.1, time_max=0.5)
    x = ref['sampler']['latents'].double()
    high = float(vp.tau_to_sigma(torch.tensor(0.9, dtype=torch.float64)))
    sigma = torch.full([x.shape[0]], high, dtype=torch.float64)
    out = den(x, sigma)
    assert torch.equal(out, net(x, sigma).double())
    assert torch.equal(den.log_ratio, torch.full([x.shape[0]], LOG_RATIO_OUTSIDE))

def test_differentiable_when_x_requires_grad(ref, ref_nets):
    """The NLL's divergence differentiates D' through the discriminator."""
    g = ref['dg_correction_uncond']
    net, disc = ref_nets['net'], _disc(ref_nets)
    den = DGDenoiser(net, disc, 1.0, time_min=0.0, time_max=1.0)
    x = g['x'][:1].clone().requires_grad_(True)
    with torch.enable_grad():
        out = den(x, g['sigma'][:1])
        grad, = torch.autograd.grad(out.sum(), x)
    plain = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        grad_plain, = torch.autograd.grad(net(plain, g['sigma'][:1]).double().sum(), plain)
    # corr = -(sigma^2 mean) grad_{x_vp} log_ratio at x_vp = mean x, so the gradient of sum(D') gains
    # w sigma^2 mean^2 H 1, H the Hessian of log_ratio in x_vp: here by autograd's Hessian-vector product.
    sigma = g['sigma'][:1].double()
    mean, tau = vp.sigma_to_vp(sigma)
    score = lambda z: torch.logit(disc(z, tau).clip(1e-5, 1 - 1e-5)).sum()
    with adm.math_attention():
        _, h1 = torch.autograd.functional.hvp(score, (mean * x.detach()).float(), torch.ones_like(x, dtype=torch.float32))
    expected = grad_plain + 1.0 * (sigma ** 2 * mean ** 2) * h1.double()
    dg_part = (grad - grad_plain).abs().max()
    assert dg_part > 0.01 * grad_plain.abs().max()  # the second derivative matters here
    assert (grad - expected).abs().max() <= 1e-4 * dg_part  # float32 rounding of two routes (same machine)

#----------------------------------------------------------------------------
# Boosting with samples straddling the window: against a per-sample reference.

def boosted_reference(net, disc, latents, randn_like, num_steps, w, time_min, time_max, period=5, weight_period=2,
                      S_churn_boost=4.0, boosted_counts=None):
    """The release's boosting written sample by sample: gamma, t_hat and the doubling per sample; the
    window decided on the smallest tau of the batch; first-order guidance only."""
    n = latents.shape[0]
    t = [float(v) for v in torch.as_tensor(
        (80 ** (1 / 7) + np.arange(num_steps) / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)] + [0.0]
    x = latents.double() * t[0]
    log_ratio = [math.inf] * n
    gamma_b = min(S_churn_boost / num_steps, math.sqrt(2) - 1)
    for i in range(num_steps):
        eps = randn_like(x)
        boosted = [i % period == 0 and log_ratio[k] < 0 for k in range(n)]
        if boosted_counts is not None:
            boosted_counts.append(sum(boosted))
        t_hat = torch.tensor([t[i] * (1 + (gamma_b if b else 0.0)) for b in boosted], dtype=torch.float64)
        x_hat = torch.stack([x[k] + math.sqrt(t_hat[k] ** 2 - t[i] ** 2) * eps[k] for k in range(n)])
        with torch.no_grad():
            denoised = net(x_hat, t_hat).double()
        tau_min = float(vp.sigma_to_tau(t_hat).min())
        corr = torch.zeros_like(x_hat)
        if time_min <= tau_min <= time_max:
            c, lr = dg_correction(disc, x_hat, t_hat)
            log_ratio = lr.tolist()
            for k in range(n):
                corr[k] = c[k].double() * (2.0 if i % weight_period == 0 and log_ratio[k] < 0 else 1.0)
        else:
            log_ratio = [LOG_RATIO_OUTSIDE] * n
        d = torch.stack([(x_hat[k] - denoised[k] + w * corr[k]) / t_hat[k] for k in range(n)])
        x_euler = torch.stack([x_hat[k] + (t[i + 1] - t_hat[k]) * d[k] for k in range(n)])
        if i < num_steps - 1:
            with torch.no_grad():
                d2 = (x_euler - net(x_euler, torch.tensor(t[i + 1], dtype=torch.float64)).double()) / t[i + 1]
            x = torch.stack([x_hat[k] + (t[i + 1] - t_hat[k]) * (0.5 * d[k] + 0.5 * d2[k]) for k in range(n)])
        else:
            x = x_euler
    return x

class ShiftedDisc(torch.nn.Module):
    """The reference discriminator with its logit lowered by `shift`, so that some samples look fake."""
    def __init__(self, disc, shift):
        super().__init__()
        self.disc, self.shift = disc, shift
    def forward(self, x, tau, labels=None):
        return torch.sigmoid(self.disc.logits(x, tau, labels) - self.shift)

def test_window_straddling_with_boosting_matches_per_sample_reference(ref, ref_nets):
    """At step 6 of 11 the plain noise level lies below time_min and the boosted one inside the window."""
    s = ref['sampler']
    net, disc = ref_nets['net'], ShiftedDisc(_disc(ref_nets), 0.59)
    kw = dict(num_steps=11, time_min=0.28, time_max=1.0, period=2)
    got = dg_sampler(net, s['latents'], None, fixture_randn(5), discriminator=disc, dg_weight_1st_order=1.0,
                     boosting=True, boost_period=2, boost_weight_period=2, num_steps=11, time_min=0.28, time_max=1.0)
    counts = []
    expected = boosted_reference(net, disc, s['latents'], fixture_randn(5), w=1.0, boosted_counts=counts, **kw)
    assert (got - expected).abs().max() < 1e-5
    t6 = (80 ** (1 / 7) + 6 / 10 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    tau = lambda v: float(vp.sigma_to_tau(torch.tensor(v, dtype=torch.float64)))
    assert tau(t6) < 0.28 <= tau(t6 * (1 + 4.0 / 11))
    assert 0 < counts[6] < s['latents'].shape[0], counts  # some boosted, some not: the batch straddles
