"""Denoisers: the protocol every solver calls, and discriminator guidance as a transform of it.

A denoiser is anything called as EDM's samplers call a network,
`den(x, sigma, class_labels) -> D(x; sigma)`, with `sigma_min`, `sigma_max`
and `round_sigma(sigma)` (plus `img_resolution`, `img_channels`, `label_dim`
where commands need them): an EDM network, or a chain of wrappers around one.
Two optional attributes:

- `nfe`: score-network evaluations one call costs (default 1), so that a
  chain that calls two networks is counted right (`nfe_of`);
- `takes_step = True`: the solver passes `step=Step(index, order, sigma)`,
  the host-side facts of the call (main step index, 1 for the first
  evaluation of a step and 2 for Heun's correction, and the host values the
  call's sigma takes), so a wrapper decides on the host without reading the
  device.

Guidance (Kim et al., ICML 2023) adds `w * corr / sigma` to the
probability-flow direction `(x - D) / sigma`; that is sampling with the denoiser

    D'(x; sigma) = D(x; sigma) - w * corr,   corr = -sigma^2 grad_x log(d / (1 - d)),

so any sampler that takes an EDM-style denoiser can use DG: EDM's
`edm_sampler`, k-diffusion's `sample_*` functions and every solver here.
docs/compat.md §3.
"""

from collections import namedtuple

import torch

from .hooks import SampleState, as_column
from .score import LOG_RATIO_OUTSIDE, dg_correction, window_mask, window_on_host

Step = namedtuple('Step', ['index', 'order', 'sigma'])
Step.__doc__ = """Host-side facts of one denoiser call: main step `index` (None outside a sampler), `order`
(1: first evaluation of the step, 2: Heun's correction) and `sigma`, the host floats the call's sigma takes."""

def nfe_of(den, sigma=None):
    """Score-network evaluations one call of `den` costs; at the host noise levels `sigma` (a tuple,
    as `Step.sigma`) where the denoiser says (`nfe_at`, e.g. a guide only inside its interval)."""
    if sigma is not None and hasattr(den, 'nfe_at'):
        return den.nfe_at(tuple(sigma))
    return getattr(den, 'nfe', 1)

def denoise(den, x, sigma, class_labels, step, dtype=torch.float64):
    """`den(x, sigma, class_labels)` in `dtype`, passing `step` to denoisers that take it."""
    if getattr(den, 'takes_step', False):
        return den(x, sigma, class_labels, step=step).to(dtype)
    return den(x, sigma, class_labels).to(dtype)

def _host_sigmas(sigma):
    """sigma's values when reading them costs no device synchronisation, else None."""
    if isinstance(sigma, (int, float)):
        return [float(sigma)]
    if isinstance(sigma, torch.Tensor) and sigma.device.type == 'cpu':
        return sigma.detach().reshape(-1).tolist()
    return None

#----------------------------------------------------------------------------

class Denoiser(torch.nn.Module):
    """Base of the denoiser wrappers: carries the wrapped net's attributes and passes `step` on.

    Subclasses implement `forward(x, sigma, class_labels=None, *, step=None)`
    and call the wrapped denoiser through `self.inner`.
    """

    takes_step = True

    def __init__(self, net):
        super().__init__()
        self.net = net

    sigma_min = property(lambda self: self.net.sigma_min)
    sigma_max = property(lambda self: self.net.sigma_max)
    img_resolution = property(lambda self: self.net.img_resolution)
    img_channels = property(lambda self: self.net.img_channels)
    label_dim = property(lambda self: self.net.label_dim)
    nfe = property(lambda self: nfe_of(self.net))
    sampling_dtype = property(lambda self: getattr(self.net, 'sampling_dtype', torch.float64))  # edm.edm_sampler's conventions
    noise_every_step = property(lambda self: getattr(self.net, 'noise_every_step', True))

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def nfe_at(self, sigma):
        """Evaluations of a call at host levels sigma: the wrapped net's, where a subclass keeps its `nfe`."""
        return nfe_of(self.net, sigma) if type(self).nfe is Denoiser.nfe else self.nfe

    def inner(self, x, sigma, class_labels=None, step=None, **model_kwargs):
        """The wrapped denoiser's output in x's dtype."""
        if getattr(self.net, 'takes_step', False):
            return self.net(x, sigma, class_labels, step=step, **model_kwargs).to(x.dtype)
        return self.net(x, sigma, class_labels, **model_kwargs).to(x.dtype)

#----------------------------------------------------------------------------

