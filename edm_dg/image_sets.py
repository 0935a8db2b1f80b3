"""Reading image sets: EDM dataset zips and folders, image folders, .npz files and folders of .npz shards.

Besides EDM's layouts this reads edm-dg's shards (`samples`, `label`, `seeds`)
and the files of the Discriminator Guidance release: its sampler's
`samples_*.npz` (`samples` + one-hot `label`, or `arr_0` + `arr_1`) with the
`sample_*.png` grid previews it writes next to them, `true_data.npz` (`arr_0`,
or `samples` + integer `label`) and `gen_data_for_discriminator_training.npz`;
and the reproduction study's `generate.py --save_format=npz` files (`images`,
optional one-hot `labels`). Every problem with a file is a one-line ValueError that names the file.
"""

import dataclasses
import io
import json
import os
import re
import zipfile

import numpy as np
import torch

from torch_utils import distributed as dist
from .fileio import read_image

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
IMAGE_KEYS = ('samples', 'images', 'arr_0')  # edm-dg / release, the study, then np.savez's positional name
LABEL_KEYS = ('label', 'labels', 'arr_1')
PREVIEW = re.compile(r'sample_\d+\.png', re.IGNORECASE)  # the release's grid of a whole batch
RELEASE_CACHE = 'gen_data_for_discriminator_training.npz'

#----------------------------------------------------------------------------
# Listing what a folder or zip holds.

@dataclasses.dataclass
class Listing:
    """The readable content of a folder: image paths relative to it, .npz paths, what was left out."""
    images: list
    npz: list
    previews: int = 0           # sample_*.png grid previews left out
    skipped_cache: str = None   # the release's concatenation cache, left out next to its shards

def list_folder(path):
    """Images (sorted as EDM's ImageFolderDataset sorts them) and .npz files of a folder, recursively.

    Grid previews are never images of the set. The release's
    gen_data_for_discriminator_training.npz concatenates the samples_*.npz
    beside it, so it is read only when it is the folder's one .npz file.
    """
    images, npz, previews = [], [], 0
    for root, _dirs, files in os.walk(path):
        for fn in files:
            if fn.startswith('.tmp-'):  # An unfinished atomic write.
                continue
            if fn.lower().endswith(IMAGE_EXTS):
                if PREVIEW.fullmatch(fn):
                    previews += 1
                else:
                    images.append(os.path.relpath(os.path.join(root, fn), path).replace(os.sep, '/'))
            elif fn.lower().endswith('.npz'):
                npz.append(os.path.join(root, fn))
    skipped = None
    if len(npz) > 1:
        cache = [p for p in npz if os.path.basename(p) == RELEASE_CACHE]
        if cache:
            skipped = cache[0]
            npz = [p for p in npz if p not in cache]
    return Listing(sorted(images), sorted(npz), previews, skipped)

def zip_image_names(zf):
    """Image names of an EDM dataset zip, sorted."""
    return sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_EXTS))

#----------------------------------------------------------------------------
# .npz files.

def read_npz(path):
    """uint8 images [N,H,W,C] and int64 labels [N] (None when absent or all -1) of one .npz file."""
    try:
        z = np.load(path)
    except Exception as e:
        raise ValueError(f'{path}: not a readable .npz file ({type(e).__name__}); it may be truncated, '
                         f'copy or regenerate it') from None
    with z:
        keys = list(z.files)
        xkey = next((k for k in IMAGE_KEYS if k in keys), None)
        if xkey is None:
            raise ValueError(f'{path}: .npz has no image array "samples", "images" or "arr_0" (found {keys}); '
                             f'store uint8 images [N,H,W,C] under "samples"')
        ykey = next((k for k in LABEL_KEYS if k in keys), None)
        arrays = {}
        for key in (xkey, ykey):
            if key is None:
                continue
            try:
                arrays[key] = z[key]
            except Exception as e:
                raise ValueError(f'{path}: array "{key}" cannot be read ({type(e).__name__}); the file is truncated '
                                 f'or damaged, copy or regenerate it') from None
    x = check_images(arrays[xkey], path, xkey)
    y = None if ykey is None else class_labels(arrays[ykey], len(x), path, ykey)
    return x, y

