"""Writing side of image I/O: atomic writes, seed lists, EDM file names, pixel conversion, PNGs, labels, shards.

Reading image sets (folders, zips, .npz files) lives in image_sets.py.
"""

import contextlib
import json
import os
import re
import shutil
import tempfile

import numpy as np
import PIL.Image
import torch

#----------------------------------------------------------------------------
# Atomic writes: temp file in the target folder, then rename.

_UMASK = os.umask(0)
os.umask(_UMASK)

@contextlib.contextmanager
def atomic_open(path, mode='wb'):
    """Write to a temp file next to `path` and rename it over `path` on success."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix=os.path.basename(path))
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

@contextlib.contextmanager
def atomic_dir(path):
    """A temp folder next to `path` to fill; on success it replaces `path` (a previous folder) whole."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-')
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):  # mkdtemp's 0700 (and some writers' 0600) would make outputs private
            os.chmod(root, 0o777 & ~_UMASK)
            for fn in files:
                os.chmod(os.path.join(root, fn), 0o666 & ~_UMASK)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=parent, prefix='.tmp-old-')
            os.rename(path, os.path.join(old, 'previous'))
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

def remove_stale_temps(folder):
    """Delete temp files a killed writer left behind (call while no writer runs); returns their count."""
    n = 0
    for root, _dirs, files in os.walk(folder):
        for fn in files:
            if fn.startswith('.tmp-'):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(root, fn))
                    n += 1
    return n

def save_figure(fig, path):
    """A matplotlib Figure as PNG, written atomically."""
    with atomic_open(path) as f:
        fig.savefig(f, format='png', dpi=100)

def atomic_torch_save(obj, path):
    with atomic_open(path) as f:
        torch.save(obj, f)

def atomic_write_text(path, text):
    with atomic_open(path, 'w') as f:
        f.write(text)

def atomic_write_json(path, obj, **kwargs):
    atomic_write_text(path, json.dumps(obj, **kwargs))

#----------------------------------------------------------------------------
# Seeds and file names (EDM layout).

def parse_seeds(s, option='--seeds'):
    """'0-49999' / '1,2,5-10' -> list of ints; ValueError naming `option` and the offending part otherwise."""
    if isinstance(s, (list, tuple)):
        return list(s)
    seeds = []
    for part in str(s).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f'{option}: seed range "{part}" is empty (end before start); write it as {b}-{a}')
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r'\d+', part):
            seeds.append(int(part))
        else:
            raise ValueError(f'{option}: cannot parse "{part}" in seed list "{s}"; use a form like 0-49999 or 1,2,5-10')
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'{option}: seed list "{s}" names some seeds twice; list each seed once')
    return seeds

def image_relpath(seed, subdirs=False):
    """EDM's file name of a seed's image, relative to the output folder."""
    name = f'{seed:06d}.png'
    return os.path.join(f'{seed - seed % 1000:06d}', name) if subdirs else name

def to_uint8(images):
    """EDM's pixel conversion: [N,C,H,W] float in [-1,1] -> [N,H,W,C] uint8 numpy."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_png(path, image):
    """Save one HWC uint8 image atomically (mode L for one channel, RGB for three)."""
    pil = PIL.Image.fromarray(image[:, :, 0], 'L') if image.shape[2] == 1 else PIL.Image.fromarray(image, 'RGB')
    with atomic_open(path) as f:
        pil.save(f, format='png')

def is_valid_png(path):
    """True if `path` exists and decodes fully as an image."""
    try:
        with PIL.Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False

def read_image(path_or_file, name=None):
    """HWC uint8 array of an image file; ValueError naming the file when it does not decode."""
    try:
        with PIL.Image.open(path_or_file) as im:
            arr = np.array(im)
    except Exception as e:
        raise ValueError(f'{name or path_or_file}: not a readable image ({type(e).__name__}); delete or replace it') from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr

#----------------------------------------------------------------------------
# Labels (EDM dataset.json) and npz shards (DG release keys).

def write_labels(outdir, labels):
    """Merge {relpath: label} into outdir/dataset.json (EDM layout), atomically."""
    path = os.path.join(outdir, 'dataset.json')
    merged = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f).get('labels') or []
        merged = {fname: label for fname, label in old}
    merged.update(labels)
    items = [[fname.replace(os.sep, '/'), merged[fname]] for fname in sorted(merged)]
    if all(label is None for _, label in items):
        atomic_write_json(path, {'labels': None})
    else:
        atomic_write_json(path, {'labels': items})

def shard_name(seeds):
    return f'seeds-{min(seeds):06d}-{max(seeds):06d}-n{len(seeds)}.npz'

def save_npz_shard(path, samples, labels, seeds, keys='edm-dg', label_dim=0):
    """Compressed uint8 shard of images [N,H,W,C] with their labels [N] (-1 = none) and seeds [N].

    keys='edm-dg' (also the release's names): samples, label, seeds. keys='study' (the reproduction
    study's generate.py --save_format=npz): images, one-hot labels [N, label_dim] when labelled, seeds.
    """
    labels = np.asarray(labels, dtype=np.int64)
    seeds = np.asarray(seeds, dtype=np.int64)
    if keys == 'study':
        arrays = dict(images=samples, seeds=seeds)
        if label_dim and (labels >= 0).all():
            arrays['labels'] = np.eye(label_dim, dtype=np.float32)[labels]
    else:
        arrays = dict(samples=samples, label=labels, seeds=seeds)
    with atomic_open(path) as f:
        np.savez_compressed(f, **arrays)
