"""EDM's network layer (training.networks, training.loss) against recordings of NVlabs' EDM.

Fixtures (tests/data/README.md): `edm_reference.pt` holds tiny seeded networks of
every family with their inputs and outputs, and the three losses after a fixed
seed; `edm_layouts.json` holds the parameter layouts of EDM's published
configurations. Matching both means state dicts and pickles move between the
two code bases and give the same numbers (docs/compat.md).
"""

import functools
import json
import math
import os

import pytest
import torch

from helpers import assert_imports_only, assert_close_to_fixture, float32_layers
from training import loss, networks

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TINY = ['edm_ddpmpp_cond_aug', 'edm_ncsnpp_uncond', 'edm_songunet_skip', 'vp_ddpmpp_cond',
        've_ncsnpp_uncond', 'edm_adm_cond', 'edm_adm_cond_aug', 'iddpm_adm_cond']

@functools.lru_cache(maxsize=None)
def edm_reference():
    return torch.load(os.path.join(DATA, 'edm_reference.pt'), weights_only=True)

@functools.lru_cache(maxsize=None)
def edm_layouts():
    with open(os.path.join(DATA, 'edm_layouts.json')) as f:
        return json.load(f)

def build_tiny(name):
    entry = edm_reference()[name]
    net = getattr(networks, entry['class_name'])(**entry['init_kwargs'])
    net.load_state_dict(entry['state_dict'], strict=True)
    return net.eval(), entry

def assert_close(actual, expected, net):
    """Equal to the recording up to float32 summation order through the layers of net (helpers.fixture_tol)."""
    assert actual.dtype == expected.dtype
    assert_close_to_fixture(actual, expected, *float32_layers(net))

#----------------------------------------------------------------------------
# Tiny networks of every family: outputs, float64 path, round_sigma, noise range.

@pytest.mark.parametrize('name', TINY)
def test_tiny_network_matches_edm(name):
    net, e = build_tiny(name)
    extra = {} if e['augment_labels'] is None else dict(augment_labels=e['augment_labels'])
    with torch.no_grad():
        assert_close(net(e['x'], e['sigma'], e['class_labels'], **extra), e['denoised'], net)
        # float64 inputs with force_fp32 (what EDM's sampler does); recorded without augment labels.
        assert_close(net(e['x'].double(), e['sigma'].double(), e['class_labels'], force_fp32=True),
                     e['denoised_from_float64'], net)
    rounded = net.round_sigma(e['round_sigma_in'])
    if hasattr(net, 'u'):  # iDDPM's grid of noise levels: a float32 recursion over its 1000 steps
        assert_close_to_fixture(rounded, e['round_sigma_out'], depth=len(net.u), fan_in=1)
    else:  # EDM's round_sigma is the identity
        assert torch.equal(rounded, e['round_sigma_out'])
    for key in ('sigma_min', 'sigma_max'):
        assert getattr(net, key) == pytest.approx(e[key], rel=1e-6), key
        assert isinstance(getattr(net, key), (int, float))
    assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == \
        (e['init_kwargs']['img_resolution'], e['init_kwargs']['img_channels'], e['init_kwargs'].get('label_dim', 0), False)

def test_state_dict_round_trip_is_exact():
    net, e = build_tiny('edm_ncsnpp_uncond')
    sd = net.state_dict()
    assert list(sd) == list(e['state_dict'])
    assert all(torch.equal(sd[k], e['state_dict'][k]) for k in sd)

def test_class_labels_default_to_zero_vector():
    net, e = build_tiny('edm_adm_cond')
    with torch.no_grad():
        a = net(e['x'], e['sigma'])
        b = net(e['x'], e['sigma'], torch.zeros(len(e['x']), net.label_dim))
    assert torch.allclose(a, b, atol=1e-6)

#----------------------------------------------------------------------------
# Published configurations: every key, shape and the parameter count.

@pytest.mark.parametrize('name', sorted(edm_layouts()))
def test_published_layout(name):
    layout = edm_layouts()[name]
    with torch.device('meta'):  # 300 M parameters cost nothing here.
        net = getattr(networks, layout['class_name'])(**layout['init_kwargs'])
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {k: list(v) for k, v in layout['state_dict_shapes'].items()}
    assert sum(p.numel() for p in net.parameters()) == layout['num_parameters']

