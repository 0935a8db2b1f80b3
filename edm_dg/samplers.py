"""Samplers for EDM-style denoisers: DPM-Solver++(2M), Restart, and the registry that adds EDM's Heun and Euler.

Every sampler here only needs a denoiser `net(x, sigma, class_labels) ->
denoised` with `sigma_min`, `sigma_max` and `round_sigma(sigma)`, so
discriminator guidance written as a transform of the denoiser,
`D'(x; sigma) = D(x; sigma) - w * corr`, works with all of them.

Common signature: `(net, latents, class_labels=None, randn_like=torch.randn_like,
num_steps, sigma_min=0.002, sigma_max=80, rho=7, ...)`; sampling starts from
`latents (float64) * t_0` on EDM's schedule (Karras et al. 2022, sigma_min /
sigma_max clamped to the net's) and returns float64 images.

Reproducibility and speed rules that all samplers follow:
- randomness only through `randn_like`, called with the whole batch and in an
  order fixed by the schedule (never by the data), and every operation acts on
  each sample separately: with per-seed generators an image depends only on
  its seed, not on the batch it was sampled in;
- the schedule is copied to the host once, before the step loop; every
  decision in the loop (churn window, Heun correction, restarts, DPM-Solver
  coefficients) is taken from those host floats, so the loop never reads a
  tensor back from the device.

Number of denoiser evaluations: `nfe(name, num_steps, **kwargs)`.
"""

import functools
import json
import math
from collections import namedtuple

import torch

from .guidance import guided
from .sampler import GAMMA_MAX, dg_sampler, edm_schedule, step_schedule, take_rows

__all__ = [
    'GAMMA_MAX', 'RestartInterval', 'RESTART_CIFAR10', 'parse_restart', 'format_restart',
    'edm_schedule', 'churn_gamma', 'add_churn', 'ode_step', 'integrate',
    'dpmpp2m_sampler', 'restart_sampler', 'SAMPLERS', 'nfe', 'sample',
]


#----------------------------------------------------------------------------
# Shared pieces.

def churn_gamma(t_cur, S_churn, num_steps, S_min=0.0, S_max=float('inf')):
    """EDM's gamma_i for host noise level t_cur: min(S_churn/N, sqrt(2)-1) inside [S_min, S_max], else 0."""
    if not S_min <= t_cur <= S_max:
        return 0
    return min(S_churn / num_steps, GAMMA_MAX)

def add_churn(net, x, t_cur, gamma, S_noise, randn_like):
    """Raise the noise level of x from t_cur to t_hat = round_sigma(t_cur (1 + gamma)).

    The noise is drawn whatever gamma is (also for gamma = 0), as EDM's sampler
    does, so the number of draws never depends on the settings of a step.
    """
    t_hat = net.round_sigma(t_cur + gamma * t_cur)
    eps = randn_like(x)
    extra_std = (t_hat ** 2 - t_cur ** 2).sqrt()
    return x + extra_std * S_noise * eps, t_hat

def _denoise(net, x, sigma, class_labels):
    return net(x, sigma, class_labels).to(torch.float64)

def ode_step(net, x, t_from, t_to, class_labels=None, second_order=True):
    """One step of the PF-ODE dx/dt = (x - D(x; t)) / t from t_from to t_to.

    Euler's method, plus Heun's trapezoidal correction when second_order
    (a host bool; needs t_to > 0). One or two denoiser evaluations.
    """
    slope = (x - _denoise(net, x, t_from, class_labels)) / t_from
    dt = t_to - t_from
    x_euler = x + dt * slope
    if not second_order:
        return x_euler
    slope_end = (x_euler - _denoise(net, x_euler, t_to, class_labels)) / t_to
    return x + dt * (0.5 * slope + 0.5 * slope_end)

def integrate(net, x, t_dev, t_host, class_labels=None, randn_like=torch.randn_like,
              gamma_fn=None, S_noise=1, second_order=True):
    """EDM's stochastic step loop over the schedule t_dev (device) / t_host (host floats).

    At each step: gamma = gamma_fn(host t_cur) (0 when gamma_fn is None), the
    noise increase of `add_churn` (one `randn_like` draw per step), then an ODE
    step to the next level, with the Heun correction when second_order and the
    next level is above zero.
    """
    for k in range(len(t_host) - 1):
        gamma = 0 if gamma_fn is None else gamma_fn(t_host[k])
        x, t_hat = add_churn(net, x, t_dev[k], gamma, S_noise, randn_like)
        heun = bool(second_order) and t_host[k + 1] > 0
        x = ode_step(net, x, t_hat, t_dev[k + 1], class_labels, second_order=heun)
    return x

