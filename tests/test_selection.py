"""Discriminator-based selection (edm_dg.sampling.selection): particle resampling and best-of-N, seed-exact.

The resampling tests use one-pixel data from the two-mode mixture
0.5 N(-1, s^2) + 0.5 N(+1, s^2), whose denoiser is exact:
D(x; sigma) = (s^2 x + sigma^2 tanh(x / (s^2 + sigma^2))) / (s^2 + sigma^2),
and a discriminator whose density ratio d / (1 - d) is 3 on the right half
(x > 0) and 1 on the left. After one multinomial resampling of K particles of
which n are on the right, each particle is on the right with probability
q(n) = 3n / (3n + (K - n)); the probability-flow ODE never moves a sample
across x = 0 (D(0) = 0 and 1-D trajectories do not cross), so the final
fraction on the right is known in law.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import generate_dg
from edm_dg import sampling as S
from edm_dg.sampling import selection as sel
from edm_dg import vp
from edm_dg.generate import draw_inputs
from edm_dg.guidance import dg_correction
from helpers import tiny_classifier, tiny_discriminator, tiny_edm

K = 8
SEEDS = list(range(2000))
STEPS = 12
RESAMPLE_AT = 8  # main step 8 ends at sigma = 0.065, where the modes (s = 0.1) are far apart

class MixtureDenoiser:
    """Exact denoiser of 0.5 N(-mu, s^2) + 0.5 N(mu, s^2) per pixel."""
    sigma_min, sigma_max = 0.002, 80.0
    img_resolution, img_channels, label_dim = 1, 1, 0

    def __init__(self, s=0.1, mu=1.0):
        self.s, self.mu = s, mu

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float64)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        v = self.s ** 2 + sigma ** 2
        return (self.s ** 2 * x + sigma ** 2 * self.mu * torch.tanh(self.mu * x / v)) / v

def right_three_to_one(x_vp, tau, labels=None):
    """d = 3/4 (ratio 3) right of 0, d = 1/2 (ratio 1) left of it."""
    return torch.where(x_vp.reshape(-1) > 0, 0.75, 0.5)

def all_chains(net, seeds, chains, steps, sampler, disc=right_three_to_one, **kw):
    """Final states of every chain [B*C] (seed-major) with resampling after `steps`."""
    latents, labels, rnd = draw_inputs([net.img_channels, net.img_resolution, net.img_resolution], net.label_dim, seeds, 'cpu')
    lat, lab, crnd = sel.chain_inputs(latents, labels, rnd, seeds, chains)
    hook = sel.Resampler(disc, lab, steps, chains, crnd) if steps else None
    return S.sample(net, lat, lab, crnd.randn_like, sampler=sampler, resample=hook, **kw)

def right_counts(x, chains):
    return (x.reshape(-1, chains) > 0).sum(dim=1).double()

def expected_after_one(n, chains=K):
    """(mean, variance) of the right fraction after one 3:1 resampling of seeds with n of `chains` on the right."""
    q = 3 * n / (3 * n + (chains - n))
    return q.mean().item(), (q * (1 - q) / chains).sum().item() / len(n) ** 2

#----------------------------------------------------------------------------

def test_log_ratio_is_the_guidance_log_ratio_without_autograd():
    disc = tiny_discriminator(tiny_classifier(res=16))
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 3.0], dtype=torch.float64)
    _, want = dg_correction(disc, x, sigma)
    got = sel.log_ratio(disc, x, sigma)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    seen = {}
    def probe(x_vp, tau, labels):
        seen.update(x_vp=x_vp, tau=tau)
        return torch.full([x_vp.shape[0]], 0.8)
    lr = sel.log_ratio(probe, x, 0.5)
    mean, tau = vp.sigma_to_vp(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(seen['x_vp'], (mean * x).float())
    torch.testing.assert_close(seen['tau'], tau.expand(3))
    torch.testing.assert_close(lr, torch.full([3], math.log(4.0)))

def test_multinomial_rows_follows_the_weights():
    u = torch.from_numpy(np.random.default_rng(0).random((20000, 4)))
    idx = sel.multinomial_rows(torch.log(torch.tensor([[1.0, 2.0, 0.0, 5.0]])).expand(20000, 4), u)
    freq = torch.bincount(idx.reshape(-1), minlength=4).double() / idx.numel()
    torch.testing.assert_close(freq, torch.tensor([1, 2, 0, 5], dtype=torch.float64) / 8, atol=0.006, rtol=0)

@pytest.mark.parametrize('sampler', ['heun', 'dpmpp2m', 'restart'])
def test_resampling_moves_mass_to_the_preferred_mode(sampler):
    net = MixtureDenoiser()
    plain = all_chains(net, SEEDS, K, (), sampler, num_steps=STEPS)
    n = right_counts(plain, K)
    frac_plain = (n.sum() / plain.numel()).item()
    assert abs(frac_plain - 0.5) < 4 * math.sqrt(0.25 / plain.numel())  # ~0.016

    res = all_chains(net, SEEDS, K, [RESAMPLE_AT], sampler, num_steps=STEPS)
    frac = (right_counts(res, K).sum() / res.numel()).item()
    # Given each seed's n (the runs agree up to the resampling), the law is exact.
    mean, var = expected_after_one(n)
    assert abs(frac - mean) < 4 * math.sqrt(var), (frac, mean, math.sqrt(var))
    # Unconditionally, n ~ Binomial(8, 1/2): E = sum_n C(8,n) 2^-8 3n/(2n+8) = 0.7242 (0.75 as K grows).
    e_uncond = sum(math.comb(K, m) / 2 ** K * 3 * m / (2 * m + K) for m in range(K + 1))
    assert abs(e_uncond - 0.724231) < 1e-6
    assert abs(frac - e_uncond) < 0.03, frac

def test_second_resampling_uses_incremental_weights():
    """With a ratio that does not change along the ODE, a second resampling weights r(x_t)/r(x_prev) = 1: neutral."""
    net = MixtureDenoiser()
    once = all_chains(net, SEEDS, K, [RESAMPLE_AT], 'heun', num_steps=STEPS)
    twice = all_chains(net, SEEDS, K, [RESAMPLE_AT, RESAMPLE_AT + 1], 'heun', num_steps=STEPS)
    q1 = right_counts(once, K) / K  # the same first draw in both runs
    f1, f2 = q1.mean().item(), (right_counts(twice, K) / K).mean().item()
    sd = math.sqrt((q1 * (1 - q1) / K).sum().item()) / len(SEEDS)
    assert abs(f2 - f1) < 4 * sd, (f1, f2, sd)  # weights r(x_t) again would give ~0.85

#----------------------------------------------------------------------------

def mean_pixel_disc(x_vp, tau, labels=None):
    """Prefers brighter images: log(d / (1 - d)) = 5 mean(x_vp)."""
    return torch.sigmoid(5 * x_vp.flatten(1).mean(dim=1))

@pytest.fixture(scope='module')
def small_net():
    return tiny_edm(label_dim=10, res=8, channels=3, model_channels=8).requires_grad_(False)

def _plain_inputs(net, seeds):
    return draw_inputs([net.img_channels, net.img_resolution, net.img_resolution], net.label_dim, seeds, 'cpu')

SETTINGS = dict(sampler='heun', num_steps=4, S_churn=2.0)

def test_best_of_keeps_the_best_scoring_candidate(small_net):
    seeds, n = [3, 7, 11, 20], 3
    latents, labels, rnd = _plain_inputs(small_net, seeds)
    chosen, records = sel.sample_selected(small_net, latents, labels, rnd, seeds, chains=n, best=True,
                                          discriminator=mean_pixel_disc, **SETTINGS)
    # The N candidates generated directly.
    latents, labels, rnd = _plain_inputs(small_net, seeds)
    lat, lab, crnd = sel.chain_inputs(latents, labels, rnd, seeds, n)
    cands = S.sample(small_net, lat, lab, crnd.randn_like, **SETTINGS).reshape(len(seeds), n, 3, 8, 8)
    pick = cands.flatten(2).mean(dim=2).argmax(dim=1)
    assert len(set(pick.tolist())) > 1  # a real choice in this draw
    assert torch.equal(chosen, cands[torch.arange(len(seeds)), pick])
    mean_min = vp.sigma_to_vp(torch.tensor(0.002, dtype=torch.float64))[0].item()
    for k, rec in enumerate(records):
        assert (rec['seed'], rec['chosen']) == (seeds[k], pick[k].item())
        want = 5 * mean_min * cands[k].flatten(1).mean(dim=1)
        np.testing.assert_allclose(rec['candidates'], want.numpy(), rtol=1e-4, atol=1e-5)
        assert rec['log_ratio'] == max(rec['candidates'])
    assert (labels.argmax(1) == lab.reshape(len(seeds), n, -1)[:, 1].argmax(1)).all()  # chains share the class

def test_one_chain_and_chain_zero_are_the_plain_image(small_net):
    seeds = [5, 6]
    latents, labels, rnd = _plain_inputs(small_net, seeds)
    plain = S.sample(small_net, latents, labels, rnd.randn_like, **SETTINGS)
    for kw in (dict(chains=1, best=True), dict(chains=1, resample_steps=[1]), dict(chains=3)):
        latents, labels, rnd = _plain_inputs(small_net, seeds)
        got, _ = sel.sample_selected(small_net, latents, labels, rnd, seeds, discriminator=mean_pixel_disc, **kw, **SETTINGS)
        assert torch.equal(got, plain), kw

def test_selection_is_seed_exact_for_any_batch(small_net):
    seeds = list(range(5))
    opts = dict(chains=3, resample_steps=[0, 2], best=True, discriminator=mean_pixel_disc, **SETTINGS)
    whole, rec_whole = sel.sample_selected(small_net, *_plain_inputs(small_net, seeds), seeds, **opts)
    parts, rec_parts = [], []
    for batch in ([0], [1, 2, 3], [4]):
        img, rec = sel.sample_selected(small_net, *_plain_inputs(small_net, batch), batch, **opts)
        parts.append(img)
        rec_parts += rec
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-6)
    for a, b in zip(rec_whole, rec_parts):
        assert (a['seed'], a['chosen'], a['ancestor']) == (b['seed'], b['chosen'], b['ancestor'])
        np.testing.assert_allclose(a['candidates'], b['candidates'], rtol=1e-5, atol=1e-6)

#----------------------------------------------------------------------------
# Through generate_dg.

def _pngs(folder, seeds):
    return np.stack([np.array(Image.open(os.path.join(folder, f'{s:06d}.png'))) for s in seeds])

def _records(folder):
    with open(os.path.join(folder, sel.RECORD_NAME)) as f:
        return [json.loads(line) for line in f]

def test_generate_dg_selection_is_seed_exact_and_recorded(tiny_files, tmp_path):
    common = dict(disc_path=tiny_files['disc'], classifier_path=tiny_files['classifier'], device='cpu', num_steps=4,
                  S_churn=3.0, dg_weight_1st_order=0.0, particles=2, resample_steps='1', best_of=2, log=lambda *a: None)
    for batch in (1, 3):
        generate_dg.run(tiny_files['net'], str(tmp_path / f'b{batch}'), '0-2', max_batch_size=batch, **common)
    assert np.array_equal(_pngs(tmp_path / 'b1', range(3)), _pngs(tmp_path / 'b3', range(3)))
    r1, r3 = _records(tmp_path / 'b1'), _records(tmp_path / 'b3')
    assert [r['seed'] for r in r1] == [0, 1, 2] and [r['image'] for r in r1] == ['000000.png', '000001.png', '000002.png']
    for a, b in zip(r1, r3):
        assert (a['chosen'], a['ancestor']) == (b['chosen'], b['ancestor'])
        assert len(a['candidates']) == 2 and a['log_ratio'] == max(a['candidates'])
        np.testing.assert_allclose(a['candidates'], b['candidates'], rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(tmp_path / 'b1')) == ['000000.png', '000001.png', '000002.png', 'dataset.json', 'selection.jsonl']

def test_records_merge_over_ranks_and_runs(tmp_path):
    out = str(tmp_path)
    with open(os.path.join(out, sel.RECORD_NAME), 'w') as f:
        f.write(json.dumps(dict(seed=4, chosen=0)) + '\n' + json.dumps(dict(seed=1, chosen=0)) + '\n')
    sel.append_records(out, 0, [dict(seed=1, chosen=1), dict(seed=0, chosen=2)])
    sel.append_records(out, 3, [dict(seed=2, chosen=1)])
    with open(os.path.join(out, 'selection-rank3.partial.jsonl'), 'a') as f:
        f.write('{"seed": 9, "cho')  # a write cut short by a kill
    sel.merge_records(out)
    assert [(r['seed'], r['chosen']) for r in _records(out)] == [(0, 2), (1, 1), (2, 1), (4, 0)]
    assert os.listdir(out) == [sel.RECORD_NAME]

@pytest.mark.parametrize('opts,needle', [
    (dict(particles=2, resample_steps='1'), '--particles'),
    (dict(best_of=3), '--best_of'),
])
def test_selection_needs_a_discriminator(tmp_path, opts, needle):
    with pytest.raises(ValueError, match=needle):
        generate_dg.run('unused.pkl', str(tmp_path), '0', device='cpu', **opts)

@pytest.mark.parametrize('opts,needle', [
    (dict(resample_steps='1'), '--resample_steps'),
    (dict(particles=2), '--resample_steps'),
    (dict(particles=2, resample_steps='1', best_of=3), '--best_of'),
    (dict(particles=2, resample_steps='3'), '--resample_steps'),  # 4 steps: 0..2
    (dict(particles=2, resample_steps='x'), '--resample_steps'),
])
def test_selection_option_errors_name_the_option(tiny_files, tmp_path, opts, needle):
    with pytest.raises(ValueError, match=needle):
        generate_dg.run(tiny_files['net'], str(tmp_path), '0', disc_path=tiny_files['disc'], device='cpu',
                        classifier_path=tiny_files['classifier'], num_steps=4, log=lambda *a: None, **opts)

def test_help_lists_the_selection_options():
    text = CliRunner().invoke(generate_dg.main, ['--help'], terminal_width=200).output
    for name in ('--particles', '--resample_steps', '--best_of', 'SeedSequence'):
        assert name in text, name

#----------------------------------------------------------------------------
# The hook in every sampler.

class ClassMeanDenoiser:
    """Exact denoiser of data N((c - 4.5)/10, s^2) per pixel, c the sample's class: per sample and label dependent."""
    sigma_min, sigma_max = 0.002, 80.0
    img_resolution, img_channels, label_dim = 4, 1, 10

    def __init__(self, s=0.5):
        self.s = s

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float64)

    def __call__(self, x, sigma, class_labels):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        c = (class_labels.argmax(dim=1).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))) - 4.5) / 10
        return (self.s ** 2 * x + sigma ** 2 * c) / (self.s ** 2 + sigma ** 2)

