"""generate_dg.py --sampler: each sampler guided through DGDenoiser, seed-exact for any batch size and process count."""

import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import generate_dg
from edm_dg import fileio
from edm_dg.generate import draw_inputs
from edm_dg.models import load_models
from edm_dg.options import sampler_settings
from edm_dg.sampling import sample
from helpers import ROOT, assert_same_up_to_rounding, differ_beyond_rounding, run_cli

NAMES = ('heun', 'euler', 'dpmpp2m', 'restart')

def _images(folder, seeds=range(5)):
    return np.stack([np.array(Image.open(os.path.join(folder, f'{s:06d}.png'))) for s in seeds])

def _churn(name):
    return 3.0 if name in ('heun', 'euler') else None

def _run(tiny_files, outdir, name, batch, **kw):
    generate_dg.run(tiny_files['net'], outdir, '0-4', max_batch_size=batch, disc_path=tiny_files['disc'],
                    classifier_path=tiny_files['classifier'], device='cpu', sampler=name, num_steps=4,
                    S_churn=_churn(name), log=lambda *a: None, **kw)

def _direct(tiny_files, seeds=range(5), **opts):
    """The uint8 images of `seeds` in one batch, computed here by the library's sampler on the inputs
    generate_dg.py draws for them: what a run in one batch must write, byte for byte."""
    net, disc = load_models(tiny_files['net'], 'cpu', disc_path=tiny_files['disc'], classifier_path=tiny_files['classifier'],
                            log=lambda *a: None)
    settings = sampler_settings(opts, net.label_dim, guided=True)
    latents, labels, rnd = draw_inputs([net.img_channels, net.img_resolution, net.img_resolution], net.label_dim, list(seeds), 'cpu')
    return fileio.to_uint8(sample(net, latents, labels, rnd.randn_like, **settings, discriminator=disc))

def test_every_sampler_is_seed_exact_for_batch_and_processes(tiny_files, tmp_path):
    proc = run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                    os.path.join(ROOT, 'tests', 'run_samplers_twice.py'), str(tmp_path / 'two'),
                    tiny_files['net'], tiny_files['disc'], tiny_files['classifier']], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in NAMES:
        _run(tiny_files, str(tmp_path / f'{name}-b1'), name, 1)
        _run(tiny_files, str(tmp_path / f'{name}-b3'), name, 3)
        one = _images(str(tmp_path / f'{name}-b1'))
        # Guided, batches of 1 and 3 and two processes round differently (helpers.assert_same_up_to_rounding).
        assert_same_up_to_rounding(one, _images(str(tmp_path / f'{name}-b3')))
        assert_same_up_to_rounding(one, _images(str(tmp_path / 'two' / name)))

def test_samplers_differ_and_guidance_acts(tiny_files, tmp_path):
    """Each sampler writes exactly the library's images of its settings (one batch, this machine), guided
    and plain; guidance and the choice of sampler change them beyond rounding."""
    imgs = {}
    for name in NAMES:
        _run(tiny_files, str(tmp_path / name), name, 5)
        imgs[name] = _images(str(tmp_path / name))
        assert np.array_equal(imgs[name], _direct(tiny_files, sampler=name, num_steps=4, S_churn=_churn(name))), name
    _run(tiny_files, str(tmp_path / 'restart-plain'), 'restart', 5, dg_weight_1st_order=0.0)
    plain = _images(str(tmp_path / 'restart-plain'))
    assert np.array_equal(plain, _direct(tiny_files, sampler='restart', num_steps=4, dg_weight_1st_order=0.0))
    assert differ_beyond_rounding(imgs['restart'], plain)  # the guidance effect, as computed directly
    assert differ_beyond_rounding(imgs['heun'], imgs['dpmpp2m'])

