"""GPU fast paths, checked for correctness on CPU: autocast precisions, channels_last, compile fallback."""

import pytest
import torch

from helpers import tiny_classifier, tiny_discriminator, tiny_edm
from edm_dg import precision
from edm_dg.generate import draw_inputs
from edm_dg.precision import FastDiscriminator, FastNet
from edm_dg.guidance import dg_correction
from edm_dg.sampling import dg_sampler

def run(net, disc, w, seeds=range(6), steps=8):
    lat, y, rnd = draw_inputs([3, 16, 16], 0, list(seeds), 'cpu')
    return dg_sampler(net, lat, None, rnd.randn_like, num_steps=steps, discriminator=disc, dg_weight_1st_order=w)

@pytest.fixture(scope='module')
def nets():
    net = tiny_edm()
    disc = tiny_discriminator(tiny_classifier())
    return net, disc

def test_bf16_quality_guard(nets):
    """bf16 changes images by < 0.05 (on [-1,1]) and far less than guidance itself changes them."""
    net, disc = nets
    w = 4.0
    with torch.no_grad():
        ref_plain = run(net, disc, 0.0)
        ref_dg = run(net, disc, w)
        fast_dg = run(FastNet(net, 'bf16'), FastDiscriminator(disc, 'bf16'), w)
    precision_err = (fast_dg - ref_dg).abs().max().item()
    guidance_effect = (ref_dg - ref_plain).abs().max().item()
    assert torch.isfinite(fast_dg).all()
    # bf16 acts (fp32 through the same wrappers gives the reference exactly: 0) and rounds at 2^-8.
    assert 1e-5 < precision_err < 0.05, precision_err
    assert precision_err < 0.25 * guidance_effect, (precision_err, guidance_effect)

@pytest.mark.parametrize('prec', ['bf16', 'fp16'])
def test_guidance_gradient_finite_in_low_precision(nets, prec):
    _, disc = nets
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64) * 5
    for sigma in (0.01, 1.0, 80.0):
        corr, lr = dg_correction(FastDiscriminator(disc, prec), x, torch.full([4], sigma))
        assert corr.dtype == torch.float32 and torch.isfinite(corr).all() and torch.isfinite(lr).all()
        ref, _ = dg_correction(disc, x, torch.full([4], sigma))
        # Off by low precision's rounding (units of 2^-8 for bf16, 2^-11 for fp16), not more, and not less.
        assert 1e-4 * ref.abs().max() < (corr - ref).abs().max() <= 0.1 * ref.abs().max()

def test_channels_last_matches(nets):
    net, disc = nets
    with torch.no_grad():
        a = run(net, disc, 2.0, steps=4)
        b = run(FastNet(net, 'fp32', channels_last=True), FastDiscriminator(disc, 'fp32', channels_last=True), 2.0, steps=4)
    net.to(memory_format=torch.contiguous_format)
    disc.to(memory_format=torch.contiguous_format)
    assert (a - b).abs().max() < 1e-4

def test_compile_path_and_fallback(nets, monkeypatch):
    net, disc = nets
    calls = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda m, **k: calls.append(m) or real_compile(m, backend='eager'))
    with torch.no_grad():
        a = run(net, disc, 2.0, seeds=[0, 1], steps=3)
        b = run(FastNet(net, compile=True), FastDiscriminator(disc, compile=True), 2.0, seeds=[0, 1], steps=3)
    assert len(calls) == 2 and torch.allclose(a, b, atol=1e-5)
    def broken(m, **k):
        raise RuntimeError('no compiler')
    monkeypatch.setattr(torch, 'compile', broken)
    msgs = []
    fast = FastNet(net, compile=True, log=msgs.append)
    assert type(fast.model).__name__ == '_AutocastModel' and 'running eagerly' in msgs[0]
    assert type(net.model).__name__ == 'SongUNet'  # the original network is untouched

def test_precision_names():
    with pytest.raises(ValueError, match='precision'):
        precision.autocast_dtype('fp8')

