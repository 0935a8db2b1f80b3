"""Discriminator guidance as a transform of the denoiser (Kim et al., ICML 2023).

The code lives in `edm_dg.sampling` (denoisers.py, score.py); this module keeps
the documented import `from edm_dg.guidance import DGDenoiser`.
"""

from .sampling.denoisers import DGDenoiser, guided
from .sampling.score import LOG_RATIO_OUTSIDE, dg_correction, window_on_host

__all__ = ['DGDenoiser', 'LOG_RATIO_OUTSIDE', 'dg_correction', 'guided', 'window_on_host']
