"""The DG discriminator: frozen ADM classifier features + a shallow ADM head.

Loads the DG release's files (a guided-diffusion classifier state dict and a head
state dict), the reproduction study's LoRA classifier files, and this project's
own discriminator checkpoint (one `weights_only` file: head, LoRA adapters,
configuration and the SHA-256 of the classifier it needs).
"""

import hashlib
import io
import os
import re

import torch
from torch import nn

from . import lora as lora_lib
from . import vp
from .adm import EncoderUNet, channel_mult_for

FORMAT = 'edm-dg-discriminator'
FORMAT_VERSION = 1

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""

#----------------------------------------------------------------------------

class Discriminator(nn.Module):
    """`d(x_vp, tau, class_labels) in (0,1)`, shape [N]: the callable `dg_sampler` expects.

    tau is linear-VP time; a classifier trained on the cosine schedule (64x64
    ADM) gets it mapped to cosine time (COMPAT §3).
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

#----------------------------------------------------------------------------
# Reading files.

def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()

def read_weights(path, what):
    """Read a .pt file with weights_only=True; returns (object, sha256 of the file)."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: {what} not found; check the path')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read {what} as a PyTorch weights file '
                              f'({type(e).__name__}); pass a .pt state dict saved with torch.save') from None
    return obj, sha256_bytes(data)

def _candidate_args(sd):
    """Every ADM layout consistent with the number of input blocks and the final resolution."""
    width, in_channels = sd['input_blocks.0.0.weight'].shape[:2]
    out_channels = sd['out.2.c_proj.weight'].shape[0]
    r = round((sd['out.2.positional_embedding'].shape[1] - 1) ** 0.5)
    n_blocks = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r'input_blocks\.(\d+)\.', k)] if m)
    for levels in range(1, 8):
        depth, rem = divmod(n_blocks - levels, levels)
        image_size = r * 2 ** (levels - 1)
        if rem or depth < 1:
            continue
        try:
            mult = channel_mult_for(image_size)
        except ValueError:
            continue
        if len(mult) != levels:
            continue
        attention_ds, i, ds = [], 1, 1
        for level in range(levels):
            for _ in range(depth):
                if f'input_blocks.{i}.1.qkv.weight' in sd and ds not in attention_ds:
                    attention_ds.append(ds)
                i += 1
            if level != levels - 1:
                i += 1
                ds *= 2
        args = dict(image_size=image_size, in_channels=int(in_channels), model_channels=int(width),
                    out_channels=int(out_channels), num_res_blocks=depth, attention_resolutions=tuple(attention_ds),
                    condition='label_emb.weight' in sd)
        if args['condition']:
            args['num_classes'] = int(sd['label_emb.weight'].shape[0])
        yield args

def infer_encoder_args(sd):
    """EncoderUNet constructor arguments whose state dict has exactly sd's keys and shapes."""
    required = ['input_blocks.0.0.weight', 'out.2.positional_embedding', 'out.2.c_proj.weight', 'time_embed.0.weight']
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f'missing keys {missing[:3]}')
    want = {k: tuple(v.shape) for k, v in sd.items()}
    first_diff = None
    for args in _candidate_args(sd):
        with torch.device('meta'):
            have = {k: tuple(v.shape) for k, v in EncoderUNet(**args).state_dict().items()}
        if have == want:
            return args
        if first_diff is None:
            diff = sorted(set(have) ^ set(want)) or [k for k in have if have[k] != want[k]]
            first_diff = f'closest layout differs at {diff[0]}'
    raise ValueError(first_diff or 'no ADM layout has this number of blocks and final resolution')

