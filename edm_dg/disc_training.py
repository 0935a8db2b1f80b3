"""Discriminator training (docs/compat.md §5): real vs. generated images through frozen ADM features.

Evaluation per diffusion time, the chance warning, metrics.jsonl and the plots
are in `edm_dg.disc_diagnostics`.

Every random draw (epoch permutation, VP times, noise) comes from generators
seeded by (seed, epoch, rank), so a run resumed from an epoch checkpoint
retraces an uninterrupted one exactly on CPU. Data parallelism: each rank takes
a shard of every epoch's permutation and gradients are averaged across ranks.
"""

import os
import re
import time

import numpy as np
import torch
import tqdm
from torch.nn import functional as F

from torch_utils import distributed as dist
from . import fileio
from . import seed_provenance
from . import lora as lora_lib
from . import latents, vp
from .image_sets import load_image_set
from .disc_checkpoint import discriminator_checkpoint, load_classifier, study_files
from .discriminator import Discriminator, make_head, default_time_schedule
from .disc_diagnostics import (append_metrics, chance_warning, evaluate_by_time, plot_log_ratios, plot_metrics,
                               split_eval, time_summary)
from .precision import autocast

STATE_FILE = 'training-state.pt'

#----------------------------------------------------------------------------
# Data.

def load_pair(real_path, fake_path, num=None, cond=False, log=print):
    """Real and fake uint8 image tensors with equal counts (and int labels when cond).

    The first n images of each source are used (n = --num, or the smaller count).
    """
    real, real_labels = load_image_set(real_path, log=log)
    fake, fake_labels = load_image_set(fake_path, log=log)
    return _pair(real_path, real, real_labels, fake_path, fake, fake_labels, num, cond, log)

def load_latent_pair(real_path, fake_path, num=None, cond=False, space=None, vae=None, seed=0, device='cpu', log=print):
    """load_pair for latents (edm_dg.latents): (latents, targets, labels, space).

    The fakes (latent shards of generate_dg.py --save_latents) carry the space;
    raw real latents (an EDM2 latent dataset) or real images encoded by `vae`
    are standardised by it, or by `space` (from --encoder) when given.
    """
    fake, fake_labels, space = latents.load_latent_set(fake_path, space=space, vae=vae, seed=seed, device=device, log=log)
    real, real_labels, _ = latents.load_latent_set(real_path, space=space, vae=vae, seed=seed + 1, device=device, log=log)
    return (*_pair(real_path, real, real_labels, fake_path, fake, fake_labels, num, cond, log, 'latents'), space)

def _pair(real_path, real, real_labels, fake_path, fake, fake_labels, num, cond, log, kind='images'):
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f'{fake_path}: {kind} are {list(fake.shape[1:])} (C,H,W) but {real_path} has {list(real.shape[1:])}; '
                         f'generate fakes at the real data\'s resolution and channel count')
    if cond:
        for path, labels in ((real_path, real_labels), (fake_path, fake_labels)):
            if labels is None:
                raise ValueError(f'{path}: --cond needs class labels (dataset.json with labels, or "label" in the .npz); '
                                 f'drop --cond to train an unconditional discriminator')
    n = min(len(real), len(fake)) if num is None else num
    if n > min(len(real), len(fake)):
        raise ValueError(f'--num={num} but only {len(real)} real ({real_path}) and {len(fake)} fake ({fake_path}) {kind} exist')
    if len(real) != len(fake) and num is None:
        log(f'Using {n} {kind} of each kind (real has {len(real)}, fake has {len(fake)}).')
    real, fake = real[:n], fake[:n]
    labels = None
    if cond:
        labels = torch.cat([real_labels[:n], fake_labels[:n]])
    images = torch.cat([real, fake])
    targets = torch.cat([torch.ones(n), torch.zeros(n)])
    return images, targets, labels

def fake_seed_ranges(fake_path, n, log=print):
    """Seed ranges of the first n fakes (what load_pair uses), or None when the source does not record seeds."""
    seeds = seed_provenance.source_seeds(fake_path)
    if seeds is None:
        log(f'{fake_path}: the seeds of these fakes are unknown (not generate_dg.py file names or edm-dg shards); '
            f'checkpoints record {seed_provenance.FIELD}=None')
        return None
    ranges = seed_provenance.compress_ranges(seeds[:n])
    log(f'Fakes come from seeds {seed_provenance.format_ranges(ranges)}; sample and evaluate with other seeds.')
    return ranges

#----------------------------------------------------------------------------

