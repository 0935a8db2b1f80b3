"""Diffusion Rejection Sampling on an analytic case, against a sample-by-sample reference, and its seed semantics.

Analytic case: data N(0, s_r^2 I), the exact denoiser of the model N(0, s_m^2 I)
(s_r < s_m) and the Bayes-optimal discriminator between the two noised
distributions (tests/helpers.py), so every log ratio L_k has a closed form.
"""

import json
import math

import numpy as np
import pytest
import torch

from edm_dg.sampling import DGDenoiser, edm_sampler, edm_schedule, log_ratio
from edm_dg.sampling import diffrs as R
from edm_dg.sampling.edm import edm_step
from edm_dg.sampling.hooks import GAMMA_MAX
from edm_dg.generate import draw_inputs
from helpers import GaussianDenoiser, GaussianRatioDiscriminator, tiny_classifier, tiny_discriminator, tiny_edm

S_R, S_M = 0.5, 1.0

def latents_for(n, shape, seed=0):
    return torch.randn([n, *shape], generator=torch.Generator().manual_seed(seed))

class LabelShift(GaussianDenoiser):
    """The model's denoiser moved by 0.005 * class (the images by about 0.05 * class): output depends on the
    label, so labels must follow their slots."""

    def forward(self, x, sigma, class_labels=None):
        out = super().forward(x, sigma).double()
        return out if class_labels is None else out + 0.005 * class_labels.argmax(1).double().reshape(-1, 1, 1, 1)

class LabelDisc(GaussianRatioDiscriminator):
    """The Bayes discriminator with a label-dependent logit offset."""

    def forward(self, x_vp, tau, labels=None):
        d = super().forward(x_vp, tau)
        if labels is None:
            return d
        return torch.sigmoid(torch.logit(d) + 0.1 * (labels.argmax(1).double() - 1))

