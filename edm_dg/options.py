"""Command-line options that several commands share, declared once: sampler, DG, runtime.

`generate_dg.py` and `fid.py epochs|sweep` take the same sampler and guidance
options with the same names, types and help. Options whose default depends on
the network or on `--preset` default to None here and are resolved by
`sampler_settings`: an explicit option beats the preset, the preset beats the
built-in default.
"""

import click

from .precision import PRECISIONS

# Published DG settings in one word (Kim et al. 2023, Table 2 and the release's scripts).
PRESETS = {
    'edm-g++-cifar10-uncond': dict(sampler='heun', num_steps=18, dg_weight_1st_order=2.0, dg_weight_2nd_order=0.0,
                                   time_min=0.01, time_max=1.0, boosting=0),
    'edm-g++-cifar10-cond': dict(sampler='heun', num_steps=18, dg_weight_1st_order=1.0, dg_weight_2nd_order=0.0,
                                 time_min=0.01, time_max=1.0, boosting=1, boost_S_churn=4.0, boost_S_noise=1.0,
                                 boost_period=5, boost_weight_period=2),
}

SAMPLER_NAMES = ('heun', 'euler', 'dpmpp2m', 'restart')

# Built-in defaults of the options that default to None below.
DEFAULTS = dict(sampler='heun', num_steps=18, rho=7.0, S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0,
                dg_weight_2nd_order=0.0, time_min=0.01, time_max=1.0, boosting=0, boost_S_churn=4.0,
                boost_S_noise=1.0, boost_period=5, boost_weight_period=2)

POS = click.FloatRange(min=0, min_open=True)
NONNEG = click.FloatRange(min=0)
UNIT = click.FloatRange(min=0, max=1)

def _stack(*opts):
    def decorate(fn):
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return decorate

sampler_options = _stack(
    click.option('--sampler', help='Sampler: heun (EDM, the release), euler, dpmpp2m (DPM-Solver++(2M), Karras steps), restart (Xu et al. 2023)  [default: heun]', type=click.Choice(SAMPLER_NAMES), default=None),
    click.option('--steps', 'num_steps', help='Number of sampling steps  [default: 18]', metavar='INT', type=click.IntRange(min=2), default=None),
    click.option('--sigma_min', help='Lowest noise level  [default: the network\'s, at least 0.002]', metavar='FLOAT', type=POS, default=None),
    click.option('--sigma_max', help='Highest noise level  [default: the network\'s, at most 80]', metavar='FLOAT', type=POS, default=None),
    click.option('--rho', help='Time step exponent  [default: 7]', metavar='FLOAT', type=POS, default=None),
    click.option('--S_churn', 'S_churn', help='Stochasticity strength (heun, euler)  [default: 0]', metavar='FLOAT', type=NONNEG, default=None),
    click.option('--S_min', 'S_min', help='Stochasticity only above this noise level  [default: 0]', metavar='FLOAT', type=NONNEG, default=None),
    click.option('--S_max', 'S_max', help='Stochasticity only below this noise level  [default: inf]', metavar='FLOAT', type=NONNEG, default=None),
    click.option('--S_noise', 'S_noise', help='Noise inflation of the churn  [default: 1]', metavar='FLOAT', type=POS, default=None),
    click.option('--restart', 'restart', help='Restart intervals "N,K,t_min,t_max[;...]": N Heun steps, K repeats  [default: the paper\'s CIFAR-10 setting]', metavar='SPEC', type=str, default=None),
    click.option('--solver', help='EDM\'s ablation name for --sampler=euler|heun', type=click.Choice(['euler', 'heun']), default=None, hidden=True),
)

