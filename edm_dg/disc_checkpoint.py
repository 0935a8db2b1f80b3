"""Discriminator checkpoint files: reading them, and this project's own format.

Reads the DG release's files (a guided-diffusion classifier state dict and a
head state dict), the reproduction study's LoRA classifier files (loralib keys,
docs/compat.md §6) and this project's discriminator checkpoint: one `weights_only` file
with the head, LoRA adapters, configuration and the SHA-256 of the classifier
it needs. Every refusal is a `CheckpointError` naming the file and the fix.
"""

import hashlib
import io
import math
import os
import re
import warnings
import zipfile

import torch

from . import latents
from . import lora as lora_lib
from .adm import EncoderUNet, channel_mult_for
from .discriminator import Discriminator, default_time_schedule

FORMAT = 'edm-dg-discriminator'
FORMAT_VERSION = 1

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the fix."""

#----------------------------------------------------------------------------
# Reading files.

def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()

def _unreadable_reason(data, error):
    """Why torch.load refused a file, in words a user can act on."""
    if data[:4] == b'PK\x03\x04' and not zipfile.is_zipfile(io.BytesIO(data)):
        return 'the file is truncated or damaged (incomplete zip archive); download or copy it again'
    if b'torch_utils.persistence' in data[:65536] or b'training.networks' in data[:65536]:
        return 'this is an EDM network pickle; pass it as --network'
    if isinstance(error, EOFError) or 'truncated' in str(error):
        return 'the file is truncated or damaged; download or copy it again'
    if data[:1] == b'\x80':
        return ('a Python pickle that is not a plain state dict of tensors (or a damaged file); '
                'pass a .pt state dict saved with torch.save')
    return f'not a PyTorch weights file ({type(error).__name__}); pass a .pt state dict saved with torch.save'

def read_weights(path, what):
    """Read a .pt file with weights_only=True; returns (object, sha256 of the file)."""
    if not os.path.isfile(path):
        hint = '; download it first and pass the local path' if re.match(r'^[a-z]+://', str(path)) else '; check the path'
        raise CheckpointError(f'{path}: {what} not found{hint}')
    with open(path, 'rb') as f:
        data = f.read()
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter('ignore')
            obj = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path}: cannot read {what}: {_unreadable_reason(data, e)}') from None
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

def check_lora_alpha(lora_alpha):
    """None means the default; anything else must be a finite number."""
    if lora_alpha is None:
        return lora_lib.DEFAULT_ALPHA
    if not math.isfinite(lora_alpha):
        raise ValueError(f'--lora_alpha={lora_alpha} is not a finite number')
    return float(lora_alpha)

def build_encoder(sd, path, what, lora_alpha=lora_lib.DEFAULT_ALPHA):
    """Build an EncoderUNet from a state dict (plain or loralib LoRA keys) and load it strictly.

    Returns (net, constructor args, LoRA rank or 0); LoRA updates are scaled by lora_alpha / rank.
    """
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: not a state dict of tensors; pass the {what} checkpoint (a guided-diffusion EncoderUNetModel state dict)')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if lora_lib.is_adapter_only(sd):
        raise CheckpointError(f'{path}: holds LoRA adapters only (the study\'s lora_adm_*.pt); pass it as --lora_checkpoint '
                              f'and the classifier it adapts (e.g. 32x32_classifier.pt) as --classifier')
    try:
        rank = lora_lib.rank_from_state_dict(sd) if lora_lib.has_lora_keys(sd) else 0
        args = infer_encoder_args(lora_lib.to_plain_state_dict(sd))
        net = EncoderUNet(**args)
        if rank:
            lora_lib.apply_lora(net, rank, check_lora_alpha(lora_alpha))
        net.load_state_dict(sd, strict=True)
    except (ValueError, RuntimeError, KeyError, StopIteration) as e:
        reason = ' '.join(str(e).split())[:200]
        raise CheckpointError(f'{path}: keys or shapes do not match a guided-diffusion EncoderUNetModel ({reason}); '
                              f'pass the {what} checkpoint of the DG release or one saved by this project') from None
    return net, args, rank

def load_classifier(path, lora_alpha=lora_lib.DEFAULT_ALPHA, lora_checkpoint=None, lora_rank=None):
    """The ADM classifier used as feature extractor: (net, args, sha256 of `path`). Frozen, eval mode.

    LoRA adapters come inside a study-format classifier file or, as the study's
    `generate.py --lora_checkpoint` takes them, from an adapter-only file beside
    the plain classifier (docs/compat.md §6). Either way the updates are scaled
    by lora_alpha / rank (None: `lora.DEFAULT_ALPHA`, the study's value) and the
    rank is read from the file; lora_rank, when given, must equal it.
    """
    sd, sha = read_weights(path, 'classifier')
    if isinstance(sd, dict) and sd.get('format') == FORMAT:
        raise CheckpointError(f'{path}: this is a discriminator checkpoint; pass it as --disc and the ADM classifier as --classifier')
    alpha = check_lora_alpha(lora_alpha)
    net, args, rank = build_encoder(sd, path, 'ADM classifier', alpha)
    if args['out_channels'] == 1:
        raise CheckpointError(f'{path}: this is a discriminator head (one output), not an ADM classifier; '
                              f'pass it as --disc and the ADM classifier (e.g. 32x32_classifier.pt) as --classifier')
    source = path
    if lora_checkpoint is not None:
        if rank:
            raise CheckpointError(f'{path}: this classifier file carries LoRA adapters already; drop --lora_checkpoint '
                                  f'or pass the plain classifier as --classifier')
        rank = load_adapters(net, lora_checkpoint, alpha)
        source = lora_checkpoint
    if lora_rank is not None and lora_rank != rank:
        found = f'adapters of rank {rank}' if rank else 'no LoRA adapters'
        fix = (f'pass --lora_rank={rank} or drop it' if rank else
               'pass the adapters with --lora_checkpoint, or drop --lora_rank')
        raise CheckpointError(f'{source}: --lora_rank={lora_rank} but the file has {found}; {fix}')
    return net.eval().requires_grad_(False), args, sha

def load_adapters(classifier, path, lora_alpha=lora_lib.DEFAULT_ALPHA):
    """Put an adapter-only loralib file (keys `...in_layers.2.lora_A/B`) into a plain classifier; returns the rank."""
    sd, _ = read_weights(path, 'LoRA adapters')
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: not a state dict of tensors; pass the study\'s adapter file (lora_adm_*.pt) as --lora_checkpoint')
    sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
    if not lora_lib.is_adapter_only(sd):
        raise CheckpointError(f'{path}: not an adapter-only LoRA file (it has keys such as {next(iter(sd), None)!r}); '
                              f'pass a classifier as --classifier and only lora_A/lora_B tensors as --lora_checkpoint')
    try:
        rank = lora_lib.rank_from_state_dict(sd)
        lora_lib.apply_lora(classifier, rank, lora_alpha)
        want = {k: tuple(v.shape) for k, v in lora_lib.lora_state_dict(classifier).items()}
        have = {k: tuple(v.shape) for k, v in sd.items()}
        if want != have:
            diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]]
            raise ValueError(f'first difference at {diff[0]}')
        classifier.load_state_dict(sd, strict=False)
    except ValueError as e:
        raise CheckpointError(f'{path}: adapters do not fit this classifier ({e}); pass the adapters trained on the '
                              f'classifier given as --classifier') from None
    return rank

#----------------------------------------------------------------------------
# This project's checkpoint format.

def discriminator_checkpoint(disc, classifier_sha256, classifier_args, lora_rank=0, lora_alpha=lora_lib.DEFAULT_ALPHA, extra=None):
    """A small, weights_only-loadable dict: head, adapters, configuration, classifier hash.

    Rank and alpha are recorded as the classifier's adapters have them (also
    when they came with a study-format classifier file); lora_rank / lora_alpha
    are used only when the classifier has no adapters.
    """
    rank, alpha = lora_lib.lora_config(disc.classifier)
    if not rank:
        rank, alpha = 0, lora_alpha
    ckpt = dict(format=FORMAT, version=FORMAT_VERSION,
                head_args=_args_to_plain(infer_encoder_args(disc.head.state_dict())),
                head={k: v.detach().cpu().clone() for k, v in disc.head.state_dict().items()},
                classifier_sha256=classifier_sha256, classifier_args=_args_to_plain(classifier_args),
                time_schedule=disc.time_schedule, lora_rank=int(rank), lora_alpha=float(alpha),
                lora=lora_lib.lora_state_dict(disc.classifier) if rank else {},
                space=getattr(disc, 'space', None) or dict(latents.PIXELS))
    if extra:
        ckpt.update(extra)
    return ckpt

def study_files(disc, epoch=None):
    """{file name: state dict} of the reproduction study's pair for this discriminator.

    The study's train.py saves loralib's adapters (`lora_adm_*.pt`, only with
    LoRA) and the head (`discrim_{uncond,cond}_*.pt`, the release's head layout);
    its generate.py reads them with --lora_checkpoint and --discriminator_checkpoint.
    Without epoch the names are the study's final ones, else the epoch's (0-based, as the study counts).
    """
    tag = 'final' if epoch is None else f'epoch{epoch}'
    files = {f'discrim_{"cond" if disc.cond else "uncond"}_{tag}.pt':
             {k: v.detach().cpu().clone() for k, v in disc.head.state_dict().items()}}
    if lora_lib.lora_config(disc.classifier)[0]:
        files[f'lora_adm_{tag}.pt'] = lora_lib.lora_state_dict(disc.classifier)
    return files

def _args_to_plain(args):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()}

def _load_own_format(obj, disc_path, classifier, cls_sha, classifier_path, lora_alpha):
    """Head of an edm-dg checkpoint; puts its LoRA adapters into the classifier."""
    if obj.get('version', 0) > FORMAT_VERSION:
        raise CheckpointError(f'{disc_path}: written by a newer edm-dg (format version {obj["version"]}); update edm-dg')
    if obj.get('classifier_sha256') != cls_sha:
        raise CheckpointError(f'{disc_path}: trained on a classifier with SHA-256 {str(obj.get("classifier_sha256"))[:12]}..., '
                              f'but {classifier_path} has {cls_sha[:12]}...; pass the classifier it was trained with')
    try:
        head_args = dict(obj['head_args'])
        head_args['attention_resolutions'] = tuple(head_args['attention_resolutions'])
        head = EncoderUNet(**head_args)
        head.load_state_dict(obj['head'], strict=True)
        if obj.get('lora_rank', 0):
            lora_lib.apply_lora(classifier, obj['lora_rank'], lora_alpha)
            missing = set(lora_lib.lora_state_dict(classifier)) - set(obj['lora'])
            if missing:
                raise ValueError(f'LoRA adapters missing for {sorted(missing)[:2]}')
            classifier.load_state_dict(obj['lora'], strict=False)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = ' '.join(str(e).split())[:160]
        raise CheckpointError(f'{disc_path}: head or adapters do not match its recorded configuration ({reason}); '
                              f'the file is damaged, write it again with train_disc.py') from None
    return head

def load_discriminator(disc_path, classifier_path, device='cpu', time_schedule=None, lora_alpha=None, lora_checkpoint=None,
                       lora_rank=None):
    """A frozen Discriminator from --disc and --classifier (released or own format).

    lora_alpha scales every LoRA update by lora_alpha / rank. None: as recorded
    in an edm-dg checkpoint, else `lora.DEFAULT_ALPHA` (1, the reproduction
    study's value, which its files do not record). time_schedule ('linear' or
    'cosine', the time the classifier is fed) overrides the convention; None:
    as recorded in an edm-dg checkpoint, else `default_time_schedule` (what the
    release's sampler does). `disc.time_source` says which of the three applied.
    lora_checkpoint and lora_rank are `load_classifier`'s (the study's files).
    """
    obj, _ = read_weights(disc_path, 'discriminator')
    own = isinstance(obj, dict) and obj.get('format') == FORMAT
    if lora_alpha is None and own:
        lora_alpha = obj.get('lora_alpha', lora_lib.DEFAULT_ALPHA)
    lora_alpha = check_lora_alpha(lora_alpha)
    if own and obj.get('lora_rank', 0):
        if lora_checkpoint is not None:
            raise CheckpointError(f'{disc_path}: this checkpoint carries its own LoRA adapters; drop --lora_checkpoint')
        if lora_rank is not None and lora_rank != obj['lora_rank']:
            raise CheckpointError(f'{disc_path}: --lora_rank={lora_rank} but the checkpoint\'s adapters have rank '
                                  f'{obj["lora_rank"]}; pass --lora_rank={obj["lora_rank"]} or drop it')
    classifier, cls_args, cls_sha = load_classifier(classifier_path, lora_alpha, lora_checkpoint,
                                                    None if own and obj.get('lora_rank', 0) else lora_rank)
    if own:
        head = _load_own_format(obj, disc_path, classifier, cls_sha, classifier_path, lora_alpha)
        recorded = obj.get('time_schedule')
        schedule = time_schedule or recorded or default_time_schedule(cls_args)
        source = 'option' if time_schedule else 'checkpoint' if recorded else 'default'
    else:
        head, head_args, _ = build_encoder(obj, disc_path, 'discriminator head')
        if head_args['out_channels'] != 1:
            raise CheckpointError(f'{disc_path}: this is an ADM classifier ({head_args["out_channels"]} outputs), not a discriminator head; '
                                  f'pass it as --classifier and the head (e.g. discriminator_60.pt or a train_disc.py checkpoint) as --disc')
        schedule = time_schedule or default_time_schedule(cls_args)
        source = 'option' if time_schedule else 'default'
    if head.in_channels != classifier.feature_channels or head.image_size != classifier.feature_resolution:
        raise CheckpointError(f'{disc_path}: head expects {head.in_channels}x{head.image_size}x{head.image_size} features, '
                              f'but {classifier_path} gives {classifier.feature_channels}x{classifier.feature_resolution}x'
                              f'{classifier.feature_resolution}; pass the matching classifier')
    disc = Discriminator(classifier, head, schedule)
    disc.time_source = source  # 'option' (time_schedule given), 'checkpoint' (recorded) or 'default' (no record)
    disc.space = obj.get('space') if own else None  # edm_dg.latents; None: pixels (the release's and the study's heads)
    return disc.eval().requires_grad_(False).to(device)
