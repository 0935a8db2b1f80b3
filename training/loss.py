"""Training losses of EDM (Karras et al., 2022): the VP and VE baselines (Song et al., 2021)
and EDM's own, with NVlabs' EDM class names and arguments.

Every loss draws one noise level per image, noises the (optionally augmented)
images and returns the per-pixel weighted squared error of the denoiser,
weight(sigma) * |D(y + n; sigma) - y|^2, unreduced. Random numbers are drawn in
EDM's order -- the noise levels, then whatever the augmentation pipeline draws,
then the noise -- so a seeded run reproduces EDM's values (docs/compat.md).
Like training/networks.py this source travels inside pickles, hence the imports.
"""

import torch
from torch_utils import persistence

def _per_image_shape(images):
    """One value per image, broadcastable over [N, C, H, W]."""
    return [images.shape[0], 1, 1, 1]

def _weighted_error(net, images, labels, augment_pipe, sigma, weight):
    """weight * (D(y + sigma * eps; sigma) - y)^2 with y the augmented images and eps ~ N(0, I)."""
    if augment_pipe is None:
        y, augment_labels = images, None
    else:
        y, augment_labels = augment_pipe(images)
    noisy = y + torch.randn_like(y) * sigma
    denoised = net(noisy, sigma, labels, augment_labels=augment_labels)
    return weight * ((denoised - y) ** 2)

@persistence.persistent_class
class VPLoss:
    """Variance preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def __call__(self, net, images, labels, augment_pipe=None):
        u = torch.rand(_per_image_shape(images), device=images.device)
        sigma = self.sigma(1 + u * (self.epsilon_t - 1))
        return _weighted_error(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)

    def sigma(self, t):
        """sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), in the same float32 arithmetic as VPPrecond."""
        t = torch.as_tensor(t)
        return (0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp().sub(1).sqrt()

@persistence.persistent_class
class VELoss:
    """Variance exploding loss: log sigma ~ U(log sigma_min, log sigma_max), weight 1 / sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, net, images, labels, augment_pipe=None):
        u = torch.rand(_per_image_shape(images), device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** u)
        return _weighted_error(net, images, labels, augment_pipe, sigma, 1 / sigma ** 2)

@persistence.persistent_class
class EDMLoss:
    """EDM's loss: log sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which gives the network's own output unit weight (EDM, Section 5)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        z = torch.randn(_per_image_shape(images), device=images.device)
        sigma = (z * self.P_std + self.P_mean).exp()
        sd = self.sigma_data
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        return _weighted_error(net, images, labels, augment_pipe, sigma, weight)
