"""EDM networks and pickles: fixture equality, pickle round trips, safe loading."""

import os
import pickle

import pytest
import torch

import dnnlib
from edm_dg import pickles
from training import networks
from helpers import assert_close_to_fixture, float32_layers, save_edm_pickle, tiny_edm

def test_edm_net_matches_reference(ref, ref_nets):
    e = ref['edm_net']
    with torch.no_grad():
        y = ref_nets['net'](e['x'], e['sigma'], e['class_labels'])
    assert_close_to_fixture(y, e['denoised'], *float32_layers(ref_nets['net']))

def test_state_dict_names_are_edms(ref):
    e = ref['edm_net']
    net = getattr(networks, e['class_name'])(**e['init_kwargs'])
    assert set(net.state_dict()) == set(e['state_dict'])

@pytest.mark.parametrize('precond,model', [('VPPrecond', 'SongUNet'), ('VEPrecond', 'SongUNet'),
                                           ('iDDPMPrecond', 'DhariwalUNet'), ('EDMPrecond', 'DhariwalUNet')])
def test_all_preconditionings_run_and_round_trip(precond, model, tmp_path):
    torch.manual_seed(0)
    kw = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)
    if model == 'SongUNet' and precond == 'VEPrecond':
        kw.update(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
    if model == 'DhariwalUNet':
        kw['model_channels'] = 64
    net = getattr(networks, precond)(img_resolution=8, img_channels=3, label_dim=4, model_type=model, **kw).eval()
    x = torch.randn(2, 3, 8, 8)
    sigma = torch.tensor([0.5, 3.0])
    labels = torch.eye(4)[[1, 2]]
    path = save_edm_pickle(net, str(tmp_path / 'n.pkl'))
    with open(path, 'rb') as f:
        trusted = pickles.trusted_load(f)['ema']
    with open(path, 'rb') as f:
        safe = pickles.safe_load(f)['ema']
    with torch.no_grad():
        y = net(x, net.round_sigma(sigma), labels)
        assert torch.equal(y, trusted(x, trusted.round_sigma(sigma), labels))
        assert torch.equal(y, safe(x, safe.round_sigma(sigma), labels))
    assert type(safe).__module__ == 'training.networks'
    assert type(trusted).__module__ == 'training.networks'

def test_pickle_embeds_source_and_edm_names(tmp_path):
    """Our pickles use EDM's mechanism: a call to torch_utils.persistence._reconstruct_persistent_obj."""
    net = tiny_edm()
    data = pickle.dumps(dict(ema=net))
    assert b'torch_utils.persistence' in data and b'_reconstruct_persistent_obj' in data
    assert b'class EDMPrecond' in data  # module source travels with the pickle
    # Source executed in a fresh module: the rebuilt class comes from there, not from training.networks.
    from torch_utils import persistence
    src = persistence._module_to_src(networks)
    persistence._src_to_module_dict.pop(src)
    try:
        loaded = pickle.loads(data)['ema']
        cls = type(loaded)
        assert cls.__name__ == 'EDMPrecond' and cls is not networks.EDMPrecond
        assert cls.__module__.startswith('_imported_module_') and type(loaded.model).__module__ == cls.__module__
        x = torch.randn(1, 3, 16, 16)
        with torch.no_grad():
            assert torch.equal(net(x, torch.tensor([1.0])), loaded(x, torch.tensor([1.0])))
    finally:
        persistence._src_to_module_dict[src] = networks

def test_load_network_pickle_errors(tmp_path):
    with pytest.raises(ValueError, match='no such file'):
        pickles.load_network_pickle(str(tmp_path / 'missing.pkl'))
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(b'not a pickle at all')
    with pytest.raises(ValueError, match='not a readable EDM network pickle'):
        pickles.load_network_pickle(str(bad))
    nokey = tmp_path / 'nokey.pkl'
    nokey.write_bytes(pickle.dumps(dict(foo=1)))
    with pytest.raises(ValueError, match='has no "ema"'):
        pickles.load_network_pickle(str(nokey))
    trunc = tmp_path / 'trunc.pkl'
    full = pickle.dumps(dict(ema=tiny_edm()))
    trunc.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match='not a readable EDM network pickle'):
        pickles.load_network_pickle(str(trunc))

def test_open_url_offline_message(tmp_path):
    import requests
    class Offline(requests.Session):
        def get(self, *a, **k):
            raise requests.exceptions.ConnectionError('offline')
    with pytest.raises(OSError, match='download failed.*local path'):
        dnnlib.util.open_url('https://example.com/net.pkl', cache_dir=str(tmp_path), verbose=False, session=Offline())

def test_open_url_cache(tmp_path):
    import requests
    calls = []
    class Fake(requests.Session):
        def get(self, url, **k):
            calls.append(url)
            r = requests.models.Response()
            r.status_code = 200
            r._content = b'x' * 10000
            return r
    for _ in range(2):
        with dnnlib.util.open_url('https://example.com/a.pkl', cache_dir=str(tmp_path), verbose=False, session=Fake()) as f:
            assert f.read() == b'x' * 10000
    assert len(calls) == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith('tmp_')]
