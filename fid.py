"""FID with EDM's interface (also offline), plus FID over discriminator epochs and sampler sweeps.

\b
  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=out \\
      --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import click

from torch_utils import distributed as dist
from edm_dg import metrics
from edm_dg.cli import command_body

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
@command_body
def calc(image_path, ref_path, num, seed, batch, detector, device, json_out):
    """Calculate FID of a set of images against reference statistics."""
    device = dist.init_device(device)
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
@command_body
def ref(dataset_path, dest_path, batch, detector, device):
    """Calculate dataset reference statistics needed by 'calc'."""
    device = dist.init_device(device)
    det = metrics.load_detector(detector, device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    mu, sigma = metrics.source_stats(dataset_path, det, None, 0, batch, device)
    if dist.get_rank() == 0:
        metrics.save_ref(dest_path, mu, sigma)
        print(f'Saved {dest_path}')

#----------------------------------------------------------------------------
# FID of DG samples: over discriminator epochs, and over a sampler setting.

def _sampler_options(fn):
    opts = [
        click.option('--network', 'network_pkl', help='EDM network pickle', metavar='PATH|URL', required=True),
        click.option('--classifier', 'classifier_path', help='ADM classifier of the discriminator', metavar='PATH', required=True),
        click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', required=True),
        click.option('--outdir', help='Results folder (CSV, PNG, temporary images)', metavar='DIR', required=True),
        click.option('--seeds', help='Sampling seeds, the same for every point', default='0-9999', show_default=True),
        click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--steps', 'num_steps', type=click.IntRange(min=2), default=18, show_default=True),
        click.option('--S_churn', 'S_churn', type=float, default=0, show_default=True),
        click.option('--dg_weight_1st_order', type=float, default=None, help='[default: 2 uncond, 1 cond]'),
        click.option('--dg_weight_2nd_order', type=float, default=0, show_default=True),
        click.option('--time_min', type=float, default=0.01, show_default=True),
        click.option('--time_max', type=float, default=1.0, show_default=True),
        click.option('--boosting', type=click.IntRange(0, 1), default=0, show_default=True),
        click.option('--keep_images', is_flag=True, help='Keep each point\'s images (default: delete once its FID is recorded)'),
        DETECTOR,
        click.option('--device', default=None, help='Device  [default: cuda if available]'),
        click.option('--trust_pickle', is_flag=True, help="Use EDM's own unpickling for --network"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn

def _prepare(network_pkl, ref_path, detector, device, trust_pickle, sampler, seeds):
    from edm_dg.io import parse_seeds
    from edm_dg.pickles import load_network_pickle
    device = dist.init_device(device)
    net = load_network_pickle(network_pkl, trust_pickle=trust_pickle).eval().requires_grad_(False).to(device)
    ref = metrics.load_ref(ref_path)
    det = metrics.load_detector(detector, device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    if sampler['dg_weight_1st_order'] is None:
        sampler['dg_weight_1st_order'] = 1.0 if net.label_dim else 2.0
    return device, net, ref, det, parse_seeds(seeds)

@main.command()
@click.option('--run', 'run_dir', help='train_disc.py run folder (disc-*.pt)', metavar='DIR', required=True)
@click.option('--every', help='Evaluate every k-th checkpoint (and the last)', type=click.IntRange(min=1), default=1, show_default=True)
@_sampler_options
@command_body
def epochs(run_dir, every, network_pkl, classifier_path, ref_path, outdir, seeds, batch, detector, device, trust_pickle, keep_images, **sampler):
    """FID of guided samples for each discriminator checkpoint; CSV + plot, best epoch marked."""
    from edm_dg.sweep import fid_over_epochs
    device, net, ref, det, seeds = _prepare(network_pkl, ref_path, detector, device, trust_pickle, sampler, seeds)
    rows, best = fid_over_epochs(net, run_dir, classifier_path, seeds, ref, det, outdir, device, sampler,
                                 every=every, batch=batch, keep_images=keep_images, log=dist.print0)
    dist.print0(f'Best epoch {best["epoch"]}: FID {float(best["fid"]):.4f} ({outdir}/fid_epochs.csv, fid_epochs.png)')

@main.command()
@click.option('--disc', 'disc_path', help='Discriminator checkpoint', metavar='PATH', required=True)
@click.option('--param', help='Sampler setting to sweep (e.g. S_churn, boost_S_churn, dg_weight_1st_order, time_min)', required=True)
@click.option('--values', help='Rough grid, comma-separated', required=True)
@click.option('--refine', help='Then this many points between the best value\'s neighbours', type=click.IntRange(min=0), default=0, show_default=True)
@_sampler_options
@command_body
def sweep(disc_path, param, values, refine, network_pkl, classifier_path, ref_path, outdir, seeds, batch, detector, device, trust_pickle, keep_images, **sampler):
    """FID over a grid of one sampler setting (rough then fine); CSV + plot."""
    from edm_dg.discriminator import load_discriminator
    from edm_dg.sweep import sweep as run_sweep
    device, net, ref, det, seeds = _prepare(network_pkl, ref_path, detector, device, trust_pickle, sampler, seeds)
    sampler['discriminator'] = load_discriminator(disc_path, classifier_path, device=device)
    try:
        vals = [float(v) for v in values.split(',')]
    except ValueError:
        raise ValueError(f'--values="{values}": expected comma-separated numbers') from None
    rows, best = run_sweep(net, param, vals, seeds, ref, det, outdir, device, sampler, refine=refine, batch=batch,
                           keep_images=keep_images, log=dist.print0)
    dist.print0(f'Best {param}={best["value"]}: FID {float(best["fid"]):.4f} ({outdir}/sweep_{param}.csv)')

if __name__ == '__main__':
    main()
