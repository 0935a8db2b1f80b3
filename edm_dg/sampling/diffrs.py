"""Diffusion Rejection Sampling (Na et al., ICML 2024) over any EDM-style denoiser: `diffrs_sampler`.

A time-dependent discriminator estimates the log density ratio
`L_k(x) = log d / (1 - d)` between data and model at step k's noise level.
DiffRS accepts the initial noise with probability `min(1, exp(L_0 - M_0))` and
every transition k -> k+1 of the base sampler with probability
`min(1, exp(L_{k+1} - L_k - M2_{k+1}))`; a rejected sample is re-noised
`backsteps` levels up and tested there against `M` until one test accepts it.
The thresholds M, M2 are quantiles of L and of its increments over a warm-up
run of the base sampler. docs/compat.md §DiffRS has the rules and their
differences from the release.

The transition is any denoiser `net(x, sigma, class_labels)` (a plain EDM net
or the DG-guided `DGDenoiser`), stepped by EDM's Heun or Euler rule with churn.
Samples sit in a fixed number of slots and each slot is at its own level, so
sigma is a per-sample vector: a slot whose sample is finished (or restarted)
takes the next seed of the queue at once and the batch stays full.

Seeds: the image of seed s depends only on s and the settings. Its first latent
and label are the seed's plain draws; every later random number (test
uniforms, churn noise, re-noising, new noise after a rejected start or a
restart) comes from numpy PCG64 streams of `SeedSequence(s mod 2^32,
spawn_key=(STREAM_KEY, i))`, a different family from the seeds' torch
generators and from the selection chains' `SeedSequence([s, c])`. Warm-up
sample j draws from `SeedSequence(j, spawn_key=(WARMUP_KEY, i))`, disjoint
from every seed.

Per round the host reads one tensor back, the accept decisions; everything
else the host needs (each slot's level, NFE, mode) follows from them.
"""

import hashlib
import json
import math
import os
from collections import namedtuple

import numpy as np
import torch

from .. import fileio, vp
from .denoisers import DGDenoiser, Step, denoise, nfe_of
from .hooks import GAMMA_MAX
from .schedule import edm_schedule
from .score import in_window, log_ratio
from .selection import host_to_device

STREAM_KEY = 0x44526673   # spawn key of the seeds' DiffRS streams
WARMUP_KEY = 0x44525775   # spawn key of the warm-up samples' streams
WARMUP_BATCH = 100        # warm-up samples per iter_warmup (the release's batch)
THRESHOLDS_NAME = 'diffrs_thresholds.json'
RECORD_NAME = 'rejection.jsonl'
FORMAT = 'edm-dg diffrs thresholds'
VERSION = 1
SCHEDULE_RTOL = 1e-9      # schedules made on another device may differ in the last bits

#----------------------------------------------------------------------------
# Random streams.

def seed_streams(seed, key=STREAM_KEY):
    """(uniforms, normals): numpy Generators of seed `seed` (warm-up sample with key=WARMUP_KEY)."""
    root = np.random.SeedSequence(int(seed) % 2 ** 32, spawn_key=(int(key),))
    return tuple(np.random.default_rng(s) for s in root.spawn(2))

def _normals(streams, rows, shape):
    """[len(rows), *shape] float64 standard normals, row r from the normal stream of slot rows[r]."""
    return np.stack([streams[r][1].standard_normal(shape) for r in rows]) if len(rows) else None

def _uniforms(streams, rows):
    return np.array([streams[r][0].random() for r in rows], dtype=np.float64)

#----------------------------------------------------------------------------
# Thresholds.

def discriminator_fingerprint(discriminator):
    """'sha256:<hex>' of a module's state dict (names, dtypes, shapes, values); else (a plain callable, a
    module without weights) 'callable:<module>.<qualified name>'."""
    if isinstance(discriminator, torch.nn.Module) and discriminator.state_dict():
        h = hashlib.sha256()
        for name, t in sorted(discriminator.state_dict().items()):
            t = t.detach().cpu().contiguous()
            h.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
        return 'sha256:' + h.hexdigest()
    fn = getattr(discriminator, '__func__', discriminator)
    return f'callable:{getattr(fn, "__module__", "?")}.{getattr(fn, "__qualname__", type(fn).__qualname__)}'

