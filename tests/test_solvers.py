"""The solvers of edm_dg.sampling: EDM's Heun/Euler (dg_sampler) against the release's sampler (fixtures) and
EDM's sampler (Algorithm 2 of the paper); every solver on a Gaussian toy problem with an analytic denoiser.

Data N(0, s^2) per pixel has the denoiser D(x; sigma) = s^2 / (s^2 + sigma^2) x
and a linear PF-ODE, x(sigma) proportional to sqrt(s^2 + sigma^2), so every
sampler has an exact answer to converge to.
"""

import math
import numpy as np
import pytest
import torch

from edm_dg import sampling as S
from edm_dg import vp
from edm_dg.discriminator import Discriminator
from edm_dg.guidance import dg_correction
from edm_dg.sampling import dg_sampler
from helpers import GaussianDenoiser, assert_close_to_fixture, edm_sampler_spec, fixture_randn, fixture_tol, float32_layers

def _disc_layers(ref_nets, cond):
    return float32_layers(ref_nets['classifier'], ref_nets['head_cond' if cond else 'head_uncond'])

def sampler_layers(ref_nets, steps, guided, cond=False):
    """(depth, fan_in) of a Heun run for fixture_tol: per step two evaluations of the network and, guided,
    the discriminator's gradient (forward and backward)."""
    (net_depth, net_fan), (disc_depth, disc_fan) = float32_layers(ref_nets['net']), _disc_layers(ref_nets, cond)
    return steps * (2 * net_depth + (2 * disc_depth if guided else 0)), max(net_fan, disc_fan if guided else 0)

def test_correction_matches_release(ref, ref_nets):
    g = ref['dg_correction_uncond']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    corr, log_ratio = dg_correction(disc, g['x'], g['sigma'])
    depth, fan_in = _disc_layers(ref_nets, False)
    assert_close_to_fixture(corr, g['discriminator_guidance'], 2 * depth, fan_in)  # a gradient: forward and backward
    assert_close_to_fixture(log_ratio, g['log_ratio'], depth, fan_in)

@pytest.mark.parametrize('run', ['edm_plain', 'edm_churn', 'dg_uncond_w2', 'dg_uncond_window', 'dg_cond_boost'])
def test_sampler_matches_release(ref, ref_nets, run):
    s = ref['sampler']
    r = s['runs'][run]
    p = r['params']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_cond' if p['cond'] else 'head_uncond'])
    img = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(p['noise_seed']),
                     num_steps=p['steps'], S_churn=p['S_churn'], discriminator=disc,
                     dg_weight_1st_order=p['w1'], dg_weight_2nd_order=p['w2'],
                     time_min=p['time_min'], time_max=p['time_max'],
                     disc_labels=s['net_class_labels'] if p['cond'] else None, boosting=bool(p['boosting']),
                     boost_S_churn=p['boosting_S_churn'], boost_period=p['boosting_period'],
                     boost_weight_period=p['boosting_weight_period'])
    assert img.dtype == torch.float64
    layers = sampler_layers(ref_nets, p['steps'], guided=p['w1'] != 0, cond=p['cond'])
    assert_close_to_fixture(img, r['images'], *layers)
    # The bound tells the recorded settings apart: each other run lies outside it.
    bound = fixture_tol(*layers) * r['images'].abs().max()
    assert all((img - o['images']).abs().max() > bound for k, o in s['runs'].items() if k != run)

@pytest.mark.parametrize('S_churn', [0.0, 10.0])
def test_no_guidance_is_edm_exactly(ref, ref_nets, S_churn):
    s = ref['sampler']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    kw = dict(num_steps=8, S_churn=S_churn, S_min=0.05, S_max=50)
    with torch.no_grad():
        expected = edm_sampler_spec(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw)
        a = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw)
        b = dg_sampler(ref_nets['net'], s['latents'], s['net_class_labels'], fixture_randn(3), **kw,
                       discriminator=disc, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0, boosting=True)
    assert torch.equal(a, expected)
    assert torch.equal(b, expected)

def test_second_order_guidance_runs_and_acts(ref, ref_nets):
    """The release crashes for w2 != 0; here it is the same correction at (x_next, t_next)."""
    s = ref['sampler']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    base = dg_sampler(ref_nets['net'], s['latents'], None, fixture_randn(1), num_steps=6,
                      discriminator=disc, dg_weight_1st_order=1.0)
    both = dg_sampler(ref_nets['net'], s['latents'], None, fixture_randn(1), num_steps=6,
                      discriminator=disc, dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0)
    assert torch.isfinite(both).all()
    assert (both - base).abs().max() > 1e-6

