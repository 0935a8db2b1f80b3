"""GPU fast paths as wrappers: autocast precision, channels_last, torch.compile.

The wrappers keep the interfaces the sampler relies on (`net(x, sigma, labels)`,
`net.round_sigma`, `net.sigma_min`, ...; `disc(x_vp, tau, labels)`) and return
float32, so the sampler's float64 arithmetic is unchanged.
"""

import contextlib
import copy

import torch

PRECISIONS = ('fp32', 'tf32', 'bf16', 'fp16')

def autocast_dtype(precision):
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')
    return {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)

def set_tf32(enabled):
    """TF32 matmuls/convolutions on Ampere+ GPUs (a process-wide switch in PyTorch)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)

def autocast(device_type, precision):
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)

def maybe_compile(module, enabled, log=print):
    """torch.compile with a graceful fallback where it is unavailable."""
    if not enabled:
        return module
    try:
        return torch.compile(module)
    except Exception as e:  # No compiler toolchain, unsupported platform, ...
        log(f'torch.compile unavailable ({type(e).__name__}: {str(e)[:80]}); running eagerly')
        return module

class _AutocastModel(torch.nn.Module):
    """An EDM backbone (SongUNet/DhariwalUNet) run under autocast, returning its input's dtype.

    EDM's preconditioners assert that the backbone returns the dtype they asked
    for, so the cast back happens inside, before the preconditioner sees it.
    """

    def __init__(self, model, precision, channels_last):
        super().__init__()
        self.model = model
        self.precision = precision
        self.channels_last = channels_last

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device.type, self.precision):
            return self.model(x, noise_labels, class_labels, **kwargs).to(x.dtype)

def FastNet(net, precision='fp32', channels_last=False, compile=False, log=print):
    """A shallow copy of an EDM preconditioned network whose backbone runs under autocast /
    channels_last / torch.compile. Parameters are shared with `net`; `net` itself is unchanged."""
    autocast_dtype(precision)
    if channels_last:
        net.model.to(memory_format=torch.channels_last)
    fast = copy.copy(net)
    fast._modules = dict(net._modules)
    fast._modules['model'] = maybe_compile(_AutocastModel(net.model, precision, channels_last), compile, log)
    return fast

class FastDiscriminator(torch.nn.Module):
    """A discriminator callable run under autocast / channels_last / compile, returning float32."""

    def __init__(self, disc, precision='fp32', channels_last=False, compile=False, log=print):
        super().__init__()
        self.disc = disc
        self.precision = precision
        self.channels_last = channels_last
        autocast_dtype(precision)
        if channels_last and isinstance(disc, torch.nn.Module):
            disc.to(memory_format=torch.channels_last)
        self._call = maybe_compile(disc, compile, log)

    def forward(self, x_vp, tau, class_labels=None):
        if self.channels_last:
            x_vp = x_vp.to(memory_format=torch.channels_last)
        with autocast(x_vp.device.type, self.precision):
            return self._call(x_vp, tau, class_labels).float()

def fast_paths(net, disc=None, precision='fp32', disc_precision=None, channels_last=False, compile=False, log=print):
    """(net, disc) with the requested fast paths; each is returned as it is when none applies to it.
    disc_precision defaults to precision; tf32 switches PyTorch's process-wide TF32 flags on."""
    disc_precision = disc_precision or precision
    if 'tf32' in (precision, disc_precision):
        set_tf32(True)
    eager = not (channels_last or compile)
    if not (eager and precision == 'fp32'):
        net = FastNet(net, precision, channels_last, compile, log)
    if disc is not None and not (eager and disc_precision == 'fp32'):
        disc = FastDiscriminator(disc, disc_precision, channels_last, compile, log)
    return net, disc
