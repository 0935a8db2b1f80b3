"""edm_dg.sampling as a family: every solver over an arbitrary denoiser chain, one hook path, one score function.

The toy problem is the Gaussian one of test_solvers.py (an exact denoiser);
the discriminators are analytic, so scores and gradients have closed forms.
"""

import math

import pytest
import torch

from edm_dg import vp
from edm_dg.sampling import SAMPLERS, Boosting, Denoiser, Hook, SampleState, edm_schedule, log_ratio, nfe, nfe_of, sample
from edm_dg.sampling.score import dg_correction, in_window, window_mask, window_on_host
from helpers import GaussianDenoiser

NAMES = ['heun', 'euler', 'dpmpp2m', 'restart']
STEPS = 6
RESTART = '3,1,0.3,1.5'

class CountingNet(GaussianDenoiser):
    """A plain EDM-style network (no `step` keyword, no `nfe`) that counts its calls."""

    def __init__(self):
        super().__init__(0.5)
        self.calls = 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return super().forward(x, sigma, class_labels)

class TwoCallMean(Denoiser):
    """An arbitrary wrapper that costs two network evaluations per call (the mean of two calls);
    records the host-side facts the solver passes and the sigma it actually calls with."""

    def __init__(self, net):
        super().__init__(net)
        self.steps, self.sigmas = [], []

    nfe = property(lambda self: 2 * nfe_of(self.net))

    def forward(self, x, sigma, class_labels=None, *, step=None):
        self.steps.append(step)
        self.sigmas.append(torch.as_tensor(sigma).reshape(-1).tolist())
        return 0.5 * (self.inner(x, sigma, class_labels) + self.inner(x, sigma, class_labels))

def latents(n=3, seed=0):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

def fixed_randn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float64)

def solver_kwargs(name):
    return dict(S_churn=3.0) if name in ('heun', 'euler') else dict(restart=RESTART) if name == 'restart' else {}

#----------------------------------------------------------------------------
# Denoiser chains and evaluation counts.

@pytest.mark.parametrize('name', NAMES)
def test_every_solver_counts_the_evaluations_of_the_chain(name):
    net = CountingNet()
    den = TwoCallMean(net)
    kw = solver_kwargs(name)
    with torch.no_grad():
        out = SAMPLERS[name](den, latents(), None, fixed_randn(1), num_steps=STEPS, **kw)
    assert torch.isfinite(out).all()
    assert net.calls == 2 * len(den.steps) == nfe(name, STEPS, den, **kw)
    assert nfe(name, STEPS, net, **kw) == nfe(name, STEPS, **kw) == len(den.steps)
    # The host-side facts match the call: Heun's corrections are order 2, and the host sigma is the sigma used.
    orders = [s.order for s in den.steps]
    assert orders.count(2) == {'heun': STEPS - 1, 'euler': 0, 'dpmpp2m': 0}.get(name, orders.count(2))
    assert orders.count(1) == (STEPS if name != 'restart' else len(orders) - orders.count(2))
    for step, used in zip(den.steps, den.sigmas):
        assert all(any(math.isclose(u, h, rel_tol=1e-12) for h in step.sigma) for u in used), (step, used)
    assert [s.index for s in den.steps if s.order == 1][:1] == [0]

def test_a_plain_callable_is_a_denoiser_too():
    """Nothing in a solver needs more than EDM's call signature and attributes."""
    net = CountingNet()
    for name in NAMES:
        net.calls = 0
        with torch.no_grad():
            SAMPLERS[name](net, latents(), None, fixed_randn(1), num_steps=STEPS, **solver_kwargs(name))
        assert net.calls == nfe(name, STEPS, **solver_kwargs(name)), name

#----------------------------------------------------------------------------
# One hook path.

def bright_disc(x_vp, tau, labels=None):
    """log(d / (1 - d)) = 2 mean(x_vp) + 0.1 * class: a score that depends on the rows and the labels."""
    cls = 0 if labels is None else labels.argmax(1).to(x_vp.dtype)
    return torch.sigmoid(2 * x_vp.flatten(1).mean(dim=1) + 0.1 * cls)

class Recorder(Hook):
    """An after_step hook that reorders the rows once (after step 0) and checks the shared state follows."""

    events = ('after_step',)

    def __init__(self, labels, perm):
        self.labels, self.perm, self.order, self.seen = labels, perm, torch.arange(len(perm)), []

    def after_step(self, i, x, sigma, state):
        self.seen.append((i, sigma, sorted(state)))
        assert torch.equal(state['disc_labels'], self.labels[self.order])  # the driver reordered the state
        assert state['log_ratio'].shape == (x.shape[0],)
        if i == 0:
            self.order = self.order[self.perm]
            return self.perm
        return None

def test_a_hook_sees_the_same_states_in_every_solver():
    labels = torch.nn.functional.one_hot(torch.tensor([0, 3, 5, 9]), 10).float()
    perm = torch.tensor([2, 0, 3, 1])
    seen = {}
    for name in NAMES:
        rec = Recorder(labels, perm)
        sample(CountingNet(), latents(4), None, fixed_randn(2), sampler=name, num_steps=STEPS, discriminator=bright_disc,
               dg_weight_1st_order=0.5, time_min=0.0, disc_labels=labels, hooks=[rec], **solver_kwargs(name))
        seen[name] = rec.seen
    t_host = edm_schedule(CountingNet(), STEPS)[1]
    assert seen['heun'] == [(i, t_host[i + 1], ['disc_labels', 'log_ratio']) for i in range(STEPS - 1)]
    for name in NAMES:
        assert seen[name] == seen['heun'], name

