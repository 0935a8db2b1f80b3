"""Generate images with EDM, optionally with Discriminator Guidance (DG).

EDM's seeds, file names and options, plus the DG options, a choice of sampler
and published presets. Examples:

\b
  # 64 plain EDM images
  python generate_dg.py --network=edm-cifar10-32x32-uncond-vp.pkl --outdir=out --seeds=0-63
\b
  # 50k EDM-G++ images on 8 GPUs (unconditional CIFAR-10)
  torchrun --standalone --nproc_per_node=8 generate_dg.py --network=edm-cifar10-32x32-uncond-vp.pkl \\
      --disc=discriminator_60.pt --classifier=32x32_classifier.pt --preset=edm-g++-cifar10-uncond \\
      --outdir=out --seeds=100000-149999 --subdirs --batch=500
\b
  # DG with the Restart sampler, and a plain-vs-guided grid of the first 100 seeds
  python generate_dg.py --network=... --disc=... --classifier=... --sampler=restart --outdir=out \\
      --seeds=0-99 --grid=grid.png --grid_compare
\b
  # EDM2's autoguided ImageNet-64 model (its preset: --network, --gnet, --guidance), with DG on top
  python generate_dg.py --preset=edm2-img64-s-autog-fid --disc=disc-0010.pt --classifier=64x64_classifier.pt \\
      --outdir=out --seeds=0-99
\b
  # Selection without guidance: 4 particles per seed resampled by the discriminator after steps 4, 8, 12
  python generate_dg.py --network=... --disc=... --classifier=... --w=0 --particles=4 --resample_steps=4,8,12 \\
      --S_churn=10 --outdir=out --seeds=0-99
\b
  # DiffRS: every step accepted or rejected by the discriminator, plain transitions (--w=0); the
  # thresholds go to out/diffrs_thresholds.json, and --rej_thresholds=PATH reuses them
  python generate_dg.py --network=... --disc=... --classifier=... --w=0 --rejection=diffrs \\
      --rej_percentile=0.75 --max_iter=105 --outdir=out --seeds=0-99
\b
Selection (--particles, --best_of) keeps one image per seed ({seed:06d}.png); the image of seed s depends
only on s: chain 0 is seed s's plain chain (so K=1 or N=1 gives the plain image), chain c>0 draws from
numpy PCG64 with SeedSequence([s, c]); selection.jsonl records each seed's chosen chain and scores.
"""

import os
import tempfile

import click

from torch_utils import distributed as dist
from edm_dg import grid as gridlib
from edm_dg import fileio
from edm_dg.cli import command_body
from edm_dg.generate import SAVE_LATENTS_WITH_DIFFRS, generate
from edm_dg.models import check_class, check_fast_paths, load_guide, load_models
from edm_dg.options import (ENCODER_BATCH, RESUME, SAVE_LATENTS, VAE, batch_option, dg_options, guidance_settings, output_peer_options, pop_disc_options,
                            pop_guidance_options, pop_sampler_options,
                            pop_selection_options, runtime_options, sampler_options, sampler_settings, seeds_from_peer_options,
                            selection_options, selection_settings, pop_rejection_options, rejection_options,
                            rejection_settings)
from edm_dg.precision import fast_paths
from edm_dg.seed_provenance import check_overlap

GRID_SEEDS = 100

#----------------------------------------------------------------------------