def build(classifier_path, cond=False, lora_rank=0, lora_alpha=1.0, head_width=128, head_depth=2, num_classes=1000, seed=0,
          time_schedule=None, lora_checkpoint=None):
    """Fresh discriminator (frozen classifier, trainable head and adapters) and the classifier's hash/args.

    time_schedule: the time the classifier is fed in training, and recorded for
    sampling; None: the classifier's own (cosine for a 64x64 ADM classifier).
    Adapters that come with the classifier (a study-format file, or the study's
    adapter-only lora_checkpoint) are trained on; lora_rank, if not 0, must be theirs.
    """
    classifier, cls_args, sha = load_classifier(classifier_path, lora_alpha, lora_checkpoint,  # alpha scales given adapters too
                                                (lora_rank or None) if lora_checkpoint else None)
    torch.manual_seed(seed)
    have = lora_lib.lora_config(classifier)[0]
    if have and lora_rank and lora_rank != have:
        raise ValueError(f'{classifier_path}: its adapters have rank {have}, not --lora_rank={lora_rank}; pass --lora_rank={have} or drop it')
    if lora_rank and not have:
        lora_lib.apply_lora(classifier, lora_rank, lora_alpha)
    if lora_rank or lora_checkpoint:
        for p in lora_lib.lora_parameters(classifier):
            p.requires_grad_(True)
    head = make_head(classifier.feature_channels, classifier.feature_resolution, cond=cond,
                     num_classes=num_classes, width=head_width, depth=head_depth)
    disc = Discriminator(classifier, head, time_schedule or default_time_schedule(cls_args))
    return disc, sha, cls_args

def trainable_parameters(disc):
    return list(disc.head.parameters()) + lora_lib.lora_parameters(disc.classifier)

def disc_logits(disc, x, tau, labels, lora_on):
    """Head logits; classifier features without autograd unless LoRA adapters train."""
    t = disc.classifier_time(tau)
    if lora_on:
        feats = disc.classifier.features(x, t)
    else:
        with torch.no_grad():
            feats = disc.classifier.features(x, t)
    return disc.head(feats, t, labels if disc.cond else None).reshape(-1)

def train_step(disc, opt, scaler, images_u8, y, labels, gen, params, lora_on, precision='fp32', channels_last=False, world=1):
    """One optimisation step on a batch of uint8 images; returns (loss, logits)."""
    x, tau = vp.noisy_batch(images_u8, gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device.type, precision):
        logits = disc_logits(disc, x, tau, labels, lora_on).float()
    loss = F.binary_cross_entropy_with_logits(logits, y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if world > 1:  # Average gradients over ranks in one collective.
        grads = [p.grad for p in params if p.grad is not None]
        flat = dist.all_reduce(torch.cat([g.reshape(-1) for g in grads])) / world
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))
    scaler.step(opt)
    scaler.update()
    return loss, logits

#----------------------------------------------------------------------------

