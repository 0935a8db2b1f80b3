"""Negative log-likelihood in bits/dim by the probability-flow ODE (Song et al., 2021) in EDM's sigma.

    dx/dsigma = f(x, sigma) = (x - D(x; sigma)) / sigma  [+ w * DG correction / sigma]
    log p_0(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f dsigma

integrated from the data at sigma_min to sigma_max with Heun's method on EDM's
rho-spaced grid; div f by Hutchinson's estimator (Rademacher probes, one per
image per integration). Images are uniformly dequantised: x = (u8 + U) / 128 - 1,
so bits/dim = (-log p(x) + D log 128) / (D log 2).
"""

import math

import torch

from .sampler import dg_correction, step_schedule

def drift(net, x, sigma, class_labels=None, discriminator=None, w=0.0, disc_labels=None):
    """The probability-flow ODE's dx/dsigma, with the DG term when w != 0 (differentiable in x)."""
    d = (x - net(x, sigma, class_labels).to(x.dtype)) / sigma
    if discriminator is not None and w != 0:
        corr, _ = dg_correction(discriminator, x, sigma, disc_labels, create_graph=True)
        d = d + w * corr.to(x.dtype) / sigma
    return d

def _drift_and_div(net, x, sigma, eps, **kw):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        f = drift(net, x, sigma, **kw)
        jvp, = torch.autograd.grad(f, x, eps)
    return f.detach(), (jvp * eps).flatten(1).sum(1).detach()

def log_likelihood(net, x, class_labels=None, *, num_steps=128, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                   generator=None, discriminator=None, w=0.0, disc_labels=None):
    """log p(x) in nats per image [N] for continuous x in EDM's data space (float64 integration)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    sigmas = step_schedule(num_steps + 1, sigma_min, sigma_max, rho, net.round_sigma, device=x.device)[:-1].flip(0)
    eps = (torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1)
    kw = dict(class_labels=class_labels, discriminator=discriminator, w=w, disc_labels=disc_labels)
    x = x.to(torch.float64)
    div_int = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    f, div = _drift_and_div(net, x, sigmas[0], eps, **kw)
    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        x_e = x + (s1 - s0) * f
        f_e, div_e = _drift_and_div(net, x_e, s1, eps, **kw)
        x = x + (s1 - s0) * 0.5 * (f + f_e)
        div_int += (s1 - s0) * 0.5 * (div + div_e)
        f, div = _drift_and_div(net, x, s1, eps, **kw)
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