def one_hot(n, seed=1, classes=3):
    idx = torch.randint(classes, [n], generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.one_hot(idx, classes).float()

#----------------------------------------------------------------------------
# A sample-by-sample reference, written from the algorithm (docs/compat.md §DiffRS).

def reference(net, disc, latent, label, seed, th, *, num_steps, sigma_max=80, solver='heun', S_churn=0.0,
              backsteps=1, min_backsteps=0, max_backsteps=None, max_iter=None):
    """(image, record) of one seed. Each try of step k first draws its uniforms (pending test, then the
    transition's test) and its churn noise; a rejection at level j re-noises up to max(j - backsteps, 0)
    (level 0 itself: new noise) unless the budget then forces a restart."""
    t = edm_schedule(net, num_steps, sigma_max=sigma_max)[1]
    N = num_steps
    max_b = N if max_backsteps is None else max_backsteps
    uni, nrm = R.seed_streams(seed)
    shape = latent.shape
    labels = None if label is None else label[None]
    gamma = min(S_churn / N, GAMMA_MAX)
    cost = [2 if solver == 'heun' and k < N - 1 else 1 for k in range(N)]
    rem = [sum(cost[k:]) for k in range(N + 1)]
    tested = lambda k: backsteps > 0 and min_backsteps < k <= max_b
    score = lambda x, k: float(log_ratio(disc, x[None], t[k], labels)[0])
    start_pending = min_backsteps == 0
    x, k, L_prev, pending = latent.double() * t[0], 0, 0.0, start_pending
    rec = dict(nfe=0, nfe_total=0, nfe_discarded=0, restarts=0, tests=[0] * (N + 1), rejections=[0] * (N + 1))

    def reject(y, j):
        nonlocal x, k, pending
        up = max(j - backsteps, 0)
        rec['rejections'][j] += 1
        k, pending = up, up > min_backsteps or (up == 0 and start_pending)
        if max_iter is not None and rec['nfe'] + rem[up] > max_iter:
            return restart()
        eps = torch.from_numpy(nrm.standard_normal(shape))
        x = t[0] * eps if j == 0 else y + math.sqrt(t[up] ** 2 - t[j] ** 2) * eps

    def restart():
        nonlocal x, k, pending, L_prev
        rec['restarts'] += 1
        rec['nfe'], k, pending, L_prev = 0, 0, start_pending, 0.0
        x = t[0] * torch.from_numpy(nrm.standard_normal(shape))

    while k < N:
        u_p = uni.random() if pending else None
        churn = gamma > 0
        eps_c = torch.from_numpy(nrm.standard_normal(shape)) if churn else torch.zeros(shape, dtype=torch.float64)
        u_s = uni.random() if tested(k + 1) else None
        if pending:
            rec['tests'][k] += 1
            L = score(x, k)
            if not u_p < math.exp(L - th.M[k]):
                rec['nfe_discarded'] += cost[k]
                reject(x, k)
                continue
            L_prev, pending = L, False
        y = edm_step(net, x[None], torch.tensor(t[k], dtype=torch.float64), torch.tensor(t[k + 1], dtype=torch.float64),
                     t[k], t[k + 1], labels, lambda v: eps_c[None], gamma, 1.0,
                     second_order=solver == 'heun' and k < N - 1)[0]
        rec['nfe'] += cost[k]
        rec['nfe_total'] += cost[k]
        k += 1
        x = y
        if tested(k):
            rec['tests'][k] += 1
            L = score(y, k)
            if u_s < math.exp(L - L_prev - th.M2[k]):
                L_prev = L
            else:
                reject(y, k)
                continue
        if k < N and max_iter is not None and rec['nfe'] + rem[k] > max_iter:
            restart()
    return x, dict(seed=seed, **rec)

#----------------------------------------------------------------------------

def run(net, disc, latents, labels=None, seeds=None, **kw):
    with torch.no_grad():
        return R.diffrs_sampler(net, latents, labels, seeds, discriminator=disc, **kw)

def test_variance_recovered_with_gamma_one():
    """gamma = 1 (M = the warm-up maximum): the data's variance within 5%, where plain sampling gives s_m^2.

    backsteps = N re-noises a rejected sample to the top level, where the model's
    marginal N(0, s_m^2 + t_0^2) ~ N(0, t_0^2) is what the start test expects: DiffRS is
    then an exact sequence of rejection samplers (up to the warm-up's estimate of the maxima).
    """
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    lat = latents_for(4096, (1, 1, 1))
    res = run(net, disc, lat, num_steps=24, rej_percentile=1.0, backsteps=24)
    plain = edm_sampler(net, lat, num_steps=24).var().item()  # Heun's error: +3% at 24 steps, +9% at 18
    var = res.images.var().item()
    summary = R.summarize(res.records)
    print(f'variance: diffrs {var:.4f} (data {S_R ** 2}), plain {plain:.4f} (model {S_M ** 2}); '
          f'mean NFE {summary["mean_nfe"]:.1f} / {summary["mean_nfe_total"]:.1f}')
    assert abs(plain / S_M ** 2 - 1) < 0.05
    assert abs(var / S_R ** 2 - 1) < 0.05, var
    assert summary['mean_nfe_total'] > 47  # the rejections cost evaluations beyond one pass

def test_start_acceptance_closed_form():
    """The initial noise x_0 = t_0 eps is accepted with probability E min(1, exp(L_0(x_0) - M_0)).

    Per pixel L_0 is a quadratic in x_0, so with D pixels L_0 = c - a Q / 2,
    Q = |eps|^2 ~ chi^2_D, c = D/2 log(v_m / v_r), a = t_0^2 (1/v_r - 1/v_m),
    v = s^2 + t_0^2. For D = 4, P(Q > z) = exp(-z/2)(1 + z/2) and the rate is
    P(Q <= q) + e^{c - M_0} (1 + a)^{-2} P(Q > q (1 + a)) with q = 2 (c - M_0) / a.
    t_0 = 1 makes it far from 1; backsteps = 0 tests nothing else.
    """
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    res = run(net, disc, latents_for(4096, (1, 2, 2)), num_steps=4, sigma_max=1.0, rej_percentile=1.0, backsteps=0)
    tests = sum(r['tests'][0] for r in res.records)
    rate = 1 - sum(r['rejections'][0] for r in res.records) / tests
    D, t0, M0 = 4, 1.0, res.thresholds.M[0]
    v_r, v_m = S_R ** 2 + t0 ** 2, S_M ** 2 + t0 ** 2
    c, a = D / 2 * math.log(v_m / v_r), t0 ** 2 * (1 / v_r - 1 / v_m)
    tail = lambda z: math.exp(-z / 2) * (1 + z / 2)
    q = 2 * (c - M0) / a
    closed = 1 - tail(q) + math.exp(c - M0) * (1 + a) ** -2 * tail(q * (1 + a))
    print(f'start acceptance {rate:.4f} over {tests} tests, closed form {closed:.4f} (M_0 = {M0:.4f}, sup L_0 = {c:.4f})')
    assert 0 <= c - M0 < 0.05  # the warm-up maximum is close to the supremum
    # Binomial standard error sqrt(p (1 - p) / tests) ~ 0.006: four of them.
    assert abs(rate - closed) < 4 * math.sqrt(closed * (1 - closed) / tests), (rate, closed)
    assert all(r['tests'][1:] == [0] * 4 for r in res.records)

SETTINGS = {
    'heun': dict(num_steps=8, solver='heun', backsteps=1, rej_percentile=0.8),
    'euler-churn-budget': dict(num_steps=8, solver='euler', backsteps=2, min_backsteps=1, max_backsteps=7,
                               S_churn=4.0, max_iter=10, rej_percentile=0.8),
}

@pytest.mark.parametrize('name', list(SETTINGS))
def test_equals_the_sample_by_sample_reference(name):
    """Batch 3 (slots refilled from the queue) = one seed at a time, written from the algorithm."""
    kw = dict(SETTINGS[name])
    net, disc = LabelShift(S_M), LabelDisc(S_R, S_M)
    seeds = [5, 17, 2 ** 32 + 3, 40, 41, 42, 43]
    lat, lab = latents_for(len(seeds), (1, 2, 2), seed=3), one_hot(len(seeds))
    res = run(net, disc, lat, lab, seeds, iter_warmup=1, batch=3, **kw)
    kw.pop('rej_percentile')
    for i, s in enumerate(seeds):
        image, rec = reference(net, disc, lat[i], lab[i], s, res.thresholds, **kw)
        assert res.records[i] == rec, (s, res.records[i], rec)
        # Same operations on rows of a batch and on single rows: float64 rounding at most.
        assert (res.images[i] - image).abs().max() <= 1e-12 * image.abs().max()
    total = R.summarize(res.records)
    assert sum(sum(r['rejections']) for r in res.records) > 0
    if 'max_iter' in kw:
        assert total['restarts'] > 0
        assert all(r['nfe'] <= kw['max_iter'] for r in res.records)

def test_image_of_a_seed_depends_only_on_the_seed():
    """Batch 1 and batch 3, seeds in another order: the same image and record per seed (same machine)."""
    net, disc = LabelShift(S_M), LabelDisc(S_R, S_M)
    seeds = [11, 12, 13, 14, 15]
    lat, lab = latents_for(5, (1, 2, 2), seed=4), one_hot(5, seed=2)
    kw = dict(num_steps=8, rej_percentile=0.9, iter_warmup=1, S_churn=1.0, max_iter=45)
    th = run(net, disc, lat[:1], lab[:1], seeds[:1], **kw).thresholds
    one = run(net, disc, lat, lab, seeds, thresholds=th, batch=1, **kw)
    order = [3, 0, 4, 2, 1]
    three = run(net, disc, lat[order], lab[order], [seeds[i] for i in order], thresholds=th, batch=3, **kw)
    for j, i in enumerate(order):
        assert three.records[j] == one.records[i]
        assert (three.images[j] - one.images[i]).abs().max() <= 1e-12 * one.images[i].abs().max()

def test_warmup_does_not_depend_on_its_batch():
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    rs = R.DiffRS(net, disc, num_steps=5, rej_percentile=0.7)
    a = rs.warmup(1, device='cpu', shape=[1, 2, 2], batch=100)
    b = rs.warmup(1, device='cpu', shape=[1, 2, 2], batch=7)
    # Thresholds may be 0 (max(0, quantile)): the absolute part of the bound is relative to their scale.
    close = lambda x, y: np.allclose(x, y, rtol=1e-6, atol=1e-7 * max(np.abs(np.asarray(y, dtype=float)).max(), 1e-30))
    assert close(a.M, b.M) and close(a.M2, b.M2)
    assert len(a.log_ratio[0]) == R.WARMUP_BATCH
    assert max(a.M) > 0 and max(a.M2) > 0

def test_saved_thresholds_give_the_same_images(tmp_path):
    net, disc = LabelShift(S_M), LabelDisc(S_R, S_M)
    lat, lab = latents_for(4, (1, 2, 2), seed=5), one_hot(4, seed=3)
    kw = dict(num_steps=6, rej_percentile=0.75, iter_warmup=1, batch=2, max_iter=33)
    first = run(net, disc, lat, lab, **kw)
    path = first.thresholds.save(str(tmp_path / R.THRESHOLDS_NAME))
    with open(path) as f:
        d = json.load(f)
    assert d['schedule'] == edm_schedule(net, 6)[1] and d['discriminator'] == R.discriminator_fingerprint(disc)
    assert d['M'] == first.thresholds.M and d['rej_percentile'] == 0.75
    again = run(net, disc, lat, lab, thresholds=path, **kw)
    assert torch.equal(again.images, first.images) and again.records == first.records
    # Another rej_percentile recomputes M, M2 from the stored warm-up values.
    other = run(net, disc, lat, lab, thresholds=path, **dict(kw, rej_percentile=1.0))
    assert other.thresholds.M == R.Thresholds.load(path).at(1.0).M != first.thresholds.M

def test_outdir_keeps_the_thresholds_of_its_run(tmp_path):
    """Warm-up once, reuse on resume, copy a given file, refuse a file of other settings."""
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    rs = R.DiffRS(net, disc, num_steps=5, rej_percentile=0.6)
    first = rs.outdir_thresholds(str(tmp_path / 'a'), iter_warmup=1, device='cpu', batch=50)
    path = tmp_path / 'a' / R.THRESHOLDS_NAME
    assert R.Thresholds.load(str(path)).to_dict() == first.to_dict()
    again = rs.outdir_thresholds(str(tmp_path / 'a'), iter_warmup=99, device='cpu')  # resumed: no new warm-up
    assert again.to_dict() == first.to_dict()
    copied = rs.outdir_thresholds(str(tmp_path / 'b'), str(path), device='cpu')
    assert copied.to_dict() == first.to_dict() and (tmp_path / 'b' / R.THRESHOLDS_NAME).is_file()
    with pytest.raises(ValueError, match='--rej_percentile=0.9'):
        R.DiffRS(net, disc, num_steps=5, rej_percentile=0.9).outdir_thresholds(str(tmp_path / 'a'), device='cpu')
    with pytest.raises(ValueError, match='another schedule'):
        R.DiffRS(net, disc, num_steps=6).outdir_thresholds(str(tmp_path / 'a'), device='cpu')

def test_max_iter_bounds_every_seeds_nfe():
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    res = run(net, disc, latents_for(64, (1, 2, 2), seed=6), num_steps=8, rej_percentile=1.0, iter_warmup=1,
              max_iter=17, batch=16)
    assert all(r['nfe'] <= 17 for r in res.records)
    assert sum(r['restarts'] for r in res.records) > 0
    assert all(r['nfe_total'] >= r['nfe'] for r in res.records)

def test_without_rejections_it_is_the_base_sampler():
    """A discriminator sure that everything is real (L = log(1/D_CLIP - 1) >= M): EDM's images."""
    net = LabelShift(S_M)
    sure = lambda x_vp, tau, labels=None: torch.ones(x_vp.shape[0])
    lat, lab = latents_for(5, (1, 2, 2), seed=7), one_hot(5)
    for solver in ('heun', 'euler'):
        res = run(net, sure, lat, lab, num_steps=7, solver=solver, rej_percentile=0.5, iter_warmup=1, batch=2)
        plain = edm_sampler(net, lat, lab, num_steps=7, solver=solver)
        assert (res.images - plain).abs().max() <= 1e-12 * plain.abs().max()
        assert all(r['nfe'] == (13 if solver == 'heun' else 7) and sum(r['rejections']) == 0 for r in res.records)

def test_guided_transition_window_is_per_sample():
    """A DG-guided transition whose window cuts the schedule: slots at levels on both sides of it in one
    batch get the guidance of their own level, so batch 1 = batch 4."""
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    den = DGDenoiser(net, disc, 1.0, time_min=0.05, time_max=0.6)
    lat = latents_for(6, (1, 2, 2), seed=8)
    kw = dict(num_steps=8, rej_percentile=0.9, iter_warmup=1, max_iter=45)
    th = run(den, disc, lat[:1], **kw).thresholds
    one = run(den, disc, lat, thresholds=th, batch=1, **kw)
    four = run(den, disc, lat, thresholds=th, batch=4, **kw)
    assert one.records == four.records
    assert (one.images - four.images).abs().max() <= 1e-12 * one.images.abs().max()
    plain = run(net, disc, lat, thresholds=th, **kw)
    assert (plain.images - one.images).abs().max() > 1e-3  # guidance acted

def test_networks_through_the_generate_loop_entry():
    """A conditional EDM net, DG-guided, with an ADM discriminator's conditional head, seeds drawn as
    generate does: each seed's record and image are the same in 1 slot and in 3."""
    net = tiny_edm(label_dim=10).requires_grad_(False)
    disc = tiny_discriminator(tiny_classifier(), cond=True).requires_grad_(False)
    den = DGDenoiser(net, disc, 1.0)
    rs = R.DiffRS(den, disc, num_steps=4, rej_percentile=0.5, S_churn=1.0, max_iter=21)
    th = R.Thresholds(rs.t, rs.fingerprint, 0.5, [[0.2]] * 5, [[0.2]] * 5)  # M = M2 = 0.2, without a warm-up
    seeds = [3, 1, 4, 1 + 2 ** 32, 5]
    draw = lambda pos: draw_inputs([3, 16, 16], 10, [seeds[p] for p in pos], 'cpu')[:2]
    out = {}
    for batch in (1, 3):
        got = [(p, im, lab, rec) for ps, ims, labs, recs in rs.generate(seeds, draw, th, batch=batch, device='cpu')
               for p, im, lab, rec in zip(ps, ims, labs, recs)]
        out[batch] = {p: (im, lab, rec) for p, im, lab, rec in got}
        assert sorted(out[batch]) == list(range(len(seeds)))
    for p in range(len(seeds)):
        (a, la, ra), (b, lb, rb) = out[1][p], out[3][p]
        assert ra == rb and torch.equal(la, lb)
        # float32 convolutions over batches of 1 and of 3 sum in other orders (docs/compat.md §2.1).
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert torch.equal(out[1][3][1], draw([3])[1][0])  # the label is the seed's own
    assert sum(sum(r['rejections']) for _, _, r in out[1].values()) > 0

#----------------------------------------------------------------------------
# Bad inputs: one-line ValueErrors that name the option.

@pytest.mark.parametrize('kw,needle', [
    (dict(rej_percentile=-0.1), '--rej_percentile'),
    (dict(rej_percentile=1.5), '--rej_percentile'),
    (dict(max_iter=14), '--max_iter'),        # one heun pass of 8 steps is 15 evaluations
    (dict(backsteps=-1), '--backsteps'),
    (dict(solver='dpmpp2m'), '--solver'),
])
def test_bad_settings_are_one_line_errors(kw, needle):
    with pytest.raises(ValueError) as e:
        R.DiffRS(GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M), num_steps=8, **kw)
    assert needle in str(e.value) and '\n' not in str(e.value)

