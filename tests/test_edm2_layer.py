"""EDM2's network layer (training.networks_edm2, training.encoders) against recordings of NVlabs' EDM2,
and EDM2 pickles through both loaders (docs/compat.md, "EDM2 networks and pickles").

Fixtures (tests/data/README.md): `edm2_reference.pt` holds tiny seeded networks of
four kinds with inputs, `D` and `logvar`; `edm2_layouts.json` the parameter layouts
of the 16 published configurations built by EDM2's code on the meta device.
"""

import functools
import io
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import dnnlib
from helpers import assert_imports_only, assert_close_to_fixture, edm2_reference, float32_layers
from edm_dg import pickles
from torch_utils import persistence
from training import encoders, networks_edm2

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
TINY = ['cond16', 'uncond16', 'latent8', 'guide16']

@functools.lru_cache(maxsize=None)
def edm2_layouts():
    with open(os.path.join(DATA, 'edm2_layouts.json')) as f:
        return json.load(f)

def build_tiny(name):
    entry = edm2_reference()[name]
    net = networks_edm2.Precond(**entry['kwargs']).eval()
    net.load_state_dict(entry['state_dict'], strict=True)
    return net, entry

def rel_err(actual, expected):
    """Max abs difference relative to the reference's largest magnitude."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return float((actual - expected).abs().max()) / float(expected.abs().max())

def _outputs(net, entry):
    with torch.no_grad():
        return net(entry['x'], entry['sigma'], entry['labels'], return_logvar=True)

#----------------------------------------------------------------------------
# Tiny networks: D, logvar and the network branch alone.

@pytest.mark.parametrize('name', TINY)
def test_tiny_network_matches_edm2(name):
    net, e = build_tiny(name)
    D, logvar = _outputs(net, e)
    # Float32 on another CPU: within the rounding of the net's layers in sequence (helpers.fixture_tol).
    depth, fan_in = float32_layers(net)
    assert_close_to_fixture(D, e['D'], depth, fan_in)
    assert_close_to_fixture(logvar, e['logvar'], 2, net.logvar_linear.weight.shape[1])
    # D = c_skip x + c_out F: compare F itself, so the skip term cannot hide an error in the U-Net;
    # only where c_out > 0.3, since recovering F from the stored (rounded) D divides its rounding by c_out.
    sigma, sd = e['sigma'].reshape(-1, 1, 1, 1), net.sigma_data
    c_skip, c_out = sd ** 2 / (sigma ** 2 + sd ** 2), sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    keep = c_out.flatten() > 0.3
    assert int(keep.sum()) >= 2
    F_ours, F_ref = ((d - c_skip * e['x']) / c_out for d in (D, e['D']))
    assert_close_to_fixture(F_ours[keep], F_ref[keep], depth, fan_in)
    assert list(net.state_dict()) == list(e['state_dict'])
    assert (net.img_resolution, net.img_channels, net.label_dim) == \
        (e['kwargs']['img_resolution'], e['kwargs']['img_channels'], e['kwargs']['label_dim'])

def test_missing_labels_are_the_zero_vector():
    net, e = build_tiny('cond16')
    with torch.no_grad():
        a = net(e['x'], e['sigma'])
        b = net(e['x'], e['sigma'], torch.zeros(len(e['x']), net.label_dim))
    assert torch.equal(a, b)

def test_inputs_of_any_float_dtype_give_float32():
    net, e = build_tiny('uncond16')
    with torch.no_grad():
        D = net(e['x'].double(), e['sigma'].double())
    assert D.dtype == torch.float32 and torch.equal(D, net(e['x'], e['sigma']))

#----------------------------------------------------------------------------
# Published configurations: every key in order, its shape and the parameter count.

@pytest.mark.parametrize('name', sorted(edm2_layouts()))
def test_published_layout(name):
    layout = edm2_layouts()[name]
    assert layout['class_name'] == 'training.networks_edm2.Precond'
    with torch.device('meta'):  # Up to 1.5 G parameters cost nothing here.
        net = networks_edm2.Precond(**layout['kwargs'])
    shapes = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert shapes == [(k, list(v)) for k, v in layout['state_dict_shapes'].items()]
    assert sum(p.numel() for p in net.parameters()) == layout['num_parameters']

def test_layouts_module_names_the_published_configurations():
    from edm_dg import layouts
    assert sorted(layouts.EDM2_NETWORKS) == sorted(edm2_layouts())
    for name, layout in edm2_layouts().items():
        assert layouts.edm2_network(name) == ('Precond', layout['kwargs'])

#----------------------------------------------------------------------------
# The magnitude-preserving pieces (the paper's Appendix B).

def test_magnitude_preserving_functions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 64, 4096, generator=g, dtype=torch.float64).unbind(0)
    for t in (0.3, 0.5, 0.8):
        assert float(networks_edm2.mp_sum(a, b, t).square().mean()) == pytest.approx(1, rel=0.02)
        cat = networks_edm2.mp_cat(a[:16], b, dim=0, t=t)
        assert cat.shape == (80, 4096) and float(cat.square().mean()) == pytest.approx(1, rel=0.02)
    assert float(networks_edm2.mp_silu(a).square().mean()) == pytest.approx(1, rel=0.02)
    x = torch.randn(3, 5, 7, generator=g) * torch.tensor([0.1, 1, 30]).reshape(3, 1, 1)
    rms_in = x.square().mean(dim=[1, 2]).sqrt()
    rms = networks_edm2.normalize(x).square().mean(dim=[1, 2]).sqrt()
    assert torch.allclose(rms, rms_in / (rms_in + 1e-4), rtol=1e-5)  # unit RMS, up to eps = 1e-4
    fourier = networks_edm2.MPFourier(4096)(torch.randn(8, generator=g))
    assert float(fourier.square().mean()) == pytest.approx(1, rel=0.05)

def test_resample_keeps_constants_and_inverts_shapes():
    x = torch.full([2, 3, 8, 8], 0.7)
    down = networks_edm2.resample(x, mode='down')
    up = networks_edm2.resample(x, f=[1, 3, 3, 1], mode='up')
    assert down.shape == (2, 3, 4, 4) and torch.allclose(down, torch.full_like(down, 0.7))
    assert up.shape == (2, 3, 16, 16) and torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7))
    assert networks_edm2.resample(x) is x

def test_forced_weight_normalization_in_training_mode():
    torch.manual_seed(0)
    conv = networks_edm2.MPConv(6, 4, kernel=[3, 3])
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        y_eval = conv.eval()(x)
        norms = conv.weight.flatten(1).norm(dim=1)
        assert not torch.allclose(norms, torch.full_like(norms, math.sqrt(54)), rtol=1e-3)
        y_train = conv.train()(x)
    norms = conv.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(54)), rtol=1e-3)  # unit RMS per output channel
    # The layer's function does not change (float32 rounding of the renormalised weights, relative to y's scale).
    assert torch.allclose(y_train, y_eval, rtol=1e-4, atol=1e-5 * float(y_eval.abs().max()))

@pytest.mark.parametrize('module', [networks_edm2, encoders])
def test_embedded_source_imports_only_what_edm2_has(module):
    """The module source travels in pickles and runs inside NVlabs' EDM2: stdlib, numpy, torch, persistence only."""
    assert_imports_only(module, ('numpy', 'torch', 'diffusers', 'dnnlib'))  # dnnlib: EDM2 has it; for the VAE cache

