"""generate_dg.py: seed-exact outputs across batch sizes and processes, resume, labels, shards, errors."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import (assert_one_line_error, assert_same_up_to_rounding, differ_beyond_rounding, invoke, py, save_edm_pickle,
                     tiny_edm, torchrun)

ARGS = ['--seeds=0-6', '--steps=4']

def listing(outdir):
    out = {}
    for root, _, files in os.walk(outdir):
        for f in files:
            if f.endswith('.png'):
                p = os.path.join(root, f)
                with open(p, 'rb') as fh:
                    out[os.path.relpath(p, outdir)] = fh.read()
    return out

@pytest.fixture(scope='module')
def batch1(tmp_path_factory):
    """Reference run with --batch=1 and DG on; other tests compare against it."""
    d = tmp_path_factory.mktemp('gen')
    from helpers import tiny_classifier, tiny_discriminator
    import torch
    from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
    net_pkl = save_edm_pickle(tiny_edm(label_dim=10), str(d / 'net.pkl'))
    cls = tiny_classifier()
    torch.save(cls.state_dict(), d / 'cls.pt')
    _, sha = read_weights(str(d / 'cls.pt'), 'classifier')
    disc = tiny_discriminator(cls)
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), d / 'disc.pt')
    dg = [f'--network={net_pkl}', f'--disc={d / "disc.pt"}', f'--classifier={d / "cls.pt"}', '--subdirs']
    p = py('generate_dg.py', *dg, *ARGS, '--batch=1', f'--outdir={d / "b1"}')
    assert p.returncode == 0, p.stderr
    return dict(dir=d, dg=dg, files=listing(d / 'b1'))

def assert_same_pixels(outdir, files):
    """The same PNG names as `files`, the pixels equal up to float rounding: with guidance, batches of
    other sizes or in other processes round differently (helpers.assert_same_up_to_rounding)."""
    got = listing(outdir)
    assert sorted(got) == sorted(files)
    decode = lambda data: np.array(Image.open(io.BytesIO(data)))
    assert_same_up_to_rounding(np.stack([decode(got[k]) for k in sorted(files)]), np.stack([decode(files[k]) for k in sorted(files)]))

def test_batch_size_does_not_change_images(batch1):
    d = batch1['dir']
    p = py('generate_dg.py', *batch1['dg'], *ARGS, '--batch=3', f'--outdir={d / "b3"}')
    assert p.returncode == 0, p.stderr
    assert_same_pixels(d / 'b3', batch1['files'])
    assert len(batch1['files']) == 7 and all(k.startswith('000000' + os.sep) for k in batch1['files'])

def test_torchrun_two_processes_same_images(batch1):
    d = batch1['dir']
    p = torchrun('generate_dg.py', *batch1['dg'], *ARGS, '--batch=2', f'--outdir={d / "tr"}', '--npz')
    assert p.returncode == 0, p.stderr
    assert_same_pixels(d / 'tr', batch1['files'])
    # Labels of every seed in EDM's dataset.json layout, and shards that hold the same pixels.
    with open(d / 'tr' / 'dataset.json') as f:
        labels = dict((k, v) for k, v in json.load(f)['labels'])
    assert sorted(labels) == sorted(k.replace(os.sep, '/') for k in batch1['files'])
    shards = sorted(os.listdir(d / 'tr' / 'shards'))
    seeds = []
    from edm_dg.fileio import read_image
    for s in shards:
        with np.load(d / 'tr' / 'shards' / s) as z:
            for seed, img, lab in zip(z['seeds'], z['samples'], z['label']):
                rel = f'000000/{seed:06d}.png'
                assert np.array_equal(img, read_image(str(d / 'tr' / rel)))
                assert labels[rel] == lab
                seeds.append(int(seed))
    assert sorted(seeds) == list(range(7))

def test_plain_differs_from_guided_and_resume_restores_deleted(batch1):
    d = batch1['dir']
    out = d / 'plain'
    net_arg = batch1['dg'][0]
    p = py('generate_dg.py', net_arg, *ARGS, '--subdirs', f'--outdir={out}')
    assert p.returncode == 0, p.stderr
    plain = listing(out)
    assert plain.keys() == batch1['files'].keys()
    decode = lambda files: np.stack([np.array(Image.open(io.BytesIO(files[k]))) for k in sorted(files)])
    assert differ_beyond_rounding(decode(plain), decode(batch1['files']))
    victims = sorted(plain)[1:6:2]
    stamps = {k: os.stat(out / k).st_mtime_ns for k in plain if k not in victims}
    for v in victims:
        os.remove(out / v)
    p = py('generate_dg.py', net_arg, *ARGS, '--subdirs', f'--outdir={out}')
    assert p.returncode == 0, p.stderr
    assert f'{len(victims)} generated' in p.stdout
    assert_same_pixels(out, plain)  # the victims again, now in a batch of their own: up to rounding
    restored = listing(out)
    assert all(restored[k] == plain[k] and os.stat(out / k).st_mtime_ns == t for k, t in stamps.items())  # untouched

def test_class_option_and_uncond_labels(tmp_path):
    net = save_edm_pickle(tiny_edm(label_dim=10), str(tmp_path / 'c.pkl'))
    p = py('generate_dg.py', f'--network={net}', '--seeds=0-2', '--steps=2', '--class=4', f'--outdir={tmp_path / "o"}')
    assert p.returncode == 0, p.stderr
    with open(tmp_path / 'o' / 'dataset.json') as f:
        assert [l for _, l in json.load(f)['labels']] == [4, 4, 4]
    unet = save_edm_pickle(tiny_edm(label_dim=0, channels=1), str(tmp_path / 'u.pkl'))
    p = py('generate_dg.py', f'--network={unet}', '--seeds=3', '--steps=2', f'--outdir={tmp_path / "u"}')
    assert p.returncode == 0, p.stderr
    from PIL import Image
    assert Image.open(tmp_path / 'u' / '000003.png').mode == 'L'
    with open(tmp_path / 'u' / 'dataset.json') as f:
        assert json.load(f)['labels'] is None

def test_bad_inputs(tmp_path, tiny_files):
    """One-line errors naming the file and the fix; the first through a real process (no traceback), the others
    in-process through the same click command."""
    import generate_dg
    def one_line(args, *needles):
        code, text, errors = invoke(generate_dg.main, args)
        assert code != 0 and 'Traceback' not in text and len(errors) == 1, text
        assert all(n in errors[0] for n in needles), (needles, errors[0])
    out = str(tmp_path / 'o')
    net = tiny_files['net']
    dg = [f'--disc={tiny_files["disc"]}', f'--classifier={tiny_files["classifier"]}']
    assert_one_line_error(py('generate_dg.py', f'--network={tmp_path / "nope.pkl"}', f'--outdir={out}'), 'nope.pkl', 'no such file')
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'\x00' * 100)
    one_line([f'--network={junk}', f'--outdir={out}'], 'junk.pkl', 'not a readable EDM network pickle')
    one_line([f'--network={net}', f'--outdir={out}', '--seeds=1-x'], '1-x')
    one_line([f'--network={net}', f'--outdir={out}', '--class=10'], '--class=10', '0-9')
    bad_cls = tmp_path / 'badcls.pt'
    import torch
    sd = torch.load(tiny_files['classifier'], weights_only=True)
    sd.pop('time_embed.0.bias')
    torch.save(sd, bad_cls)
    one_line([f'--network={net}', f'--outdir={out}', f'--disc={tiny_files["head"]}', f'--classifier={bad_cls}'],
             'badcls.pt', 'keys or shapes')
    # A class-conditional discriminator with an unconditional network.
    from helpers import tiny_classifier, tiny_discriminator
    from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
    cls = tiny_classifier()
    _, sha = read_weights(tiny_files['classifier'], 'classifier')
    cdisc = tmp_path / 'cdisc.pt'
    torch.save(discriminator_checkpoint(tiny_discriminator(cls, cond=True), sha, infer_encoder_args(cls.state_dict())), cdisc)
    unet = save_edm_pickle(tiny_edm(label_dim=0), str(tmp_path / 'u.pkl'))
    one_line([f'--network={unet}', f'--outdir={out}', f'--disc={cdisc}', f'--classifier={tiny_files["classifier"]}'],
             'cdisc.pt', 'unconditional')
    one_line([f'--network={net}', f'--outdir={out}', f'--disc={tiny_files["disc"]}'], '--classifier')
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permission bits; use a path under a file instead
        ro = tmp_path / 'afile' / 'sub'
        (tmp_path / 'afile').write_text('x')
    one_line([f'--network={net}', f'--outdir={ro}', *dg], 'not writable')
    assert not os.path.exists(out) or not listing(out)

@pytest.mark.parametrize('n,batch,world', [(1, 4, 2), (7, 3, 2), (100, 8, 3), (50000, 500, 8), (13, 64, 4)])
def test_seed_split_is_balanced(n, batch, world):
    """EDM's split: every rank gets the same number of batches, sizes differ by at most one image."""
    from edm_dg.generate import rank_batches
    seeds = list(range(n))
    per_rank = [rank_batches(seeds, batch, r, world) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    sizes = [len(x) for b in per_rank for x in b]
    assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert sorted(s for b in per_rank for x in b for s in x) == seeds
