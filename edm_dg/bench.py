"""Sampling benchmark: plain EDM vs. discriminator-guided, against the arithmetic (FLOP) floor.

Real-size networks with seeded random weights: EDM's CIFAR-10 DDPM++ EDMPrecond
(55.7 M parameters), the 32x32 ADM classifier and the released head layout.
Same process, same inputs; warm-up excluded; median of repeats. --baseline adds
guided sampling with the discriminator run as the DG release runs it; --diffrs adds DiffRS against
plain Heun (images/s and NFE/image of both, the warm-up timed apart). --edm2=NAME times instead a published
EDM2 layout (random weights, --edm2_channels to shrink it): plain, guided by the next smaller layout
(autoguidance's cost), guided only inside EDM2's interval, guided + DG with a 64x64 ADM classifier layout (pixel
layouts), and the VAE decode of a random sd-vae-ft-mse-layout VAE (latent layouts; --vae_layout=tiny for a tiny one).

    python -m edm_dg.bench --batch=4 --steps=6 [--baseline] [--diffrs] [--device=cuda --precision=bf16]
    python -m edm_dg.bench --edm2=edm2-img64-s --batch=1 --steps=4
"""

import math
import statistics
import time

import click
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from training import networks
from . import vp
from .adm import AttentionBlock, EncoderUNet
from .discriminator import Discriminator, make_head
from .layouts import ADM_CLASSIFIERS, EDM2_NETWORKS, edm2_network, edm_network
from .precision import PRECISIONS, fast_paths
from .sampling import diffrs, dg_sampler, edm_schedule, nfe, window_on_host
from .sampling.score import log_ratio_vp

# The VAE layouts for --vae_layout: sd-vae-ft-mse's (diffusers' AutoencoderKL defaults: 8x down-sampling) and a tiny one.
VAE_LAYOUTS = {'sd-vae-ft-mse': dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
               'tiny': dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1)}

def cifar10_ddpmpp(seed=0, label_dim=0):
    """EDM's CIFAR-10 DDPM++ configuration (train.py --arch=ddpmpp --precond=edm)."""
    torch.manual_seed(seed)
    cls, kwargs = edm_network('cifar10-32x32-uncond-vp', label_dim=label_dim)
    return getattr(networks, cls)(**kwargs).eval().requires_grad_(False)

def released_discriminator(seed=0, res=32):
    """The release's classifier layout of resolution res (32 or 64) and its head layout, seeded random weights."""
    torch.manual_seed(seed)
    cls = EncoderUNet.from_create_classifier_args(**ADM_CLASSIFIERS[f'{res}x{res}_classifier'])
    head = make_head(cls.feature_channels, cls.feature_resolution)
    with torch.no_grad():  # Random but non-degenerate: guided-diffusion zero-initialises some output layers.
        for p in list(cls.parameters()) + list(head.parameters()):
            if p.ndim > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return Discriminator(cls, head).eval().requires_grad_(False)

#----------------------------------------------------------------------------
# The DG release's way of running the discriminator (baseline for both benchmarks).