def test_warmup_needs_a_batch():
    rs = R.DiffRS(GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M), num_steps=4)
    with pytest.raises(ValueError, match='--iter_warmup=0'):
        rs.warmup(0, device='cpu')

def test_thresholds_of_another_schedule_or_discriminator_are_refused(tmp_path):
    net, disc = GaussianDenoiser(S_M), GaussianRatioDiscriminator(S_R, S_M)
    lat = latents_for(2, (1, 2, 2))
    path = run(net, disc, lat, num_steps=6, iter_warmup=1).thresholds.save(str(tmp_path / 't.json'))
    for kw, needle in ((dict(num_steps=7), 'another schedule'), (dict(num_steps=6, sigma_max=40), 'another schedule'),
                       (dict(num_steps=6, fingerprint='sha256:other'), 'another discriminator')):
        with pytest.raises(ValueError) as e:
            run(net, disc, lat, thresholds=path, **kw)
        assert needle in str(e.value) and '--rej_thresholds=' in str(e.value) and '\n' not in str(e.value)
    (tmp_path / 'bad.json').write_text('{"M": [0]}')
    with pytest.raises(ValueError, match='not a DiffRS thresholds file'):
        run(net, disc, lat, thresholds=str(tmp_path / 'bad.json'), num_steps=6)

