"""Negative log-likelihood in bits/dim by the probability-flow ODE (Song et al., 2021) in EDM's sigma.

    dx/dsigma = f(x, sigma) = (x - D(x; sigma)) / sigma  [+ w * corr(x, sigma) / sigma  inside the DG window]
    log p_0(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f dsigma

corr = -(sigma^2 mean) grad_{x_vp} log(d / (1 - d)) is the sampler's DG correction
(x_vp = mean(tau) x at the VP time tau of sigma); as in the sampler it is applied
only while time_min <= tau <= time_max and is exactly zero elsewhere.

Integrated from the data at sigma_min to sigma_max with Heun's method on EDM's
rho-spaced grid; div f by Hutchinson's estimator (Rademacher probes, one per
image per integration). The divergence of the DG term differentiates a gradient
of the discriminator, so `dg_correction(create_graph=True)` runs its attention
without the fused kernels (they have no double backward). Images are uniformly dequantised:
x = (u8 + U) / 128 - 1, so bits/dim = (-log p(x) + D log 128) / (D log 2).
"""

import math

import torch

from .sampling.denoisers import Step, denoise, guided
from .sampling.schedule import edm_schedule
from .sampling.score import dg_correction, window_on_host

#----------------------------------------------------------------------------
# The drift: the PF-ODE direction of the (guided) denoiser.

def dg_drift_term(discriminator, x, sigma, disc_labels=None, w=1.0, time_min=0.01, time_max=1.0):
    """`w * corr / sigma` with a graph back to x (so its divergence can be taken), or None outside the window."""
    if discriminator is None or w == 0 or not window_on_host(torch.as_tensor(sigma).cpu(), time_min, time_max):
        return None
    corr, _ = dg_correction(discriminator, x, sigma, disc_labels, create_graph=True)
    return w * corr.to(x.dtype) / sigma

def drift(net, x, sigma, class_labels=None, discriminator=None, w=0.0, disc_labels=None, time_min=0.01, time_max=1.0,
          sigma_host=None):
    """The probability-flow ODE's dx/dsigma `(x - D'(x; sigma)) / sigma` of the guided denoiser
    D' = D - w corr (DGDenoiser, the sampler's transform), differentiable in x.

    sigma_host: sigma's value on the host (default: read from sigma), for the window decision.
    """
    den = guided(net, discriminator, w, time_min=time_min, time_max=time_max, disc_labels=disc_labels)
    if sigma_host is None and den is not net:
        sigma_host = torch.as_tensor(sigma).reshape(-1).cpu().tolist()
    hosts = sigma_host if sigma_host is None or isinstance(sigma_host, (list, tuple)) else [sigma_host]
    step = Step(None, 1, None if hosts is None else tuple(float(s) for s in hosts))
    return (x - denoise(den, x, sigma, class_labels, step).to(x.dtype)) / sigma

def hutchinson(fn, x, eps):
    """(fn(x), eps^T (d fn / d x) eps per image), both detached."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = fn(x)
        jvp, = torch.autograd.grad(f, x, eps)
    return f.detach(), (jvp * eps).flatten(1).sum(1).detach()

#----------------------------------------------------------------------------

def log_likelihood(net, x, class_labels=None, *, num_steps=128, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                   generator=None, discriminator=None, w=0.0, disc_labels=None, time_min=0.01, time_max=1.0):
    """log p(x) in nats per image [N] for continuous x in EDM's data space (float64 integration).

    discriminator / w / disc_labels / time_min / time_max: DG in the drift, as
    `dg_sampler`'s discriminator / dg_weight_1st_order / disc_labels / window.
    """
    if time_min > time_max:
        raise ValueError(f'time_min={time_min} is above time_max={time_max}; pass time_min <= time_max')
    levels, host = edm_schedule(net, num_steps + 1, sigma_min, sigma_max, rho, device=x.device)
    sigmas, host = levels[:-1].flip(0), host[:-1][::-1]  # ascending, without the final 0
    eps = (torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(torch.float64) * 2 - 1)
    kw = dict(class_labels=class_labels, discriminator=discriminator, w=w, disc_labels=disc_labels,
              time_min=time_min, time_max=time_max)
    f_and_div = lambda x, k: hutchinson(lambda z: drift(net, z, sigmas[k], sigma_host=host[k], **kw), x, eps)
    x = x.to(torch.float64)
    div_int = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    f, div = f_and_div(x, 0)
    for i in range(num_steps):
        s0, s1 = sigmas[i], sigmas[i + 1]
        f_e, div_e = f_and_div(x + (s1 - s0) * f, i + 1)
        x = x + (s1 - s0) * 0.5 * (f + f_e)
        div_int += (s1 - s0) * 0.5 * (div + div_e)
        if i < num_steps - 1:  # The drift at the corrected point starts the next step.
            f, div = f_and_div(x, i + 1)
    dims = x[0].numel()
    prior = -0.5 * (x ** 2).flatten(1).sum(1) / sigmas[-1] ** 2 - dims * (torch.log(sigmas[-1]) + 0.5 * math.log(2 * math.pi))
    return prior + div_int

def dequantize(images_u8, generator=None):
    """Uniform dequantisation into [-1, 1]: (u8 + U(0,1)) / 128 - 1."""
    u = torch.rand(images_u8.shape, generator=generator, device=images_u8.device, dtype=torch.float64)
    return (images_u8.to(torch.float64) + u) / 128 - 1

def bits_per_dim(log_p, dims):
    """bits/dim of uint8 data from log p of the dequantised [-1,1] image (Jacobian 1/128 per dim)."""
    return (-log_p + dims * math.log(128)) / (dims * math.log(2))
