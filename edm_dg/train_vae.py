"""Train a small diffusers AutoencoderKL on a small image set: the VAE of a latent toy model.

    python -m edm_dg.train_vae --data=datasets/digits --outdir=digits-vae

EDM2's latent models carry a `StabilityVAEEncoder` (docs/compat.md, "Latent models"), which
runs a diffusers VAE on pixels x / 255 in [0, 1] and decodes with
clamp(0, 1) * 255; this VAE is trained on the same range. Loss per image
element: MSE between the decoded posterior draw and x / 255, plus kl_weight
times the posterior's KL divergence from N(0, I). One encoder block keeps the
resolution (8x8 digits -> 4x8x8 latents); each further block halves it.

DIR is a `save_pretrained` folder (safetensors), loadable as the encoder's
`vae_name`, plus latent_stats.json: `raw_mean` and `raw_std`, the per-channel
mean and std of the posterior means over the data set, which standardise the
latents as EDM2's constants do for Stability's VAE, and `sample_std`, the std
of posterior draws. EDM2's final latents are draws, so their std is
final_std * sample_std / raw_std: close to final_std only where the posterior
std is small against the spread of its means (channels a small VAE hardly
uses keep a wide posterior).
"""

import math
import os
import time

import click
import torch
import tqdm

from torch_utils import distributed as dist
from . import fileio, image_sets
from .cli import command_body
from training import encoders

STATS_FILE = 'latent_stats.json'
_OUTPUTS = ('config.json', 'diffusion_pytorch_model.safetensors', STATS_FILE)

def build_vae(img_channels, *, latent_channels=4, block_out_channels=(32,), layers_per_block=1):
    """A randomly initialised AutoencoderKL (global torch RNG); GroupNorm groups: the largest divisor
    of every block width that is at most 32 (diffusers' default)."""
    AutoencoderKL = encoders.import_diffusers('training a VAE').AutoencoderKL
    widths = [int(w) for w in block_out_channels]
    common = math.gcd(*widths)
    groups = max(g for g in range(1, min(common, 32) + 1) if common % g == 0)
    return AutoencoderKL(in_channels=img_channels, out_channels=img_channels, latent_channels=latent_channels,
                         down_block_types=('DownEncoderBlock2D',) * len(widths),
                         up_block_types=('UpDecoderBlock2D',) * len(widths), block_out_channels=tuple(widths),
                         layers_per_block=layers_per_block, norm_num_groups=groups)

@torch.no_grad()
def latent_stats(vae, images_u8, batch=256):
    """Per-channel statistics of the posterior over uint8 images, as float lists: `raw_mean` and
    `raw_std` (population std) of the posterior means, and `sample_std`, the std of posterior
    draws, sqrt(raw_std^2 + mean posterior variance)."""
    device = next(vae.parameters()).device
    sums = torch.zeros(3, vae.config.latent_channels, dtype=torch.float64, device=device)
    count = 0
    for x in images_u8.split(batch):
        posterior = vae.encode(x.to(device, torch.float32) / 255).latent_dist
        mean, var = posterior.mean.to(torch.float64), posterior.var.to(torch.float64)
        sums += torch.stack([mean.sum(dim=(0, 2, 3)), mean.square().sum(dim=(0, 2, 3)), var.sum(dim=(0, 2, 3))])
        count += mean[:, 0].numel()
    mu, mean_sq, mean_var = sums / count
    var_of_means = (mean_sq - mu.square()).clamp(min=0)
    return dict(raw_mean=mu.tolist(), raw_std=var_of_means.sqrt().tolist(),
                sample_std=(var_of_means + mean_var).sqrt().tolist())

@torch.no_grad()
def reconstruction_psnr(vae, images_u8, batch=256):
    """PSNR (dB, peak 1) of decode(posterior mean).clamp(0, 1) against x / 255 over the set."""
    device = next(vae.parameters()).device
    se, count = 0.0, 0
    for x in images_u8.split(batch):
        x = x.to(device, torch.float32) / 255
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(0, 1)
        se += (y - x).to(torch.float64).square().sum().item()
        count += x.numel()
    return 10 * math.log10(1 / max(se / count, 1e-20))

