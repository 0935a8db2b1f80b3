"""FID with EDM's interface (also offline), plus FID over discriminator epochs and sampler sweeps.

\b
  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=out \\
      --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import json
import os

import click
import torch

from torch_utils import distributed as dist
from edm_dg import metrics
from edm_dg.discriminator import CheckpointError

def _device(device):
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    dist.init(torch.device(device).type)
    if device == 'cuda':
        device = f'cuda:{dist.get_local_rank()}'
    return torch.device(device)

def _errors(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, CheckpointError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__)
        finally:
            dist.shutdown()
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper

@click.group(help=__doc__)
def main():
    pass

DETECTOR = click.option('--detector', help='inception-2015-12-05.pkl path/URL, a TorchScript .pt, or "offline"  [default: NVIDIA URL, offline fallback]', metavar='PATH|URL', default=None)

@main.command()
@click.option('--images', 'image_path', help='Images: folder (any depth), zip or .npz shards', metavar='PATH|ZIP', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', required=True)
@click.option('--num_images', '--num', 'num', help='Number of images to use (torchrun: write --num_images)', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', type=int, default=0, show_default=True)
@click.option('--batch', help='Maximum batch size per process', type=click.IntRange(min=1), default=64, show_default=True)
@DETECTOR
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@click.option('--json', 'json_out', help='Also write the result to this JSON file', metavar='PATH', default=None)
@_errors
def calc(image_path, ref_path, num, seed, batch, detector, device, json_out):
    """Calculate FID of a set of images against reference statistics."""
    device = _device(device)
    mu_ref, sigma_ref = metrics.load_ref(ref_path)
    det = metrics.load_detector(detector, device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    mu, sigma = metrics.source_stats(image_path, det, num, seed, batch, device)
    if mu.shape != mu_ref.shape:
        raise ValueError(f'{ref_path}: reference has {mu_ref.shape[0]}-d features but the detector gives {mu.shape[0]}-d; use the detector the reference was made with')
    fid = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if dist.get_rank() == 0:
        print(f'{fid:g}')
        if json_out:
            from edm_dg.io import atomic_write_json
            atomic_write_json(json_out, dict(fid=fid, images=image_path, ref=ref_path, num=num, seed=seed, detector=det.name))

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: folder, zip or .npz', metavar='PATH|ZIP', required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', required=True)
@click.option('--batch', help='Maximum batch size per process', type=click.IntRange(min=1), default=64, show_default=True)
@DETECTOR
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@_errors
def ref(dataset_path, dest_path, batch, detector, device):
    """Calculate dataset reference statistics needed by 'calc'."""
    device = _device(device)
    det = metrics.load_detector(detector, device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    mu, sigma = metrics.source_stats(dataset_path, det, None, 0, batch, device)
    if dist.get_rank() == 0:
        metrics.save_ref(dest_path, mu, sigma)
        print(f'Saved {dest_path}')

if __name__ == '__main__':
    main()