def test_second_order_step_by_hand(ref, ref_nets):
    """Schedule 2.0 -> 0.5 -> 0 with w2 only: Heun's average uses the corrected d_prime; the last step lands on D."""
    s = ref['sampler']
    net = ref_nets['net']
    disc = Discriminator(ref_nets['classifier'], ref_nets['head_uncond'])
    x0 = s['latents'][:2]
    got = dg_sampler(net, x0, None, lambda x: torch.zeros_like(x), num_steps=2, sigma_min=0.5, sigma_max=2.0,
                     discriminator=disc, dg_weight_1st_order=0.0, dg_weight_2nd_order=1.5, time_min=0.0)
    t0, t1 = torch.tensor(2.0, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        x = x0.double() * t0
        d = (x - net(x, t0).double()) / t0
        x1 = x + (t1 - t0) * d
        d1 = (x1 - net(x1, t1).double()) / t1
    mean, tau = vp.sigma_to_vp(t1.expand(2))
    xv = (mean.reshape(-1, 1, 1, 1) * x1).float().requires_grad_(True)
    dd = disc(xv, tau).clip(1e-5, 1 - 1e-5)
    grad, = torch.autograd.grad(torch.log(dd / (1 - dd)).sum(), xv)
    d1 = d1 + 1.5 * (-(t1 ** 2 * mean.reshape(-1, 1, 1, 1)) * grad) / t1
    x2 = x + (t1 - t0) * (0.5 * d + 0.5 * d1)
    with torch.no_grad():
        expected = net(x2, t1).double()
    assert (got - expected).abs().max() < 1e-5
    assert (got - dg_sampler(net, x0, None, lambda x: torch.zeros_like(x), num_steps=2, sigma_min=0.5,
                             sigma_max=2.0)).abs().max() > 1e-4

def test_euler_and_heun_against_analytic_ode():
    """Gaussian data: x(sigma) = x(sigma_max) sqrt((s^2+sigma^2)/(s^2+sigma_max^2)); Euler converges at order 1, Heun at 2."""
    net = GaussianDenoiser()
    latents = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = latents * 80.0 * np.sqrt(0.25 / (0.25 + 80.0 ** 2))
    def err(solver, n):
        return (dg_sampler(net, latents, None, torch.randn_like, num_steps=n, solver=solver) - exact).abs().max().item()
    euler = err('euler', 32) / err('euler', 64)
    heun = err('heun', 32) / err('heun', 64)
    assert 1.6 < euler < 2.6, euler
    assert 3.2 < heun < 5.0, heun
    assert err('heun', 64) < err('euler', 64) / 5

def test_solver_name_checked(ref_nets):
    with pytest.raises(ValueError, match='solver'):
        dg_sampler(ref_nets['net'], torch.zeros(1, 3, 16, 16), solver='rk4')

#----------------------------------------------------------------------------
# Every solver on the Gaussian toy problem.

S_DATA = 0.5    # data standard deviation
S_MODEL = 1.0   # the "wrong" model's standard deviation (guided case)
NAMES = ['heun', 'euler', 'dpmpp2m', 'restart']
DETERMINISTIC = ['heun', 'euler', 'dpmpp2m']

class GaussDenoiser:
    """Exact denoiser for N(0, std^2) data; counts its evaluations."""
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, std):
        self.std = std
        self.calls = 0

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma, dtype=torch.float64)

    def scale(self, sigma, x):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, *([1] * (x.ndim - 1)))
        return self.std ** 2 / (self.std ** 2 + sigma ** 2)

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.scale(sigma, x) * x

class Guided:
    """D'(x; sigma) = D_m(x; sigma) - w corr with corr = -sigma^2 grad_x r(x; sigma).

    r = log N(x; 0, s^2 + sigma^2) - log N(x; 0, s_m^2 + sigma^2) is the
    Bayes-optimal log density ratio (what a perfect discriminator learns);
    with w = 1 the guided denoiser is the data's own denoiser.
    """
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, model, data_std, w=1.0):
        self.model, self.data_std, self.w = model, data_std, w

    def round_sigma(self, sigma):
        return self.model.round_sigma(sigma)

    def log_ratio(self, x, sigma):
        var_data = self.data_std ** 2 + sigma ** 2
        var_model = self.model.std ** 2 + sigma ** 2
        log_n = lambda v: -0.5 * x ** 2 / v - 0.5 * torch.log(2 * math.pi * v)
        return (log_n(var_data) - log_n(var_model)).flatten(1).sum(1)

    def __call__(self, x, sigma, class_labels=None):
        sigma_b = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.log_ratio(xg, sigma_b).sum(), xg)
        corr = -sigma_b ** 2 * grad
        return self.model(x, sigma, class_labels) - self.w * corr

