"""generate_dg.py --rejection=diffrs and fid.py sweep with it: seed-exact images over batches and processes,
reused thresholds, the NFE budget, the file layouts it reads, and its one-line errors.

One warm-up (in the module fixture) makes the thresholds; the other runs reuse them with --rej_thresholds,
which keeps the tests fast. The head's output layer is scaled up so that the tiny discriminator's log ratios
spread by about 0.7 around +1 and steps are really rejected (the records show it).
"""

import json
import os

import numpy as np
import pytest
import torch

import fid
import generate_dg
from edm_dg import fileio
from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
from edm_dg.sampling import diffrs
from helpers import (assert_same_up_to_rounding, invoke, release_classifier, release_head, save_edm_pickle, tiny_classifier,
                     tiny_discriminator, tiny_edm, torchrun, write_fid_ref, TinyDetector)

SEEDS = '0-6'
STEPS = '--steps=4'
GAMMA = '--rej_percentile=0.6'

def pngs(outdir):
    """{relative path: decoded uint8 image} of a generate_dg.py folder."""
    out = {}
    for root, _, files in os.walk(outdir):
        for f in files:
            if f.endswith('.png'):
                p = os.path.join(root, f)
                out[os.path.relpath(p, outdir)] = fileio.read_image(p)
    return out

def png_bytes(outdir):
    return {k: open(os.path.join(outdir, k), 'rb').read() for k in pngs(outdir)}

def records(outdir):
    """(per-seed records by seed, the summary) of outdir/rejection.jsonl."""
    per_seed, summary = {}, []
    with open(os.path.join(outdir, diffrs.RECORD_NAME)) as f:
        for line in f:
            rec = json.loads(line)
            if 'summary' in rec:
                summary.append(rec['summary'])
            else:
                per_seed[rec['seed']] = rec
    assert len(summary) == 1  # one summary line, the last
    return per_seed, summary[0]

def gen(*args):
    code, out, errors = invoke(generate_dg.main, [*args, '--device=cpu'])
    assert code == 0 and not errors, out
    return out

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A conditional tiny net with a conditional edm-dg discriminator; a first DiffRS run (it warms up)."""
    d = tmp_path_factory.mktemp('diffrs')
    net = save_edm_pickle(tiny_edm(label_dim=10), str(d / 'net.pkl'))
    cls = tiny_classifier()
    torch.save(cls.state_dict(), d / 'cls.pt')
    disc = tiny_discriminator(cls, cond=True)
    with torch.no_grad():  # log ratios spread by about 0.7 around +1 at the top level (measured)
        out = disc.head.out[-1].c_proj
        out.weight.mul_(30)
        out.bias.mul_(30).add_(3)
    _, sha = read_weights(str(d / 'cls.pt'), 'classifier')
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), d / 'disc.pt')
    dg = [f'--network={net}', f'--disc={d / "disc.pt"}', f'--classifier={d / "cls.pt"}', f'--seeds={SEEDS}', STEPS,
          '--rejection=diffrs', GAMMA]
    out = gen(*dg, '--iter_warmup=1', '--batch=50', f'--outdir={d / "first"}')
    assert 'DiffRS: 7 images, mean NFE per image' in out
    th = str(d / 'first' / diffrs.THRESHOLDS_NAME)
    return dict(dir=d, dg=dg, th=th, net=net, cls=str(d / 'cls.pt'), disc=str(d / 'disc.pt'))

@pytest.fixture(scope='module')
def batch3(files):
    """The fixture's seeds again with --batch=3 and the saved thresholds."""
    out = files['dir'] / 'b3'
    gen(*files['dg'], '--batch=3', f'--rej_thresholds={files["th"]}', f'--outdir={out}')
    return out