#----------------------------------------------------------------------------
# Encoders.

def test_standard_rgb_encoder():
    enc = encoders.StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 3, 1, 1)
    x = enc.encode(pixels)
    assert x.dtype == torch.float32 and float(x.min()) == -1 and float(x.max()) == 1
    assert torch.equal(enc.decode(x), pixels)
    assert torch.equal(enc.decode(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    # The fixture's images went through EDM2's decode on another CPU: the same elementwise
    # float32 arithmetic, allowed to differ by one gray level at a rounding boundary.
    for run in ('sample_plain', 'sample_autog'):
        r = edm2_reference()[run]
        diff = (enc.decode(r['images_float']).int() - r['images_uint8'].int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3

class _StubVAE:
    """Records what it decodes; encodes to a posterior with the given mean and std."""

    def __init__(self):
        self.decoded = []

    def to(self, device):
        return self

    def encode(self, x):
        mean = x[:, :1].repeat(1, 4, 1, 1)
        return dict(latent_dist=dnnlib.EasyDict(mean=mean, std=torch.zeros_like(mean)))

    def decode(self, z):
        self.decoded.append(z)
        return dict(sample=torch.full([len(z), 3, 8, 8], 0.5))

def test_stability_vae_encoder_standardisation():
    enc = encoders.StabilityVAEEncoder(batch_size=2)
    assert enc.vae_name == 'stabilityai/sd-vae-ft-mse' and enc.batch_size == 2
    assert enc.scale.dtype == np.float32 and enc.bias.dtype == np.float32
    assert np.allclose(enc.scale, 0.5 / np.array([4.17, 4.62, 3.71, 3.28]))
    assert np.allclose(enc.bias, -np.array([5.81, 3.25, 0.12, -2.15]) * enc.scale)
    enc._vae = _StubVAE()
    raw = enc.encode_pixels(torch.randint(0, 256, [3, 3, 8, 8], dtype=torch.uint8))
    assert raw.shape == (3, 8, 8, 8)
    final = enc.encode_latents(raw)  # std 0: the mean, standardised
    mean = raw[:, :4]
    assert torch.allclose(final, mean * torch.tensor(enc.scale).reshape(1, -1, 1, 1) + torch.tensor(enc.bias).reshape(1, -1, 1, 1))
    pixels = enc.decode(final)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 3, 8, 8) and int(pixels[0, 0, 0, 0]) == 127
    assert [len(z) for z in enc._vae.decoded] == [2, 1]
    assert torch.allclose(torch.cat(enc._vae.decoded), mean, atol=1e-5)  # decode inverts the standardisation
    assert pickle.loads(pickle.dumps(enc))._vae is None  # the VAE is never pickled

def test_stability_vae_encoder_without_diffusers_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, 'diffusers', None)  # import fails as if not installed
    with pytest.raises(ImportError) as info:
        encoders.StabilityVAEEncoder().decode(torch.zeros(1, 4, 8, 8))
    assert '\n' not in str(info.value) and 'diffusers' in str(info.value) and 'pip install' in str(info.value)

#----------------------------------------------------------------------------
# Pickles: written here, and written in EDM2's layout.

def _edm2_snapshot(net, encoder, loss_fn=None):
    """What EDM2's training loop pickles: EasyDict(encoder, dataset_kwargs, loss_fn, ema)."""
    return dnnlib.EasyDict(encoder=encoder, loss_fn=loss_fn,
                           dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='x.zip'),
                           ema=net)

