"""The one distributed helper: torchrun process groups (NCCL on CUDA, gloo on CPU), and workers that
stop when their torchrun launcher does."""

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

# Read before anything slow (importing torch): a torchrun worker's parent is its launcher, and the
# sooner it is read, the smaller the window in which a dying launcher already handed us to a reaper.
_parent_at_import = os.getppid()

import torch

_initialized = False
_launcher_pid = None  # Set once stop_with_launcher() watches a torchrun launcher.
_PR_SET_PDEATHSIG = 1  # From <linux/prctl.h>.

def _stop_now():
    """End this worker at once, the way the kernel's parent-death signal does: nothing waits for it
    any more, and its images are written atomically, so there is nothing to tidy up."""
    if hasattr(signal, 'SIGKILL'):
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)

def _could_be_launcher(pid):
    """False when `pid` is certainly not a torchrun launcher: it runs as another user, or it is an init
    process (pid 1) that is not Python. A launcher is a Python process of our user; pid 1 is our parent
    either because torchrun is a container's first process or because our launcher died and init adopted us."""
    try:
        if os.stat(f'/proc/{pid}').st_uid != os.getuid():
            return False
        if pid != 1:
            return True
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            argv = [os.path.basename(a.decode(errors='replace')) for a in f.read().split(b'\0')[:2]]
    except OSError:
        return True  # No /proc (not Linux) or not readable: nothing to go by.
    names = ('torchrun', os.path.basename(sys.executable))
    return any('python' in a or a in names for a in argv)

def _watch_launcher(launcher, interval):
    while os.getppid() == launcher:
        time.sleep(interval)
    _stop_now()

def stop_with_launcher(interval=0.5):
    """Under torchrun, stop this worker within seconds of its launcher ending, however it ends.

    torchrun starts every worker in a session of its own, so when the launcher is killed with SIGKILL
    (`kill -9`, the out-of-memory killer, a scheduler ending the job step), no signal reaches the
    workers: they used to run on as orphans, writing images and holding devices. Here the kernel sends
    this worker SIGKILL when its parent, the launcher, ends (Linux's PR_SET_PDEATHSIG; torchrun starts
    workers from its main thread, and the signal follows the thread that forked us). A launcher that
    ended before that was set is caught by comparing the parent now with the one read at import; a
    daemon thread polling the parent every `interval` seconds covers systems without prctl. A no-op
    outside torchrun (a plain `python generate_dg.py` is unaffected) and when already watching.
    """
    global _launcher_pid
    if _launcher_pid is not None or 'TORCHELASTIC_RUN_ID' not in os.environ:
        return
    launcher = _parent_at_import
    if sys.platform.startswith('linux'):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            args = [ctypes.c_ulong(a) for a in (signal.SIGKILL, 0, 0, 0)]
            libc.prctl(_PR_SET_PDEATHSIG, *args)
        except (OSError, AttributeError):
            pass  # The watchdog thread alone then stops us.
    if os.getppid() != launcher or not _could_be_launcher(launcher):
        _stop_now()  # The launcher died before the kernel was told to stop us with it.
    _launcher_pid = launcher
    threading.Thread(target=_watch_launcher, args=(launcher, interval), name='launcher-watchdog', daemon=True).start()

stop_with_launcher()  # As early as a command imports this module, before it loads networks or data.

def init(device_type=None):
    """Join the torchrun process group if launched by torchrun; plain `python` runs as rank 0 of 1."""
    global _initialized
    stop_with_launcher()
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

@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads land in the cache), then the other ranks run it, reading the cache."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()

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