def _check_outdir(outdir):
    if os.path.exists(outdir):
        if not os.path.isdir(outdir):
            raise ValueError(f'--outdir={outdir}: not a folder; pass a new folder for the VAE')
        others = sorted(set(os.listdir(outdir)) - set(_OUTPUTS))
        if others:
            raise ValueError(f'--outdir={outdir}: holds other files ({others[0]}, ...); pass a new or empty folder')

def train_vae(images_u8, outdir, *, steps=1000, batch=128, lr=1e-3, latent_channels=4, block_out_channels=(32,),
              layers_per_block=1, kl_weight=1e-5, seed=0, device='cpu', progress=True, log=print):
    """Train on uint8 images [N,C,H,W]; write the VAE and latent_stats.json to `outdir` (whole folder at once).

    Returns the VAE (CPU, eval mode, frozen) and the stats written to latent_stats.json
    (`latent_stats`, plus recon_psnr: `reconstruction_psnr` in dB).
    """
    _check_outdir(outdir)
    n, c, h, w = images_u8.shape
    levels = len(block_out_channels)
    if h % (1 << (levels - 1)) or w % (1 << (levels - 1)):
        raise ValueError(f'images of {h}x{w} cannot be halved {levels - 1} times; use fewer blocks')
    device = torch.device(device)
    torch.manual_seed(seed)
    vae = build_vae(c, latent_channels=latent_channels, block_out_channels=block_out_channels,
                    layers_per_block=layers_per_block).train().to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    x_all = (images_u8.to(torch.float32) / 255).to(device)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    bar = tqdm.tqdm(range(steps), desc='train VAE', disable=not progress, dynamic_ncols=True)
    for step in bar:
        x = x_all[torch.randint(n, (batch,), generator=gen).to(device)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = (vae.decode(z).sample - x).square().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = recon + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(recon=f'{recon.item():.5f}', kl=f'{kl.item():.3f}')
    bar.close()
    vae.eval().requires_grad_(False)
    stats = latent_stats(vae, images_u8)
    stats['recon_psnr'] = reconstruction_psnr(vae, images_u8)
    log(f'VAE training: {steps} steps in {time.time() - start:.0f}s, reconstruction PSNR {stats["recon_psnr"]:.2f} dB')
    vae = vae.cpu()
    with fileio.atomic_dir(outdir) as tmp:
        vae.save_pretrained(tmp)
        fileio.atomic_write_json(os.path.join(tmp, STATS_FILE), stats, indent=2)
    return vae, stats

def _parse_widths(text):
    try:
        widths = tuple(int(v) for v in text.split(','))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise ValueError(f'--channels={text}: expected positive integers separated by commas, e.g. --channels=32')
    return widths

@click.command(help=__doc__)
@click.option('--data', help='Image set (EDM dataset zip or folder, or image folder)', metavar='PATH', required=True)
@click.option('--outdir', help='Folder for the VAE (new, or a previous VAE folder to replace)', metavar='DIR', required=True)
@click.option('--steps', type=click.IntRange(min=0), default=1000, show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--latent_channels', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--channels', help='Width of each encoder/decoder block (comma list; n blocks halve n-1 times)',
              metavar='LIST', default='32', show_default=True)
@click.option('--kl_weight', help='Weight of the KL term per image element', type=click.FloatRange(min=0),
              default=1e-5, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@command_body
def main(data, outdir, channels, device, **kwargs):
    widths = _parse_widths(channels)
    images, _labels = image_sets.load_image_set(data)
    try:
        train_vae(images, outdir, block_out_channels=widths, device=dist.init_device(device), **kwargs)
    except ImportError as e:
        raise click.ClickException(str(e)) from None

if __name__ == '__main__':
    main()