def build_encoder(sd, path, what, lora_alpha=1.0):
    """Build an EncoderUNet from a state dict (plain or loralib LoRA keys) and load it strictly."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: not a state dict of tensors; pass the {what} checkpoint (a guided-diffusion EncoderUNetModel state dict)')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    rank = lora_lib.rank_from_state_dict(sd) if lora_lib.has_lora_keys(sd) else 0
    try:
        args = infer_encoder_args(lora_lib.to_plain_state_dict(sd))
        net = EncoderUNet(**args)
        if rank:
            lora_lib.apply_lora(net, rank, lora_alpha)
        net.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        reason = ' '.join(str(e).split())[:200]
        raise CheckpointError(f'{path}: keys or shapes do not match a guided-diffusion EncoderUNetModel ({reason}); '
                              f'pass the {what} checkpoint of the DG release or one saved by this project') from None
    return net, args, rank

def load_classifier(path, lora_alpha=1.0):
    """The ADM classifier used as feature extractor: (net, args, sha256). Frozen, eval mode."""
    sd, sha = read_weights(path, 'classifier')
    if isinstance(sd, dict) and sd.get('format') == FORMAT:
        raise CheckpointError(f'{path}: this is a discriminator checkpoint; pass it as --disc and the ADM classifier as --classifier')
    net, args, _ = build_encoder(sd, path, 'ADM classifier', lora_alpha)
    return net.eval().requires_grad_(False), args, sha

def make_head(feature_channels, feature_resolution, cond=False, num_classes=1000, width=128, depth=2):
    """A fresh discriminator head in the DG release's layout (COMPAT §4)."""
    return EncoderUNet.from_create_classifier_args(
        image_size=feature_resolution, in_channels=feature_channels, classifier_width=width,
        classifier_depth=depth, out_channels=1, condition=cond, num_classes=num_classes)

def default_time_schedule(classifier_args):
    return 'cosine' if classifier_args['image_size'] == 64 else 'linear'

#----------------------------------------------------------------------------
# This project's checkpoint format.

def discriminator_checkpoint(disc, classifier_sha256, classifier_args, lora_rank=0, lora_alpha=1.0, extra=None):
    """A small, weights_only-loadable dict: head, adapters, configuration, classifier hash."""
    ckpt = dict(format=FORMAT, version=FORMAT_VERSION,
                head_args=_args_to_plain(infer_encoder_args(disc.head.state_dict())),
                head={k: v.detach().cpu().clone() for k, v in disc.head.state_dict().items()},
                classifier_sha256=classifier_sha256, classifier_args=_args_to_plain(classifier_args),
                time_schedule=disc.time_schedule, lora_rank=int(lora_rank), lora_alpha=float(lora_alpha),
                lora=lora_lib.lora_state_dict(disc.classifier) if lora_rank else {})
    if extra:
        ckpt.update(extra)
    return ckpt

def _args_to_plain(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}

def load_discriminator(disc_path, classifier_path, device='cpu', time_schedule=None, lora_alpha=1.0):
    """A frozen Discriminator from --disc and --classifier (released or own format)."""
    obj, _ = read_weights(disc_path, 'discriminator')
    classifier, cls_args, cls_sha = load_classifier(classifier_path, lora_alpha)
    if isinstance(obj, dict) and obj.get('format') == FORMAT:
        if obj.get('version', 0) > FORMAT_VERSION:
            raise CheckpointError(f'{disc_path}: written by a newer edm-dg (format version {obj["version"]}); update edm-dg')
        if obj['classifier_sha256'] != cls_sha:
            raise CheckpointError(f'{disc_path}: trained on a classifier with SHA-256 {obj["classifier_sha256"][:12]}..., '
                                  f'but {classifier_path} has {cls_sha[:12]}...; pass the classifier it was trained with')
        head_args = dict(obj['head_args'])
        head_args['attention_resolutions'] = tuple(head_args['attention_resolutions'])
        head = EncoderUNet(**head_args)
        try:
            head.load_state_dict(obj['head'], strict=True)
        except RuntimeError:
            raise CheckpointError(f'{disc_path}: head weights do not match its recorded configuration; the file is damaged') from None
        if obj.get('lora_rank', 0):
            lora_lib.apply_lora(classifier, obj['lora_rank'], obj.get('lora_alpha', 1.0))
            missing = set(lora_lib.lora_state_dict(classifier)) - set(obj['lora'])
            if missing:
                raise CheckpointError(f'{disc_path}: LoRA adapters missing for {sorted(missing)[:2]}; the file is damaged')
            classifier.load_state_dict(obj['lora'], strict=False)
        schedule = time_schedule or obj.get('time_schedule') or default_time_schedule(cls_args)
    else:
        head, head_args, _ = build_encoder(obj, disc_path, 'discriminator head')
        schedule = time_schedule or default_time_schedule(cls_args)
    if head.in_channels != classifier.feature_channels or head.image_size != classifier.feature_resolution:
        raise CheckpointError(f'{disc_path}: head expects {head.in_channels}x{head.image_size}x{head.image_size} features, '
                              f'but {classifier_path} gives {classifier.feature_channels}x{classifier.feature_resolution}x'
                              f'{classifier.feature_resolution}; pass the matching classifier')
    disc = Discriminator(classifier, head, schedule)
    return disc.eval().requires_grad_(False).to(device)
