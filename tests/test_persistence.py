"""EDM's pickle format both ways (docs/compat.md §1), torch_utils.misc, and dnnlib.util.open_url."""

import inspect
import io
import pickle
import socket

import numpy as np
import pytest
import torch

import dnnlib
from helpers import save_edm_pickle, tiny_edm
from edm_dg import pickles
from torch_utils import misc, persistence
from training import networks

class _MetaCatcher(pickle.Unpickler):
    """Unpickles normally, except that persistent objects come back as their meta dicts."""

    targets = []

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            self.targets.append(f'{module}.{name}')
            return lambda meta: meta
        return super().find_class(module, name)

def _outputs(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.3, 4.0])
    with torch.no_grad():
        return net(x, sigma)

#----------------------------------------------------------------------------
# Written here, read back by both loaders.

def test_round_trip_safe_and_trusted(tmp_path):
    net = tiny_edm(seed=3)
    path = save_edm_pickle(net, str(tmp_path / 'net.pkl'))
    with open(path, 'rb') as f:
        safe = pickles.safe_load(f)
    with open(path, 'rb') as f:
        trusted = pickle.load(f)
    reference = _outputs(net)
    for data in (safe, trusted):
        loaded = data['ema']
        assert type(loaded).__name__ == 'EDMPrecond' and not loaded.training
        assert torch.equal(_outputs(loaded), reference)
        want, got = net.state_dict(), loaded.state_dict()
        assert list(got) == list(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert isinstance(data['dataset_kwargs'], dnnlib.EasyDict)
        assert type(data['loss_fn']).__name__ == 'EDMLoss'
    assert safe['ema'].init_kwargs == net.init_kwargs

@pytest.mark.parametrize('protocol', [0, 2])
def test_safe_loader_reads_old_pickle_protocols(protocol):
    net = tiny_edm(seed=4)
    data = pickle.dumps(dict(ema=net, dataset_kwargs=dnnlib.EasyDict(resolution=16)), protocol=protocol)
    loaded = pickles.safe_load(io.BytesIO(data))
    assert torch.equal(_outputs(loaded['ema']), _outputs(net)) and loaded['dataset_kwargs'].resolution == 16

def test_meta_has_edm_fields():
    net = tiny_edm()
    func, args = net.__reduce__()
    assert func is persistence._reconstruct_persistent_obj and len(args) == 1
    _MetaCatcher.targets = []
    meta = _MetaCatcher(io.BytesIO(pickle.dumps(dict(ema=net)))).load()['ema']
    assert _MetaCatcher.targets and set(_MetaCatcher.targets) == {'torch_utils.persistence._reconstruct_persistent_obj'}
    assert set(meta) == {'type', 'version', 'module_src', 'class_name', 'state'}
    assert meta['type'] == 'class' and meta['version'] == 6 and meta['class_name'] == 'EDMPrecond'
    assert meta['module_src'] == inspect.getsource(networks)
    assert 'class EDMPrecond' in meta['module_src'] and 'class SongUNet' in meta['module_src']
    state = meta['state']
    assert state['_init_args'] == ()
    assert state['_init_kwargs'] == dict(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet',
                                         model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                         dropout=0.0)
    inner = state['_modules']['model']  # Persistent children are stored the same way.
    assert inner['class_name'] == 'SongUNet' and inner['version'] == 6 and '_init_kwargs' in inner['state']

@persistence.persistent_class
class _Holder(torch.nn.Module):
    def __init__(self, thing=None):
        super().__init__()
        self.thing = thing

def test_arguments_are_checked_at_construction():
    assert _Holder(thing=[torch.zeros(2), np.ones(2), tiny_edm()]).init_kwargs.thing[0].shape == (2,)
    with pytest.raises(TypeError, match='_Holder: constructor arguments cannot be pickled'):
        _Holder(thing=lambda: None)

#----------------------------------------------------------------------------
# Written the way NVlabs' EDM writes pickles, read here.

STANDIN_SRC = '''\
"""A network module as an EDM pickle embeds it (stand-in for EDM's training/networks.py)."""

import numpy as np
import torch
from torch.nn.functional import silu

import dnnlib
from torch_utils import misc
from torch_utils import persistence

@persistence.persistent_class
class GainBlock(torch.nn.Module):
    def __init__(self, channels, gain=1.0):
        super().__init__()
        self.gain = float(gain)
        self.options = dnnlib.EasyDict(channels=channels)
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.register_buffer('shift', misc.constant(np.zeros(channels, dtype=np.float32)).clone())

    def forward(self, x):
        scale = (self.weight * self.gain).reshape(1, -1, 1, 1)
        return silu(x * scale + self.shift.reshape(1, -1, 1, 1))
'''

class _PlainGainBlock(torch.nn.Module):
    """The same object built without persistence: its __dict__ is the state EDM stores."""

    def __init__(self, channels, gain):
        super().__init__()
        self.gain = float(gain)
        self.options = dnnlib.EasyDict(channels=channels)
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, channels))
        self.register_buffer('shift', torch.full([channels], 0.25))

class _AsEDMWritesIt:
    """Pickles as EDM's persistence does: a call to _reconstruct_persistent_obj(meta)."""

    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)

