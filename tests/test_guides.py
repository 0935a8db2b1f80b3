"""Guidance by a second network (edm_dg.sampling.guides): EDM2's sampler images, the Gaussian analytic
case of autoguidance with and without a guidance interval, and the composition rules."""

import math

import pytest
import torch

from helpers import GaussianDenoiser, GaussianRatioDiscriminator, assert_close_to_fixture, edm2_precond, edm2_reference, float32_layers
from edm_dg.pickles import EDM2Network
from edm_dg.sampling import DGDenoiser, Step, edm_sampler, guides
from edm_dg.sampling.guides import Guided, guided_by, parse_interval
from training import encoders

def edm2_net(name):
    return EDM2Network(edm2_precond(name))

#----------------------------------------------------------------------------
# EDM2's edm_sampler (8 steps, float32, no round_sigma) on the fixture's nets, plain and autoguided.

@pytest.mark.parametrize('run', ['sample_plain', 'sample_autog'])
def test_edm2_sampler_images(run):
    r = edm2_reference()[run]
    net = edm2_net(r['net'])
    den = net if r['gnet'] is None else Guided(net, edm2_net(r['gnet']), r['guidance'])
    with torch.no_grad():
        x = edm_sampler(den, r['noise'], r['labels'], num_steps=r['num_steps'])
    # The state is float32 as in EDM2 (EDM2Network.sampling_dtype), but the kernels differ from the recording
    # machine's: within float32 rounding of 2 * 8 - 1 evaluations of the networks in sequence.
    depth, fan_in = float32_layers(*([net.net] if r['gnet'] is None else [net.net, den.guide.net]))
    assert_close_to_fixture(x, r['images_float'], depth * (2 * r['num_steps'] - 1), fan_in)
    # Pixels: at most one gray level, on under 0.1% of them (rounding boundaries).
    diff = (encoders.StandardRGBEncoder().decode(x).int() - r['images_uint8'].int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    if r['gnet'] is not None:
        assert den.nfe == 2 and den.evaluations == 2 * (2 * r['num_steps'] - 1)
        plain = edm2_reference()['sample_plain']['images_uint8']
        assert float((encoders.StandardRGBEncoder().decode(x) != plain).float().mean()) > 0.5  # guidance matters

#----------------------------------------------------------------------------
# Gaussian analytic case: data N(0, s^2 I) has the exact denoiser D = x s^2 / (s^2 + sigma^2), so
# D_g + w (D - D_g) = c_w(sigma) x with c_w = c_g + w (c - c_g), and the probability-flow ODE
# dx/dsigma = (1 - c_w) x / sigma integrates in closed form: from sigma_a down to sigma_b it
# multiplies x by prod_s ((s^2 + sigma_b^2) / (s^2 + sigma_a^2))^(k_s / 2), with k = 1 - w for
# the guide's s and k = w for the main net's. EDM's schedule ends with an Euler step from
# sigma_min to 0, which is x -> D_w(x; sigma_min).

S_MAIN, S_GUIDE, SIGMA_MIN, SIGMA_MAX = 0.5, 0.8, 0.002, 80.0

def ode_gain(w, a, b):
    """x(b) / x(a) of the PF-ODE of D_w from sigma = a down to b."""
    log = lambda s: 0.5 * math.log((s ** 2 + b ** 2) / (s ** 2 + a ** 2))
    return math.exp((1 - w) * log(S_GUIDE) + w * log(S_MAIN))

def c_w(w, sigma):
    c = lambda s: s ** 2 / (s ** 2 + sigma ** 2)
    return c(S_GUIDE) + w * (c(S_MAIN) - c(S_GUIDE))

def sampler_gain(w, lo=0.0, hi=math.inf):
    """x_0 / x(sigma_max): guidance weight w for sigma in [lo, hi], 1 elsewhere."""
    points = sorted({SIGMA_MAX, SIGMA_MIN} | {p for p in (lo, hi) if SIGMA_MIN < p < SIGMA_MAX}, reverse=True)
    gain = 1.0
    for a, b in zip(points[:-1], points[1:]):
        gain *= ode_gain(w if lo <= (a + b) / 2 <= hi else 1.0, a, b)
    return gain * c_w(w if lo <= SIGMA_MIN <= hi else 1.0, SIGMA_MIN)

def test_guided_gaussian_denoiser_closed_form():
    den = Guided(GaussianDenoiser(S_MAIN), GaussianDenoiser(S_GUIDE), 2.5)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.01, 0.7, 20.0):
        got = den(x, torch.tensor(sigma, dtype=torch.float64))
        # The two denoisers round to float32 (6e-8 of |x|) and enter with weights 1 - w and w: 4 * 6e-8 |x|.
        assert float((got.double() - c_w(2.5, sigma) * x).abs().max()) <= 3e-7 * float(x.abs().max())

@pytest.mark.parametrize('w, interval, tol', [
    (2.5, (0.0, math.inf), 1e-3),  # smooth field, Heun's O(h^2): 2.6e-4 measured at 256 steps
    (2.5, (0.3, 3.0), 1e-2),       # the field jumps at sigma_lo, sigma_hi: O(h) at the two crossing steps, 2e-3 measured
    (1.0, (0.0, math.inf), 1e-3),
])
def test_autoguidance_gaussian_analytic(w, interval, tol):
    main, guide = GaussianDenoiser(S_MAIN), GaussianDenoiser(S_GUIDE)
    z = torch.linspace(-2, 2, 5, dtype=torch.float64).reshape(5, 1, 1, 1).expand(5, 1, 4, 4)
    x = edm_sampler(Guided(main, guide, w, *interval), z, num_steps=256)
    want = SIGMA_MAX * z * sampler_gain(w, *interval)
    assert float((x - want).abs().max()) <= tol * float(want.abs().max())
    if w != 1:  # the test can tell guidance from none: the gains differ by far more than tol
        assert abs(sampler_gain(w, *interval) / sampler_gain(1.0) - 1) > 20 * tol

