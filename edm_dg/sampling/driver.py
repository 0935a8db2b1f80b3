"""The sampling family's entry points: the solver registry, evaluation counts, and guidance built from the options.

`sample(net, latents, class_labels, randn_like, sampler=..., <DG options>)` is
what the commands call: `build_chain` turns the DG options into a denoiser
chain and hooks (the one place guidance is built), and the solver runs over
the chain knowing nothing of discriminators. `dg_sampler` is the same with
EDM's sampler signature (README: a drop-in superset of EDM's `edm_sampler`).

Reproducibility and speed rules that every solver follows:
- randomness only through `randn_like`, called with the whole batch and in an
  order fixed by the schedule (never by the data), and every operation acts on
  each sample separately: with per-seed generators an image depends only on
  its seed, not on the batch it was sampled in;
- the schedule is copied to the host once, before the step loop; every
  decision in the loop is taken from those host floats, so the loop never
  reads a tensor back from the device.
"""

import functools

import torch

from .denoisers import DGDenoiser, Denoiser, guided, nfe_of
from .dpmpp import dpmpp2m_sampler
from .edm import edm_sampler
from .guides import guided_by
from .hooks import Boosting, Hooks, SampleState
from .restart import RESTART_CIFAR10, parse_restart, restart_evaluations, restart_sampler

SAMPLERS = {
    'heun': edm_sampler,
    'euler': functools.partial(edm_sampler, solver='euler'),
    'dpmpp2m': dpmpp2m_sampler,
    'restart': restart_sampler,
}
SECOND_ORDER_WEIGHT = ('heun', 'euler')  # samplers that take --dg_weight_2nd_order (Heun's evaluation)
CHURN_KEYS = ('S_churn', 'S_min', 'S_max', 'S_noise')

def nfe(name, num_steps=18, den=None, **kwargs):
    """Score-network evaluations per image of sampler `name` with `num_steps` main steps over denoiser `den`.

    Denoiser calls: heun 2N - 1; euler N; dpmpp2m N; restart 2N - 1 + sum_i
    2 K_i (n_i - 1) (kwargs: restart=..., default RESTART_CIFAR10: 35 + 8 = 43
    at N = 18); times `den.nfe`, the evaluations one call costs (1 for a
    network or None). A discriminator's evaluations are not counted. Where a
    call's cost depends on its noise level (`nfe_at`: a guide only inside its
    interval) the calls' host levels are taken from a run of the solver over
    a stand-in of one pixel (kwargs: the solver's schedule and churn settings).
    """
    if den is not None and hasattr(den, 'nfe_at') and name in SAMPLERS:
        return sum(nfe_of(den, sigma) for sigma in call_levels(name, num_steps, den, **kwargs))
    n = int(num_steps)
    if name in ('heun', 'dg'):
        calls = 2 * n - 1
    elif name in ('euler', 'dpmpp2m'):
        calls = n
    elif name == 'restart':
        calls = restart_evaluations(n, kwargs.get('restart', RESTART_CIFAR10))
    else:
        raise ValueError(f'unknown sampler {name!r}; choose from {sorted(SAMPLERS)}')
    return calls * (1 if den is None else nfe_of(den))

class _LevelRecorder(Denoiser):
    """Stand-in denoiser (D = 0) that records the host levels of each call."""

    def __init__(self, net):
        super().__init__(net)
        self.levels = []

    def forward(self, x, sigma, class_labels=None, *, step=None):
        self.levels.append(tuple(step.sigma))
        return torch.zeros_like(x)

def call_levels(name, num_steps, den, **kwargs):
    """The host noise levels (a tuple per denoiser call) sampler `name` calls `den` at, without hooks."""
    recorder = _LevelRecorder(den)
    kwargs = {k: v for k, v in kwargs.items() if not (name == 'dpmpp2m' and k in CHURN_KEYS)}
    if name == 'restart':
        kwargs['restart'] = parse_restart(kwargs.get('restart', RESTART_CIFAR10))
    SAMPLERS[name](recorder, torch.zeros(1, 1, 1, 1), None, torch.randn_like, num_steps=num_steps, **kwargs)
    return recorder.levels

def build_chain(net, state, *, sampler='heun', discriminator=None, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0,
                time_min=0.01, time_max=1.0, disc_labels=None, boosting=False, boost_S_churn=4.0, boost_S_noise=1.0,
                boost_period=5, boost_weight_period=2, gnet=None, guidance=1.0, guidance_interval=None):
    """(denoiser, hooks) for the guidance options: the one place guidance is built.

    The chain is `net`, guided by the network `gnet` where guidance != 1
    (`D_g + w (D - D_g)`, only for sigma in guidance_interval = (lo, hi) if
    given; guides.Guided), then wrapped in a DGDenoiser where a DG weight is
    non-zero (w1 at first evaluations; w2 at Heun's, heun/euler only), so the
    discriminator judges the guided state: `D' = D_g + w (D - D_g) - w_dg corr`.
    Boosting adds its churn hook and the denoiser's doubled correction. Both
    share `state`.
    """
    if dg_weight_2nd_order and sampler not in SECOND_ORDER_WEIGHT:
        raise ValueError(f'--dg_weight_2nd_order weights Heun\'s second evaluation; with --sampler={sampler} '
                         f'use --dg_weight_1st_order only')
    if disc_labels is not None:
        state['disc_labels'] = disc_labels
    den = guided(guided_by(net, gnet, guidance, guidance_interval), discriminator, dg_weight_1st_order,
                 w_2nd=dg_weight_2nd_order if sampler in SECOND_ORDER_WEIGHT else None,
                 time_min=time_min, time_max=time_max, state=state,
                 double_fake_every=boost_weight_period if boosting else None)
    hooks = []
    if boosting:
        active = isinstance(den, DGDenoiser) and den.active(1)
        hooks.append(Boosting(boost_S_churn, boost_S_noise, boost_period, boost_weight_period, active=active))
    return den, hooks

