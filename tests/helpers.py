"""Shared test helpers: tiny seeded networks and files, CLI runners, reference samplers (one module; tests import it)."""

import functools
import os
import pickle
import subprocess
import sys

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import dnnlib
from edm_dg import vp
from edm_dg.adm import EncoderUNet
from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
from edm_dg.discriminator import Discriminator, make_head
from training import encoders, loss, networks, networks_edm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')

def build_encoder(entry):
    """An EncoderUNet from a fixture entry (create_classifier_args + state_dict)."""
    net = EncoderUNet.from_create_classifier_args(**entry['create_classifier_args']).eval()
    net.load_state_dict(entry['state_dict'])
    return net

def tiny_edm(label_dim=0, res=16, channels=3, seed=0, model_channels=16):
    torch.manual_seed(seed)
    return networks.EDMPrecond(img_resolution=res, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
                               model_channels=model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[res // 2],
                               dropout=0.0).eval()

def save_edm_pickle(net, path):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict()), f)
    return path

def nonzero_init(module, std=0.02):
    """ADM zero-initialises the last layer of each residual block; random values there make every path matter."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, std)
    return module

def tiny_classifier(res=16, channels=3, seed=0, width=64, num_classes=10):
    torch.manual_seed(seed)
    net = EncoderUNet.from_create_classifier_args(image_size=res, in_channels=channels, classifier_width=width,
                                                  classifier_depth=1, out_channels=num_classes).eval()
    return nonzero_init(net)

def tiny_discriminator(classifier, cond=False, seed=1, num_classes=10):
    torch.manual_seed(seed)
    head = make_head(classifier.feature_channels, classifier.feature_resolution, cond=cond, width=64, depth=1, num_classes=num_classes)
    return Discriminator(classifier, nonzero_init(head).eval()).eval()

def run_cli(args, timeout=600, env=None, cwd=None):
    """Run a command with the project on PYTHONPATH; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)

def py(script, *args, **kwargs):
    return run_cli([sys.executable, os.path.join(ROOT, script), *args], **kwargs)

def torchrun(script, *args, nproc=2, **kwargs):
    return run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                    os.path.join(ROOT, script), *args], **kwargs)

def assert_one_line_error(proc, *needles):
    """Non-zero exit, no traceback, a one-line 'Error:' message containing all needles."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]

def write_tiny_files(folder):
    """A tiny conditional EDM pickle, classifier .pt, head .pt and own-format discriminator .pt in folder."""
    net = tiny_edm(label_dim=10)
    cls = tiny_classifier()
    disc = tiny_discriminator(cls)
    paths = dict(net=save_edm_pickle(net, os.path.join(folder, 'net.pkl')), classifier=os.path.join(folder, 'cls.pt'),
                 disc=os.path.join(folder, 'disc.pt'), head=os.path.join(folder, 'head.pt'))
    torch.save(cls.state_dict(), paths['classifier'])
    torch.save(disc.head.state_dict(), paths['head'])
    _, sha = read_weights(paths['classifier'], 'classifier')
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), paths['disc'])
    return paths

#----------------------------------------------------------------------------
# Reference samplers and noise, written from the papers.

def fixture_randn(seed):
    """The fixtures' noise: one generator, float32 draws cast to the input's dtype."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)

