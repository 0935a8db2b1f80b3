"""The one distributed helper: torchrun process groups (NCCL on CUDA, gloo on CPU)."""

import os
import time

import torch

_initialized = False

def init(device_type=None):
    """Join the torchrun process group if launched by torchrun; plain `python` runs as rank 0 of 1."""
    global _initialized
    if _initialized or int(os.environ.get('WORLD_SIZE', '1')) <= 1:
        return
    if device_type is None:
        device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if device_type == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    torch.distributed.init_process_group(backend=backend)
    _initialized = True

def is_initialized():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def get_rank():
    return torch.distributed.get_rank() if is_initialized() else 0

def get_world_size():
    return torch.distributed.get_world_size() if is_initialized() else 1

def get_local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))

def barrier():
    if is_initialized():
        torch.distributed.barrier()

def all_reduce(tensor, op=None):
    """In-place sum (default) over ranks; a no-op without a process group."""
    if is_initialized():
        torch.distributed.all_reduce(tensor, op=op or torch.distributed.ReduceOp.SUM)
    return tensor

def broadcast_object(obj, src=0):
    if not is_initialized():
        return obj
    lst = [obj]
    torch.distributed.broadcast_object_list(lst, src=src)
    return lst[0]

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

def shutdown(finished=True):
    """Leave the process group; with finished=True, first wait until every rank has finished.

    Gloo's worker threads free a finished collective's tensors after waking the caller, and freeing
    a tensor takes the GIL; a worker that gets there only once the interpreter is finalizing aborts
    the process ("terminate called without an active exception"; see pytorch/pytorch PR 179291).
    The barrier and the short GIL-free wait let the workers do it while Python is still alive. A
    failing rank (finished=False) leaves at once: the others may never reach a barrier.
    """
    global _initialized
    if is_initialized():
        if finished:
            torch.distributed.barrier()
            if torch.distributed.get_backend() == 'gloo':
                time.sleep(0.2)
        torch.distributed.destroy_process_group()
    _initialized = False

def all_gather_object(obj):
    """List of obj from every rank (just [obj] without a process group)."""
    if not is_initialized():
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out

def init_device(device=None):
    """The device for this process (default: cuda if available), after joining the torchrun group.
    A bare 'cuda' becomes this process's GPU, cuda:LOCAL_RANK."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    init(torch.device(device).type)
    if device == 'cuda':
        device = f'cuda:{get_local_rank()}'
    return torch.device(device)
