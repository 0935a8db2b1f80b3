"""Discriminator training diagnostics: per-time loss/accuracy, log-ratio histogram, chance warning."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import sharp_and_blurred, tiny_classifier, write_set
import train_disc
from edm_dg.disc_checkpoint import load_discriminator
from edm_dg.disc_diagnostics import chance_warning, evaluate_by_time, read_metrics, split_eval, time_grid
from edm_dg.disc_training import load_pair, train

EVAL = 64        # held-out images of each kind
TRAIN = 256      # training images of each kind
RUN = dict(epochs=3, batch=32, lr=5e-4, head_width=32, head_depth=1, eval_images=EVAL, holdout=True, seed=0,
           progress=False)

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A learnable pair (sharp vs. blurred and darkened, 16x16) and an unlearnable one (two draws of sharp)."""
    d = tmp_path_factory.mktemp('diag')
    sharp, blurred = sharp_and_blurred(TRAIN + EVAL, 0)
    write_set(str(d / 'real'), sharp)
    # Darkening keeps the pair learnable at small tau within a few dozen steps of a tiny head on random features.
    write_set(str(d / 'fake'), (blurred.float() * 0.6).round().to(torch.uint8))
    write_set(str(d / 'same'), sharp_and_blurred(TRAIN + EVAL, 5)[0])
    torch.save(tiny_classifier(width=32).state_dict(), d / 'cls.pt')
    lines = []
    last = train(str(d / 'run'), str(d / 'real'), str(d / 'fake'), str(d / 'cls.pt'), log=lines.append, **RUN)
    return dict(dir=d, run=d / 'run', last=last, lines=lines)

def test_accuracy_by_time_high_at_small_tau_and_chance_at_large(toy):
    rec = read_metrics(str(toy['run']))[-1]
    acc = rec['acc_by_tau']
    print('tau   ' + ' '.join(f'{t:5.2f}' for t in rec['bin_taus']))
    print('acc   ' + ' '.join(f'{a:5.2f}' for a in acc))
    print('loss  ' + ' '.join(f'{l:5.2f}' for l in rec['loss_by_tau']))
    assert acc[0] > 0.8 and acc[1] > 0.8, acc
    assert abs(acc[-1] - 0.5) <= 0.1, acc
    assert acc[0] - acc[-1] > 0.3
    assert rec['loss_by_tau'][0] < 0.5 < rec['loss_by_tau'][-1]