def _load_both(blob):
    return pickles.safe_load(io.BytesIO(blob)), pickle.loads(blob)

@pytest.mark.parametrize('name', ['cond16', 'latent8'])
def test_round_trip_safe_and_trusted(name):
    net, e = build_tiny(name)
    encoder = encoders.StandardRGBEncoder() if name == 'cond16' else encoders.StabilityVAEEncoder(batch_size=4)
    for data in _load_both(pickle.dumps(_edm2_snapshot(net, encoder))):
        loaded = data['ema']
        assert type(loaded).__name__ == 'Precond' and not loaded.training
        for got, want in zip(_outputs(loaded, e), _outputs(net, e)):
            assert torch.equal(got, want)
        assert list(loaded.state_dict()) == list(net.state_dict())
        assert loaded.init_kwargs == net.init_kwargs
        assert type(data['encoder']).__name__ == type(encoder).__name__ and data['dataset_kwargs'].path == 'x.zip'
        if name == 'latent8':
            assert data['encoder'].batch_size == 4 and np.array_equal(data['encoder'].scale, encoder.scale)
            assert data['encoder']._vae is None

# A module as an EDM2 pickle embeds it: this project's source with EDM2's imports
# (EDM2's networks module also imports torch_utils.misc), so loading runs a new module.
STANDIN_SRC = '"""Stand-in for EDM2\'s training/networks_edm2.py."""\nfrom torch_utils import misc\n' + \
    open(networks_edm2.__file__).read().split('"""', 2)[2]
