"""GPU fast paths as wrappers: autocast precision, channels_last, torch.compile.

The wrappers keep the interfaces the sampler relies on (`net(x, sigma, labels)`,
`net.round_sigma`, `net.sigma_min`, ...; `disc(x_vp, tau, labels)`) and return
float32, so the sampler's float64 arithmetic is unchanged.
"""

import contextlib
import warnings

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

class FastNet(torch.nn.Module):
    """An EDM network run under autocast / channels_last / compile, returning float32."""

    def __init__(self, net, precision='fp32', channels_last=False, compile=False, log=print):
        super().__init__()
        self.net = net
        self.precision = precision
        self.channels_last = channels_last
        autocast_dtype(precision)
        if channels_last:
            net.to(memory_format=torch.channels_last)
        self._call = maybe_compile(net, compile, log)
        for name in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, name, getattr(net, name))

    def round_sigma(self, sigma, **kwargs):
        return self.net.round_sigma(sigma, **kwargs)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        if self.channels_last:
            x = x.to(memory_format=torch.channels_last)
        with autocast(x.device.type, self.precision):
            return self._call(x, sigma, class_labels, **kwargs).float()

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
