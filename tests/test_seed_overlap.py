"""Seed provenance: the seeds a discriminator's fakes came from, recorded by train_disc.py and compared with --seeds."""

import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm_dg import fileio
from edm_dg import seed_provenance as sp
from edm_dg.disc_training import train

TINY = dict(head_width=64, head_depth=1, progress=False, log=lambda *a: None)

def image(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)

def generated_folder(folder, seeds, subdirs=False, labels=False):
    """What generate_dg.py writes: {seed:06d}.png (or --subdirs layout), with dataset.json."""
    for s in seeds:
        fileio.save_png(os.path.join(folder, fileio.image_relpath(s, subdirs)), image(s))
    fileio.write_labels(folder, {fileio.image_relpath(s, subdirs): (s % 10 if labels else None) for s in seeds})
    return str(folder)

def shard_folder(folder, batches):
    """edm-dg .npz shards (samples, label, seeds)."""
    for seeds in batches:
        fileio.save_npz_shard(os.path.join(folder, fileio.shard_name(seeds)), np.stack([image(s) for s in seeds]),
                            [-1] * len(seeds), seeds)
    return str(folder)

def test_seeds_from_flat_and_subdir_names(tmp_path):
    assert sp.seeds_of_source(generated_folder(tmp_path / 'flat', [7, 3, 4, 5])) == [3, 4, 5, 7]
    assert sp.seeds_of_source(generated_folder(tmp_path / 'sub', range(998, 1003), subdirs=True)) == list(range(998, 1003))
    assert sp.seeds_of_source(generated_folder(tmp_path / 'big', [1234567])) == [1234567]

def test_seeds_from_dataset_json_layouts(tmp_path):
    """A labelled generate_dg.py folder, and the same files zipped with their dataset.json."""
    folder = generated_folder(tmp_path / 'cond', range(20, 26), subdirs=True, labels=True)
    with open(os.path.join(folder, 'dataset.json')) as f:
        assert len(json.load(f)['labels']) == 6
    assert sp.seeds_of_source(folder) == list(range(20, 26))
    with zipfile.ZipFile(tmp_path / 'cond.zip', 'w') as zf:
        for root, _, files in os.walk(folder):
            for fn in files:
                zf.write(os.path.join(root, fn), os.path.relpath(os.path.join(root, fn), folder))
    assert sp.seeds_of_source(str(tmp_path / 'cond.zip')) == list(range(20, 26))

def test_seeds_from_shards(tmp_path):
    folder = shard_folder(tmp_path / 'shards', [[10, 11, 12], [0, 1, 2]])
    assert sp.source_seeds(folder) == [0, 1, 2, 10, 11, 12]  # ImageSource order: shard files sorted by name
    one = os.path.join(folder, fileio.shard_name([10, 11, 12]))
    assert sp.seeds_of_source(one) == [10, 11, 12]

def test_unknown_seeds(tmp_path):
    """Release files, real datasets and folders with any foreign name record no seeds."""
    x = np.stack([image(i) for i in range(4)])
    np.savez(tmp_path / 'true_data.npz', x)
    assert sp.seeds_of_source(str(tmp_path / 'true_data.npz')) is None
    os.makedirs(tmp_path / 'release')
    np.savez_compressed(tmp_path / 'release' / 'samples_9.npz', samples=x, label=np.eye(10)[[0, 1, 2, 3]])
    Image.fromarray(image(0)).save(tmp_path / 'release' / 'sample_9.png')
    assert sp.seeds_of_source(str(tmp_path / 'release')) is None
    os.makedirs(tmp_path / 'edm' / '00000')
    Image.fromarray(image(0)).save(tmp_path / 'edm' / '00000' / 'img00000000.png')
    assert sp.seeds_of_source(str(tmp_path / 'edm')) is None
    mixed = generated_folder(tmp_path / 'mixed', [1, 2])
    Image.fromarray(image(0)).save(os.path.join(mixed, 'extra.png'))
    assert sp.seeds_of_source(mixed) is None
    wrong_dir = tmp_path / 'wrong_dir' / '000000'
    os.makedirs(wrong_dir)
    Image.fromarray(image(0)).save(wrong_dir / '001500.png')  # --subdirs would put seed 1500 in 001000/
    assert sp.seeds_of_source(str(tmp_path / 'wrong_dir')) is None
    with pytest.raises(ValueError, match='nowhere'):
        sp.seeds_of_source(str(tmp_path / 'nowhere'))