dg_options = _stack(
    click.option('--preset', help='Published DG settings in one word; explicit options override them', type=click.Choice(sorted(PRESETS)), default=None),
    click.option('--disc', '--discriminator_ckpt', 'disc_path', help='Discriminator: the release\'s head or an edm-dg checkpoint  [default: none, plain EDM]', metavar='PATH', type=str, default=None),
    click.option('--classifier', '--pretrained_classifier_ckpt', 'classifier_path', help='ADM classifier (feature extractor) of the discriminator', metavar='PATH', type=str, default=None),
    click.option('--dg_weight_1st_order', '--w', 'dg_weight_1st_order', help='DG weight w1 at the first-order evaluation  [default: 2 unconditional, 1 conditional net]', metavar='FLOAT', type=float, default=None),
    click.option('--dg_weight_2nd_order', help='DG weight w2 at the Heun evaluation (heun only)  [default: 0]', metavar='FLOAT', type=float, default=None),
    click.option('--time_min', help='DG off below this VP time  [default: 0.01]', metavar='FLOAT', type=UNIT, default=None),
    click.option('--time_max', help='DG off above this VP time  [default: 1]', metavar='FLOAT', type=UNIT, default=None),
    click.option('--boosting', help='Boost churn and guidance of samples judged fake (heun, euler)  [default: 0]', type=click.IntRange(0, 1), default=None),
    click.option('--boost_S_churn', 'boost_S_churn', help='Churn of boosted samples  [default: 4]', metavar='FLOAT', type=NONNEG, default=None),
    click.option('--boost_S_noise', 'boost_S_noise', help='Noise inflation of boosted samples  [default: 1]', metavar='FLOAT', type=POS, default=None),
    click.option('--boost_period', help='Boost churn every N-th step (release: 5; paper: 2)  [default: 5]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--boost_weight_period', help='Double the correction every N-th step  [default: 2]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--lora_alpha', help='LoRA scale alpha of a study-format classifier  [default: as recorded, else 1 as the study trained]', metavar='FLOAT', type=float, default=None),
    click.option('--disc_time', help='Time the classifier is fed: linear VP time, or cosine time (64x64 ADM classifiers). Heads trained the release\'s way at 64x64 saw linear time in training: pass linear to sample as they were trained  [default: as recorded in an edm-dg checkpoint; for the release\'s heads, what its sampler does: cosine at 64x64, else linear]', type=click.Choice(['linear', 'cosine']), default=None),
)

selection_options = _stack(
    click.option('--particles', help='Sample each seed as K particles and resample them, within the seed, by the discriminator\'s density ratio after the --resample_steps (particle filtering; needs --disc; --w=0 for no guidance). --batch still counts seeds: a batch runs batch*K samples  [default: 1]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--resample_steps', help='Main-step indices after which particles are resampled, e.g. 4,8,12 (0 .. steps-2; step i ends at the schedule\'s level i+1)', metavar='LIST', type=str, default=None),
    click.option('--best_of', help='Sample N candidates per seed and keep the one the discriminator scores highest at the schedule\'s lowest noise level (needs --disc); with --particles N must equal K (the best particle is kept). Candidate 0 is the plain image of the seed, candidate c>0 uses a stream derived from (seed, c); scores go to selection.jsonl  [default: 1]', metavar='INT', type=click.IntRange(min=1), default=None),
)

runtime_options = _stack(
    click.option('--device', help='Device  [default: cuda if available]', metavar='STR', type=str, default=None),
    click.option('--precision', help='Score-network precision', type=click.Choice(PRECISIONS), default='fp32', show_default=True),
    click.option('--disc_precision', help='Discriminator precision  [default: --precision]', type=click.Choice(PRECISIONS), default=None),
    click.option('--channels_last', help='channels_last memory format for both networks', is_flag=True),
    click.option('--compile', 'compile_nets', help='torch.compile both networks (falls back to eager)', is_flag=True),
    click.option('--trust_pickle', help='Load --network with EDM\'s own unpickling (executes code in the file)', is_flag=True),
)

