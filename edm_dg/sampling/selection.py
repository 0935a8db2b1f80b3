"""The discriminator beyond guidance: particle-filter resampling and best-of-N selection.

A trained DG discriminator estimates the density ratio r = p_data / p_model of
noisy images, `r = d / (1 - d)`, at every noise level. Besides steering the
sampler (guidance), that ratio can choose among samples (as in Liu et al.,
"Correcting diffusion generation through resampling", whose release is
UCSB-NLP-Chang/diffusion_resampling):

- particle filtering: every seed is sampled as K chains ("particles"); after
  chosen main steps each seed's particles are resampled, multinomially and
  with replacement, within that seed's group, with weights from the ratio at
  the current noise level. The first resampling uses w_k = r(x_k); a later one
  uses the incremental weight r(x_k) / r_prev_k, r_prev_k being the ratio the
  particle's ancestor had when it was last resampled, so that after every
  resampling the population targets p_model * r (the data's distribution) and
  not a compounding product of ratios. The image kept is particle 0, itself a
  draw from the last resampling;
- best-of-N: every seed is sampled as N chains, each finished image is scored by
  the ratio at the schedule's lowest positive noise level (EDM's sigma_min,
  0.002 by default, VP time ~4e-5, inside the discriminator's training range
  [1e-5, 1]), and the best one is kept. With particles, the best particle is kept.

Seeds (the image of seed s depends only on s, for any batch size and process
count): chain 0 of seed s uses exactly seed s's generator (EDM's, seed mod
2^32), so K = 1 or N = 1 give the plain image of s. Chain c >= 1 draws its
latent and all its noise from numpy's PCG64 seeded with
`SeedSequence([s mod 2^32, c])`, and the resampling of seed s draws its
uniforms from `SeedSequence([s mod 2^32, 0])`. These are streams of a
different generator family than the per-seed torch generators (MT19937 on CPU,
Philox on CUDA), so they cannot coincide with any seed's plain stream; torch's
CPU generator keeps only the low 32 bits of a seed, so a derived torch seed
could not guarantee that. Chains of a seed share its class label.

Resampling is an after_step hook (hooks.py): it returns an [N] index tensor
and the driver reorders every per-sample state, the particles' previous
ratios and ancestors (kept in the run's SampleState) included. Noise streams
are not permuted: row r keeps drawing from its own generator, so a duplicated
particle gets fresh noise wherever the sampler adds noise (deterministic
samplers keep duplicates identical).
Nothing here reads a tensor back to the host during sampling; the record of
the scores is read once per batch, after sampling.
"""

import glob
import json
import os

import numpy as np
import torch

from .. import fileio
from .driver import sample
from .hooks import Hook, SampleState
from .schedule import edm_schedule
from .score import log_ratio

RECORD_NAME = 'selection.jsonl'
PARTIAL_GLOB = 'selection-rank*.partial.jsonl'

#----------------------------------------------------------------------------
# Scores: score.log_ratio (no autograd), at the level below.

def scoring_sigma(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, **_):
    """The noise level finished images are scored at: the schedule's lowest positive level (host float)."""
    return edm_schedule(net, num_steps, sigma_min, sigma_max, rho)[1][-2]

#----------------------------------------------------------------------------
# Random streams of the chains.

