"""Which seeds a discriminator's fakes came from, and whether evaluation seeds reuse them.

An image of generate_dg.py depends only on its seed (docs/compat.md §2). If guided
samples are drawn at seeds whose images also served as training fakes, each
of them starts from the latent of an image the discriminator was taught to
reject, and an FID over them is biased. train_disc.py therefore records the
seeds of its fakes in every checkpoint (`fake_seeds`: inclusive ranges
[[a, b], ...], or None when the source does not say), and sampling or FID
commands compare their --seeds with it.

Seeds are known from generate_dg.py's file names ({seed:06d}.png, or
{seed - seed % 1000:06d}/{seed:06d}.png with --subdirs) in a folder or zip
(the names dataset.json lists are the same), and from the `seeds` array of
edm-dg's .npz shards. The DG release's files carry no seeds.
"""

import bisect
import os
import zipfile

import numpy as np
import torch

from .image_sets import IMAGE_KEYS, list_folder, zip_image_names
from .fileio import image_relpath

FIELD = 'fake_seeds'

#----------------------------------------------------------------------------
# Seeds of a source.

def seed_of_name(relpath):
    """The seed of a generate_dg.py file name (flat or --subdirs layout), or None for any other name."""
    relpath = relpath.replace(os.sep, '/')
    stem = relpath.rsplit('/', 1)[-1]
    if not (stem.endswith('.png') and stem[:-4].isdigit()):
        return None
    seed = int(stem[:-4])
    return seed if relpath in (image_relpath(seed, False), image_relpath(seed, True).replace(os.sep, '/')) else None

def _seeds_of_names(names):
    seeds = [seed_of_name(n) for n in names]
    return None if not seeds or any(s is None for s in seeds) else seeds

def _npy_length(z, key):
    """Length of array `key` of an open .npz, read from its header without decompressing the data."""
    with z.zip.open(key + '.npy') as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(f)[0]
    return shape[0] if shape else 0

def _seeds_of_npz(path):
    """The `seeds` array of an edm-dg shard as a list, or None when the file has none."""
    try:
        with np.load(path) as z:
            if 'seeds' not in z.files:
                return None
            seeds = z['seeds']
            key = next((k for k in IMAGE_KEYS if k in z.files), None)
            n = None if key is None else _npy_length(z, key)
    except Exception as e:
        raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}); it may be truncated, copy or regenerate it') from None
    if seeds.ndim != 1 or seeds.dtype.kind not in 'iu' or (n is not None and len(seeds) != n):
        raise ValueError(f'{path}: "seeds" must hold one integer per image ({n} images, seeds {seeds.dtype} '
                         f'{list(seeds.shape)}); regenerate the file')
    return [int(s) for s in seeds]

def source_seeds(path):
    """Seeds of a source's images in the order ImageSource reads them, or None when unknown."""
    if os.path.isfile(path) and path.lower().endswith('.npz'):
        return _seeds_of_npz(path)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return _seeds_of_names(zip_image_names(zf))
    if os.path.isdir(path):
        lst = list_folder(path)
        if lst.images:
            return _seeds_of_names(lst.images)
        parts = [_seeds_of_npz(p) for p in lst.npz]
        return None if not parts or any(p is None for p in parts) else [s for p in parts for s in p]
    raise ValueError(f'{path}: no such file or folder')

def seeds_of_source(path):
    """Sorted seeds of a source's images, or None when the source does not record them."""
    seeds = source_seeds(path)
    return None if seeds is None else sorted(seeds)

#----------------------------------------------------------------------------
# Ranges.

def compress_ranges(seeds):
    """Seeds -> sorted inclusive ranges [[a, b], ...] (duplicates merged)."""
    ranges = []
    for s in sorted(set(int(s) for s in seeds)):
        if ranges and s == ranges[-1][1] + 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    return ranges

def expand_ranges(ranges):
    """Inclusive ranges [[a, b], ...] -> sorted list of seeds."""
    return sorted({s for a, b in ranges for s in range(int(a), int(b) + 1)})

def _merged(ranges):
    """Ranges sorted and merged, without expanding them."""
    out = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out

def overlap(ranges, seeds):
    """The seeds among `seeds` that fall inside `ranges`, as a list of inclusive (a, b) ranges."""
    merged = _merged(ranges)
    starts = [a for a, _ in merged]
    def inside(s):
        i = bisect.bisect_right(starts, s) - 1
        return i >= 0 and s <= merged[i][1]
    return [tuple(r) for r in compress_ranges(s for s in set(seeds) if inside(s))]

def format_ranges(ranges, limit=3):
    """'0-49999, 60000' (the first `limit` ranges, then how many more)."""
    parts = [f'{a}' if a == b else f'{a}-{b}' for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f'and {len(ranges) - limit} more ranges')
    return ', '.join(parts)

#----------------------------------------------------------------------------
# Checkpoints.

def recorded_fake_seeds(ckpt):
    """The fake_seeds ranges a discriminator checkpoint (dict or path) records, or None (unknown, or a released file)."""
    if isinstance(ckpt, (str, os.PathLike)):
        try:
            ckpt = torch.load(ckpt, map_location='cpu', weights_only=True)
        except Exception:
            return None  # Loading the discriminator itself reports what is wrong with the file.
    ranges = ckpt.get(FIELD) if isinstance(ckpt, dict) else None
    if not ranges:
        return None
    return [[int(a), int(b)] for a, b in ranges]

def overlap_message(disc_path, ranges, seeds):
    """One line naming the seeds shared by --seeds and the discriminator's fakes, or None when disjoint."""
    if not ranges:
        return None
    shared = overlap(ranges, seeds)
    if not shared:
        return None
    n = len(set(seeds))
    k = sum(b - a + 1 for a, b in shared)
    hi = max(b for _, b in ranges)
    return (f'{disc_path} was trained on fakes of seeds {format_ranges(_merged(ranges))}; --seeds overlap them at '
            f'{format_ranges(shared)} ({k} of {n} seeds): each such image starts from the latent of a training fake; '
            f'use disjoint seeds (e.g. --seeds={hi + 1}-{hi + n}) or train on fakes of other seeds')

def check_overlap(disc_path, seeds):
    """overlap_message for the fake_seeds recorded in the checkpoint at disc_path (None when disjoint or unknown)."""
    return overlap_message(disc_path, recorded_fake_seeds(disc_path), seeds)
