"""The DG release's files as inputs: train_disc.py --real/--fake and fid.py calc --images, and their errors."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, py
from edm_dg import metrics
from edm_dg.disc_training import load_pair, train
from edm_dg.image_sets import ImageSource, load_image_set

N = 24
TINY = dict(head_width=64, head_depth=1, progress=False, log=lambda *a: None)

def images_and_labels(seed, n=N):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 10, size=n)

def one_hot(y):
    return np.eye(10, dtype=np.float32)[y]

def grid_preview(path):
    """A stand-in for the release's make_grid picture of a batch (bigger than one sample)."""
    Image.fromarray(np.full((38, 38, 3), 7, dtype=np.uint8)).save(path)

def png_folder(folder, x, y=None):
    """The same images as an EDM-style folder, the reference every format must read identically."""
    os.makedirs(folder, exist_ok=True)
    names = [f'{i:06d}.png' for i in range(len(x))]
    for name, im in zip(names, x):
        Image.fromarray(im).save(os.path.join(folder, name))
    if y is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, int(l)] for n, l in zip(names, y)]}, f)
    return folder

def make_format(kind, d, x, y):
    """Write (x, y) in one of the release's layouts under d; returns the path to pass and whether labels survive."""
    half = len(x) // 2
    if kind == 'sampler_folder':  # generate.py --save_type=npz: samples_{r}.npz (+ one-hot label) and sample_{r}.png
        os.makedirs(d / 'samples')
        for r, sl in ((111, slice(0, half)), (222, slice(half, None))):
            np.savez_compressed(d / 'samples' / f'samples_{r}.npz', samples=x[sl], label=one_hot(y[sl]))
            grid_preview(d / 'samples' / f'sample_{r}.png')
        return str(d / 'samples'), True
    if kind == 'sampler_positional':  # np.savez(path, samples, labels): arr_0 images, arr_1 one-hot labels
        os.makedirs(d / 'pos')
        np.savez(d / 'pos' / 'samples_5.npz', x[:half], one_hot(y[:half]))
        np.savez(d / 'pos' / 'samples_6.npz', x[half:], y[half:])  # integer labels work as well
        grid_preview(d / 'pos' / 'sample_5.png')
        return str(d / 'pos'), True
    if kind == 'true_data_uncond':
        np.savez(d / 'true_data.npz', x)
        return str(d / 'true_data.npz'), False
    if kind == 'true_data_cond':
        np.savez(d / 'true_data.npz', samples=x, label=y)
        return str(d / 'true_data.npz'), True
    if kind == 'gen_data':
        np.savez_compressed(d / 'gen_data_for_discriminator_training.npz', samples=x, label=one_hot(y))
        return str(d / 'gen_data_for_discriminator_training.npz'), True
    if kind == 'gen_data_beside_shards':  # the release caches the shards' concatenation next to them
        os.makedirs(d / 'cached')
        np.savez_compressed(d / 'cached' / 'samples_1.npz', samples=x[:half], label=one_hot(y[:half]))
        np.savez_compressed(d / 'cached' / 'samples_2.npz', samples=x[half:], label=one_hot(y[half:]))
        np.savez_compressed(d / 'cached' / 'gen_data_for_discriminator_training.npz', samples=x, label=one_hot(y))
        grid_preview(d / 'cached' / 'sample_1.png')
        return str(d / 'cached'), True
    raise AssertionError(kind)

KINDS = ['sampler_folder', 'sampler_positional', 'true_data_uncond', 'true_data_cond', 'gen_data', 'gen_data_beside_shards']

@pytest.mark.parametrize('kind', KINDS)
def test_reads_release_format(kind, tmp_path):
    x, y = images_and_labels(0)
    path, labelled = make_format(kind, tmp_path, x, y)
    notes = []
    src = ImageSource(path, log=notes.append)
    assert len(src) == N
    assert torch.equal(src.images(range(N)), torch.from_numpy(x).permute(0, 3, 1, 2))
    labels = src.labels()
    assert (labels is not None) == labelled
    if labelled:
        assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
    previews = {'sampler_folder': 2, 'sampler_positional': 1, 'gen_data_beside_shards': 1}.get(kind, 0)
    preview_notes = [n for n in notes if 'grid preview' in n]
    assert len(preview_notes) == (1 if previews else 0)
    if previews:
        assert f'skipped {previews} grid preview' in preview_notes[0] and '\n' not in preview_notes[0]
    assert any('gen_data_for_discriminator_training.npz: skipped' in n and 'twice' in n for n in notes) == (kind == 'gen_data_beside_shards')

@pytest.mark.parametrize('kind', KINDS)
def test_release_format_as_real_and_fake(kind, tmp_path):
    """load_pair is what train_disc.py --real/--fake go through."""
    x, y = images_and_labels(1)
    path, labelled = make_format(kind, tmp_path, x, y)
    other = png_folder(str(tmp_path / 'png'), *images_and_labels(2))
    for real, fake in ((path, other), (other, path)):
        images, targets, labels = load_pair(real, fake, cond=labelled, log=lambda *a: None)
        mine = images[:N] if real == path else images[N:]
        assert torch.equal(mine, torch.from_numpy(x).permute(0, 3, 1, 2))
        assert targets.tolist() == [1.0] * N + [0.0] * N
        if labelled:
            assert (labels[:N] if real == path else labels[N:]).tolist() == y.tolist()