LOSS_SRC = '''\
"""Stand-in for EDM2's training/training_loop.py (its loss), with that module's imports."""
import copy, os, pickle, time
import dnnlib, numpy as np, psutil, torch
from torch_utils import distributed as dist, misc, persistence, training_stats

@persistence.persistent_class
class EDM2Loss:
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''

class _AsEDM2Writes(pickle.Pickler):
    """Pickles persistent objects with a given module source per class, float tensors in float16
    (EDM2 snapshots store `ema` in half precision)."""

    sources = {}

    def reducer_override(self, obj):
        if persistence.is_persistent(obj):
            name = type(obj).__name__
            state = dict(obj.__getstate__())
            for group in ('_parameters', '_buffers'):
                if group in state:
                    state[group] = {k: None if v is None else v.detach().to(torch.float16) for k, v in state[group].items()}
            meta = dict(type='class', version=6, module_src=self.sources.get(name, STANDIN_SRC), class_name=name, state=state)
            return persistence._reconstruct_persistent_obj, (meta,)
        return NotImplemented

def _edm2_written(name):
    net, e = build_tiny(name)
    torch.manual_seed(0)
    loss_src = persistence._src_to_module(LOSS_SRC)
    # EDM2's encoders module imports os, warnings and torch_utils.misc besides what ours does.
    encoders_src = open(encoders.__file__).read().replace('import numpy as np\n',
                                                          'import os\nimport warnings\nimport numpy as np\nfrom torch_utils import misc\n')
    _AsEDM2Writes.sources = dict(EDM2Loss=LOSS_SRC, StandardRGBEncoder=encoders_src)
    f = io.BytesIO()
    _AsEDM2Writes(f).dump(_edm2_snapshot(net, encoders.StandardRGBEncoder(), loss_src.EDM2Loss(P_mean=-0.8, P_std=1.6)))
    return f.getvalue(), net, e

def test_edm2_written_pickle_loads_in_both_loaders():
    blob, net, e = _edm2_written('cond16')
    half = networks_edm2.Precond(**e['kwargs']).eval()
    half.load_state_dict({k: v.half() for k, v in e['state_dict'].items()})  # The stored weights, rounded.
    want = _outputs(half, e)
    safe, trusted = _load_both(blob)
    assert type(trusted['ema']).__module__.startswith('_imported_module_')  # EDM2's stand-in code ran
    assert type(safe['ema']) is networks_edm2.Precond
    for data in (safe, trusted):
        assert {p.dtype for p in data['ema'].parameters()} == {torch.float16}  # kept as stored
        assert data['ema'].state_dict().keys() == half.state_dict().keys()
        assert all(torch.equal(v.float(), half.state_dict()[k]) for k, v in data['ema'].state_dict().items())
        assert type(data['encoder']).__name__ == 'StandardRGBEncoder'
        assert data['encoder'].decode(torch.zeros(1)).item() == 128
    # The same code on the same weights: identical numbers from both loaders.
    for got, ref in zip(_outputs(safe['ema'], e), _outputs(trusted['ema'], e)):
        assert torch.equal(got, ref)
    # Layers compute in float32, but the scalar gains (emb_gain, out_gain) are divided in float16 as stored:
    # against float32 weights of the same values D differs by that rounding (2^-11 relative); logvar has no gain.
    D, logvar = _outputs(safe['ema'], e)
    assert 0 < rel_err(D, want[0]) <= 2e-3 and torch.equal(logvar, want[1])
    assert safe['loss_fn'].class_name == 'EDM2Loss' and safe['loss_fn'].init_kwargs == dict(P_mean=-0.8, P_std=1.6)
    assert trusted['loss_fn'].P_std == 1.6

def test_read_pickle_and_load_network_pickle(tmp_path):
    blob, net, e = _edm2_written('cond16')
    path = tmp_path / 'edm2.pkl'
    path.write_bytes(blob)
    data = pickles.read_pickle(str(path))
    assert set(data) == {'encoder', 'loss_fn', 'dataset_kwargs', 'ema'}
    for trust in (False, True):
        wrapped = pickles.load_network_pickle(str(path), trust_pickle=trust)
        assert isinstance(wrapped, pickles.EDM2Network) and pickles.is_edm2_network(wrapped.net)
        # EDM2's sampling conventions: any sigma, no rounding; the calls pass through.
        assert (wrapped.sigma_min, wrapped.sigma_max) == (0, float('inf'))
        assert torch.equal(wrapped.round_sigma(e['sigma']), e['sigma'])
        assert (wrapped.img_resolution, wrapped.img_channels, wrapped.label_dim) == (16, 3, 10)
        with torch.no_grad():
            assert torch.equal(wrapped(e['x'], e['sigma'], e['labels']), wrapped.net(e['x'], e['sigma'], e['labels']))
    latent = tmp_path / 'latent.pkl'
    latent.write_bytes(pickle.dumps(_edm2_snapshot(build_tiny('latent8')[0], encoders.StabilityVAEEncoder())))
    wrapped = pickles.load_network_pickle(str(latent))  # latent models carry their encoder, which decodes their output
    assert type(wrapped.encoder).__name__ == 'StabilityVAEEncoder' and wrapped.encoder._vae is None
    assert (wrapped.img_resolution, wrapped.img_channels) == (8, 4)

def test_safe_loader_refuses_unknown_classes_in_edm2_pickles():
    blob = pickle.dumps(_edm2_snapshot(torch.nn.Identity(), None))
    with pytest.raises(pickles.UnsafePickleError, match='torch.nn.modules.linear.Identity'):
        pickles.safe_load(io.BytesIO(blob))
    meta = dict(type='class', version=6, module_src='import os', class_name='Encoder2', state={})
    class _Writes:
        def __reduce__(self):
            return persistence._reconstruct_persistent_obj, (meta,)
    with pytest.raises(pickles.UnsafePickleError, match='"Encoder2" is not a known EDM class'):
        pickles.safe_load(io.BytesIO(pickle.dumps(dict(ema=_Writes()))))

def test_an_unknown_vae_is_fetched_only_when_trusted():
    """The safe loader builds the encoder; a VAE name the file chose is fetched only with --trust_pickle (or --vae)."""
    from edm_dg import latents
    blob = pickle.dumps(_edm2_snapshot(build_tiny('latent8')[0], encoders.StabilityVAEEncoder(vae_name='someone/vae')))
    enc = pickles.safe_load(io.BytesIO(blob))['encoder']
    assert enc.vae_name == 'someone/vae' and enc._vae is None
    with pytest.raises(ValueError, match='"someone/vae", which edm-dg fetches by name only with --trust_pickle; pass --vae=DIR'):
        latents.prepare_encoder(enc, 'cpu', source='x.pkl')
    assert pickle.loads(blob)['encoder'].vae_name == 'someone/vae'  # trusted: the file's business
