"""The one time-conversion module: EDM noise level sigma <-> linear VP time tau.

The ADM classifier of the DG release was trained on the linear VP SDE
(beta_0 = 0.1, beta_1 = 20); EDM samples in sigma. docs/compat.md §3 and §5.
"""

import math

import numpy as np
import torch

BETA_0 = 0.1
BETA_1 = 20.0
T_MIN = 1e-5

def log_mean(tau, beta_0=BETA_0, beta_1=BETA_1):
    """log of the VP mean coefficient alpha(tau)."""
    return -0.25 * tau ** 2 * (beta_1 - beta_0) - 0.5 * tau * beta_0

def mean(tau, beta_0=BETA_0, beta_1=BETA_1):
    return torch.exp(log_mean(tau, beta_0, beta_1))

def std(tau, beta_0=BETA_0, beta_1=BETA_1):
    return torch.sqrt(1.0 - torch.exp(2.0 * log_mean(tau, beta_0, beta_1)))

def sigma_to_tau(sigma, beta_0=BETA_0, beta_1=BETA_1):
    """VP time whose marginal matches the EDM noise level sigma (after scaling by mean)."""
    sigma = torch.as_tensor(sigma)
    return (-beta_0 + torch.sqrt(beta_0 ** 2 + 2.0 * (beta_1 - beta_0) * torch.log1p(sigma ** 2))) / (beta_1 - beta_0)

def tau_to_sigma(tau, beta_0=BETA_0, beta_1=BETA_1):
    tau = torch.as_tensor(tau)
    return torch.sqrt(torch.expm1(-2.0 * log_mean(tau, beta_0, beta_1)))

def sigma_to_vp(sigma, beta_0=BETA_0, beta_1=BETA_1):
    """(mean(tau), tau) for an EDM noise level: the classifier sees mean * x at time tau."""
    tau = sigma_to_tau(sigma, beta_0, beta_1)
    return mean(tau, beta_0, beta_1), tau

def tau_to_cosine_time(tau, s=0.008, beta_0=BETA_0, beta_1=BETA_1):
    """Map linear-VP time to the cosine-schedule time of a 64x64 ADM classifier."""
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (1 + s) * 2 / math.pi * torch.arccos(math.sqrt(f0) * mean(tau, beta_0, beta_1)) - s

#----------------------------------------------------------------------------
# Importance sampling of VP time for discriminator training (docs/compat.md §5).

def _integral_beta(t, beta_0=BETA_0, beta_1=BETA_1):
    return beta_0 * t + 0.5 * (beta_1 - beta_0) * t ** 2

def _antiderivative(t, beta_0=BETA_0, beta_1=BETA_1):
    b = _integral_beta(torch.as_tensor(t, dtype=torch.float64), beta_0, beta_1)
    return torch.log(-torch.expm1(-b)) + b

def importance_time(u, t_min=T_MIN, beta_0=BETA_0, beta_1=BETA_1):
    """Map u ~ U(0,1) to VP time with density proportional to the likelihood weighting."""
    f_min = _antiderivative(t_min, beta_0, beta_1)
    z = _antiderivative(1.0, beta_0, beta_1) - f_min
    u = torch.as_tensor(u)
    b = torch.log1p(torch.exp(z.to(u.dtype) * u + f_min.to(u.dtype)))
    return (-beta_0 + torch.sqrt(beta_0 ** 2 + 2.0 * (beta_1 - beta_0) * b)) / (beta_1 - beta_0)

def perturb(x, tau, eps):
    """x_tau = mean(tau) x + std(tau) eps, per sample."""
    m = mean(tau).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    s = std(tau).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return m * x + s * eps

def to_float(images_u8):
    """uint8 [N,C,H,W] -> float32 in [-1, 1] (generate_dg.py's inverse up to rounding); float data (latents:
    edm_dg.latents) are already in the network's space and pass as float32."""
    if images_u8.is_floating_point():
        return images_u8.to(torch.float32)
    return images_u8.to(torch.float32) / 127.5 - 1

def noisy_batch(images_u8, gen):
    """(x_tau, tau) for uint8 images or float latents: importance-sampled VP time, x_tau = mean x + std eps (training's inputs)."""
    x = to_float(images_u8)
    u = torch.rand(x.shape[0], generator=gen, device=x.device)
    tau = importance_time(u).to(torch.float32)
    eps = torch.randn(x.shape, generator=gen, device=x.device)
    return perturb(x, tau, eps), tau

def seeded_generator(device, *keys):
    """A torch generator on `device` seeded from the integer keys (e.g. seed, epoch, rank) via numpy's SeedSequence."""
    g = torch.Generator(device)
    g.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))
    return g
