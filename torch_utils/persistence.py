"""Classes that pickle together with their source code: the pickle format of
NVlabs' EDM and StyleGAN2-ADA/3 (format version 6).

`@persistent_class` makes every instance of a class pickle as the call
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, with

    meta = dict(type='class', version=6, module_src=<source of the whole module
                that defines the class>, class_name=<its name>, state=<__dict__>)

and the constructor arguments kept in the state as `_init_args` and
`_init_kwargs`. Loading such a pickle runs `module_src` in a new module (one per
distinct source text) and rebuilds the object from `state`, so a pickle does not
depend on the code installed where it is read. That is how pickles written here
load in NVlabs' EDM, and EDM's pickles load here. It is also why an untrusted
pickle is untrusted code: `edm_dg.pickles.safe_load` reads the same files
without running anything. The format is described in docs/compat.md §1.
"""

import copy
import inspect
import io
import pickle
import sys
import types
import uuid

import dnnlib

FORMAT_VERSION = 6

_persistent_types = set()     # The wrapper classes made by persistent_class().
_hooks = []                   # Functions meta -> meta, applied before rebuilding.
_module_src = {}              # Module name -> its source text.
_src_to_module_dict = {}      # Source text -> the module that runs it (live or rebuilt).

#----------------------------------------------------------------------------
# Source text <-> module.

def _module_to_src(module):
    """The source of `module`; the text is remembered so loading it reuses `module`."""
    name = module.__name__
    if name not in _module_src:
        _module_src[name] = inspect.getsource(module)
        _src_to_module_dict[_module_src[name]] = module
    return _module_src[name]

def _src_to_module(src):
    """The module running `src`: an existing one, or a new one that executes it now."""
    if src in _src_to_module_dict:
        return _src_to_module_dict[src]
    name = f'_imported_module_{uuid.uuid4().hex}'
    module = types.ModuleType(name)
    # Registered before running: the classes it decorates look their source up by module name.
    sys.modules[name] = module
    _module_src[name] = src
    _src_to_module_dict[src] = module
    exec(compile(src, f'<persistent source {name}>', 'exec'), module.__dict__)  # pylint: disable=exec-used
    return module

#----------------------------------------------------------------------------
# The decorator.

def persistent_class(cls):
    """Class decorator: instances pickle with the source of the defining module.

    Classes of the same module that the decorated class uses as members must be
    decorated too; imported modules are not embedded and must exist where the
    pickle is read (`torch_utils.persistence`, `dnnlib`, `torch_utils.misc`).
    Set `self._record_init_args = False` in a constructor to skip recording its
    arguments.
    """
    if not isinstance(cls, type):
        raise TypeError(f'persistent_class decorates classes, got {type(cls).__name__}')
    if is_persistent(cls):
        return cls
    module = sys.modules[cls.__module__]
    src = _module_to_src(module)
    name = cls.__name__

    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, **kwargs)
        if getattr(self, '_record_init_args', True):
            self._init_args = copy.deepcopy(args)
            self._init_kwargs = copy.deepcopy(kwargs)
            _check_pickleable((self._init_args, self._init_kwargs), name)
        else:
            self._init_args = self._init_kwargs = None

    def __reduce__(self):
        meta = dict(type='class', version=FORMAT_VERSION, module_src=src, class_name=name, state=_state_of(self))
        return _reconstruct_persistent_obj, (meta,)

    def init_args(self):
        """Positional constructor arguments (a copy)."""
        if self._init_args is None:
            raise AttributeError(f'{name} was built without recording its arguments')
        return copy.deepcopy(self._init_args)

    def init_kwargs(self):
        """Keyword constructor arguments (a copy, as dnnlib.EasyDict)."""
        if self._init_kwargs is None:
            raise AttributeError(f'{name} was built without recording its arguments')
        return dnnlib.EasyDict(copy.deepcopy(self._init_kwargs))

    members = dict(__init__=__init__, __reduce__=__reduce__, init_args=property(init_args),
                   init_kwargs=property(init_kwargs), __module__=cls.__module__, __qualname__=cls.__qualname__,
                   __doc__=cls.__doc__)
    wrapper = type(name, (cls,), members)
    _persistent_types.add(wrapper)
    return wrapper

def is_persistent(obj):
    """Whether obj is a class made by persistent_class, or an instance of one."""
    return obj in _persistent_types if isinstance(obj, type) else type(obj) in _persistent_types

def import_hook(hook):
    """Register hook(meta) -> meta, run on every persistent object before it is rebuilt.

    `meta` is a dnnlib.EasyDict with the fields of the pickle (type, version,
    module_src, class_name, state); a hook may patch `module_src`, e.g. to keep
    old pickles working after an imported API changed. Usable as a decorator.
    """
    if not callable(hook):
        raise TypeError('import_hook expects a callable')
    _hooks.append(hook)
    return hook

#----------------------------------------------------------------------------
# Pickling and unpickling.

def _state_of(obj):
    """What pickle would store for obj (its __dict__ for torch modules)."""
    getstate = getattr(obj, '__getstate__', None)
    return getstate() if callable(getstate) else obj.__dict__

def _reconstruct_persistent_obj(meta):
    """Rebuild a persistent object; pickles name this function, in this module."""
    meta = dnnlib.EasyDict(meta)
    meta.state = dnnlib.EasyDict(meta.state)
    for hook in _hooks:
        meta = hook(meta)
        if meta is None:
            raise ValueError(f'import hook {hook!r} returned None instead of meta')
    if meta.type != 'class' or meta.version != FORMAT_VERSION:
        raise pickle.UnpicklingError(f'persistent object of type {meta.type!r}, format version {meta.version!r}; '
                                     f'only type "class", version {FORMAT_VERSION} is supported')
    module = _src_to_module(meta.module_src)
    cls = persistent_class(module.__dict__[meta.class_name])
    obj = cls.__new__(cls)
    if callable(getattr(obj, '__setstate__', None)):
        obj.__setstate__(meta.state)
    else:
        obj.__dict__.update(meta.state)
    return obj

def _check_pickleable(obj, owner):
    """Fail at construction, not at saving time, on arguments pickle cannot store.

    Tensors, arrays and persistent objects are known to pickle and are skipped,
    which keeps this cheap for networks passed as arguments.
    """
    def strip(x):
        if isinstance(x, dict):
            return [(strip(k), strip(v)) for k, v in x.items()]
        if isinstance(x, (list, tuple, set, frozenset)):
            return [strip(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, complex, str, bytes, bytearray)) or is_persistent(x):
            return None
        if type(x).__module__ in ('torch', 'torch.nn.parameter', 'numpy') and type(x).__name__ in ('Tensor', 'Parameter', 'ndarray'):
            return None
        return x
    try:
        pickle.dump(strip(obj), io.BytesIO())
    except Exception as e:
        raise TypeError(f'{owner}: constructor arguments cannot be pickled ({type(e).__name__}: {e})') from e
