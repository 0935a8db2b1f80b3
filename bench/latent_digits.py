"""DG in a latent space, on the digits: plain vs. discriminator-guided FID of a latent EDM2 toy, same seeds.

The digits (edm_dg/digits.py) are encoded by a tiny VAE trained here (edm_dg/train_vae.py, 1x8x8 pixels ->
4x8x8 latents, EDM2's [0, 1] input convention); a small EDM2 network is trained on its standardised latents
(edm_dg/train_base.py: train_edm2) and pickled with a StabilityVAEEncoder, so the commands treat it as EDM2's
latent models: generate_dg.py --vae decodes, --save_latents gives the fakes, a noise-conditional ADM classifier
is trained on the latents (python -m edm_dg.train_classifier --encoder), the head on real vs. generated latents
(train_disc.py), then plain and DG samples of --sets seed sets are scored with the demo's FID features and
compared by a paired t-test (stats.py). Every stage is skipped when its output exists (rerun to resume).

    python bench/latent_digits.py --outdir=latent-digits [--num=2000 --sets=3 --w=1]
"""

import csv
import json
import os
import subprocess
import sys
import time

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from edm_dg import latents  # pylint: disable=wrong-import-position
from edm_dg.digits import digits_u8, write_dataset  # pylint: disable=wrong-import-position

ASSETS = os.path.join(ROOT, 'demo')

