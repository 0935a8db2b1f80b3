"""Negative log-likelihood (bits/dim) of a dataset under an EDM network, optionally with DG in the drift.

Probability-flow ODE with Hutchinson's trace estimator and uniform
dequantisation; images are split over torchrun processes. Reports the mean and
its standard error over images. With --disc/--classifier the drift gains DG's
term w * correction / sigma, like the sampler only while the VP time lies in
[--time_min, --time_max]; its divergence is differentiated through the
discriminator (attention in plain math there, as the fused kernels have no
double backward).

\b
  torchrun --standalone --nproc_per_node=8 nll.py --network=edm-cifar10-32x32-uncond-vp.pkl \\
      --data=datasets/cifar10-32x32-test.zip --num_images=10000
"""

import math
import time

import click
import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from edm_dg import fileio, image_sets
from edm_dg.cli import command_body
from edm_dg.models import load_models
from edm_dg.nll import bits_per_dim, dequantize, log_likelihood
from edm_dg.options import (DEFAULTS, DEVICE, DG_WEIGHT_1, TIME_MAX, TIME_MIN, TRUST_PICKLE, batch_option, disc_options,
                            pop_disc_options)

@click.command(help=__doc__)
@click.option('--network', 'network_pkl', help='EDM network pickle', metavar='PATH|URL', required=True)
@click.option('--data', help='Images: EDM dataset zip/folder, .npz or image folder', metavar='PATH', required=True)
@click.option('--num_images', '--num', 'num', help='Images to evaluate (seeded subset); under torchrun write --num_images (torchrun takes --num for its --numa-binding)', type=click.IntRange(min=1), default=None)
@batch_option('batch', 64)
@click.option('--steps', 'num_steps', help='Heun steps of the ODE', type=click.IntRange(min=2), default=128, show_default=True)
@click.option('--seed', help='Seed for subset, dequantisation and probes', type=int, default=0, show_default=True)
@disc_options
@DG_WEIGHT_1
@TIME_MIN
@TIME_MAX
@click.option('--json', 'json_out', help='Write results to this JSON file', metavar='PATH', default=None)
@DEVICE
@TRUST_PICKLE
@command_body
def main(network_pkl, data, num, batch, num_steps, seed, dg_weight_1st_order, time_min, time_max, json_out, device,
         trust_pickle, **disc_kwargs):
    disc_opts = pop_disc_options(disc_kwargs)
    disc_path, classifier_path = disc_opts['disc_path'], disc_opts['classifier_path']
    dg_weight = dg_weight_1st_order
    time_min = DEFAULTS['time_min'] if time_min is None else time_min
    time_max = DEFAULTS['time_max'] if time_max is None else time_max
    if disc_path is None and dg_weight:
        raise ValueError(f'--dg_weight_1st_order={dg_weight} needs a discriminator; pass --disc and --classifier')
    if time_min > time_max:
        raise ValueError(f'--time_min={time_min} is above --time_max={time_max}; pass time_min <= time_max')
    device = dist.init_device(device)
    net, disc = load_models(network_pkl, device, trust_pickle=trust_pickle, decode=False, **disc_opts)
    from edm_dg import latents
    if latents.space_of_net(net)['kind'] == 'latents':
        raise ValueError(f'{network_pkl}: a latent model; nll.py measures bits/dim of pixels under pixel models: pass an EDM or '
                         f'EDM2 pixel network')
    if disc is not None and dg_weight is None:
        dg_weight = 1.0 if net.label_dim else 2.0
    dg_weight = float(dg_weight or 0.0)
    src = image_sets.ImageSource(data)
    idx = image_sets.subset_indices(len(src), num, seed)
    labels_all = src.labels(idx) if net.label_dim else None
    if net.label_dim and labels_all is None:
        raise ValueError(f'{data}: conditional network needs labels (dataset.json)')
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = [(i, idx[i:i + batch]) for i in range(0, len(idx), batch)][rank::world]
    results = []
    t0 = time.perf_counter()
    for start, chunk in tqdm.tqdm(chunks, desc='nll', disable=rank != 0, dynamic_ncols=True):
        x_u8 = src.images(chunk).to(device)
        if x_u8.shape[1:] != (net.img_channels, net.img_resolution, net.img_resolution):
            raise ValueError(f'{data}: images are {list(x_u8.shape[1:])}, network expects '
                             f'{[net.img_channels, net.img_resolution, net.img_resolution]}')
        g = torch.Generator(device).manual_seed(seed * 1000003 + start)
        y = None
        if net.label_dim:
            y = torch.eye(net.label_dim, device=device)[labels_all[start:start + len(chunk)].to(device)]
        lp = log_likelihood(net, dequantize(x_u8, g), y, num_steps=num_steps, generator=g, discriminator=disc,
                            w=dg_weight, disc_labels=y, time_min=time_min, time_max=time_max)
        results.extend(bits_per_dim(lp, x_u8[0].numel()).cpu().tolist())
    seconds = time.perf_counter() - t0
    allr = [v for part in dist.all_gather_object(results) for v in part]
    process_seconds = sum(dist.all_gather_object(seconds))
    mean = float(np.mean(allr))
    se = float(np.std(allr, ddof=1) / math.sqrt(len(allr))) if len(allr) > 1 else float('nan')
    if rank == 0:
        window = f', VP time window [{time_min}, {time_max}]' if disc is not None else ''
        print(f'NLL: {mean:.4f} +- {se:.4f} bits/dim (mean +- s.e., {len(allr)} images, {num_steps} steps, '
              f'w={dg_weight}{window}; {process_seconds / len(allr):.3g} s/image per process)')
        if json_out:
            fileio.atomic_write_json(json_out, dict(
                bpd_mean=mean, bpd_se=se if len(allr) > 1 else None, n=len(allr), bpd=allr, steps=num_steps, seed=seed, batch=batch,
                dg_weight_1st_order=dg_weight, w=dg_weight, time_min=time_min, time_max=time_max,
                network=network_pkl, data=data, disc=disc_path, classifier=classifier_path,
                disc_time=None if disc is None else disc.time_schedule,
                processes=world, sec_per_image=process_seconds / len(allr)), indent=2)

if __name__ == '__main__':
    main()