def test_batch_sizes_and_saved_thresholds_give_the_same_images(files, batch3):
    """--batch=1 and --batch=3 with the first run's thresholds: the first run's images and records.

    The images of other batch sizes are compared as uint8 within one gray level on a tiny share of pixels
    (helpers.assert_same_up_to_rounding): the guided transition's float rounding depends on the batch. An accept
    decision would flip only where a uniform falls within that rounding of its threshold (probability ~1e-7
    per test), so the records, and the seeds' paths through the levels, are equal."""
    d = files['dir']
    first, first_rec = pngs(d / 'first'), records(d / 'first')
    assert len(first) == 7 and sorted(first_rec[0]) == list(range(7))
    assert sum(sum(r['rejections']) for r in first_rec[0].values()) > 0  # the tests reject steps
    gen(*files['dg'], '--batch=1', f'--rej_thresholds={files["th"]}', f'--outdir={d / "b1"}')
    for b in (1, 3):
        got = pngs(d / f'b{b}')
        assert sorted(got) == sorted(first)
        assert_same_up_to_rounding(np.stack([got[k] for k in sorted(got)]), np.stack([first[k] for k in sorted(first)]))
        assert records(d / f'b{b}') == first_rec
        with open(d / f'b{b}' / diffrs.THRESHOLDS_NAME) as f, open(files['th']) as g:
            assert json.load(f) == json.load(g)  # copied beside the images
    # The same batch again with the saved thresholds: the same bytes (same machine, same operations).
    gen(*files['dg'], '--batch=3', f'--rej_thresholds={files["th"]}', f'--outdir={d / "again"}')
    assert png_bytes(d / 'again') == png_bytes(batch3)

def test_torchrun_two_processes_same_images(files):
    d = files['dir']
    p = torchrun('generate_dg.py', *files['dg'], '--batch=2', f'--rej_thresholds={files["th"]}', f'--outdir={d / "tr"}',
                 '--device=cpu', '--npz')
    assert p.returncode == 0, p.stderr
    got, ref = pngs(d / 'tr'), pngs(d / 'first')
    assert sorted(got) == sorted(ref)
    assert_same_up_to_rounding(np.stack([got[k] for k in sorted(got)]), np.stack([ref[k] for k in sorted(ref)]))
    assert records(d / 'tr') == records(d / 'first')
    with open(d / 'tr' / 'dataset.json') as f, open(d / 'first' / 'dataset.json') as g:
        labels = dict(json.load(f)['labels'])
        assert labels == dict(json.load(g)['labels'])
    seeds = []  # Each rank's shards, written once its seeds are done, hold its PNGs' pixels and labels.
    for name in sorted(os.listdir(d / 'tr' / 'shards')):
        with np.load(d / 'tr' / 'shards' / name) as z:
            for seed, img, lab in zip(z['seeds'], z['samples'], z['label']):
                assert np.array_equal(img, got[f'{seed:06d}.png']) and labels[f'{seed:06d}.png'] == lab
                seeds.append(int(seed))
    assert sorted(seeds) == list(range(7))

def test_resume_skips_seeds_with_images(files):
    d = files['dir']
    out = d / 'resume'
    gen(*files['dg'], '--batch=3', f'--rej_thresholds={files["th"]}', f'--outdir={out}')
    before = png_bytes(out)
    os.remove(out / '000004.png')
    text = gen(*files['dg'], '--batch=3', f'--outdir={out}')  # the thresholds beside the images are reused
    assert 'Done: 1 generated, 6 already present' in text
    assert png_bytes(out) == before  # seed 4 alone in the queue: one slot; equal bytes (measured)
    per_seed, summary = records(out)
    assert sorted(per_seed) == list(range(7)) and summary['images'] == 7

def test_max_iter_bounds_every_seeds_nfe(files):
    """Euler, gamma = 1 (the warm-up maxima, from the stored warm-up values) and a budget of one pass plus one."""
    d = files['dir']
    gen(*files['dg'], '--sampler=euler', '--rej_percentile=1', '--max_iter=5', '--batch=4', '--w=0',
        f'--rej_thresholds={files["th"]}', f'--outdir={d / "budget"}')
    per_seed, summary = records(d / 'budget')
    assert all(r['nfe'] <= 5 for r in per_seed.values()), per_seed
    assert summary['restarts'] > 0 and summary['restarts'] == sum(r['restarts'] for r in per_seed.values())
    assert summary['mean_nfe'] == np.mean([r['nfe'] for r in per_seed.values()])
    assert len(summary['acceptance']) == 5 and all(a is None or 0 <= a <= 1 for a in summary['acceptance'])

