"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's method, or Euler's, with churn.

`edm_sampler(net, latents, class_labels, randn_like, num_steps, ...)` takes
EDM's arguments in EDM's order and calls `randn_like` exactly as EDM does, so
for a plain network it returns EDM's images. `net` is any denoiser
(denoisers.py); guidance enters as a guided denoiser, boosting and selection
as hooks (hooks.py), so nothing here knows of a discriminator.

Every decision in the step loop (churn window, Heun correction) is taken from
the schedule's host floats, per-sample settings act as tensors: the loop never
reads a tensor back from the device.
"""

import torch

from .denoisers import Step, denoise
from .hooks import GAMMA_MAX, as_column, as_hooks, take_rows
from .schedule import edm_schedule

SOLVERS = ('heun', 'euler')
SERVED = ('churn', 'after_step')

def churn_gamma(t_cur, S_churn, num_steps, S_min=0.0, S_max=float('inf')):
    """EDM's gamma_i for host noise level t_cur: min(S_churn/N, sqrt(2)-1) inside [S_min, S_max], else 0."""
    if not S_min <= t_cur <= S_max:
        return 0
    return min(S_churn / num_steps, GAMMA_MAX)

def edm_step(net, x, t_cur, t_next, t_cur_host, t_next_host, class_labels=None, randn_like=torch.randn_like,
             gamma=0, S_noise=1, factors=None, second_order=True, index=None, noise_every_step=True):
    """One step of EDM's sampler from t_cur to t_next (device 0-d tensors; host floats beside them).

    Raise the noise to t_hat = round_sigma(t_cur (1 + gamma)) with one
    `randn_like` draw (also for gamma = 0, as EDM does, so the number of draws
    never depends on the settings; EDM2's sampler, noise_every_step=False,
    draws only where gamma is not the host number 0), take an Euler step of
    the PF-ODE dx/dt = (x - D(x; t)) / t to t_next, and average the slopes
    (Heun) when second_order. gamma and S_noise may be per-sample [N] tensors;
    factors are the host values 1 + gamma takes (default [1 + gamma]). The
    state stays in x's dtype.
    """
    t_hat = net.round_sigma(t_cur + gamma * t_cur)
    t_col = as_column(t_hat, x.ndim)
    if noise_every_step or isinstance(gamma, torch.Tensor) or gamma != 0:
        x_hat = x + as_column((t_hat ** 2 - t_cur ** 2).sqrt() * S_noise, x.ndim) * randn_like(x)
    else:
        x_hat = x
    step = Step(index, 1, tuple(t_cur_host * f for f in (factors or [1 + gamma])))
    d_cur = (x_hat - denoise(net, x_hat, t_hat, class_labels, step, x.dtype)) / t_col
    x_next = x_hat + (t_next - t_col) * d_cur
    if second_order:
        step = Step(index, 2, (t_next_host,))
        d_prime = (x_next - denoise(net, x_next, t_next, class_labels, step, x.dtype)) / t_next
        x_next = x_hat + (t_next - t_col) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, *, solver='heun', hooks=None,
                dtype=None, noise_every_step=None):
    """EDM's sampler over the denoiser `net`; images in `dtype`.

    solver: 'heun' (EDM's default) or 'euler' (no second-order correction).
    hooks: hooks.Hooks (or Hook(s), or a callable `(i, x, sigma) -> idx`);
    churn hooks act on steps inside [S_min, S_max].
    dtype, noise_every_step: the state's and the schedule's dtype, and whether
    churn noise is drawn at every step (EDM) or only where a step churns
    (EDM2); default: the net's `sampling_dtype` and `noise_every_step`, else
    EDM's float64 and True (EDM2's networks say float32 and False).
    Denoiser evaluations: 2 num_steps - 1 (heun), num_steps (euler).
    """
    if solver not in SOLVERS:
        raise ValueError(f'solver must be "heun" or "euler", got {solver!r}')
    hooks = as_hooks(hooks)
    hooks.check(solver, SERVED)
    dtype = getattr(net, 'sampling_dtype', torch.float64) if dtype is None else dtype
    noise_every_step = getattr(net, 'noise_every_step', True) if noise_every_step is None else noise_every_step
    t_steps, t_host = edm_schedule(net, num_steps, sigma_min, sigma_max, rho, device=latents.device, dtype=dtype)
    x = latents.to(dtype) * t_steps[0]
    for i in range(num_steps):
        gamma, noise, factors = churn_gamma(t_host[i], S_churn, num_steps, S_min, S_max), S_noise, None
        if S_min <= t_host[i] <= S_max:
            gamma, noise, factors = hooks.churn(i, num_steps, x, gamma, S_noise)
        last = i == num_steps - 1
        x = edm_step(net, x, t_steps[i], t_steps[i + 1], t_host[i], t_host[i + 1], class_labels, randn_like,
                     gamma, noise, factors, second_order=solver == 'heun' and not last, index=i,
                     noise_every_step=noise_every_step)
        if not last:
            idx = hooks.after_step(i, x, t_host[i + 1])
            if idx is not None:
                x, class_labels = take_rows(idx, x, class_labels)
    return x
