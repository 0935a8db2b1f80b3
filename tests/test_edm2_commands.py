"""EDM2 pixel pickles in the commands: generate_dg.py against EDM2's recorded images (plain and guided by a
second net), guidance composed with DG through the CLI, the guide's checks, and train_disc.py / fid.py on
EDM2 samples (docs/compat.md, "EDM2 networks and pickles").

The pickles are written here from the fixture's nets (tests/data/edm2_reference.pt, recorded with EDM2's
code: `edm_sampler` at 8 steps over cond16, plain and guided by guide16 at w = 2, seeds 0-3).
"""

import os

import numpy as np
import pytest
import torch

import fid
import generate_dg
import train_disc
from helpers import (edm2_precond, edm2_reference, write_edm2_pickle, differ_beyond_rounding, invoke, nonzero_init, tiny_classifier,
                     tiny_discriminator, tiny_edm, save_edm_pickle)
from edm_dg import fileio
from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights
from edm_dg.generate import draw_inputs
from edm_dg.options import guidance_settings
from edm_dg.pickles import EDM2Network
from edm_dg.presets import EDM2_PRESETS
from edm_dg.sampling import nfe
from edm_dg.sampling.guides import Guided
from training import networks_edm2

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


@pytest.fixture(scope='module')
def pkls(tmp_path_factory):
    d = tmp_path_factory.mktemp('edm2')
    torch.manual_seed(0)
    return dict(net=write_edm2_pickle(edm2_precond('cond16'), d / 'cond16.pkl'),
                guide=write_edm2_pickle(edm2_precond('guide16'), d / 'guide16.pkl'),
                uncond=write_edm2_pickle(edm2_precond('uncond16'), d / 'uncond16.pkl'),
                res8=write_edm2_pickle(edm2_precond('guide16', img_resolution=8), d / 'res8.pkl'),
                classes5=write_edm2_pickle(edm2_precond('guide16', label_dim=5), d / 'classes5.pkl'),
                edm_uncond=save_edm_pickle(tiny_edm(label_dim=0), str(d / 'edm_uncond.pkl')),
                edm_cond=save_edm_pickle(perturbed(tiny_edm(label_dim=10, seed=1)), str(d / 'edm_cond.pkl')),
                edm_guide=save_edm_pickle(perturbed(tiny_edm(label_dim=10, seed=2, model_channels=8)), str(d / 'edm_guide.pkl')))

def perturbed(net, std=0.05):
    """EDM initialises its output layers near zero (D = c_skip x); noise on every weight makes F matter."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net

@pytest.fixture(scope='module')
def disc16(tmp_path_factory):
    """A tiny 16x16 conditional discriminator (classifier + head) as generate_dg.py takes it."""
    d = tmp_path_factory.mktemp('disc16')
    cls = tiny_classifier()
    disc = tiny_discriminator(cls, cond=True)
    torch.save(cls.state_dict(), d / 'cls.pt')
    _, sha = read_weights(str(d / 'cls.pt'), 'classifier')
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), d / 'disc.pt')
    return dict(classifier=str(d / 'cls.pt'), disc=str(d / 'disc.pt'))

def generate(outdir, *args):
    code, text, errors = invoke(generate_dg.main, [f'--outdir={outdir}', '--device=cpu', *args])
    assert code == 0, text
    return text

def images(outdir, seeds):
    return np.stack([fileio.read_image(os.path.join(outdir, f'{s:06d}.png')) for s in seeds])

def fixture_images(run):
    return edm2_reference()[run]['images_uint8'].permute(0, 2, 3, 1).numpy()

def error_of(*args):
    code, text, errors = invoke(generate_dg.main, ['--device=cpu', *args])
    assert code != 0 and len(errors) == 1 and 'Traceback' not in text, text
    return errors[0]

#----------------------------------------------------------------------------
# EDM2's generate_images.py: its seeds' noise and classes, and its images, plain and guided.

def test_seed_draws_are_edm2s():
    """Per seed one generator: the noise, then the class (generate_images.py's StackedRandomGenerator)."""
    r = edm2_reference()['sample_plain']
    latents, labels, _ = draw_inputs([3, 16, 16], 10, r['seeds'], 'cpu')
    assert torch.equal(latents, r['noise']) and torch.equal(labels, r['labels'])

@pytest.mark.parametrize('run', ['sample_plain', 'sample_autog'])
def test_cli_images_equal_edm2s(tmp_path, pkls, run):
    r = edm2_reference()[run]
    args = [f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8']
    if r['gnet'] is not None:
        args += [f'--gnet={pkls["guide"]}', f'--guidance={r["guidance"]}']
    text = generate(tmp_path, *args)
    # uint8 from another CPU: at most one gray level, on under 0.1% of the values (rounding boundaries).
    got, want = images(tmp_path, r['seeds']).astype(int), fixture_images(run).astype(int)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), (diff > 0).mean())
    if r['gnet'] is not None:
        assert differ_beyond_rounding(got, fixture_images('sample_plain'))  # guidance matters
        assert f'guidance w=2, {2 * (2 * 8 - 1)} network evaluations per image' in text

