"""NLL by the probability-flow ODE: Gaussian closed forms, and DG in the drift through ADM discriminators
in the DG release's layout (attention included), checked against finite differences and an analytic flow."""

import copy
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import nll as nll_cli
from helpers import py, save_edm_pickle, tiny_edm
from edm_dg import adm, vp
from edm_dg.adm import EncoderUNet
from edm_dg.discriminator import Discriminator
from edm_dg.guidance import window_on_host
from edm_dg.nll import bits_per_dim, dequantize, dg_drift_term, drift, hutchinson, log_likelihood

class LinearGaussian(torch.nn.Module):
    """The exact denoiser of N(0, s^2 I) data, in float64: D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    sigma_min, sigma_max = 0.002, 80.0
    label_dim = 0

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        shrink = self.s ** 2 / (self.s ** 2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2)
        return x * shrink.to(x.dtype)

class QuadraticLogRatio(torch.nn.Module):
    """A discriminator with log(d / (1 - d)) = a |x_vp|^2 / 2 exactly (float64 parameter, so float64 inputs)."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(float(a), dtype=torch.float64), requires_grad=False)

    def forward(self, x_vp, tau, class_labels=None):
        return torch.sigmoid(0.5 * self.a * (x_vp ** 2).flatten(1).sum(1))

def gaussian_log_p(x, s):
    dims = x[0].numel()
    return -0.5 * (x ** 2).flatten(1).sum(1) / s ** 2 - dims * (math.log(s) + 0.5 * math.log(2 * math.pi))

def release_layout_discriminator(layouts, res=16, width=64, head_width=64, seed=0, std=0.05):
    """Classifier and unconditional head with the DG release's create_classifier arguments
    (tests/data/checkpoint_layouts.json: depth 4 / 2, attention at 32,16,8, 64 channels per head,
    8x8 head with attention), scaled down to `width` channels and res x res images, random weights.
    The zero-initialised residual outputs (attention projections included) get weights too."""
    torch.manual_seed(seed)
    cls_args = dict(layouts['adm_classifier_32x32']['create_classifier_args'], image_size=res, classifier_width=width)
    classifier = EncoderUNet.from_create_classifier_args(**cls_args)
    head_args = dict(layouts['dg_discriminator_head_uncond']['create_classifier_args'],
                     image_size=classifier.feature_resolution, in_channels=classifier.feature_channels,
                     classifier_width=head_width)
    head = EncoderUNet.from_create_classifier_args(**head_args)
    with torch.no_grad():
        for p in list(classifier.parameters()) + list(head.parameters()):
            if p.ndim > 1 and not p.abs().sum():
                p.normal_(0, std)
    return Discriminator(classifier, head).eval().requires_grad_(False)

@pytest.fixture(scope='module')
def release_disc(layouts):
    disc = release_layout_discriminator(layouts)
    n_attn = sum(isinstance(m, (adm.AttentionBlock, adm.AttentionPool2d)) for m in disc.modules())
    assert disc.classifier.feature_resolution == 8 and n_attn >= 8  # 16x16 and 8x8 blocks, middle blocks, pools
    return disc

def rademacher(shape, seed):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).to(torch.float64) * 2 - 1

#----------------------------------------------------------------------------
# Without guidance.

def test_gaussian_closed_form_within_001_bpd():
    s = 0.5
    net = LinearGaussian(s)
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * s
    lp = log_likelihood(net, x, num_steps=128, generator=torch.Generator().manual_seed(1))
    assert (bits_per_dim(lp, 16) - bits_per_dim(gaussian_log_p(x, s), 16)).abs().max() < 0.01