def edm_sampler_spec(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                     sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """Karras et al. (2022), Algorithm 2, as an executable specification of EDM's sampler.

    Noise levels sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i < N (rounded by the net), sigma_N = 0. Step i: gamma_i = min(S_churn/N, sqrt 2 - 1) when
    S_min <= sigma_i <= S_max; raise the noise to sigma_hat = sigma_i (1 + gamma_i) with fresh noise of
    variance sigma_hat^2 - sigma_i^2 (scaled by S_noise); Euler step to sigma_{i+1} along
    (x - D(x; sigma)) / sigma; average the two slopes (Heun) unless sigma_{i+1} = 0.
    """
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    frac = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    sigmas = net.round_sigma((hi ** (1 / rho) + frac * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)
    sigmas = list(torch.as_tensor(sigmas, dtype=torch.float64).unbind()) + [torch.tensor(0.0, dtype=torch.float64)]
    slope = lambda x, s: (x - net(x, s, class_labels).to(torch.float64)) / s
    x = latents.to(torch.float64) * sigmas[0]
    for i in range(num_steps):
        s_cur, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= float(s_cur) <= S_max else 0.0
        s_hat = net.round_sigma(s_cur * (1 + gamma))
        x_hat = x + S_noise * (s_hat ** 2 - s_cur ** 2).sqrt() * randn_like(x)
        k1 = slope(x_hat, s_hat)
        x = x_hat + (s_next - s_hat) * k1
        if float(s_next) > 0:
            x = x_hat + (s_next - s_hat) * 0.5 * (k1 + slope(x, s_next))
    return x

class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser for data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (s^2 + sigma^2)."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.img_resolution, self.img_channels, self.label_dim = 4, 1, 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (x * self.s ** 2 / (self.s ** 2 + sigma ** 2)).float()

class GaussianRatioDiscriminator(torch.nn.Module):
    """The Bayes-optimal DG discriminator between data N(0, s_data^2 I) and a model N(0, s_model^2 I).

    Called as a DG discriminator, `(x_vp, tau, labels) -> d`: with x = x_vp / mean(tau) and sigma^2 =
    1 / mean(tau)^2 - 1 (docs/compat.md §3), d = sigmoid(r), r = sum over pixels of
    log N(x; 0, s_data^2 + sigma^2) - log N(x; 0, s_model^2 + sigma^2), the two noised densities' log ratio.
    """

    def __init__(self, s_data=0.5, s_model=1.0):
        super().__init__()
        self.s_data, self.s_model = s_data, s_model

    def log_ratio(self, x, sigma2):
        log_n = lambda v: -0.5 * x ** 2 / v - 0.5 * torch.log(2 * math.pi * v)
        return (log_n(self.s_data ** 2 + sigma2) - log_n(self.s_model ** 2 + sigma2)).flatten(1).sum(1)

    def forward(self, x_vp, tau, labels=None):
        log_mean = vp.log_mean(torch.as_tensor(tau, dtype=torch.float64, device=x_vp.device)).reshape(-1, *([1] * (x_vp.ndim - 1)))
        x = x_vp.to(torch.float64) * torch.exp(-log_mean)
        return torch.sigmoid(self.log_ratio(x, torch.expm1(-2 * log_mean)))

#----------------------------------------------------------------------------
# Small data and detectors.

def write_set(folder, x_u8, labels=None):
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, im in enumerate(x_u8.permute(0, 2, 3, 1).numpy()):
        names.append(f'{i:05d}.png')
        Image.fromarray(im).save(os.path.join(folder, names[-1]))
    if labels is not None:
        with open(os.path.join(folder, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, int(l)] for n, l in zip(names, labels)]}, f)

def sharp_and_blurred(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, 1)
    to_u8 = lambda t: (t * 255).round().clamp(0, 255).to(torch.uint8)
    return to_u8(x), to_u8(blurred)

