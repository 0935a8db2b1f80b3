"""Conversions between pixels and the representation an EDM2 network works in (Karras et al., 2024).

EDM2 pickles carry one of these as their `encoder`: `StandardRGBEncoder` for pixel
models (uint8 <-> [-1, 1]) and `StabilityVAEEncoder` for latent models (Stability
AI's VAE, its latents standardised per channel). `encode` = `encode_latents` of
`encode_pixels`: datasets store the raw latents, training and sampling use the
final ones, and `decode` goes from final latents to uint8 pixels, NCHW. Class
names, constructor arguments and attributes follow NVlabs' EDM2
(`training.encoders`), so the pickles load in both code bases (docs/compat.md,
"EDM2 networks and pickles").

This module's source travels in pickles and runs in NVlabs' EDM2: it imports only
the standard library, numpy, torch and `torch_utils.persistence` (and, when a VAE
is loaded, `dnnlib` and `diffusers`).
"""

import os

import numpy as np
import torch
from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class Encoder:
    """Base class: raw pixels (uint8) -> raw latents -> final latents, and final latents -> pixels."""

    def init(self, device):
        """Do any lazy set-up (loading a model) now, on `device`."""
        del device

    def __getstate__(self):
        return dict(vars(self))

    def encode(self, x):
        """Raw uint8 pixels -> final latents."""
        raw = self.encode_pixels(x)
        return self.encode_latents(raw)

    def encode_pixels(self, x):
        """Raw uint8 pixels -> raw latents (what a dataset stores)."""
        raise NotImplementedError(f'{type(self).__name__}: no pixel encoder')

    def encode_latents(self, x):
        """Raw latents -> final latents (what the network sees)."""
        raise NotImplementedError(f'{type(self).__name__}: no latent standardisation')

    def decode(self, x):
        """Final latents -> uint8 pixels."""
        raise NotImplementedError(f'{type(self).__name__}: no decoder')

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixel models: x / 127.5 - 1 in, and x * 127.5 + 128 clipped to [0, 255] and truncated out.

    The +128 (not 127.5) with truncation rounds to the nearest gray level.
    """

    def encode_pixels(self, x):
        return x  # The dataset stores the pixels themselves.

    def encode_latents(self, x):
        return x.to(torch.float32).div(127.5).sub(1)

    def decode(self, x):
        levels = x.to(torch.float32) * 127.5 + 128
        return levels.clip(0, 255).to(torch.uint8)

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Latent models: Stability AI's VAE `vae_name` (4 x H/8 x W/8 latents), standardised.

    Raw latents are the VAE posterior's mean and std (8 channels); final latents are a
    draw from it mapped by x * scale + bias, scale = final_std / raw_std and
    bias = final_mean - raw_mean * scale (numpy float32, per channel). The VAE is
    loaded lazily by `init` through the `diffusers` package, never pickled, and run in
    batches of batch_size.
    """

    def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
                 raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
        super().__init__()
        scale = np.float32(final_std) / np.float32(raw_std)
        self.vae_name, self.batch_size, self._vae = vae_name, int(batch_size), None
        self.scale, self.bias = scale, np.float32(final_mean) - np.float32(raw_mean) * scale

    def __getstate__(self):
        return dict(self.__dict__, _vae=None)

    def init(self, device):
        if self._vae is None:
            self._vae = _load_vae(self.vae_name, device)
        else:
            self._vae.to(device)

    def _per_channel(self, values, like):
        return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)

    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255
        parts = []
        for batch in x.split(self.batch_size):
            posterior = self._vae.encode(batch)['latent_dist']
            parts.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(parts)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        return x * self._per_channel(self.scale, x) + self._per_channel(self.bias, x)

    def decode(self, x):
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - self._per_channel(self.bias, x)) / self._per_channel(self.scale, x)
        x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

def import_diffusers(purpose):
    """The diffusers package; a one-line ImportError saying how to install it otherwise."""
    try:
        import diffusers  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise ImportError(f'{purpose} needs the "diffusers" package; install it with: pip install "edm-dg[latent]" '
                          f'(or pip install diffusers)') from None
    return diffusers

def _load_vae(vae_name, device):
    """The frozen diffusers AutoencoderKL `vae_name` (hub name or local folder) on `device`.

    As in EDM2, the hub copy lives in the dnnlib cache (`diffusers/`) and the
    cache is tried before the network. Errors are one line naming the VAE.
    """
    diffusers = import_diffusers(f'StabilityVAEEncoder (latent EDM2 models) running the VAE "{vae_name}"')
    load = diffusers.models.AutoencoderKL.from_pretrained
    if os.path.isdir(vae_name):
        try:
            vae = load(vae_name, low_cpu_mem_usage=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise OSError(f'{vae_name}: not a diffusers AutoencoderKL folder ({" ".join(str(e).split())[:160]}); '
                          f'pass a folder written by AutoencoderKL.save_pretrained') from None
    else:
        import dnnlib  # pylint: disable=import-outside-toplevel
        cache_dir = dnnlib.make_cache_dir_path('diffusers')
        os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
        os.environ.setdefault('HF_HUB_DISABLE_SYMLINKS_WARNING', '1')
        try:
            vae = load(vae_name, cache_dir=cache_dir, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError):
            try:
                vae = load(vae_name, cache_dir=cache_dir, low_cpu_mem_usage=False)
            except (OSError, ValueError) as e:
                raise OSError(f'VAE "{vae_name}": not in the cache {cache_dir} and the Hugging Face hub could not be read '
                              f'({" ".join(str(e).split())[:120]}); pass --vae=DIR, a local copy of it '
                              f'(AutoencoderKL.save_pretrained folder)') from None
    return vae.eval().requires_grad_(False).to(device)
