"""Discriminator training (docs/compat.md §5): real vs. generated images through frozen ADM features.

Every random draw (epoch permutation, VP times, noise) comes from generators
seeded by (seed, epoch, rank), so a run resumed from an epoch checkpoint
retraces an uninterrupted one exactly on CPU. Data parallelism: each rank takes
a shard of every epoch's permutation and gradients are averaged across ranks.
"""

import json
import os
import time

import numpy as np
import torch
import tqdm
from torch.nn import functional as F

from torch_utils import distributed as dist
from . import io as dgio
from . import seed_provenance
from . import lora as lora_lib
from . import vp
from .image_sets import load_image_set
from .disc_checkpoint import discriminator_checkpoint, load_classifier
from .discriminator import Discriminator, make_head, default_time_schedule
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
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f'{fake_path}: images are {list(fake.shape[1:])} (C,H,W) but {real_path} has {list(real.shape[1:])}; '
                         f'generate fakes at the real data\'s resolution and channel count')
    if cond:
        for path, labels in ((real_path, real_labels), (fake_path, fake_labels)):
            if labels is None:
                raise ValueError(f'{path}: --cond needs class labels (dataset.json with labels, or "label" in the .npz); '
                                 f'drop --cond to train an unconditional discriminator')
    n = min(len(real), len(fake)) if num is None else num
    if n > min(len(real), len(fake)):
        raise ValueError(f'--num={num} but only {len(real)} real ({real_path}) and {len(fake)} fake ({fake_path}) images exist')
    if len(real) != len(fake) and num is None:
        log(f'Using {n} images of each kind (real has {len(real)}, fake has {len(fake)}).')
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

def split_eval(images, targets, labels, eval_images, holdout):
    """(training images, targets, labels, evaluation triple) from load_pair's real-then-fake halves.

    holdout: the last eval_images of each kind leave the training set;
    otherwise the evaluation set is the first eval_images of each kind (at most all).
    eval_images=None: EVAL_IMAGES, at most 1/EVAL_SHARE of the images of each kind, none if that is
    under CHANCE_MIN_IMAGES.
    """
    n = len(images) // 2
    default = eval_images is None
    if default:
        eval_images = min(EVAL_IMAGES, n // EVAL_SHARE)
        eval_images = eval_images if eval_images >= CHANCE_MIN_IMAGES else 0  # too few to tell anything
    halves = lambda t, a, b: None if t is None else torch.cat([t[a:b], t[n + a:n + b]])
    if not holdout:
        k = min(eval_images, n)
        return images, targets, labels, tuple(halves(t, 0, k) for t in (images, targets, labels))
    if not 0 < eval_images < n:
        got = f'{eval_images} by default (1/{EVAL_SHARE} of them, at most {EVAL_IMAGES}, 0 under {CHANCE_MIN_IMAGES})' if default else eval_images
        raise ValueError(f'--holdout needs 0 < --eval_images < {n} (the images of each kind), got {got}; pass --eval_images')
    train_part = tuple(halves(t, 0, n - eval_images) for t in (images, targets, labels))
    return (*train_part, tuple(halves(t, n - eval_images, n) for t in (images, targets, labels)))

def to_float(images_u8):
    """uint8 [N,C,H,W] -> float in [-1, 1] (generate_dg.py's inverse up to rounding)."""
    return images_u8.to(torch.float32) / 127.5 - 1

def noisy_batch(images_u8, gen):
    """Importance-sampled VP time and perturbed images x_tau = mean x + std eps."""
    x = to_float(images_u8)
    u = torch.rand(x.shape[0], generator=gen, device=x.device)
    tau = vp.importance_time(u).to(torch.float32)
    eps = torch.randn(x.shape, generator=gen, device=x.device)
    return vp.perturb(x, tau, eps), tau

def _generator(device, *keys):
    g = torch.Generator(device)
    g.manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))
    return g

#----------------------------------------------------------------------------

def build(classifier_path, cond=False, lora_rank=0, lora_alpha=1.0, head_width=128, head_depth=2, num_classes=1000, seed=0,
          time_schedule=None):
    """Fresh discriminator (frozen classifier, trainable head and adapters) and the classifier's hash/args.

    time_schedule: the time the classifier is fed in training, and recorded for
    sampling; None: the classifier's own (cosine for a 64x64 ADM classifier).
    """
    classifier, cls_args, sha = load_classifier(classifier_path, lora_alpha)  # alpha scales a study file's adapters too
    torch.manual_seed(seed)
    if lora_rank:
        lora_lib.apply_lora(classifier, lora_rank, lora_alpha)
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