def test_metrics_fields_and_figures(toy):
    recs = read_metrics(str(toy['run']))
    edges, centres = time_grid()
    assert [r['epoch'] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r['bin_edges'] == pytest.approx(edges.tolist()) and len(r['bin_edges']) == 11
        assert r['bin_taus'] == pytest.approx(centres.tolist())
        for key in ('loss_by_tau', 'acc_by_tau', 'acc_real_by_tau', 'acc_fake_by_tau'):
            assert len(r[key]) == 10 and all(np.isfinite(r[key])), key
        assert r['acc_by_tau'] == pytest.approx([(a + b) / 2 for a, b in zip(r['acc_real_by_tau'], r['acc_fake_by_tau'])])
        assert r['eval_set'] == 'held-out' and r['eval_images'] == EVAL and r['log_ratio_tau'] == pytest.approx(0.05)
    for name, size in (('log-ratio-histogram.png', (550, 350)), ('training-curves.png', (900, 640))):
        path = toy['run'] / name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == 'PNG' and im.size == size, (name, im.size)
    assert not [f for f in os.listdir(toy['run']) if '.tmp' in f]

def test_numbers_are_reproducible_from_the_checkpoint(toy):
    """Fixed tau grid and noise: the last epoch's record is what evaluating its checkpoint again gives."""
    d = toy['dir']
    images, targets, labels = load_pair(str(d / 'real'), str(d / 'fake'))
    train_x, _, _, (x, y, _) = split_eval(images, targets, labels, EVAL, True)
    assert len(train_x) == 2 * TRAIN and len(x) == 2 * EVAL
    assert torch.equal(x[:EVAL], images[TRAIN:TRAIN + EVAL])  # the last EVAL real images are held out
    disc = load_discriminator(toy['last'], str(d / 'cls.pt'))
    ev = evaluate_by_time(disc, x, y, batch=RUN['batch'], seed=RUN['seed'])
    rec = read_metrics(str(d / 'run'))[-1]
    assert ev['acc_by_tau'] == pytest.approx(rec['acc_by_tau'])
    assert ev['loss_by_tau'] == pytest.approx(rec['loss_by_tau'], rel=1e-5)
    assert len(ev['log_ratio_real']) == len(ev['log_ratio_fake']) == EVAL
    # The histogram's log-ratios separate real from fake at tau = 0.05.
    assert np.median(ev['log_ratio_real']) > 0 > np.median(ev['log_ratio_fake'])

def test_no_warning_for_the_learnable_pair(toy):
    assert not [l for l in toy['lines'] if l.startswith('Warning')], toy['lines']
    assert any('acc by tau' in l for l in toy['lines'])

def test_warning_for_the_unlearnable_pair(toy, tmp_path, capsys):
    d = toy['dir']
    train_disc.main.main([f'--real={d / "real"}', f'--fake={d / "same"}', f'--classifier={d / "cls.pt"}',
                          f'--outdir={tmp_path / "run"}', '--epochs=3', '--batch=32', '--num_images=96', '--eval_images=32',
                          '--holdout', '--lr=5e-4', '--head_width=64', '--head_depth=1', '--device=cpu'], standalone_mode=False)
    out = capsys.readouterr()
    warnings = [l for l in (out.out + out.err).splitlines() if l.startswith('Warning:')]
    assert len(warnings) == 1, out.out + out.err
    for needle in ('after 3 epochs', 'chance', 'quantisation', '--lr', 'epochs', 'resolution'):
        assert needle in warnings[0], needle
    low = read_metrics(str(tmp_path / 'run'))[-1]['acc_by_tau'][:2]
    assert abs(np.mean(low) - 0.5) <= 1 / np.sqrt(64)

def test_warning_rule():
    rec = lambda epoch, low, n=256: dict(epoch=epoch, acc_by_tau=[low, low] + [0.5] * 8, bin_edges=time_grid()[0].tolist(),
                                         eval_images=n, eval_set='training')
    assert chance_warning(rec(3, 0.53), 60).startswith('Warning:')
    assert chance_warning(rec(3, 0.47), 60)               # below chance by as little
    assert chance_warning(rec(2, 0.53), 60) is None        # too early ...
    assert chance_warning(rec(1, 0.53), 1)                 # ... unless the run is that short
    assert chance_warning(rec(3, 0.56), 60) is None        # learning
    assert chance_warning(rec(3, 0.56, n=32), 60)          # within two standard errors of a small evaluation set
    assert chance_warning(rec(3, 0.50, n=8), 60) is None   # too few images to tell
    assert chance_warning(dict(epoch=5), 60) is None       # no per-time evaluation

def test_split_eval():
    images = torch.arange(20, dtype=torch.uint8).reshape(20, 1, 1, 1)
    targets = torch.cat([torch.ones(10), torch.zeros(10)])
    tr, tt, _, (ex, et, el) = split_eval(images, targets, None, 3, True)
    assert tr.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14, 15, 16]
    assert ex.flatten().tolist() == [7, 8, 9, 17, 18, 19] and et.tolist() == [1, 1, 1, 0, 0, 0] and el is None
    tr, _, _, (ex, _, _) = split_eval(images, targets, None, 3, False)
    assert torch.equal(tr, images) and ex.flatten().tolist() == [0, 1, 2, 10, 11, 12]
    for n, want in ((10, 0), (480, 0), (512, 16), (4096, 128), (20000, 256)):  # default: 1/32, at most 256, none under 16
        ims = torch.zeros(2 * n, 1, 1, 1, dtype=torch.uint8)
        assert len(split_eval(ims, torch.zeros(2 * n), None, None, False)[3][0]) == 2 * want, n
    with pytest.raises(ValueError, match='--holdout needs'):
        split_eval(images, targets, None, 10, True)
