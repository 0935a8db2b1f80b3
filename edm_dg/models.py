"""The one model loader of the commands: EDM network + optional discriminator, validated together.

Rank 0 loads (and downloads into the cache) first; the other torchrun ranks then
read its cache. Every mismatch between the network, the classifier and the head
is refused with one line naming the file and the fix.
"""

import os

from torch_utils import distributed as dist
from . import latents
from .disc_checkpoint import load_discriminator
from .pickles import load_network_pickle

DISCRETISATIONS = ('vp', 've', 'iddpm', 'edm')  # Values of the release's --disc, its time-step ablation.

def load_models(network_pkl, device, *, disc_path=None, classifier_path=None, trust_pickle=False,
                lora_alpha=None, disc_time=None, lora_checkpoint=None, lora_rank=None, disc_cond=None, vae=None,
                encoder_batch=None, decode=True, log=None):
    """(net, disc): the frozen sampling network of an EDM pickle and the frozen Discriminator (or None).

    A latent EDM2 model's VAE is loaded here (from --vae=DIR, else by its name)
    and decodes in batches of encoder_batch (not with decode=False: nll.py works
    in the model's space); the discriminator must judge the model's space (edm_dg.latents).

    lora_checkpoint / lora_rank: the study's adapter file beside the classifier
    and its rank (checked against the file). disc_cond: what the peers' --cond /
    --conditional say the head is (None: not said); a head of the other kind is refused.
    """
    log = log or dist.print0
    if disc_path in DISCRETISATIONS and not os.path.exists(disc_path):
        raise ValueError(f'--disc={disc_path}: in edm-dg --disc is the discriminator file; the release\'s --disc (time '
                         f'discretisation) is not an option here (EDM\'s steps are used): drop it')
    if disc_path is not None and classifier_path is None:
        raise ValueError(f'{disc_path}: a discriminator needs its feature extractor; pass --classifier (e.g. 32x32_classifier.pt; '
                         f'the DG release reads checkpoints/ADM_classifier/32x32_classifier.pt, the study '
                         f'guided_diffusion/model/32x32_classifier.pt)')
    if disc_path is None:
        given = [(name, value) for name, value in (('--classifier', classifier_path), ('--lora_checkpoint', lora_checkpoint)) if value]
        if given:
            raise ValueError(f'{given[0][1]}: {given[0][0]} given without --disc; pass the discriminator head as --disc (the release\'s '
                             f'checkpoints/discriminator/cifar_uncond/discriminator_60.pt, or --discriminator_checkpoint as the study names it)')
    with dist.rank0_first():
        log(f'Loading network from "{network_pkl}"...')
        net = load_network_pickle(network_pkl, trust_pickle=trust_pickle, verbose=(dist.get_rank() == 0))
        net = net.eval().requires_grad_(False).to(device)
        if decode:
            latents.prepare_encoder(getattr(net, 'encoder', None), device, vae=vae, batch_size=encoder_batch,
                                    trust_pickle=trust_pickle, source=network_pkl)
        disc = None
        if disc_path is not None:
            log(f'Loading discriminator from "{disc_path}" with classifier "{classifier_path}"...')
            disc = load_discriminator(disc_path, classifier_path, device=device, time_schedule=disc_time, lora_alpha=lora_alpha,
                                      lora_checkpoint=lora_checkpoint, lora_rank=lora_rank)
            log(time_convention_line(disc))
    check_pair(net, disc, network_pkl, disc_path, classifier_path)
    if disc is not None and disc_cond is not None and bool(disc_cond) != disc.cond:
        kind = 'class-conditional' if disc.cond else 'unconditional'
        raise ValueError(f'{disc_path}: the head is {kind} but --cond/--conditional={int(bool(disc_cond))}; '
                         f'pass --cond={int(disc.cond)} or drop it (edm-dg reads the kind from the file)')
    return net, disc

def load_guide(gnet_pkl, net, device, *, network_pkl='--network', trust_pickle=False, log=None):
    """The frozen guide network of --gnet (EDM or EDM2 pickle, the same loader as --network), checked against net."""
    log = log or dist.print0
    with dist.rank0_first():
        log(f'Loading guide network from "{gnet_pkl}"...')
        guide = load_network_pickle(gnet_pkl, trust_pickle=trust_pickle, verbose=(dist.get_rank() == 0))
        guide = guide.eval().requires_grad_(False).to(device)
    check_guide(net, guide, network_pkl, gnet_pkl)
    return guide

