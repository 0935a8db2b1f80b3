"""The sampling family: solvers over a denoiser chain, guidance as denoiser wrappers, hooks, the score.

One file per idea: `schedule` (EDM's clamped schedule), `score` (the
discriminator's log-ratio, the DG correction, the VP-time window),
`denoisers` (the denoiser protocol, DGDenoiser), `hooks` (per-sample state,
boosting), the solvers `edm` (Heun/Euler with churn), `dpmpp`
(DPM-Solver++(2M)) and `restart`, `selection` (particles, best-of-N) and
`driver` (registry, NFE, the options-to-chain builder, `sample`).
"""

from .denoisers import DGDenoiser, Denoiser, Step, denoise, guided, nfe_of
from .driver import SAMPLERS, build_chain, dg_sampler, nfe, sample
from .dpmpp import dpmpp2m_sampler
from .edm import edm_sampler
from .hooks import Boosting, Hook, Hooks, SampleState
from .restart import RESTART_CIFAR10, RestartInterval, format_restart, parse_restart, restart_sampler
from .schedule import edm_schedule, step_schedule
from .score import dg_correction, log_ratio, window_on_host

__all__ = [
    'DGDenoiser', 'Denoiser', 'Step', 'denoise', 'guided', 'nfe_of', 'SAMPLERS', 'build_chain', 'dg_sampler', 'nfe',
    'sample', 'dpmpp2m_sampler', 'edm_sampler', 'Boosting', 'Hook', 'Hooks', 'SampleState', 'RESTART_CIFAR10',
    'RestartInterval', 'format_restart', 'parse_restart', 'restart_sampler', 'edm_schedule', 'step_schedule',
    'dg_correction', 'log_ratio', 'window_on_host',
]