class ChurnRecorder(Hook):
    """A churn hook: no churn for row 0; records the steps it was asked about."""

    events = ('churn',)
    option = '--churn_probe'

    def __init__(self):
        self.steps = []

    def churn(self, i, num_steps, x, gamma, S_noise, state):
        self.steps.append(i)
        keep = torch.ones(x.shape[0], dtype=torch.float64)
        keep[0] = 0
        return gamma * keep, S_noise, [1, 1 + gamma]

@pytest.mark.parametrize('name', ['heun', 'euler'])
def test_churn_hook_acts_per_sample_inside_the_churn_window(name):
    lat = latents(3)
    kw = dict(num_steps=STEPS, S_churn=5.0, S_min=0.1, S_max=10.0)
    hook = ChurnRecorder()
    with torch.no_grad():
        hooked = SAMPLERS[name](CountingNet(), lat, None, lambda x: torch.ones_like(x), hooks=[hook], **kw)
        plain = SAMPLERS[name](CountingNet(), lat, None, lambda x: torch.ones_like(x), **dict(kw, S_churn=0.0))
        churned = SAMPLERS[name](CountingNet(), lat, None, lambda x: torch.ones_like(x), **kw)
    t_host = edm_schedule(CountingNet(), STEPS)[1]
    assert hook.steps == [i for i in range(STEPS) if 0.1 <= t_host[i] <= 10.0]
    assert torch.equal(hooked[0], plain[0])  # row 0 had no churn
    assert torch.equal(hooked[1:], churned[1:])  # the others the solver's own

@pytest.mark.parametrize('name', ['dpmpp2m', 'restart'])
def test_solvers_without_churn_refuse_a_churn_hook_in_one_line(name):
    with pytest.raises(ValueError, match='--churn_probe') as e:
        SAMPLERS[name](CountingNet(), latents(), None, fixed_randn(0), num_steps=STEPS, hooks=[ChurnRecorder()])
    assert '\n' not in str(e.value)
    with pytest.raises(ValueError, match='--boosting') as e:
        sample(CountingNet(), latents(), None, fixed_randn(0), sampler=name, num_steps=STEPS, discriminator=bright_disc,
               dg_weight_1st_order=1.0, boosting=True)
    assert '\n' not in str(e.value)

def test_boosting_churns_the_samples_judged_fake():
    state = SampleState(log_ratio=torch.tensor([-1.0, 2.0, float('inf')]))
    boost = Boosting(S_churn=4.0, S_noise=1.5, period=3)
    x = torch.zeros(3, 1, 2, 2)
    gamma, noise, factors = boost.churn(3, 10, x, 0.1, 1.0, state)
    gamma_b = min(4.0 / 10, math.sqrt(2) - 1)
    # The per-sample gamma is formed in float32 (torch.where of two Python floats), as it always was:
    # within float32 rounding (2^-24 relative) of the exact values.
    want = torch.tensor([gamma_b, 0.1, 0.1], dtype=torch.float64)
    assert gamma.dtype == torch.float64 and ((gamma - want).abs() <= 2 ** -24 * want).all()
    assert noise.tolist() == [1.5, 1.0, 1.0]
    assert factors == [1.1, 1 + gamma_b]
    assert boost.churn(4, 10, x, 0.1, 1.0, state) == (0.1, 1.0, [1.1])
    gamma, _, _ = boost.churn(0, 10, x, 0.1, 1.0, SampleState())  # nothing scored yet: nobody is boosted
    assert ((gamma - 0.1).abs() <= 2 ** -24 * 0.1).all()

#----------------------------------------------------------------------------
# One score function and one window test.

def linear_disc(a):
    """d = sigmoid(a * sum(x_vp)): log(d / (1 - d)) = a sum(x_vp), gradient a everywhere."""
    return lambda x_vp, tau, labels=None: torch.sigmoid(a * x_vp.flatten(1).sum(dim=1))

def test_log_ratio_and_its_gradient_against_the_closed_form():
    x = latents(3, seed=4) * 0.2
    sigma = torch.tensor([0.05, 0.7, 3.0], dtype=torch.float64)
    mean = vp.sigma_to_vp(sigma)[0]
    want = 0.3 * mean * x.flatten(1).sum(dim=1)
    got = log_ratio(linear_disc(0.3), x, sigma)
    assert not got.requires_grad
    # float32 discriminator input and logarithm of a clipped sigmoid: a few float32 ulps of the logit scale.
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    score, grad = log_ratio(linear_disc(0.3), x, sigma, grad=True)
    assert torch.equal(score, got)  # the same computation with and without autograd
    assert (grad - 0.3).abs().max() <= 1e-4 * 0.3  # float32 derivative of log(sigmoid / (1 - sigmoid))
    corr, lr = dg_correction(linear_disc(0.3), x, sigma)
    assert torch.equal(lr, got)
    expected = -(sigma ** 2 * mean).reshape(-1, 1, 1, 1) * grad.double()
    assert (corr.double() - expected).abs().max() <= 1e-6 * expected.abs().max()

def test_window_test_agrees_on_host_and_device():
    sigmas = [0.01, 0.1, 0.5, 1.0, 5.0, 50.0]
    for s in sigmas:
        tau = float(vp.sigma_to_tau(torch.tensor(s, dtype=torch.float64)))
        for lo, hi in ((0.0, 1.0), (0.05, 0.3), (tau, tau), (tau + 1e-9, 1.0)):
            host = window_on_host([s], lo, hi)
            assert host == (lo <= tau <= hi) == bool(in_window(tau, lo, hi))
            assert bool(window_mask(torch.tensor([s, 80.0], dtype=torch.float64), lo, hi)) == host
