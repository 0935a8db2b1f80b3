"""Discriminator diagnostics: evaluation per diffusion time, the chance warning, metrics.jsonl and plots.

At large VP time tau the images are nearly pure noise and no discriminator can
beat chance, so the overall accuracy is low even for a good one; what matters
is the accuracy at small tau (docs/compat.md §5). Every epoch of
`edm_dg.disc_training.train` evaluates held-out (or training) images at the
centre of each tau bin, and the log-ratio at the lowest bin is the head's
logit, log(d / (1 - d)) without the clipping guidance applies
(`edm_dg.sampling.score`).
"""

import json
import os

import numpy as np
import torch
from torch.nn import functional as F

from . import fileio
from . import vp
from .precision import autocast

TIME_BINS = 10         # equal bins of VP time tau in [0, 1]
EVAL_IMAGES = 256      # default evaluation images of each kind ...
EVAL_SHARE = 32        # ... but at most 1/EVAL_SHARE of the training images (evaluation <= ~1/3 of an epoch's forwards)
CHANCE_BINS = 2        # the warning looks at this many lowest bins ...
CHANCE_MARGIN = 0.05   # ... and fires when their mean accuracy is within this of 0.5 (or two standard errors) ...
CHANCE_AFTER = 3       # ... at the end of an epoch from this one on (or the last, in shorter runs) ...
CHANCE_MIN_IMAGES = 16  # ... given at least this many evaluation images of each kind.


#----------------------------------------------------------------------------
# Evaluation sets and evaluation.

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

@torch.no_grad()
def evaluate(disc, images_u8, targets, labels=None, batch=256, seed=0, device='cpu'):
    """BCE loss and accuracy on real / fake at importance-sampled times (fixed seed)."""
    disc.eval()
    gen = vp.seeded_generator(device, seed, 999)
    total, correct_r, correct_f, n_r, n_f = 0.0, 0, 0, 0, 0
    for i in range(0, len(images_u8), batch):
        x, tau = vp.noisy_batch(images_u8[i:i + batch].to(device), gen)
        y = targets[i:i + batch].to(device)
        lab = None if labels is None else labels[i:i + batch].to(device)
        logits = disc.logits(x, tau, lab).float()
        total += F.binary_cross_entropy_with_logits(logits, y, reduction='sum').item()
        pred = logits > 0
        correct_r += (pred & (y == 1)).sum().item()
        correct_f += (~pred & (y == 0)).sum().item()
        n_r += (y == 1).sum().item()
        n_f += (y == 0).sum().item()
    return dict(loss=total / len(images_u8), acc_real=correct_r / max(n_r, 1), acc_fake=correct_f / max(n_f, 1))

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
    gen = vp.seeded_generator(device, seed, 1414)
    loss = torch.zeros(num_bins, dtype=torch.float64)
    hits = torch.zeros(2, num_bins, dtype=torch.float64)  # correct fake, correct real
    count = torch.zeros(2, dtype=torch.float64)
    low = [[], []]  # logits at the lowest bin: fake, real
    for i in range(0, len(images_u8), batch):
        x = vp.to_float(images_u8[i:i + batch].to(device))
        eps = torch.randn(x.shape, generator=gen, device=device)
        y = targets[i:i + batch].to(device).float()
        lab = None if labels is None else labels[i:i + batch].to(device)
        is_real = (y == 1).cpu()
        count += torch.stack([(~is_real).sum(), is_real.sum()]).double()
        for b, tau_value in enumerate(centres):
            tau = torch.full((len(x),), float(tau_value), device=device)
            with autocast(device.type, precision):
                logits = disc.logits(vp.perturb(x, tau, eps), tau, lab).float()
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

#----------------------------------------------------------------------------
# metrics.jsonl and the plots.

def append_metrics(outdir, rec):
    """metrics.jsonl keeps one line per epoch; a resumed run replaces lines of redone epochs."""
    path = os.path.join(outdir, 'metrics.jsonl')
    lines = read_metrics(outdir)
    lines = [l for l in lines if l['epoch'] < rec['epoch']] + [rec]
    fileio.atomic_write_text(path, ''.join(json.dumps(l) + '\n' for l in lines))

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
    fileio.save_figure(fig, os.path.join(outdir, 'training-curves.png'))

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
    fileio.save_figure(fig, os.path.join(outdir, 'log-ratio-histogram.png'))

def time_summary(rec):
    """', acc by tau 0.98 ... 0.51 (held-out)' for the epoch's log line, or ''."""
    acc = rec.get('acc_by_tau')
    if not acc:
        return ''
    return f', acc by tau {" ".join(f"{a:.2f}" for a in acc)} ({rec["eval_set"]}, tau bins of {rec["bin_edges"][1]:.2g})'
