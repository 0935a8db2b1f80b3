"""EDM's stochastic Heun sampler with discriminator guidance (Kim et al., 2023): `dg_sampler`.

`dg_sampler(net, latents, class_labels, randn_like, num_steps, ...)` takes EDM's
arguments in EDM's order and calls `randn_like` exactly as EDM does, so with no
discriminator (or zero weights) it returns EDM's images. Guidance enters as two
guided denoisers (edm_dg.guidance.DGDenoiser): weight w1 at the Euler
evaluation, w2 at the Heun evaluation. Boosting (the release's conditional
recipe) is a per-sample churn hook plus a doubled correction for samples the
discriminator judges fake; docs/compat.md §3.

All control decisions (time window, boosting) are either taken on the host from
the deterministic step schedule or applied as tensor masks: nothing in the step
loop reads a tensor value back from the device.
"""

import numpy as np
import torch

from .guidance import DGDenoiser

GAMMA_MAX = np.sqrt(2) - 1  # EDM's cap on the churn factor gamma

#----------------------------------------------------------------------------

def step_schedule(num_steps, sigma_min, sigma_max, rho, round_sigma, device=None):
    """EDM's time steps t_0 > ... > t_{N-1} > t_N = 0 (float64), rounded by the net."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t_steps = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    return torch.cat([round_sigma(t_steps), torch.zeros_like(t_steps[:1])])

def edm_schedule(net, num_steps, sigma_min=0.002, sigma_max=80, rho=7, device=None):
    """EDM's noise levels t_0 > ... > t_{N-1} > t_N = 0 for `net`.

    Returns (device tensor [N+1] float64, host list of N+1 floats); the host
    copy is made once here, before any sampling loop starts.
    """
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f'num_steps must be an integer >= 2, got {num_steps!r}')
    lo = max(float(sigma_min), float(net.sigma_min))
    hi = min(float(sigma_max), float(net.sigma_max))
    if not 0 < lo < hi:
        raise ValueError(f'need 0 < sigma_min < sigma_max after clamping to the net, got {lo} and {hi}')
    t_dev = step_schedule(int(num_steps), lo, hi, rho, net.round_sigma, device=device).to(torch.float64)
    t_dev = t_dev.reshape(-1)
    return t_dev, [float(v) for v in t_dev.detach().cpu().tolist()]

def take_rows(idx, *values):
    """Each value with its rows reordered by idx ([N] LongTensor); None and scalars pass through."""
    return tuple(v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for v in values)

def _as_column(v, ndim):
    """A per-sample [N] tensor shaped to broadcast over images; scalars pass through."""
    return v.reshape(-1, *([1] * (ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim == 1 else v

class Boosting:
    """The release's boosting as a churn hook: every `period` steps, samples whose last
    first-order log_ratio is negative get churn `S_churn` and noise `S_noise`; every
    `weight_period` steps their correction is doubled."""

    def __init__(self, S_churn=4.0, S_noise=1.0, period=5, weight_period=2):
        self.S_churn, self.S_noise, self.period, self.weight_period = S_churn, S_noise, period, weight_period

    def churn(self, i, num_steps, gamma, S_noise, log_ratio):
        """(gamma, S_noise, host candidates of 1 + gamma) for step i; per-sample tensors on boosted steps."""
        if i % self.period != 0:
            return gamma, S_noise, [1 + gamma]
        boosted = log_ratio < 0
        gamma_b = min(self.S_churn / num_steps, GAMMA_MAX)
        gamma_vec = torch.where(boosted, gamma_b, gamma).to(torch.float64)
        noise_vec = torch.where(boosted, self.S_noise, S_noise).to(torch.float64)
        return gamma_vec, noise_vec, [1 + gamma, 1 + gamma_b]

    def doubles(self, i):
        return i % self.weight_period == 0

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
    resample=None,
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
    resample: optional hook `(i, x, sigma) -> idx or None`, called after main
    step i < num_steps - 1 with the state at host noise level sigma = t_{i+1};
    an [N] index tensor reorders every per-sample state (x, the boosting
    log_ratio, class and discriminator labels). edm_dg.selection.
    """
    if solver not in ('heun', 'euler'):
        raise ValueError(f'solver must be "heun" or "euler", got {solver!r}')
    window = dict(time_min=time_min, time_max=time_max, disc_labels=disc_labels)
    den1 = DGDenoiser(net, discriminator, dg_weight_1st_order, **window)
    den2 = DGDenoiser(net, discriminator, dg_weight_2nd_order, **window)
    boost = Boosting(boost_S_churn, boost_S_noise, boost_period, boost_weight_period) if boosting and den1.active() else None

    t_steps, t_host = edm_schedule(net, num_steps, sigma_min, sigma_max, rho, device=latents.device)  # t_host drives every host-side decision
    log_ratio = torch.full([latents.shape[0]], float('inf'), device=latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        in_churn = S_min <= t_host[i] <= S_max

        # Increase noise temporarily (per sample on boosted steps).
        gamma, noise, factors = (min(S_churn / num_steps, GAMMA_MAX) if in_churn else 0), S_noise, None
        if boost is not None and in_churn:
            gamma, noise, factors = boost.churn(i, num_steps, gamma, S_noise, log_ratio)
        factors = factors or [1 + gamma]
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        t_col = _as_column(t_hat, x_cur.ndim)
        x_hat = x_cur + _as_column((t_hat ** 2 - t_cur ** 2).sqrt() * noise, x_cur.ndim) * randn_like(x_cur)

        # Euler step with the first-order guided denoiser.
        denoised = den1(x_hat, t_hat, class_labels, sigma_hint=[t_host[i] * f for f in factors],
                        double_fake=boost is not None and boost.doubles(i))
        log_ratio = den1.log_ratio
        d_cur = (x_hat - denoised) / t_col
        x_next = x_hat + (t_next - t_col) * d_cur

        # Heun correction with the second-order guided denoiser.
        if solver == 'heun' and i < num_steps - 1:
            denoised = den2(x_next, t_next, class_labels, sigma_hint=[t_host[i + 1]])
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_col) * (0.5 * d_cur + 0.5 * d_prime)

        # Selection among particles (a host decision of the hook).
        if resample is not None and i < num_steps - 1:
            idx = resample(i, x_next, t_host[i + 1])
            if idx is not None:
                x_next, log_ratio, class_labels = take_rows(idx, x_next, log_ratio, class_labels)
                den1.disc_labels, den2.disc_labels = take_rows(idx, den1.disc_labels, den2.disc_labels)
    return x_next