def check_guide(net, guide, network_pkl='--network', gnet_pkl='--gnet'):
    """Refuse a guide that denoises other images than net: resolution, channels, classes (0 = unconditional is fine)."""
    shape = lambda n: f'{n.img_channels}x{n.img_resolution}x{n.img_resolution}'
    if (guide.img_resolution, guide.img_channels) != (net.img_resolution, net.img_channels):
        raise ValueError(f'--gnet={gnet_pkl}: the guide makes {shape(guide)} images but {network_pkl} makes {shape(net)}; '
                         f'pass a guide of the same resolution and channels')
    if getattr(guide, 'encoder', None) is not None and not latents.same_space(latents.space_of_net(net), latents.space_of_net(guide)):
        raise ValueError(f'--gnet={gnet_pkl}: the guide works in {latents.describe(latents.space_of_net(guide))} but {network_pkl} in '
                         f'{latents.describe(latents.space_of_net(net))}; pass a guide of the same space')
    if guide.label_dim and guide.label_dim != net.label_dim:
        has = f'{net.label_dim} classes' if net.label_dim else 'no classes (unconditional)'
        raise ValueError(f'--gnet={gnet_pkl}: the guide is conditioned on {guide.label_dim} classes but {network_pkl} has {has}; '
                         f'pass a guide with the same classes, or an unconditional one (classifier-free guidance)')

def check_fast_paths(net, precision='fp32', channels_last=False, compile_nets=False, network_pkl='--network'):
    """Refuse --precision/--channels_last/--compile for EDM2 networks: they choose their own precision (use_fp16)."""
    from .pickles import EDM2Network
    given = [o for o, on in (('--precision', precision not in (None, 'fp32')), ('--channels_last', channels_last),
                             ('--compile', compile_nets)) if on]
    if given and isinstance(net, EDM2Network):
        raise ValueError(f'{given[0]} applies to EDM networks; {network_pkl} is an EDM2 network, which runs its U-Net in '
                         f'float16 on CUDA as its pickle says (use_fp16): drop {given[0]} (--disc_precision still applies)')

def time_convention_line(disc):
    """One line: which time the classifier is fed, where that came from, and how to change it."""
    schedule = disc.time_schedule
    fed = 'cosine-schedule time mapped from linear VP tau' if schedule == 'cosine' else 'linear VP time tau'
    text = f'Discriminator time convention: {schedule} (classifier fed {fed})'
    source = getattr(disc, 'time_source', None)
    if source == 'option':
        return text + '; set by --disc_time'
    if source == 'checkpoint':
        return text + '; as recorded in the checkpoint (override with --disc_time)'
    if disc.classifier.image_size == 64:
        return (text + f'; the head records no convention, assuming the release\'s sampler convention ({schedule} at 64x64); '
                f'for a head trained the release\'s way (linear time in training) pass --disc_time=linear')
    return text + f'; the head records no convention, assuming the release\'s ({schedule}); change it with --disc_time'

def check_pair(net, disc, network_pkl='--network', disc_path='--disc', classifier_path='--classifier'):
    """Refuse a discriminator that cannot judge this network's images."""
    if disc is None:
        return
    latents.check_space(latents.space_of_net(net), getattr(disc, 'space', None), network_pkl, disc_path)
    if disc.cond and not net.label_dim:
        raise ValueError(f'{disc_path}: class-conditional discriminator but {network_pkl} is unconditional; use an unconditional discriminator')
    rows = disc.head.label_emb.num_embeddings if disc.cond else 0
    if disc.cond and rows < net.label_dim:  # The release's heads have 1000 rows, also for 10 classes: class c uses row c.
        raise ValueError(f'{disc_path}: head embeds {rows} classes but {network_pkl} has {net.label_dim}; '
                         f'pass a conditional discriminator with at least {net.label_dim} label rows')
    c = disc.classifier
    if c.image_size != net.img_resolution or c.in_channels != net.img_channels:
        raise ValueError(f'{classifier_path}: classifier takes {c.in_channels}x{c.image_size}x{c.image_size} images but '
                         f'{network_pkl} makes {net.img_channels}x{net.img_resolution}x{net.img_resolution}; pass a matching classifier')

def check_class(net, class_idx, network_pkl='--network'):
    """Refuse a --class the network cannot take."""
    if class_idx is None:
        return
    if not net.label_dim:
        raise ValueError(f'{network_pkl}: --class given but the network is unconditional; drop --class')
    if class_idx >= net.label_dim:
        raise ValueError(f'--class={class_idx} out of range: {network_pkl} has {net.label_dim} classes (0-{net.label_dim - 1})')