def chain_stream(seed, chain):
    """numpy Generator (PCG64) of chain `chain` >= 1 of seed `seed`; chain 0 names the resampling stream."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) % 2 ** 32, int(chain)]))

def host_to_device(array, device):
    """A host numpy array on `device`, copied without waiting for the device (pinned memory on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    device = torch.device(device)
    if device.type == 'cpu':
        return t
    if device.type == 'cuda':
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

class ChainRandom:
    """Random draws for B seeds x C chains, rows seed-major (row b*C + c).

    Row b*C of every draw comes from `plain` (an edm_dg.generate.SeedRandom of
    the seeds, the seeds' own generators); row b*C + c, c >= 1, from
    `chain_stream(seeds[b], c)`. `uniforms()` gives the resampling draws.
    """

    def __init__(self, plain, seeds, chains):
        self.plain, self.seeds, self.chains = plain, list(seeds), int(chains)
        self.derived = [chain_stream(s, c) for s in self.seeds for c in range(1, self.chains)]
        self.resampling = [chain_stream(s, 0) for s in self.seeds]

    def _host_normal(self, shape, dtype):
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        return np.stack([g.standard_normal(shape, dtype=np_dtype) for g in self.derived])

    def randn(self, size, dtype=torch.float32, device=None, **kwargs):
        b, c = len(self.seeds), self.chains
        if size[0] != b * c:
            raise ValueError(f'batch of {size[0]} drawn for {b} seeds x {c} chains')
        shape = list(size[1:])
        first = self.plain.randn([b, *shape], dtype=dtype, device=device, **kwargs)
        if c == 1:
            return first
        rest = host_to_device(self._host_normal(shape, dtype), first.device).to(dtype)
        return torch.cat([first.unsqueeze(1), rest.reshape(b, c - 1, *shape)], dim=1).reshape(b * c, *shape)

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def uniforms(self, device):
        """[B, C] float64 uniforms in [0, 1) on device, one row per seed (C per seed and call)."""
        return host_to_device(np.stack([g.random(self.chains) for g in self.resampling]), device)

def repeat_rows(t, chains):
    """Each row of t (or None) repeated `chains` times, seed-major."""
    return None if t is None else t.repeat_interleave(chains, dim=0)

def chain_inputs(latents, class_labels, rnd, seeds, chains):
    """(latents [B*C], labels [B*C] or None, ChainRandom) from a batch's plain draws (edm_dg.generate.draw_inputs).

    Row b*C is seed b's plain latent; rows b*C + c draw their latents first
    from their own streams. All chains of a seed get its label.
    """
    crnd = ChainRandom(rnd, seeds, chains)
    if chains == 1:
        return latents, class_labels, crnd
    b = len(seeds)
    shape = list(latents.shape[1:])
    rest = host_to_device(crnd._host_normal(shape, latents.dtype), latents.device).to(latents.dtype)
    lat = torch.cat([latents.unsqueeze(1), rest.reshape(b, chains - 1, *shape)], dim=1).reshape(b * chains, *shape)
    return lat, repeat_rows(class_labels, chains), crnd

#----------------------------------------------------------------------------
# Resampling.

def multinomial_rows(log_w, u):
    """Per row of log_w [B, C]: C indices drawn with replacement with probabilities softmax(row), by inverse CDF of u [B, C]."""
    log_w = torch.nan_to_num(log_w.to(torch.float64), nan=0.0)
    w = torch.exp(log_w - log_w.max(dim=1, keepdim=True).values)
    cdf = torch.cumsum(w, dim=1)
    target = u.to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf.contiguous(), target.contiguous(), right=True).clamp(max=log_w.shape[1] - 1)

class Resampler(Hook):
    """The after_step hook of particle filtering: resample each seed's particles after the main steps in `steps`.

    Weights: the ratio r = d / (1 - d) at the step's noise level, divided by
    the ratio the particle's ancestor had at the previous resampling (1 before
    the first). Per-sample state (reordered by the driver): 'disc_labels'
    (the discriminator's labels; `labels` fills it where the run has none),
    'resample_prev' (log r at the last resampling) and 'ancestor' (the
    original chain of each row).
    """

    events = ('after_step',)
    option = '--particles'

    def __init__(self, discriminator, labels, steps, chains, rnd):
        self.discriminator, self.labels, self.chains, self.rnd = discriminator, labels, int(chains), rnd
        self.steps = frozenset(int(i) for i in steps)
        self.count = 0  # resamplings done (host)

    def after_step(self, i, x, sigma, state):
        if i not in self.steps or self.chains < 2:
            return None
        if state.get('disc_labels') is None and self.labels is not None:
            state['disc_labels'] = self.labels
        lr = log_ratio(self.discriminator, x, sigma, state.get('disc_labels'))
        prev = state.get('resample_prev')
        incr = lr if prev is None else lr - prev
        b = x.shape[0] // self.chains
        local = multinomial_rows(incr.reshape(b, self.chains), self.rnd.uniforms(x.device))
        base = torch.arange(b, device=x.device).reshape(-1, 1) * self.chains
        state['resample_prev'] = lr
        if state.get('ancestor') is None:
            state['ancestor'] = torch.arange(x.shape[0], device=x.device)
        self.count += 1
        return (local + base).reshape(-1)

