"""Encode an image set into an EDM2 latent dataset, as EDM2's `dataset_tool.py encode` does.

    python -m edm_dg.encode_dataset --source=datasets/img512.zip --dest=datasets/img512-sd [--vae=DIR]

Each image becomes NNNNN/img-mean-std-NNNNNNNN.npy: the VAE posterior's mean and
std (raw latents, 8 x H/8 x W/8 for Stability's VAE), with the labels in
dataset.json (docs/compat.md, "Latent models"). The VAE is fetched by
--model_url (EDM2's --model-url) or read from a local diffusers folder (--vae).
The result feeds `python -m edm_dg.train_classifier --data=DEST --encoder=PKL`
and `train_disc.py --real=DEST`.
"""

import click

from torch_utils import distributed as dist
from .cli import command_body
from .latents import KNOWN_VAES, encode_dataset
from .options import VAE

@click.command(help=__doc__)
@click.option('--source', help='Images: EDM dataset zip or folder, image folder, or .npz', metavar='PATH', required=True)
@click.option('--dest', help='Output folder (written whole at the end)', metavar='DIR', required=True)
@click.option('--model_url', '--model-url', 'vae_name', help='The VAE to fetch by name (EDM2\'s --model-url)', metavar='NAME',
              default=KNOWN_VAES[0], show_default=True)
@VAE
@click.option('--max_images', '--max-images', 'max_images', help='Encode at most this many images', type=click.IntRange(min=1), default=None)
@click.option('--batch', help='Images per VAE call', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@command_body
def main(source, dest, vae_name, vae, max_images, batch, device):
    encode_dataset(source, dest, vae, vae_name=vae_name, max_images=max_images, batch=batch, device=dist.init_device(device))

if __name__ == '__main__':
    main()
