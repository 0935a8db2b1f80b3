"""Discriminator-guided EDM sampler (Kim et al., 2023) as a drop-in for EDM's `edm_sampler`.

`dg_sampler(net, latents, class_labels, randn_like, num_steps, ...)` takes EDM's
arguments in EDM's order and calls `randn_like` exactly as EDM does, so with no
discriminator (or zero weights) it returns EDM's images. Guidance adds
`-w sigma grad_x log(d / (1 - d))` to the ODE direction (COMPAT §3).

All control decisions (time window, boosting) are either taken on the host from
the deterministic step schedule or applied as tensor masks: nothing in the step
loop reads a tensor value back from the device.
"""

import numpy as np
import torch

from . import vp

#----------------------------------------------------------------------------

def step_schedule(num_steps, sigma_min, sigma_max, rho, round_sigma, device=None):
    """EDM's time steps t_0 > ... > t_{N-1} > t_N = 0 (float64), rounded by the net."""
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

def dg_correction(discriminator, x, sigma, class_labels=None, create_graph=False):
    """DG correction `-(sigma^2 mean) grad_{x_vp} log_ratio` (float32) and `log_ratio` [N].

    x is in EDM's unscaled space (any float dtype) and sigma a scalar or [N]
    tensor; the discriminator sees `x_vp = mean(tau) x` at VP time tau.
    create_graph keeps the result differentiable in x (for NLL's divergence).
    """
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0])
    mean, tau = vp.sigma_to_vp(sigma)
    with torch.enable_grad():
        x_vp = (mean.reshape(-1, 1, 1, 1) * x).float()
        x_vp = x_vp if create_graph else x_vp.detach().requires_grad_(True)
        d = discriminator(x_vp, tau, class_labels).reshape(-1)
        d = d.float().clip(1e-5, 1 - 1e-5)
        log_ratio = torch.log(d / (1 - d))
        grad, = torch.autograd.grad(log_ratio.sum(), x_vp, create_graph=create_graph)
    scale = (sigma ** 2 * mean).to(torch.float32).reshape(-1, 1, 1, 1)
    return -scale * grad, log_ratio.detach()

def _in_window(sigmas, time_min, time_max):
    """Host-side test of COMPAT §3's window on tau.min() for candidate sigma values."""
    tau = vp.sigma_to_tau(torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)).min().item()
    return time_min <= tau <= time_max

#----------------------------------------------------------------------------

def dg_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    *,
    solver='heun',
    discriminator=None, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0,
    time_min=0.01, time_max=1.0, disc_labels=None,
    boosting=False, boost_S_churn=4.0, boost_S_noise=1.0, boost_period=5, boost_weight_period=2,
):
    """EDM's stochastic Heun sampler with optional discriminator guidance.

    discriminator: callable `(x_vp, tau, class_labels) -> d in (0,1)` of shape [N].
    dg_weight_1st_order / dg_weight_2nd_order: guidance weights w1 (Euler
    evaluation at t_hat) and w2 (Heun evaluation at t_next).
    time_min / time_max: VP-time window; guidance is off for the batch outside it.
    disc_labels: labels for the discriminator (default: class_labels).
    boosting: per-sample churn (boost_S_churn, boost_S_noise) every
    `boost_period` steps and doubled correction every `boost_weight_period`
    steps for samples the discriminator judges fake (log_ratio < 0).
    solver: 'heun' (EDM's default) or 'euler' (no second-order correction).
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'solver must be "heun" or "euler", got {solver!r}')
    if discriminator is None:
        dg_weight_1st_order = dg_weight_2nd_order = 0.0
    if disc_labels is None:
        disc_labels = class_labels
    boosting = bool(boosting) and dg_weight_1st_order != 0

    # Adjust noise levels based on what's supported by the network.
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # Time step discretization; a host copy drives the host-side decisions.
    t_steps = step_schedule(num_steps, sigma_min, sigma_max, rho, net.round_sigma, device=latents.device)
    t_host = t_steps.cpu()
    n = latents.shape[0]
    bshape = (-1,) + (1,) * (latents.ndim - 1)

    # Main sampling loop.
    x_next = latents.to(torch.float64) * t_steps[0]
    log_ratio = torch.full([n], float('inf'), dtype=torch.float32, device=latents.device)
    gamma_max = np.sqrt(2) - 1
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])): # 0, ..., N-1
        x_cur = x_next
        t_cur_h, t_next_h = float(t_host[i]), float(t_host[i + 1])
        in_churn = S_min <= t_cur_h <= S_max

        # Increase noise temporarily.
        gamma = min(S_churn / num_steps, gamma_max) if in_churn else 0
        if boosting and i % boost_period == 0 and in_churn:
            boosted = log_ratio < 0
            gamma_b = min(boost_S_churn / num_steps, gamma_max)
            gamma_vec = torch.where(boosted, gamma_b, gamma).to(torch.float64)
            noise_vec = torch.where(boosted, boost_S_noise, S_noise).to(torch.float64)
            t_hat = net.round_sigma(t_cur + gamma_vec * t_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt().reshape(bshape) * noise_vec.reshape(bshape) * randn_like(x_cur)
            t_hat_candidates = [t_cur_h * (1 + gamma), t_cur_h * (1 + gamma_b)]
            t_hat_div = t_hat.reshape(bshape)
        else:
            t_hat = net.round_sigma(t_cur + gamma * t_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
            t_hat_candidates = [t_cur_h * (1 + gamma)]
            t_hat_div = t_hat

        # Euler step.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat_div
        if dg_weight_1st_order != 0:
            inside = [_in_window(t, time_min, time_max) for t in t_hat_candidates]
            if any(inside):
                correction, lr = dg_correction(discriminator, x_hat, t_hat, disc_labels)
                if not all(inside): # Boosted and plain samples straddle the window edge.
                    tau_min = vp.sigma_to_tau(t_hat.reshape(-1)).min()
                    ok = (time_min <= tau_min) & (tau_min <= time_max)
                    correction = correction * ok.to(correction.dtype)
                    lr = torch.where(ok, lr, torch.full_like(lr, 1e7))
                log_ratio = lr
                if boosting and i % boost_weight_period == 0:
                    correction = correction * torch.where(log_ratio < 0, 2.0, 1.0).to(correction.dtype).reshape(bshape)
                d_cur = d_cur + dg_weight_1st_order * (correction / t_hat_div)
            else:
                log_ratio = torch.full_like(log_ratio, 1e7)
        x_next = x_hat + (t_next - t_hat_div) * d_cur

        # Apply 2nd order correction.
        if solver == 'heun' and i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            if dg_weight_2nd_order != 0 and _in_window([t_next_h], time_min, time_max):
                correction, _ = dg_correction(discriminator, x_next, t_next, disc_labels)
                d_prime = d_prime + dg_weight_2nd_order * (correction / t_next)
            x_next = x_hat + (t_next - t_hat_div) * (0.5 * d_cur + 0.5 * d_prime)

    return x_next
