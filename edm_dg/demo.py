"""The end-to-end DG demo on real data that ships with scikit-learn (8x8 digits), offline, on a CPU.

    python -m edm_dg.demo --outdir=demo-out            # (make demo) shipped base model + classifier
    python -m edm_dg.demo --outdir=demo-out --from_scratch   # (make demo-from-scratch) retrain them first

Every stage runs the command a GPU user runs (fid.py, generate_dg.py,
train_disc.py, stats.py); the demo only chains them, times them and writes
demo-out/report.md.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import click
import numpy as np
import torch

from . import grid as gridlib
from . import fileio
from .digits import digits_u8, train_feature_net, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, 'demo')
BASE_PKL = 'base-edm-digits.pkl'
CLASSIFIER = 'classifier-digits.pt'
FEATURES = 'fid-digits-cnn.pt'

class Stages:
    """Runs commands, prints and records each stage's wall time."""

    def __init__(self):
        self.times = []

    def run(self, name, fn):
        print(f'\n=== {name}', flush=True)
        t0 = time.time()
        out = fn()
        self.times.append((name, time.time() - t0))
        print(f'=== {name}: {self.times[-1][1]:.1f}s', flush=True)
        return out

def cli(*args):
    """Run one of the project's commands as a user would; raise with its last error line on failure."""
    cmd = [sys.executable, *args]
    print('$ ' + ' '.join(os.path.relpath(a, os.getcwd()) if os.path.isabs(a) and a.startswith(ROOT) else a for a in args), flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env, cwd=ROOT)
    if p.stdout:
        print(p.stdout, end='', flush=True)
    if p.returncode != 0:
        raise click.ClickException(f'stage failed: {" ".join(args[:2])} (exit {p.returncode})')
    return p.stdout

def script(name):
    return os.path.join(ROOT, name)

#----------------------------------------------------------------------------

def build_models(models_dir, images, labels, toy, log=print):
    """Train the base EDM model, the ADM feature extractor and the FID feature net (make demo-from-scratch)."""
    from .train_base import train_edm
    from .train_classifier import train_classifier
    os.makedirs(models_dir, exist_ok=True)
    train_edm(images, labels, os.path.join(models_dir, BASE_PKL), steps=20 if toy else 400, batch=64 if toy else 256,
              model_kwargs=dict(model_channels=16, num_blocks=1) if toy else None,
              dataset_kwargs=dict(name='sklearn-digits-dequantised', resolution=8))
    data_dir = os.path.join(models_dir, 'data-for-classifier')
    write_dataset(data_dir, images, labels)
    path = train_classifier(data_dir, os.path.join(models_dir, 'classifier-run'), epochs=1 if toy else 40, batch=128,
                            width=64, depth=1 if toy else 2, progress=False, log=log)
    shutil.copy(path, os.path.join(models_dir, CLASSIFIER))
    shutil.rmtree(data_dir)
    train_feature_net(images, labels, os.path.join(models_dir, FEATURES), epochs=1 if toy else 30, log=log)

def sample_grid(path, plain_dir, guided_dir, seeds, scale=4):
    """Plain (top row) vs. guided (bottom row) images of the same seeds, upscaled."""
    rows = [gridlib.tile(gridlib.folder_images(d, seeds), cols=len(seeds)) for d in (plain_dir, guided_dir)]
    gridlib.save(path, np.concatenate(rows, axis=0), scale=scale)

def fid_of(images_dir, ref, detector, num):
    out = cli(script('fid.py'), 'calc', f'--images={images_dir}', f'--ref={ref}', f'--num_images={num}',
              f'--detector={detector}', '--batch=256')
    return float(out.strip().splitlines()[-1])

#----------------------------------------------------------------------------