def sample(net, latents, class_labels=None, randn_like=torch.randn_like, *, sampler='heun', discriminator=None,
           dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0, time_min=0.01, time_max=1.0, disc_labels=None,
           boosting=False, boost_S_churn=4.0, boost_S_noise=1.0, boost_period=5, boost_weight_period=2,
           gnet=None, guidance=1.0, guidance_interval=None, restart=None, resample=None, hooks=(), state=None, **kwargs):
    """Images of `sampler` with DG settings as generate_dg.py takes them (float64 [N,C,H,W]; heun/euler over
    an EDM2 network: float32, EDM2's state).

    gnet, guidance, guidance_interval: guidance by a second network (build_chain).
    kwargs: num_steps, sigma_min, sigma_max, rho, the churn settings S_churn,
    S_min, S_max, S_noise (not dpmpp2m) and restart_gamma (restart).
    resample / hooks: hooks (hooks.py; a plain callable `(i, x, sigma) -> idx`
    is an after_step hook, e.g. selection.Resampler) run after the DG hooks,
    sharing `state` (a hooks.SampleState; default: a fresh one).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f'--sampler={sampler}: unknown; choose one of {", ".join(SAMPLERS)}')
    state = SampleState() if state is None else state
    den, dg_hooks = build_chain(net, state, sampler=sampler, discriminator=discriminator,
                                dg_weight_1st_order=dg_weight_1st_order, dg_weight_2nd_order=dg_weight_2nd_order,
                                time_min=time_min, time_max=time_max, disc_labels=disc_labels, boosting=boosting,
                                boost_S_churn=boost_S_churn, boost_S_noise=boost_S_noise, boost_period=boost_period,
                                boost_weight_period=boost_weight_period, gnet=gnet, guidance=guidance,
                                guidance_interval=guidance_interval)
    extra = Hooks(hooks).hooks + Hooks(resample).hooks
    if sampler == 'dpmpp2m':
        if kwargs.get('S_churn'):
            raise ValueError('--S_churn: DPM-Solver++(2M) is deterministic; drop --S_churn or use --sampler=heun')
        kwargs = {k: v for k, v in kwargs.items() if k not in CHURN_KEYS}
    if sampler == 'restart':
        kwargs['restart'] = RESTART_CIFAR10 if restart is None else parse_restart(restart)
    return SAMPLERS[sampler](den, latents, class_labels, randn_like, hooks=Hooks([*dg_hooks, *extra], state), **kwargs)

def dg_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    *,
    solver='heun',
    discriminator=None, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0,
    time_min=0.01, time_max=1.0, disc_labels=None,
    boosting=False, boost_S_churn=4.0, boost_S_noise=1.0, boost_period=5, boost_weight_period=2,
    resample=None,
):
    """EDM's stochastic Heun sampler with discriminator guidance (Kim et al., 2023), in EDM's signature.

    With no discriminator (or zero weights) it returns EDM's images.
    discriminator: callable `(x_vp, tau, class_labels) -> d in (0,1)` of shape [N].
    dg_weight_1st_order / dg_weight_2nd_order: guidance weights w1 (Euler
    evaluation at t_hat) and w2 (Heun evaluation at t_next).
    time_min / time_max: VP-time window; guidance is off for the batch outside it.
    disc_labels: labels for the discriminator (default: class_labels).
    boosting: per-sample churn (boost_S_churn, boost_S_noise) every
    `boost_period` steps and doubled correction every `boost_weight_period`
    steps for samples the discriminator judges fake (log_ratio < 0).
    solver: 'heun' (EDM's default) or 'euler' (no second-order correction).
    resample: optional hook (see `sample`).
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'solver must be "heun" or "euler", got {solver!r}')
    return sample(net, latents, class_labels, randn_like, sampler=solver, discriminator=discriminator,
                  dg_weight_1st_order=dg_weight_1st_order, dg_weight_2nd_order=dg_weight_2nd_order,
                  time_min=time_min, time_max=time_max, disc_labels=disc_labels, boosting=boosting,
                  boost_S_churn=boost_S_churn, boost_S_noise=boost_S_noise, boost_period=boost_period,
                  boost_weight_period=boost_weight_period, resample=resample, num_steps=num_steps,
                  sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn, S_min=S_min, S_max=S_max,
                  S_noise=S_noise)
