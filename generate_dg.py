"""Generate images with EDM, optionally with Discriminator Guidance (DG).

Same options, seeds and file names as EDM's generate.py, plus the DG options.
Examples:

\b
  # 64 plain EDM images
  python generate_dg.py --network=edm-cifar10-32x32-uncond-vp.pkl --outdir=out --seeds=0-63
\b
  # 50k DG images on 8 GPUs (EDM-G++, unconditional CIFAR-10)
  torchrun --standalone --nproc_per_node=8 generate_dg.py --network=edm-cifar10-32x32-uncond-vp.pkl \\
      --disc=discriminator_60.pt --classifier=32x32_classifier.pt --outdir=out --seeds=0-49999 --subdirs --batch=500
"""

import os
import tempfile

import click

from torch_utils import distributed as dist
from edm_dg import io as dgio
from edm_dg.cli import command_body
from edm_dg.discriminator import load_discriminator
from edm_dg.generate import generate
from edm_dg.pickles import load_network_pickle
from edm_dg.precision import PRECISIONS, fast_paths

#----------------------------------------------------------------------------

@click.command(help=__doc__)
@click.option('--network', 'network_pkl',  help='EDM network pickle (path or URL)', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir',                  help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--seeds',                   help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs',                 help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx',      help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)

@click.option('--steps', 'num_steps',      help='Number of sampling steps', metavar='INT', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--sigma_min',               help='Lowest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max',               help='Highest noise level  [default: varies]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',                     help='Time step exponent', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', 'S_churn',      help='Stochasticity strength', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min',          help='Stoch. min noise level', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max',          help='Stoch. max noise level', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise',      help='Stoch. noise inflation', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--solver',                  help='Ablate ODE solver', type=click.Choice(['euler', 'heun']), default='heun', show_default=True)

@click.option('--disc', '--discriminator_ckpt', 'disc_path', help='Discriminator: DG head checkpoint or edm-dg checkpoint  [default: none, plain EDM]', metavar='PATH', type=str, default=None)
@click.option('--classifier', '--pretrained_classifier_ckpt', 'classifier_path', help='ADM classifier (feature extractor) of the discriminator', metavar='PATH', type=str, default=None)
@click.option('--dg_weight_1st_order',     help='DG weight at the Euler evaluation  [default: 2 unconditional, 1 conditional net]', metavar='FLOAT', type=float, default=None)
@click.option('--dg_weight_2nd_order',     help='DG weight at the Heun evaluation', metavar='FLOAT', type=float, default=0, show_default=True)
@click.option('--time_min',                help='DG off below this VP time', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=0.01, show_default=True)
@click.option('--time_max',                help='DG off above this VP time', metavar='FLOAT', type=click.FloatRange(min=0, max=1), default=1.0, show_default=True)
@click.option('--boosting',                help='Boost churn and guidance for samples judged fake', type=click.IntRange(0, 1), default=0, show_default=True)
@click.option('--boost_S_churn', 'boost_S_churn', help='Churn of boosted samples', metavar='FLOAT', type=click.FloatRange(min=0), default=4, show_default=True)
@click.option('--boost_S_noise', 'boost_S_noise', help='Noise inflation of boosted samples', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--boost_period',            help='Boost churn every N-th step (release: 5; paper: 2)', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--boost_weight_period',     help='Double the DG correction every N-th step', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)

@click.option('--npz',                     help='Also write compressed uint8 .npz shards (samples, label, seeds)', is_flag=True)
@click.option('--resume/--no-resume',      help='Skip seeds whose image already exists', default=True, show_default=True)
@click.option('--device',                  help='Device  [default: cuda if available]', metavar='STR', type=str, default=None)
@click.option('--precision',               help='Score-network precision', type=click.Choice(PRECISIONS), default='fp32', show_default=True)
@click.option('--disc_precision',          help='Discriminator precision  [default: --precision]', type=click.Choice(PRECISIONS), default=None)
@click.option('--channels_last',           help='channels_last memory format for both networks', is_flag=True)
@click.option('--compile', 'compile_nets', help='torch.compile both networks (falls back to eager)', is_flag=True)
@click.option('--trust_pickle',            help='Load --network with EDM\'s own unpickling (executes code in the file)', is_flag=True)
@command_body
def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, disc_path, classifier_path, dg_weight_1st_order,
         npz, resume, device, precision, disc_precision, channels_last, compile_nets, trust_pickle, **sampler_kwargs):
    run(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, disc_path, classifier_path, dg_weight_1st_order,
        npz, resume, device, precision, disc_precision, channels_last, compile_nets, trust_pickle, sampler_kwargs)

