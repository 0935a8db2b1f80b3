"""Small tensor helpers with EDM's names (imported by EDM's embedded module source)."""

import numpy as np
import torch

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """Cached constant tensor, as in EDM's torch_utils.misc."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    if dtype is None:
        dtype = ref.dtype
    if device is None:
        device = ref.device
    return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy same-named parameters and buffers from src to dst."""
    assert isinstance(src_module, torch.nn.Module)
    assert isinstance(dst_module, torch.nn.Module)
    src_tensors = dict(src_module.named_parameters()) | dict(src_module.named_buffers())
    for name, tensor in list(dst_module.named_parameters()) + list(dst_module.named_buffers()):
        assert (name in src_tensors) or (not require_all)
        if name in src_tensors:
            tensor.copy_(src_tensors[name])
