"""FID with EDM's interface (also offline), plus FID over discriminator epochs and sampler sweeps.

\b
  python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
  torchrun --standalone --nproc_per_node=8 fid.py calc --images=out \\
      --ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz
"""

import click

from torch_utils import distributed as dist
from edm_dg import latents, metrics
from edm_dg.cli import command_body
from edm_dg.options import (ENCODER_BATCH, TRUST_PICKLE, VAE, batch_option, dg_options, guidance_settings, pop_disc_options, pop_guidance_options,
                            pop_rejection_options, pop_sampler_options, rejection_options, rejection_settings, runtime_options,
                            sampler_options, sampler_settings)
from edm_dg.precision import fast_paths

@click.group(help=__doc__)
def main():
    pass

DETECTOR = click.option('--detector', help='inception-2015-12-05.pkl path/URL, a TorchScript .pt, or "offline"  [default: NVIDIA URL, offline fallback]', metavar='PATH|URL', default=None)

@main.command()
@click.option('--images', 'image_path', help='Images: folder (any depth), zip or .npz shards', metavar='PATH|ZIP', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', required=True)
@click.option('--num_images', '--num', 'num', help='Number of images to use (torchrun: write --num_images)', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed for selecting the images', type=int, default=0, show_default=True)
@batch_option('batch', 64)
@DETECTOR
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@click.option('--json', 'json_out', help='Also write the result to this JSON file', metavar='PATH', default=None)
@VAE
@ENCODER_BATCH
@TRUST_PICKLE
@command_body
def calc(image_path, ref_path, num, seed, batch, detector, device, json_out, vae, encoder_batch, trust_pickle):
    """Calculate FID of a set of images against reference statistics.

    Latent shards (generate_dg.py --save_latents: pass OUTDIR/latents) are decoded first with the VAE they name or --vae.
    """
    device = dist.init_device(device)
    mu_ref, sigma_ref = metrics.load_ref(ref_path)
    det = metrics.load_detector(detector, device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    source = image_path
    if latents.is_latent_shards(image_path, nested=False):
        with dist.rank0_first():  # rank 0 fetches the VAE into the cache first
            source = latents.DecodedLatents(image_path, vae=vae, device=device, batch_size=encoder_batch, trust=trust_pickle)
        dist.print0(f'Decoding {len(source)} latents of {image_path} ({latents.describe(source.space)})...')
    elif vae is not None:
        raise ValueError(f'--vae={vae}: {image_path} holds images, not latent shards, so nothing is decoded; drop --vae '
                         f'(or pass the latents folder of generate_dg.py --save_latents)')
    mu, sigma = metrics.source_stats(source, det, num, seed, batch, device)
    if mu.shape != mu_ref.shape:
        raise ValueError(f'{ref_path}: reference has {mu_ref.shape[0]}-d features but the detector gives {mu.shape[0]}-d; use the detector the reference was made with')
    fid = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if dist.get_rank() == 0:
        print(f'{fid:g}')
        if json_out:
            from edm_dg.fileio import atomic_write_json
            atomic_write_json(json_out, dict(fid=fid, images=image_path, ref=ref_path, num=num, seed=seed, detector=det.name))

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: folder, zip or .npz', metavar='PATH|ZIP', required=True)
@click.option('--dest', 'dest_path', help='Destination .npz file', metavar='NPZ', required=True)
@batch_option('batch', 64)
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

def _dg_eval_options(fn):
    """Options of `epochs` and `sweep` beyond the shared sampler, DG and runtime options."""
    opts = [
        click.option('--network', 'network_pkl', help='EDM or EDM2 (pixel or latent) network pickle  [default: the EDM2 --preset\'s]', metavar='PATH|URL', default=None),
        click.option('--ref', 'ref_path', help='Reference statistics (.npz with mu, sigma)', metavar='NPZ|URL', required=True),
        click.option('--outdir', help='Results folder (CSV, PNG, temporary images)', metavar='DIR', required=True),
        click.option('--seeds', help='Sampling seeds, the same for every point; disjoint from the seeds of the training fakes', metavar='LIST', default='0-9999', show_default=True),
        batch_option('batch', 64),
        click.option('--keep_images', is_flag=True, help='Keep each point\'s images (default: delete once its FID is recorded)'),
        click.option('--allow_seed_overlap', is_flag=True, help='Evaluate even when --seeds overlap the seeds of the discriminator\'s training fakes (biased FID)'),
        DETECTOR,
        VAE,
        ENCODER_BATCH,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return sampler_options(dg_options(rejection_options(runtime_options(fn))))

def _prepare(kw, disc_path, allow_seed_overlap):
    """Device, networks, reference, detector, seeds, sampler settings and discriminator files of an `epochs`/`sweep` run."""
    from edm_dg.fileio import parse_seeds
    from edm_dg.models import load_models
    from edm_dg.seed_provenance import check_overlap
    seeds = parse_seeds(kw.pop('seeds'))
    sampler_opts = pop_sampler_options(kw)
    network_pkl, gnet_pkl, guidance = guidance_settings(pop_guidance_options(kw), kw.pop('network_pkl'), sampler_opts)
    rejection_opts = pop_rejection_options(kw)
    rejection_settings(rejection_opts, guided=True)  # Its errors before any loading.
    warning = check_overlap(disc_path, seeds)
    if warning and not allow_seed_overlap:
        raise ValueError(warning + '; or pass --allow_seed_overlap')
    if warning:
        dist.print0(f'Warning: {warning}')
    device = dist.init_device(kw.pop('device'))
    disc_opts = pop_disc_options(kw)
    from edm_dg.models import check_fast_paths, load_guide
    trust_pickle = kw.pop('trust_pickle')
    net, disc = load_models(network_pkl, device, trust_pickle=trust_pickle, vae=kw.pop('vae'), encoder_batch=kw.pop('encoder_batch'),
                            **dict(disc_opts, disc_path=disc_path))
    check_fast_paths(net, kw['precision'], kw['channels_last'], kw['compile_nets'], network_pkl)
    settings = sampler_settings(sampler_opts, net.label_dim, guided=True, num_steps=getattr(net, 'default_num_steps', None))
    if gnet_pkl is not None:  # Guidance by a second net goes with the sampler settings (sweep --param=guidance).
        settings.update(guidance, gnet=load_guide(gnet_pkl, net, device, network_pkl=network_pkl, trust_pickle=trust_pickle))
    rejection = rejection_settings(rejection_opts, settings, guided=True)
    if rejection is not None:  # Each point generates with DiffRS, its thresholds warmed up in its image folder.
        settings['rejection'] = rejection
    net, disc = fast_paths(net, disc, kw.pop('precision'), kw.pop('disc_precision'), kw.pop('channels_last'), kw.pop('compile_nets'))
    ref = metrics.load_ref(kw.pop('ref_path'))
    det = metrics.load_detector(kw.pop('detector'), device, log=dist.print0)
    dist.print0(f'Detector: {det.name}')
    return device, net, disc, ref, det, seeds, settings, disc_opts

@main.command()
@click.option('--run_dir', '--run', 'run_dir', help='train_disc.py run folder (disc-*.pt); under torchrun write --run_dir (torchrun takes --run for its --run-path)', metavar='DIR', required=True)
@click.option('--every', help='Evaluate every k-th checkpoint (and the last)', type=click.IntRange(min=1), default=1, show_default=True)
@_dg_eval_options
@command_body
def epochs(run_dir, every, outdir, batch, keep_images, allow_seed_overlap, **kw):
    """FID of guided samples for each discriminator checkpoint; CSV + plot, best epoch marked."""
    from edm_dg.sweep import checkpoint_epochs, fid_over_epochs
    if kw.get('disc_path'):
        raise ValueError('--disc is not used by "epochs": it evaluates every disc-*.pt of --run; drop --disc')
    if not kw.get('classifier_path'):
        raise ValueError('--classifier is required: the ADM classifier the run was trained with')
    if kw.get('rej_thresholds'):
        raise ValueError('--rej_thresholds with "epochs": thresholds belong to one discriminator, each epoch warms up its own; drop it')
    last = checkpoint_epochs(run_dir, every)[-1][1]
    device, net, _, ref, det, seeds, settings, files = _prepare(kw, last, allow_seed_overlap)
    disc_kwargs = dict(lora_alpha=files['lora_alpha'], time_schedule=files['disc_time'], lora_checkpoint=files['lora_checkpoint'],
                       lora_rank=files['lora_rank'])
    rows, best = fid_over_epochs(net, run_dir, files['classifier_path'], seeds, ref, det, outdir, device, settings,
                                 every=every, batch=batch, keep_images=keep_images, log=dist.print0, disc_kwargs=disc_kwargs)
    dist.print0(f'Best epoch {best["epoch"]}: FID {float(best["fid"]):.4f} ({outdir}/fid_epochs.csv, fid_epochs.png)')

@main.command()
@click.option('--param', help='Sampler setting to sweep (e.g. S_churn, boost_S_churn, dg_weight_1st_order, time_min, guidance with --gnet)', required=True)
@click.option('--values', help='Rough grid, comma-separated', required=True)
@click.option('--refine', help='Then this many points between the best value\'s neighbours', type=click.IntRange(min=0), default=0, show_default=True)
@_dg_eval_options
@command_body
def sweep(param, values, refine, outdir, batch, keep_images, allow_seed_overlap, **kw):
    """FID over a grid of one sampler setting (rough then fine); CSV + plot."""
    from edm_dg.sweep import sweep as run_sweep
    if not kw.get('disc_path'):
        raise ValueError('--disc is required: the discriminator whose sampler setting is swept')
    try:
        vals = [float(v) for v in values.split(',')]
    except ValueError:
        raise ValueError(f'--values="{values}": expected comma-separated numbers') from None
    if param == 'guidance' and kw.get('gnet') and kw.get('guidance') is None:
        kw['guidance'] = 1.0  # Swept: every point sets its own.
    device, net, disc, ref, det, seeds, settings, _ = _prepare(kw, kw['disc_path'], allow_seed_overlap)
    if param == 'guidance' and 'gnet' not in settings:
        raise ValueError('--param=guidance sweeps the weight of the guide network: pass --gnet=PKL')
    rows, best = run_sweep(net, param, vals, seeds, ref, det, outdir, device, dict(settings, discriminator=disc),
                           refine=refine, batch=batch, keep_images=keep_images, log=dist.print0)
    dist.print0(f'Best {param}={best["value"]}: FID {float(best["fid"]):.4f} ({outdir}/sweep_{param}.csv)')

if __name__ == '__main__':
    main()
