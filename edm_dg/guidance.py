"""Discriminator guidance as a transform of the denoiser (Kim et al., ICML 2023).

Adding `w * corr / sigma` to the probability-flow direction `(x - D) / sigma`
is the same as sampling with the denoiser

    D'(x; sigma) = D(x; sigma) - w * corr,   corr = -sigma^2 grad_x log(d / (1 - d)),

so any sampler that takes an EDM-style denoiser can use DG: EDM's `edm_sampler`,
k-diffusion's `sample_*` functions, Restart, multistep solvers, and this
project's `dg_sampler`. The math is in docs/compat.md §3.
"""

import contextlib

import torch

from . import adm, vp

LOG_RATIO_OUTSIDE = 1e7  # log_ratio reported where guidance is off (the release's convention)

#----------------------------------------------------------------------------

def dg_correction(discriminator, x, sigma, class_labels=None, create_graph=False):
    """DG correction `-(sigma^2 mean) grad_{x_vp} log_ratio` and `log_ratio` [N].

    x is in EDM's unscaled space (any float dtype) and sigma a scalar or [N]
    tensor; the discriminator sees `x_vp = mean(tau) x` at VP time tau, in its
    parameters' dtype (float32 unless it was made double). The correction comes
    in that dtype. create_graph keeps the result differentiable in x (for the
    NLL's divergence); the attention then runs without fused kernels, which
    have no double backward.
    """
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1).expand(x.shape[0])
    mean, tau = vp.sigma_to_vp(sigma)
    second_order = adm.math_attention() if create_graph else contextlib.nullcontext()
    with torch.enable_grad(), second_order:
        x_vp = (mean.reshape(-1, 1, 1, 1) * x).to(_param_dtype(discriminator))
        if not (create_graph and x_vp.requires_grad):
            x_vp = x_vp.detach().requires_grad_(True)
        d = discriminator(x_vp, tau, class_labels).reshape(-1)
        d = d.to(torch.promote_types(d.dtype, torch.float32)).clip(1e-5, 1 - 1e-5)
        log_ratio = torch.log(d / (1 - d))
        grad, = torch.autograd.grad(log_ratio.sum(), x_vp, create_graph=create_graph)
    scale = (sigma ** 2 * mean).to(grad.dtype).reshape(-1, 1, 1, 1)
    return -scale * grad, log_ratio.detach()

def _param_dtype(module):
    """The floating dtype of a module's parameters; float32 for plain callables."""
    if isinstance(module, torch.nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32

def window_on_host(sigmas, time_min, time_max):
    """Whether the VP-time window holds for the smallest tau of these host-side sigma values."""
    tau = vp.sigma_to_tau(torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)).min().item()
    return time_min <= tau <= time_max

def _host_sigmas(sigma):
    """sigma's values when reading them costs no device synchronisation, else None."""
    if isinstance(sigma, (int, float)):
        return [float(sigma)]
    if isinstance(sigma, torch.Tensor) and sigma.device.type == 'cpu':
        return sigma.detach().reshape(-1).tolist()
    return None

#----------------------------------------------------------------------------