def run(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, disc_path, classifier_path, dg_weight_1st_order,
        npz, resume, device, precision, disc_precision, channels_last, compile_nets, trust_pickle, sampler_kwargs):
    seeds = dgio.parse_seeds(seeds)
    for name, value in list(sampler_kwargs.items()) + [('dg_weight_1st_order', dg_weight_1st_order)]:
        if isinstance(value, float) and (value != value or (value in (float('inf'), float('-inf')) and name != 'S_max')):
            raise ValueError(f'--{name}={value} is not a finite number')
    device = dist.init_device(device)
    log = dist.print0
    if disc_path is not None and classifier_path is None:
        raise ValueError(f'{disc_path}: a discriminator needs its feature extractor; pass --classifier (e.g. 32x32_classifier.pt)')
    if disc_path is None and (classifier_path is not None or dg_weight_1st_order or sampler_kwargs['dg_weight_2nd_order']):
        raise ValueError('DG options given without --disc; pass --disc and --classifier, or drop the DG options')
    _check_writable(outdir)

    # Rank 0 loads (and downloads) first, the others then read its cache.
    if dist.get_rank() != 0:
        dist.barrier()
    log(f'Loading network from "{network_pkl}"...')
    net = load_network_pickle(network_pkl, trust_pickle=trust_pickle, verbose=(dist.get_rank() == 0))
    net = net.eval().requires_grad_(False).to(device)
    disc = None
    if disc_path is not None:
        log(f'Loading discriminator from "{disc_path}" with classifier "{classifier_path}"...')
        disc = load_discriminator(disc_path, classifier_path, device=device)
    if dist.get_rank() == 0:
        dist.barrier()

    if class_idx is not None and not net.label_dim:
        raise ValueError(f'{network_pkl}: --class given but the network is unconditional; drop --class')
    if class_idx is not None and class_idx >= net.label_dim:
        raise ValueError(f'--class={class_idx} out of range: {network_pkl} has {net.label_dim} classes (0-{net.label_dim - 1})')
    if disc is not None and disc.cond and not net.label_dim:
        raise ValueError(f'{disc_path}: class-conditional discriminator but {network_pkl} is unconditional; use an unconditional discriminator')
    if disc is not None and (disc.classifier.image_size != net.img_resolution or disc.classifier.in_channels != net.img_channels):
        raise ValueError(f'{classifier_path}: classifier takes {disc.classifier.in_channels}x{disc.classifier.image_size}x{disc.classifier.image_size} '
                         f'images but {network_pkl} makes {net.img_channels}x{net.img_resolution}x{net.img_resolution}; pass a matching classifier')

    fast_net, disc = fast_paths(net, disc, precision, disc_precision, channels_last, compile_nets, log=log)
    if disc is not None and dg_weight_1st_order is None:
        dg_weight_1st_order = 1.0 if net.label_dim else 2.0
    sampler_kwargs = {k: v for k, v in sampler_kwargs.items() if v is not None}
    sampler_kwargs.update(discriminator=disc, dg_weight_1st_order=dg_weight_1st_order or 0.0)

    mode = 'plain EDM' if disc is None else f'DG (w1={dg_weight_1st_order}, w2={sampler_kwargs["dg_weight_2nd_order"]}, boosting={sampler_kwargs["boosting"]})'
    log(f'Generating {len(seeds)} images to "{outdir}" with {mode} on {dist.get_world_size()} process(es)...')
    stats = generate(fast_net, outdir, seeds, device=device, subdirs=subdirs, class_idx=class_idx, max_batch_size=max_batch_size,
                     sampler_kwargs=sampler_kwargs, npz=npz, resume=resume, log=log)
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