@torch.no_grad()
def evaluate(disc, images_u8, targets, labels=None, batch=256, seed=0, device='cpu'):
    """BCE loss and accuracy on real / fake at importance-sampled times (fixed seed)."""
    disc.eval()
    gen = _generator(device, seed, 999)
    total, correct_r, correct_f, n_r, n_f = 0.0, 0, 0, 0, 0
    for i in range(0, len(images_u8), batch):
        x, tau = noisy_batch(images_u8[i:i + batch].to(device), gen)
        y = targets[i:i + batch].to(device)
        lab = None if labels is None else labels[i:i + batch].to(device)
        logits = disc_logits(disc, x, tau, lab, False).float()
        total += F.binary_cross_entropy_with_logits(logits, y, reduction='sum').item()
        pred = logits > 0
        correct_r += (pred & (y == 1)).sum().item()
        correct_f += (~pred & (y == 0)).sum().item()
        n_r += (y == 1).sum().item()
        n_f += (y == 0).sum().item()
    return dict(loss=total / len(images_u8), acc_real=correct_r / max(n_r, 1), acc_fake=correct_f / max(n_f, 1))

#----------------------------------------------------------------------------
# Diagnostics per diffusion time (issue #14): at large tau the images are
# nearly pure noise and no discriminator can beat chance, so the overall
# accuracy is low even for a good one; what matters is accuracy at small tau.

TIME_BINS = 10         # equal bins of VP time tau in [0, 1]
EVAL_IMAGES = 256      # default evaluation images of each kind ...
EVAL_SHARE = 32        # ... but at most 1/EVAL_SHARE of the training images (evaluation <= ~1/3 of an epoch's forwards)
CHANCE_BINS = 2        # the warning looks at this many lowest bins ...
CHANCE_MARGIN = 0.05   # ... and fires when their mean accuracy is within this of 0.5 (or two standard errors) ...
CHANCE_AFTER = 3       # ... at the end of an epoch from this one on (or the last, in shorter runs) ...
CHANCE_MIN_IMAGES = 16  # ... given at least this many evaluation images of each kind.

def time_grid(num_bins=TIME_BINS):
    """(edges, centres) of num_bins equal bins of tau in [0, 1]; each bin is evaluated at its centre."""
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    return edges, (edges[:-1] + edges[1:]) / 2

@torch.no_grad()
def evaluate_by_time(disc, images_u8, targets, labels=None, num_bins=TIME_BINS, batch=256, seed=0, device='cpu',
                     precision='fp32'):
    """BCE loss and accuracy per tau bin, every image evaluated at every bin centre.

    The noise is drawn once per image from a generator keyed by seed alone and
    reused at every tau, so repeated calls (one per epoch) see the same noisy
    inputs and their numbers are comparable. Returns lists per bin and the
    log-ratios log(d / (1 - d)) (= the logits) of real and fake images at the
    lowest bin's centre.
    """
    disc.eval()
    device = torch.device(device)
    edges, centres = time_grid(num_bins)
    gen = _generator(device, seed, 1414)
    loss = torch.zeros(num_bins, dtype=torch.float64)
    hits = torch.zeros(2, num_bins, dtype=torch.float64)  # correct fake, correct real
    count = torch.zeros(2, dtype=torch.float64)
    low = [[], []]  # logits at the lowest bin: fake, real
    for i in range(0, len(images_u8), batch):
        x = to_float(images_u8[i:i + batch].to(device))
        eps = torch.randn(x.shape, generator=gen, device=device)
        y = targets[i:i + batch].to(device).float()
        lab = None if labels is None else labels[i:i + batch].to(device)
        is_real = (y == 1).cpu()
        count += torch.stack([(~is_real).sum(), is_real.sum()]).double()
        for b, tau_value in enumerate(centres):
            tau = torch.full((len(x),), float(tau_value), device=device)
            with autocast(device.type, precision):
                logits = disc_logits(disc, vp.perturb(x, tau, eps), tau, lab, False).float()
            loss[b] += F.binary_cross_entropy_with_logits(logits, y, reduction='sum').item()
            right = ((logits > 0) == (y == 1)).cpu()
            hits[0, b] += (right & ~is_real).sum().item()
            hits[1, b] += (right & is_real).sum().item()
            if b == 0:
                low[0].append(logits[~is_real.to(device)].cpu())
                low[1].append(logits[is_real.to(device)].cpu())
    acc_kind = hits / count.clamp(min=1)[:, None]
    return dict(bin_edges=edges.tolist(), bin_taus=centres.tolist(),
                loss_by_tau=(loss / max(len(images_u8), 1)).tolist(),
                acc_by_tau=acc_kind.mean(0).tolist(), acc_real_by_tau=acc_kind[1].tolist(), acc_fake_by_tau=acc_kind[0].tolist(),
                log_ratio_tau=float(centres[0]), log_ratio_real=torch.cat(low[1]).numpy(), log_ratio_fake=torch.cat(low[0]).numpy())

