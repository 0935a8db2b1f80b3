"""Latent models: the space a network or discriminator works in, its VAE, and files of latents.

EDM2's latent models sample 4 x H/8 x W/8 latents of Stability's VAE,
standardised per channel (training.encoders.StabilityVAEEncoder); their
pickle's encoder decodes them to pixels. A *space* record says what an array
of a network, a discriminator or a file lives in: `{'kind': 'pixels'}`, or
`{'kind': 'latents', 'encoder', 'vae_name', 'scale', 'bias'}` with the
standardisation `final = raw * scale + bias` (docs/compat.md, "Latent models").
A discriminator judges one space; pairing it with a model of another is refused.

Files (docs/compat.md, "Latent models"):
- EDM2's latent datasets (`dataset_tool.py encode`): a folder or zip of
  `NNNNN/img-mean-std-NNNNNNNN.npy` (raw posterior mean and std, 8 x h x w
  float32) with dataset.json labels;
- edm-dg's latent shards (`generate_dg.py --save_latents`):
  `latents/seeds-*.npz` with `latents` (final, float32 [N,C,h,w]), `label`,
  `seeds` and `space` (the JSON record, so the file decodes by itself).
"""

import io
import json
import os
import re
import zipfile

import numpy as np
import torch

from . import fileio

PIXELS = {'kind': 'pixels'}
RAW_NAME = re.compile(r'img-mean-std-\d+\.npy')
LATENT_DIR = 'latents'
KNOWN_VAES = ('stabilityai/sd-vae-ft-mse',)  # fetched by name without --trust_pickle

#----------------------------------------------------------------------------
# Spaces.

def space_of(encoder):
    """The space record of an EDM2 encoder (None or StandardRGBEncoder: pixels)."""
    if encoder is None or type(encoder).__name__ == 'StandardRGBEncoder':
        return dict(PIXELS)
    if not hasattr(encoder, 'scale') or not hasattr(encoder, 'bias'):
        raise ValueError(f'encoder {type(encoder).__name__} is neither StandardRGBEncoder nor StabilityVAEEncoder')
    return dict(kind='latents', encoder=type(encoder).__name__, vae_name=str(getattr(encoder, 'vae_name', '')),
                scale=[float(v) for v in np.asarray(encoder.scale, np.float32).ravel()],
                bias=[float(v) for v in np.asarray(encoder.bias, np.float32).ravel()])

def space_of_pickle(path, trust_pickle=False):
    """The space of an EDM2 pickle's encoder (pixels when it has none)."""
    from .pickles import read_pickle  # pylint: disable=import-outside-toplevel
    data = read_pickle(path, trust_pickle=trust_pickle)
    if not isinstance(data, dict):
        raise ValueError(f'{path}: not an EDM2 network pickle; pass the latent model\'s .pkl as --encoder')
    return space_of(data.get('encoder'))

def space_of_net(net):
    """The space a (wrapped) network samples in."""
    return space_of(getattr(net, 'encoder', None))

def describe(space):
    space = space or PIXELS
    if space['kind'] == 'pixels':
        return 'pixels'
    return f'latents of the VAE "{space["vae_name"]}" standardised by scale {_short(space["scale"])}, bias {_short(space["bias"])}'

def _short(values):
    return '[' + ', '.join(f'{v:.4g}' for v in values) + ']'

def same_space(a, b):
    """Whether two space records describe the same arrays (the VAE's name may differ: --vae gives the weights)."""
    a, b = a or PIXELS, b or PIXELS
    if a['kind'] != b['kind']:
        return False
    if a['kind'] == 'pixels':
        return True
    return len(a['scale']) == len(b['scale']) and np.allclose(a['scale'], b['scale'], rtol=1e-6) and \
        np.allclose(a['bias'], b['bias'], rtol=1e-6, atol=1e-7)

