"""Train a noise-conditional ADM classifier to use as DG feature extractor on a new dataset.

    python -m edm_dg.train_classifier --data=datasets/mydata.zip --outdir=cls-run
    python -m edm_dg.train_classifier --data=img512-sd.zip --encoder=edm2-img512-s.pkl --outdir=cls-latent

VP time is importance-sampled as in discriminator training, images perturbed,
and the classifier trained with cross-entropy on the class labels. The result,
`classifier.pt`, is a guided-diffusion-layout state dict that `--classifier`
accepts. Resumable with --resume (state saved every epoch).
"""

import os
import time

import click
import torch
import tqdm
from torch.nn import functional as F

from torch_utils import distributed as dist
from . import fileio, image_sets, latents, vp
from .adm import EncoderUNet
from .cli import command_body
from .options import LATENT_ENCODER, TRUST_PICKLE, VAE

def train_classifier(data, outdir, *, epochs=20, batch=128, lr=3e-4, weight_decay=0.05, width=128, depth=2,
                     attention='32,16,8', seed=0, resume=False, device='cpu', encoder_pkl=None, vae=None, trust_pickle=False,
                     progress=True, log=print):
    """Returns the path of classifier.pt (written atomically after every epoch).

    Latents (edm_dg.latents): an EDM2 latent dataset, latent shards, or images
    encoded with `vae`; raw latents and images are standardised by the encoder
    of `encoder_pkl` (a latent EDM2 pickle). The classifier then takes the
    model's latents (e.g. 4x64x64 for img512); what it judges is recorded by
    the discriminators trained on it (train_disc.py).
    """
    device = torch.device(device)
    if encoder_pkl is not None or vae is not None or latents.is_latent_source(data):
        space = None if encoder_pkl is None else latents.space_of_pickle(encoder_pkl, trust_pickle)
        images, labels, space = latents.load_latent_set(data, space=space, vae=vae, seed=seed, device=device, log=log)
        log(f'Training on {len(images)} latents {list(images.shape[1:])} ({latents.describe(space)}).')
    else:
        images, labels = image_sets.load_image_set(data)
    if labels is None:
        raise ValueError(f'{data}: no class labels (dataset.json); a classifier needs a labelled dataset')
    res = images.shape[2]
    num_classes = int(labels.max()) + 1
    torch.manual_seed(seed)
    net = EncoderUNet.from_create_classifier_args(image_size=res, in_channels=images.shape[1], classifier_width=width,
                                                  classifier_depth=depth, classifier_attention_resolutions=attention,
                                                  out_channels=num_classes).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    os.makedirs(outdir, exist_ok=True)
    state_path = os.path.join(outdir, 'classifier-state.pt')
    start = 0
    if os.path.isfile(state_path):
        if not resume:
            raise ValueError(f'{outdir}: already holds a classifier run; pass --resume or choose another --outdir')
        st = torch.load(state_path, map_location='cpu', weights_only=True)
        net.load_state_dict(st['net'])
        opt.load_state_dict(st['optimizer'])
        start = st['epoch']
    images, labels = images.to(device), labels.to(device)
    n = len(images)
    steps = max(n // batch, 1)
    out_path = os.path.join(outdir, 'classifier.pt')
    for epoch in range(start, epochs):
        net.train()
        perm = torch.randperm(n, generator=vp.seeded_generator('cpu', seed, epoch)).to(device)
        gen = vp.seeded_generator(device, seed, epoch, 7)
        t0, tot, correct = time.time(), 0.0, 0
        bar = tqdm.tqdm(range(steps), desc=f'classifier {epoch + 1}/{epochs}', disable=not progress, leave=False, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * batch:(step + 1) * batch]
            x, tau = vp.noisy_batch(images[idx], gen)
            logits = net(x, tau)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            bar.set_postfix(loss=f'{tot / ((step + 1) * batch):.3f}')
        bar.close()
        log(f'classifier epoch {epoch + 1}/{epochs}: loss {tot / (steps * batch):.4f}, '
            f'acc {correct / (steps * batch):.3f}, {time.time() - t0:.1f}s')
        fileio.atomic_torch_save({k: v.cpu() for k, v in net.state_dict().items()}, out_path)
        fileio.atomic_torch_save(dict(net=net.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1), state_path)
    return out_path

@click.command(help=__doc__)
@click.option('--data', help='Labelled EDM dataset (zip or folder with dataset.json), or latents: an EDM2 latent dataset (dataset_tool.py encode), latent shards, or images with --vae', metavar='PATH', required=True)
@click.option('--outdir', help='Run folder; classifier.pt is written there', metavar='DIR', required=True)
@click.option('--epochs', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr', type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option('--width', help='Base channels (multiple of 64)', type=click.IntRange(min=64), default=128, show_default=True)
@click.option('--depth', help='Residual blocks per level', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--resume', is_flag=True, help='Continue the run in --outdir')
@LATENT_ENCODER
@VAE
@TRUST_PICKLE
@click.option('--device', default=None, help='Device  [default: cuda if available]')
@command_body
def main(device, **kwargs):
    train_classifier(device=dist.init_device(device), **kwargs)

if __name__ == '__main__':
    main()