def check_images(x, path, key):
    """x itself when it is a non-empty uint8 [N,H,W,C] array with 1 or 3 channels; ValueError otherwise."""
    if x.dtype != np.uint8:
        hint = ' (from floats in [-1,1]: (x * 127.5 + 128).clip(0, 255).astype(np.uint8))' if x.dtype.kind == 'f' else ''
        raise ValueError(f'{path}: "{key}" holds {x.dtype} values; images must be uint8 [N,H,W,C] in 0..255{hint}')
    if x.ndim != 4:
        raise ValueError(f'{path}: "{key}" has shape {list(x.shape)}; images must be uint8 [N,H,W,C]')
    if x.shape[3] not in (1, 3):
        hint = '; it looks channels-first, transpose it to [N,H,W,C]' if x.shape[1] in (1, 3) else ''
        raise ValueError(f'{path}: "{key}" has shape {list(x.shape)}: {x.shape[3]} channels last{hint}; '
                         f'images must be uint8 [N,H,W,C] with 1 or 3 channels')
    if len(x) == 0:
        raise ValueError(f'{path}: "{key}" holds no images; regenerate the file')
    return x

def class_labels(y, n, path, key):
    """int64 class labels [n] from integer labels or one-hot rows (argmax); None when all are -1 (no label)."""
    if y.ndim not in (1, 2):
        raise ValueError(f'{path}: "{key}" has shape {list(y.shape)}; labels must be integers [N] or one-hot rows [N, K]')
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if len(y) != n:
        raise ValueError(f'{path}: "{key}" has {len(y)} labels for {n} images; each image needs one label, '
                         f'regenerate the file')
    if y.ndim == 2:
        if y.dtype.kind not in 'biuf':
            raise ValueError(f'{path}: "{key}" holds {y.dtype} values; labels must be integers [N] or one-hot rows [N, K]')
        bad = ~(((y == 0) | (y == 1)).all(axis=1) & (y.sum(axis=1) == 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f'{path}: "{key}" is a [N, {y.shape[1]}] array but row {i} is not one-hot; '
                             f'store one-hot rows or integer classes [N]')
        return y.argmax(axis=1).astype(np.int64)
    if y.dtype.kind == 'f' and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f'{path}: "{key}" holds non-integer values; labels must be class indices [N] or one-hot rows [N, K]')
    if y.dtype.kind not in 'biuf':
        raise ValueError(f'{path}: "{key}" holds {y.dtype} values; labels must be integers [N] or one-hot rows [N, K]')
    y = y.astype(np.int64)
    if (y < 0).all():  # edm-dg shards of unconditional networks store -1.
        return None
    if (y < 0).any():
        raise ValueError(f'{path}: "{key}" mixes -1 (no label) with class labels; regenerate the file')
    return y

def load_npz_files(paths):
    """Images [N,C,H,W] (uint8 tensor) and labels (int64 tensor, or None unless every file has them) of .npz files."""
    xs, ys = [], []
    for p in paths:
        x, y = read_npz(p)
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f'{p}: images are {list(x.shape[1:])} (H,W,C) but {paths[0]} has {list(xs[0].shape[1:])}; '
                             f'one set must hold one resolution and channel count')
        xs.append(x)
        ys.append(y)
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous()
    labels = None if any(y is None for y in ys) else torch.from_numpy(np.concatenate(ys))
    return x, labels

#----------------------------------------------------------------------------
# Image sources.

def _label_map(dataset_json_text, source):
    try:
        labels = json.loads(dataset_json_text).get('labels')
    except Exception:
        raise ValueError(f'{source}: dataset.json is not valid JSON; regenerate it (EDM dataset_tool.py or generate_dg.py)') from None
    if labels is None:
        return None
    return {fname.replace('\\', '/'): (int(label) if label is not None else None) for fname, label in labels}