#----------------------------------------------------------------------------
# One batch.

def sample_selected(net, latents, class_labels, rnd, seeds, *, chains, resample_steps=(), best=False,
                    discriminator=None, disc_labels=None, **sampler_kwargs):
    """One image per seed chosen among `chains` chains; returns (images [B] float64, records).

    latents, class_labels, rnd: the seeds' plain draws (edm_dg.generate.draw_inputs).
    resample_steps: main-step indices after which particles are resampled.
    best: keep the chain whose finished image scores highest (best-of-N);
    otherwise chain 0 (after resampling, a draw from the last resampling).
    discriminator: `(x_vp, tau, labels) -> d`, also used for guidance when
    sampler_kwargs ask for it (driver.sample's options).
    records: per seed dict(seed, chosen, log_ratio, candidates[, ancestor]).
    """
    if discriminator is None:
        raise ValueError('selection needs a discriminator; pass --disc and --classifier')
    b, c = len(seeds), int(chains)
    lat, labels, crnd = chain_inputs(latents, class_labels, rnd, seeds, c)
    state = SampleState(disc_labels=labels if disc_labels is None else repeat_rows(disc_labels, c))
    resampler = Resampler(discriminator, None, resample_steps, c, crnd) if c > 1 and resample_steps else None
    images = sample(net, lat, labels, crnd.randn_like, discriminator=discriminator, hooks=[resampler] if resampler else (),
                    state=state, **sampler_kwargs)
    scores = log_ratio(discriminator, images, scoring_sigma(net, **sampler_kwargs), state['disc_labels']).reshape(b, c)
    pick = scores.argmax(dim=1) if best else torch.zeros(b, dtype=torch.long, device=scores.device)
    rows = torch.arange(b, device=scores.device) * c + pick
    chosen = images[rows]
    host = dict(pick=pick.cpu().tolist(), scores=scores.cpu().tolist())
    if state.get('ancestor') is not None:
        host['ancestor'] = (state['ancestor'][rows] - torch.arange(b, device=rows.device) * c).cpu().tolist()
    records = []
    for k, s in enumerate(seeds):
        rec = dict(seed=int(s), chosen=host['pick'][k], log_ratio=host['scores'][k][host['pick'][k]],
                   candidates=host['scores'][k])
        if 'ancestor' in host:
            rec['ancestor'] = host['ancestor'][k]
        records.append(rec)
    return chosen, records

#----------------------------------------------------------------------------
# The record: selection.jsonl, one line per seed, merged over ranks and runs.

def append_records(outdir, rank, records, name=RECORD_NAME):
    """Append records (with their image file) to this rank's partial file of record `name`; one write per batch."""
    if not records:
        return
    path = os.path.join(outdir, f'{os.path.splitext(name)[0]}-rank{int(rank)}.partial.jsonl')
    text = ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records)
    with open(path, 'a') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

def read_records(path):
    """{seed: record} of a jsonl file; lines that do not parse (a write cut short) are skipped."""
    out = {}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
                out[int(rec['seed'])] = rec
            except (ValueError, KeyError, TypeError):
                continue
    return out

def merge_records(outdir, records=(), name=RECORD_NAME):
    """Fold `records` and every rank's partial file (also a killed run's) into outdir/`name` (selection.jsonl).

    Written atomically, one line per seed in seed order (a later record of a
    seed replaces an earlier one); the partial files are removed. Returns the path.
    """
    path = os.path.join(outdir, name)
    merged = read_records(path)
    parts = sorted(glob.glob(os.path.join(outdir, f'{os.path.splitext(name)[0]}-rank*.partial.jsonl')))
    for part in parts:
        merged.update(read_records(part))
    merged.update({int(r['seed']): r for r in records})
    fileio.atomic_write_text(path, ''.join(json.dumps(merged[s], sort_keys=True) + '\n' for s in sorted(merged)))
    for part in parts:
        os.remove(part)
    return path
