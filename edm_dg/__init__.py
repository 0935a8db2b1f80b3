"""edm-dg: Discriminator Guidance on NVIDIA's EDM codebase."""

from .sampler import dg_sampler, dg_correction
from .discriminator import Discriminator, load_discriminator, load_classifier

__all__ = ['dg_sampler', 'dg_correction', 'Discriminator', 'load_discriminator', 'load_classifier']