def chance_warning(rec, epochs):
    """The one-line warning for a discriminator at chance where it should not be, or None.

    Rule: from epoch min(CHANCE_AFTER, epochs) on, with n >= CHANCE_MIN_IMAGES
    evaluation images of each kind, the mean accuracy of the CHANCE_BINS lowest
    tau bins is within max(CHANCE_MARGIN, 1 / sqrt(2 n)) of 0.5; the second
    term is two standard errors of one bin's accuracy at chance (2n images),
    so that small evaluation sets do not miss a discriminator at chance.
    """
    acc = rec.get('acc_by_tau')
    n = rec.get('eval_images', 0)
    if not acc or n < CHANCE_MIN_IMAGES or rec['epoch'] < min(CHANCE_AFTER, epochs):
        return None
    edges = rec['bin_edges']
    low = float(np.mean(acc[:CHANCE_BINS]))
    if abs(low - 0.5) > max(CHANCE_MARGIN, 1 / np.sqrt(2 * n)):
        return None
    return (f'Warning: after {rec["epoch"]} epochs the discriminator is at chance even at small times (accuracy {low:.3f} '
            f'for tau < {edges[CHANCE_BINS]:.2f}, {rec["eval_set"]} images); check that real and fake images go through '
            f'the same quantisation (uint8 PNGs / the same .npz rounding), the learning rate (--lr), the number of epochs, '
            f'and that the classifier matches the data\'s resolution')

def train_step(disc, opt, scaler, images_u8, y, labels, gen, params, lora_on, precision='fp32', channels_last=False, world=1):
    """One optimisation step on a batch of uint8 images; returns (loss, logits)."""
    x, tau = noisy_batch(images_u8, gen)
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
          snap=1, precision='fp32', channels_last=False, resume=False, device='cpu', progress=True, log=print,
          stop_after_steps=None, time_schedule=None, eval_images=None, holdout=False):
    """Train a discriminator; writes disc-EEEE.pt per snapshot, metrics.jsonl, training-curves.png.

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
    if batch % world:
        raise ValueError(f'--batch={batch} must be divisible by the number of processes ({world})')
    os.makedirs(outdir, exist_ok=True)
    if rank == 0:
        dgio.remove_stale_temps(outdir)  # From a killed run.
    dist.barrier()
    state_path = os.path.join(outdir, STATE_FILE)
    if os.path.isfile(state_path) and not resume:
        raise ValueError(f'{outdir}: already holds a training run; pass --resume to continue it or choose another --outdir')

    images, targets, labels = load_pair(real, fake, num, cond, log)
    fake_seeds = fake_seed_ranges(fake, len(images) // 2, log)  # held-out fakes included: their seeds are used too
    images, targets, labels, (eval_images_u8, eval_targets, eval_labels) = split_eval(images, targets, labels, eval_images, holdout)
    eval_n = len(eval_images_u8) // 2
    eval_set = 'held-out' if holdout else 'training'
    disc, sha, cls_args = build(classifier_path, cond, lora_rank, lora_alpha, head_width, head_depth, num_classes, seed,
                                time_schedule)
    log(f'Classifier time convention: {disc.time_schedule} (used in training and recorded in every checkpoint for sampling)')
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

    lora_on = lora_rank > 0
    n = len(images)
    steps_per_epoch = max(n // batch, 1)
    local = batch // world
    config = dict(real=real, fake=fake, classifier=classifier_path, epochs=epochs, batch=batch, lr=lr,
                  weight_decay=weight_decay, cond=cond, num=n // 2, lora_rank=lora_rank, lora_alpha=lora_alpha,
                  head_width=head_width, head_depth=head_depth, seed=seed, precision=precision, world_size=world,
                  time_schedule=disc.time_schedule, eval_images=eval_n, holdout=holdout)
    if rank == 0:
        dgio.atomic_write_json(os.path.join(outdir, 'config.json'), config, indent=2)
    last = None
    steps_done = 0
    warned = False
    for epoch in range(start_epoch, epochs):
        disc.head.train()
        perm = torch.randperm(n, generator=_generator('cpu', seed, epoch)).to(device)
        gen = _generator(device, seed, epoch, rank + 1)
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
                dgio.atomic_torch_save(ckpt, last)
            dgio.atomic_torch_save(dict(epoch=epoch + 1, head=ckpt['head'], lora=ckpt['lora'], optimizer=opt.state_dict(),
                                        classifier_sha256=sha, time_schedule=disc.time_schedule), state_path)
            _append_metrics(outdir, rec)
            plot_metrics(outdir)
            log(f'epoch {epoch + 1}/{epochs}: loss {rec["loss"]:.4f}, acc real {rec["acc_real"]:.3f}, '
                f'fake {rec["acc_fake"]:.3f}, {rec["images_per_s"]:.1f} img/s' + _time_summary(rec))
            warning = None if warned else chance_warning(rec, epochs)
            if warning:
                log(warning)
                warned = True
        dist.barrier()
    return last

def _append_metrics(outdir, rec):
    """metrics.jsonl keeps one line per epoch; a resumed run replaces lines of redone epochs."""
    path = os.path.join(outdir, 'metrics.jsonl')
    lines = read_metrics(outdir)
    lines = [l for l in lines if l['epoch'] < rec['epoch']] + [rec]
    dgio.atomic_write_text(path, ''.join(json.dumps(l) + '\n' for l in lines))

def read_metrics(outdir):
    path = os.path.join(outdir, 'metrics.jsonl')
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]

def plot_metrics(outdir):
    """training-curves.png: loss and accuracy (real, fake) per epoch on the training stream; with per-time
    evaluations also accuracy vs tau for a few epochs and a heatmap of accuracy over epochs x tau bins."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    recs = read_metrics(outdir)
    if not recs:
        return
    timed = [r for r in recs if r.get('acc_by_tau')]
    ep = [r['epoch'] for r in recs]
    fig = Figure(figsize=(9, 6.4 if timed else 3.2))
    axes = fig.subplots(2 if timed else 1, 2, squeeze=False)
    a1, a2 = axes[0]
    a1.plot(ep, [r['loss'] for r in recs], marker='o')
    a1.set_xlabel('epoch'); a1.set_ylabel('BCE loss (training)'); a1.grid(alpha=0.3)
    a2.plot(ep, [r['acc_real'] for r in recs], marker='o', label='real')
    a2.plot(ep, [r['acc_fake'] for r in recs], marker='o', label='fake')
    a2.axhline(0.5, color='gray', lw=0.8, ls='--')
    a2.set_xlabel('epoch'); a2.set_ylabel('accuracy (training)'); a2.legend(); a2.grid(alpha=0.3)
    for ax in (a1, a2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if timed:
        a3, a4 = axes[1]
        shown = sorted({timed[round(k * (len(timed) - 1) / 3)]['epoch'] for k in range(4)})
        colors = {e: c for e, c in zip(shown, ('0.75', '0.55', '0.3', 'C0')[-len(shown):])}
        for r in timed:
            if r['epoch'] in colors:
                a3.plot(r['bin_taus'], r['acc_by_tau'], marker='o', color=colors[r['epoch']], label=f'epoch {r["epoch"]}')
        a3.axhline(0.5, color='gray', lw=0.8, ls='--')
        a3.set_xlim(0, 1); a3.set_xlabel('VP time tau (bin centre)')
        a3.set_ylabel(f'accuracy ({timed[-1].get("eval_set", "")} images)'); a3.legend(fontsize=8); a3.grid(alpha=0.3)
        grid = np.array([r['acc_by_tau'] for r in timed])
        im = a4.imshow(grid, aspect='auto', origin='lower', cmap='viridis', vmin=0.5, vmax=1.0, interpolation='nearest',
                       extent=(0, 1, timed[0]['epoch'] - 0.5, timed[-1]['epoch'] + 0.5))
        a4.set_xlabel('VP time tau'); a4.set_ylabel('epoch'); a4.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=a4, label='accuracy (< 0.5 shown as 0.5)')
    fig.tight_layout()
    dgio.save_figure(fig, os.path.join(outdir, 'training-curves.png'))