class TinyDetector(torch.nn.Module):
    """A TorchScript stand-in with the offline detector's interface (float [-1,1] 299x299 in, features out)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)

#----------------------------------------------------------------------------
# Tolerances against recorded fixtures.

EPS32 = torch.finfo(torch.float32).eps  # 2^-23: float32's relative rounding step

def float32_layers(*modules):
    """(depth, fan_in) of float32 networks, for fixture_tol: depth counts their weight layers (convolutions
    and linear maps, at least as many as run in sequence on any path); fan_in is the longest dot product
    one of them computes (input channels times kernel taps)."""
    weights = [p for m in modules for p in m.state_dict().values() if p.ndim >= 2 and p.is_floating_point()]
    return len(weights), max(p[0].numel() for p in weights)

def fixture_tol(depth, fan_in):
    """Relative tolerance of a float32 computation against a fixture recorded on another machine.

    Machines run the same operations and differ in the order of summation: oneDNN blocks its SSE4.1,
    AVX2 and AVX-512 kernels differently, and thread counts split the sums differently. A result that
    passes through depth layers in sequence, each a dot product of up to fan_in terms, carries
    n = depth * fan_in roundings of relative size u = eps32 / 2 (the layers are normalised: a layer
    passes on the errors before it at a gain of about one). Independent roundings of mean zero add like
    a random walk: the relative error stays below lambda * u * sqrt(n) but with a probability that
    falls like exp(-lambda^2 / 2) (Higham & Mary, "A new approach to probabilistic rounding error
    analysis", SIAM J. Sci. Comput. 2019). Two machines, each that far off, and lambda = 6: the bound is
    6 * eps32 * sqrt(depth * fan_in), relative to the largest magnitude of the reference (a layer's
    error is relative to its scale, not to each element). Depth counts every layer on the way: a
    gradient runs its network forward and backward (twice its depth); a sampler runs its steps in
    sequence (each step's Jacobian is at most one, so no step amplifies the errors of those before).
    """
    return 6 * EPS32 * math.sqrt(depth * fan_in)

def assert_close_to_fixture(actual, expected, depth, fan_in):
    """max |actual - expected| <= fixture_tol(depth, fan_in) * max |expected|; returns the share of the bound used."""
    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float((actual.double() - expected.double()).abs().max())
    scale = float(expected.double().abs().max())
    bound = fixture_tol(depth, fan_in) * scale
    assert err <= bound, f'max |difference| {err:.3g} exceeds the bound {bound:.3g} (max |reference| {scale:.3g})'
    return err / bound if bound else 0.0

#----------------------------------------------------------------------------
# Users' files in their real layouts at reduced width, at the paths the README and the peers' READMEs use.

def release_classifier(seed=0, width=64, depth=2):
    """The DG release's 32x32 ADM classifier layout (edm_dg.layouts) at reduced width and depth, random weights.

    Width 64 is the smallest with ADM's 64 channels per attention head; the features are [4 * width, 8, 8].
    """
    from edm_dg.layouts import ADM_CLASSIFIERS
    torch.manual_seed(seed)
    args = dict(ADM_CLASSIFIERS['32x32_classifier'], classifier_width=width, classifier_depth=depth)
    return nonzero_init(EncoderUNet.from_create_classifier_args(**args).eval())

def release_head(classifier, cond=False, seed=1, width=64):
    """The release's head layout (edm_dg.layouts.DG_HEAD) on these features; conditional heads embed 1000 classes."""
    from edm_dg.layouts import DG_HEAD
    torch.manual_seed(seed)
    args = dict(DG_HEAD, in_channels=classifier.feature_channels, classifier_width=width, condition=cond, num_classes=1000)
    return nonzero_init(EncoderUNet.from_create_classifier_args(**args).eval())

def study_adapters(classifier, rank, seed=2, scale=0.05):
    """An adapter-only state dict as the study's loralib files hold it, built from docs/compat.md §6 alone.

    Every residual block's first 3x3 convolution `P.in_layers.2.weight` [C_out, C_in, 3, 3] of the input and
    middle blocks gets `P.in_layers.2.lora_A` [3r, 3 C_in] and `P.in_layers.2.lora_B` [3 C_out, 3r].
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in classifier.state_dict().items():
        if key.endswith('in_layers.2.weight') and key.startswith(('input_blocks.', 'middle_block.')) and w.ndim == 4:
            c_out, c_in, k, _ = w.shape
            prefix = key[:-len('weight')]
            out[prefix + 'lora_A'] = torch.randn(rank * k, c_in * k, generator=g) * scale
            out[prefix + 'lora_B'] = torch.randn(c_out * k, rank * k, generator=g) * scale
    return out

def merge_adapters_by_hand(classifier_sd, adapters, alpha=1.0):
    """The classifier state dict with W + (lora_B @ lora_A).view(W.shape) * alpha / r written into each W."""
    merged = dict(classifier_sd)
    for key, a in adapters.items():
        if key.endswith('lora_A'):
            prefix = key[:-len('lora_A')]
            w = merged[prefix + 'weight']
            rank = a.shape[0] // 3
            merged[prefix + 'weight'] = w + (adapters[prefix + 'lora_B'] @ a).view(w.shape) * alpha / rank
    return merged

def edm_published(name, model_channels=16, seed=0):
    """An EDM network of a published configuration (edm_dg.layouts) at reduced width, random weights, eval mode."""
    from edm_dg.layouts import edm_network
    cls, kwargs = edm_network(name, model_channels=model_channels)
    torch.manual_seed(seed)
    return getattr(networks, cls)(**kwargs).eval()

def write_dataset_zip(path, x_u8, labels=None):
    """An EDM dataset zip (dataset_tool.py's layout): PNGs in 00000/ and dataset.json with [name, label] rows."""
    import io
    import zipfile
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with zipfile.ZipFile(path, 'w') as zf:
        rows = []
        for i, im in enumerate(x_u8):
            name = f'{i // 1000:05d}/img{i:08d}.png'
            buf = io.BytesIO()
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(buf, format='png')
            zf.writestr(name, buf.getvalue())
            rows.append([name, None if labels is None else int(labels[i])])
        zf.writestr('dataset.json', json.dumps(dict(labels=rows if labels is not None else None)))
    return path

def write_fid_ref(path, dims=2048, seed=0):
    """A reference statistics file in EDM's format (mu [dims], sigma [dims, dims], positive definite)."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((dims + 8, dims)) * 0.1
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    np.savez(path, mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    return path

def put(root, rel, make):
    """make(path) at root/rel (folders created); returns the path."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make(path)
    return path

def cache_url(cache_root, url, src):
    """Place src in a dnnlib cache as the download of url (dnnlib.util names it by the URL's MD5)."""
    import shutil
    from dnnlib import util
    folder = os.path.join(cache_root, 'downloads')
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(src, os.path.join(folder, util._cache_name(url)[1]))

class NvidiaDetectorStandIn(torch.nn.Module):
    """Stands in for NVIDIA's inception-2015-12-05.pkl (called on uint8 images with return_features=True) with
    few features, so that a Frechet distance costs milliseconds instead of a 2048-d matrix square root."""

    def __init__(self, dims=16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, dims, 5, stride=2)

    def forward(self, images_u8, return_features=False):
        x = images_u8.to(torch.float32) / 127.5 - 1
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1).flatten(1)

def serve_nvidia_detector(cache_root, folder, dims=16):
    """A dnnlib cache in which NVIDIA's detector URL holds the stand-in (its unpickling needs tests/ on the path)."""
    from edm_dg.metrics import NVIDIA_DETECTOR_URL
    path = os.path.join(folder, 'detector-stand-in.pkl')
    with open(path, 'wb') as f:
        pickle.dump(NvidiaDetectorStandIn(dims), f)
    cache_url(cache_root, NVIDIA_DETECTOR_URL, path)

def real_layout_files(root, fid_dims=2048):
    """Every file the README's recipe and the peers' READMEs name, in real layouts at reduced width, under root.

    EDM's CIFAR-10 pickles (published DDPM++ configuration, width 16), the release's classifier, its
    unconditional head and 1000-row conditional head, the study's heads and adapter-only LoRA files
    (ranks 16 and 128), EDM's dataset zips and FID reference (in EDM's format, of fid_dims features), the
    release's true_data.npz and the study's sample files. Returns a dict of the main paths.
    """
    cls = release_classifier()
    head_u, head_c = release_head(cls), release_head(cls, cond=True, seed=3)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (16, 3, 32, 32), dtype=np.uint8))
    y = torch.arange(16) % 10
    save = lambda obj: (lambda p: torch.save(obj, p))
    paths = dict(
        uncond=put(root, 'checkpoints/edm-cifar10-32x32-uncond-vp.pkl', lambda p: save_edm_pickle(edm_published('cifar10-32x32-uncond-vp'), p)),
        cond=put(root, 'checkpoints/edm-cifar10-32x32-cond-vp.pkl', lambda p: save_edm_pickle(edm_published('cifar10-32x32-cond-vp', seed=1), p)),
        classifier=put(root, 'checkpoints/32x32_classifier.pt', save(cls.state_dict())),
        head_uncond=put(root, 'checkpoints/discriminator_60.pt', save(head_u.state_dict())),
        head_cond=put(root, 'checkpoints/discriminator_250.pt', save(head_c.state_dict())),
        dataset=put(root, 'datasets/cifar10-32x32.zip', lambda p: write_dataset_zip(p, x, y)),
        testset=put(root, 'datasets/cifar10-32x32-test.zip', lambda p: write_dataset_zip(p, x[:4], y[:4])),
        ref=put(root, 'fid-refs/cifar10-32x32.npz', lambda p: write_fid_ref(p, fid_dims)),
    )
    # The release's own paths (its code's defaults, relative to where it runs).
    for rel, src in (('checkpoints/pretrained_score/edm-cifar10-32x32-uncond-vp.pkl', 'uncond'),
                     ('checkpoints/ADM_classifier/32x32_classifier.pt', 'classifier'),
                     ('checkpoints/discriminator/cifar_uncond/discriminator_60.pt', 'head_uncond'),
                     ('guided_diffusion/model/32x32_classifier.pt', 'classifier'),
                     ('models/uncond_disc/discrim_uncond_epoch59.pt', 'head_uncond'),
                     ('models/lora_cond_disc/discrim_cond_final128.pt', 'head_cond')):
        put(root, rel, lambda p, s=paths[src]: __import__('shutil').copyfile(s, p))
    paths['adapters16'] = put(root, 'models/lora_adm_final16.pt', save(study_adapters(cls, 16)))
    paths['adapters128'] = put(root, 'models/lora_uncond_disc/cond_adm_final128.pt', save(study_adapters(cls, 128, seed=4)))
    put(root, 'data/true_data.npz', lambda p: np.savez(p, arr_0=x.permute(0, 2, 3, 1).numpy()))
    onehot = np.eye(10, dtype=np.float32)[y.numpy()]
    put(root, 'training_data/conditional_edm_samples/edm_cond_samples.npz',
        lambda p: np.savez_compressed(p, images=x.flip(0).permute(0, 2, 3, 1).numpy(), labels=onehot))
    put(root, 'training_data/unconditional_edm_samples/edm_uncond_samples.npz',
        lambda p: np.savez_compressed(p, images=x.flip(0).permute(0, 2, 3, 1).numpy()))
    return paths