def test_release_head_layout_without_guidance(tmp_path):
    """The release's classifier and unconditional head files (reduced width) as --classifier/--disc, --w=0."""
    cls = release_classifier()
    torch.save(cls.state_dict(), tmp_path / '32x32_classifier.pt')
    torch.save(release_head(cls).state_dict(), tmp_path / 'discriminator_60.pt')
    net = save_edm_pickle(tiny_edm(res=32), str(tmp_path / 'net.pkl'))
    out = gen(f'--network={net}', f'--disc={tmp_path / "discriminator_60.pt"}', f'--classifier={tmp_path / "32x32_classifier.pt"}',
              '--w=0', '--rejection=diffrs', '--steps=2', '--seeds=0-1', '--iter_warmup=1', '--batch=50',
              f'--outdir={tmp_path / "o"}')
    assert 'DiffRS: 2 images' in out and len(pngs(tmp_path / 'o')) == 2
    th = diffrs.Thresholds.load(str(tmp_path / 'o' / diffrs.THRESHOLDS_NAME))
    assert th.settings['guided'] is False and len(th.M) == 3 and th.discriminator.startswith('sha256:')

def test_fid_sweep_generates_with_diffrs(files, batch3, tmp_path):
    """fid.py sweep over w with the saved thresholds: the w=1 point's images are generate_dg.py's."""
    det, ref = str(tmp_path / 'tiny.pt'), write_fid_ref(str(tmp_path / 'ref.npz'), dims=32)
    torch.jit.script(TinyDetector()).save(det)
    code, out, errors = invoke(fid.main, ['sweep', f'--network={files["net"]}', f'--disc={files["disc"]}',
                                          f'--classifier={files["cls"]}', f'--ref={ref}', f'--detector={det}',
                                          f'--seeds={SEEDS}', STEPS, '--rejection=diffrs', GAMMA, f'--rej_thresholds={files["th"]}',
                                          '--param=dg_weight_1st_order', '--values=1', '--batch=3', '--keep_images',
                                          f'--outdir={tmp_path / "sw"}', '--device=cpu'])
    assert code == 0 and not errors, out
    point = tmp_path / 'sw' / 'images' / 'dg_weight_1st_order=1'
    assert png_bytes(point) == png_bytes(batch3)  # the conditional net's default w is 1
    assert records(point) == records(batch3)

BAD = [
    (['--rej_percentile=1.5'], '--rej_percentile=1.5'),
    (['--rej_percentile=-0.1'], '[0, 1]'),
    (['--max_iter=6'], '--max_iter=6: below one pass'),
    (['--steps=5'], 'another schedule'),
    (['--sampler=dpmpp2m'], '--sampler=dpmpp2m'),
    (['--boosting=1'], '--boosting'),
    (['--particles=2', '--best_of=2'], '--particles/--best_of'),
    (['--max_backsteps=9'], '--max_backsteps=9'),
]

@pytest.mark.parametrize('extra,needle', BAD, ids=[b[1] for b in BAD])
def test_bad_inputs_are_one_line_errors(files, tmp_path, extra, needle):
    code, out, errors = invoke(generate_dg.main, [*files['dg'], f'--rej_thresholds={files["th"]}', *extra,
                                                  f'--outdir={tmp_path / "o"}', '--device=cpu'])
    assert code != 0 and len(errors) == 1 and needle in errors[0], out
    assert 'Traceback' not in out

def test_options_without_rejection_or_disc_are_refused(files, tmp_path):
    code, out, errors = invoke(generate_dg.main, [f'--network={files["net"]}', '--backsteps=2', f'--outdir={tmp_path}', '--device=cpu'])
    assert code != 0 and len(errors) == 1 and '--backsteps is a DiffRS option' in errors[0], out
    code, out, errors = invoke(generate_dg.main, [f'--network={files["net"]}', '--rejection=diffrs', f'--outdir={tmp_path}', '--device=cpu'])
    assert code != 0 and len(errors) == 1 and 'pass --disc' in errors[0], out
    other = tmp_path / 'other.json'
    other.write_text('{"format": "something else"}')
    code, out, errors = invoke(generate_dg.main, [*files['dg'], f'--rej_thresholds={other}', f'--outdir={tmp_path / "o"}', '--device=cpu'])
    assert code != 0 and len(errors) == 1 and 'not a DiffRS thresholds file' in errors[0], out

def test_help_explains_each_option():
    code, out, _ = invoke(generate_dg.main, ['--help'])
    text = ' '.join(out.split())
    for name in ('--rejection', '--rej_percentile', '--backsteps', '--min_backsteps', '--max_backsteps', '--iter_warmup',
                 '--max_iter', '--rej_thresholds'):
        assert name in text
    assert "1 is the release's default" in text and 'recovers it' in text
