"""Seed-exact image generation with EDM's conventions, resumable and multi-process.

An image depends only on its seed (docs/compat.md §2): each seed owns a
generator that draws its latent, its class and every later noise sample.
Outputs are written atomically, so an interrupted run is resumed by generating
exactly the seeds whose files are missing.
"""

import json
import os
import time

import numpy as np
import torch
import tqdm

from torch_utils import distributed as dist
from . import fileio
from . import latents as latents_lib
from .sampling import selection as sel
from .sampling import sample

#----------------------------------------------------------------------------

class SeedRandom:
    """Random draws for a batch in which sample k uses only the generator of seeds[k].

    Stacking per-seed draws makes every image independent of the batch it lands
    in and of the number of processes (EDM's convention, seed taken mod 2^32).
    """

    def __init__(self, device, seeds):
        self.gens = []
        for seed in seeds:
            g = torch.Generator(device)
            g.manual_seed(int(seed) % 2 ** 32)
            self.gens.append(g)

    def _per_seed(self, draw, size):
        if size[0] != len(self.gens):
            raise ValueError(f'batch of {size[0]} drawn with {len(self.gens)} seed generators')
        return torch.stack([draw(list(size[1:]), g) for g in self.gens])

    def randn(self, size, **kwargs):
        return self._per_seed(lambda s, g: torch.randn(s, generator=g, **kwargs), size)

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high, size, **kwargs):
        return self._per_seed(lambda s, g: torch.randint(high, s, generator=g, **kwargs), size)

def draw_inputs(net_shape, label_dim, seeds, device, class_idx=None):
    """Latents [N,C,H,W], one-hot labels [N,label_dim] (or None) and the seeds' generators.

    The class of a seed is drawn right after its latent, also when --class fixes
    it, so later noise draws do not depend on --class.
    """
    rnd = SeedRandom(device, seeds)
    latents = rnd.randn([len(seeds), *net_shape], device=device)
    labels = None
    if label_dim:
        idx = rnd.randint(label_dim, [len(seeds)], device=device)
        if class_idx is not None:
            idx = torch.full_like(idx, class_idx)
        labels = torch.nn.functional.one_hot(idx, label_dim).to(torch.float32)
    return latents, labels, rnd