class ImageSource:
    """Images of a folder, EDM dataset zip, .npz file or folder of .npz shards, read lazily by index.

    Names are sorted as in EDM's ImageFolderDataset, so index subsets match EDM's.
    Labels come from dataset.json (EDM) or the .npz label array. What was left
    out (grid previews, the release's cache) is reported through `log`
    (default: print on rank 0) and kept in `notes`.
    """

    def __init__(self, path, log=None):
        self.path = path
        self._zip = None
        self._arrays = None
        self.label_map = None
        self.notes = []
        if not os.path.exists(path):
            raise ValueError(f'{path}: no such file or folder')
        if os.path.isfile(path) and path.lower().endswith('.npz'):
            self._load_npz([path])
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self.names = zip_image_names(self._zip)
            if 'dataset.json' in self._zip.namelist():
                self.label_map = _label_map(self._zip.read('dataset.json').decode(), path)
        elif os.path.isdir(path):
            self._from_folder(path)
        else:
            raise ValueError(f'{path}: not an image folder, dataset zip or .npz file')
        if len(self) == 0:
            raise ValueError(f'{path}: no images found')
        for note in self.notes:
            (log or dist.print0)(note)

    def _from_folder(self, path):
        lst = list_folder(path)
        if lst.previews:
            self.notes.append(f'{path}: skipped {lst.previews} grid preview(s) sample_*.png: the DG release sampler '
                              f'tiles a whole batch into each, so they are not samples')
        if lst.images:
            self.names = lst.images
            if os.path.isfile(os.path.join(path, 'dataset.json')):
                with open(os.path.join(path, 'dataset.json')) as f:
                    self.label_map = _label_map(f.read(), path)
        elif lst.npz:
            if lst.skipped_cache:
                self.notes.append(f'{lst.skipped_cache}: skipped: the DG release\'s concatenation of the other .npz files '
                                  f'here, reading both would count every image twice')
            self._load_npz(lst.npz)
        elif lst.previews:
            raise ValueError(f'{path}: holds only {lst.previews} grid preview(s) sample_*.png of the DG release sampler, '
                             f'no samples; pass the folder of its samples_*.npz files or of generate_dg.py images')
        else:
            raise ValueError(f'{path}: no images ({"/".join(IMAGE_EXTS)}) or .npz files found; check the folder')

    def _load_npz(self, paths):
        self._arrays = load_npz_files(paths)
        self.names = [f'{i:08d}' for i in range(len(self._arrays[0]))]

    def __len__(self):
        return len(self.names)

    def read(self, i):
        """HWC uint8 numpy image i."""
        if self._arrays is not None:
            return self._arrays[0][i].permute(1, 2, 0).numpy()
        if self._zip is not None:
            return read_image(io.BytesIO(self._zip.read(self.names[i])), f'{self.path}:{self.names[i]}')
        return read_image(os.path.join(self.path, self.names[i]))

    def images(self, indices):
        """uint8 tensor [N,C,H,W] of the given indices; ValueError if shapes differ."""
        if self._arrays is not None:
            return self._arrays[0][torch.as_tensor(indices, dtype=torch.long)]
        return _stack([self.read(i) for i in indices], self.path)

    def labels(self, indices=None):
        """int64 labels or None when the source has none."""
        indices = range(len(self)) if indices is None else indices
        if self._arrays is not None:
            y = self._arrays[1]
            return None if y is None else y[torch.as_tensor(list(indices), dtype=torch.long)]
        if self.label_map is None:
            return None
        missing = [self.names[i] for i in indices if self.label_map.get(self.names[i]) is None]
        if missing:
            raise ValueError(f'{self.path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)')
        return torch.tensor([self.label_map[self.names[i]] for i in indices], dtype=torch.int64)

def subset_indices(n, num=None, seed=0):
    """EDM's seeded subset: shuffle with RandomState(seed), keep `num`, sort."""
    idx = np.arange(n)
    if num is not None and n > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx

def load_image_set(path, max_images=None, log=None):
    """All images of a source as uint8 [N,C,H,W] plus int64 labels (or None); see ImageSource."""
    src = ImageSource(path, log=log)
    idx = list(range(len(src) if max_images is None else min(len(src), max_images)))
    return src.images(idx), src.labels(idx)

def _stack(images, source):
    """HWC uint8 arrays -> [N,C,H,W] tensor; ValueError when shapes differ."""
    if not images:
        raise ValueError(f'{source}: no images found')
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        raise ValueError(f'{source}: images have different shapes {sorted(shapes)[:3]}; all must share one resolution and channel count')
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
