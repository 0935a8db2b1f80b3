"""Reading EDM and EDM2 network pickles, with or without running the code inside them.

NVlabs' EDM and EDM2 pickles (format version 6 of `torch_utils.persistence`)
rebuild each network by executing the module source stored in the file; see
docs/compat.md §1 and "EDM2 networks and pickles". `trusted_load` does exactly
that. `safe_load` reads the same bytes with an unpickler that knows a short list
of globals (tensor rebuilders, containers, `dnnlib.util.EasyDict`): every
persistent object becomes a record of its class name and state, and records of
known EDM/EDM2 classes are then built from this project's `training` package
from their recorded constructor arguments, with their tensors loaded strictly.
Anything else is refused with a message that names it and the `--trust_pickle` flag.
"""

import codecs
import collections
import io
import pickle

import torch
import numpy as np

from training import encoders
from training import loss as loss_module
from training import networks
from training import networks_edm2
import dnnlib

NETWORK_CLASSES = ('EDMPrecond', 'VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'SongUNet', 'DhariwalUNet',
                   'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding')
LOSS_CLASSES = ('EDMLoss', 'VPLoss', 'VELoss')
EDM2_NETWORK_CLASSES = ('Precond', 'UNet', 'Block', 'MPConv', 'MPFourier')
ENCODER_CLASSES = ('StandardRGBEncoder', 'StabilityVAEEncoder')  # EDM2 pickles' 'encoder' entry.
INERT_CLASSES = ('AugmentPipe', 'EDM2Loss')   # Training-only; returned as a description, never run.
_KNOWN_CLASSES = NETWORK_CLASSES + EDM2_NETWORK_CLASSES + ENCODER_CLASSES + LOSS_CLASSES + INERT_CLASSES

class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something the safe loader will not build."""

#----------------------------------------------------------------------------
# What the restricted unpickler produces instead of live objects.

class _Record:
    """An object described by the pickle and kept as data: class name + state."""

    def __init__(self, class_name, state=None):
        self.class_name = class_name
        self.state = state if state is not None else {}

    def __setstate__(self, state):
        self.state = state if state is not None else {}

class _ContainerRecord(_Record):
    """A torch.nn container (ModuleDict, ModuleList, Sequential) inside a network."""

    def __init__(self):
        super().__init__(type(self).__name__)

_CONTAINERS = {name: type(name, (_ContainerRecord,), {}) for name in ('ModuleDict', 'ModuleList', 'Sequential')}

def _persistent_record(meta):
    """Stands in for torch_utils.persistence._reconstruct_persistent_obj: never runs module_src."""
    if not isinstance(meta, dict) or meta.get('type') != 'class' or meta.get('version') != 6:
        kind, version = (meta.get('type'), meta.get('version')) if isinstance(meta, dict) else (None, None)
        raise UnsafePickleError(f'unsupported persistent object format (type={kind!r}, version={version!r})')
    name = meta.get('class_name')
    if name not in _KNOWN_CLASSES:
        raise UnsafePickleError(f'class "{name}" is not a known EDM class (nor EDM2)')
    return _Record(name, meta.get('state'))

def _old_protocol_reconstructor(cls, base, state):
    """copyreg._reconstructor (pickle protocols 0 and 1), limited to EasyDict and torch containers."""
    if cls is dnnlib.EasyDict and base is dict:
        return dnnlib.EasyDict(state or {})
    if not (isinstance(cls, type) and issubclass(cls, _ContainerRecord)) or base is not object or state is not None:
        raise UnsafePickleError(f'refusing to construct {getattr(cls, "__name__", cls)!r}')
    return cls()

def _storage_from_bytes(data):
    return torch.load(io.BytesIO(data), weights_only=True)

def _numpy_core():
    return getattr(np, '_core', None) or np.core

_GLOBALS = {
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'object'): object,
    ('builtins', 'dict'): dict,
    ('_codecs', 'encode'): codecs.encode,   # How protocols 0-2 store bytes.
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('copyreg', '_reconstructor'): _old_protocol_reconstructor,
    ('dnnlib.util', 'EasyDict'): dnnlib.EasyDict,
    ('torch_utils.persistence', '_reconstruct_persistent_obj'): _persistent_record,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch.storage', '_load_from_bytes'): _storage_from_bytes,
    ('numpy', 'dtype'): np.dtype,
    ('numpy', 'ndarray'): np.ndarray,
}
_GLOBALS.update({('torch.nn.modules.container', name): cls for name, cls in _CONTAINERS.items()})

_PYTHON2_MODULES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}  # Names in pickle protocols 0-2.

class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = _PYTHON2_MODULES.get(module, module)
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module in ('numpy.core.multiarray', 'numpy._core.multiarray') and name in ('scalar', '_reconstruct'):
            return getattr(_numpy_core().multiarray, name)
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f'"{module}.{name}" is not allowed')

#----------------------------------------------------------------------------
# From records to objects of this project's classes.

def _tensors_of(state, prefix='', out=None):
    """The state dict described by a pickled module state (_parameters, _buffers, _modules)."""
    out = {} if out is None else out
    skip = set(state.get('_non_persistent_buffers_set') or ())
    for group in ('_parameters', '_buffers'):
        for name, value in (state.get(group) or {}).items():
            if value is not None and not (group == '_buffers' and name in skip):
                out[prefix + name] = value.detach() if isinstance(value, torch.Tensor) else value
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            _tensors_of(child.state if isinstance(child, _Record) else vars(child), f'{prefix}{name}.', out)
    return out

def _take_stored_dtypes(net, tensors):
    """Floating parameters and buffers take the dtype stored in the pickle (EDM2 snapshots hold
    float16 weights, and its layers compute with them as stored), so both loaders give the same numbers."""
    for name, tensor in list(net.named_parameters()) + list(net.named_buffers()):
        stored = tensors.get(name)
        if isinstance(stored, torch.Tensor) and stored.is_floating_point() and tensor.is_floating_point():
            tensor.data = tensor.data.to(stored.dtype)

def _build(record):
    """A network, encoder or loss of this project's `training` code from a record (strict weights)."""
    state = record.state
    if '_init_kwargs' not in state:
        raise UnsafePickleError(f'persistent {record.class_name} has no recorded constructor arguments')
    args = tuple(state.get('_init_args') or ())
    kwargs = dict(state.get('_init_kwargs') or {})
    if record.class_name in INERT_CLASSES:
        return dnnlib.EasyDict(class_name=record.class_name, init_args=args, init_kwargs=kwargs,
                               note='not rebuilt by the safe loader')
    if record.class_name in LOSS_CLASSES:
        return getattr(loss_module, record.class_name)(*args, **kwargs)
    if record.class_name in ENCODER_CLASSES:
        # Only built: its VAE is fetched when edm_dg.latents.prepare_encoder says so.
        return getattr(encoders, record.class_name)(*args, **kwargs)
    module = networks_edm2 if record.class_name in EDM2_NETWORK_CLASSES else networks
    net = getattr(module, record.class_name)(*args, **kwargs)
    tensors = _tensors_of(state)
    _take_stored_dtypes(net, tensors)
    net.load_state_dict(tensors, strict=True)
    return net.train(bool(state.get('training', False)))