class _CheckpointAll(torch.autograd.Function):
    """guided-diffusion's gradient checkpointing: no graph in the forward; the backward runs the
    block again and differentiates it with respect to its input *and all its parameters*."""

    @staticmethod
    def forward(ctx, block, x, *params):
        ctx.block, ctx.params = block, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return release_attention(block, x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.saved_tensors[0].detach().requires_grad_(True)
        with torch.enable_grad():
            out = release_attention(ctx.block, x)
        grads = torch.autograd.grad(out, (x, *ctx.params), grad, allow_unused=True)
        return (None, *grads)

def release_attention(block, x):
    """guided-diffusion's AttentionBlock arithmetic: 1x1 convolutions and QKVAttentionLegacy's einsums."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = block.qkv(block.norm(x))
    ch = c // block.num_heads
    q, k, v = qkv.reshape(b * block.num_heads, ch * 3, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.einsum('bct,bcs->bts', q * scale, k * scale)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    h = block.proj_out(torch.einsum('bts,bcs->bct', w, v).reshape(b, c, -1))
    return (x + h).reshape(b, c, *spatial)

def release_style(disc):
    """Run `disc` (in place) as the DG release does: every parameter trainable and every
    attention block checkpointed with ADM's einsum attention."""
    disc.requires_grad_(True)
    for m in disc.modules():
        if isinstance(m, AttentionBlock):
            m.forward = (lambda m: lambda x: _CheckpointAll.apply(m, x, *m.parameters()))(m)
    return disc

#----------------------------------------------------------------------------

def count_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

def flop_floor(net, disc, batch, steps, device, w1=2.0, time_min=0.01, time_max=1.0):
    """(plain FLOPs, guided FLOPs) of one sampling run, from per-call counts and the step schedule."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    sigma = torch.full([batch], 1.0, device=device)
    f_net = count_flops(lambda: net(x, sigma))
    def dg_fwd_bwd():  # dg_correction's work; FlopCounterMode cannot follow autograd.grad, so use backward().
        x_vp = x.detach().clone().requires_grad_(True)
        log_ratio_vp(disc, x_vp, vp.sigma_to_tau(sigma.double())).sum().backward()
    f_dg = count_flops(dg_fwd_bwd)
    t = edm_schedule(net, steps)[1]
    evals = nfe('heun', steps, net)
    guided_evals = sum(1 for s in t[:-1] if window_on_host([s], time_min, time_max)) if w1 else 0
    return evals * f_net, evals * f_net + guided_evals * f_dg, f_net / batch, f_dg / batch

def time_interleaved(fns, repeats):
    """Median time of each fn and the median of its per-round time ratio to fns[0].

    Every round runs each fn once in turn, so drift in the machine's speed
    (shared hosts, clocks) hits all alike; a first warm-up round (and any
    compilation in it) is excluded.
    """
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    medians = [statistics.median(ts) for ts in times]
    ratios = [statistics.median([t / t0 for t, t0 in zip(ts, times[0])]) for ts in times]
    return medians, ratios

def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()

@click.command(help=__doc__)
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@click.option('--batch', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--steps', type=click.IntRange(min=2), default=6, show_default=True)
@click.option('--repeats', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--precision', type=click.Choice(PRECISIONS), default='fp32', show_default=True, help='Score-network precision')
@click.option('--disc_precision', type=click.Choice(PRECISIONS), default=None, help='Discriminator precision  [default: --precision]')
@click.option('--channels_last', is_flag=True)
@click.option('--compile', 'compile_nets', is_flag=True)
@click.option('--w1', type=float, default=2.0, show_default=True)
@click.option('--baseline', is_flag=True, help='Also time guided sampling with the discriminator run as the DG release runs it')
@click.option('--diffrs', 'with_diffrs', is_flag=True, help='Also time DiffRS (plain transitions) against plain Heun on 2 x --batch seeds: images/s and NFE/image')
@click.option('--rej_percentile', type=click.FloatRange(0, 1), default=0.75, show_default=True, help='DiffRS gamma (with --diffrs)')
@click.option('--max_iter', type=click.IntRange(min=1), default=None, help='DiffRS budget per attempt (with --diffrs)  [default: none]')
@click.option('--edm2', 'edm2_name', type=click.Choice(sorted(EDM2_NETWORKS)), default=None, help='Time an EDM2 layout instead (pixel layouts: with DG too)')
@click.option('--edm2_channels', type=click.IntRange(min=8), default=None, help='model_channels of --edm2 and its guide  [default: the published ones]')
@click.option('--vae_layout', type=click.Choice(sorted(VAE_LAYOUTS)), default='sd-vae-ft-mse', show_default=True, help='Latent --edm2 layouts: the random VAE whose decode is timed')
def main(device, batch, steps, repeats, precision, disc_precision, channels_last, compile_nets, w1, baseline, with_diffrs,
         rej_percentile, max_iter, edm2_name, edm2_channels, vae_layout):
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if edm2_name is not None:
        return edm2_bench(edm2_name, edm2_channels, batch, steps, repeats, device, w1, vae_layout=vae_layout)
    disc_precision = disc_precision or precision
    net = cifar10_ddpmpp().to(device)
    disc = released_discriminator().to(device)
    fl_plain, fl_guided, f_net, f_dg = flop_floor(net, disc, batch, steps, device, w1)
    run_net, run_disc = fast_paths(net, disc, precision, disc_precision, channels_last, compile_nets)
    latents = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    def sample(guide):
        def fn():
            g = torch.Generator(device).manual_seed(1)
            with torch.no_grad():
                dg_sampler(run_net, latents, None, lambda x: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype),
                           num_steps=steps, discriminator=guide, dg_weight_1st_order=w1 if guide is not None else 0)
            sync(device)
        return fn
    runs = {'plain': sample(None), 'guided': sample(run_disc)}
    if baseline:
        runs['release-style guided'] = sample(release_style(released_discriminator().to(device)))
    medians, ratios = time_interleaved(list(runs.values()), repeats)
    floor = fl_guided / fl_plain
    print(f'device={device} ({torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"}) '
          f'batch={batch} steps={steps} precision={precision} disc_precision={disc_precision} channels_last={channels_last} compile={compile_nets}')
    print(f'FLOPs per image: score net {f_net / 1e9:.1f} G per call; DG correction (fwd+bwd) {f_dg / 1e9:.1f} G per call')
    print(f'{"":<22}{"s/run":>9}{"images/s":>10}{"vs plain":>10}')
    for name, t, r in zip(runs, medians, ratios):
        print(f'{name:<22}{t:>9.3f}{batch / t:>10.2f}{r:>10.3f}')
    ratio = ratios[1]
    print(f'guided/plain time ratio {ratio:.3f} (median over {repeats} alternating rounds); FLOP floor {floor:.3f}; {100 * (ratio / floor - 1):+.1f}% above the floor')
    print(f'50,000 images (FID-50k) with --steps={steps} at these rates on one device: plain {50000 * medians[0] / batch / 3600:.1f} h, guided {50000 * medians[1] / batch / 3600:.1f} h')
    out = dict(floor=floor, ratio=ratio, **{name: t for name, t in zip(runs, medians)})
    if with_diffrs:
        out['diffrs'] = diffrs_vs_plain(run_net, run_disc, batch, steps, repeats, device, rej_percentile, max_iter)
        print_diffrs(out['diffrs'], rej_percentile, max_iter, repeats)
    return out

#----------------------------------------------------------------------------
# EDM2 layouts (--edm2): plain, autoguided, guided in an interval, guided + DG.

EDM2_GUIDES = {'xxl': 'xl', 'xl': 'l', 'l': 'm', 'm': 's', 's': 'xs', 'xs': 'xs', 'xxs': 'xxs'}
EDM2_INTERVAL = (0.28, 2.9)  # Kynkaanniemi et al. 2024: guidance between these noise levels

def edm2_bench(name, channels, batch, steps, repeats, device, w_dg=2.0, guidance=2.0, vae_layout='sd-vae-ft-mse', with_dg=True):
    """Seconds per run, images/s and network evaluations per image of EDM2 sampling, plain vs. guided; for latent
    layouts also the VAE decode of the batch."""
    from training import networks_edm2
    from .generate import draw_inputs
    from .pickles import EDM2Network
    from .sampling import build_chain, sample
    from .sampling.hooks import SampleState
    size = name.rsplit('-', 1)[-1]
    guide_name = name[:-len(size)] + EDM2_GUIDES[size]
    guide_name = guide_name if guide_name in EDM2_NETWORKS else name
    def make(layout, seed):  # --edm2_channels shrinks the guide in the published proportion
        kwargs = edm2_network(layout)[1]
        if channels is not None:
            share = kwargs['model_channels'] / edm2_network(name)[1]['model_channels']
            kwargs['model_channels'] = max(8, int(round(channels * share / 8)) * 8)
        torch.manual_seed(seed)
        return EDM2Network(networks_edm2.Precond(**kwargs).eval().requires_grad_(False).to(device))
    net, guide = make(name, 0), make(guide_name, 1)
    res, C, L = net.img_resolution, net.img_channels, net.label_dim
    latents, labels, _ = draw_inputs([C, res, res], L, list(range(batch)), device)
    disc = None
    if C == 3 and with_dg:  # A pixel model: DG with the 64x64 ADM classifier layout and the release's head layout.
        disc = released_discriminator(res=res).to(device)
    cases = {'plain': dict(), f'guided w={guidance}': dict(gnet=guide, guidance=guidance),
             f'guided in {EDM2_INTERVAL}': dict(gnet=guide, guidance=guidance, guidance_interval=EDM2_INTERVAL)}
    if disc is not None:
        cases[f'guided + DG w_dg={w_dg}'] = dict(gnet=guide, guidance=guidance, discriminator=disc, dg_weight_1st_order=w_dg)
    def run(kw):
        def fn():
            with torch.no_grad():
                sample(net, latents, labels, num_steps=steps, **kw)
            sync(device)
        return fn
    fns = [run(kw) for kw in cases.values()]
    vae = None
    if C == 4:  # A latent model: its decode, by a random VAE of sd-vae-ft-mse's layout (or a tiny one).
        vae = random_vae(vae_layout, device)
        def decode():
            with torch.no_grad():
                vae.decode(latents.to(torch.float32))
            sync(device)
        fns.append(decode)
    medians, ratios = time_interleaved(fns, repeats)
    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f'device={device} {name} ({params(net):.1f} M parameters), guide {guide_name} ({params(guide):.1f} M), '
          f'batch={batch} steps={steps}, EDM2 sampling conventions (float32 Heun)')
    print(f'{"":<30}{"s/run":>9}{"images/s":>10}{"vs plain":>10}{"NFE/image":>11}')
    out = {}
    for (case, kw), t, r in zip(cases.items(), medians, ratios):
        chain_kw = {k: v for k, v in kw.items() if k in ('gnet', 'guidance', 'guidance_interval')}
        den, _ = build_chain(net, SampleState(), **chain_kw)
        evals = nfe('heun', steps, den)
        print(f'{case:<30}{t:>9.3f}{batch / t:>10.3f}{r:>10.3f}{evals:>11}')
        out[case] = dict(seconds=t, ratio=r, nfe=evals)
    if vae is not None:
        print(f'{"VAE decode (" + vae_layout + f", {params(vae):.1f} M)":<30}{medians[-1]:>9.3f}{batch / medians[-1]:>10.3f}'
              f'{ratios[-1]:>10.3f}{"":>11}   decode / plain sampling per image: {ratios[-1]:.3f}')
        out['decode'] = dict(seconds=medians[-1], ratio=ratios[-1], layout=vae_layout)
    return out

def random_vae(layout, device, seed=0):
    """A diffusers AutoencoderKL with seeded random weights in one of VAE_LAYOUTS (4 latent channels)."""
    from .train_vae import build_vae
    torch.manual_seed(seed)
    return build_vae(3, **VAE_LAYOUTS[layout]).eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------
# DiffRS against plain Heun (--diffrs): the same seeds, the same process, interleaved rounds.

def diffrs_vs_plain(net, disc, batch, steps, repeats, device, rej_percentile=0.75, max_iter=None, images=None):
    """dict of plain Heun's and DiffRS's seconds per run of `images` seeds (default 2 * batch), images/s, NFE per
    image and the DiffRS summary. DiffRS keeps `batch` slots filled from the queue of seeds (plain transitions);
    plain Heun samples the same latents in batches of `batch`. The warm-up (100 samples) is timed apart."""
    from .generate import draw_inputs
    from .sampling.selection import host_to_device
    n = images or 2 * batch
    seeds = list(range(n))
    rs = diffrs.DiffRS(net, disc, num_steps=steps, rej_percentile=rej_percentile, max_iter=max_iter)
    t0 = time.perf_counter()
    th = rs.warmup(1, device=device, batch=batch)
    sync(device)
    warmup_s = time.perf_counter() - t0
    latents = draw_inputs([net.img_channels, net.img_resolution, net.img_resolution], 0, seeds, device)[0]
    def plain():
        with torch.no_grad():
            for i in range(0, n, batch):
                dg_sampler(net, latents[i:i + batch], None, num_steps=steps)
        sync(device)
    records = []
    def rejected():
        records.clear()
        draw = lambda pos: (latents[host_to_device(np.asarray(pos), latents.device)], None)
        for _, _, _, recs in rs.generate(seeds, draw, th, batch=batch, device=device):
            records.extend(recs)
        sync(device)
    (t_plain, t_rs), (_, ratio) = time_interleaved([plain, rejected], repeats)
    summary = diffrs.summarize(records)
    return dict(images=n, warmup_s=warmup_s, plain_s=t_plain, diffrs_s=t_rs, time_ratio=ratio,
                plain_nfe=nfe('heun', steps, net), summary=summary)

def print_diffrs(r, rej_percentile, max_iter, repeats):
    s = r['summary']
    print(f'DiffRS (plain transitions, gamma={rej_percentile}, max_iter={max_iter or "none"}), {r["images"]} seeds per run; '
          f'warm-up of {diffrs.WARMUP_BATCH} samples {r["warmup_s"]:.1f} s (not timed below)')
    print(f'{"":<22}{"s/run":>9}{"images/s":>10}{"NFE/image":>11}')
    print(f'{"plain heun":<22}{r["plain_s"]:>9.3f}{r["images"] / r["plain_s"]:>10.2f}{r["plain_nfe"]:>11.2f}')
    print(f'{"diffrs":<22}{r["diffrs_s"]:>9.3f}{r["images"] / r["diffrs_s"]:>10.2f}{s["mean_nfe_total"]:>11.2f}'
          f'   (final attempts {s["mean_nfe"]:.2f}, restarts {s["restarts"]})')
    print(f'diffrs/plain: time per image {r["time_ratio"]:.3f} (median over {repeats} alternating rounds), '
          f'NFE per image {s["mean_nfe_total"] / r["plain_nfe"]:.3f}; acceptance per level '
          + ' '.join('-' if a is None else f'{a:.3f}' for a in s['acceptance']))

if __name__ == '__main__':
    main()
