"""Tensor helpers under the names NVlabs' EDM uses in `torch_utils.misc`.

Source embedded in EDM pickles does `from torch_utils import misc` (EDM's
AugmentPipe builds its matrices with `misc.constant`), so these names must stay
importable with EDM's signatures; this project's own code hardly uses them.
"""

import numpy as np
import torch

_constants = {}

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A tensor holding `value` (broadcast to `shape`), made once per distinct request.

    The cache key covers the value's bytes and every argument, so a cached
    tensor is only returned for an identical request; treat it as read-only.
    """
    array = np.asarray(value)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    device = torch.device('cpu') if device is None else torch.device(device)
    memory_format = torch.contiguous_format if memory_format is None else memory_format
    shape = None if shape is None else tuple(shape)
    key = (array.dtype.str, array.shape, array.tobytes(), shape, dtype, device, memory_format)
    cached = _constants.get(key)
    if cached is None:
        cached = torch.as_tensor(array.copy(), dtype=dtype, device=device)
        if shape is not None:
            cached = cached.expand(shape)
        cached = cached.contiguous(memory_format=memory_format)
        _constants[key] = cached
    return cached

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """`constant` with dtype and device taken from `ref` unless given."""
    return constant(value, shape=shape, dtype=ref.dtype if dtype is None else dtype,
                    device=ref.device if device is None else device, memory_format=memory_format)

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy every parameter and buffer of `dst_module` from the same name in `src_module`.

    With require_all, a name missing from the source is an error; otherwise
    such tensors keep their values. Typical use: move weights of an unpickled
    network into one built from the current code.
    """
    if not isinstance(src_module, torch.nn.Module) or not isinstance(dst_module, torch.nn.Module):
        raise TypeError('copy_params_and_buffers expects two torch.nn.Module objects')
    source = dict(src_module.named_parameters())
    source.update(src_module.named_buffers())
    targets = list(dst_module.named_parameters()) + list(dst_module.named_buffers())
    missing = [name for name, _ in targets if name not in source]
    if require_all and missing:
        raise KeyError(f'source module lacks {missing[:3]}' + (' ...' if len(missing) > 3 else ''))
    for name, tensor in targets:
        if name in source:
            tensor.copy_(source[name])