def test_ranges_round_trip():
    seeds = [5, 1, 2, 3, 9, 10, 3]
    assert sp.compress_ranges(seeds) == [[1, 3], [5, 5], [9, 10]]
    assert sp.expand_ranges([[1, 3], [5, 5], [9, 10]]) == [1, 2, 3, 5, 9, 10]
    assert sp.compress_ranges([]) == []
    assert sp.format_ranges([[0, 49999], [60000, 60000]]) == '0-49999, 60000'

def test_overlap_found_and_disjoint():
    ranges = [[0, 49999]]
    assert sp.overlap(ranges, range(40000, 60000)) == [(40000, 49999)]
    assert sp.overlap([[0, 9], [20, 29]], [5, 6, 15, 25, 30]) == [(5, 6), (25, 25)]
    assert sp.overlap(ranges, range(100000, 150000)) == []
    msg = sp.overlap_message('discriminator.pt', ranges, range(0, 10000))
    assert '\n' not in msg and 'overlap' in msg and 'discriminator.pt' in msg
    assert 'seeds 0-49999' in msg and 'at 0-9999' in msg and '--seeds=50000-59999' in msg
    assert sp.overlap_message('discriminator.pt', ranges, range(100000, 150000)) is None
    assert sp.overlap_message('discriminator.pt', None, range(10)) is None

def test_train_disc_records_fake_seeds(classifier, tmp_path):
    real = generated_folder(tmp_path / 'real', range(1000, 1032))  # any images; only the fakes' seeds count
    fake = generated_folder(tmp_path / 'fake', list(range(100, 116)) + list(range(200, 220)), subdirs=True)
    logs = []
    last = train(str(tmp_path / 'run'), real, fake, classifier, epochs=1, batch=16, num=24,
                 **dict(TINY, log=logs.append))
    ckpt = torch.load(last, weights_only=True)
    assert ckpt['fake_seeds'] == [[100, 115], [200, 207]]  # the first 24 fakes, which the run used
    assert sp.recorded_fake_seeds(last) == [[100, 115], [200, 207]]
    assert any('seeds 100-115, 200-207' in l for l in logs)
    msg = sp.check_overlap(last, range(205, 300))
    assert 'overlap' in msg and 'at 205-207' in msg
    assert sp.check_overlap(last, range(300, 400)) is None
    shards = shard_folder(tmp_path / 'shards', [[40, 41, 42, 43], [50, 51, 52, 53]])
    last = train(str(tmp_path / 'run2'), real, shards, classifier, epochs=1, batch=8, **TINY)
    assert torch.load(last, weights_only=True)['fake_seeds'] == [[40, 43], [50, 53]]

def test_unknown_fake_seeds_recorded_as_none(classifier, tmp_path):
    real = generated_folder(tmp_path / 'real', range(16))
    np.savez(tmp_path / 'fakes.npz', samples=np.stack([image(100 + i) for i in range(16)]))
    last = train(str(tmp_path / 'run'), real, str(tmp_path / 'fakes.npz'), classifier, epochs=1, batch=16, **TINY)
    ckpt = torch.load(last, weights_only=True)
    assert 'fake_seeds' in ckpt and ckpt['fake_seeds'] is None
    assert sp.recorded_fake_seeds(last) is None and sp.check_overlap(last, range(16)) is None
