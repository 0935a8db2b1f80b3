"""Hooks: what acts on a sampling run besides the denoiser (boosting, particle resampling), through one path.

A run has one per-sample state (`SampleState`: named [N, ...] tensors such as
the discriminator's last score) shared by the denoiser chain and the hooks.
Solvers receive a `Hooks` and call it at two events:

- `churn(i, num_steps, x, gamma, S_noise)` before main step i, where EDM's
  churn window holds: a hook may make gamma and S_noise per-sample [N]
  tensors (boosting);
- `after_step(i, x, sigma)` after main step i < num_steps - 1, with the state
  x at the host noise level sigma = t_{i+1}: a hook may return an [N] index
  tensor idx, and row r of every per-sample state becomes row idx[r]
  (particle resampling). `Hooks` reorders the shared state; the solver
  reorders its own rows (x, labels, a multistep solver's history).

A solver that lacks an event refuses a hook that needs it (`Hooks.check`)
with a one-line error. Noise streams are not reordered: row r keeps drawing
from its own generator.
"""

import math

import torch

GAMMA_MAX = math.sqrt(2) - 1  # EDM's cap on the churn factor gamma

def as_column(v, ndim):
    """A per-sample [N] tensor shaped to broadcast over [N, ...] images; anything else passes through."""
    return v.reshape(-1, *([1] * (ndim - 1))) if isinstance(v, torch.Tensor) and v.ndim == 1 else v

def take_rows(idx, *values):
    """Each value with its rows reordered by idx ([N] LongTensor); None and scalars pass through."""
    return tuple(v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.ndim >= 1 else v for v in values)

class SampleState(dict):
    """The per-sample state of one run: name -> [N, ...] tensor (or None), reordered as one."""

    def reorder(self, idx):
        for key, value in self.items():
            self[key], = take_rows(idx, value)

#----------------------------------------------------------------------------

class Hook:
    """Base class of the hooks; a subclass overrides the events it acts on and lists them in `events`.

    `option` names what switched the hook on (a command-line option), for errors.
    """

    events = ()
    option = None

    def churn(self, i, num_steps, x, gamma, S_noise, state):
        """(gamma, S_noise, factors) for main step i; factors: host list of the values 1 + gamma takes, or None."""
        return gamma, S_noise, None

    def after_step(self, i, x, sigma, state):
        """An [N] LongTensor reordering the rows after main step i, or None."""
        return None

class StepFunction(Hook):
    """A plain callable `(i, x, sigma) -> idx or None` as an after_step hook."""

    events = ('after_step',)

    def __init__(self, fn):
        self.fn = fn

    def after_step(self, i, x, sigma, state):
        return self.fn(i, x, sigma)

class Hooks:
    """The hooks of one sampling run and their shared per-sample state: what solvers call."""

    def __init__(self, hooks=(), state=None):
        if hooks is None:
            hooks = ()
        elif isinstance(hooks, Hooks):
            hooks = hooks.hooks
        elif isinstance(hooks, Hook) or callable(hooks):
            hooks = (hooks,)
        self.hooks = tuple(h if isinstance(h, Hook) else StepFunction(h) for h in hooks)
        self.state = SampleState() if state is None else state

    def uses(self, event):
        return any(event in h.events for h in self.hooks)

    def check(self, solver, served):
        """One-line ValueError for the first hook that needs an event `solver` does not serve."""
        for h in self.hooks:
            missing = [e for e in h.events if e not in served]
            if missing:
                what = h.option or type(h).__name__
                needs = {'churn': 'the churn of EDM\'s Heun/Euler steps (--sampler=heun or euler)',
                         'after_step': 'a hook after each main step'}[missing[0]]
                raise ValueError(f'{what} needs {needs}; --sampler={solver} has none: drop {what} or change --sampler')

    def churn(self, i, num_steps, x, gamma, S_noise):
        factors = None
        for h in self.hooks:
            if 'churn' in h.events:
                gamma, S_noise, f = h.churn(i, num_steps, x, gamma, S_noise, self.state)
                factors = f or factors
        return gamma, S_noise, factors

    def after_step(self, i, x, sigma):
        """The composed row order of the hooks after main step i (the shared state already reordered), or None."""
        order = None
        for h in self.hooks:
            if 'after_step' not in h.events:
                continue
            idx = h.after_step(i, x, sigma, self.state)
            if idx is not None:
                self.state.reorder(idx)
                x, = take_rows(idx, x)
                order = idx if order is None else order.index_select(0, idx)
        return order

def as_hooks(hooks):
    """A `Hooks` from a Hooks, a Hook, a callable, a sequence of them, or None."""
    return hooks if isinstance(hooks, Hooks) else Hooks(hooks)

#----------------------------------------------------------------------------

class Boosting(Hook):
    """The release's boosting, churn part (docs/compat.md §3): every `period` steps, samples whose last
    first-order score `state['log_ratio']` is negative get churn `S_churn` and noise `S_noise`.

    Its other part, the doubled correction of those samples every
    `weight_period` steps, is the guided denoiser's (DGDenoiser's
    double_fake_every). Without first-order guidance (active=False) there is no
    score and the hook leaves the churn alone, but still needs a solver with churn.
    """

    events = ('churn',)
    option = '--boosting'

    def __init__(self, S_churn=4.0, S_noise=1.0, period=5, weight_period=2, active=True):
        self.S_churn, self.S_noise, self.period, self.weight_period = S_churn, S_noise, period, weight_period
        self.active = active

    def churn(self, i, num_steps, x, gamma, S_noise, state):
        if not self.active:
            return gamma, S_noise, None
        if i % self.period != 0:
            return gamma, S_noise, [1 + gamma]
        log_ratio = state.get('log_ratio')
        if log_ratio is None:  # nothing scored yet: no sample is judged fake
            log_ratio = torch.full([x.shape[0]], float('inf'), device=x.device)
        boosted = log_ratio < 0
        gamma_b = min(self.S_churn / num_steps, GAMMA_MAX)
        gamma_vec = torch.where(boosted, gamma_b, gamma).to(torch.float64)
        noise_vec = torch.where(boosted, self.S_noise, S_noise).to(torch.float64)
        return gamma_vec, noise_vec, [1 + gamma, 1 + gamma_b]