def test_guidance_skipped_outside_window(nets, monkeypatch):
    """Outside [time_min, time_max] the classifier is not called at all (host-side decision)."""
    net, disc = nets
    calls = []
    class Counting(torch.nn.Module):
        def forward(self, x, t, y=None):
            calls.append(t.min().item())
            return disc(x, t, y)
    lat, _, rnd = draw_inputs([3, 16, 16], 0, [0, 1], 'cpu')
    with torch.no_grad():
        dg_sampler(net, lat, None, rnd.randn_like, num_steps=10, discriminator=Counting(), dg_weight_1st_order=1.0,
                   time_min=0.2, time_max=0.5)
    # EDM's 10 noise levels (rho = 7, 80 down to 0.002): the steps whose VP time lies in the window, once each.
    from edm_dg import vp
    sigmas = (80 ** (1 / 7) + torch.arange(10, dtype=torch.float64) / 9 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    inside = [float(t) for t in vp.sigma_to_tau(sigmas) if 0.2 <= t <= 0.5]
    assert 0 < len(inside) < 10 and calls == pytest.approx(inside, rel=1e-6)

def test_bench_rounds_interleave_and_ratio_is_per_round(monkeypatch):
    """The benchmarks run each loop once per round in turn and report per-round ratios (on a clock that
    the loops advance by set amounts: no timing)."""
    import types
    from edm_dg import bench
    now = [0.0]
    monkeypatch.setattr(bench, 'time', types.SimpleNamespace(perf_counter=lambda: now[0]))
    calls = []
    def loop(name, durations):
        left = [100.0, *durations]  # the warm-up round: slow
        def fn():
            calls.append(name)
            now[0] += left.pop(0)
        return fn
    # Rounds of a: 1, 1, 4 s; of b: 3, 2, 4 s. Per-round ratios 3, 2, 1 (median 2); medians 1 and 3 s.
    (ta, tb), (one, ratio) = bench.time_interleaved([loop('a', [1.0, 1.0, 4.0]), loop('b', [3.0, 2.0, 4.0])], repeats=3)
    assert calls == ['a', 'b'] * 4  # Warm-up round, then alternating.
    assert (ta, tb) == (1.0, 3.0) and (one, ratio) == (1.0, 2.0)  # not the ratio of the medians (3)

def test_release_style_baseline_computes_the_same_guidance(nets):
    """The benchmark's release-style discriminator (trainable, checkpointed einsum attention)
    gives our guidance, and its attention blocks differentiate their parameters as guided-diffusion's do."""
    import copy
    from edm_dg.adm import AttentionBlock
    from edm_dg.bench import release_style
    _, disc = nets
    base = release_style(copy.deepcopy(disc))
    x, sigma = torch.randn(3, 3, 16, 16) * 2, torch.tensor([0.5, 2.0, 10.0])
    (c1, l1), (c2, l2) = dg_correction(disc, x, sigma), dg_correction(base, x, sigma)
    assert c1.abs().max() > 0 and (c1 - c2).abs().max() < 1e-5 * c1.abs().max() and (l1 - l2).abs().max() < 1e-5
    block = next(m for m in base.modules() if isinstance(m, AttentionBlock))
    x_vp = x.detach().requires_grad_(True)
    base(x_vp, torch.full([3], 0.5)).sum().backward()
    assert block.qkv.weight.grad is not None and block.qkv.weight.grad.abs().sum() > 0

def test_bench_edm2_counts_the_guides_evaluations():
    """`python -m edm_dg.bench --edm2`: a shrunken img64-xs (the guide of its size is itself) runs plain, guided and
    guided in EDM2's interval (DG left out here: it is timed as for EDM); the evaluation counts are the sampler's,
    the guide's only where it runs."""
    from edm_dg import bench
    out = bench.edm2_bench('edm2-img64-xs', 8, batch=1, steps=3, repeats=1, device=torch.device('cpu'), with_dg=False)
    plain, guided, interval = (out[k]['nfe'] for k in out)
    # Levels 80, 2.5, 0.002: the guide runs at the two calls at 2.5 only (EDM2's interval is [0.28, 2.9]).
    assert plain == 5 and guided == 10 and interval == 7
    assert all(v['seconds'] > 0 for v in out.values())