def _quantiles(rows, gamma):
    """max(0, quantile(row, gamma)) of each row (numpy's linear interpolation, as torch.quantile)."""
    return [max(0.0, float(np.quantile(np.asarray(r, dtype=np.float32).astype(np.float64), gamma))) for r in rows]

def check_percentile(gamma):
    if not (isinstance(gamma, (int, float)) and 0 <= gamma <= 1):
        raise ValueError(f'--rej_percentile={gamma!r}: must lie in [0, 1] (1 keeps the warm-up maximum)')
    return float(gamma)

class Thresholds:
    """M_k and M2_k (k = 0..N) with the warm-up statistics, schedule and discriminator they belong to.

    log_ratio[k] / increment[k]: the warm-up's L_k and L_k - L_{k-1} (float32
    values; increment[0] is all zero). `at(gamma)` recomputes M, M2 for another
    rej_percentile from them. JSON only (`save`, `load`).
    """

    def __init__(self, schedule, discriminator, rej_percentile, log_ratio, increment, settings=None):
        self.schedule = [float(t) for t in schedule]
        self.discriminator = str(discriminator)
        self.rej_percentile = check_percentile(rej_percentile)
        self.log_ratio = [[float(np.float32(v)) for v in row] for row in log_ratio]
        self.increment = [[float(np.float32(v)) for v in row] for row in increment]
        self.settings = dict(settings or {})
        if not (len(self.log_ratio) == len(self.increment) == len(self.schedule)):
            raise ValueError('thresholds need one row of warm-up values per schedule level')
        self.M = _quantiles(self.log_ratio, self.rej_percentile)
        self.M2 = [0.0] + _quantiles(self.increment[1:], self.rej_percentile)

    def at(self, rej_percentile):
        """The same warm-up at another rej_percentile."""
        if check_percentile(rej_percentile) == self.rej_percentile:
            return self
        return Thresholds(self.schedule, self.discriminator, rej_percentile, self.log_ratio, self.increment, self.settings)

    def check(self, schedule, discriminator, source='thresholds'):
        """One-line ValueError unless these thresholds belong to `schedule` (host floats) and `discriminator` (fingerprint)."""
        same = len(schedule) == len(self.schedule) and all(
            abs(a - b) <= SCHEDULE_RTOL * max(abs(a), abs(b)) for a, b in zip(schedule, self.schedule))
        if not same:
            raise ValueError(f'{source}: made for another schedule ({len(self.schedule) - 1} steps, '
                             f'sigma_max {self.schedule[0]:g}); rerun the warm-up (drop --rej_thresholds) or match the steps and sigmas')
        if str(discriminator) != self.discriminator:
            raise ValueError(f'{source}: made for another discriminator ({self.discriminator[:23]}); '
                             f'rerun the warm-up (drop --rej_thresholds) or pass the discriminator it was made with')

    def to_dict(self):
        return dict(format=FORMAT, version=VERSION, schedule=self.schedule, discriminator=self.discriminator,
                    settings=self.settings, rej_percentile=self.rej_percentile, M=self.M, M2=self.M2,
                    warmup=dict(samples=len(self.log_ratio[0]), log_ratio=self.log_ratio, increment=self.increment))

    def save(self, path):
        """Written atomically as JSON."""
        fileio.atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'--rej_thresholds={path}: cannot read it as JSON ({e})') from None
        if not isinstance(d, dict) or d.get('format') != FORMAT or d.get('version') != VERSION:
            raise ValueError(f'--rej_thresholds={path}: not a DiffRS thresholds file ({FORMAT!r}, version {VERSION}); '
                             f'use the {THRESHOLDS_NAME} a DiffRS run wrote')
        w = d['warmup']
        return cls(d['schedule'], d['discriminator'], d['rej_percentile'], w['log_ratio'], w['increment'], d.get('settings'))