def check_space(model_space, disc_space, network_pkl='--network', disc_path='--disc'):
    """Refuse a discriminator of another space than the network's (heads without a record judge pixels)."""
    if same_space(model_space, disc_space):
        return
    disc_space = disc_space or PIXELS
    if disc_space['kind'] != (model_space or PIXELS)['kind']:
        raise ValueError(f'{disc_path}: the discriminator judges {disc_space["kind"]} but {network_pkl} samples '
                         f'{(model_space or PIXELS)["kind"]}; pass a discriminator trained on '
                         f'{"latents of this model (train_disc.py on --save_latents output)" if disc_space["kind"] == "pixels" else "pixels"}')
    raise ValueError(f'{disc_path}: the discriminator judges {describe(disc_space)} but {network_pkl} samples '
                     f'{describe(model_space)}; train it on latents of the same standardisation')

#----------------------------------------------------------------------------
# The VAE of an encoder.

def is_latent(encoder):
    """Whether an encoder (None: pixels) maps to latents."""
    return encoder is not None and space_of(encoder)['kind'] == 'latents'

def prepare_encoder(encoder, device, vae=None, batch_size=None, trust_pickle=False, source='--network'):
    """Load the encoder's VAE now: from `vae` (a diffusers folder, --vae) or by the pickle's vae_name.

    A name other than EDM2's published VAE is fetched only with trust_pickle
    (the file chose it); --vae always works. batch_size: --encoder_batch.
    """
    if not is_latent(encoder):
        if vae is not None:
            raise ValueError(f'--vae={vae}: {source} samples pixels, it has no VAE; drop --vae')
        return encoder
    name = encoder.vae_name
    if vae is None and name not in KNOWN_VAES and not trust_pickle:
        raise ValueError(f'{source}: its encoder names the VAE "{name}", which edm-dg fetches by name only with '
                         f'--trust_pickle; pass --vae=DIR (that VAE as a diffusers AutoencoderKL folder)')
    if vae is not None and not os.path.isdir(vae):
        raise ValueError(f'--vae={vae}: no such folder; pass a diffusers AutoencoderKL folder (save_pretrained), '
                         f'or drop --vae to fetch "{name}"')
    from training.encoders import _load_vae  # pylint: disable=import-outside-toplevel
    try:
        encoder._vae = _load_vae(vae if vae is not None else name, device)
    except (OSError, ImportError) as e:
        raise ValueError(str(e)) from None
    if batch_size is not None:
        encoder.batch_size = int(batch_size)
    return encoder

def encoder_for(space, vae=None, device='cpu', batch_size=8, trust=False, source='latents'):
    """A StabilityVAEEncoder that decodes the arrays of a latent space record, its VAE loaded."""
    from training.encoders import StabilityVAEEncoder  # pylint: disable=import-outside-toplevel
    enc = StabilityVAEEncoder(vae_name=space['vae_name'], batch_size=batch_size)
    enc.scale = np.asarray(space['scale'], np.float32)
    enc.bias = np.asarray(space['bias'], np.float32)
    return prepare_encoder(enc, device, vae=vae, batch_size=batch_size, trust_pickle=trust, source=source)

def to_uint8(net, x):
    """Sampler output -> HWC uint8 numpy images: EDM's conversion for pixels, the encoder's decode for latents."""
    enc = getattr(net, 'encoder', None)
    if enc is None or not is_latent(enc):
        return fileio.to_uint8(x)
    with torch.no_grad():
        return enc.decode(x).permute(0, 2, 3, 1).cpu().numpy()

def standardise(raw, scale, bias, gen):
    """Raw latents (posterior mean and std, 2C channels) -> final latents: one seeded posterior draw, scaled."""
    mean, std = raw.to(torch.float32).chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=gen, device=gen.device).to(mean.device)
    per = lambda v: torch.as_tensor(np.asarray(v, np.float32), device=mean.device).reshape(1, -1, 1, 1)
    return (mean + eps * std) * per(scale) + per(bias)

