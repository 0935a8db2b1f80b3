"""Published settings in one word: the DG paper's and EDM2's (facts from Kim et al. 2023 and NVlabs/edm2).

`DG_PRESETS` are sampler and guidance settings for `--preset`. `EDM2_PRESETS`
name EDM2's post-hoc EMA reconstructions, their guide network and guidance
weight, and the figure Karras et al. report for them (FID, or FD_DINOv2 for the
`-dino` presets), as EDM2's `generate_images.py --preset` names them.
"""

import dataclasses

# Kim et al. 2023, Table 2 and the release's scripts.
DG_PRESETS = {
    'edm-g++-cifar10-uncond': dict(sampler='heun', num_steps=18, dg_weight_1st_order=2.0, dg_weight_2nd_order=0.0,
                                   time_min=0.01, time_max=1.0, boosting=0),
    'edm-g++-cifar10-cond': dict(sampler='heun', num_steps=18, dg_weight_1st_order=1.0, dg_weight_2nd_order=0.0,
                                 time_min=0.01, time_max=1.0, boosting=1, boost_S_churn=4.0, boost_S_noise=1.0,
                                 boost_period=5, boost_weight_period=2),
}

EDM2_ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'

@dataclasses.dataclass(frozen=True)
class EDM2Preset:
    net: str                  # pickle name under EDM2_ROOT
    gnet: str = None          # guide: the unconditional net (classifier-free guidance) or a smaller, shorter-trained one (autoguidance)
    guidance: float = 1.0
    metric: str = 'fid'
    published: float = None   # Karras et al.'s figure for this preset

    def urls(self):
        return f'{EDM2_ROOT}/{self.net}', (f'{EDM2_ROOT}/{self.gnet}' if self.gnet else None)

def _table(rows):
    return {name: EDM2Preset(net, gnet, guidance, 'fd_dinov2' if name.endswith('-dino') else 'fid', value)
            for name, net, gnet, guidance, value in rows}