#----------------------------------------------------------------------------
# The sampler.

Result = namedtuple('Result', ['images', 'records', 'thresholds'])

class DiffRS:
    """DiffRS settings over one transition denoiser and one discriminator.

    net: the transition denoiser `net(x, sigma, class_labels)` with EDM's
    attributes (plain, or `DGDenoiser` for DG-guided transitions; its time
    window is applied per sample).
    discriminator: `(x_vp, tau, labels) -> d` [N]; scored without autograd.
    Base sampler: num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max,
    S_noise as EDM's, solver 'heun' or 'euler'.
    rej_percentile (gamma): the warm-up quantile of the thresholds.
    backsteps: levels a rejected sample is re-noised up (0: transitions are
    never tested); transitions into levels k with min_backsteps < k <=
    max_backsteps (default num_steps) are tested; min_backsteps = 0 also
    tests the initial noise.
    max_iter: denoiser evaluations one attempt may use (None: no limit); a
    sample that would need more starts again from new noise.
    fingerprint: the discriminator's name in thresholds (default
    `discriminator_fingerprint`). The discriminator sees the class labels.
    """

    def __init__(self, net, discriminator, *, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, solver='heun',
                 rej_percentile=0.0, backsteps=1, min_backsteps=0, max_backsteps=None, max_iter=None,
                 fingerprint=None):
        if solver not in ('heun', 'euler'):
            raise ValueError(f'--solver={solver}: DiffRS steps with heun or euler')
        if discriminator is None:
            raise ValueError('--rejection=diffrs needs a discriminator; pass --disc (and --classifier)')
        if isinstance(net, DGDenoiser) and (net.state.get('disc_labels') is not None or net.double_fake_every):
            raise ValueError('DiffRS moves samples between slots: give its guided denoiser no disc_labels and no boosting')
        for name, v in (('--backsteps', backsteps), ('--min_backsteps', min_backsteps)):
            if int(v) != v or v < 0:
                raise ValueError(f'{name}={v}: must be an integer >= 0')
        max_backsteps = num_steps if max_backsteps is None else max_backsteps
        if int(max_backsteps) != max_backsteps or max_backsteps < 1:
            raise ValueError(f'--max_backsteps={max_backsteps}: must be an integer >= 1')
        self.net, self.discriminator, self.solver = net, discriminator, solver
        self.schedule_kwargs = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.S_churn, self.S_min, self.S_max, self.S_noise = S_churn, S_min, S_max, S_noise
        self.rej_percentile = check_percentile(rej_percentile)
        self.backsteps, self.min_backsteps, self.max_backsteps = int(backsteps), int(min_backsteps), int(max_backsteps)
        self.fingerprint = discriminator_fingerprint(discriminator) if fingerprint is None else str(fingerprint)

        _, t = edm_schedule(net, **self.schedule_kwargs)
        n = len(t) - 1
        self.t = t
        gamma = [min(S_churn / num_steps, GAMMA_MAX) if S_min <= t[k] <= S_max else 0.0 for k in range(n)]
        self.t_hat = [float(net.round_sigma(torch.tensor(t[k] + gamma[k] * t[k], dtype=torch.float64))) for k in range(n)]
        self.churn = [g > 0 for g in gamma]
        self.heun = [solver == 'heun' and t[k + 1] > 0 for k in range(n)]
        # Network evaluations of step k -> k+1 at its levels (a guide counts only inside its interval).
        self.cost = [nfe_of(net, (self.t_hat[k],)) + (nfe_of(net, (float(t[k + 1]),)) if self.heun[k] else 0) for k in range(n)]
        self.rem = [sum(self.cost[k:]) for k in range(n + 1)]  # calls from level k to the end
        self.tested = [self.backsteps > 0 and self.min_backsteps < k <= self.max_backsteps for k in range(n + 1)]
        if max_iter is not None and int(max_iter) != max_iter:
            raise ValueError(f'--max_iter={max_iter}: must be an integer')
        if max_iter is not None and max_iter < self.rem[0]:
            raise ValueError(f'--max_iter={max_iter}: below one pass of the base sampler ({self.rem[0]} '
                             f'denoiser evaluations with {num_steps} {solver} steps); raise it')
        self.max_iter = None if max_iter is None else int(max_iter)

    def settings(self):
        """The base sampler's settings, stored with the thresholds for information."""
        churn = dict(S_churn=self.S_churn, S_min=self.S_min, S_max=self.S_max, S_noise=self.S_noise)
        return dict(solver=self.solver, **{k: (v if math.isfinite(v) else str(v)) for k, v in churn.items()},
                    guided=isinstance(self.net, DGDenoiser))

    #------------------------------------------------------------------------
    # One transition of every row from its own level.

    def _denoise(self, x, sigma, labels, order):
        """D(x; sigma) (float64) for host sigmas [n]; a guided denoiser's window is decided per row.

        A DGDenoiser decides its window for a whole call, so rows inside and
        outside the window go in separate calls (at most two).
        """
        sig = host_to_device(np.asarray(sigma, dtype=np.float64), x.device)
        groups = [np.arange(len(sigma))]
        if isinstance(self.net, DGDenoiser) and self.net.active(order):
            inside = np.asarray(in_window(vp.sigma_to_tau(torch.as_tensor(sigma, dtype=torch.float64)),
                                          self.net.time_min, self.net.time_max))
            groups = [g for g in (np.flatnonzero(inside), np.flatnonzero(~inside)) if len(g)]
        if len(groups) == 1:
            return denoise(self.net, x, sig, labels, Step(None, order, tuple(sorted(set(sigma)))))
        out = torch.empty_like(x)
        for g in groups:
            idx = host_to_device(g, x.device)
            step = Step(None, order, tuple(sorted(set(sigma[i] for i in g))))
            out[idx] = denoise(self.net, x[idx], sig[idx], None if labels is None else labels[idx], step)
        return out

    def _column(self, values, x):
        return host_to_device(np.asarray(values, dtype=np.float64), x.device).reshape(-1, *([1] * (x.ndim - 1)))

    def _transition(self, x, levels, labels, streams, rows):
        """x [n] (float64) from its levels k [n] to k+1; churn noise from the normal streams of slots `rows`."""
        t_cur = [self.t[k] for k in levels]
        t_hat = [self.t_hat[k] for k in levels]
        t_next = [self.t[k + 1] for k in levels]
        churned = [i for i, k in enumerate(levels) if self.churn[k]]
        if churned:
            eps = np.zeros((len(levels), *x.shape[1:]))
            eps[churned] = _normals(streams, [rows[i] for i in churned], x.shape[1:])
            extra = [math.sqrt(max(h * h - c * c, 0.0)) * self.S_noise for h, c in zip(t_hat, t_cur)]
            x = x + self._column(extra, x) * host_to_device(eps, x.device)
        d_cur = (x - self._denoise(x, t_hat, labels, 1)) / self._column(t_hat, x)
        dt = self._column([b - a for a, b in zip(t_hat, t_next)], x)
        x_next = x + dt * d_cur
        second = [i for i, k in enumerate(levels) if self.heun[k]]
        if second:
            idx = host_to_device(np.asarray(second), x.device) if len(second) < len(levels) else None
            pick = (lambda v: v) if idx is None else (lambda v: v if v is None else v[idx])
            xe, tn = pick(x_next), [t_next[i] for i in second]
            d_prime = (xe - self._denoise(xe, tn, pick(labels), 2)) / self._column(tn, xe)
            heun = pick(x) + pick(dt) * (0.5 * pick(d_cur) + 0.5 * d_prime)
            if idx is None:
                x_next = heun
            else:
                x_next[idx] = heun
        return x_next

    def _score(self, x, levels, labels):
        return log_ratio(self.discriminator, x, host_to_device(np.array([self.t[k] for k in levels]), x.device), labels).to(torch.float64)

    #------------------------------------------------------------------------
    # Warm-up.

    @torch.no_grad()
    def warmup(self, iter_warmup=10, *, device, label_dim=0, class_idx=None, batch=WARMUP_BATCH, shape=None):
        """Thresholds at `rej_percentile` from iter_warmup * WARMUP_BATCH base-sampler runs on the warm-up streams.

        Sample j draws its latent (shape, default the net's), its label (when
        label_dim and no class_idx) and its churn noise from warm-up stream j;
        `batch` only groups the runs. L_k is recorded at every level k = 0..N.
        """
        if int(iter_warmup) != iter_warmup or iter_warmup < 1:
            raise ValueError(f'--iter_warmup={iter_warmup}: must be an integer >= 1 (or pass --rej_thresholds)')
        shape = list(shape or [self.net.img_channels, self.net.img_resolution, self.net.img_resolution])
        total, n = int(iter_warmup) * WARMUP_BATCH, len(self.t) - 1
        scores = []
        for start in range(0, total, int(batch)):
            js = list(range(start, min(total, start + int(batch))))
            streams = [seed_streams(j, WARMUP_KEY) for j in js]
            rows = list(range(len(js)))
            lat = np.stack([s[1].standard_normal(shape, dtype=np.float32) for s in streams])
            x = host_to_device(lat, device).to(torch.float64) * self.t[0]
            labels = None
            if label_dim:
                cls = [class_idx if class_idx is not None else int(s[1].integers(label_dim)) for s in streams]
                labels = torch.nn.functional.one_hot(host_to_device(np.asarray(cls), device), label_dim).to(torch.float32)
            per_level = [self._score(x, [0] * len(js), labels)]
            for k in range(n):
                x = self._transition(x, [k] * len(js), labels, streams, rows)
                per_level.append(self._score(x, [k + 1] * len(js), labels))
            scores.append(torch.stack(per_level).float().cpu())  # one read per warm-up batch
        L = torch.cat(scores, dim=1).numpy()
        incr = np.concatenate([np.zeros_like(L[:1]), L[1:] - L[:-1]])
        return Thresholds(self.t, self.fingerprint, self.rej_percentile, L.tolist(), incr.tolist(), self.settings())

    def thresholds_for(self, thresholds, source='thresholds'):
        """Checked thresholds at this rej_percentile (a Thresholds or a JSON path)."""
        if isinstance(thresholds, (str, os.PathLike)):
            source = f'--rej_thresholds={thresholds}'
            thresholds = Thresholds.load(thresholds)
        thresholds.check(self.t, self.fingerprint, source)
        return thresholds.at(self.rej_percentile)

    #------------------------------------------------------------------------
    # Sampling.

    @torch.no_grad()
    def generate(self, seeds, draw, thresholds, *, batch, device):
        """Sample `seeds` in `batch` slots; yields (positions, images, labels, records) as samples finish.

        draw(positions) -> (latents [n,C,H,W], class labels [n,label_dim] or
        None) on device: the plain draws of seeds[p] (edm_dg.generate.draw_inputs).
        Give it all the seeds at once: the slots are refilled from this queue,
        and only its last samples leave slots idle.
        Yields positions (indices into `seeds`), images (float64, on device),
        their class labels (or None) and records (host dicts, one per image):
        seed, nfe (network evaluations of the attempt that made the image,
        <= max_iter), nfe_total (of all attempts), nfe_discarded (of steps a
        failed retest made void), restarts, tests[k] and rejections[k] per
        level k. A group is yielded once `batch` images are ready, and at the end.
        """
        th = self.thresholds_for(thresholds)
        seeds = [int(s) for s in seeds]
        N, b, min_b = len(self.t) - 1, self.backsteps, self.min_backsteps
        B = max(1, min(int(batch), len(seeds)))
        M = np.asarray(th.M, dtype=np.float64)
        M2 = np.asarray(th.M2, dtype=np.float64)
        start_test = min_b == 0

        pos = np.full(B, -1)
        k = np.zeros(B, dtype=np.int64)
        pending = np.zeros(B, dtype=bool)
        nfe, nfe_total, nfe_void, restarts = (np.zeros(B, dtype=np.int64) for _ in range(4))
        tests, rejections = np.zeros((B, N + 1), dtype=np.int64), np.zeros((B, N + 1), dtype=np.int64)
        streams = [None] * B
        x = labels = None
        L_prev = torch.zeros(B, dtype=torch.float64, device=device)
        queue = iter(range(len(seeds)))
        done = []

        def dev(a):
            return host_to_device(np.asarray(a), device)

        def fill(slots):
            """Give free slots the next seeds of the queue; returns the slots that got none."""
            nonlocal x, labels
            take = [(r, p) for r, p in zip(slots, queue)]
            if take:
                rs, ps = [r for r, _ in take], [p for _, p in take]
                lat, lab = draw(ps)
                lat = lat.to(device=device, dtype=torch.float64) * self.t[0]
                if x is None:
                    x = torch.empty([B, *lat.shape[1:]], dtype=torch.float64, device=device)
                    labels = None if lab is None else torch.zeros([B, *lab.shape[1:]], dtype=lab.dtype, device=device)
                ri = dev(rs)
                x[ri] = lat
                if labels is not None:
                    labels[ri] = lab.to(labels.dtype)
                L_prev[ri] = 0
                for r, p in take:
                    pos[r], k[r], pending[r], streams[r] = p, 0, start_test, seed_streams(seeds[p])
                    nfe[r] = nfe_total[r] = nfe_void[r] = restarts[r] = 0
                    tests[r] = rejections[r] = 0
            return slots[len(take):]

        def record(r):
            return dict(seed=seeds[pos[r]], nfe=int(nfe[r]), nfe_total=int(nfe_total[r]), nfe_discarded=int(nfe_void[r]),
                        restarts=int(restarts[r]), tests=tests[r].tolist(), rejections=rejections[r].tolist())

        fill(list(range(B)))
        while True:
            act = np.flatnonzero(pos >= 0)
            if len(act) == 0:
                break
            all_rows = len(act) == B
            A = None if all_rows else dev(act)
            sel = (lambda v: v) if all_rows else (lambda v: None if v is None else v[A])
            xa, la, Lp = sel(x), sel(labels), sel(L_prev)
            ka = k[act]
            P = np.flatnonzero(pending[act])                        # local rows with a pending absolute test
            T = np.flatnonzero(np.asarray(self.tested)[ka + 1])    # local rows whose transition is tested
            u_p = _uniforms(streams, act[P])
            # Pending tests at the current level; their rows also step, kept only if accepted.
            base = Lp
            if len(P):
                Pi = dev(P)
                Lq = self._score(xa[Pi], ka[P], None if la is None else la[Pi])
                acc_p = dev(u_p) < torch.exp(Lq - dev(M[ka[P]]))
                base = Lp.clone()
                base[Pi] = Lq
            xs = self._transition(xa, ka.tolist(), la, streams, act.tolist())
            u_s = _uniforms(streams, act[T])
            if len(T):
                Ti = dev(T)
                Ln = self._score(xs[Ti], ka[T] + 1, None if la is None else la[Ti])
                acc_s = dev(u_s) < torch.exp(Ln - base[Ti] - dev(M2[ka[T] + 1]))
            flags = [acc_p] if len(P) else []
            flags += [acc_s] if len(T) else []
            mask = torch.cat(flags).cpu().numpy() if flags else np.zeros(0, dtype=bool)  # the round's one read
            ok_p = np.ones(len(act), dtype=bool)
            ok_p[P] = mask[:len(P)]
            ok_s = np.ones(len(act), dtype=bool)
            ok_s[T] = mask[len(P):]

            # Device state: steps taken, scores kept.
            taken = np.flatnonzero(ok_p)
            if len(taken):
                ti = dev(taken)
                x[ti if all_rows else A[ti]] = xs[ti]
            L_new = base.clone()
            void = P[~ok_p[P]]
            if len(void):
                vi = dev(void)
                L_new[vi] = Lp[vi]
            kept = T[ok_p[T] & ok_s[T]]
            if len(kept):
                ki = dev(kept)
                L_new[ki] = Ln[dev(np.searchsorted(T, kept))]
            if all_rows:
                L_prev = L_new
            else:
                L_prev[A] = L_new

            # Host bookkeeping and the re-noising it implies.
            noise_rows, noise_a, noise_c, restart_rows, finished = [], [], [], [], []
            for i, r in enumerate(act):
                level = k[r]
                if pending[r]:
                    tests[r, level] += 1
                if not ok_p[i]:  # Failed retest: the step is void, re-noise from this level.
                    rejections[r, level] += 1
                    nfe_void[r] += self.cost[level]
                else:
                    nfe[r] += self.cost[level]
                    nfe_total[r] += self.cost[level]
                    level = k[r] = level + 1
                    pending[r] = False
                    if self.tested[level]:
                        tests[r, level] += 1
                        if ok_s[i]:
                            level = None
                        else:
                            rejections[r, level] += 1
                    else:
                        level = None
                    if level is None and k[r] == N:
                        finished.append(i)
                        continue
                if level is not None:  # Rejected at `level`: up `backsteps` levels (new noise at level 0).
                    up = max(level - b, 0)
                    a, c = (0.0, self.t[0]) if level == 0 else (1.0, math.sqrt(self.t[up] ** 2 - self.t[level] ** 2))
                    k[r], pending[r] = up, up > min_b or (up == 0 and start_test)
                    if not (self.max_iter is not None and nfe[r] + self.rem[up] > self.max_iter):
                        noise_rows.append(r), noise_a.append(a), noise_c.append(c)
                if self.max_iter is not None and nfe[r] + self.rem[k[r]] > self.max_iter:
                    k[r], pending[r], nfe[r] = 0, start_test, 0
                    restarts[r] += 1
                    restart_rows.append(r)
                    noise_rows.append(r), noise_a.append(0.0), noise_c.append(self.t[0])
            if noise_rows:
                ni = dev(noise_rows)
                eps = dev(_normals(streams, noise_rows, x.shape[1:]))
                keep = self._column(noise_a, x) > 0  # new noise replaces the state, also a non-finite one
                x[ni] = torch.where(keep, x[ni], torch.zeros_like(eps)) + self._column(noise_c, x) * eps
            if restart_rows:
                L_prev[dev(restart_rows)] = 0

            # Finished samples leave; their slots take the next seeds.
            if finished:
                fi = dev(finished)
                slots = act[finished].tolist()
                done.append(([int(pos[r]) for r in slots], xs[fi], None if la is None else la[fi],
                             [record(r) for r in slots]))
                for r in fill(slots):
                    pos[r] = -1
            if done and (sum(len(d[0]) for d in done) >= B or (pos < 0).all()):
                yield ([p for d in done for p in d[0]], torch.cat([d[1] for d in done]),
                       None if labels is None else torch.cat([d[2] for d in done]), [q for d in done for q in d[3]])
                done = []

    def outdir_thresholds(self, outdir, rej_thresholds=None, *, iter_warmup=10, device, label_dim=0, class_idx=None,
                          batch=WARMUP_BATCH):
        """The thresholds of a run into `outdir`, kept in outdir/THRESHOLDS_NAME (one process calls this).

        rej_thresholds (a path) is checked and copied there; else a file
        already there (a resumed run) is reused; else the warm-up makes it.
        A file there that does not match this run's settings is refused.
        """
        path = os.path.join(outdir, THRESHOLDS_NAME)
        if rej_thresholds is not None:
            th = self.thresholds_for(rej_thresholds)
            if os.path.isfile(path) and Thresholds.load(path).to_dict() != th.to_dict():
                raise ValueError(f'--rej_thresholds={rej_thresholds}: {path} holds other thresholds; '
                                 f'use another --outdir or pass --rej_thresholds={path}')
            th.save(path)
            return th
        if os.path.isfile(path):
            th = self.thresholds_for(path)
            if th.rej_percentile != Thresholds.load(path).rej_percentile:
                raise ValueError(f'--rej_percentile={self.rej_percentile}: {path} was made with '
                                 f'{Thresholds.load(path).rej_percentile}; use another --outdir')
            return th
        th = self.warmup(iter_warmup, device=device, label_dim=label_dim, class_idx=class_idx, batch=batch)
        th.save(path)
        return th

