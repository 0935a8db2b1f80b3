"""FID over discriminator checkpoints and over a grid of one sampler setting, resumable.

Each evaluated point is one row of a CSV, written atomically as soon as its FID
is known; rerunning the same command skips points already in the CSV (and
reuses images already generated for an interrupted point).
"""

import csv
import glob
import os
import re
import shutil

import numpy as np

from torch_utils import distributed as dist
from . import fileio
from . import metrics
from .disc_checkpoint import load_discriminator
from .models import check_pair
from .generate import generate

SWEEPABLE = ('S_churn', 'S_min', 'S_max', 'S_noise', 'num_steps', 'dg_weight_1st_order', 'dg_weight_2nd_order',
             'time_min', 'time_max', 'boost_S_churn', 'boost_S_noise', 'boost_period', 'boost_weight_period', 'guidance')

def read_csv(path):
    if not os.path.isfile(path):
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))

def write_csv(path, rows, fields):
    with fileio.atomic_open(path, 'w') as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)

def record(csv_path, rows, row, key, img_dir, keep_images):
    """Add a finished point: rewrite the CSV sorted by `key` (rank 0), drop its images unless kept."""
    rows.append(row)
    rows.sort(key=lambda r: float(r[key]))
    if dist.get_rank() == 0:
        write_csv(csv_path, rows, list(row))
        if not keep_images:
            shutil.rmtree(img_dir, ignore_errors=True)
    dist.barrier()

def fid_of_samples(net, outdir, seeds, sampler_kwargs, ref, detector, device, batch, progress=True):
    """Generate `seeds` into outdir (resumable) and return their FID against ref=(mu, sigma)."""
    generate(net, outdir, seeds, device=device, max_batch_size=batch, sampler_kwargs=sampler_kwargs,
             resume=True, progress=progress)
    mu, sigma = metrics.source_stats(outdir, detector, len(seeds), 0, batch, device, progress=progress)
    return metrics.frechet_distance(mu, sigma, *ref)

def plot(path, xs, ys, xlabel, best_x=None, title=None):
    from matplotlib.figure import Figure
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.asarray(ys)[order]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.plot(xs, ys, marker='o')
    if best_x is not None:
        ax.plot([best_x], [ys[list(xs).index(best_x)]], marker='*', markersize=16, color='C3', label=f'best: {best_x:g}')
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel('FID')
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fileio.save_figure(fig, path)

def checkpoint_epochs(run_dir, every=1):
    """[(epoch, path)] of disc-EEEE.pt files, every k-th plus the last."""
    found = []
    for p in glob.glob(os.path.join(run_dir, 'disc-*.pt')):
        m = re.fullmatch(r'disc-(\d+)\.pt', os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    found.sort()
    if not found:
        raise ValueError(f'{run_dir}: no disc-*.pt checkpoints; pass a train_disc.py run folder')
    keep = found[every - 1::every]
    if found[-1] not in keep:
        keep.append(found[-1])
    return keep

def fid_over_epochs(net, run_dir, classifier_path, seeds, ref, detector, outdir, device, sampler_kwargs,
                    every=1, batch=64, keep_images=False, log=print, progress=True, disc_kwargs=None):
    """FID of guided samples for each checkpoint of a discriminator run; writes fid_epochs.csv/.png."""
    csv_path = os.path.join(outdir, 'fid_epochs.csv')
    rows = read_csv(csv_path)
    done = {int(r['epoch']) for r in rows}
    for epoch, ckpt in checkpoint_epochs(run_dir, every):
        if epoch in done:
            continue
        disc = load_discriminator(ckpt, classifier_path, device=device, **(disc_kwargs or {}))
        check_pair(net, disc, '--network', ckpt, classifier_path)
        img_dir = os.path.join(outdir, 'images', f'epoch-{epoch:04d}')
        fid = fid_of_samples(net, img_dir, seeds, dict(sampler_kwargs, discriminator=disc), ref, detector, device, batch, progress)
        record(csv_path, rows, dict(epoch=epoch, checkpoint=ckpt, fid=f'{fid:.6f}', num=len(seeds)), 'epoch', img_dir, keep_images)
        log(f'epoch {epoch}: FID {fid:.4f}')
    best = min(rows, key=lambda r: float(r['fid']))
    if dist.get_rank() == 0:
        plot(os.path.join(outdir, 'fid_epochs.png'), [int(r['epoch']) for r in rows], [float(r['fid']) for r in rows],
             'discriminator epoch', best_x=int(best['epoch']), title=f'FID-{len(seeds)} vs. epoch')
    return rows, best

def refine_values(values, fids, points):
    """`points` new values evenly between the best value's neighbours (rough-then-fine search)."""
    order = np.argsort(values)
    v = np.asarray(values, dtype=np.float64)[order]
    f = np.asarray(fids, dtype=np.float64)[order]
    i = int(np.argmin(f))
    lo, hi = v[max(i - 1, 0)], v[min(i + 1, len(v) - 1)]
    cand = np.linspace(lo, hi, points + 2)[1:-1]
    return [float(c) for c in cand if not np.any(np.isclose(c, v))]

def sweep(net, param, values, seeds, ref, detector, outdir, device, sampler_kwargs, refine=0, batch=64,
          keep_images=False, log=print, progress=True):
    """FID over values of one sampler setting (then `refine` points around the best); writes sweep_<param>.csv/.png."""
    if param not in SWEEPABLE:
        raise ValueError(f'cannot sweep "{param}"; choose one of {", ".join(SWEEPABLE)}')
    csv_path = os.path.join(outdir, f'sweep_{param}.csv')
    rows = read_csv(csv_path)
    def run(vals):
        for v in vals:
            if any(np.isclose(float(r['value']), v) for r in rows):
                continue
            kw = dict(sampler_kwargs)
            kw[param] = int(v) if param in ('num_steps', 'boost_period', 'boost_weight_period') else v
            img_dir = os.path.join(outdir, 'images', f'{param}={v:g}')
            fid = fid_of_samples(net, img_dir, seeds, kw, ref, detector, device, batch, progress)
            record(csv_path, rows, dict(param=param, value=f'{v:g}', fid=f'{fid:.6f}', num=len(seeds)), 'value', img_dir, keep_images)
            log(f'{param}={v:g}: FID {fid:.4f}')
    run([float(v) for v in values])
    if refine:
        run(refine_values([float(r['value']) for r in rows], [float(r['fid']) for r in rows], refine))
    best = min(rows, key=lambda r: float(r['fid']))
    if dist.get_rank() == 0:
        plot(os.path.join(outdir, f'sweep_{param}.png'), [float(r['value']) for r in rows], [float(r['fid']) for r in rows],
             param, best_x=float(best['value']), title=f'FID-{len(seeds)} vs. {param}')
    return rows, best