def test_edm2_conventions_float32_and_32_steps(tmp_path, pkls):
    """EDM2's defaults: 32 steps, the state in float32, churn noise only at steps that churn."""
    r = edm2_reference()['sample_plain']
    text = generate(tmp_path, f'--network={pkls["net"]}', '--seeds=0-1')
    assert 'heun sampler, 32 steps, plain EDM' in text
    net = EDM2Network(edm2_precond('cond16'))
    from edm_dg.sampling import edm_sampler
    with torch.no_grad():
        x = edm_sampler(net, r['noise'][:2], r['labels'][:2], num_steps=32)
    assert x.dtype == torch.float32
    assert np.array_equal(images(tmp_path, [0, 1]), fileio.to_uint8(x))  # the same process: exact
    # Churn only below sigma = 5 (steps 4-6 of 8): EDM draws noise at every step, EDM2 only at the churning
    # ones, so the churn noise (and the images) depend on the convention; EDM2's is what the CLI takes.
    churn = dict(S_churn=20, S_min=0.01, S_max=5.0)
    with torch.no_grad():
        rnd = draw_inputs([3, 16, 16], 10, [0, 1], 'cpu')[2]
        edm2_way = edm_sampler(net, r['noise'][:2], r['labels'][:2], rnd.randn_like, num_steps=8, **churn)
        rnd = draw_inputs([3, 16, 16], 10, [0, 1], 'cpu')[2]
        edm_way = edm_sampler(net, r['noise'][:2], r['labels'][:2], rnd.randn_like, num_steps=8, noise_every_step=True, **churn)
    assert differ_beyond_rounding(fileio.to_uint8(edm2_way), fileio.to_uint8(edm_way))
    generate(tmp_path / 'churn', f'--network={pkls["net"]}', '--seeds=0-1', '--steps=8', '--S_churn=20', '--S_min=0.01', '--S_max=5')
    assert np.array_equal(images(tmp_path / 'churn', [0, 1]), fileio.to_uint8(edm2_way))

#----------------------------------------------------------------------------
# Composition through the CLI: w = 1, w_dg = 0, an interval holding no step; EDM pickles alike.