def cli(*args):
    """Run one of the repository's commands; its stdout, or SystemExit with its error."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f'{" ".join(args[:2])} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}')
    return p.stdout

def fid_of(folder, ref, det, num):
    out = os.path.join(folder, 'fid.json')
    if not os.path.isfile(out):
        cli('fid.py', 'calc', f'--images={folder}', f'--ref={ref}', f'--num_images={num}', f'--detector={det}', '--batch=256',
            f'--json={out}')
    return json.load(open(out))['fid']

@click.command(help=__doc__)
@click.option('--outdir', required=True, metavar='DIR', help='Working folder (resumable)')
@click.option('--num', type=click.IntRange(min=8), default=2000, show_default=True, help='Samples per seed set')
@click.option('--sets', type=click.IntRange(min=1), default=3, show_default=True, help='Seed sets')
@click.option('--w', type=float, default=1.0, show_default=True, help='DG weight w1')
@click.option('--steps', type=click.IntRange(min=2), default=10, show_default=True, help='Heun steps')
@click.option('--base_steps', type=click.IntRange(min=1), default=400, show_default=True, help='Training steps of the latent EDM2 model')
def main(outdir, num, sets, w, steps, base_steps):
    from edm_dg.train_base import train_edm2
    from edm_dg.train_vae import train_vae
    from training.encoders import StabilityVAEEncoder
    os.makedirs(outdir, exist_ok=True)
    times = {}
    stage = lambda name, t0: times.__setitem__(name, round(time.time() - t0, 1))
    images, labels = digits_u8(seed=0)
    data, vae_dir, det = os.path.join(outdir, 'data'), os.path.join(outdir, 'vae'), os.path.join(ASSETS, 'fid-digits-cnn.pt')
    ref, base = os.path.join(outdir, 'ref.npz'), os.path.join(outdir, 'latent-edm2-digits.pkl')
    real_latents = os.path.join(outdir, 'latents-real')
    t0 = time.time()
    if not os.path.isfile(ref):
        write_dataset(data, images, labels)
        cli('fid.py', 'ref', f'--data={data}', f'--dest={ref}', f'--detector={det}', '--batch=512')
    if not os.path.isdir(vae_dir):
        train_vae(images, vae_dir, steps=300, batch=64, lr=3e-3, progress=False)
    stage('vae', t0)
    stats = json.load(open(os.path.join(vae_dir, 'latent_stats.json')))
    # sample_std: the spread of posterior draws, so that the final latents have std 0.5 in every channel.
    enc = StabilityVAEEncoder(vae_name='digits-tiny-vae', raw_mean=stats['raw_mean'], raw_std=stats['sample_std'], batch_size=256)
    t0 = time.time()
    if not os.path.isdir(real_latents):
        latents.prepare_encoder(enc, 'cpu', vae=vae_dir)
        raw = latents.encode_images(enc, images)
        latents.write_raw_dataset(real_latents + '.tmp', raw, labels)
        os.replace(real_latents + '.tmp', real_latents)
    raw, _ = latents.read_raw_dataset(real_latents)
    if not os.path.isfile(base):
        x = latents.standardise(raw, enc.scale, enc.bias, torch.Generator().manual_seed(0))
        train_edm2(x, labels, base, encoder=enc, steps=base_steps, batch=256, lr=1e-2,
                   model_kwargs=dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]), progress=False)
    stage('latents + base model', t0)
    gen = ['generate_dg.py', f'--network={base}', f'--vae={vae_dir}', f'--steps={steps}', '--batch=256', '--encoder_batch=256']
    cls_dir, fake, disc_dir = (os.path.join(outdir, n) for n in ('classifier', 'fake', 'disc'))
    t0 = time.time()
    if not os.path.isfile(os.path.join(cls_dir, 'classifier.pt')) or not os.path.isfile(os.path.join(cls_dir, 'done')):
        cli('-m', 'edm_dg.train_classifier', f'--data={real_latents}', f'--encoder={base}', f'--outdir={cls_dir}', '--epochs=40',
            '--batch=128', '--width=64', '--depth=2', '--resume')
        open(os.path.join(cls_dir, 'done'), 'w').close()
    stage('latent classifier', t0)
    t0 = time.time()
    cli(*gen, f'--outdir={fake}', f'--seeds=1000000-{1000000 + len(images) - 1}', '--save_latents')
    stage('fakes', t0)
    t0 = time.time()
    cli('train_disc.py', f'--real={real_latents}', f'--fake={fake}', f'--classifier={os.path.join(cls_dir, "classifier.pt")}',
        f'--outdir={disc_dir}', '--epochs=8', '--batch=128', '--lr=1e-3', '--head_width=64', '--head_depth=1')
    stage('latent discriminator', t0)
    disc = os.path.join(disc_dir, 'disc-0008.pt')
    last = [json.loads(l) for l in open(os.path.join(disc_dir, 'metrics.jsonl'))][-1]
    rows = []
    for k in range(1, sets + 1):
        seeds = f'{k * 100000}-{k * 100000 + num - 1}'
        row = dict(set=k, seeds=seeds)
        for name, extra in (('plain', []), ('dg', [f'--disc={disc}', f'--classifier={os.path.join(cls_dir, "classifier.pt")}', f'--w={w}'])):
            folder = os.path.join(outdir, 'samples', f'set{k}-{name}')
            t0 = time.time()
            text = cli(*gen, *extra, f'--outdir={folder}', f'--seeds={seeds}')
            row[f'{name}_s'] = round(time.time() - t0, 1)
            row[f'{name}_done'] = [l for l in text.splitlines() if l.startswith('Done:')][-1]
            row[name] = fid_of(folder, ref, det, num)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for name in ('plain', 'dg'):
        with open(os.path.join(outdir, f'fid_{name}.csv'), 'w', newline='') as f:
            wr = csv.writer(f)
            wr.writerow(['set', 'fid'])
            wr.writerows([[r['set'], r[name]] for r in rows])
    paired = None
    if sets >= 2:
        out = os.path.join(outdir, 'stats.json')
        cli('stats.py', f'--a={os.path.join(outdir, "fid_dg.csv")}', f'--b={os.path.join(outdir, "fid_plain.csv")}', '--paired',
            f'--json={out}')
        paired = json.load(open(out)).get('paired')
    summary = dict(rows=rows, paired=paired, vae_psnr=stats['recon_psnr'], disc_final=dict(
        loss=last['loss'], acc_real=last['acc_real'], acc_fake=last['acc_fake'], acc_by_tau=last.get('acc_by_tau')), times=times)
    with open(os.path.join(outdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))

if __name__ == '__main__':
    main()