def _build_all(obj):
    """Replace the records reachable through dicts, lists and tuples by built objects."""
    if isinstance(obj, _Record):
        return _build(obj)
    if isinstance(obj, dnnlib.EasyDict):
        return dnnlib.EasyDict({k: _build_all(v) for k, v in obj.items()})
    if isinstance(obj, dict):
        return type(obj)((k, _build_all(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_build_all(v) for v in obj)
    return obj

#----------------------------------------------------------------------------

def safe_load(f):
    """Load an EDM pickle from a binary file object without executing embedded code."""
    return _build_all(_RestrictedUnpickler(f).load())

def trusted_load(f):
    """EDM's own loading: runs the module source stored in the pickle."""
    return pickle.load(f)

_NETWORK_ATTRS = ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')

def is_edm2_network(net):
    """Whether net is EDM2's `Precond` (this project's class or one a trusted pickle built)."""
    return type(net).__name__ == 'Precond' and all(hasattr(net, a) for a in ('unet', 'logvar_linear', 'sigma_data'))

class EDM2Network(torch.nn.Module):
    """An EDM2 network with the EDM interface the samplers use (docs/compat.md §1, "EDM2 networks and pickles").

    EDM2 networks take any noise level and EDM2's sampler rounds none, so
    sigma_min = 0, sigma_max = inf and `round_sigma` is the identity: EDM's
    schedule then has exactly the requested bounds. Calls pass through, so the
    output is EDM2's float32 `D`. EDM2's sampler keeps its state in float32 and
    draws churn noise only at steps that churn: `sampling_dtype` and
    `noise_every_step` tell edm_dg.sampling.edm_sampler so.
    """

    sigma_min, sigma_max = 0.0, float('inf')
    sampling_dtype, noise_every_step = torch.float32, False
    default_num_steps = 32  # EDM2's generate_images.py (EDM's is 18)

    def __init__(self, net, encoder=None):
        super().__init__()
        self.net = net
        self.encoder = encoder  # training.encoders object: decodes the sampler's output (edm_dg.latents.to_uint8)

    img_resolution = property(lambda self: self.net.img_resolution)
    img_channels = property(lambda self: self.net.img_channels)
    label_dim = property(lambda self: self.net.label_dim)
    use_fp16 = property(lambda self: self.net.use_fp16)
    sigma_data = property(lambda self: self.net.sigma_data)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        return self.net(x, sigma, class_labels, **kwargs)

def read_pickle(url_or_path, trust_pickle=False, verbose=False):
    """Everything an EDM/EDM2 pickle (path or URL) holds, e.g. 'ema' and EDM2's 'encoder'; ValueError on bad input."""
    load = trusted_load if trust_pickle else safe_load
    try:
        with dnnlib.util.open_url(url_or_path, verbose=verbose) as f:
            data = load(f)
    except UnsafePickleError as e:
        raise ValueError(f'{url_or_path}: refused to load: {e}; rerun with --trust_pickle to execute the code '
                         f'stored in the pickle (only for files you trust)') from None
    except OSError as e:
        raise ValueError(str(e) if str(url_or_path) in str(e) else f'{url_or_path}: {e}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError,
            KeyError, RuntimeError) as e:
        raise ValueError(f'{url_or_path}: not a readable EDM network pickle ({type(e).__name__}: {" ".join(str(e).split())[:120]}); '
                         f'pass a .pkl written by EDM training or edm-dg') from None
    return data

def load_network_pickle(url_or_path, trust_pickle=False, key='ema', verbose=False):
    """The sampling network of an EDM pickle (path or URL); ValueError saying what to pass on bad input."""
    data = read_pickle(url_or_path, trust_pickle=trust_pickle, verbose=verbose)
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f'{url_or_path}: pickle has no "{key}" network; pass an EDM network snapshot (network-snapshot-*.pkl)')
    net = data[key]
    if is_edm2_network(net):
        net = EDM2Network(net, data.get('encoder'))
    missing = [attr for attr in _NETWORK_ATTRS if not hasattr(net, attr)]
    if missing:
        raise ValueError(f'{url_or_path}: "{key}" is not an EDM preconditioned network (no {missing[0]}); '
                         f'pass an EDM network pickle')
    return net
