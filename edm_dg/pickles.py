"""Loading EDM network pickles without executing the source embedded in them.

An EDM pickle rebuilds each network by running the module source stored in the
file (COMPAT §1). The safe loader reads the same file with a restricted
unpickler: tensors, containers and `dnnlib.EasyDict` are allowed; persistent
objects of known EDM classes are rebuilt from this project's `training`
modules from their recorded constructor arguments and tensors (strictly);
everything else is refused with a message that names the class and the
`--trust_pickle` flag that restores EDM's own behaviour.
"""

import collections
import io
import pickle

import numpy as np
import torch

import dnnlib
from training import loss as loss_module
from training import networks

NETWORK_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'SongUNet', 'DhariwalUNet',
                   'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding')
LOSS_CLASSES = ('EDMLoss', 'VPLoss', 'VELoss')
INERT_CLASSES = ('AugmentPipe',)   # Training-only; kept as a record, never run.

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something the safe loader will not build."""

class _Persistent:
    """A persistent object seen by the safe loader, not yet rebuilt."""
    def __init__(self, class_name, state):
        self.class_name = class_name
        self.state = state

def _safe_reconstruct(meta):
    name = meta.get('class_name')
    if meta.get('type') != 'class' or meta.get('version') != 6:
        raise UnsafePickleError(f'unsupported persistent object format (type={meta.get("type")!r}, version={meta.get("version")!r})')
    if name not in NETWORK_CLASSES + LOSS_CLASSES + INERT_CLASSES:
        raise UnsafePickleError(f'class "{name}" is not a known EDM class')
    return _Persistent(name, meta.get('state') or {})

def _safe_load_from_bytes(b):
    return torch.load(io.BytesIO(b), weights_only=True)

_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('builtins', 'set'): set, ('builtins', 'frozenset'): frozenset, ('builtins', 'object'): object,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch', 'Size'): torch.Size, ('torch', 'device'): torch.device,
    ('torch.storage', '_load_from_bytes'): _safe_load_from_bytes,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _safe_reconstruct,
    ('torch.nn.modules.container', 'ModuleDict'): torch.nn.ModuleDict,
    ('torch.nn.modules.container', 'ModuleList'): torch.nn.ModuleList,
    ('torch.nn.modules.container', 'Sequential'): torch.nn.Sequential,
}

def _copyreg_reconstructor(cls, base, state):
    if cls not in (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential) or base is not object:
        raise UnsafePickleError(f'refusing to construct {cls}')
    obj = object.__new__(cls)
    return obj

class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ('copyreg', '_reconstructor'):
            return _copyreg_reconstructor
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name in ('scalar', '_reconstruct'):
            return getattr(np._core.multiarray if hasattr(np, '_core') else np.core.multiarray, name)
        if (module, name) == ('numpy', 'dtype'):
            return np.dtype
        if (module, name) == ('numpy', 'ndarray'):
            return np.ndarray
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f'"{module}.{name}" is not allowed')

#----------------------------------------------------------------------------

def _collect_tensors(state, prefix, out):
    """Flatten a pickled module state ({_parameters, _buffers, _modules}) into a state dict."""
    for key in ('_parameters', '_buffers'):
        for name, t in (state.get(key) or {}).items():
            if t is not None:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else t
    for name, child in (state.get('_modules') or {}).items():
        if child is None:
            continue
        child_state = child.state if isinstance(child, _Persistent) else child.__dict__
        _collect_tensors(child_state, prefix + name + '.', out)

def _rebuild(obj):
    """Replace _Persistent records by objects built from this project's classes."""
    if isinstance(obj, dict):
        return type(obj)((k, _rebuild(v)) for k, v in obj.items()) if not isinstance(obj, dnnlib.EasyDict) else dnnlib.EasyDict({k: _rebuild(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [_rebuild(v) for v in obj]
    if not isinstance(obj, _Persistent):
        return obj
    state = obj.state
    args = state.get('_init_args') or ()
    kwargs = dict(state.get('_init_kwargs') or {})
    if obj.class_name in INERT_CLASSES:
        return dnnlib.EasyDict(class_name=obj.class_name, init_args=args, init_kwargs=kwargs, note='not rebuilt by the safe loader')
    if obj.class_name in LOSS_CLASSES:
        return getattr(loss_module, obj.class_name)(*args, **kwargs)
    net = getattr(networks, obj.class_name)(*args, **kwargs)
    tensors = {}
    _collect_tensors(state, '', tensors)
    net.load_state_dict(tensors, strict=True)
    net.train(bool(state.get('training', False)))
    return net

def safe_load(f):
    """Load an EDM pickle from a binary file object without executing embedded code."""
    return _rebuild(_SafeUnpickler(f).load())

def trusted_load(f):
    """EDM's own loading: executes the module source stored in the pickle."""
    return pickle.load(f)

def load_network_pickle(url_or_path, trust_pickle=False, key='ema', verbose=False):
    """The sampling network of an EDM pickle (path or URL); ValueError with the fix on bad input."""
    try:
        with dnnlib.util.open_url(url_or_path, verbose=verbose) as f:
            data = (trusted_load if trust_pickle else safe_load)(f)
    except UnsafePickleError as e:
        raise ValueError(f'{url_or_path}: refused to load: {e}; rerun with --trust_pickle to execute the code stored in the pickle (only for files you trust)') from None
    except (FileNotFoundError, OSError) as e:
        raise ValueError(f'{url_or_path}: {e}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f'{url_or_path}: not a readable EDM network pickle ({type(e).__name__}: {str(e)[:120]}); '
                         f'pass a .pkl written by EDM training or edm-dg') from None
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f'{url_or_path}: pickle has no "{key}" network; pass an EDM network snapshot (network-snapshot-*.pkl)')
    net = data[key]
    for attr in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma'):
        if not hasattr(net, attr):
            raise ValueError(f'{url_or_path}: "{key}" is not an EDM preconditioned network (no {attr}); pass an EDM network pickle')
    return net