@click.command(help=__doc__)
@click.option('--outdir', default='demo-out', show_default=True, help='Output folder (report.md and everything it shows)')
@click.option('--from_scratch', '--from-scratch', 'from_scratch', is_flag=True, help='Retrain the base model, classifier and FID features first')
@click.option('--toy', is_flag=True, help='Seconds-long smoke run with tiny sizes (for tests)')
@click.option('--num', 'num', type=click.IntRange(min=8), default=2000, show_default=True, help='Samples per seed set')
@click.option('--sets', type=click.IntRange(min=2), default=3, show_default=True, help='Seed sets (paired plain vs. DG)')
@click.option('--w', 'w', type=float, default=1.0, show_default=True, help='DG weight (dg_weight_1st_order)')
@click.option('--epochs', type=click.IntRange(min=1), default=8, show_default=True, help='Discriminator epochs')
@click.option('--steps', type=click.IntRange(min=2), default=10, show_default=True, help='Sampler steps')
def main(outdir, from_scratch, toy, num, sets, w, epochs, steps):
    t_start = time.time()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if toy:
        num, epochs, steps, from_scratch = min(num, 24), min(epochs, 2), min(steps, 3), True
    outdir = os.path.abspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    st = Stages()
    images, labels = digits_u8(seed=0)
    data = os.path.join(outdir, 'data')
    st.run('dataset: 1,797 scikit-learn digits, dequantised to 8 bits', lambda: write_dataset(data, images, labels))

    models = os.path.join(outdir, 'models') if from_scratch else ASSETS
    if from_scratch:
        st.run('models: base EDM, ADM classifier, FID feature net (from scratch)', lambda: build_models(models, images, labels, toy))
    for f in (BASE_PKL, CLASSIFIER, FEATURES):
        if not os.path.isfile(os.path.join(models, f)):
            raise click.ClickException(f'{os.path.join(models, f)} missing; run make demo-from-scratch')
    net, cls, det = (os.path.join(models, f) for f in (BASE_PKL, CLASSIFIER, FEATURES))
    ref = os.path.join(outdir, 'ref.npz')
    st.run('fid.py ref: statistics of the real digits', lambda: cli(script('fid.py'), 'ref', f'--data={data}', f'--dest={ref}', f'--detector={det}', '--batch=512'))

    gen = [script('generate_dg.py'), f'--network={net}', f'--steps={steps}', '--batch=256']
    fake = os.path.join(outdir, 'fake')
    n_train = 32 if toy else len(images)
    st.run(f'generate_dg.py: {n_train} plain EDM samples for training', lambda: cli(*gen, f'--outdir={fake}', f'--seeds=1000000-{1000000 + n_train - 1}'))
    disc_run = os.path.join(outdir, 'disc')
    st.run('train_disc.py: discriminator on real vs. plain samples', lambda: cli(
        script('train_disc.py'), f'--real={data}', f'--fake={fake}', f'--classifier={cls}', f'--outdir={disc_run}',
        f'--epochs={epochs}', '--batch=128' if not toy else '--batch=16', '--lr=1e-3', '--head_width=64', '--head_depth=1', '--resume'))
    last = os.path.join(disc_run, f'disc-{epochs:04d}.pt')

    results = []
    dg = [f'--disc={last}', f'--classifier={cls}', f'--dg_weight_1st_order={w}']
    def eval_set(k):
        seeds = f'{k * 100000}-{k * 100000 + num - 1}'
        plain_dir, dg_dir = os.path.join(outdir, 'samples', f'set{k}-plain'), os.path.join(outdir, 'samples', f'set{k}-dg')
        cli(*gen, f'--outdir={plain_dir}', f'--seeds={seeds}')
        cli(*gen, *dg, f'--outdir={dg_dir}', f'--seeds={seeds}')
        results.append(dict(set=k, seeds=seeds, plain=fid_of(plain_dir, ref, det, num), dg=fid_of(dg_dir, ref, det, num)))
    for k in range(1, sets + 1):
        st.run(f'seed set {k}: plain vs. DG (w={w}), {num} samples each, FID', lambda k=k: eval_set(k))

    ep_dir = os.path.join(outdir, 'fid-epochs')
    st.run('fid.py epochs: FID of DG samples per discriminator epoch', lambda: cli(
        script('fid.py'), 'epochs', f'--run_dir={disc_run}', '--every=2', f'--network={net}', f'--classifier={cls}', f'--ref={ref}',
        f'--outdir={ep_dir}', f'--seeds=1-{max(num // 2, 8)}', f'--steps={steps}', f'--dg_weight_1st_order={w}', '--batch=256', f'--detector={det}'))

    def write_stats():
        for key in ('plain', 'dg'):
            with fileio.atomic_open(os.path.join(outdir, f'fid_{key}.csv'), 'w') as f:
                wr = csv.writer(f)
                wr.writerow(['set', 'fid'])
                wr.writerows([[r['set'], f'{r[key]:.6f}'] for r in results])
        cli(script('stats.py'), f'--a={os.path.join(outdir, "fid_dg.csv")}', f'--b={os.path.join(outdir, "fid_plain.csv")}',
            '--paired', f'--json={os.path.join(outdir, "stats.json")}')
    st.run('stats.py: paired comparison over seed sets', write_stats)
    sample_grid(os.path.join(outdir, 'samples-plain-vs-dg.png'), os.path.join(outdir, 'samples', 'set1-plain'),
                os.path.join(outdir, 'samples', 'set1-dg'), list(range(100000, 100000 + min(16, num))))
    with open(os.path.join(outdir, 'stats.json')) as f:
        s = json.load(f)
    total = time.time() - t_start
    write_report(outdir, results, s, st.times, total, w, num, epochs, steps, from_scratch, det)
    print(f'\nDemo done in {total:.0f}s: FID plain {s["b"]["mean"]:.3f} +- {s["b"]["std"]:.3f}, DG {s["a"]["mean"]:.3f} +- '
          f'{s["a"]["std"]:.3f} over {len(results)} seed sets (paired p={s["paired"]["p"]:.3g}): {verdict(s)}. '
          f'Report: {os.path.join(outdir, "report.md")}')