def plot_log_ratios(outdir, real, fake, tau, epoch, eval_set='held-out'):
    """log-ratio-histogram.png: log(d / (1 - d)) of real and fake evaluation images at VP time tau."""
    from matplotlib.figure import Figure
    both = np.concatenate([real, fake])
    lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) else (-1.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 41)
    fig = Figure(figsize=(5.5, 3.5))
    ax = fig.subplots()
    ax.hist(np.clip(real, bins[0], bins[-1]), bins=bins, alpha=0.6, label=f'real ({len(real)})', color='C0')
    ax.hist(np.clip(fake, bins[0], bins[-1]), bins=bins, alpha=0.6, label=f'fake ({len(fake)})', color='C1')
    ax.axvline(0, color='gray', lw=0.8, ls='--')
    ax.set_xlabel('log-ratio log(d / (1 - d))'); ax.set_ylabel('images')
    ax.set_title(f'{eval_set} images at tau = {tau:.3g}, epoch {epoch}', fontsize=10)
    ax.legend(); ax.grid(alpha=0.3)
    fig.tight_layout()
    dgio.save_figure(fig, os.path.join(outdir, 'log-ratio-histogram.png'))

def _time_summary(rec):
    """', acc by tau 0.98 ... 0.51 (held-out)' for the epoch's log line, or ''."""
    acc = rec.get('acc_by_tau')
    if not acc:
        return ''
    return f', acc by tau {" ".join(f"{a:.2f}" for a in acc)} ({rec["eval_set"]}, tau bins of {rec["bin_edges"][1]:.2g})'