def encode_images(encoder, images_u8, device='cpu', source='images'):
    """uint8 images [N,C,H,W] -> raw latents [N,2C',h,w] (float32, CPU) with the encoder's VAE, in its batches."""
    want = getattr(getattr(encoder._vae, 'config', None), 'in_channels', images_u8.shape[1])
    if images_u8.shape[1] != want:
        raise ValueError(f'{source}: images have {images_u8.shape[1]} channel(s) but the VAE takes {want}; '
                         f'pass images of the VAE\'s kind (or another --vae)')
    with torch.no_grad():
        # Moved to the device a few VAE batches at a time (encode_pixels splits them further), results kept on the host.
        return torch.cat([encoder.encode_pixels(b.to(device)).cpu() for b in images_u8.split(max(encoder.batch_size, 1) * 8)])

#----------------------------------------------------------------------------
# Files.

def shard_path(outdir, seeds):
    return os.path.join(outdir, LATENT_DIR, fileio.shard_name(seeds))

def save_latent_shard(path, latents, labels, seeds, space):
    """Final latents [N,C,h,w] with labels (-1 = none), seeds and the space record, atomically."""
    arrays = dict(latents=np.asarray(latents, dtype=np.float32), label=np.asarray(labels, dtype=np.int64),
                  seeds=np.asarray(seeds, dtype=np.int64), space=np.array(json.dumps(space)))
    with fileio.atomic_open(path) as f:
        np.savez(f, **arrays)

def _shard_files(path, nested=True):
    """The .npz files of a shard file or folder; nested: also OUTDIR/latents of a generate_dg.py folder."""
    path = str(path)
    if os.path.isfile(path) and path.endswith('.npz'):
        return [path]
    if not os.path.isdir(path):
        return []
    folder = os.path.join(path, LATENT_DIR) if nested and os.path.isdir(os.path.join(path, LATENT_DIR)) else path
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.npz') and not f.startswith('.tmp-'))

def _raw_names(path):
    """Sorted member names of an EDM2 latent dataset (folder or zip), or [] when it is none."""
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return sorted(n for n in zf.namelist() if RAW_NAME.fullmatch(os.path.basename(n)))
    if os.path.isdir(path):
        names = []
        for root, _dirs, files in os.walk(path):
            names += [os.path.relpath(os.path.join(root, f), path).replace(os.sep, '/') for f in files if RAW_NAME.fullmatch(f)]
        return sorted(names)
    return []

def seeds_held(outdir):
    """The seeds whose latents the shards of outdir/latents hold (reading only their `seeds`)."""
    held = set()
    for fn in _shard_files(os.path.join(outdir, LATENT_DIR), nested=False):
        try:
            with np.load(fn) as z:
                held.update(int(v) for v in z['seeds'])
        except Exception:  # pylint: disable=broad-except
            pass  # An unreadable shard holds nothing: its seeds are sampled again, and the reader names it.
    return held

def is_latent_shards(path, nested=True):
    """Whether path is a file or folder of edm-dg latent shards (a `latents` array inside)."""
    files = _shard_files(path, nested)
    if not files:
        return False
    try:
        with np.load(files[0]) as z:
            return 'latents' in z.files
    except Exception:  # pylint: disable=broad-except
        return False

def is_latent_source(path):
    return bool(_raw_names(path)) or is_latent_shards(path)

def read_latent_shards(path):
    """(final latents [N,C,h,w] float32, labels int64 or None, seeds int64, space) of edm-dg shards, sorted by seed."""
    xs, ys, ss, names, space = [], [], [], [], None
    for fn in _shard_files(path):
        try:
            with np.load(fn) as z:
                if 'latents' not in z.files:
                    raise ValueError(f'{fn}: not a latent shard (no "latents"); pass the latents folder of generate_dg.py --save_latents')
                x, y, s, sp = z['latents'], z['label'], z['seeds'], json.loads(str(z['space']))
        except (OSError, KeyError, json.JSONDecodeError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f'{fn}: not a readable latent shard ({type(e).__name__}); regenerate it with --save_latents') from None
        if space is not None and not same_space(space, sp):
            raise ValueError(f'{fn}: latents of {describe(sp)}, but the other shards hold {describe(space)}; keep one model\'s shards per folder')
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(f'{fn}: latents of shape {list(x.shape[1:])}, the other shards {list(xs[0].shape[1:])}; keep one model\'s shards per folder')
        if not len(x) == len(y) == len(s):
            raise ValueError(f'{fn}: {len(x)} latents, {len(y)} labels and {len(s)} seeds; regenerate it with --save_latents')
        space = sp
        xs.append(x), ys.append(y), ss.append(s), names.append(fn)
    if not xs:
        raise ValueError(f'{path}: no latent shards (latents/*.npz); generate them with generate_dg.py --save_latents')
    x, y, s = np.concatenate(xs), np.concatenate(ys), np.concatenate(ss)
    order = np.argsort(s, kind='stable')
    dup = np.nonzero(s[order][1:] == s[order][:-1])[0]
    if len(dup):
        seed = int(s[order][dup[0]])
        files = [n for n, part in zip(names, ss) if seed in part]
        raise ValueError(f'{files[-1]}: seed {seed} is also in {files[0]}; keep one shard per seed (delete one of them)')
    y = None if (y < 0).any() else torch.from_numpy(y[order])
    return torch.from_numpy(x[order]), y, torch.from_numpy(s[order]), space

