"""64x64 end to end: EDM's ImageNet-64, FFHQ-64 and AFHQv2-64 networks, OpenAI's 64x64
ADM classifier as feature extractor and 8x8 heads, through generate_dg.py, train_disc.py, fid.py
and nll.py, with one time convention from training to sampling.

Networks are built from `edm_dg.layouts` with scaled-down widths (the layouts are otherwise the
published ones; the classifier keeps depth 4 and attention at 32,16,8, so its keys are exactly
those of `64x64_classifier.pt`), random weights, and the ImageNet net keeps its 1000 classes.
"""

import json
import math
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import fid
import generate_dg
import nll
import train_disc
from edm_dg import image_sets, layouts as edm_layouts, metrics, vp
from edm_dg.adm import EncoderUNet
from edm_dg.disc_checkpoint import infer_encoder_args
from edm_dg.disc_training import train
from edm_dg.guidance import dg_correction
from edm_dg.models import load_models
from helpers import TinyDetector, assert_same_up_to_rounding, differ_beyond_rounding, save_edm_pickle, write_set
from training import networks

CLASSIFIER = dict(edm_layouts.ADM_CLASSIFIERS['64x64_classifier'], classifier_width=32)  # features [128, 8, 8]
HEAD = dict(edm_layouts.DG_HEAD, in_channels=128, classifier_width=32)
NETS = {  # name: (preconditioning, layout, overrides)
    'imagenet': ('EDMPrecond', 'imagenet-64x64-cond-adm', dict(model_channels=16, num_blocks=1, dropout=0.0)),
    'ffhq': ('VPPrecond', 'ffhq-64x64-uncond-vp', dict(model_channels=16, num_blocks=1, dropout=0.0)),  # EDM's VP baseline
    'afhqv2': ('EDMPrecond', 'afhqv2-64x64-uncond-vp', dict(model_channels=16, num_blocks=1, dropout=0.0)),
}
QUIET = dict(log=lambda *a: None)