def _main_gamma(num_steps, S_churn, S_min, S_max):
    return lambda t: churn_gamma(t, S_churn, num_steps, S_min, S_max)

def _start(net, latents, num_steps, sigma_min, sigma_max, rho):
    t_dev, t_host = edm_schedule(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    return latents.to(torch.float64) * t_dev[0], t_dev, t_host

#----------------------------------------------------------------------------
# DPM-Solver++(2M).

def dpmpp2m_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, resample=None,
):
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) on EDM's schedule.

    With lambda = -log(sigma) and h = lambda_next - lambda_cur, a step is
    `x_next = (sigma_next / sigma_cur) x + (1 - e^{-h}) D_hat`, where D_hat is
    the denoised output at the first step and afterwards the second-order
    combination `(1 + 1/(2r)) D_cur - 1/(2r) D_prev` with r = h_prev / h.
    The step to sigma = 0 returns the denoised output. Deterministic:
    randn_like is not used. Denoiser evaluations: num_steps. resample: the
    selection hook (see `sample`); it reorders x, the previous denoised output
    and the labels.
    """
    del randn_like
    x, t_dev, t_host = _start(net, latents, num_steps, sigma_min, sigma_max, rho)
    prev_denoised, h_prev = None, None
    for k in range(num_steps):
        denoised = _denoise(net, x, t_dev[k], class_labels)
        s_cur, s_next = t_host[k], t_host[k + 1]
        if s_next <= 0:
            x = denoised
            break
        h = math.log(s_cur / s_next)
        if prev_denoised is None:
            target = denoised
        else:
            half_inv_r = h / (2 * h_prev)
            target = (1 + half_inv_r) * denoised - half_inv_r * prev_denoised
        x = (s_next / s_cur) * x + (-math.expm1(-h)) * target
        prev_denoised, h_prev = denoised, h
        if resample is not None:
            idx = resample(k, x, s_next)
            if idx is not None:
                x, prev_denoised, class_labels = take_rows(idx, x, prev_denoised, class_labels)
    return x

#----------------------------------------------------------------------------
# Restart sampling (Xu et al., NeurIPS 2023).

RestartInterval = namedtuple('RestartInterval', ['n_restart', 'K', 't_min', 't_max'])
RestartInterval.__doc__ = """One restart interval: n_restart noise levels (n_restart - 1 Heun steps) on a
Karras sub-schedule from t_max down to t_min, repeated K times."""

# The paper's CIFAR-10 setting with EDM's 18-step Heun schedule (43 NFE): the
# release's `{"0": [3, 2, 0.06, 0.30]}` (Newbeeer/diffusion_restart_sampling,
# benchmarks/README.md and params_cifar10_vp.txt, format
# {i: [N_Restart_i, K_i, t_min_i, t_max_i]}).
RESTART_CIFAR10 = (RestartInterval(3, 2, 0.06, 0.30),)

def _checked_interval(values):
    if len(values) != 4:
        raise ValueError(f'a restart interval is (n_restart, K, t_min, t_max), got {values!r}')
    n, K, t_min, t_max = values
    if float(n) != int(n) or float(K) != int(K):
        raise ValueError(f'restart n_restart and K must be integers, got {values!r}')
    n, K, t_min, t_max = int(n), int(K), float(t_min), float(t_max)
    if n < 2 or K < 0:
        raise ValueError(f'restart needs n_restart >= 2 and K >= 0, got {values!r}')
    if not 0 < t_min < t_max < math.inf:
        raise ValueError(f'restart needs 0 < t_min < t_max, got {values!r}')
    return RestartInterval(n, K, t_min, t_max)

def parse_restart(spec):
    """Restart intervals from a string, a sequence of 4-tuples, or None.

    String forms: 'n,K,t_min,t_max[;n,K,t_min,t_max...]' (e.g.
    '3,2,0.06,0.30'), the release's JSON '{"0": [3, 2, 0.06, 0.30], ...}',
    'default' (RESTART_CIFAR10) and ''/'none' (no restarts).
    Returns a tuple of RestartInterval.
    """
    if spec is None:
        return ()
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower() in ('', 'none', 'off'):
            return ()
        if text.lower() == 'default':
            return RESTART_CIFAR10
        if text.startswith('{'):
            try:
                table = json.loads(text)
            except ValueError as e:
                raise ValueError(f'bad restart JSON {spec!r}: {e}') from None
            return tuple(_checked_interval(v) for v in table.values())
        items = []
        for part in text.split(';'):
            if not part.strip():
                continue
            try:
                fields = [float(f) for f in part.split(',')]
            except ValueError:
                raise ValueError(f'bad restart interval {part!r}: expected n,K,t_min,t_max') from None
            items.append(_checked_interval(fields))
        return tuple(items)
    return tuple(_checked_interval(tuple(v)) for v in spec)

def format_restart(intervals):
    """Inverse of parse_restart: 'n,K,t_min,t_max;...'."""
    return ';'.join(f'{r.n_restart},{r.K},{r.t_min:g},{r.t_max:g}' for r in parse_restart(intervals))

def _restart_plan(net, intervals, t_dev, t_host, rho):
    """{main index j: [(sub-schedule device, host, K), ...]}: restarts run once t_j is reached.

    t_j is the positive main noise level (j = 1 .. N-1) closest to t_min; the
    sub-schedule goes from t_max down to exactly t_j.
    """
    plan = {}
    last = len(t_host) - 2  # index of the smallest positive level
    for r in intervals:
        j = min(range(1, last + 1), key=lambda k: abs(t_host[k] - r.t_min))
        if not r.t_max > t_host[j]:
            raise ValueError(f'restart t_max={r.t_max} must exceed the schedule level {t_host[j]:.6g} '
                             f'closest to t_min={r.t_min}')
        sub = step_schedule(r.n_restart, t_host[j], r.t_max, rho, net.round_sigma, device=t_dev.device)
        sub = torch.cat([sub.to(torch.float64).reshape(-1)[:r.n_restart - 1], t_dev[j:j + 1]])
        sub_host = [float(v) for v in sub.detach().cpu().tolist()]
        plan.setdefault(j, []).append((sub, sub_host, r.K))
    return plan

def restart_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    restart=RESTART_CIFAR10, restart_gamma=0.0, resample=None,
):
    """Restart sampling (Xu et al. 2023) around EDM's Heun sampler.

    Main process: EDM's Heun steps (`dg_sampler`'s) (same churn options). For each restart
    interval (n_restart, K, t_min, t_max) (see `parse_restart`), once the main
    process reaches the level t_j closest to t_min it repeats K times: forward
    noise `x += sqrt(t_max^2 - t_j^2) S_noise randn_like(x)`, then Heun steps
    back down a Karras sub-schedule of n_restart levels from t_max to t_j
    (rounded by the net, same rho). restart_gamma (default 0: plain ODE) adds
    EDM-style churn inside [S_min, S_max] on the restart steps; the release's
    scripts use 0.05 with S_min=0.01, S_max=1. Each restart step draws noise
    like an EDM step. With no intervals it returns EDM's Heun images.
    Denoiser evaluations: 2 num_steps - 1 + sum_i 2 K_i (n_restart_i - 1).
    resample: the selection hook (see `sample`), called after main step k and
    its restarts; it reorders x and the labels.
    """
    intervals = parse_restart(restart)
    x, t_dev, t_host = _start(net, latents, num_steps, sigma_min, sigma_max, rho)
    plan = _restart_plan(net, intervals, t_dev, t_host, rho)
    main_gamma = _main_gamma(num_steps, S_churn, S_min, S_max)

    def sub_gamma(t):
        return restart_gamma if S_min <= t <= S_max else 0

    for k in range(num_steps):
        x = integrate(net, x, t_dev[k:k + 2], t_host[k:k + 2], class_labels, randn_like, main_gamma, S_noise)
        for sub, sub_host, K in plan.get(k + 1, ()):
            jump = math.sqrt(sub_host[0] ** 2 - sub_host[-1] ** 2) * S_noise
            for _ in range(K):
                x = x + jump * randn_like(x)
                x = integrate(net, x, sub, sub_host, class_labels, randn_like, sub_gamma, S_noise)
        if resample is not None and k < num_steps - 1:
            idx = resample(k, x, t_host[k + 1])
            if idx is not None:
                x, class_labels = take_rows(idx, x, class_labels)
    return x

#----------------------------------------------------------------------------
# Registry and evaluation counts.

SAMPLERS = {
    'heun': dg_sampler,
    'euler': functools.partial(dg_sampler, solver='euler'),
    'dpmpp2m': dpmpp2m_sampler,
    'restart': restart_sampler,
}

def nfe(name, num_steps=18, **kwargs):
    """Denoiser evaluations per image of sampler `name` with `num_steps` main steps.

    heun: 2N - 1; euler: N; dpmpp2m: N; restart: 2N - 1 + sum_i 2 K_i (n_i - 1)
    (kwargs: restart=..., default RESTART_CIFAR10: 35 + 8 = 43 at N = 18).
    Guidance evaluations of a discriminator are not counted.
    """
    n = int(num_steps)
    if name in ('heun', 'dg'):
        return 2 * n - 1
    if name in ('euler', 'dpmpp2m'):
        return n
    if name == 'restart':
        extra = sum(2 * r.K * (r.n_restart - 1) for r in parse_restart(kwargs.get('restart', RESTART_CIFAR10)))
        return 2 * n - 1 + extra
    raise ValueError(f'unknown sampler {name!r}; choose from {sorted(SAMPLERS)}')

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# One entry point for the commands.

CHURN_KEYS = ('S_churn', 'S_min', 'S_max', 'S_noise')

def sample(net, latents, class_labels=None, randn_like=torch.randn_like, *, sampler='heun', discriminator=None,
           dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0, time_min=0.01, time_max=1.0, disc_labels=None,
           boosting=False, boost_S_churn=4.0, boost_S_noise=1.0, boost_period=5, boost_weight_period=2,
           restart=None, resample=None, **kwargs):
    """Images of `sampler` with DG settings as generate_dg.py takes them (float64 [N,C,H,W]).

    heun/euler run `dg_sampler` (w1, w2, boosting); the others sample with the
    guided denoiser `DGDenoiser(net, discriminator, w1, ...)`, which has one
    weight and no boosting. kwargs: num_steps, sigma_min, sigma_max, rho and the
    churn settings S_churn, S_min, S_max, S_noise.

    resample: optional selection hook `(i, x, sigma) -> idx or None` that every
    sampler calls on the host after main step i (0 <= i < num_steps - 1; for
    restart, after the step's restarts) with its state x [N,...] at host noise
    level sigma = t_{i+1}; an [N] LongTensor idx on x's device replaces each
    per-sample state row r by row idx[r]. Noise streams stay with their rows.
    edm_dg.selection.Resampler is one.
    """
    dg = dict(time_min=time_min, time_max=time_max, disc_labels=disc_labels)
    if sampler in ('heun', 'euler'):
        return SAMPLERS[sampler](net, latents, class_labels, randn_like, discriminator=discriminator, resample=resample,
                                 dg_weight_1st_order=dg_weight_1st_order, dg_weight_2nd_order=dg_weight_2nd_order,
                                 boosting=boosting, boost_S_churn=boost_S_churn, boost_S_noise=boost_S_noise,
                                 boost_period=boost_period, boost_weight_period=boost_weight_period, **dg, **kwargs)
    if sampler not in SAMPLERS:
        raise ValueError(f'--sampler={sampler}: unknown; choose one of {", ".join(SAMPLERS)}')
    if boosting:
        raise ValueError(f'--boosting needs --sampler=heun or euler (it changes their churn); drop it for --sampler={sampler}')
    if dg_weight_2nd_order:
        raise ValueError(f'--dg_weight_2nd_order weights Heun\'s second evaluation; with --sampler={sampler} use --dg_weight_1st_order only')
    if sampler == 'dpmpp2m':
        if kwargs.get('S_churn'):
            raise ValueError('--S_churn: DPM-Solver++(2M) is deterministic; drop --S_churn or use --sampler=heun')
        kwargs = {k: v for k, v in kwargs.items() if k not in CHURN_KEYS}
    if sampler == 'restart':
        kwargs['restart'] = RESTART_CIFAR10 if restart is None else parse_restart(restart)
    den = guided(net, discriminator, dg_weight_1st_order, **dg)
    return SAMPLERS[sampler](den, latents, class_labels, randn_like, resample=resample, **kwargs)