def train(outdir, real, fake, classifier_path, *, epochs=60, batch=128, lr=3e-4, weight_decay=1e-7, cond=False,
          num=None, lora_rank=0, lora_alpha=1.0, head_width=128, head_depth=2, num_classes=1000, seed=0,
          snap=1, precision='fp32', channels_last=False, resume=True, device='cpu', progress=True, log=print,
          stop_after_steps=None, time_schedule=None, eval_images=None, holdout=False, lora_checkpoint=None, export=None,
          img_resolution=None, encoder_pkl=None, vae=None, trust_pickle=False):
    """Train a discriminator; writes disc-EEEE.pt per snapshot, metrics.jsonl, training-curves.png.

    Latents (edm_dg.latents): when the fakes are latent shards, or encoder_pkl
    / vae are given, the discriminator learns on latents (load_latent_pair) and
    its checkpoints record their space, which generate_dg.py checks against the model.

    batch is per process (the global batch is batch times the processes). An
    interrupted run in outdir is continued when resume, else started over.
    lora_checkpoint: the study's adapter file, trained on from where it is.
    export='study' also writes the study's pair of files per snapshot and at the end
    (disc_checkpoint.study_files), 'release' the release's head files discriminator_E.pt.

    Each checkpoint records the seeds of its fakes (`fake_seeds`, see seed_provenance).

    After every epoch, eval_images real and as many fake images are evaluated
    at each tau bin's centre (`evaluate_by_time`): the last eval_images of each
    kind, held out of training, when holdout; else the first ones of the
    training pair. None: EVAL_IMAGES, at most 1/EVAL_SHARE of the images of
    each kind, none if that is under CHANCE_MIN_IMAGES; 0 turns this off.
    metrics.jsonl gets the per-bin numbers, the run folder
    log-ratio-histogram.png, and `chance_warning` is logged once when it applies.

    Returns the path of the last checkpoint. `stop_after_steps` ends the run
    early (used to test resuming).
    """
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    for name, value in (('lr', lr), ('weight_decay', weight_decay), ('lora_alpha', lora_alpha)):
        if not np.isfinite(value):
            raise ValueError(f'--{name}={value} is not a finite number')
    if export not in (None, 'study', 'release'):
        raise ValueError(f'--export={export}: choose study or release')
    os.makedirs(outdir, exist_ok=True)
    state_path = os.path.join(outdir, STATE_FILE)
    if rank == 0:
        fileio.remove_stale_temps(outdir)  # From a killed run.
        if not resume and os.path.isfile(state_path):
            log(f'{outdir}: starting over (--no-resume); its earlier checkpoints and metrics are removed.')
            for fn in os.listdir(outdir):
                if fn == STATE_FILE or fn == 'metrics.jsonl' or re.fullmatch(r'disc-\d+\.pt', fn):
                    os.remove(os.path.join(outdir, fn))
    dist.barrier()

    space = None
    if encoder_pkl is not None or vae is not None or latents.is_latent_source(fake) or latents.is_latent_source(real):
        if export is not None:
            raise ValueError(f'--export={export}: the peers\' head files cannot record that the head judges latents '
                             f'(a latent head loaded from them would be taken for a pixel one); drop --export')
        with dist.rank0_first():  # rank 0 fetches --encoder and the VAE into the cache first
            given = None if encoder_pkl is None else latents.space_of_pickle(encoder_pkl, trust_pickle)
            images, targets, labels, space = load_latent_pair(real, fake, num, cond, given, vae, seed, device, log)
        log(f'Training on latents {list(images.shape[1:])} ({latents.describe(space)}).')
    else:
        images, targets, labels = load_pair(real, fake, num, cond, log)
    fake_seeds = fake_seed_ranges(fake, len(images) // 2, log)  # held-out fakes included: their seeds are used too
    images, targets, labels, (eval_images_u8, eval_targets, eval_labels) = split_eval(images, targets, labels, eval_images, holdout)
    eval_n = len(eval_images_u8) // 2
    eval_set = 'held-out' if holdout else 'training'
    disc, sha, cls_args = build(classifier_path, cond, lora_rank, lora_alpha, head_width, head_depth, num_classes, seed,
                                time_schedule, lora_checkpoint)
    disc.space = space or dict(latents.PIXELS)
    lora_on = bool(lora_rank or lora_checkpoint)
    lora_rank = lora_lib.lora_config(disc.classifier)[0] if lora_on else 0
    log(f'Classifier time convention: {disc.time_schedule} (used in training and recorded in every checkpoint for sampling)')
    if img_resolution is not None and images.shape[2] != img_resolution:
        raise ValueError(f'{real}: images are {images.shape[2]}x{images.shape[3]}, not --img_resolution={img_resolution}; '
                         f'drop --img_resolution (edm-dg reads the size from the images)')
    if images.shape[1] != disc.classifier.in_channels or images.shape[2] != disc.classifier.image_size:
        raise ValueError(f'{classifier_path}: classifier takes {disc.classifier.in_channels}x{disc.classifier.image_size}x'
                         f'{disc.classifier.image_size} images but {real} has {images.shape[1]}x{images.shape[2]}x{images.shape[3]}; '
                         f'pass a classifier for this resolution (python -m edm_dg.train_classifier)')
    disc.to(device)
    if channels_last:
        disc.to(memory_format=torch.channels_last)
    images = images.to(device)
    targets = targets.to(device)
    labels = None if labels is None else labels.to(device)
    params = trainable_parameters(disc)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == 'fp16' and device.type == 'cuda'))

    start_epoch = 0
    if resume and os.path.isfile(state_path):
        st = torch.load(state_path, map_location='cpu', weights_only=True)
        if st['classifier_sha256'] != sha:
            raise ValueError(f'{state_path}: run used a different classifier; pass the same --classifier to resume')
        if st.get('time_schedule', disc.time_schedule) != disc.time_schedule:
            raise ValueError(f'{state_path}: run fed the classifier {st["time_schedule"]} time, not {disc.time_schedule}; '
                             f'pass --time_schedule={st["time_schedule"]} to resume')
        disc.head.load_state_dict(st['head'])
        if st['lora']:
            disc.classifier.load_state_dict(st['lora'], strict=False)
        opt.load_state_dict(st['optimizer'])
        start_epoch = st['epoch']
        log(f'Resuming from epoch {start_epoch} of {outdir}.')
    if start_epoch >= epochs:
        log(f'Nothing to do: run already has {start_epoch} epochs.')

    n = len(images)
    if n < world:
        raise ValueError(f'{real}: {n} training images cannot be split over {world} processes; use fewer processes or more images')
    local = min(batch, n // world)
    if local < batch:
        log(f'--batch={batch} per process is more than the {n} training images allow; using {local}.')
    batch = local * world  # Global from here on.
    steps_per_epoch = max(n // batch, 1)
    config = dict(real=real, fake=fake, classifier=classifier_path, epochs=epochs, batch=batch, lr=lr,
                  weight_decay=weight_decay, cond=cond, num=n // 2, lora_rank=lora_rank, lora_alpha=lora_alpha,
                  head_width=head_width, head_depth=head_depth, seed=seed, precision=precision, world_size=world,
                  batch_per_process=local, lora_checkpoint=lora_checkpoint, export=export,
                  time_schedule=disc.time_schedule, eval_images=eval_n, holdout=holdout)
    if rank == 0:
        fileio.atomic_write_json(os.path.join(outdir, 'config.json'), config, indent=2)
    last = None
    steps_done = 0
    warned = False
    for epoch in range(start_epoch, epochs):
        disc.head.train()
        perm = torch.randperm(n, generator=vp.seeded_generator('cpu', seed, epoch)).to(device)
        gen = vp.seeded_generator(device, seed, epoch, rank + 1)
        t0 = time.time()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, correct real, n real, correct fake, n fake
        bar = tqdm.tqdm(range(steps_per_epoch), desc=f'epoch {epoch + 1}/{epochs}', disable=(not progress) or rank != 0,
                        dynamic_ncols=True, leave=False)
        for step in bar:
            idx = perm[step * batch:(step + 1) * batch][rank * local:(rank + 1) * local]
            y = targets[idx]
            loss, logits = train_step(disc, opt, scaler, images[idx], y, None if labels is None else labels[idx], gen,
                                      params, lora_on, precision, channels_last, world)
            with torch.no_grad():
                pred = logits > 0
                sums += torch.stack([loss.detach().double() * len(y), (pred & (y == 1)).sum().double(), (y == 1).sum().double(),
                                     (~pred & (y == 0)).sum().double(), (y == 0).sum().double()])
            if rank == 0 and progress and step % 10 == 0:
                s = sums.tolist()
                bar.set_postfix(loss=f'{s[0] / max(s[2] + s[4], 1):.4f}', acc=f'{(s[1] + s[3]) / max(s[2] + s[4], 1):.3f}')
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                return last
        bar.close()
        dist.all_reduce(sums)
        s = sums.tolist()
        secs = time.time() - t0
        rec = dict(epoch=epoch + 1, loss=s[0] / max(s[2] + s[4], 1), acc_real=s[1] / max(s[2], 1),
                   acc_fake=s[3] / max(s[4], 1), seconds=secs, images_per_s=steps_per_epoch * batch / max(secs, 1e-9))
        if rank == 0:
            if eval_n:
                ev = evaluate_by_time(disc, eval_images_u8, eval_targets, eval_labels, batch=batch, seed=seed,
                                      device=device, precision=precision)
                hist = (ev.pop('log_ratio_real'), ev.pop('log_ratio_fake'))
                rec.update(ev, eval_set=eval_set, eval_images=eval_n)
                plot_log_ratios(outdir, *hist, tau=ev['log_ratio_tau'], epoch=epoch + 1, eval_set=eval_set)
            ckpt = discriminator_checkpoint(disc, sha, cls_args, lora_rank, lora_alpha,
                                            extra=dict(training=rec, config=config, fake_seeds=fake_seeds))
            if (epoch + 1) % snap == 0 or epoch + 1 == epochs:
                last = os.path.join(outdir, f'disc-{epoch + 1:04d}.pt')
                fileio.atomic_torch_save(ckpt, last)
                export_files(disc, outdir, export, epoch, final=epoch + 1 == epochs)
            fileio.atomic_torch_save(dict(epoch=epoch + 1, head=ckpt['head'], lora=ckpt['lora'], optimizer=opt.state_dict(),
                                        classifier_sha256=sha, time_schedule=disc.time_schedule), state_path)
            append_metrics(outdir, rec)
            plot_metrics(outdir)
            log(f'epoch {epoch + 1}/{epochs}: loss {rec["loss"]:.4f}, acc real {rec["acc_real"]:.3f}, '
                f'fake {rec["acc_fake"]:.3f}, {rec["images_per_s"]:.1f} img/s' + time_summary(rec))
            warning = None if warned else chance_warning(rec, epochs)
            if warning:
                log(warning)
                warned = True
        dist.barrier()
    return last

def export_files(disc, outdir, export, epoch, final=False):
    """The peers' checkpoint files of this epoch (0-based `epoch`), and the study's final pair after the last one."""
    if export == 'release':
        fileio.atomic_torch_save({k: v.detach().cpu() for k, v in disc.head.state_dict().items()},
                                 os.path.join(outdir, f'discriminator_{epoch + 1}.pt'))
    elif export == 'study':
        for epoch_tag in [epoch] + ([None] if final else []):
            for name, sd in study_files(disc, epoch_tag).items():
                fileio.atomic_torch_save(sd, os.path.join(outdir, name))

