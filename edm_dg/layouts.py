"""Published network configurations, as constructor arguments: EDM's and EDM2's networks, the DG
release's ADM classifier and head, and OpenAI's 64x64 ADM classifier.

Facts from EDM's `train.py` (Karras et al. 2022), guided-diffusion's
`create_classifier` (Dhariwal & Nichol 2021) and the DG release (Kim et al.
2023); docs/compat.md §1 and §4. Benchmarks and tests build real-layout
networks from these (with random weights, or scaled-down widths).
"""

_DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128)
_NCSNPP = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128)

# EDM's published pickles: (preconditioning class, constructor arguments).
EDM_NETWORKS = {
    'cifar10-32x32-uncond-vp': ('EDMPrecond', dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9,
                                                   dropout=0.13, channel_mult=[2, 2, 2], **_DDPMPP)),
    'cifar10-32x32-cond-vp': ('EDMPrecond', dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9,
                                                 dropout=0.13, channel_mult=[2, 2, 2], **_DDPMPP)),
    'cifar10-32x32-uncond-ve': ('EDMPrecond', dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9,
                                                   dropout=0.13, channel_mult=[2, 2, 2], **_NCSNPP)),
    'ffhq-64x64-uncond-vp': ('EDMPrecond', dict(img_resolution=64, img_channels=3, label_dim=0, augment_dim=9,
                                                dropout=0.05, channel_mult=[1, 2, 2, 2], **_DDPMPP)),
    'afhqv2-64x64-uncond-vp': ('EDMPrecond', dict(img_resolution=64, img_channels=3, label_dim=0, augment_dim=9,
                                                  dropout=0.25, channel_mult=[1, 2, 2, 2], **_DDPMPP)),
    'imagenet-64x64-cond-adm': ('EDMPrecond', dict(img_resolution=64, img_channels=3, label_dim=1000, dropout=0.10,
                                                   model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4])),
}

# guided-diffusion create_classifier arguments of the checkpoints DG uses.
_ADM_CLASSIFIER = dict(classifier_width=128, classifier_depth=4, classifier_attention_resolutions='32,16,8',
                       classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                       classifier_pool='attention', out_channels=1000)
ADM_CLASSIFIERS = {
    '32x32_classifier': dict(image_size=32, **_ADM_CLASSIFIER),  # the DG release, linear VP time
    '64x64_classifier': dict(image_size=64, **_ADM_CLASSIFIER),  # OpenAI's, cosine schedule
}
# The release's discriminator heads on the 32x32 classifier's [512, 8, 8] features.
DG_HEAD = dict(image_size=8, in_channels=512, classifier_width=128, classifier_depth=2,
               classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
               classifier_resblock_updown=True, classifier_pool='attention', out_channels=1)

# EDM2's published configurations (Karras et al., 2024; NVlabs/edm2 train_edm2.py presets): img512 models
# work on 4x64x64 latents of Stability's VAE, img64 models on pixels; 1000 ImageNet classes (0: -uncond).
_EDM2_SIZES = dict(xxs=(64, 0.0), xs=(128, 0.0), s=(192, 0.0), m=(256, 0.1), l=(320, 0.1), xl=(384, 0.1), xxl=(448, 0.1))

def _edm2_entry(data, size, cond=True):
    channels, dropout = _EDM2_SIZES[size]
    return dict(img_resolution=64, img_channels=4 if data == 'img512' else 3, label_dim=1000 if cond else 0,
                model_channels=channels, dropout=dropout)

EDM2_NETWORKS = {f'edm2-{data}-{size}': ('Precond', _edm2_entry(data, size))
                 for data, sizes in (('img512', _EDM2_SIZES), ('img64', ('xs', 's', 'm', 'l', 'xl'))) for size in sizes}
EDM2_NETWORKS.update({f'edm2-{data}-{size}-uncond': ('Precond', _edm2_entry(data, size, cond=False))
                      for data in ('img512', 'img64') for size in ('xs', 's')})

def edm2_network(name, **overrides):
    """(class name, constructor arguments) of a published EDM2 network (training.networks_edm2), with overrides."""
    cls, kwargs = EDM2_NETWORKS[name]
    return cls, dict(kwargs, **overrides)

def edm_network(name, **overrides):
    """(class name, constructor arguments) of a published EDM network, with overrides (e.g. model_channels)."""
    cls, kwargs = EDM_NETWORKS[name]
    return cls, dict(kwargs, **overrides)