def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    """EDM's split: a multiple of world_size balanced batches of at most max_batch_size, dealt round-robin."""
    per_round = max_batch_size * world_size
    num_batches = -(-len(seeds) // per_round) * world_size
    chunks = np.array_split(np.asarray(seeds, dtype=np.int64), num_batches)
    return [c.tolist() for c in chunks[rank::world_size]]

#----------------------------------------------------------------------------

SAVE_LATENTS_WITH_DIFFRS = ('--save_latents with --rejection=diffrs is not supported: DiffRS finishes seeds out of batch '
                            'order; generate the PNGs and drop --save_latents')

def generate(net, outdir, seeds, *, device, subdirs=False, class_idx=None, max_batch_size=64,
             sampler_kwargs=None, selection=None, npz=False, save_latents=False, resume=True, progress=True, log=print):
    """Generate `seeds` into `outdir` (EDM file names) plus dataset.json labels.

    sampler_kwargs go to `edm_dg.sampling.sample` (sampler name, steps, DG
    settings and the discriminator). With resume, a seed whose PNG exists is not
    generated again; with npz (True, or 'study' for the study's keys: fileio.save_npz_shard), a per-batch shard is
    written once all its images exist. Images with non-finite values are not
    written; their seeds are returned. Returns dict(generated, skipped,
    nonfinite, seconds) for this rank.

    selection: None, or dict(chains, resample_steps, best) (edm_dg.options.
    selection_settings): each seed is sampled as `chains` chains and one is kept
    (edm_dg.sampling.selection.sample_selected, with sampler_kwargs' discriminator);
    the scores go to outdir/selection.jsonl, one line per seed, merged over
    ranks and runs. max_batch_size still counts seeds.

    sampler_kwargs['rejection']: DiffRS settings (edm_dg.options.rejection_settings); see `generate_rejected`.

    A latent network's output is decoded by its encoder (edm_dg.latents.to_uint8);
    save_latents also writes each batch's final latents to outdir/latents/
    (edm_dg.latents.save_latent_shard); a seed that no shard there holds counts as
    not done (also when an earlier run used another --batch or process count).
    """
    sampler_kwargs = dict(sampler_kwargs or {})
    rejection = sampler_kwargs.pop('rejection', None)  # edm_dg.options.rejection_settings
    space = latents_lib.space_of_net(net)
    if save_latents and space['kind'] != 'latents':
        raise ValueError('--save_latents: the network samples pixels, not latents; drop --save_latents (or --npz for image shards)')
    if rejection is not None and save_latents:
        raise ValueError(SAVE_LATENTS_WITH_DIFFRS)
    if rejection is not None:
        if selection is not None:
            raise ValueError('--rejection=diffrs with --particles/--best_of: pass one of them')
        return generate_rejected(net, outdir, seeds, device=device, rejection=rejection, sampler_kwargs=sampler_kwargs,
                                 subdirs=subdirs, class_idx=class_idx, max_batch_size=max_batch_size, npz=npz,
                                 resume=resume, progress=progress, log=log)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    net_shape = [net.img_channels, net.img_resolution, net.img_resolution]
    batches = rank_batches(seeds, max_batch_size, rank, world_size)
    if rank == 0 and os.path.isdir(outdir):
        fileio.remove_stale_temps(outdir)  # From a killed run; no rank writes before the barrier.
    dist.barrier()
    held = latents_lib.seeds_held(outdir) if save_latents and resume else set()
    generated, skipped, nonfinite, labels, records = 0, 0, [], {}, []
    start = time.time()
    bar = tqdm.tqdm(batches, unit='batch', disable=(not progress) or rank != 0, desc='generate', dynamic_ncols=True)
    for batch in bar:
        if not batch:  # More ranks than batches of seeds.
            continue
        relpaths = {s: fileio.image_relpath(s, subdirs) for s in batch}
        latents, class_labels, rnd = draw_inputs(net_shape, net.label_dim, batch, device, class_idx)
        labels.update(_label_entries(batch, relpaths, class_labels))
        shard_path = os.path.join(outdir, 'shards', fileio.shard_name(batch)) if npz else None
        todo = [s for s in batch if not (resume and os.path.isfile(os.path.join(outdir, relpaths[s])))
                or (save_latents and s not in held)]  # A seed without its latents is sampled again (same image).
        skipped += len(batch) - len(todo)
        if not todo and not (npz and not os.path.isfile(shard_path)):
            continue
        images_u8 = {}
        if todo:
            if todo != batch:  # Resumed batch: draw again for the missing seeds only.
                latents, class_labels, rnd = draw_inputs(net_shape, net.label_dim, todo, device, class_idx)
            if selection is None:
                images = sample(net, latents, class_labels, rnd.randn_like, **sampler_kwargs)
            else:
                images, batch_records = sel.sample_selected(net, latents, class_labels, rnd, todo, **selection, **sampler_kwargs)
            finite = torch.isfinite(images).flatten(1).all(dim=1).cpu().tolist()
            if selection is not None:  # Before the images: a record never misses for a written image.
                kept = [dict(r, image=relpaths[s].replace(os.sep, '/')) for s, ok, r in zip(todo, finite, batch_records) if ok]
                sel.append_records(outdir, rank, kept)
                records += kept
            for s, ok, im in zip(todo, finite, latents_lib.to_uint8(net, images)):
                if not ok:
                    nonfinite.append(s)
                    continue
                fileio.save_png(os.path.join(outdir, relpaths[s]), im)
                images_u8[s] = im
                generated += 1
            if save_latents:
                keep = [i for i, (s, ok) in enumerate(zip(todo, finite)) if ok and s not in held]
                if keep:
                    kept = [todo[i] for i in keep]
                    latents_lib.save_latent_shard(latents_lib.shard_path(outdir, kept), images[keep].cpu(),
                                                  _label_values(labels, relpaths, kept), kept, space)
        if npz and not any(s in nonfinite for s in batch):
            samples = np.stack([images_u8[s] if s in images_u8 else fileio.read_image(os.path.join(outdir, relpaths[s])) for s in batch])
            fileio.save_npz_shard(shard_path, samples, _label_values(labels, relpaths, batch), batch, keys=npz if isinstance(npz, str) else 'edm-dg',
                                  label_dim=net.label_dim)
    bar.close()

    # Labels of every seed of every rank go into one dataset.json, written by rank 0.
    all_labels = dist.all_gather_object(labels)
    all_records = dist.all_gather_object(records) if selection is not None else []
    if rank == 0:
        merged = {}
        for part in all_labels:
            merged.update(part)
        fileio.write_labels(outdir, merged)
        if selection is not None:
            sel.merge_records(outdir, [r for part in all_records for r in part])
    dist.barrier()
    return dict(generated=generated, skipped=skipped, nonfinite=nonfinite, seconds=time.time() - start)

def _label_values(labels, relpaths, seeds):
    """The seeds' class indices for a shard, -1 where unlabelled."""
    return [-1 if labels[relpaths[s]] is None else labels[relpaths[s]] for s in seeds]

def _label_entries(batch, relpaths, class_labels):
    if class_labels is None:
        return {relpaths[s]: None for s in batch}
    idx = class_labels.argmax(dim=1).cpu().tolist()
    return {relpaths[s]: int(i) for s, i in zip(batch, idx)}

#----------------------------------------------------------------------------
# Diffusion Rejection Sampling (edm_dg/sampling/diffrs.py): one queue of seeds per rank.

CHAIN_KEYS = ('sampler', 'discriminator', 'dg_weight_1st_order', 'dg_weight_2nd_order', 'time_min', 'time_max', 'boosting',
              'boost_S_churn', 'boost_S_noise', 'boost_period', 'boost_weight_period', 'gnet', 'guidance', 'guidance_interval')

def generate_rejected(net, outdir, seeds, *, device, rejection, sampler_kwargs, subdirs=False, class_idx=None,
                      max_batch_size=64, npz=False, resume=True, progress=True, log=print):
    """`generate` with DiffRS: the seeds of this rank in one queue over max_batch_size slots.

    rejection: edm_dg.options.rejection_settings' dict (rej_percentile,
    backsteps, min_backsteps, max_backsteps, iter_warmup, max_iter,
    rej_thresholds; optionally fingerprint, the discriminator's name in the
    thresholds). The transition is sampler_kwargs' heun/euler over the denoiser
    build_chain makes of the DG options (--w=0: the plain net). Rank 0 makes
    or checks outdir/diffrs_thresholds.json; every rank then samples its own
    seeds. Per seed a line in outdir/rejection.jsonl (merged over ranks and
    runs), then one summary line (sampling.diffrs.summarize) of all its seeds.
    """
    from .sampling import diffrs
    from .sampling.driver import build_chain
    from .sampling.hooks import SampleState
    kw, rej = dict(sampler_kwargs), dict(rejection)
    chain = {k: kw.pop(k) for k in CHAIN_KEYS if k in kw}
    kw.pop('restart', None)
    disc = chain.get('discriminator')
    den, _ = build_chain(net, SampleState(), **chain)
    rs = diffrs.DiffRS(den, disc, solver=chain.get('sampler', 'heun'), rej_percentile=rej['rej_percentile'],
                       backsteps=rej['backsteps'], min_backsteps=rej['min_backsteps'], max_backsteps=rej['max_backsteps'],
                       max_iter=rej['max_iter'], fingerprint=rej.get('fingerprint'), **kw)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    net_shape = [net.img_channels, net.img_resolution, net.img_resolution]
    batches = rank_batches(seeds, max_batch_size, rank, world_size)
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        fileio.remove_stale_temps(outdir)
        try:
            th, error = rs.outdir_thresholds(outdir, rej['rej_thresholds'], iter_warmup=rej['iter_warmup'], device=device,
                                             label_dim=net.label_dim, class_idx=class_idx, batch=max_batch_size), None
        except ValueError as e:
            th, error = None, str(e)
    error = dist.broadcast_object(error if rank == 0 else None)
    if error is not None:
        raise ValueError(error)
    if rank != 0:
        th = rs.thresholds_for(os.path.join(outdir, diffrs.THRESHOLDS_NAME))

    labels, relpaths = {}, {}
    for batch in batches:
        if batch:
            relpaths.update({s: fileio.image_relpath(s, subdirs) for s in batch})
            labels.update(_label_entries(batch, relpaths, draw_inputs(net_shape, net.label_dim, batch, device, class_idx)[1]))
    mine = [s for b in batches for s in b]
    todo = [s for s in mine if not (resume and os.path.isfile(os.path.join(outdir, relpaths[s])))]
    generated, nonfinite, records = 0, [], []
    start = time.time()
    bar = tqdm.tqdm(total=len(todo), unit='img', disable=(not progress) or rank != 0, desc='diffrs', dynamic_ncols=True)
    draw = lambda pos: draw_inputs(net_shape, net.label_dim, [todo[p] for p in pos], device, class_idx)[:2]
    for pos, images, _, recs in rs.generate(todo, draw, th, batch=max_batch_size, device=device):
        finite = torch.isfinite(images).flatten(1).all(dim=1).cpu().tolist()
        group = [todo[p] for p in pos]
        kept = [dict(r, image=relpaths[s].replace(os.sep, '/')) for s, ok, r in zip(group, finite, recs) if ok]
        sel.append_records(outdir, rank, kept, name=diffrs.RECORD_NAME)  # Before the images, as selection's.
        records += kept
        for s, ok, im in zip(group, finite, latents_lib.to_uint8(net, images)):
            if ok:
                fileio.save_png(os.path.join(outdir, relpaths[s]), im)
                generated += 1
            else:
                nonfinite.append(s)
        bar.update(len(group))
    bar.close()
    if npz:
        for batch in batches:
            shard_path = os.path.join(outdir, 'shards', fileio.shard_name(batch)) if batch else None
            if batch and not os.path.isfile(shard_path) and not any(s in nonfinite for s in batch):
                samples = np.stack([fileio.read_image(os.path.join(outdir, relpaths[s])) for s in batch])
                fileio.save_npz_shard(shard_path, samples, _label_values(labels, relpaths, batch), batch, keys=npz if isinstance(npz, str) else 'edm-dg',
                                      label_dim=net.label_dim)

    all_labels = dist.all_gather_object(labels)
    all_records = dist.all_gather_object(records)
    summary = None
    if rank == 0:
        merged = {}
        for part in all_labels:
            merged.update(part)
        fileio.write_labels(outdir, merged)
        path = sel.merge_records(outdir, [r for part in all_records for r in part], name=diffrs.RECORD_NAME)
        wanted = {fileio.image_relpath(s, subdirs).replace(os.sep, '/') for s in seeds}
        summary = diffrs.summarize([r for r in sel.read_records(path).values() if r.get('image') in wanted])
        with open(path) as f:
            text = f.read()
        fileio.atomic_write_text(path, text + json.dumps(dict(summary=summary), sort_keys=True) + '\n')
        log(f'DiffRS: {summary["images"]} images, mean NFE per image {summary.get("mean_nfe", 0):.2f} '
            f'({summary.get("mean_nfe_total", 0):.2f} with rejected attempts), {summary.get("restarts", 0)} restarts; '
            f'acceptance per level ' + ' '.join('-' if a is None else f'{a:.3f}' for a in summary.get('acceptance', [])))
    dist.barrier()
    return dict(generated=generated, skipped=len(mine) - len(todo), nonfinite=nonfinite, seconds=time.time() - start,
                rejection=summary)