def test_trains_on_release_files(classifier, tmp_path):
    """A conditional run on true_data.npz (integer labels) against a samples_*.npz folder (one-hot labels)."""
    xr, yr = images_and_labels(3, 32)
    xf, yf = images_and_labels(4, 32)
    real, _ = make_format('true_data_cond', tmp_path, xr, yr)
    fake, _ = make_format('sampler_folder', tmp_path, xf, yf)
    notes = []
    last = train(str(tmp_path / 'run'), real, fake, classifier, epochs=1, batch=16, cond=True,
                 **dict(TINY, log=notes.append))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt['config']['num'] == 32 and ckpt['fake_seeds'] is None
    assert any('skipped 2 grid preview' in n for n in notes)

class SmallDetector(torch.nn.Module):
    """A detector with the TorchScript interface that declares 16x16 input (no resize)."""
    input_size = 16
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1)

@pytest.mark.parametrize('kind', KINDS)
def test_release_format_as_fid_images(kind, tmp_path):
    """metrics.source_stats is what fid.py calc --images goes through: same statistics as a PNG folder of the images."""
    x, y = images_and_labels(5)
    path, _ = make_format(kind, tmp_path, x, y)
    ref = png_folder(str(tmp_path / 'png'), x)
    det = metrics.Detector(SmallDetector().eval(), 'torchscript', 'small')
    for num in (None, 10):
        mu, sigma = metrics.source_stats(path, det, num=num, seed=3, batch=7, progress=False)
        mu_r, sigma_r = metrics.source_stats(ref, det, num=num, seed=3, batch=7, progress=False)
        assert np.allclose(mu, mu_r, atol=1e-12) and np.allclose(sigma, sigma_r, atol=1e-12)

#----------------------------------------------------------------------------
# Errors that point at the cause.

def bad_inputs(d):
    """(path, words the one-line error must contain) for each broken input."""
    x, y = images_and_labels(6, 8)
    cases = []
    os.makedirs(d / 'empty')
    cases.append((d / 'empty', ['empty', 'no images']))
    os.makedirs(d / 'previews_only')
    grid_preview(d / 'previews_only' / 'sample_1.png')
    grid_preview(d / 'previews_only' / 'sample_2.png')
    cases.append((d / 'previews_only', ['previews_only', 'only 2 grid preview', 'samples_*.npz']))
    np.savez_compressed(d / 'full.npz', samples=x)
    data = (d / 'full.npz').read_bytes()
    (d / 'truncated.npz').write_bytes(data[:len(data) // 2])
    cases.append((d / 'truncated.npz', ['truncated.npz', 'not a readable .npz', 'truncated']))
    np.savez(d / 'floats.npz', samples=x.astype(np.float32) / 127.5 - 1)
    cases.append((d / 'floats.npz', ['floats.npz', 'float32', 'uint8', '127.5']))
    np.savez(d / 'chw.npz', samples=x.transpose(0, 3, 1, 2).copy())
    cases.append((d / 'chw.npz', ['chw.npz', 'channels-first', '[N,H,W,C]']))
    np.savez(d / 'nokey.npz', pictures=x)
    cases.append((d / 'nokey.npz', ['nokey.npz', '"samples"', '"images"', "['pictures']"]))
    np.savez(d / 'short_labels.npz', samples=x, label=y[:5])
    cases.append((d / 'short_labels.npz', ['short_labels.npz', '5 labels for 8 images']))
    soft = one_hot(y)
    soft[3] = 0.1
    np.savez(d / 'soft.npz', samples=x, label=soft)
    cases.append((d / 'soft.npz', ['soft.npz', 'row 3 is not one-hot']))
    os.makedirs(d / 'mixed')
    np.savez(d / 'mixed' / 'samples_1.npz', samples=x)
    np.savez(d / 'mixed' / 'samples_2.npz', samples=x[:, :8])
    cases.append((d / 'mixed', ['samples_2.npz', '[8, 16, 3]', 'samples_1.npz', 'one resolution']))
    return cases

def test_bad_release_inputs_name_file_and_fix(tmp_path):
    for path, words in bad_inputs(tmp_path):
        with pytest.raises(ValueError) as e:
            load_image_set(str(path))
        msg = str(e.value)
        assert '\n' not in msg, msg
        for w in words:
            assert w in msg, (w, msg)

def test_bad_release_input_cli(classifier, tmp_path):
    """The same errors reach the command line as one 'Error:' line."""
    cases = dict((p.name, (p, w)) for p, w in bad_inputs(tmp_path))
    good = png_folder(str(tmp_path / 'good'), *images_and_labels(7, 8))
    path, words = cases['truncated.npz']
    assert_one_line_error(py('train_disc.py', f'--real={good}', f'--fake={path}', f'--classifier={classifier}',
                             f'--outdir={tmp_path / "o"}', '--epochs=1', '--batch=8', '--head_width=64', '--head_depth=1'), *words)

def test_fid_calc_cli_reads_release_sampler_folder(tmp_path):
    """fid.py calc --images on the release's samples_*.npz + sample_*.png folder: the grid previews are
    skipped (with a note) and the FID against the same images as PNGs is zero."""
    import torch as _torch
    from helpers import TinyDetector
    x, y = images_and_labels(9)
    path, _ = make_format('sampler_folder', tmp_path, x, y)
    det = str(tmp_path / 'tiny.pt')
    _torch.jit.script(TinyDetector()).save(det)
    ref = str(tmp_path / 'ref.npz')
    p = py('fid.py', 'ref', f'--data={png_folder(str(tmp_path / "png"), x)}', f'--dest={ref}', f'--detector={det}')
    assert p.returncode == 0, p.stderr
    p = py('fid.py', 'calc', f'--images={path}', f'--ref={ref}', f'--detector={det}', f'--num_images={N}')
    assert p.returncode == 0, p.stderr
    assert abs(float(p.stdout.strip().splitlines()[-1])) < 1e-6
    assert 'sample_' in p.stdout + p.stderr  # the note on skipped grid previews