def _edm_style_pickle(channels=3, gain=2.0):
    state = _PlainGainBlock(channels, gain).__getstate__()
    state.update(_init_args=(channels,), _init_kwargs=dict(gain=gain))
    meta = dict(type='class', version=6, module_src=STANDIN_SRC, class_name='GainBlock', state=state)
    return pickle.dumps(dict(ema=_AsEDMWritesIt(meta), dataset_kwargs=dnnlib.EasyDict(path='x.zip')))

def test_edm_written_pickle_loads_with_pickle_load():
    data = pickle.loads(_edm_style_pickle())
    block = data['ema']
    assert type(block).__name__ == 'GainBlock' and type(block).__module__.startswith('_imported_module_')
    assert persistence.is_persistent(block) and persistence.is_persistent(type(block))
    assert block.init_args == (3,) and block.init_kwargs == dict(gain=2.0)
    assert isinstance(block.init_kwargs, dnnlib.EasyDict) and block.options.channels == 3
    x = torch.randn(2, 3, 4, 4)
    want = torch.nn.functional.silu(x * (torch.linspace(0.5, 1.5, 3) * 2.0).reshape(1, -1, 1, 1) + 0.25)
    with torch.no_grad():
        assert torch.allclose(block(x), want)
    # The same source runs once; a second pickle of it reuses the module.
    again = pickle.loads(_edm_style_pickle(gain=1.0))['ema']
    assert type(again) is type(block)
    # Written back out, it carries the stand-in source unchanged and loads again.
    _MetaCatcher.targets = []
    meta = _MetaCatcher(io.BytesIO(pickle.dumps(block))).load()
    assert meta['module_src'] == STANDIN_SRC and meta['class_name'] == 'GainBlock'
    with torch.no_grad():
        assert torch.equal(pickle.loads(pickle.dumps(block))(x), block(x))

def test_safe_loader_does_not_run_edm_written_source():
    with pytest.raises(pickles.UnsafePickleError, match='"GainBlock" is not a known EDM class'):
        pickles.safe_load(io.BytesIO(_edm_style_pickle()))

def test_import_hook_sees_meta_as_easydict():
    seen = []
    def hook(meta):
        seen.append((type(meta), type(meta.state), meta.class_name))
        meta.state.gain = 5.0
        return meta
    persistence.import_hook(hook)
    try:
        block = pickle.loads(_edm_style_pickle())['ema']
    finally:
        persistence._hooks.remove(hook)
    assert seen == [(dnnlib.EasyDict, dnnlib.EasyDict, 'GainBlock')] and block.gain == 5.0

#----------------------------------------------------------------------------
# torch_utils.misc

def test_misc_constant_and_copy():
    a = misc.constant([1, 2, 3], shape=[2, 3], dtype=torch.float32)
    assert a.shape == (2, 3) and a.is_contiguous() and torch.equal(a[1], torch.tensor([1., 2., 3.]))
    assert misc.constant([1, 2, 3], shape=[2, 3], dtype=torch.float32) is a
    assert misc.const_like(a, 0.5).dtype == torch.float32
    src, dst = tiny_edm(seed=1), tiny_edm(seed=2)
    misc.copy_params_and_buffers(src, dst, require_all=True)
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    with pytest.raises(KeyError):
        misc.copy_params_and_buffers(torch.nn.Linear(2, 2), dst, require_all=True)

#----------------------------------------------------------------------------
# dnnlib.util.open_url

def _closed_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'some file.bin'
    path.write_bytes(b'edm-dg')
    with dnnlib.util.open_url(str(path)) as f:
        assert f.read() == b'edm-dg'
    url = path.as_uri()  # file:///.../some%20file.bin
    with dnnlib.util.open_url(url) as f:
        assert f.read() == b'edm-dg'
    assert dnnlib.util.open_url(url, return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match='no such file'):
        dnnlib.util.open_url(str(tmp_path / 'missing.pkl'))
    with pytest.raises(FileNotFoundError, match='no such file'):
        dnnlib.util.open_url((tmp_path / 'missing.pkl').as_uri())

def test_open_url_unreachable_server_one_line_error(tmp_path):
    url = f'http://127.0.0.1:{_closed_port()}/network.pkl'
    with pytest.raises(OSError) as info:
        dnnlib.util.open_url(url, cache_dir=str(tmp_path), num_attempts=3, verbose=False)
    message = str(info.value)
    assert '\n' not in message and url in message and 'download failed' in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError) as info:
        pickles.load_network_pickle(url)
    assert '\n' not in str(info.value) and 'download failed' in str(info.value)

#----------------------------------------------------------------------------
# The demo trainer's snapshots are EDM pickles.

def test_train_base_snapshot_is_an_edm_pickle(tmp_path):
    from edm_dg.train_base import train_edm
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    path = str(tmp_path / 'snap.pkl')
    ema = train_edm(images, torch.zeros(8, dtype=torch.long), path, steps=2, batch=4, progress=False, log=lambda *_: None,
                    model_kwargs=dict(model_channels=8, num_blocks=1), dataset_kwargs=dict(resolution=8))
    net = pickles.load_network_pickle(path)
    assert torch.equal(_outputs(net), _outputs(ema))
    with open(path, 'rb') as f:
        data = pickle.load(f)
    assert set(data) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'} and data['dataset_kwargs'].resolution == 8