def test_grid_plain_and_guided_side_by_side(tiny_files, tmp_path):
    grid = str(tmp_path / 'grid.png')
    _run(tiny_files, str(tmp_path / 'out'), 'heun', 5, grid=grid, grid_compare=True)
    g = np.array(Image.open(grid))
    # Two one-row, 10-column grids of 16x16 images with 1-pixel white borders, 4 columns apart, upscaled 2x.
    assert g.shape[:2] == (2 * 18, 2 * (2 * 10 * 18 + 4))
    assert np.array_equal(g, g[::2, ::2].repeat(2, axis=0).repeat(2, axis=1))  # nearest-neighbour upscaling
    g = g[::2, ::2]
    panels = {'plain': _images(str(tmp_path / 'grid-plain')), 'guided': _images(str(tmp_path / 'out'))}
    assert np.array_equal(panels['plain'], _direct(tiny_files, sampler='heun', num_steps=4, S_churn=3.0, dg_weight_1st_order=0.0))
    assert differ_beyond_rounding(panels['plain'], panels['guided'])
    for p, name in enumerate(['plain', 'guided']):
        left = p * (10 * 18 + 4)
        cells = g[:, left:left + 10 * 18]
        for k in range(10):
            cell = cells[:, k * 18:(k + 1) * 18]
            if k < 5:  # The tile of seed k, framed in white.
                assert np.array_equal(cell[1:17, 1:17], panels[name][k]), (name, k)
                cell = cell.copy()
                cell[1:17, 1:17] = 255
            assert (cell == 255).all(), (name, k)  # borders and empty cells
    assert (g[:, 10 * 18:10 * 18 + 4] == 255).all()  # the gap

def test_preset_fills_published_settings_and_options_override():
    from edm_dg.options import sampler_settings
    s = sampler_settings(dict(preset='edm-g++-cifar10-cond'), label_dim=10, guided=True)
    assert (s['dg_weight_1st_order'], s['boosting'], s['boost_S_churn'], s['boost_period'], s['num_steps']) == (1.0, True, 4.0, 5, 18)
    s = sampler_settings(dict(preset='edm-g++-cifar10-uncond', dg_weight_1st_order=1.5), label_dim=0, guided=True)
    assert (s['dg_weight_1st_order'], s['boosting']) == (1.5, False)
    assert sampler_settings({}, label_dim=0, guided=True)['dg_weight_1st_order'] == 2.0
    assert sampler_settings({}, label_dim=10, guided=True)['dg_weight_1st_order'] == 1.0

def _cli(args):
    """generate_dg.py in this process (click's runner): exit code and the 'Error:' lines."""
    result = CliRunner().invoke(generate_dg.main, args)
    err = result.stderr if hasattr(result, 'stderr') else result.output
    return result, [l for l in err.strip().splitlines() if l.startswith('Error:')]

@pytest.mark.parametrize('args,needle', [
    (['--sampler=dpmpp2m', '--boosting=1'], '--boosting'),
    (['--sampler=restart', '--dg_weight_2nd_order=1'], '--dg_weight_2nd_order'),
    (['--sampler=dpmpp2m', '--S_churn=5'], '--S_churn'),
    (['--sampler=restart', '--restart=3,2,0.5'], 'restart'),
    (['--time_min=0.8', '--time_max=0.2'], '--time_min'),
    (['--grid_compare'], '--grid'),
])
def test_sampler_option_errors_name_the_option(tiny_files, tmp_path, args, needle):
    result, errors = _cli([f'--network={tiny_files["net"]}', f'--disc={tiny_files["disc"]}',
                           f'--classifier={tiny_files["classifier"]}', f'--outdir={tmp_path}', '--seeds=0', '--steps=3', *args])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(errors) == 1 and needle in errors[0], errors

def test_w_is_an_alias_of_dg_weight_1st_order(tiny_files, tmp_path):
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    common = [f'--network={tiny_files["net"]}', f'--disc={tiny_files["disc"]}', f'--classifier={tiny_files["classifier"]}',
              '--seeds=0-1', '--steps=3']
    assert _cli([*common, f'--outdir={a}', '--w=0.5'])[0].exit_code == 0
    assert _cli([*common, f'--outdir={b}', '--dg_weight_1st_order=0.5'])[0].exit_code == 0
    want = _direct(tiny_files, range(2), num_steps=3, dg_weight_1st_order=0.5)  # what w = 0.5 gives
    assert np.array_equal(_images(a, range(2)), want) and np.array_equal(_images(b, range(2)), want)
    # Neither the default weight (1, conditional net) nor no guidance gives these images.
    for w in (1.0, 0.0):
        assert differ_beyond_rounding(want, _direct(tiny_files, range(2), num_steps=3, dg_weight_1st_order=w)), w
