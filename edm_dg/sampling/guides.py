"""Guidance by a second network, as a denoiser transform: D_g + w (D - D_g), optionally only inside
an interval of noise levels.

With the guide D_g an unconditional network this is classifier-free guidance
(Ho & Salimans, 2022); with a smaller or less-trained version of the main
network it is autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion
Model with a Bad Version of Itself"); EDM2's `edm_sampler` computes it as
`D_g.lerp(D, w)`. A guidance interval (Kynkäänniemi et al., NeurIPS 2024)
guides only for sigma_lo <= sigma <= sigma_hi and uses the main network alone
elsewhere, where the guide is not evaluated.

`Guided` follows the denoiser protocol of denoisers.py, so every solver takes
it and discriminator guidance can wrap it (`DGDenoiser(Guided(...), ...)`: the
discriminator then judges the guided state). The interval is decided on the
host from `step.sigma` (or from sigma itself when it is a host float or a CPU
tensor); otherwise both networks run and the interval acts as a per-sample
mask, so no value is read back from the device.
"""

import math

import torch

from .denoisers import Denoiser, _host_sigmas, nfe_of
from .hooks import as_column

def parse_interval(text):
    """'sigma_lo,sigma_hi' -> (lo, hi) floats; ValueError naming --guidance_interval otherwise."""
    try:
        lo, hi = (float(v) for v in str(text).split(','))
    except ValueError:
        raise ValueError(f'--guidance_interval={text}: expected two noise levels "sigma_lo,sigma_hi", '
                         f'e.g. --guidance_interval=0.28,2.9') from None
    if not 0 <= lo <= hi:
        raise ValueError(f'--guidance_interval={text}: need 0 <= sigma_lo <= sigma_hi')
    return lo, hi

class Guided(Denoiser):
    """`D_g(x; sigma) + w (D(x; sigma) - D_g(x; sigma))` for sigma in [sigma_lo, sigma_hi], `D` elsewhere.

    net, guide: denoisers (EDM networks, EDM2 networks with the EDM interface,
    or wrappers), called with the same class labels (an unconditional guide
    ignores them). w = 1 is the main network alone. The attributes of the
    protocol come from `net`; `nfe` is the cost of a guided call (both
    networks'), `nfe_at(sigma)` that of a call at host levels sigma (outside
    the interval only the main network's); `evaluations` counts, on the host,
    the network evaluations of the calls so far.
    """

    def __init__(self, net, guide, w, sigma_lo=0.0, sigma_hi=math.inf):
        if not 0 <= sigma_lo <= sigma_hi:
            raise ValueError(f'guidance interval needs 0 <= sigma_lo <= sigma_hi, got {sigma_lo}, {sigma_hi}')
        super().__init__(net)
        self.guide = guide
        self.w = float(w)
        self.sigma_lo, self.sigma_hi = float(sigma_lo), float(sigma_hi)
        self.evaluations = 0

    nfe = property(lambda self: nfe_of(self.net) + nfe_of(self.guide))

    def inside(self, sigma):
        """Whether host noise level sigma lies in the guidance interval."""
        return self.sigma_lo <= sigma <= self.sigma_hi

    def nfe_at(self, sigma):
        """Evaluations of a call at the host levels `sigma`: the guide's only where one lies inside."""
        guides = self.w != 1 and any(self.inside(float(s)) for s in sigma)
        return nfe_of(self.net, sigma) + (nfe_of(self.guide, sigma) if guides else 0)

    def _guide(self, x, sigma, class_labels, step, **model_kwargs):
        if getattr(self.guide, 'takes_step', False):
            return self.guide(x, sigma, class_labels, step=step, **model_kwargs).to(x.dtype)
        return self.guide(x, sigma, class_labels, **model_kwargs).to(x.dtype)

    def forward(self, x, sigma, class_labels=None, *, step=None, **model_kwargs):
        denoised = self.inner(x, sigma, class_labels, step, **model_kwargs)
        hosts = _host_sigmas(sigma) if step is None or step.sigma is None else [float(s) for s in step.sigma]
        verdicts = None if hosts is None else {self.inside(s) for s in hosts}
        self.evaluations += self.nfe if hosts is None and self.w != 1 else self.nfe_at(hosts or ())
        if self.w == 1 or verdicts == {False}:
            return denoised
        guided = self._guide(x, sigma, class_labels, step, **model_kwargs).lerp(denoised, self.w)
        if verdicts == {True}:
            return guided
        # Per-sample noise levels on both sides of the interval, or unknown on the host: mask on the device.
        levels = torch.as_tensor(sigma, device=x.device).to(torch.float64).reshape(-1)
        keep = (levels >= self.sigma_lo) & (levels <= self.sigma_hi)
        return torch.where(as_column(keep.expand(x.shape[0]), x.ndim), guided, denoised)

def guided_by(net, guide=None, w=1.0, interval=None):
    """`Guided(net, guide, w, *interval)` where it guides, else `net` itself (no guide, or w = 1)."""
    if guide is None or float(w) == 1:
        return net
    lo, hi = (0.0, math.inf) if interval is None else interval
    return Guided(net, guide, w, lo, hi)
