"""DPM-Solver++(2M) (Lu et al. 2022; multistep, data prediction) on EDM's schedule."""

import math

import torch

from .denoisers import Step, denoise
from .hooks import as_hooks, take_rows
from .schedule import edm_schedule

SERVED = ('after_step',)

def dpmpp2m_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, *, hooks=None,
):
    """DPM-Solver++(2M) over the denoiser `net`; float64 images.

    With lambda = -log(sigma) and h = lambda_next - lambda_cur, a step is
    `x_next = (sigma_next / sigma_cur) x + (1 - e^{-h}) D_hat`, where D_hat is
    the denoised output at the first step and afterwards the second-order
    combination `(1 + 1/(2r)) D_cur - 1/(2r) D_prev` with r = h_prev / h.
    The step to sigma = 0 returns the denoised output. Deterministic:
    randn_like is not used. Denoiser evaluations: num_steps. hooks: after_step
    only (no churn); a reordering also reorders the previous denoised output.
    """
    del randn_like
    hooks = as_hooks(hooks)
    hooks.check('dpmpp2m', SERVED)
    t_dev, t_host = edm_schedule(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)
    x = latents.to(torch.float64) * t_dev[0]
    prev_denoised, h_prev = None, None
    for k in range(num_steps):
        denoised = denoise(net, x, t_dev[k], class_labels, Step(k, 1, (t_host[k],)))
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
        idx = hooks.after_step(k, x, s_next)
        if idx is not None:
            x, prev_denoised, class_labels = take_rows(idx, x, prev_denoised, class_labels)
    return x
