"""Restart sampling (Xu et al., NeurIPS 2023) around EDM's Heun sampler."""

import json
import math
from collections import namedtuple

import torch

from .edm import churn_gamma, edm_step
from .hooks import as_hooks, take_rows
from .schedule import edm_schedule, step_schedule

SERVED = ('after_step',)

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

def restart_evaluations(num_steps, restart=RESTART_CIFAR10):
    """Denoiser evaluations of restart_sampler: 2 N - 1 + sum_i 2 K_i (n_restart_i - 1)."""
    return 2 * int(num_steps) - 1 + sum(2 * r.K * (r.n_restart - 1) for r in parse_restart(restart))

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
    restart=RESTART_CIFAR10, restart_gamma=0.0, *, hooks=None,
):
    """Restart sampling (Xu et al. 2023) over the denoiser `net`; float64 images.

    Main process: EDM's Heun steps (edm.py, same churn options). For each
    restart interval (n_restart, K, t_min, t_max) (see `parse_restart`), once
    the main process reaches the level t_j closest to t_min it repeats K times:
    forward noise `x += sqrt(t_max^2 - t_j^2) S_noise randn_like(x)`, then Heun
    steps back down a Karras sub-schedule of n_restart levels from t_max to t_j
    (rounded by the net, same rho). restart_gamma (default 0: plain ODE) adds
    EDM-style churn inside [S_min, S_max] on the restart steps; the release's
    scripts use 0.05 with S_min=0.01, S_max=1. Each restart step draws noise
    like an EDM step. With no intervals it returns EDM's Heun images.
    Denoiser evaluations: `restart_evaluations`. hooks: after_step only, called
    after main step k and its restarts.
    """
    hooks = as_hooks(hooks)
    hooks.check('restart', SERVED)
    intervals = parse_restart(restart)
    t_dev, t_host = edm_schedule(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x = latents.to(torch.float64) * t_dev[0]
    plan = _restart_plan(net, intervals, t_dev, t_host, rho)

    def heun_steps(x, levels, host, gamma_of, index):
        for k in range(len(host) - 1):
            x = edm_step(net, x, levels[k], levels[k + 1], host[k], host[k + 1], class_labels, randn_like,
                         gamma_of(host[k]), S_noise, second_order=host[k + 1] > 0, index=index)
        return x

    main_gamma = lambda t: churn_gamma(t, S_churn, num_steps, S_min, S_max)
    sub_gamma = lambda t: restart_gamma if S_min <= t <= S_max else 0
    for k in range(num_steps):
        x = heun_steps(x, t_dev[k:k + 2], t_host[k:k + 2], main_gamma, k)
        for sub, sub_host, K in plan.get(k + 1, ()):
            jump = math.sqrt(sub_host[0] ** 2 - sub_host[-1] ** 2) * S_noise
            for _ in range(K):
                x = x + jump * randn_like(x)
                x = heun_steps(x, sub, sub_host, sub_gamma, k)
        if k < num_steps - 1:
            idx = hooks.after_step(k, x, t_host[k + 1])
            if idx is not None:
                x, class_labels = take_rows(idx, x, class_labels)
    return x