def verdict(s):
    """Plain-language result of the paired comparison (a = DG, b = plain)."""
    if s['paired']['p'] >= 0.05:
        return 'guidance does not change FID significantly at this budget'
    if s['a']['mean'] < s['b']['mean']:
        return 'guidance lowers FID consistently at this budget'
    return 'guidance raises (worsens) FID consistently at this budget'

def write_report(outdir, results, s, times, total, w, num, epochs, steps, from_scratch, det):
    metrics_path = os.path.join(outdir, 'disc', 'metrics.jsonl')
    with open(metrics_path) as f:
        last = [json.loads(l) for l in f if l.strip()][-1]
    lines = ['# edm-dg demo: discriminator guidance on 8x8 digits', '',
             f'Real data: scikit-learn\'s 1,797 handwritten digits (dequantised to 8 bits). Base model: EDM (SongUNet) '
             f'{"trained by this run" if from_scratch else "shipped in demo/ (make demo-from-scratch retrains it)"}. '
             f'Discriminator: frozen noise-conditional ADM classifier + head, {epochs} epochs of train_disc.py. '
             f'Sampling: EDM Heun, {steps} steps; DG weight w1 = {w}. {num} samples per seed set.', '',
             '## FID, plain EDM vs. EDM + DG (same seeds)', '',
             '| seed set | seeds | FID plain | FID DG | change |', '|---|---|---|---|---|']
    for r in results:
        lines.append(f'| {r["set"]} | {r["seeds"]} | {r["plain"]:.4f} | {r["dg"]:.4f} | {100 * (r["dg"] / r["plain"] - 1):+.1f}% |')
    lines += [f'| mean +- std | | {s["b"]["mean"]:.4f} +- {s["b"]["std"]:.4f} | {s["a"]["mean"]:.4f} +- {s["a"]["std"]:.4f} | '
              f'{100 * (s["a"]["mean"] / s["b"]["mean"] - 1):+.1f}% |', '',
              f'Paired t-test (DG vs. plain over seed sets): t = {s["paired"]["t"]:.3f}, p = {s["paired"]["p"]:.3g}; '
              f'Welch: p = {s["welch"]["p"]:.3g} (stats.py).', '']
    lines += [f'**Verdict:** {verdict(s)} (paired t-test over seed sets, 5% level); the numbers are reported as measured.', '',
              '**FID features.** FID uses the 128-d pooled features of a separately trained plain CNN digit classifier '
              f'(`{os.path.basename(det)}`: no noise conditioning, no attention, trained on clean digits), not the '
              'discriminator\'s ADM features, so the discriminator cannot tune itself to the metric. Inception at 299x299 '
              'runs at about 5 images/s here, too slow for this budget, and is meaningless on 8x8 digits.', '',
              '## Samples (top: plain EDM, bottom: EDM + DG, same seeds)', '', '![samples](samples-plain-vs-dg.png)', '',
              '## Discriminator training', '',
              f'Final epoch: loss {last["loss"]:.4f}, accuracy real {last["acc_real"]:.3f}, fake {last["acc_fake"]:.3f}.', '',
              '![training curves](disc/training-curves.png)', '', '## FID against discriminator epoch', '',
              '![fid vs epoch](fid-epochs/fid_epochs.png)', '', '## Stage times', '', '| stage | seconds |', '|---|---|']
    lines += [f'| {name} | {sec:.1f} |' for name, sec in times] + [f'| **total** | **{total:.1f}** |', '']
    fileio.atomic_write_text(os.path.join(outdir, 'report.md'), '\n'.join(lines))

if __name__ == '__main__':
    main()
