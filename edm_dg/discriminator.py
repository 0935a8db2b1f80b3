"""The DG discriminator model: frozen ADM classifier features + a shallow ADM head.

Reading checkpoint files (the DG release's, the reproduction study's LoRA files
and this project's own format) lives in `edm_dg.disc_checkpoint`.
"""

import torch
from torch import nn

from . import vp
from .adm import EncoderUNet

class Discriminator(nn.Module):
    """`d(x_vp, tau, class_labels) in (0,1)`, shape [N]: the callable `dg_sampler` expects.

    tau is linear-VP time; a classifier trained on the cosine schedule (64x64
    ADM) gets it mapped to cosine time (docs/compat.md §3).
    """

    def __init__(self, classifier: EncoderUNet, head: EncoderUNet, time_schedule='linear'):
        super().__init__()
        if time_schedule not in ('linear', 'cosine'):
            raise ValueError(f'time_schedule must be "linear" or "cosine", got {time_schedule!r}')
        self.classifier = classifier
        self.head = head
        self.time_schedule = time_schedule

    @property
    def cond(self):
        return self.head.condition

    def classifier_time(self, tau):
        return tau if self.time_schedule == 'linear' else vp.tau_to_cosine_time(tau)

    def logits(self, x_vp, tau, class_labels=None):
        t = self.classifier_time(tau)
        return self.head(self.classifier.features(x_vp, t), t, class_labels if self.cond else None).reshape(-1)

    def forward(self, x_vp, tau, class_labels=None):
        return torch.sigmoid(self.logits(x_vp, tau, class_labels))

def make_head(feature_channels, feature_resolution, cond=False, num_classes=1000, width=128, depth=2):
    """A fresh discriminator head in the DG release's layout (docs/compat.md §4)."""
    return EncoderUNet.from_create_classifier_args(
        image_size=feature_resolution, in_channels=feature_channels, classifier_width=width,
        classifier_depth=depth, out_channels=1, condition=cond, num_classes=num_classes)

def default_time_schedule(classifier_args):
    """The time input the classifier was trained with: ADM's 64x64 classifier uses the cosine schedule."""
    return 'cosine' if classifier_args['image_size'] == 64 else 'linear'