def _liven(module, seed):
    """Give zero-initialised output layers small random weights, so features and logits depend on time."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim > 1 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('files64')
    paths = {}
    for i, (name, (precond, layout, overrides)) in enumerate(NETS.items()):
        _, kwargs = edm_layouts.edm_network(layout, **overrides)
        torch.manual_seed(i)
        net = getattr(networks, precond)(**kwargs).eval()
        paths[name] = save_edm_pickle(net, str(d / f'{name}.pkl'))
    torch.manual_seed(10)
    classifier = _liven(EncoderUNet.from_create_classifier_args(**CLASSIFIER), 11)
    paths['classifier'] = str(d / '64x64_classifier.pt')
    torch.save(classifier.state_dict(), paths['classifier'])
    for cond in (False, True):  # Release-style heads: plain state dicts, no record of the time convention.
        torch.manual_seed(20 + cond)
        head = _liven(EncoderUNet.from_create_classifier_args(**HEAD, condition=cond, num_classes=1000), 22 + cond)
        paths['head_cond' if cond else 'head'] = str(d / f'discriminator_{"cond" if cond else "uncond"}.pt')
        torch.save(head.state_dict(), paths['head_cond' if cond else 'head'])
    return paths

@pytest.fixture(scope='module')
def images(files, tmp_path_factory):
    """24 random 'real' PNGs and 24 fakes generated (plain, 2 steps) by the FFHQ-like net, all 64x64."""
    d = tmp_path_factory.mktemp('images64')
    g = torch.Generator().manual_seed(5)
    real = (torch.rand(24, 3, 64, 64, generator=g) * 255).round().to(torch.uint8)
    write_set(str(d / 'real'), real)
    generate_dg.run(files['ffhq'], str(d / 'fake'), '100-123', max_batch_size=24, device='cpu', num_steps=2, **QUIET)
    return dict(real=str(d / 'real'), fake=str(d / 'fake'))

def _pngs(folder, seeds):
    return np.stack([np.array(Image.open(os.path.join(folder, f'{s:06d}.png'))) for s in seeds])

def _correction(disc, label_dim=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, generator=g) * 2
    labels = torch.eye(label_dim)[[3, 999]] if label_dim else None
    corr, _ = dg_correction(disc, x, torch.tensor([2.0, 0.5]), labels)
    return corr

def _fed_cosine_time(disc):
    """disc (on linear time) given the cosine-schedule time t of the same signal level as linear-VP time tau:
    cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s)) = mean(tau)^2, s = 0.008 (Nichol & Dhariwal, 2021)."""
    assert disc.time_schedule == 'linear'
    s = 0.008
    def fed(x_vp, tau, labels=None):
        t = (1 + s) * 2 / math.pi * torch.arccos(math.cos(math.pi / 2 * s / (1 + s)) * vp.mean(tau)) - s
        return disc(x_vp, t, labels)
    return fed

def _assert_same_correction(a, b):
    """The same correction computed on two routes on this machine (float32 rounding of the time input)."""
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), float((a - b).abs().max() / b.abs().max())

#----------------------------------------------------------------------------

def test_networks_and_checkpoints_have_the_published_64x64_layouts(files, layouts):
    cls_sd = torch.load(files['classifier'], weights_only=True)
    published = layouts['adm_classifier_64x64']['state_dict_shapes']
    assert set(cls_sd) == set(published)
    args = infer_encoder_args(cls_sd)
    assert (args['image_size'], args['num_res_blocks'], args['attention_resolutions']) == (64, 4, (2, 4, 8))
    with torch.device('meta'):  # At the published width the shapes are exactly those of 64x64_classifier.pt.
        full = EncoderUNet.from_create_classifier_args(**dict(CLASSIFIER, classifier_width=128))
    assert {k: list(v.shape) for k, v in full.state_dict().items()} == published
    for key, cond in (('head', 'uncond'), ('head_cond', 'cond')):
        sd = torch.load(files[key], weights_only=True)
        assert set(sd) == set(layouts[f'dg_discriminator_head_{cond}']['state_dict_shapes'])
        assert infer_encoder_args(sd)['image_size'] == 8
    assert torch.load(files['head_cond'], weights_only=True)['label_emb.weight'].shape[0] == 1000
    for name, (precond, _, _) in NETS.items():
        net, _ = load_models(files[name], 'cpu', **QUIET)
        assert (type(net).__name__, net.img_resolution) == (precond, 64)
        assert type(net.model).__name__ == ('DhariwalUNet' if name == 'imagenet' else 'SongUNet')
        assert net.label_dim == (1000 if name == 'imagenet' else 0)

@pytest.mark.parametrize('name', ['imagenet', 'ffhq', 'afhqv2'])
def test_generate_dg_64x64_guided_is_independent_of_batch(files, tmp_path, name):
    head = files['head_cond' if name == 'imagenet' else 'head']
    lines = []
    run = lambda out, batch, **kw: generate_dg.run(files[name], str(tmp_path / out), '0-2', max_batch_size=batch, device='cpu',
                                                   disc_path=head, classifier_path=files['classifier'], num_steps=3,
                                                   log=lambda *a: lines.append(' '.join(map(str, a))), **kw)
    run('b1', 1)
    run('b3', 3)
    one = _pngs(str(tmp_path / 'b1'), range(3))
    assert one.shape == (3, 64, 64, 3)
    assert_same_up_to_rounding(one, _pngs(str(tmp_path / 'b3'), range(3)))  # batch sizes round differently
    assert any('Discriminator time convention: cosine' in l for l in lines), lines
    if name == 'imagenet':  # Labels of the 1000-class net are recorded; guidance changes the images.
        with open(tmp_path / 'b1' / 'dataset.json') as f:
            assert all(0 <= c < 1000 for _, c in json.load(f)['labels'])
        run('plain', 3, dg_weight_1st_order=0.0)
        assert differ_beyond_rounding(one, _pngs(str(tmp_path / 'plain'), range(3)))

def test_release_style_head_defaults_to_the_release_sampler_and_takes_disc_time_linear(files, tmp_path):
    """A plain state-dict head records no convention: cosine (as the release samples), or --disc_time=linear."""
    convs, corrs = {}, {}
    for disc_time in (None, 'linear'):
        lines = []
        net, disc = load_models(files['imagenet'], 'cpu', disc_path=files['head_cond'], classifier_path=files['classifier'],
                                disc_time=disc_time, log=lines.append)
        convs[disc_time] = [l for l in lines if l.startswith('Discriminator time convention')]
        corrs[disc_time] = _correction(disc, net.label_dim)
        assert disc.time_schedule == (disc_time or 'cosine')
    assert len(convs[None]) == 1 and "release's sampler convention (cosine" in convs[None][0]
    assert '--disc_time=linear' in convs[None][0]
    assert 'set by --disc_time' in convs['linear'][0] and 'convention: linear' in convs['linear'][0]
    _, linear_disc = load_models(files['imagenet'], 'cpu', disc_path=files['head_cond'], classifier_path=files['classifier'],
                                 disc_time='linear', **QUIET)
    _assert_same_correction(corrs[None], _correction(_fed_cosine_time(linear_disc), net.label_dim))
    assert (corrs[None] - corrs['linear']).abs().max() > 0.01 * corrs['linear'].abs().max()  # the conventions differ
    # Through generate_dg.py: the two conventions guide the same seed differently.
    for disc_time in ('cosine', 'linear'):
        generate_dg.run(files['ffhq'], str(tmp_path / disc_time), '7', device='cpu', disc_path=files['head'],
                        classifier_path=files['classifier'], num_steps=3, disc_time=disc_time, **QUIET)
    diff = np.abs(_pngs(str(tmp_path / 'cosine'), [7]).astype(np.int16) - _pngs(str(tmp_path / 'linear'), [7]))
    assert diff.max() > 1 and (diff > 0).mean() > 1e-3  # rounding moves values by one level at most (helpers)

def test_train_disc_64x64_records_cosine_and_sampling_honours_the_record(files, images, tmp_path):
    lines = []
    ckpt_path = train(str(tmp_path / 'run'), images['real'], images['fake'], files['classifier'], epochs=1, batch=8,
                      head_width=32, head_depth=1, progress=False, log=lines.append)
    assert any(l.startswith('Classifier time convention: cosine') for l in lines), lines
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt['time_schedule'] == 'cosine' and ckpt['config']['time_schedule'] == 'cosine'
    assert ckpt['fake_seeds'] == [[100, 123]] and ckpt['head_args']['image_size'] == 8
    # The same weights recorded as trained on linear time.
    linear_path = str(tmp_path / 'disc-linear.pt')
    torch.save(dict(ckpt, time_schedule='linear'), linear_path)
    corrs = {}
    for path, want in ((ckpt_path, 'cosine'), (linear_path, 'linear')):
        lines = []
        _, disc = load_models(files['afhqv2'], 'cpu', disc_path=path, classifier_path=files['classifier'], log=lines.append)
        assert disc.time_schedule == want
        assert any(l.startswith(f'Discriminator time convention: {want}') and 'recorded in the checkpoint' in l for l in lines), lines
        corrs[want] = _correction(disc)
    _, linear_disc = load_models(files['afhqv2'], 'cpu', disc_path=linear_path, classifier_path=files['classifier'], **QUIET)
    _assert_same_correction(corrs['cosine'], _correction(_fed_cosine_time(linear_disc)))
    # --disc_time overrides the record.
    _, disc = load_models(files['afhqv2'], 'cpu', disc_path=ckpt_path, classifier_path=files['classifier'], disc_time='linear', **QUIET)
    assert torch.equal(_correction(disc), corrs['linear'])
    # train_disc.py --time_schedule=linear trains the release's way and says so in the checkpoint.
    train_disc.main.main([f'--real={images["real"]}', f'--fake={images["fake"]}', f'--classifier={files["classifier"]}',
                          f'--outdir={tmp_path / "run-linear"}', '--epochs=1', '--batch=16', '--num=16', '--head_width=64',
                          '--head_depth=1', '--time_schedule=linear', '--device=cpu'], standalone_mode=False)
    assert torch.load(tmp_path / 'run-linear' / 'disc-0001.pt', weights_only=True)['time_schedule'] == 'linear'

def test_fid_calc_64x64_with_tiny_detector(images, tmp_path):
    detector = str(tmp_path / 'tiny.pt')
    torch.jit.script(TinyDetector()).save(detector)
    ref = str(tmp_path / 'ref.npz')
    fid.main.main(['ref', f'--data={images["real"]}', f'--dest={ref}', f'--detector={detector}', '--batch=12', '--device=cpu'],
                  standalone_mode=False)
    out = str(tmp_path / 'fid.json')
    fid.main.main(['calc', f'--images={images["fake"]}', f'--ref={ref}', '--num=24', f'--detector={detector}', '--batch=12',
                   '--device=cpu', f'--json={out}'], standalone_mode=False)
    with open(out) as f:
        result = json.load(f)
    # The Frechet distance of the detector's features, from its definition (Heusel et al., 2017):
    # |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), S the sample covariances.
    det = metrics.load_detector(detector, 'cpu', log=lambda *a: None)
    feats = [det(image_sets.ImageSource(images[k]).images(range(24))) for k in ('fake', 'real')]
    (mu1, s1), (mu2, s2) = [(f.numpy().mean(0), np.cov(f.numpy(), rowvar=False)) for f in feats]
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert result['fid'] == pytest.approx(want, rel=1e-6)

def test_nll_64x64_with_dg_and_disc_time(files, images, tmp_path, capsys):
    results = {}
    for disc_time in (None, 'linear'):
        out = str(tmp_path / f'nll-{disc_time}.json')
        nll.main.main([f'--network={files["ffhq"]}', f'--data={images["real"]}', '--num=1', '--batch=1', '--steps=2',
                       f'--disc={files["head"]}', f'--classifier={files["classifier"]}', f'--json={out}', '--device=cpu']
                      + ([f'--disc_time={disc_time}'] if disc_time else []), standalone_mode=False)
        with open(out) as f:
            results[disc_time] = json.load(f)
    printed = capsys.readouterr().out
    assert "release's sampler convention (cosine" in printed and 'set by --disc_time' in printed
    assert results[None]['disc_time'] == 'cosine' and results['linear']['disc_time'] == 'linear'
    for r in results.values():
        assert r['n'] == 1 and np.isfinite(r['bpd_mean']) and r['w'] == 2.0
    assert results[None]['bpd_mean'] != results['linear']['bpd_mean']