def test_guidance_one_gives_the_main_nets_images(tmp_path, pkls):
    generate(tmp_path / 'plain', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8')
    text = generate(tmp_path / 'w1', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8', f'--gnet={pkls["guide"]}', '--guidance=1')
    assert 'the guide is not evaluated' in text
    assert np.array_equal(images(tmp_path / 'w1', range(4)), images(tmp_path / 'plain', range(4)))

def test_interval_holding_no_step_gives_plain_images(tmp_path, pkls):
    generate(tmp_path / 'plain', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8')
    # 8 steps from 80 to 0.002: 80, 35.0, 13.7, 4.64, 1.29, 0.267, 0.0352, 0.002 -- none in [2, 4].
    text = generate(tmp_path / 'none', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8', f'--gnet={pkls["guide"]}',
                    '--guidance=2', '--guidance_interval=2,4')
    assert '15 network evaluations per image (no step lies in the guidance interval' in text
    assert np.array_equal(images(tmp_path / 'none', range(4)), images(tmp_path / 'plain', range(4)))
    # [0.5, 5] holds 4.64 and 1.29: the guide at those two levels, twice each (Euler, Heun), and other images.
    text = generate(tmp_path / 'some', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8', f'--gnet={pkls["guide"]}',
                    '--guidance=2', '--guidance_interval=0.5,5')
    assert '19 network evaluations per image' in text
    assert differ_beyond_rounding(images(tmp_path / 'some', range(4)), images(tmp_path / 'plain', range(4)))

def test_interval_nfe_counts_what_is_evaluated():
    net, guide = EDM2Network(edm2_precond('cond16')), EDM2Network(edm2_precond('guide16'))
    for sampler, kw in [('heun', {}), ('euler', {}), ('dpmpp2m', {}), ('restart', dict(restart='2,1,0.5,3')),
                        ('heun', dict(S_churn=8, S_min=0.5, S_max=3))]:
        den = Guided(net, guide, 2.0, 0.5, 5.0)
        calls = nfe(sampler, 8, den, **kw)
        # The count equals the evaluations a run makes (counted per call on the host by Guided).
        from edm_dg.sampling import sample
        r = edm2_reference()['sample_plain']
        with torch.no_grad():
            sample(den, r['noise'][:1], r['labels'][:1], sampler=sampler, num_steps=8, **kw)
        assert den.evaluations == calls, (sampler, kw)
        assert nfe(sampler, 8, None, **kw) < calls < 2 * nfe(sampler, 8, None, **kw)

def test_dg_weight_zero_gives_guidance_alone(tmp_path, pkls, disc16):
    common = [f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8', f'--gnet={pkls["guide"]}', '--guidance=2']
    generate(tmp_path / 'g', *common)
    files = [f'--disc={disc16["disc"]}', f'--classifier={disc16["classifier"]}']
    generate(tmp_path / 'g_w0', *common, *files, '--w=0')
    assert np.array_equal(images(tmp_path / 'g_w0', range(4)), images(tmp_path / 'g', range(4)))
    # DG on top judges the guided state: another image; and DG alone differs from DG on guidance.
    generate(tmp_path / 'g_dg', *common, *files, '--w=3')
    generate(tmp_path / 'dg', f'--network={pkls["net"]}', '--seeds=0-3', '--steps=8', *files, '--w=3')
    guided_dg = images(tmp_path / 'g_dg', range(4))
    assert not np.array_equal(guided_dg, images(tmp_path / 'g', range(4)))
    assert differ_beyond_rounding(guided_dg, images(tmp_path / 'dg', range(4)))

@pytest.mark.parametrize('sampler', ['euler', 'dpmpp2m', 'restart'])
def test_every_sampler_takes_the_guided_chain(tmp_path, pkls, sampler):
    common = [f'--network={pkls["net"]}', '--seeds=0-1', '--steps=6', f'--sampler={sampler}']
    generate(tmp_path / 'p', *common)
    generate(tmp_path / 'g', *common, f'--gnet={pkls["guide"]}', '--guidance=2')
    assert differ_beyond_rounding(images(tmp_path / 'g', [0, 1]), images(tmp_path / 'p', [0, 1]))

def test_classifier_free_guidance_and_edm_pickles(tmp_path, pkls):
    """An unconditional guide (classifier-free guidance) is taken by a conditional net; EDM pickles alike."""
    generate(tmp_path / 'p', f'--network={pkls["net"]}', '--seeds=0-1', '--steps=6')
    generate(tmp_path / 'cfg', f'--network={pkls["net"]}', '--seeds=0-1', '--steps=6', f'--gnet={pkls["uncond"]}', '--guidance=1.5')
    assert differ_beyond_rounding(images(tmp_path / 'cfg', [0, 1]), images(tmp_path / 'p', [0, 1]))
    text = generate(tmp_path / 'edm', f'--network={pkls["edm_cond"]}', '--seeds=0-1', '--steps=6')
    assert '6 steps' in text
    generate(tmp_path / 'edm_g', f'--network={pkls["edm_cond"]}', '--seeds=0-1', '--steps=6', f'--gnet={pkls["edm_guide"]}', '--guidance=2')
    generate(tmp_path / 'edm_w1', f'--network={pkls["edm_cond"]}', '--seeds=0-1', '--steps=6', f'--gnet={pkls["edm_guide"]}', '--guidance=1')
    assert np.array_equal(images(tmp_path / 'edm_w1', [0, 1]), images(tmp_path / 'edm', [0, 1]))
    assert differ_beyond_rounding(images(tmp_path / 'edm_g', [0, 1]), images(tmp_path / 'edm', [0, 1]))

#----------------------------------------------------------------------------
# Bad inputs: one line naming the option and the fix.

def test_bad_guidance_inputs(tmp_path, pkls):
    out = f'--outdir={tmp_path}'
    net = f'--network={pkls["net"]}'
    assert 'same resolution' in error_of(out, net, f'--gnet={pkls["res8"]}', '--guidance=2')
    assert 'conditioned on 5 classes' in error_of(out, net, f'--gnet={pkls["classes5"]}', '--guidance=2')
    assert 'has no classes' in error_of(out, f'--network={pkls["uncond"]}', f'--gnet={pkls["guide"]}', '--guidance=2')
    assert 'without --guidance' in error_of(out, net, f'--gnet={pkls["guide"]}')
    assert 'pass --gnet' in error_of(out, net, '--guidance=2')
    assert 'pass --gnet' in error_of(out, net, '--guidance_interval=0.3,3')
    for bad in ('0.3', '3,0.3', 'a,b'):
        assert '--guidance_interval' in error_of(out, net, f'--gnet={pkls["guide"]}', '--guidance=2', f'--guidance_interval={bad}')
    assert 'not a finite number' in error_of(out, net, f'--gnet={pkls["guide"]}', '--guidance=inf')
    assert '--network is required' in error_of(out)
    assert 'EDM2 network' in error_of(out, net, '--precision=fp16')

def test_edm2_presets_supply_networks_and_guidance():
    sampler_opts = dict(preset='edm2-img64-s-autog-fid')
    net, gnet, g = guidance_settings(dict(gnet=None, guidance=None, guidance_interval=None), None, sampler_opts)
    preset = EDM2_PRESETS['edm2-img64-s-autog-fid']
    assert (net, gnet, g['guidance']) == (*preset.urls(), 1.70) and 'preset' not in sampler_opts
    # Explicit options win; --guidance=1 keeps the preset's main net alone.
    net, gnet, g = guidance_settings(dict(gnet=None, guidance=1.0, guidance_interval='0.3,3'), 'mine.pkl',
                                     dict(preset='edm2-img64-s-autog-fid'))
    assert (net, g['guidance'], g['guidance_interval']) == ('mine.pkl', 1.0, (0.3, 3.0))
    net, gnet, g = guidance_settings(dict(gnet=None, guidance=None, guidance_interval=None), None, dict(preset='edm2-img64-s-fid'))
    assert gnet is None and g['guidance'] == 1.0
    with pytest.raises(ValueError, match='pass --gnet'):
        guidance_settings(dict(gnet=None, guidance=2.0, guidance_interval=None), None, dict(preset='edm2-img64-s-fid'))
    # DG presets stay sampler settings.
    opts = dict(preset='edm-g++-cifar10-uncond')
    assert guidance_settings(dict(gnet=None, guidance=None, guidance_interval=None), 'n.pkl', opts)[1] is None
    assert opts == dict(preset='edm-g++-cifar10-uncond')

#----------------------------------------------------------------------------
# DG on an EDM2 pixel model at 64x64 with the release's 64x64 classifier layout (reduced width), and
# train_disc.py / fid.py on EDM2 samples.

def test_dg_at_64x64_and_train_disc_on_edm2_samples(tmp_path):
    from edm_dg.layouts import ADM_CLASSIFIERS
    from edm_dg.adm import EncoderUNet
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=64, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                                num_blocks=1, attn_resolutions=[]).eval()
    pkl = write_edm2_pickle(net, tmp_path / 'edm2-64.pkl')
    args = dict(ADM_CLASSIFIERS['64x64_classifier'], classifier_width=32, classifier_depth=1)
    cls = nonzero_init(EncoderUNet.from_create_classifier_args(**args).eval())
    torch.save(cls.state_dict(), tmp_path / 'cls64.pt')
    generate(tmp_path / 'fake', f'--network={pkl}', '--seeds=0-7', '--steps=4', '--batch=8')
    real = np.random.default_rng(0).integers(0, 256, size=(8, 64, 64, 3), dtype=np.uint8)
    np.savez(tmp_path / 'real.npz', images=real)
    code, text, errors = invoke(train_disc.main, [f'--real={tmp_path / "real.npz"}', f'--fake={tmp_path / "fake"}',
                                                   f'--classifier={tmp_path / "cls64.pt"}', f'--outdir={tmp_path / "run"}',
                                                   '--epochs=1', '--batch=4', '--head_width=64', '--head_depth=1',
                                                   '--eval_images=0', '--device=cpu'])
    assert code == 0, text
    disc = str(tmp_path / 'run' / 'disc-0001.pt')
    assert os.path.isfile(disc)
    common = [f'--network={pkl}', '--seeds=100-101', '--steps=4', f'--classifier={tmp_path / "cls64.pt"}', f'--disc={disc}']
    text = generate(tmp_path / 'w0', *common, '--w=0')
    assert 'cosine' in text  # the release's time convention at 64x64 (as recorded or assumed)
    generate(tmp_path / 'dg', *common, '--w=20')
    generate(tmp_path / 'plain', f'--network={pkl}', '--seeds=100-101', '--steps=4')
    assert np.array_equal(images(tmp_path / 'w0', [100, 101]), images(tmp_path / 'plain', [100, 101]))
    assert not np.array_equal(images(tmp_path / 'dg', [100, 101]), images(tmp_path / 'plain', [100, 101]))

def test_fid_sweep_over_guidance_on_edm2_pickles(tmp_path, pkls, disc16):
    """fid.py sweep --param=guidance: each point's images are generate_dg.py's with that --guidance."""
    from helpers import TinyDetector, write_fid_ref
    from edm_dg.sweep import read_csv
    det, ref = str(tmp_path / 'tiny.pt'), write_fid_ref(str(tmp_path / 'ref.npz'), dims=32)
    torch.jit.script(TinyDetector()).save(det)
    files = [f'--disc={disc16["disc"]}', f'--classifier={disc16["classifier"]}']
    common = [f'--network={pkls["net"]}', '--seeds=0-3', '--steps=4', f'--gnet={pkls["guide"]}', *files, '--w=0']
    code, text, errors = invoke(fid.main, ['sweep', *common, f'--ref={ref}', f'--detector={det}', '--param=guidance',
                                           '--values=1,2.5', '--keep_images', f'--outdir={tmp_path / "sw"}', '--device=cpu'])
    assert code == 0 and not errors, text
    rows = read_csv(str(tmp_path / 'sw' / 'sweep_guidance.csv'))
    assert [r['value'] for r in rows] == ['1', '2.5'] and rows[0]['fid'] != rows[1]['fid']
    for w in ('1', '2.5'):
        generate(tmp_path / f'g{w}', *common, f'--guidance={w}')
        assert np.array_equal(images(tmp_path / 'sw' / 'images' / f'guidance={w}', range(4)), images(tmp_path / f'g{w}', range(4)))
    code, text, errors = invoke(fid.main, ['sweep', *common[:3], *files, f'--ref={ref}', f'--detector={det}', '--param=guidance',
                                           '--values=1,2', f'--outdir={tmp_path / "sw2"}', '--device=cpu'])
    assert code != 0 and 'pass --gnet' in errors[0]
