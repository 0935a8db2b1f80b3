"""edm-dg: Discriminator Guidance on NVIDIA's EDM codebase."""

from .sampling import DGDenoiser, dg_correction, dg_sampler

__all__ = ['DGDenoiser', 'dg_correction', 'dg_sampler']