@click.command(help=__doc__)
@click.option('--network', 'network_pkl',  help='EDM or EDM2 (pixel or latent) network pickle, path or URL  [default: the EDM2 --preset\'s]', metavar='PATH|URL', type=str, default=None)
@click.option('--outdir',                  help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help='Random seeds (e.g. 1,2,5-10)  [default: 0-63]', metavar='LIST', type=str, default=None)
@click.option('--subdirs',                 help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@batch_option('max_batch_size', 64)
@sampler_options
@dg_options
@selection_options
@rejection_options
@click.option('--npz',                     help='Also write compressed uint8 .npz shards (samples, label, seeds)', is_flag=True)
@VAE
@ENCODER_BATCH
@SAVE_LATENTS
@output_peer_options
@RESUME
@click.option('--grid',                    help='Also write a grid of the first 100 seeds\' images to this PNG', metavar='PATH', type=str, default=None)
@click.option('--grid_compare',            help='With --grid and --disc: plain (left) and guided (right) grids of the same seeds (plain images go to GRID-plain/ beside the grid)', is_flag=True)
@runtime_options
@command_body
def main(**kwargs):
    run(**kwargs)

def run(network_pkl=None, outdir=None, seeds=None, subdirs=False, class_idx=None, max_batch_size=64, npz=False, num_samples=None,
        vae=None, encoder_batch=4, save_latents=False,
        save_format=None, save_type=None, resume=True, grid=None, grid_compare=False, device=None, precision='fp32',
        disc_precision=None, channels_last=False, compile_nets=False, trust_pickle=False, log=None, **options):
    """generate_dg.py as a function: options as the command's parameter names."""
    log = log or dist.print0
    seeds = fileio.parse_seeds(seeds_from_peer_options(seeds or '0-63', num_samples, seeds is not None), option='--seeds')
    if save_format == 'npz' and save_type == 'npz':
        raise ValueError('--save_format=npz (the study\'s keys) and --save_type=npz (the release\'s) both ask for shards; pass one')
    npz = 'study' if save_format == 'npz' else (npz or save_type == 'npz')
    disc_opts = pop_disc_options(options)
    disc_path = disc_opts['disc_path']
    sampler_opts = pop_sampler_options(options)
    network_pkl, gnet_pkl, guidance = guidance_settings(pop_guidance_options(options), network_pkl, sampler_opts)
    selection_opts = pop_selection_options(options)
    rejection_opts = pop_rejection_options(options)
    if options:
        raise TypeError(f'unknown options {sorted(options)}')
    if save_latents and rejection_opts.get('rejection'):
        raise ValueError(SAVE_LATENTS_WITH_DIFFRS)  # before rejection_settings' own checks
    if grid_compare and (grid is None or (disc_path is None and gnet_pkl is None)):
        raise ValueError('--grid_compare compares plain and guided images: pass --grid=PATH and --disc or --gnet too')
    early_selection = selection_settings(selection_opts, guided=disc_path is not None)  # Its errors before any loading.
    rejection_settings(rejection_opts, guided=disc_path is not None, selection=early_selection)
    device = dist.init_device(device)
    _check_writable(outdir)
    net, disc = load_models(network_pkl, device, trust_pickle=trust_pickle, vae=vae, encoder_batch=encoder_batch, log=log,
                            **disc_opts)
    check_class(net, class_idx, network_pkl)
    check_fast_paths(net, precision, channels_last, compile_nets, network_pkl)
    gnet = None if gnet_pkl is None else load_guide(gnet_pkl, net, device, network_pkl=network_pkl, trust_pickle=trust_pickle, log=log)
    settings = sampler_settings(sampler_opts, net.label_dim, guided=disc is not None, num_steps=getattr(net, 'default_num_steps', None))
    selection = selection_settings(selection_opts, settings['num_steps'], guided=disc is not None)
    rejection = rejection_settings(rejection_opts, settings, guided=disc is not None, selection=selection)
    if disc is not None:
        warning = check_overlap(disc_path, seeds)
        if warning:
            log(f'Warning: {warning}')

    fast_net, fast_disc = fast_paths(net, disc, precision, disc_precision, channels_last, compile_nets, log=log)
    guidance = dict(guidance, gnet=gnet) if gnet is not None else {}
    log(f'Generating {len(seeds)} images to "{outdir}" with {describe(settings, disc, selection, rejection, guidance, net)} '
        f'on {dist.get_world_size()} process(es)...')
    common = dict(device=device, subdirs=subdirs, class_idx=class_idx, max_batch_size=max_batch_size, log=log)
    sampler_kwargs = dict(settings, discriminator=fast_disc, **guidance)
    if rejection is not None:  # Thresholds name the loaded discriminator, not its fast-path wrapper.
        from edm_dg.sampling.diffrs import discriminator_fingerprint
        sampler_kwargs['rejection'] = dict(rejection, fingerprint=discriminator_fingerprint(disc))
    stats = generate(fast_net, outdir, seeds, sampler_kwargs=sampler_kwargs, selection=selection,
                     npz=npz, save_latents=save_latents, resume=resume, **common)
    report(stats, log)
    if grid is not None:
        grid_seeds = seeds[:GRID_SEEDS]
        guided = gridlib.tile(gridlib.folder_images(outdir, grid_seeds, subdirs), cols=10)
        panels = [guided]
        if grid_compare:
            plain_dir = os.path.splitext(grid)[0] + '-plain'  # beside the grid, not in --outdir (FID reads all of it)
            plain = dict(settings, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0, boosting=False)
            generate(fast_net, plain_dir, grid_seeds, sampler_kwargs=plain, resume=True, progress=False, **common)
            panels.insert(0, gridlib.tile(gridlib.folder_images(plain_dir, grid_seeds, subdirs), cols=10))
        if dist.get_rank() == 0:
            gridlib.save(grid, gridlib.side_by_side(panels), scale=gridlib.default_scale(net.img_resolution))
            log(f'Grid of seeds {grid_seeds[0]}..{grid_seeds[-1]} written to "{grid}"' + (' (plain left, guided right)' if grid_compare else ''))

def describe(settings, disc, selection=None, rejection=None, guidance=None, net=None):
    """One line on what samples: sampler, steps, guidance by a second net and its NFE per image, the DG
    weights, the selection and the rejection sampling."""
    text = f'{settings["sampler"]} sampler, {settings["num_steps"]} steps, '
    guided = bool(guidance) and guidance.get('gnet') is not None
    if guided:
        text += describe_guidance(settings, guidance, net) + ', '
    if disc is None:
        return text + ('no DG' if guided else 'plain EDM')
    text += (f'DG (w1={settings["dg_weight_1st_order"]}, w2={settings["dg_weight_2nd_order"]}, '
             f'window {settings["time_min"]}-{settings["time_max"]}, boosting={int(settings["boosting"])})')
    if selection is not None:
        steps = ','.join(str(i) for i in selection['resample_steps'])
        text += f', {selection["chains"]} chains per seed'
        text += f' resampled after steps {steps}' if steps else ''
        text += ', best kept' if selection['best'] else ''
    if rejection is not None:
        text += (f', DiffRS (gamma={rejection["rej_percentile"]}, backsteps={rejection["backsteps"]}, '
                 f'max_iter={rejection["max_iter"] or "none"})')
    return text

def describe_guidance(settings, guidance, net):
    """'guidance w=W[ in [lo, hi]] (NFE per image: N)' -- the guide's evaluations counted where they happen."""
    from edm_dg.sampling import build_chain, nfe
    from edm_dg.sampling.hooks import SampleState
    text = f'guidance w={guidance["guidance"]:g}'
    interval = guidance.get('guidance_interval')
    if interval is not None:
        text += f' for sigma in [{interval[0]:g}, {interval[1]:g}]'
    if guidance['guidance'] == 1:
        return text + ' (the main net alone; the guide is not evaluated)'
    den, _ = build_chain(net, SampleState(), gnet=guidance['gnet'], guidance=guidance['guidance'], guidance_interval=interval)
    keys = ('sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'restart')
    calls = nfe(settings['sampler'], settings['num_steps'], den, **{k: settings[k] for k in keys if settings.get(k) is not None})
    text += f', {calls} network evaluations per image'
    if calls == nfe(settings['sampler'], settings['num_steps'], net, **{k: settings[k] for k in keys if settings.get(k) is not None}):
        text += ' (no step lies in the guidance interval: plain sampling)'
    return text

def report(stats, log):
    """Totals over all ranks; a ValueError names the seeds whose images were not finite."""
    totals = dist.all_gather_object(stats)
    generated = sum(s['generated'] for s in totals)
    skipped = sum(s['skipped'] for s in totals)
    bad = sorted(x for s in totals for x in s['nonfinite'])
    secs = max(s['seconds'] for s in totals)
    log(f'Done: {generated} generated, {skipped} already present, {generated / max(secs, 1e-9):.2f} images/s.')
    if bad:
        shown = ','.join(str(s) for s in bad[:20]) + (',...' if len(bad) > 20 else '')
        raise ValueError(f'{len(bad)} image(s) had non-finite values and were not written: seeds {shown}; '
                         f'try --precision=fp32 or a smaller --dg_weight_1st_order')

def _check_writable(outdir):
    try:
        os.makedirs(outdir, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=outdir, prefix='.tmp-write-test-')  # unique per process
        os.close(fd)
        os.remove(path)
    except OSError as e:
        raise ValueError(f'{outdir}: output folder is not writable ({e.strerror or type(e).__name__}); choose another --outdir') from None

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
