"""edm-dg: Discriminator Guidance on NVIDIA's EDM codebase."""

from .guidance import DGDenoiser, dg_correction
from .sampler import dg_sampler

__all__ = ['DGDenoiser', 'dg_correction', 'dg_sampler']