def test_dequantize_range():
    u8 = torch.tensor([[[[0, 255]]]], dtype=torch.uint8)
    x = dequantize(u8, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() <= 1 and x[0, 0, 0, 0] < -1 + 1 / 128 and x[0, 0, 0, 1] > 1 - 1 / 128

#----------------------------------------------------------------------------
# The double-differentiable attention path.

@pytest.mark.parametrize('legacy', [True, False])
def test_math_attention_matches_fused_kernel(legacy):
    qkv = torch.randn(2, 64, 3 * 128, generator=torch.Generator().manual_seed(0))
    fused = adm._token_attention(qkv, 2, legacy)
    with adm.math_attention():
        assert adm.math_attention_enabled()
        math_path = adm._token_attention(qkv, 2, legacy)
        with adm.math_attention(False):
            assert torch.equal(adm._token_attention(qkv, 2, legacy), fused)
    assert not adm.math_attention_enabled()
    assert math_path.shape == fused.shape == (2, 64, 128)
    assert (math_path - fused).abs().max() < 1e-5

def test_release_layout_discriminator_same_on_both_paths(release_disc):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    tau = torch.tensor([0.2, 0.7], dtype=torch.float64)
    out = []
    for use_math in (False, True):
        with adm.math_attention(use_math):
            logits = release_disc.logits(x, tau)
            grad, = torch.autograd.grad(logits.sum(), x)
        out.append((logits.detach(), grad))
    (l0, g0), (l1, g1) = out
    assert (l0 - l1).abs().max() <= 1e-5 * max(1.0, l0.abs().max().item())
    assert (g0 - g1).abs().max() <= 1e-5 * g0.abs().max().item()
    assert g0.abs().max() > 0

#----------------------------------------------------------------------------
# DG in the drift through a release-layout discriminator.

def test_nll_with_release_layout_discriminator_batch_1(release_disc):
    """DG's divergence in the NLL needs a double backward through ADM attention."""
    net = tiny_edm(res=16)
    x = dequantize(torch.randint(0, 256, (1, 3, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.uint8),
                   torch.Generator().manual_seed(3))
    run = lambda **kw: log_likelihood(net, x, num_steps=3, generator=torch.Generator().manual_seed(4), **kw)
    plain, guided = run(), run(discriminator=release_disc, w=2.0)
    assert guided.shape == (1,) and torch.isfinite(guided).all()
    assert (guided - plain).abs().item() > 1e-6

def test_dg_divergence_matches_finite_differences(release_disc):
    """Hutchinson's probe eps^T J eps of the DG term against a central difference along eps, in float64;
    the float32 path (the one nll.py runs) computes the same eps^T J to float32 accuracy."""
    disc64 = copy.deepcopy(release_disc).double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor(0.8, dtype=torch.float64)
    eps = rademacher(x.shape, 6)
    term = lambda d: (lambda z: dg_drift_term(d, z, sigma, w=2.0))
    _, probe = hutchinson(term(disc64), x, eps)
    h = 1e-5  # the term is strongly curved: central differences converge from 1e-4 down (1e-3 is 1% off)
    fd = ((term(disc64)(x + h * eps) - term(disc64)(x - h * eps)) * eps).sum() / (2 * h)
    assert probe.abs().item() > 1e-4
    assert abs(probe.item() - fd.item()) <= 1e-5 * abs(fd.item())
    # The probe is a sum of 768 terms that largely cancel; compare what it sums, eps^T J, with the float32 path.
    def vjp(d):
        z = x.clone().requires_grad_(True)
        return torch.autograd.grad(term(d)(z), z, eps)[0]
    v64, v32 = vjp(disc64), vjp(release_disc)
    assert torch.allclose((v64 * eps).sum(), probe, rtol=1e-12, atol=0)
    assert (v32 - v64).abs().max() <= 1e-4 * v64.abs().max()

def test_dg_term_is_the_sampler_correction_inside_the_window_and_zero_outside(release_disc):
    net = tiny_edm(res=16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    w = 1.5
    inside, outside = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.02, dtype=torch.float64)
    assert vp.sigma_to_tau(outside) < 0.01 < vp.sigma_to_tau(inside) < 1.0
    assert dg_drift_term(release_disc, x, outside, w=w) is None
    plain = drift(net, x, outside)
    assert torch.equal(drift(net, x, outside, discriminator=release_disc, w=w), plain)
    # Inside: -w sigma mean grad_{x_vp} logit, the gradient taken here on the fused path.
    mean, tau = vp.sigma_to_vp(inside.reshape(1).expand(2))
    x_vp = (mean.reshape(-1, 1, 1, 1) * x).float().requires_grad_(True)
    grad, = torch.autograd.grad(release_disc.logits(x_vp, tau).sum(), x_vp)
    expected = -w * inside * mean.reshape(-1, 1, 1, 1) * grad.double()
    got = dg_drift_term(release_disc, x, inside, w=w)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()  # float32 rounding (log(d / (1 - d)) of a sigmoid)
    # The window's edges are inclusive and follow time_min / time_max.
    t = vp.sigma_to_tau(inside).item()
    assert window_on_host([inside], t, t) and not window_on_host([inside], 0.01, t - 1e-6)
    assert dg_drift_term(release_disc, x, inside, w=w, time_min=t + 1e-6) is None

def test_log_likelihood_calls_the_discriminator_only_inside_the_window():
    net = LinearGaussian()
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    evaluated, guided = [], []
    quad = QuadraticLogRatio(0.1)
    def recording_net(x, sigma, class_labels=None):
        evaluated.append(vp.sigma_to_tau(sigma).item())
        return LinearGaussian.forward(net, x, sigma)
    recording_net.sigma_min, recording_net.sigma_max, recording_net.round_sigma = 0.002, 80.0, net.round_sigma
    def recording_disc(x_vp, tau, y):
        guided.append(tau.min().item())
        return quad(x_vp, tau, y)
    kw = dict(num_steps=16, generator=torch.Generator().manual_seed(9))
    log_likelihood(recording_net, x, discriminator=recording_disc, w=1.0, time_min=0.3, time_max=0.6, **kw)
    inside = [t for t in evaluated if 0.3 <= t <= 0.6]
    assert guided == inside and 0 < len(inside) < len(evaluated)
    # A window that holds no step: exactly the unguided likelihood.
    plain = log_likelihood(net, x, num_steps=16, generator=torch.Generator().manual_seed(9))
    none = log_likelihood(net, x, discriminator=recording_disc, w=1.0, time_min=0.95, time_max=1.0,
                          num_steps=16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(plain, none)
    # A discriminator indifferent everywhere (log-ratio 0) changes nothing either.
    zero = log_likelihood(net, x, discriminator=QuadraticLogRatio(0.0), w=2.0, num_steps=16,
                          generator=torch.Generator().manual_seed(9))
    assert torch.equal(plain, zero)

#----------------------------------------------------------------------------
# DG's divergence against closed forms.

def test_dg_probe_of_quadratic_log_ratio_is_exact():
    """log_ratio = a |x_vp|^2 / 2 makes the DG term -w a sigma mean^2 x: divergence -w a sigma D / (1 + sigma^2)."""
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    sigma, w, a = torch.tensor(2.0, dtype=torch.float64), 1.5, 0.3
    f, probe = hutchinson(lambda z: dg_drift_term(QuadraticLogRatio(a), z, sigma, w=w), x, rademacher(x.shape, 11))
    c = -w * a * sigma / (1 + sigma ** 2)
    assert torch.allclose(f, c * x, rtol=1e-12, atol=0)
    assert torch.allclose(probe, torch.full([3], c.item() * 32, dtype=torch.float64), rtol=1e-12, atol=0)

def test_guided_likelihood_against_the_analytic_linear_flow():
    """Gaussian data and a quadratic log-ratio make the guided flow linear, dx/dsigma = g(sigma) x with
    g = sigma / (s^2 + sigma^2) - w a sigma / (1 + sigma^2) on the window, so
    log p(x0) = log N(x0 e^G; 0, sigma_max^2 I) + D G with G = int g dsigma in closed form."""
    s, w, a, time_min, time_max = 0.5, 2.0, 0.5, 0.01, 1.0
    net = LinearGaussian(s)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) * s
    lp = log_likelihood(net, x, num_steps=128, generator=torch.Generator().manual_seed(13),
                        discriminator=QuadraticLogRatio(a), w=w, time_min=time_min, time_max=time_max)
    lo, hi = 0.002, 80.0
    w_lo = max(lo, vp.tau_to_sigma(torch.tensor(time_min, dtype=torch.float64)).item())
    w_hi = min(hi, vp.tau_to_sigma(torch.tensor(time_max, dtype=torch.float64)).item())
    G = 0.5 * math.log((s ** 2 + hi ** 2) / (s ** 2 + lo ** 2)) - w * a * 0.5 * math.log((1 + w_hi ** 2) / (1 + w_lo ** 2))
    dims = 16
    exact = (-0.5 * (x ** 2).flatten(1).sum(1) * math.exp(2 * G) / hi ** 2
             - dims * (math.log(hi) + 0.5 * math.log(2 * math.pi)) + dims * G)
    unguided = gaussian_log_p(x, s)
    assert (exact - unguided).abs().min() > 10  # guidance moves log p by far more than the tolerance
    assert (lp - exact).abs().max() < 0.02

#----------------------------------------------------------------------------
# The command.

@pytest.fixture(scope='module')
def cli_files(tmp_path_factory, layouts):
    from PIL import Image
    d = tmp_path_factory.mktemp('nll')
    data = d / 'data'
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f'{i}.png')
    disc = release_layout_discriminator(layouts)
    torch.save(disc.classifier.state_dict(), d / 'cls.pt')
    torch.save(disc.head.state_dict(), d / 'head.pt')  # The release's head format.
    return dict(data=str(data), net=save_edm_pickle(tiny_edm(res=16), str(d / 'n.pkl')), cls=str(d / 'cls.pt'),
                head=str(d / 'head.pt'), dir=d)

def test_nll_cli_writes_json_with_dg(cli_files):
    f = cli_files
    out = f['dir'] / 'dg.json'
    p = py('nll.py', f'--network={f["net"]}', f'--data={f["data"]}', '--steps=2', '--batch=2', f'--disc={f["head"]}',
           f'--classifier={f["cls"]}', '--w=1.5', '--time_min=0.05', f'--json={out}')
    assert p.returncode == 0, p.stderr
    assert 'bits/dim' in p.stdout and 'window [0.05, 1.0]' in p.stdout
    r = json.loads(out.read_text())
    # The library's bits/dim of the same images, dequantisation and probes (the command's seeding: chunk
    # of `batch` images from `start`, generator seed * 1000003 + start). Both run here; this process may
    # use more threads than the command, so float32 sums may round differently (relative 1e-5).
    from edm_dg import image_sets
    from edm_dg.models import load_models
    net, disc = load_models(f['net'], 'cpu', disc_path=f['head'], classifier_path=f['cls'], log=lambda *a: None)
    images = image_sets.ImageSource(f['data']).images(range(3))
    def library_bpd(w):
        out = []
        for start in (0, 2):
            g = torch.Generator().manual_seed(start)
            lp = log_likelihood(net, dequantize(images[start:start + 2], g), num_steps=2, generator=g, discriminator=disc,
                                w=w, time_min=0.05, time_max=1.0)
            out += bits_per_dim(lp, images[0].numel()).tolist()
        return out
    want = library_bpd(1.5)
    assert r['n'] == 3 and r['bpd'] == pytest.approx(want, rel=1e-5)
    assert library_bpd(2.0) != pytest.approx(want, rel=1e-3)  # the weight shows (2 is the default)
    assert r['bpd_mean'] == pytest.approx(np.mean(want), rel=1e-5)
    assert r['bpd_se'] == pytest.approx(np.std(want, ddof=1) / math.sqrt(3), rel=1e-3)
    assert (r['steps'], r['dg_weight_1st_order'], r['w'], r['time_min'], r['time_max']) == (2, 1.5, 1.5, 0.05, 1.0)
    assert (r['disc'], r['classifier'], r['processes']) == (f['head'], f['cls'], 1) and r['sec_per_image'] > 0

def test_nll_cli_plain_json_and_default_weight(cli_files):
    f = cli_files
    out = f['dir'] / 'plain.json'
    result = CliRunner().invoke(nll_cli.main, [f'--network={f["net"]}', f'--data={f["data"]}', '--steps=2', '--num=1',
                                               f'--json={out}'])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    assert (r['n'], r['dg_weight_1st_order'], r['disc'], r['bpd_se']) == (1, 0.0, None, None)

@pytest.mark.parametrize('args,needles', [
    (['--w=2'], ['--dg_weight_1st_order=2.0', 'pass --disc and --classifier']),
    (['--classifier={cls}'], ['cls.pt', 'without --disc', 'pass the discriminator head as --disc']),
    (['--disc={head}', '--classifier={cls}', '--time_min=0.5', '--time_max=0.2'], ['--time_min=0.5', 'time_min <= time_max']),
])
def test_nll_cli_one_line_errors(cli_files, args, needles):
    f = cli_files
    result = CliRunner().invoke(nll_cli.main, [f'--network={f["net"]}', f'--data={f["data"]}']
                                + [a.format(**f) for a in args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    err = result.stderr if hasattr(result, 'stderr') else result.output
    lines = [l for l in err.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