class Mixing(GaussDenoiser):
    """Per-sample but not per-pixel (uses each image's mean) and label dependent."""

    def __call__(self, x, sigma, class_labels=None):
        out = super().__call__(x, sigma) + 0.05 * torch.tanh(x.mean(dim=(1, 2, 3), keepdim=True))
        if class_labels is not None:
            out = out + 0.01 * class_labels.argmax(1).to(x.dtype).reshape(-1, 1, 1, 1)
        return out

def seeded_randn(seeds):
    """Per-sample randn_like: sample i draws from its own generator (EDM's StackedRandomGenerator idea)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def randn_like(x):
        assert x.shape[0] == len(gens)
        return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
    return randn_like

def latents_for(seeds, shape=(1, 2, 2)):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds])

def fixed_randn(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)

def exact_factor(std, sigma_min=0.002, sigma_max=80.0):
    """x_out / latent of the exact flow from sigma_max to sigma_min followed by D(.; sigma_min).

    All samplers end with x = D(x; t_{N-1}) at t_{N-1} = sigma_min.
    """
    return sigma_max * std ** 2 / math.sqrt((std ** 2 + sigma_min ** 2) * (std ** 2 + sigma_max ** 2))

def run(name, net, latents, randn_like=None, **kw):
    randn_like = randn_like or fixed_randn(0)
    with torch.no_grad():
        return S.SAMPLERS[name](net, latents, None, randn_like, **kw)

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', DETERMINISTIC)
def test_deterministic_converges_to_exact_ode(name):
    lat = latents_for(range(8))
    target = lat * exact_factor(S_DATA)
    errs = {}
    for n in (8, 16, 64):
        out = run(name, GaussDenoiser(S_DATA), lat, num_steps=n)
        assert out.dtype == torch.float64
        errs[n] = ((out - target).abs().max() / target.abs().max()).item()
    assert errs[64] < errs[16] < errs[8], errs
    assert errs[64] < {'heun': 1e-2, 'dpmpp2m': 1e-2, 'euler': 0.06}[name], errs
    # Observed order: 4x the steps cuts the error about 16x (second order) or 4x (Euler).
    assert errs[16] / errs[64] > (3 if name == 'euler' else 10), errs

@pytest.mark.parametrize('name', NAMES)
def test_variance_matches_data(name):
    lat = latents_for([12345], shape=(4096, 1, 2, 2))[0]
    kw = dict(S_churn=10) if name == 'euler' else {}
    fine = 256 if name == 'euler' else 64  # first order needs more steps
    var = {n: run(name, GaussDenoiser(S_DATA), lat, randn_like=fixed_randn(7), num_steps=n, **kw).var().item()
           for n in (8, fine)}
    err = {n: abs(v / S_DATA ** 2 - 1) for n, v in var.items()}
    assert err[fine] < 0.05, var
    assert err[fine] < err[8], var

@pytest.mark.parametrize('name', NAMES)
def test_guidance_as_denoiser_transform_recovers_data(name):
    lat = latents_for([777], shape=(4096, 1, 2, 2))[0]
    steps = 256 if name == 'euler' else 48
    model = GaussDenoiser(S_MODEL)
    plain = run(name, model, lat, randn_like=fixed_randn(3), num_steps=steps).var().item()
    guided_net = Guided(model, S_DATA, w=1.0)
    guided = run(name, guided_net, lat, randn_like=fixed_randn(3), num_steps=steps).var().item()
    assert abs(plain / S_MODEL ** 2 - 1) < 0.05, plain
    assert abs(guided / S_DATA ** 2 - 1) < 0.05, guided
    # The guided net is the data's own denoiser: the same images up to rounding.
    exact = run(name, GaussDenoiser(S_DATA), lat, randn_like=fixed_randn(3), num_steps=steps)
    again = run(name, guided_net, lat, randn_like=fixed_randn(3), num_steps=steps)
    assert (again - exact).abs().max().item() < 1e-9

@pytest.mark.parametrize('name,kw', [
    ('heun', dict(S_churn=10, S_min=0.05, S_max=50)),
    ('euler', dict(S_churn=20)),
    ('dpmpp2m', {}),
    ('restart', dict(restart='3,2,0.06,0.30;2,1,1.0,3.0')),
    ('restart', dict(restart='2,3,0.2,0.5', restart_gamma=0.05, S_min=0.01, S_max=1)),
])
def test_images_depend_only_on_seed(name, kw):
    seeds = [5, 17, 2**32 + 3, 40, 41, 99]
    labels = torch.eye(10, dtype=torch.float64)[torch.tensor([3, 1, 4, 1, 5, 9])]
    net = Mixing(S_DATA)
    sample = lambda idx: S.SAMPLERS[name](net, latents_for([seeds[i] for i in idx], shape=(1, 3, 3)), labels[idx],
                                          seeded_randn([seeds[i] for i in idx]), num_steps=6, **kw)
    with torch.no_grad():
        together = sample(list(range(6)))
        singles = torch.cat([sample([i]) for i in range(6)])
        threes = torch.cat([sample([0, 1, 2]), sample([3, 4, 5])])
    assert torch.isfinite(together).all()
    assert torch.equal(singles, together)
    assert torch.equal(threes, together)

class NoSync(torch.Tensor):
    """Tensor that refuses to be read back to the host (a CPU proxy for a CUDA sync).

    Results of operations on it keep the type, so anything computed from the
    latents or the denoiser's outputs is guarded; the schedule is not.
    """
    def _refuse(self, *args, **kwargs):
        raise AssertionError('sampler read a data tensor back to the host')
    item = tolist = numpy = cpu = __bool__ = __float__ = __int__ = __index__ = _refuse

@pytest.mark.parametrize('name', NAMES)
def test_no_host_sync_in_step_loop(name):
    lat = latents_for([1, 2]).as_subclass(NoSync)
    kw = dict(S_churn=5) if name in ('euler', 'heun') else {}
    with torch.no_grad():
        out = S.SAMPLERS[name](Mixing(S_DATA), lat, None, lambda x: torch.randn_like(x), num_steps=5, **kw)
    assert type(out) is NoSync  # the guard travelled through the whole loop
    with pytest.raises(AssertionError):
        bool(out.sum() > 0)

@pytest.mark.parametrize('name,kw,expected', [
    ('heun', {}, 35),
    ('euler', {}, 18),
    ('dpmpp2m', {}, 18),
    ('restart', {}, 43),
    ('restart', dict(restart='3,2,0.06,0.30;4,1,1.0,2.0'), 49),
    ('restart', dict(restart=''), 35),
])
def test_nfe_counts_denoiser_calls(name, kw, expected):
    net = GaussDenoiser(S_DATA)
    run(name, net, latents_for([0]), num_steps=18, **kw)
    assert net.calls == expected == S.nfe(name, 18, **kw)

def test_restart_settings():
    assert S.RESTART_CIFAR10 == ((3, 2, 0.06, 0.30),)
    assert S.parse_restart('3,2,0.06,0.30') == S.RESTART_CIFAR10
    assert S.parse_restart('{"0": [3, 2, 0.06, 0.30]}') == S.RESTART_CIFAR10
    assert S.parse_restart('default') == S.RESTART_CIFAR10
    two = S.parse_restart(' 3,2,0.06,0.3 ; 4,1,1.09,1.92 ')
    assert two == ((3, 2, 0.06, 0.3), (4, 1, 1.09, 1.92)) and two[1].n_restart == 4 and two[1].K == 1
    assert S.parse_restart(S.format_restart(two)) == two
    assert S.parse_restart('none') == S.parse_restart('') == S.parse_restart(None) == ()
    for bad in ['3,2,0.06', '1,2,0.06,0.3', '3,2,0.3,0.06', '3,-1,0.06,0.3', '3.5,2,0.06,0.3', 'a,b,c,d']:
        with pytest.raises(ValueError):
            S.parse_restart(bad)
    with pytest.raises(ValueError):  # t_max below the schedule level picked for t_min
        run('restart', GaussDenoiser(S_DATA), latents_for([0]), num_steps=4, restart='3,1,0.3,0.35')
    with pytest.raises(ValueError):
        S.nfe('nope', 18)

def test_restart_without_intervals_is_heun():
    lat = latents_for([3, 4])
    kw = dict(num_steps=7, S_churn=8, S_min=0.1, S_max=20)
    a = run('heun', Mixing(S_DATA), lat, randn_like=fixed_randn(1), **kw)
    b = run('restart', Mixing(S_DATA), lat, randn_like=fixed_randn(1), restart=(), **kw)
    assert torch.equal(a, b)
