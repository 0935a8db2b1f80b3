"""Command-line options that several commands share, declared once: sampler, DG, runtime.

`generate_dg.py` and `fid.py epochs|sweep` take the same sampler and guidance
options with the same names, types and help. Options whose default depends on
the network or on `--preset` default to None here and are resolved by
`sampler_settings`: an explicit option beats the preset, the preset beats the
built-in default.
"""

import click

from .precision import PRECISIONS
from .presets import DG_PRESETS, EDM2_PRESETS

PRESETS = DG_PRESETS  # Published DG settings in one word (edm_dg/presets.py).
PRESET_NAMES = sorted(DG_PRESETS) + sorted(EDM2_PRESETS)  # --preset: DG's sampler settings, or EDM2's networks and guidance

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

# The peers' option names (the DG release's and the reproduction study's generate.py / train.py) are aliases
# beside ours; docs/compat.md §9 has the table. Where a peer name means something else in edm-dg (the
# release's --disc is its time discretisation), edm-dg keeps its own meaning and the help says so.

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

# The discriminator's files and what they are; load_models takes these keys (pop_disc_options).
DISC = click.option('--disc', '--discriminator_ckpt', '--discriminator_checkpoint', 'disc_path', help='Discriminator: the release\'s or the study\'s head, or an edm-dg checkpoint (the release\'s --disc, its time discretisation, is not an edm-dg option: EDM\'s steps are used)  [default: none, plain EDM]', metavar='PATH', type=str, default=None)
CLASSIFIER = click.option('--classifier', '--pretrained_classifier_ckpt', 'classifier_path', help='ADM classifier (feature extractor) of the discriminator, e.g. the release\'s 32x32_classifier.pt', metavar='PATH', type=str, default=None)
LORA_CHECKPOINT = click.option('--lora_checkpoint', help='The study\'s adapter-only LoRA file (lora_adm_*.pt), merged into --classifier; its rank is read from the file', metavar='PATH', type=str, default=None)
LORA_RANK = click.option('--lora_rank', help='LoRA rank. With --lora_checkpoint or a LoRA checkpoint: checked against the file; train_disc.py without one: rank of new adapters. 0 or -1 (the study\'s "none"): no LoRA  [default: as the files say; train_disc.py 0]', metavar='INT', type=click.IntRange(min=-1), default=None)
LORA_ALPHA = click.option('--lora_alpha', help='LoRA scale alpha (update scaled by alpha/rank)  [default: as recorded, else 1 as the study trained]', metavar='FLOAT', type=float, default=None)
DISC_TIME = click.option('--disc_time', '--time_schedule', 'disc_time', help='Time the classifier is fed: linear VP time, or cosine time (64x64 ADM classifiers). Heads trained the release\'s way at 64x64 saw linear time in training: pass linear to sample as they were trained  [default: as recorded in an edm-dg checkpoint; else the classifier\'s own, as the release\'s sampler: cosine at 64x64, else linear]', type=click.Choice(['linear', 'cosine']), default=None)
COND = click.option('--cond', '--conditional', 'cond', help='Class-conditional discriminator (0/1; plain --cond means 1). train_disc.py: train one (needs labels). Sampling: checked against the head, which says it itself  [default: train_disc.py 0; sampling: the file\'s]', metavar='0|1', type=click.IntRange(0, 1), is_flag=False, flag_value=1, default=None)
# Latent EDM2 models (edm_dg.latents).
VAE = click.option('--vae', help='Latent EDM2 models: their VAE as a local diffusers AutoencoderKL folder (save_pretrained), for machines without the Hugging Face hub  [default: fetch the pickle\'s vae_name, e.g. stabilityai/sd-vae-ft-mse]', metavar='DIR', type=str, default=None)
ENCODER_BATCH = click.option('--encoder_batch', help='Latent models: images per VAE decode (EDM2\'s encoder_batch_size)', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
SAVE_LATENTS = click.option('--save_latents', help='Latent models: also write the final latents of each batch to OUTDIR/latents/*.npz (latents, label, seeds, space), for train_disc.py --fake and fid.py', is_flag=True)
LATENT_ENCODER = click.option('--encoder', 'encoder_pkl', help='Latents: the latent EDM2 pickle whose encoder standardises raw latents (EDM2 latent datasets) and images encoded with --vae  [default: the record of the --fake latent shards]', metavar='PKL', type=str, default=None)

TRUST_PICKLE = click.option('--trust_pickle', help='Load --network with EDM\'s own unpickling (executes code in the file)', is_flag=True)
DEVICE = click.option('--device', help='Device  [default: cuda if available]', metavar='STR', type=str, default=None)

disc_options = _stack(DISC, CLASSIFIER, LORA_CHECKPOINT, LORA_RANK, LORA_ALPHA, DISC_TIME, COND)

DG_WEIGHT_1 = click.option('--dg_weight_1st_order', '--w', '--w_dg_1', 'dg_weight_1st_order', help='DG weight w1 at the first-order evaluation  [default: 2 unconditional, 1 conditional net]', metavar='FLOAT', type=float, default=None)
TIME_MIN = click.option('--time_min', '--time_mid', 'time_min', help='DG off below this VP time (the study\'s --time_mid)  [default: 0.01]', metavar='FLOAT', type=UNIT, default=None)
TIME_MAX = click.option('--time_max', help='DG off above this VP time  [default: 1]', metavar='FLOAT', type=UNIT, default=None)

# Guidance by a second network (edm_dg/sampling/guides.py), EDM2's option names; composed with DG by build_chain.
guidance_options = _stack(
    click.option('--gnet', 'gnet', help='Guide network pickle (EDM or EDM2): the unconditional net gives classifier-free guidance, a smaller or shorter-trained one autoguidance; needs --guidance  [default: none]', metavar='PATH|URL', type=str, default=None),
    click.option('--guidance', help='Guidance weight w of D_g + w (D - D_g); 1 is the main net alone (the guide is then not evaluated)  [default: 1, or the EDM2 preset\'s]', metavar='FLOAT', type=float, default=None),
    click.option('--guidance_interval', help='Guide only for sigma_lo <= sigma <= sigma_hi (Kynkäänniemi et al. 2024), the main net alone elsewhere, e.g. 0.28,2.9  [default: every level]', metavar='LO,HI', type=str, default=None),
)

dg_options = _stack(
    click.option('--preset', help='Published settings in one word: the DG paper\'s (edm-g++-*: sampler and DG weights) or EDM2\'s (edm2-*: --network, --gnet and --guidance, as its generate_images.py); explicit options override them', type=click.Choice(PRESET_NAMES), default=None),
    guidance_options,
    disc_options,
    DG_WEIGHT_1,
    click.option('--dg_weight_2nd_order', '--w_dg_2', 'dg_weight_2nd_order', help='DG weight w2 at the Heun evaluation (heun only; the study\'s --w_dg_2 judged the first evaluation\'s point, edm-dg the second\'s)  [default: 0]', metavar='FLOAT', type=float, default=None),
    TIME_MIN,
    TIME_MAX,
    click.option('--boosting', help='Boost churn and guidance of samples judged fake (heun, euler)  [default: 0]', type=click.IntRange(0, 1), default=None),
    click.option('--adaptive_weight', help='The study\'s boosting: --boosting=1 with churn and weight boosted every 2nd step (--boost_period=2 --boost_weight_period=2); explicit boost options override  [default: 0]', type=click.IntRange(0, 1), default=None),
    click.option('--boost_S_churn', '--S_churn_manual', 'boost_S_churn', help='Churn of boosted samples (the study\'s --S_churn_manual)  [default: 4]', metavar='FLOAT', type=NONNEG, default=None),
    click.option('--boost_S_noise', 'boost_S_noise', help='Noise inflation of boosted samples  [default: 1]', metavar='FLOAT', type=POS, default=None),
    click.option('--boost_period', help='Boost churn every N-th step (release: 5; paper and study: 2)  [default: 5]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--boost_weight_period', help='Double the correction every N-th step  [default: 2]', metavar='INT', type=click.IntRange(min=1), default=None),
)

selection_options = _stack(
    click.option('--particles', help='Sample each seed as K particles and resample them, within the seed, by the discriminator\'s density ratio after the --resample_steps (particle filtering; needs --disc; --w=0 for no guidance). --batch still counts seeds: a batch runs batch*K samples  [default: 1]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--resample_steps', help='Main-step indices after which particles are resampled, e.g. 4,8,12 (0 .. steps-2; step i ends at the schedule\'s level i+1)', metavar='LIST', type=str, default=None),
    click.option('--best_of', help='Sample N candidates per seed and keep the one the discriminator scores highest at the schedule\'s lowest noise level (needs --disc); with --particles N must equal K (the best particle is kept). Candidate 0 is the plain image of the seed, candidate c>0 uses a stream derived from (seed, c); scores go to selection.jsonl  [default: 1]', metavar='INT', type=click.IntRange(min=1), default=None),
)

runtime_options = _stack(
    DEVICE,
    click.option('--precision', help='Score-network precision', type=click.Choice(PRECISIONS), default='fp32', show_default=True),
    click.option('--disc_precision', help='Discriminator precision  [default: --precision]', type=click.Choice(PRECISIONS), default=None),
    click.option('--channels_last', help='channels_last memory format for both networks', is_flag=True),
    click.option('--compile', 'compile_nets', help='torch.compile both networks (falls back to eager)', is_flag=True),
    TRUST_PICKLE,
)

def batch_option(dest='batch', default=64):
    """--batch: images per process in every command (train_disc.py's global batch is --batch times the processes)."""
    return click.option('--batch', '--batch_size', dest, help='Batch size per process (the peers\' --batch_size)', metavar='INT',
                        type=click.IntRange(min=1), default=default, show_default=True)

RESUME = click.option('--resume/--no-resume', help='Continue an interrupted run in the output folder (images or epochs already there are kept); --no-resume starts over', default=True, show_default=True)

# generate_dg.py's peer options for the number of images and the output format.
output_peer_options = _stack(
    click.option('--num_samples', help='The peers\' image count: seeds 0..N-1 (replaces --seeds). The peers draw unseeded noise from one global generator; edm-dg gives every seed its own, so the images differ from theirs but depend only on their seed', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--save_format', help='The study\'s format: npz also writes .npz shards with its keys (images, one-hot labels) beside the PNGs', type=click.Choice(['png', 'npz']), default=None),
    click.option('--save_type', help='The release\'s format: npz also writes .npz shards with its keys (samples, label) beside the PNGs (as --npz)', type=click.Choice(['png', 'npz']), default=None),
)

# train_disc.py's options, with the release's and the study's train.py names beside them.
train_options = _stack(
    click.option('--real', '--datadir', 'real', help='Real images: EDM dataset zip/folder, image folder, or .npz (the release\'s true_data.npz, the study\'s images/labels files)', metavar='PATH', default=None),
    click.option('--fake', '--gendir', '--sample_dir', 'fake', help='Generated images: generate_dg.py folder, .npz file, or folder of .npz shards (edm-dg\'s, the release\'s samples_*.npz, the study\'s samples.npz); latents: a generate_dg.py --save_latents folder (then --real may be an EDM2 latent dataset, or images with --vae)', metavar='PATH', default=None),
    CLASSIFIER,
    LORA_CHECKPOINT,
    click.option('--outdir', '--savedir', '--save_dir', 'outdir', help='Run folder (checkpoints, metrics.jsonl, training-curves.png, log-ratio-histogram.png)', metavar='DIR', default=None),
    click.option('--epochs', '--epoch', '--n_epochs', 'epochs', help='Number of epochs (release: 60 uncond, 250 cond)', type=click.IntRange(min=1), default=60, show_default=True),
    batch_option('batch', 128),
    click.option('--lr', help='Adam learning rate', type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True),
    click.option('--weight_decay', '--wd', 'weight_decay', help='Adam weight decay', type=click.FloatRange(min=0), default=1e-7, show_default=True),
    COND,
    click.option('--num_images', '--num', '--num_data', '--num_gen_samples', 'num', help='Images of each kind, equal counts (the study\'s --num_gen_samples counts fakes and takes all reals)  [default: all]; under torchrun write --num_images (torchrun takes --num for its --numa-binding)', type=click.IntRange(min=1), default=None),
    LORA_RANK,
    click.option('--lora_alpha', help='LoRA alpha (update scaled by alpha/rank)', type=float, default=1.0, show_default=True),
    click.option('--head_width', help='Head channels', type=click.IntRange(min=64), default=128, show_default=True),
    click.option('--head_depth', help='Head residual blocks', type=click.IntRange(min=1), default=2, show_default=True),
    DISC_TIME,
    click.option('--eval_images', help='Images of each kind evaluated at every tau bin after every epoch; 0 = none  [default: 256, at most 1/32 of the images of each kind, none if that is under 16]', type=click.IntRange(min=0), default=None),
    click.option('--holdout', help='Take the --eval_images evaluation images (the last of each kind) out of training', is_flag=True),
    click.option('--seed', help='Random seed', type=int, default=0, show_default=True),
    click.option('--snap', help='Keep a checkpoint every N epochs', type=click.IntRange(min=1), default=1, show_default=True),
    click.option('--export', help='Also write the peers\' files at every kept checkpoint: study (discrim_{uncond,cond}_epochE.pt + lora_adm_epochE.pt, and *_final.pt at the end), release (head state dicts discriminator_E.pt)', type=click.Choice(['study', 'release']), default=None),
    click.option('--img_resolution', help='The release\'s image size option: checked against the images', type=click.IntRange(min=1), default=None, hidden=True),
    click.option('--precision', help='Autocast precision', type=click.Choice(PRECISIONS), default='fp32', show_default=True),
    click.option('--channels_last', help='channels_last memory format', is_flag=True),
    LATENT_ENCODER,
    VAE,
    TRUST_PICKLE,
    RESUME,
    DEVICE,
)

# The files the peers' train.py reads from hard-coded defaults; edm-dg guesses no file and names them instead.
PEER_TRAIN_FILES = {
    'real': '--real is required: real images (the release\'s train.py reads --datadir, default data/true_data.npz; the study\'s loads CIFAR-10 through keras: pass EDM\'s datasets/cifar10-32x32.zip)',
    'fake': '--fake is required: generated images (the release\'s --gendir, default samples/cifar_uncond_vanilla; the study\'s --sample_dir, default training_data/conditional_edm_samples/edm_cond_samples.npz)',
    'classifier_path': '--classifier is required: the ADM classifier (the release reads checkpoints/ADM_classifier/32x32_classifier.pt, the study guided_diffusion/model/32x32_classifier.pt)',
    'outdir': '--outdir is required: the run folder (the release\'s --savedir, default checkpoints/discriminator/cifar_uncond; the study\'s --save_dir, default models/cond_disc/)',
}

def check_train_files(kwargs):
    """The one-line error for the first file option train_disc.py lacks."""
    for key, message in PEER_TRAIN_FILES.items():
        if kwargs.get(key) is None:
            raise ValueError(message)

DISC_KEYS = ('disc_path', 'classifier_path', 'lora_checkpoint', 'lora_rank', 'lora_alpha', 'disc_time', 'cond')

def pop_disc_options(kwargs):
    """Remove the discriminator file options from kwargs; returns load_models' keyword arguments."""
    opts = {k: kwargs.pop(k, None) for k in DISC_KEYS}
    if opts['lora_rank'] == -1:  # The study's "no LoRA".
        opts['lora_rank'] = None if opts['lora_checkpoint'] is None else 0
    opts['disc_cond'] = opts.pop('cond')
    return opts

def seeds_from_peer_options(seeds, num_samples, seeds_given):
    """--seeds, or seeds 0..N-1 for the peers' --num_samples=N; both at once is an error."""
    if num_samples is None:
        return seeds
    if seeds_given:
        raise ValueError(f'--num_samples={num_samples} and --seeds={seeds} both choose the seeds; pass one of them')
    return f'0-{num_samples - 1}'

SAMPLER_KEYS = ('sampler', 'num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise', 'restart', 'solver')
DG_KEYS = ('preset', 'dg_weight_1st_order', 'dg_weight_2nd_order', 'time_min', 'time_max', 'boosting', 'adaptive_weight',
           'boost_S_churn', 'boost_S_noise', 'boost_period', 'boost_weight_period')

# The study's --adaptive_weight=1 (its generate.py): boosting with churn and weight boosted every second step.
ADAPTIVE_WEIGHT = dict(boosting=1, boost_period=2, boost_weight_period=2)

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
    """dict(chains, resample_steps, best) for edm_dg.sampling.selection, or None for plain sampling.

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

GUIDANCE_KEYS = ('gnet', 'guidance', 'guidance_interval')

def pop_guidance_options(kwargs):
    """Remove --gnet, --guidance and --guidance_interval from a command's kwargs; returns them as a dict."""
    return {k: kwargs.pop(k, None) for k in GUIDANCE_KEYS}

def guidance_settings(opts, network_pkl, sampler_opts):
    """(network_pkl, gnet_pkl, dict(guidance, guidance_interval)): explicit options > EDM2 preset.

    An EDM2 preset in sampler_opts['preset'] is taken out of it (it names
    networks, not sampler settings) and supplies --network, --gnet and
    --guidance where they are not given. gnet_pkl is None when nothing guides.
    Raises ValueError naming the option at fault.
    """
    import math
    from .sampling.guides import parse_interval
    named = sampler_opts.get('preset')
    preset = EDM2_PRESETS.get(named) if named else None
    if preset is not None:
        del sampler_opts['preset']
        net_url, gnet_url = preset.urls()
        network_pkl = network_pkl or net_url
    gnet, guidance = opts.get('gnet'), opts.get('guidance')
    if gnet is not None and guidance is None and preset is None:
        raise ValueError(f'--gnet={gnet} given without --guidance: pass the weight, e.g. --guidance=2 (1: the main net alone)')
    if preset is not None:
        gnet = gnet or gnet_url
        guidance = preset.guidance if guidance is None else guidance
    guidance = 1.0 if guidance is None else float(guidance)
    if not math.isfinite(guidance):
        raise ValueError(f'--guidance={guidance} is not a finite number')
    if gnet is None and guidance != 1:
        raise ValueError(f'--guidance={guidance:g} weighs the main net against a guide network: pass --gnet=PKL '
                         f'(the unconditional net for classifier-free guidance, a smaller one for autoguidance)')
    interval = opts.get('guidance_interval')
    if interval is not None:
        if gnet is None:
            raise ValueError(f'--guidance_interval={interval} limits guidance by --gnet: pass --gnet and --guidance too')
        interval = parse_interval(interval)
    if network_pkl is None:
        raise ValueError('--network is required: an EDM or EDM2 network pickle (or --preset=edm2-...)')
    return network_pkl, gnet, dict(guidance=guidance, guidance_interval=interval)

def pop_sampler_options(kwargs):
    """Remove the sampler and DG settings from a command's kwargs; returns them as a dict."""
    return {k: kwargs.pop(k) for k in SAMPLER_KEYS + DG_KEYS if k in kwargs}

def sampler_settings(opts, label_dim, guided, num_steps=None):
    """Resolved sampler settings (explicit > preset > default) for `edm_dg.sampling.sample`.

    label_dim picks the default w1 (2 unconditional, 1 conditional); guided says
    whether a discriminator is loaded; num_steps is the network's default
    steps (None: EDM's 18; EDM2 networks say 32). Raises ValueError naming the option at fault.
    """
    opts = dict(opts)
    named = opts.pop('preset', None)
    if named in EDM2_PRESETS:
        raise ValueError(f'--preset={named} names networks: resolve it with guidance_settings first')
    preset = dict(PRESETS[named]) if named else {}
    defaults = dict(DEFAULTS) if num_steps is None else dict(DEFAULTS, num_steps=int(num_steps))
    adaptive = opts.pop('adaptive_weight', None)
    if adaptive:
        preset.update(ADAPTIVE_WEIGHT)
    solver = opts.pop('solver', None)
    if solver is not None:
        if opts.get('sampler') not in (None, solver):
            raise ValueError(f'--solver={solver} contradicts --sampler={opts["sampler"]}; pass only --sampler')
        opts['sampler'] = solver
    out = {}
    for key in set(opts) | set(preset) | set(defaults):
        value = opts.get(key)
        out[key] = value if value is not None else preset.get(key, defaults.get(key))
    for key, value in out.items():
        if isinstance(value, float) and (value != value or (abs(value) == float('inf') and key != 'S_max')):
            raise ValueError(f'--{key}={value} is not a finite number')
    if out['time_min'] > out['time_max']:
        raise ValueError(f'--time_min={out["time_min"]} is above --time_max={out["time_max"]}; the DG window would be empty')
    if out.get('dg_weight_1st_order') is None:
        out['dg_weight_1st_order'] = (1.0 if label_dim else 2.0) if guided else 0.0
    if preset and not guided:
        given = f'--preset={named}' if named else '--adaptive_weight=1'
        raise ValueError(f'{given} sets guidance: pass --disc and --classifier too, or drop it')
    if not guided and (opts.get('dg_weight_1st_order') or opts.get('dg_weight_2nd_order') or opts.get('boosting')):
        raise ValueError('DG options given without --disc; pass --disc and --classifier, or drop the DG options')
    if not guided:
        out['dg_weight_1st_order'] = out['dg_weight_2nd_order'] = 0.0
        out['boosting'] = 0
    out['boosting'] = bool(out['boosting'])
    return {k: v for k, v in out.items() if v is not None}

# Diffusion Rejection Sampling (edm_dg/sampling/diffrs.py, docs/compat.md §DiffRS) under the DiffRS release's option
# names; its defaults are the release's.
rejection_options = _stack(
    click.option('--rejection', help='Rejection sampling: diffrs (Na et al. 2024) accepts or rejects every step of the heun/euler sampler with the discriminator\'s log density ratio; needs --disc; --w=0: plain transitions, else DG-guided ones  [default: none]', type=click.Choice(['none', 'diffrs']), default=None),
    click.option('--rej_percentile', help='DiffRS gamma in [0, 1]: the thresholds are this quantile of the warm-up\'s log ratios; higher rejects more (release: 0; its README: 0.75)  [default: 0]', metavar='FLOAT', type=float, default=None),
    click.option('--backsteps', help='Levels a rejected sample is re-noised up; 0 tests no transition. 1 is the release\'s default; in the analytic Gaussian test (data variance 0.25) --backsteps=STEPS recovers it and 1 ends at 0.31-0.36  [default: 1]', metavar='INT', type=click.IntRange(min=0), default=None),
    click.option('--min_backsteps', help='Test only transitions into levels above this; 0 also tests the initial noise  [default: 0]', metavar='INT', type=click.IntRange(min=0), default=None),
    click.option('--max_backsteps', help='Test only transitions into levels up to this  [default: --steps]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--iter_warmup', help='Warm-up: the thresholds come from INT x 100 samples of the base sampler on streams disjoint from every seed  [default: 10]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--max_iter', help='Network evaluations one attempt at a sample may use; a sample that would need more restarts from new noise (release README: 105 at 18 heun steps)  [default: no limit]', metavar='INT', type=click.IntRange(min=1), default=None),
    click.option('--rej_thresholds', help='Reuse the thresholds of an earlier run (its diffrs_thresholds.json) instead of a warm-up; refused for another schedule or discriminator  [default: OUTDIR/diffrs_thresholds.json if there, else a warm-up]', metavar='PATH', type=str, default=None),
)

REJECTION_KEYS = ('rejection', 'rej_percentile', 'backsteps', 'min_backsteps', 'max_backsteps', 'iter_warmup', 'max_iter',
                  'rej_thresholds')
REJECTION_DEFAULTS = dict(rej_percentile=0.0, backsteps=1, min_backsteps=0, max_backsteps=None, iter_warmup=10, max_iter=None,
                          rej_thresholds=None)

def pop_rejection_options(kwargs):
    """Remove the rejection options from a command's kwargs; returns them as a dict."""
    return {k: kwargs.pop(k) for k in REJECTION_KEYS if k in kwargs}

def rejection_settings(opts, settings=None, *, guided, selection=None):
    """dict(rej_percentile, backsteps, min_backsteps, max_backsteps, iter_warmup, max_iter, rej_thresholds) for
    edm_dg.generate, or None without --rejection=diffrs.

    settings (sampler_settings' result; None: not resolved yet) and selection
    (selection_settings') are checked against it; guided says whether a
    discriminator is loaded. Raises ValueError naming the option at fault.
    """
    from .sampling.diffrs import check_percentile
    given = [k for k in REJECTION_KEYS[1:] if opts.get(k) is not None]
    if opts.get('rejection') in (None, 'none'):
        if given:
            raise ValueError(f'--{given[0]} is a DiffRS option: pass --rejection=diffrs too, or drop it')
        return None
    if not guided:
        raise ValueError('--rejection=diffrs tests each step with the discriminator: pass --disc and --classifier '
                         '(--w=0 for DiffRS without guidance)')
    if selection is not None:
        raise ValueError('--rejection=diffrs with --particles/--best_of: they are two ways to select with the discriminator; pass one')
    out = {k: opts.get(k) if opts.get(k) is not None else REJECTION_DEFAULTS[k] for k in REJECTION_KEYS[1:]}
    check_percentile(out['rej_percentile'])
    if settings is not None:
        if settings['sampler'] not in ('heun', 'euler'):
            raise ValueError(f'--sampler={settings["sampler"]}: --rejection=diffrs steps with heun or euler; pass --sampler=heun')
        if settings.get('boosting'):
            raise ValueError('--boosting with --rejection=diffrs: boosting acts on whole batches of one level; drop --boosting')
        if out['max_backsteps'] is not None and out['max_backsteps'] > settings['num_steps']:
            raise ValueError(f'--max_backsteps={out["max_backsteps"]}: above --steps={settings["num_steps"]}; '
                             f'pass at most {settings["num_steps"]} or drop it')
    return out