def test_published_noise_ranges():
    """sigma_min/sigma_max of the baselines at full size (computed on the CPU even on the meta device)."""
    layouts = edm_layouts()
    with torch.device('meta'):
        vp = networks.VPPrecond(**layouts['baseline-cifar10-32x32-uncond-vp (VPPrecond DDPM++)']['init_kwargs'])
        iddpm = networks.iDDPMPrecond(**layouts['baseline-imagenet-64x64-cond-adm (iDDPMPrecond ADM)']['init_kwargs'])
    assert vp.sigma_min == 0.0009765625  # float32 artefact of exp(x) - 1, kept for compatibility
    assert vp.sigma_max == pytest.approx(152.16697, rel=1e-6)
    assert iddpm.u.shape == (1001,) and iddpm.u[-1] == 0
    assert bool((iddpm.u[1:] < iddpm.u[:-1]).all())
    assert iddpm.sigma_min == pytest.approx(0.0064223, rel=1e-4) and iddpm.sigma_max == pytest.approx(20291.17, rel=1e-5)

#----------------------------------------------------------------------------
# Losses: same values, hence the same random draws in the same order.

@pytest.mark.parametrize('loss_name', ['EDMLoss', 'VPLoss', 'VELoss'])
def test_loss_matches_edm(loss_name):
    rec = edm_reference()['losses']
    net, _ = build_tiny(rec['network'])
    torch.manual_seed(rec['manual_seed'])
    value = getattr(loss, loss_name)()(net, rec['images'], rec['labels'])
    depth, fan_in = float32_layers(net)
    assert_close_to_fixture(value.detach(), rec['values'][loss_name], depth + 2, fan_in)  # + square and weight

def test_loss_backward_reaches_every_trainable_parameter():
    net, _ = build_tiny('edm_ddpmpp_cond_aug')
    rec = edm_reference()['losses']
    net.train()
    loss.EDMLoss()(net, rec['images'], rec['labels'], augment_pipe=lambda x: (x, torch.zeros(len(x), 9))).mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []

#----------------------------------------------------------------------------
# Pieces.

def test_attention_gradients_match_autograd():
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 8, 5, dtype=torch.float32).unbind(0)
    q, k = q.requires_grad_(), k.requires_grad_()
    r = torch.randn(2, 5, 5)
    gq, gk = torch.autograd.grad((networks.AttentionOp.apply(q, k) * r).sum(), (q, k))
    plain = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(8)).softmax(dim=2)
    eq, ek = torch.autograd.grad((plain * r).sum(), (q, k))
    assert torch.allclose(gq, eq, atol=1e-6) and torch.allclose(gk, ek, atol=1e-6)

def test_vp_schedule_helpers():
    with torch.device('meta'):
        vp = networks.VPPrecond(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-9)
    h = 1e-6
    assert torch.allclose(vp.sigma_deriv(t), (vp.sigma(t + h) - vp.sigma(t - h)) / (2 * h), rtol=1e-5)

@pytest.mark.parametrize('mode', ['xavier_uniform', 'xavier_normal', 'kaiming_uniform', 'kaiming_normal'])
def test_weight_init_scale(mode):
    torch.manual_seed(0)
    w = networks.weight_init([400, 300], mode, fan_in=300, fan_out=200)
    var = 2 / (300 + 200) if mode.startswith('xavier') else 1 / 300
    assert float(w.var()) == pytest.approx(var, rel=0.02)
    with pytest.raises(ValueError):
        networks.weight_init([2], 'orthogonal', 1, 1)

def test_group_norm_min_channels_per_group():
    assert networks.GroupNorm(num_channels=64).num_groups == 16
    assert networks.GroupNorm(num_channels=512).num_groups == 32

@pytest.mark.parametrize('module', [networks, loss])
def test_embedded_source_imports_only_what_edm_has(module):
    """The module source travels in pickles and runs inside NVlabs' EDM: stdlib, numpy, torch, persistence only."""
    assert_imports_only(module)