def link_tree(src, dst):
    """dst mirrors src: real folders, each file a symbolic link (inputs shared, outputs private to dst)."""
    for root, _dirs, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for fn in files:
            os.symlink(os.path.join(root, fn), os.path.join(target, fn))
    return dst

def invoke(command, args):
    """Run a click command in-process; returns (exit code, output, the 'Error:' lines)."""
    from click.testing import CliRunner
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    text = result.output + (result.stderr if result.stderr_bytes is not None and result.stderr not in result.output else '')
    return result.exit_code, text, [l for l in text.splitlines() if l.startswith('Error:')]

#----------------------------------------------------------------------------
# The agreement of images made in different batches or processes.

ROUNDING_SHARE = 0.01

def assert_same_up_to_rounding(a, b, share=ROUNDING_SHARE):
    """uint8 images of the same seeds made in different batches or processes: equal up to one gray level,
    on at most `share` of the values.

    The float results differ only by summation order (oneDNN picks kernels by batch size; with guidance
    the discriminator's gradient differs most): by up to 0.01 gray levels, measured. A value then moves
    by one level only where its float lies within that difference of a rounding boundary, on at most
    about 1% of the values (the default share). Anything the seeds drive (latents, classes, noise)
    would move most values by many levels. Exact bytes hold only for the same batch on one machine."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= share, (int(diff.max()), float((diff > 0).mean()))

def differ_beyond_rounding(a, b, share=ROUNDING_SHARE):
    """Whether uint8 images differ as different settings make them differ: by more than one gray level
    on more than the share that rounding may move."""
    return (np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)) > 1).mean() > share

def assert_imports_only(module, allowed_top=('numpy', 'torch')):
    """The module's source (which travels in pickles and runs inside NVlabs' code) imports only the standard library,
    the allowed packages and torch_utils.persistence."""
    import ast
    with open(module.__file__) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module != 'torch_utils' else [f'torch_utils.{a.name}' for a in node.names]
        else:
            continue
        for n in names:
            top = n.split('.')[0]
            assert top in allowed_top or n == 'torch_utils.persistence' or top in sys.stdlib_module_names, n

#----------------------------------------------------------------------------
# EDM2 networks and latent models.

@functools.lru_cache(maxsize=None)
def edm2_reference():
    return torch.load(os.path.join(DATA, 'edm2_reference.pt'), weights_only=True)

def edm2_precond(name, **changes):
    """A tiny EDM2 Precond of tests/data/edm2_reference.pt (its recorded weights unless its arguments change)."""
    entry = edm2_reference()[name]
    net = networks_edm2.Precond(**dict(entry['kwargs'], **changes)).eval()
    if not changes:
        net.load_state_dict(entry['state_dict'])
    return net

def write_edm2_pickle(net, path, encoder=None):
    """What EDM2's training loop pickles (float32 weights here, so images are the fixture's); pixels unless encoder."""
    with open(path, 'wb') as f:
        pickle.dump(dnnlib.EasyDict(ema=net, encoder=encoder or encoders.StandardRGBEncoder(), loss_fn=None,
                                    dataset_kwargs=dnnlib.EasyDict()), f)
    return str(path)

def tiny_vae(path, image_channels=3, factor=2, seed=0):
    """A tiny random diffusers AutoencoderKL (4 latent channels, `factor` down-sampling) written with save_pretrained."""
    from edm_dg.train_vae import build_vae
    torch.manual_seed(seed)
    vae = build_vae(image_channels, block_out_channels=[8, 16, 16, 16][:int(math.log2(factor)) + 1])
    vae.save_pretrained(str(path))
    return vae.eval().requires_grad_(False)

def latent_encoder(vae_name='tests/tiny-vae', batch_size=2):
    """The StabilityVAEEncoder of a latent toy: EDM2's standardisation constants, another VAE's name."""
    return encoders.StabilityVAEEncoder(vae_name=vae_name, batch_size=batch_size)