SAMPLER_KEYS = ('sampler', 'num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'restart', 'solver')
DG_KEYS = ('preset', 'dg_weight_1st_order', 'dg_weight_2nd_order', 'time_min', 'time_max', 'boosting', 'boost_S_churn',
           'boost_S_noise', 'boost_period', 'boost_weight_period')

SELECTION_KEYS = ('particles', 'resample_steps', 'best_of')

def pop_selection_options(kwargs):
    """Remove --particles, --resample_steps and --best_of from a command's kwargs; returns them as a dict."""
    return {k: kwargs.pop(k) for k in SELECTION_KEYS if k in kwargs}

def parse_steps(text, option='--resample_steps'):
    """'4,8,12' or '4-6,10' -> sorted list of distinct ints; ValueError naming the option otherwise."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        parts = [str(v) for v in text]
    else:
        parts = [p.strip() for p in str(text).split(',') if p.strip()]
    steps = set()
    for part in parts:
        lo, _, hi = part.partition('-')
        try:
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f'{option}: cannot parse "{part}"; use step indices like 4,8,12') from None
        steps.update(range(lo, hi + 1))
    return sorted(steps)

def selection_settings(opts, num_steps=None, guided=False):
    """dict(chains, resample_steps, best) for edm_dg.selection, or None for plain sampling.

    num_steps (None: not checked yet) bounds the step indices; guided says
    whether a discriminator is loaded. Raises ValueError naming the option at fault.
    """
    particles = opts.get('particles') or 1
    best_of = opts.get('best_of') or 1
    steps = parse_steps(opts.get('resample_steps'))
    used = [name for name, on in (('--particles', particles > 1), ('--resample_steps', bool(steps)),
                                  ('--best_of', best_of > 1)) if on]
    if not used:
        return None
    if not guided:
        raise ValueError(f'{used[0]} selects with the discriminator: pass --disc and --classifier (--w=0 for selection without guidance)')
    if steps and particles < 2:
        raise ValueError('--resample_steps resamples particles: pass --particles=K with K >= 2')
    if particles > 1 and not steps and best_of == 1:
        raise ValueError(f'--particles={particles} needs --resample_steps (when to resample), or --best_of={particles} to keep the best particle')
    if particles > 1 and best_of > 1 and best_of != particles:
        raise ValueError(f'--best_of={best_of} with --particles={particles}: the best of the particles is kept; pass --best_of={particles} or drop --best_of')
    if num_steps is not None and steps and not 0 <= steps[0] <= steps[-1] <= num_steps - 2:
        bad = next(i for i in steps if not 0 <= i <= num_steps - 2)
        raise ValueError(f'--resample_steps: step {bad} is outside 0..{num_steps - 2} '
                         f'(with --steps={num_steps}, step {num_steps - 1} ends at sigma=0)')
    return dict(chains=max(particles, best_of), resample_steps=steps, best=best_of > 1)

def pop_sampler_options(kwargs):
    """Remove the sampler and DG settings from a command's kwargs; returns them as a dict."""
    return {k: kwargs.pop(k) for k in SAMPLER_KEYS + DG_KEYS if k in kwargs}

def sampler_settings(opts, label_dim, guided):
    """Resolved sampler settings (explicit > preset > default) for `edm_dg.samplers.sample`.

    label_dim picks the default w1 (2 unconditional, 1 conditional); guided says
    whether a discriminator is loaded. Raises ValueError naming the option at fault.
    """
    opts = dict(opts)
    preset = PRESETS[opts.pop('preset')] if opts.get('preset') else {}
    solver = opts.pop('solver', None)
    if solver is not None:
        if opts.get('sampler') not in (None, solver):
            raise ValueError(f'--solver={solver} contradicts --sampler={opts["sampler"]}; pass only --sampler')
        opts['sampler'] = solver
    out = {}
    for key in set(opts) | set(preset) | set(DEFAULTS):
        value = opts.get(key)
        out[key] = value if value is not None else preset.get(key, DEFAULTS.get(key))
    for key, value in out.items():
        if isinstance(value, float) and (value != value or (abs(value) == float('inf') and key != 'S_max')):
            raise ValueError(f'--{key}={value} is not a finite number')
    if out['time_min'] > out['time_max']:
        raise ValueError(f'--time_min={out["time_min"]} is above --time_max={out["time_max"]}; the DG window would be empty')
    if out.get('dg_weight_1st_order') is None:
        out['dg_weight_1st_order'] = (1.0 if label_dim else 2.0) if guided else 0.0
    if preset and not guided:
        raise ValueError('--preset sets guidance: pass --disc and --classifier too, or drop --preset')
    if not guided and (opts.get('dg_weight_1st_order') or opts.get('dg_weight_2nd_order') or opts.get('boosting')):
        raise ValueError('DG options given without --disc; pass --disc and --classifier, or drop the DG options')
    if not guided:
        out['dg_weight_1st_order'] = out['dg_weight_2nd_order'] = 0.0
        out['boosting'] = 0
    out['boosting'] = bool(out['boosting'])
    return {k: v for k, v in out.items() if v is not None}