class DGDenoiser(torch.nn.Module):
    """An EDM-style denoiser with discriminator guidance: `D'(x; sigma) = D(x; sigma) - w * corr`.

    Called as EDM's samplers call a network, `den(x, sigma, class_labels)`, or as
    k-diffusion calls a model, `den(x, sigma[N], class_labels=...)` under
    `torch.no_grad()`; returns the guided denoised image in x's dtype. Carries the
    wrapped net's `sigma_min`, `sigma_max`, `round_sigma`, `img_resolution`,
    `img_channels` and `label_dim`.

    Guidance is off for the whole batch (the release's rule) unless the VP time of
    the smallest sigma lies in [time_min, time_max]. Where sigma is a host value
    (a float, a CPU tensor, or the `sigma_hint` values a sampler knows on the
    host) that decision is taken without touching the device and the
    discriminator is skipped outside the window; for a sigma on an accelerator
    the correction is computed and masked, so no value is read back.

    After each call `log_ratio` holds the discriminator's `log(d / (1 - d))` [N]
    (LOG_RATIO_OUTSIDE where guidance was off), for boosting and selection.
    Calls with x requiring grad (inside `torch.enable_grad()`) return a result
    differentiable in x, including through the discriminator (the NLL's divergence).
    """

    def __init__(self, net, discriminator, w, time_min=0.01, time_max=1.0, disc_labels=None):
        super().__init__()
        self.net = net
        self.discriminator = discriminator
        self.w = w
        self.time_min = time_min
        self.time_max = time_max
        self.disc_labels = disc_labels
        self.log_ratio = None

    # The attributes samplers read from an EDM network.
    sigma_min = property(lambda self: self.net.sigma_min)
    sigma_max = property(lambda self: self.net.sigma_max)
    img_resolution = property(lambda self: self.net.img_resolution)
    img_channels = property(lambda self: self.net.img_channels)
    label_dim = property(lambda self: self.net.label_dim)

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def active(self):
        """Whether this denoiser guides at all (a discriminator and a non-zero weight)."""
        return self.discriminator is not None and not (isinstance(self.w, (int, float)) and self.w == 0)

    def forward(self, x, sigma, class_labels=None, *, sigma_hint=None, double_fake=False, **model_kwargs):
        """Guided denoised image of x at noise level sigma (a float, 0-d or [N] tensor).

        sigma_hint: host-side values sigma takes (e.g. the two noise levels of a
        boosted step), for the window decision. double_fake: double the correction
        of samples the discriminator judges fake (log_ratio < 0), the release's
        boosting rule.
        """
        denoised = self.net(x, sigma, class_labels, **model_kwargs).to(x.dtype)
        n = x.shape[0]
        if not self.active():
            self.log_ratio = torch.full([n], LOG_RATIO_OUTSIDE, device=x.device)
            return denoised
        hosts = _host_sigmas(sigma) if sigma_hint is None else [float(s) for s in sigma_hint]
        inside = None
        if hosts is not None:
            inside = [window_on_host([s], self.time_min, self.time_max) for s in hosts]
            if not any(inside):
                self.log_ratio = torch.full([n], LOG_RATIO_OUTSIDE, device=x.device)
                return denoised
        labels = class_labels if self.disc_labels is None else self.disc_labels
        create_graph = torch.is_grad_enabled() and x.requires_grad
        corr, log_ratio = dg_correction(self.discriminator, x, sigma, labels, create_graph=create_graph)
        if inside is None or not all(inside):  # The window's verdict, as a tensor mask.
            tau_min = vp.sigma_to_tau(torch.as_tensor(sigma, device=x.device, dtype=torch.float64).reshape(-1)).min()
            ok = (self.time_min <= tau_min) & (tau_min <= self.time_max)
            corr = corr * ok.to(corr.dtype)
            log_ratio = torch.where(ok, log_ratio, torch.full_like(log_ratio, LOG_RATIO_OUTSIDE))
        if double_fake:
            corr = corr * torch.where(log_ratio < 0, 2.0, 1.0).to(corr.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        self.log_ratio = log_ratio
        w = torch.as_tensor(self.w, device=x.device, dtype=x.dtype)
        if w.ndim == 1:
            w = w.reshape(-1, *([1] * (x.ndim - 1)))
        return denoised - w * corr.to(x.dtype)

#----------------------------------------------------------------------------

def guided(net, discriminator=None, w=0.0, **kwargs):
    """`DGDenoiser(net, discriminator, w, ...)` where it guides, else `net` itself."""
    if discriminator is None or (isinstance(w, (int, float)) and w == 0):
        return net
    return DGDenoiser(net, discriminator, w, **kwargs)