def test_fingerprint_names_the_weights():
    a, b = GaussianRatioDiscriminator(), GaussianRatioDiscriminator()
    lin = torch.nn.Linear(2, 1)
    fp = R.discriminator_fingerprint(lin)
    assert fp.startswith('sha256:') and fp == R.discriminator_fingerprint(lin)
    with torch.no_grad():
        lin.weight[0, 0] += 1
    assert R.discriminator_fingerprint(lin) != fp
    assert R.discriminator_fingerprint(a) == R.discriminator_fingerprint(b)  # no weights: the class names it
    assert R.discriminator_fingerprint(a) != R.discriminator_fingerprint(LabelDisc())

def test_transition_guided_by_a_second_network():
    """Autoguidance-style transitions (`D_g + w (D - D_g)` inside a sigma interval): the records count the guide
    only at the levels where it runs, equal to the evaluations made (one slot); w = 1 is the main net alone; the
    budget counts the guide too."""
    from edm_dg.sampling.guides import Guided
    net, guide, disc = GaussianDenoiser(S_M), GaussianDenoiser(0.8), GaussianRatioDiscriminator(S_R, S_M)
    lat = latents_for(5, (1, 2, 2), seed=9)
    kw = dict(num_steps=6, rej_percentile=0.9, iter_warmup=1)
    th = run(net, disc, lat[:1], **kw).thresholds
    g = Guided(net, guide, 2.0, sigma_lo=0.3, sigma_hi=5.0)
    t = edm_schedule(net, 6)[1]
    per_pass = sum((1 + (0.3 <= t[k] <= 5.0)) + (1 + (0.3 <= t[k + 1] <= 5.0)) * (t[k + 1] > 0) for k in range(6))
    assert 2 * 6 - 1 < per_pass < 2 * (2 * 6 - 1)  # the interval cuts the schedule
    res = run(g, disc, lat, thresholds=th, batch=1, max_iter=3 * per_pass, **kw)
    assert g.evaluations == sum(r['nfe_total'] + r['nfe_discarded'] for r in res.records)
    assert all(r['nfe'] <= 3 * per_pass for r in res.records)
    assert any(sum(r['rejections']) for r in res.records)  # rejections happened, so the counts are not one pass each
    plain = run(net, disc, lat, thresholds=th, batch=2, **kw)
    same = run(Guided(net, guide, 1.0, sigma_lo=0.3, sigma_hi=5.0), disc, lat, thresholds=th, batch=2, **kw)
    assert torch.equal(same.images, plain.images) and same.records == plain.records
    assert (res.images - plain.images).abs().max() > 1e-3  # the guide acted
    with pytest.raises(ValueError, match='below one pass'):
        run(g, disc, lat, thresholds=th, max_iter=per_pass - 1, **kw)