class DGDenoiser(Denoiser):
    """An EDM-style denoiser with discriminator guidance: `D'(x; sigma) = D(x; sigma) - w * corr`.

    Called as EDM's samplers call a network, `den(x, sigma, class_labels)`, or as
    k-diffusion calls a model, `den(x, sigma[N], class_labels=...)` under
    `torch.no_grad()`; returns the guided denoised image in x's dtype.

    w weights the first evaluation of a step, w_2nd (default: w) Heun's
    correction (order 2 of `Step`). Guidance is off for the whole batch (the
    release's rule) unless the VP time of the smallest sigma lies in
    [time_min, time_max]. Where sigma's values are known on the host (a float,
    a CPU tensor, or `step.sigma`) that decision is taken without touching the
    device and the discriminator is skipped outside the window; otherwise the
    correction is computed and masked, so no value is read back.
    double_fake_every=k: at first evaluations of main steps i with i % k == 0
    the correction of samples the discriminator judges fake (log_ratio < 0) is
    doubled (the release's boosting; docs/compat.md §3).

    The first-order `log(d / (1 - d))` [N] (LOG_RATIO_OUTSIDE where guidance
    was off) goes to `state['log_ratio']` (also `den.log_ratio`), for boosting;
    `state['disc_labels']`, when set, are the discriminator's labels (default:
    class_labels). Calls with x requiring grad (inside `torch.enable_grad()`)
    return a result differentiable in x, through the discriminator too.
    """

    def __init__(self, net, discriminator, w, time_min=0.01, time_max=1.0, disc_labels=None, *, w_2nd=None,
                 double_fake_every=None, state=None):
        super().__init__(net)
        self.discriminator = discriminator
        self.w, self.w_2nd = w, w_2nd
        self.time_min, self.time_max = time_min, time_max
        self.double_fake_every = double_fake_every
        self.state = SampleState() if state is None else state
        if disc_labels is not None:
            self.state['disc_labels'] = disc_labels

    @property
    def log_ratio(self):
        return self.state.get('log_ratio')

    def weight(self, order=1):
        return self.w if order == 1 or self.w_2nd is None else self.w_2nd

    def active(self, order=1):
        """Whether this denoiser guides at all at evaluations of this order."""
        w = self.weight(order)
        return self.discriminator is not None and not (isinstance(w, (int, float)) and w == 0)

    def forward(self, x, sigma, class_labels=None, *, step=None, **model_kwargs):
        denoised = self.inner(x, sigma, class_labels, step, **model_kwargs)
        order = 1 if step is None else step.order
        first = order == 1
        n = x.shape[0]
        if not self.active(order):
            if first:
                self.state['log_ratio'] = torch.full([n], LOG_RATIO_OUTSIDE, device=x.device)
            return denoised
        hosts = _host_sigmas(sigma) if step is None or step.sigma is None else [float(s) for s in step.sigma]
        inside = None
        if hosts is not None:
            inside = [window_on_host([s], self.time_min, self.time_max) for s in hosts]
            if not any(inside):
                if first:
                    self.state['log_ratio'] = torch.full([n], LOG_RATIO_OUTSIDE, device=x.device)
                return denoised
        labels = class_labels if self.state.get('disc_labels') is None else self.state['disc_labels']
        create_graph = torch.is_grad_enabled() and x.requires_grad
        corr, log_ratio = dg_correction(self.discriminator, x, sigma, labels, create_graph=create_graph)
        if inside is None or not all(inside):  # The window's verdict, as a tensor mask.
            ok = window_mask(sigma, self.time_min, self.time_max, device=x.device)
            corr = corr * ok.to(corr.dtype)
            log_ratio = torch.where(ok, log_ratio, torch.full_like(log_ratio, LOG_RATIO_OUTSIDE))
        if first and self.double_fake_every and step is not None and step.index is not None \
                and step.index % self.double_fake_every == 0:
            corr = corr * as_column(torch.where(log_ratio < 0, 2.0, 1.0).to(corr.dtype), x.ndim)
        if first:
            self.state['log_ratio'] = log_ratio
        w = torch.as_tensor(self.weight(order), device=x.device, dtype=x.dtype)
        return denoised - as_column(w, x.ndim) * corr.to(x.dtype)

def guided(net, discriminator=None, w=0.0, *, w_2nd=None, **kwargs):
    """`DGDenoiser(net, discriminator, w, ...)` where it guides at some evaluation, else `net` itself."""
    off = lambda v: isinstance(v, (int, float)) and v == 0
    if discriminator is None or (off(w) and (w_2nd is None or off(w_2nd))):
        return net
    return DGDenoiser(net, discriminator, w, w_2nd=w_2nd, **kwargs)