EDM2_PRESETS = _table([
    ('edm2-img512-xs-fid', 'edm2-img512-xs-2147483-0.135.pkl', None, 1.0, 3.53),
    ('edm2-img512-xs-dino', 'edm2-img512-xs-2147483-0.200.pkl', None, 1.0, 103.39),
    ('edm2-img512-s-fid', 'edm2-img512-s-2147483-0.130.pkl', None, 1.0, 2.56),
    ('edm2-img512-s-dino', 'edm2-img512-s-2147483-0.190.pkl', None, 1.0, 68.64),
    ('edm2-img512-m-fid', 'edm2-img512-m-2147483-0.100.pkl', None, 1.0, 2.25),
    ('edm2-img512-m-dino', 'edm2-img512-m-2147483-0.155.pkl', None, 1.0, 58.44),
    ('edm2-img512-l-fid', 'edm2-img512-l-1879048-0.085.pkl', None, 1.0, 2.06),
    ('edm2-img512-l-dino', 'edm2-img512-l-1879048-0.155.pkl', None, 1.0, 52.25),
    ('edm2-img512-xl-fid', 'edm2-img512-xl-1342177-0.085.pkl', None, 1.0, 1.96),
    ('edm2-img512-xl-dino', 'edm2-img512-xl-1342177-0.155.pkl', None, 1.0, 45.96),
    ('edm2-img512-xxl-fid', 'edm2-img512-xxl-0939524-0.070.pkl', None, 1.0, 1.91),
    ('edm2-img512-xxl-dino', 'edm2-img512-xxl-0939524-0.150.pkl', None, 1.0, 42.84),
    ('edm2-img64-s-fid', 'edm2-img64-s-1073741-0.075.pkl', None, 1.0, 1.58),
    ('edm2-img64-m-fid', 'edm2-img64-m-2147483-0.060.pkl', None, 1.0, 1.43),
    ('edm2-img64-l-fid', 'edm2-img64-l-1073741-0.040.pkl', None, 1.0, 1.33),
    ('edm2-img64-xl-fid', 'edm2-img64-xl-0671088-0.040.pkl', None, 1.0, 1.33),
    ('edm2-img512-xs-guid-fid', 'edm2-img512-xs-2147483-0.045.pkl', 'edm2-img512-xs-uncond-2147483-0.045.pkl', 1.40, 2.91),
    ('edm2-img512-xs-guid-dino', 'edm2-img512-xs-2147483-0.150.pkl', 'edm2-img512-xs-uncond-2147483-0.150.pkl', 1.70, 79.94),
    ('edm2-img512-s-guid-fid', 'edm2-img512-s-2147483-0.025.pkl', 'edm2-img512-xs-uncond-2147483-0.025.pkl', 1.40, 2.23),
    ('edm2-img512-s-guid-dino', 'edm2-img512-s-2147483-0.085.pkl', 'edm2-img512-xs-uncond-2147483-0.085.pkl', 1.90, 52.32),
    ('edm2-img512-m-guid-fid', 'edm2-img512-m-2147483-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.20, 2.01),
    ('edm2-img512-m-guid-dino', 'edm2-img512-m-2147483-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 2.00, 41.98),
    ('edm2-img512-l-guid-fid', 'edm2-img512-l-1879048-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20, 1.88),
    ('edm2-img512-l-guid-dino', 'edm2-img512-l-1879048-0.035.pkl', 'edm2-img512-xs-uncond-2147483-0.035.pkl', 1.70, 38.20),
    ('edm2-img512-xl-guid-fid', 'edm2-img512-xl-1342177-0.020.pkl', 'edm2-img512-xs-uncond-2147483-0.020.pkl', 1.20, 1.85),
    ('edm2-img512-xl-guid-dino', 'edm2-img512-xl-1342177-0.030.pkl', 'edm2-img512-xs-uncond-2147483-0.030.pkl', 1.70, 35.67),
    ('edm2-img512-xxl-guid-fid', 'edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.20, 1.81),
    ('edm2-img512-xxl-guid-dino', 'edm2-img512-xxl-0939524-0.015.pkl', 'edm2-img512-xs-uncond-2147483-0.015.pkl', 1.70, 33.09),
    ('edm2-img512-s-autog-fid', 'edm2-img512-s-2147483-0.070.pkl', 'edm2-img512-xs-0134217-0.125.pkl', 2.10, 1.34),
    ('edm2-img512-s-autog-dino', 'edm2-img512-s-2147483-0.120.pkl', 'edm2-img512-xs-0134217-0.165.pkl', 2.45, 36.67),
    ('edm2-img512-xxl-autog-fid', 'edm2-img512-xxl-0939524-0.075.pkl', 'edm2-img512-m-0268435-0.155.pkl', 2.05, 1.25),
    ('edm2-img512-xxl-autog-dino', 'edm2-img512-xxl-0939524-0.130.pkl', 'edm2-img512-m-0268435-0.205.pkl', 2.30, 24.18),
    ('edm2-img512-s-uncond-autog-fid', 'edm2-img512-s-uncond-2147483-0.070.pkl', 'edm2-img512-xs-uncond-0134217-0.110.pkl', 2.85, 3.86),
    ('edm2-img512-s-uncond-autog-dino', 'edm2-img512-s-uncond-2147483-0.090.pkl', 'edm2-img512-xs-uncond-0134217-0.125.pkl', 2.90, 90.39),
    ('edm2-img64-s-autog-fid', 'edm2-img64-s-1073741-0.045.pkl', 'edm2-img64-xs-0134217-0.110.pkl', 1.70, 1.01),
    ('edm2-img64-s-autog-dino', 'edm2-img64-s-1073741-0.105.pkl', 'edm2-img64-xs-0134217-0.175.pkl', 2.20, 31.85),
])