class DecodedLatents:
    """Latent shards as an image source (`len`, `images(indices)` -> uint8 [N,C,H,W]), decoded batch by batch."""

    def __init__(self, path, vae=None, device='cpu', batch_size=4, trust=False):
        self.path = str(path)
        self.latents, self._labels, self.seeds, self.space = read_latent_shards(path)
        self.device = device
        self.encoder = encoder_for(self.space, vae=vae, device=device, batch_size=batch_size, trust=trust, source=str(path))

    def __len__(self):
        return len(self.latents)

    def __str__(self):
        return self.path

    def images(self, indices):
        x = self.latents[torch.as_tensor(np.asarray(indices), dtype=torch.long)].to(self.device)
        with torch.no_grad():
            return self.encoder.decode(x).cpu()

    def labels(self, indices=None):
        return None if self._labels is None else self._labels[list(range(len(self)) if indices is None else indices)]

def read_raw_dataset(path):
    """(raw latents [N,2C,h,w] float32, labels int64 or None) of an EDM2 latent dataset (dataset_tool.py encode)."""
    names = _raw_names(path)
    if not names:
        raise ValueError(f'{path}: no img-mean-std-*.npy files; pass an EDM2 latent dataset (dataset_tool.py encode)')
    zf = zipfile.ZipFile(path) if os.path.isfile(path) else None
    try:
        def read(name):
            if zf:
                return zf.read(name)
            with open(os.path.join(path, name), 'rb') as f:
                return f.read()
        arrays = []
        for n in names:
            try:
                a = np.load(io.BytesIO(read(n)), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise ValueError(f'{path}:{n}: not a readable .npy ({type(e).__name__}); re-encode the dataset') from None
            if a.ndim != 3 or a.shape[0] % 2:
                raise ValueError(f'{path}:{n}: shape {list(a.shape)}; EDM2 latents are [2C,h,w] (mean and std)')
            if arrays and a.shape != arrays[0].shape:
                raise ValueError(f'{path}:{n}: shape {list(a.shape)} but {names[0]} has {list(arrays[0].shape)}')
            arrays.append(a.astype(np.float32))
        meta = read('dataset.json') if (zf and 'dataset.json' in zf.namelist()) or \
            (not zf and os.path.isfile(os.path.join(path, 'dataset.json'))) else None
    finally:
        if zf:
            zf.close()
    labels = None
    if meta is not None:
        entries = json.loads(meta).get('labels')
        if entries:
            lab = dict((k, v) for k, v in entries)
            missing = [n for n in names if lab.get(n) is None]
            if missing:
                raise ValueError(f'{path}: dataset.json has no label for {missing[0]} (and {len(missing) - 1} more); '
                                 f'its names must be the .npy files\' paths inside the dataset')
            labels = torch.tensor([int(lab[n]) for n in names], dtype=torch.int64)
    return torch.from_numpy(np.stack(arrays)), labels

def _raw_name(i):
    return f'{i // 1000:05d}/img-mean-std-{i:08d}.npy'

def _save_raw(folder, i, array):
    name = _raw_name(i)
    os.makedirs(os.path.join(folder, name[:5]), exist_ok=True)
    np.save(os.path.join(folder, name), np.asarray(array, dtype=np.float32))
    return name

def _save_labels(folder, names, labels):
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump({'labels': None if labels is None else [[n, int(y)] for n, y in zip(names, labels)]}, f)

def write_raw_dataset(outdir, raw, labels=None):
    """An EDM2 latent dataset folder (the layout of its dataset_tool.py encode) of raw latents [N,2C,h,w], whole at once."""
    with fileio.atomic_dir(outdir) as tmp:
        names = [_save_raw(tmp, i, a) for i, a in enumerate(raw.cpu().numpy())]
        _save_labels(tmp, names, None if labels is None else [int(y) for y in labels])
    return outdir

def encode_dataset(source, dest, vae, *, vae_name=KNOWN_VAES[0], max_images=None, batch=64, device='cpu', progress=True, log=print):
    """EDM2's `dataset_tool.py encode`: the raw latents of an image set (folder, zip, .npz) as an EDM2 latent dataset.

    vae: a diffusers folder, or None to fetch vae_name. Images are read and
    encoded `batch` at a time; dest is written whole at the end (atomically).
    """
    import tqdm  # pylint: disable=import-outside-toplevel
    from training.encoders import StabilityVAEEncoder  # pylint: disable=import-outside-toplevel
    from .image_sets import ImageSource  # pylint: disable=import-outside-toplevel
    src = ImageSource(source, log=log)
    n = len(src) if max_images is None else min(len(src), max_images)
    enc = prepare_encoder(StabilityVAEEncoder(vae_name=vae_name if vae is None else str(vae), batch_size=batch), device,
                          vae=vae, trust_pickle=True, source=source)
    labels = src.labels(range(n))
    with fileio.atomic_dir(dest) as tmp:
        names = []
        for start in tqdm.trange(0, n, batch, desc='encode', unit='batch', disable=not progress, dynamic_ncols=True):
            idx = list(range(start, min(start + batch, n)))
            raw = encode_images(enc, src.images(idx), device, source=source)
            names += [_save_raw(tmp, i, a) for i, a in zip(idx, raw.numpy())]
        _save_labels(tmp, names, None if labels is None else labels.tolist())
    log(f'Encoded {n} images of {source} into {dest} (raw latents {list(raw.shape[1:])}).')
    return dest

def load_latent_set(path, *, space=None, vae=None, seed=0, device='cpu', log=print):
    """(final latents [N,C,h,w] float32, labels or None, space) of any latent source, or of images encoded by --vae.

    space: the standardisation for raw latents and images (a latent space
    record: the fakes' or the model's); shards carry their own and must agree.
    Raw latents take one posterior draw, seeded by `seed`.
    """
    if is_latent_shards(path):
        x, y, _seeds, sp = read_latent_shards(path)
        if space is not None and not same_space(space, sp):
            raise ValueError(f'{path}: latents of {describe(sp)} but expected {describe(space)}; use latents of one model')
        return x, y, sp
    if space is not None and space['kind'] != 'latents':
        raise ValueError(f'{path}: --encoder names a pixel model (no VAE); pass the latent EDM2 pickle whose latents these are')
    if space is None:
        raise ValueError(f'{path}: raw latents or images need the latent standardisation of a model; pass --encoder=PKL '
                         f'(the latent EDM2 pickle) or fakes from generate_dg.py --save_latents')
    gen = torch.Generator().manual_seed(int(seed))
    if _raw_names(path):
        raw, y = read_raw_dataset(path)
    else:
        if vae is None:
            raise ValueError(f'{path}: images, not latents; pass --vae=DIR to encode them, or an EDM2 latent dataset')
        from .image_sets import load_image_set  # pylint: disable=import-outside-toplevel
        images, y = load_image_set(path, log=log)
        log(f'Encoding {len(images)} images of {path} with the VAE {vae}...')
        raw = encode_images(encoder_for(space, vae=vae, device=device), images, device, source=path)
    x = standardise(raw, space['scale'], space['bias'], gen)
    return x, y, space