def gaussian_gain(weights, lo_hi=None):
    """x_0 / x(sigma_max) for a linear denoiser sum_s k_s c_s(sigma) x (sum k_s = 1; weights {s: k_s})."""
    def ode(a, b):
        return math.exp(sum(k * 0.5 * math.log((s ** 2 + b ** 2) / (s ** 2 + a ** 2)) for s, k in weights.items()))
    return ode(SIGMA_MAX, SIGMA_MIN) * sum(k * s ** 2 / (s ** 2 + SIGMA_MIN ** 2) for s, k in weights.items())

def test_autoguidance_and_dg_gaussian_analytic():
    """DG on top: with the Bayes discriminator between N(0, s_data^2) and N(0, s_model^2), the correction
    w_dg sigma^2 grad log ratio is w_dg (c_data - c_model) x, so the whole chain is again linear in x."""
    s_data, s_model, w, w_dg = 0.6, S_MAIN, 2.0, 0.7
    main, guide = GaussianDenoiser(S_MAIN), GaussianDenoiser(S_GUIDE)
    disc = GaussianRatioDiscriminator(s_data, s_model)
    chain = DGDenoiser(Guided(main, guide, w), disc, w_dg, time_min=0.0, time_max=1.0)
    z = torch.linspace(-1, 1, 5, dtype=torch.float64).reshape(5, 1, 1, 1)  # one pixel: the score stays unclipped
    x = edm_sampler(chain, z, num_steps=256)
    weights = {S_GUIDE: 1 - w, S_MAIN: w + (-w_dg if s_model == S_MAIN else 0), s_data: w_dg}
    want = SIGMA_MAX * z * gaussian_gain(weights)
    # Heun's O(h^2) as above; the correction is computed in float32 (the discriminator's dtype).
    assert float((x - want).abs().max()) <= 1e-3 * float(want.abs().max())
    assert abs(gaussian_gain(weights) / gaussian_gain({S_GUIDE: 1 - w, S_MAIN: w}) - 1) > 0.05  # DG matters
    # w_dg = 0: guidance alone, the same numbers.
    alone = edm_sampler(Guided(main, guide, w), z, num_steps=16)
    assert torch.equal(edm_sampler(DGDenoiser(Guided(main, guide, w), disc, 0.0), z, num_steps=16), alone)

#----------------------------------------------------------------------------
# Composition rules and the interval.

def _tiny_pair():
    return edm2_net('cond16'), edm2_net('guide16')

def test_weight_one_gives_the_main_networks_images():
    net, guide = _tiny_pair()
    r = edm2_reference()['sample_plain']
    with torch.no_grad():
        plain = edm_sampler(net, r['noise'], r['labels'], num_steps=4)
        den = Guided(net, guide, 1.0)
        assert torch.equal(edm_sampler(den, r['noise'], r['labels'], num_steps=4), plain)
        assert den.evaluations == 7  # the guide is never evaluated
        assert guided_by(net, guide, 1.0) is net and guided_by(net, None, 2.0) is net

def test_interval_holding_no_step_gives_plain_sampling():
    net, guide = _tiny_pair()
    r = edm2_reference()['sample_plain']
    with torch.no_grad():
        plain = edm_sampler(net, r['noise'], r['labels'], num_steps=4)
        # 4 steps from 80: 80, 9.72, 0.470, 0.002 -- none in [1, 5].
        den = Guided(net, guide, 3.0, 1.0, 5.0)
        assert torch.equal(edm_sampler(den, r['noise'], r['labels'], num_steps=4), plain)
        assert den.evaluations == 7
        inside = Guided(net, guide, 3.0, 0.4, 10.0)
        assert not torch.equal(edm_sampler(inside, r['noise'], r['labels'], num_steps=4), plain)
        assert inside.evaluations == 7 + 4  # the guide at t = 9.72 and 0.470, each twice (Euler, Heun)

def test_interval_per_sample_noise_levels_mask_on_the_device(monkeypatch):
    net, guide = _tiny_pair()
    e = edm2_reference()['cond16']
    den = Guided(net, guide, 2.0, 0.1, 1.0)
    sigma = torch.tensor([0.05, 0.5, 1.0, 3.0])  # out, in, in (closed interval), out
    with torch.no_grad():
        mixed = den(e['x'], sigma, e['labels'], step=Step(0, 1, tuple(sigma.tolist())))
        d, g = net(e['x'], sigma, e['labels']), guide(e['x'], sigma, e['labels'])
        for i, inside in enumerate([False, True, True, False]):
            want = g[i].lerp(d[i], 2.0) if inside else d[i]
            assert torch.equal(mixed[i], want)
        # Without host values (a CUDA tensor and no step): the same result, masked on the device.
        monkeypatch.setattr(guides, '_host_sigmas', lambda sigma: None)
        assert torch.equal(den(e['x'], sigma, e['labels']), mixed)

def test_parse_interval():
    assert parse_interval('0.28,2.9') == (0.28, 2.9)
    for bad in ('0.28', '3,1', 'a,b'):
        with pytest.raises(ValueError, match='--guidance_interval'):
            parse_interval(bad)
