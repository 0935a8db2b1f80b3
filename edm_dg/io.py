"""The one image-I/O module: seeds, file layout, pixel conversion, labels, shards, atomic writes."""

import contextlib
import io
import json
import os
import re
import tempfile
import zipfile

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

def parse_seeds(s):
    """'0-49999' / '1,2,5-10' -> list of ints; ValueError with the offending part otherwise."""
    if isinstance(s, (list, tuple)):
        return list(s)
    seeds = []
    for part in str(s).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)-(\d+)', part)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f'seed range "{part}" is empty (end before start)')
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r'\d+', part):
            seeds.append(int(part))
        else:
            raise ValueError(f'cannot parse "{part}" in seed list "{s}"; use a form like 0-49999 or 1,2,5-10')
    if len(set(seeds)) != len(seeds):
        raise ValueError(f'seed list "{s}" names some seeds twice')
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

def save_npz_shard(path, samples, labels, seeds):
    """Compressed uint8 shard: samples [N,H,W,C], label [N] (-1 = none), seeds [N]."""
    with atomic_open(path) as f:
        np.savez_compressed(f, samples=samples, label=np.asarray(labels, dtype=np.int64), seeds=np.asarray(seeds, dtype=np.int64))

#----------------------------------------------------------------------------
# Reading image sets: EDM zip/folder datasets, image folders, npz files.

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

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
    Labels come from dataset.json (EDM) or the .npz `label` array.
    """

    def __init__(self, path):
        self.path = path
        self._zip = None
        self._arrays = None
        self.label_map = None
        if not os.path.exists(path):
            raise ValueError(f'{path}: no such file or folder')
        if os.path.isfile(path) and path.endswith('.npz'):
            self._load_npz([path])
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self._zip.namelist() if n.lower().endswith(IMAGE_EXTS))
            if 'dataset.json' in self._zip.namelist():
                self.label_map = _label_map(self._zip.read('dataset.json').decode(), path)
        elif os.path.isdir(path):
            self.names = sorted(os.path.relpath(os.path.join(root, fn), path).replace(os.sep, '/')
                                for root, _dirs, files in os.walk(path) for fn in files
                                if fn.lower().endswith(IMAGE_EXTS) and not fn.startswith('.tmp-'))
            if not self.names:
                shards = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith('.npz') and not f.startswith('.tmp-'))
                if not shards:
                    raise ValueError(f'{path}: no images (.png/.jpg) or .npz shards found; check the folder')
                self._load_npz(shards)
            elif os.path.isfile(os.path.join(path, 'dataset.json')):
                with open(os.path.join(path, 'dataset.json')) as f:
                    self.label_map = _label_map(f.read(), path)
        else:
            raise ValueError(f'{path}: not an image folder, dataset zip or .npz file')
        if len(self) == 0:
            raise ValueError(f'{path}: no images found')

    def _load_npz(self, paths):
        self._arrays = _load_npz(paths)
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

def load_image_set(path, max_images=None):
    """All images of a source as uint8 [N,C,H,W] plus int64 labels (or None); see ImageSource."""
    src = ImageSource(path)
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

def _load_npz(paths):
    xs, ys = [], []
    for p in paths:
        try:
            with np.load(p) as z:
                key = 'samples' if 'samples' in z else 'arr_0' if 'arr_0' in z else None
                if key is None:
                    raise ValueError(f'{p}: .npz has neither "samples" nor "arr_0"; pass images as [N,H,W,C] uint8')
                x = z[key]
                y = z['label'] if 'label' in z else z['arr_1'] if 'arr_1' in z else None
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f'{p}: not a readable .npz file ({type(e).__name__}); regenerate it') from None
        if x.ndim != 4 or x.dtype != np.uint8:
            raise ValueError(f'{p}: expected uint8 images [N,H,W,C], got {x.dtype} {list(x.shape)}')
        xs.append(x)
        ys.append(None if y is None or (y < 0).all() else y)
    if len({x.shape[1:] for x in xs}) > 1:
        raise ValueError(f'{paths[0]}: shards have different image shapes')
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous()
    labels = None if any(y is None for y in ys) else torch.from_numpy(np.concatenate(ys).astype(np.int64))
    return x, labels