@pytest.mark.parametrize('sampler', ['heun', 'euler', 'dpmpp2m', 'restart'])
def test_hook_reorders_every_per_sample_state(sampler):
    """Without noise every sampler is a per-sample map, so reordering the rows after a step reorders the output;
    a state left in place (labels, DPM-Solver's previous output, boosting's log_ratio) would break that."""
    net, n = ClassMeanDenoiser(), 4
    latents = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 5, 9]), 10).float()
    kw = dict(sampler=sampler, num_steps=5, discriminator=mean_pixel_disc, dg_weight_1st_order=0.5)
    if sampler in ('heun', 'euler'):  # boost every step the samples with log_ratio < 0 (the darker ones)
        kw.update(boosting=True, boost_period=1, boost_weight_period=1)
    calls = []
    order = torch.tensor([1, 2, 3, 0])
    def shift_after_first(i, x, sigma):
        calls.append((i, sigma))
        return order if i == 0 else None
    plain = S.sample(net, latents, labels, torch.zeros_like, **kw)
    hooked = S.sample(net, latents, labels, torch.zeros_like, resample=shift_after_first, **kw)
    torch.testing.assert_close(hooked, plain[order], rtol=0, atol=1e-9)
    t_host = S.edm_schedule(net, 5)[1]
    assert calls == [(i, t_host[i + 1]) for i in range(4)]
