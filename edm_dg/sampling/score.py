"""The discriminator's score: the log density ratio log(d / (1 - d)) of noisy images (Kim et al., 2023).

A DG discriminator d(x_vp, tau) estimates p_data / p_model of images on the
linear VP SDE at time tau; EDM samples in sigma. Guidance (its gradient),
selection (its value), the benchmark and the NLL all score through
`log_ratio`, and all switch guidance on and off with one VP-time window test.
docs/compat.md §3.
"""

import contextlib

import torch

from .. import adm, vp

D_CLIP = 1e-5              # d is clipped to [D_CLIP, 1 - D_CLIP] before the logarithm (the release's)
LOG_RATIO_OUTSIDE = 1e7    # the score reported where guidance is off (the release's convention)

#----------------------------------------------------------------------------

def _param_dtype(module):
    """The floating dtype of a module's parameters; float32 for plain callables."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32

def _per_sample_sigma(sigma, x):
    """sigma (host float, 0-d or [N] tensor) as an [N] float64 tensor on x's device."""
    n = x.shape[0]
    if isinstance(sigma, torch.Tensor):
        return sigma.to(device=x.device, dtype=torch.float64).reshape(-1).expand(n)
    return torch.full([n], float(sigma), dtype=torch.float64, device=x.device)  # no blocking host-to-device copy

def log_ratio(discriminator, x, sigma, labels=None, *, grad=False, create_graph=False):
    """`log(d / (1 - d))` [N] of x (EDM scaling, any float dtype) at noise level sigma.

    The discriminator `(x_vp, tau, labels) -> d [N]` sees `x_vp = mean(tau) x`
    at the VP time tau of sigma, in its parameters' dtype (float32 for plain
    callables). The score comes in float32 (float64 for a double discriminator).
    grad=False: without autograd. grad=True: returns (score, d score / d x_vp);
    create_graph keeps that gradient differentiable in x (the NLL's divergence),
    with the attention run without fused kernels (they have no double backward).
    """
    sig = _per_sample_sigma(sigma, x)
    mean, tau = vp.sigma_to_vp(sig)
    mean = mean.reshape(-1, *([1] * (x.ndim - 1)))
    if not grad:
        with torch.no_grad():
            return log_ratio_vp(discriminator, (mean * x).to(_param_dtype(discriminator)), tau, labels)
    second_order = adm.math_attention() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), second_order:
        x_vp = (mean * x).to(_param_dtype(discriminator))
        if not (create_graph and x_vp.requires_grad):
            x_vp = x_vp.detach().requires_grad_(True)
        score = log_ratio_vp(discriminator, x_vp, tau, labels)
        g, = torch.autograd.grad(score.sum(), x_vp, create_graph=create_graph)
    return score.detach(), g

def log_ratio_vp(discriminator, x_vp, tau, labels=None):
    """`log(d / (1 - d))` [N] of VP-space images x_vp at VP time tau [N], d clipped (the core of `log_ratio`)."""
    d = discriminator(x_vp, tau, labels).reshape(-1)
    d = d.to(torch.promote_types(d.dtype, torch.float32)).clip(D_CLIP, 1 - D_CLIP)
    return torch.log(d / (1 - d))

def dg_correction(discriminator, x, sigma, class_labels=None, create_graph=False):
    """DG correction `corr = -(sigma^2 mean) grad_{x_vp} log_ratio` and `log_ratio` [N].

    D'(x; sigma) = D(x; sigma) - w corr is the guided denoiser; the correction
    comes in the dtype of the discriminator's score.
    """
    score, g = log_ratio(discriminator, x, sigma, class_labels, grad=True, create_graph=create_graph)
    sig = _per_sample_sigma(sigma, x)
    mean = vp.sigma_to_vp(sig)[0]
    scale = (sig ** 2 * mean).to(g.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return -scale * g, score

#----------------------------------------------------------------------------
# The VP-time window: guidance acts while time_min <= tau <= time_max, decided
# for the whole batch on its smallest tau (the release's rule).

def in_window(tau, time_min, time_max):
    """The window test, for host floats (a bool) and tensors (a bool tensor, no read-back)."""
    return (time_min <= tau) & (tau <= time_max)

def window_on_host(sigmas, time_min, time_max):
    """Whether the window holds for the smallest tau of these host-side sigma values."""
    tau = vp.sigma_to_tau(torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)).min().item()
    return bool(in_window(tau, time_min, time_max))

def window_mask(sigma, time_min, time_max, device=None):
    """The window's verdict for a sigma tensor as a 0-d bool tensor on its device (nothing read back)."""
    sigma = torch.as_tensor(sigma, device=device, dtype=torch.float64).reshape(-1)
    return in_window(vp.sigma_to_tau(sigma).min(), time_min, time_max)