#----------------------------------------------------------------------------
# Library entry and the record.

def diffrs_sampler(
    net, latents, class_labels=None, seeds=None, *, discriminator, thresholds=None, iter_warmup=10, batch=None,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    solver='heun', rej_percentile=0.0, backsteps=1, min_backsteps=0, max_backsteps=None, max_iter=None,
    fingerprint=None,
):
    """Diffusion Rejection Sampling of one image per row of `latents`; returns Result(images, records, thresholds).

    net: the transition denoiser (a plain EDM net or a `DGDenoiser`);
    discriminator: `(x_vp, tau, labels) -> d` [N]. latents [S,C,H,W] and
    class_labels [S,label_dim] are the seeds' plain draws (EDM's); seeds [S]
    (default 0..S-1) name the rows' DiffRS streams, so a row's image depends
    only on its seed, latent and label. batch: slots sampled at once (default
    S); a finished slot takes the next row. thresholds: a `Thresholds`, a
    JSON path, or None to warm up first on iter_warmup * 100 samples of the
    warm-up streams. The other arguments are `DiffRS`'s. images [S] float64
    in row order; records as `DiffRS.generate` yields them, in row order.
    """
    rs = DiffRS(net, discriminator, num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, solver=solver,
                rej_percentile=rej_percentile, backsteps=backsteps, min_backsteps=min_backsteps,
                max_backsteps=max_backsteps, max_iter=max_iter, fingerprint=fingerprint)
    n, device = latents.shape[0], latents.device
    seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f'diffrs_sampler: {len(seeds)} seeds for {n} latents')
    if thresholds is None:
        label_dim = 0 if class_labels is None else class_labels.shape[1]
        thresholds = rs.warmup(iter_warmup, device=device, label_dim=label_dim, batch=batch or WARMUP_BATCH,
                               shape=latents.shape[1:])
    thresholds = rs.thresholds_for(thresholds)

    def draw(rows):
        idx = host_to_device(np.asarray(rows), device)
        return latents[idx], None if class_labels is None else class_labels[idx]

    images = torch.empty(latents.shape, dtype=torch.float64, device=device)
    records = [None] * n
    for rows, ims, _, recs in rs.generate(seeds, draw, thresholds, batch=batch or n, device=device):
        images[host_to_device(np.asarray(rows), device)] = ims
        for r, rec in zip(rows, recs):
            records[r] = rec
    return Result(images, records, thresholds)

def summarize(records):
    """One line for the end of rejection.jsonl: images, mean NFE per image (final attempts and all), restarts,
    and the acceptance rate of the tests at each level (None where none ran)."""
    if not records:
        return dict(images=0)
    tests = np.sum([r['tests'] for r in records], axis=0)
    rej = np.sum([r['rejections'] for r in records], axis=0)
    return dict(images=len(records), mean_nfe=float(np.mean([r['nfe'] for r in records])),
                mean_nfe_total=float(np.mean([r['nfe_total'] + r['nfe_discarded'] for r in records])),
                restarts=int(sum(r['restarts'] for r in records)),
                acceptance=[None if t == 0 else float(1 - j / t) for t, j in zip(tests.tolist(), rej.tolist())])
