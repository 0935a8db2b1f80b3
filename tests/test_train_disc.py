"""train_disc.py: learning, LoRA freezing, exact resume, torchrun, input formats, bad input."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_one_line_error, py, tiny_classifier, torchrun, sharp_and_blurred, write_set
from edm_dg import lora
from edm_dg.disc_diagnostics import evaluate, read_metrics
from edm_dg.disc_training import load_pair, train
from edm_dg.disc_checkpoint import load_discriminator

TINY = dict(head_width=64, head_depth=1, progress=False, log=lambda *a: None)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('disc')
    real, fake = sharp_and_blurred(256, 0)
    labels = torch.arange(256) % 10
    write_set(str(d / 'real'), real, labels)
    write_set(str(d / 'fake'), fake, labels)
    vreal, vfake = sharp_and_blurred(128, 1)
    write_set(str(d / 'real_val'), vreal)
    write_set(str(d / 'fake_val'), vfake)
    torch.save(tiny_classifier().state_dict(), d / 'cls.pt')
    return d

def test_bf16_training_tracks_fp32(data, tmp_path):
    """bf16 autocast (the fast path behind the training benchmark's bf16 row) from the same start: the
    same steps give losses within bf16 rounding of fp32's, and a checkpoint that loads and judges finitely."""
    runs = {}
    for precision in ('fp32', 'bf16'):
        last = train(str(tmp_path / precision), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'),
                     epochs=1, batch=16, num=48, precision=precision, **TINY)
        runs[precision] = (read_metrics(str(tmp_path / precision))[-1]['loss'], last)
    # bf16 acts (the same steps in fp32 twice give the same loss exactly) and stays within its rounding:
    # 2^-8 relative per operation, about 0.003 of a loss near log 2.
    assert 1e-5 < abs(runs['bf16'][0] - runs['fp32'][0]) < 0.02, runs
    images, targets, _ = load_pair(str(data / 'real_val'), str(data / 'fake_val'))
    judged = {k: evaluate(load_discriminator(last, str(data / 'cls.pt')), images[:16], targets[:16])['loss']
              for k, (_, last) in runs.items()}
    assert 0 < abs(judged['bf16'] - judged['fp32']) < 0.02, judged  # the bf16 weights judge as fp32's do

@pytest.mark.parametrize('precision', ['fp32'])
def test_learns_real_vs_blurred(data, tmp_path, precision):
    """Learning on a learnable pair (bf16: test_bf16_training_tracks_fp32)."""
    last = train(str(tmp_path / 'run'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'),
                 epochs=5, batch=32, precision=precision, **TINY)
    metrics = read_metrics(str(tmp_path / 'run'))
    assert [m['epoch'] for m in metrics] == [1, 2, 3, 4, 5]
    assert metrics[-1]['loss'] < metrics[0]['loss'] - 0.05
    assert all(m['images_per_s'] > 0 for m in metrics)
    assert os.path.getsize(tmp_path / 'run' / 'training-curves.png') > 1000
    disc = load_discriminator(last, str(data / 'cls.pt'))
    images, targets, _ = load_pair(str(data / 'real_val'), str(data / 'fake_val'))
    ev = evaluate(disc, images, targets)
    assert (ev['acc_real'] + ev['acc_fake']) / 2 > 0.6, ev
    assert ev['loss'] < 0.69

def test_lora_changes_only_adapters_and_head(data, tmp_path):
    before = torch.load(data / 'cls.pt', weights_only=True)
    last = train(str(tmp_path / 'run'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'),
                 epochs=1, batch=32, num=64, lora_rank=2, **TINY)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt['lora_rank'] == 2 and ckpt['lora'] and all(k.endswith(('lora_A', 'lora_B')) for k in ckpt['lora'])
    assert not any('in_layers.2.conv' in k for k in ckpt['lora'])  # classifier weights are not stored
    assert any(v.abs().sum() > 0 for k, v in ckpt['lora'].items() if k.endswith('lora_B'))  # adapters trained
    disc = load_discriminator(last, str(data / 'cls.pt'))
    base = lora.to_plain_state_dict(disc.classifier.state_dict())
    assert base.keys() == before.keys()
    assert all(torch.equal(base[k], before[k]) for k in before)  # bit-identical
    assert torch.equal(torch.load(data / 'cls.pt', weights_only=True)['time_embed.0.weight'], before['time_embed.0.weight'])

def test_resume_reaches_same_weights(data, tmp_path):
    kw = dict(epochs=3, batch=32, num=64, lora_rank=1, **TINY)
    ref = train(str(tmp_path / 'a'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'), **kw)
    # Interrupted in the middle of epoch 2, then resumed.
    train(str(tmp_path / 'b'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'), stop_after_steps=6, **kw)
    assert read_metrics(str(tmp_path / 'b'))[-1]['epoch'] == 1
    res = train(str(tmp_path / 'b'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'), **kw)  # resumes by default
    a, b = torch.load(ref, weights_only=True), torch.load(res, weights_only=True)
    assert all(torch.equal(a['head'][k], b['head'][k]) for k in a['head'])
    assert all(torch.equal(a['lora'][k], b['lora'][k]) for k in a['lora'])
    assert [m['loss'] for m in read_metrics(str(tmp_path / 'a'))] == [m['loss'] for m in read_metrics(str(tmp_path / 'b'))]
    # --no-resume starts over: the earlier run's checkpoints and metrics go, the result equals a fresh run's.
    again = train(str(tmp_path / 'b'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'), resume=False,
                  **dict(kw, epochs=1))
    assert sorted(f for f in os.listdir(tmp_path / 'b') if f.startswith('disc-')) == ['disc-0001.pt']
    assert [m['epoch'] for m in read_metrics(str(tmp_path / 'b'))] == [1]
    first = torch.load(os.path.join(tmp_path / 'a', 'disc-0001.pt'), weights_only=True)
    assert all(torch.equal(first['head'][k], torch.load(again, weights_only=True)['head'][k]) for k in first['head'])

def test_cond_and_npz_inputs(data, tmp_path):
    real, fake = sharp_and_blurred(32, 2)
    np.savez(tmp_path / 'real.npz', arr_0=real.permute(0, 2, 3, 1).numpy())  # DG release layout, no labels
    np.savez(tmp_path / 'fake.npz', samples=fake.permute(0, 2, 3, 1).numpy(), label=np.arange(32) % 10)
    last = train(str(tmp_path / 'u'), str(tmp_path / 'real.npz'), str(tmp_path / 'fake.npz'), str(data / 'cls.pt'),
                 epochs=1, batch=16, **TINY)
    ckpt = torch.load(last, weights_only=True)
    assert ckpt['config']['num'] == 32 and ckpt['training']['epoch'] == 1  # every image of each npz, one epoch
    with pytest.raises(ValueError, match='real.npz: --cond needs class labels'):
        train(str(tmp_path / 'c'), str(tmp_path / 'real.npz'), str(tmp_path / 'fake.npz'), str(data / 'cls.pt'),
              epochs=1, batch=16, cond=True, **TINY)
    last = train(str(tmp_path / 'c2'), str(data / 'real'), str(data / 'fake'), str(data / 'cls.pt'),
                 epochs=1, batch=16, num=32, cond=True, **TINY)
    assert load_discriminator(last, str(data / 'cls.pt')).cond

def test_torchrun_two_processes(data, tmp_path):
    p = torchrun('train_disc.py', f'--real={data / "real"}', f'--fake={data / "fake"}', f'--classifier={data / "cls.pt"}',
                 f'--outdir={tmp_path / "run"}', '--epochs=2', '--batch=32', '--num_images=64', '--head_width=64', '--head_depth=1')
    assert p.returncode == 0, p.stderr
    files = sorted(os.listdir(tmp_path / 'run'))
    assert [f for f in files if f.startswith('disc-')] == ['disc-0001.pt', 'disc-0002.pt']
    assert [m['epoch'] for m in read_metrics(str(tmp_path / 'run'))] == [1, 2]
    config = torch.load(tmp_path / 'run' / 'disc-0002.pt', weights_only=True)['config']
    assert (config['world_size'], config['batch_per_process'], config['num']) == (2, 32, 64)  # --batch per process, 64 of each kind
    # The checkpoint samples directly in generate_dg.py.
    from helpers import save_edm_pickle, tiny_edm
    net = save_edm_pickle(tiny_edm(), str(tmp_path / 'net.pkl'))
    g = py('generate_dg.py', f'--network={net}', f'--disc={tmp_path / "run" / "disc-0002.pt"}', f'--classifier={data / "cls.pt"}',
           '--seeds=0-1', '--steps=3', f'--outdir={tmp_path / "gen"}')
    assert g.returncode == 0, g.stderr
    assert len([f for f in os.listdir(tmp_path / 'gen') if f.endswith('.png')]) == 2

def test_bad_inputs(data, tmp_path):
    common = [f'--classifier={data / "cls.pt"}', '--epochs=1', '--batch=8', '--head_width=64', '--head_depth=1']
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert_one_line_error(py('train_disc.py', f'--real={empty}', f'--fake={data / "fake"}', f'--outdir={tmp_path / "o1"}', *common),
                          'empty', 'no images')
    corrupt = tmp_path / 'corrupt'
    corrupt.mkdir()
    Image.new('RGB', (16, 16)).save(corrupt / 'a.png')
    (corrupt / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    assert_one_line_error(py('train_disc.py', f'--real={corrupt}', f'--fake={data / "fake"}', f'--outdir={tmp_path / "o2"}', *common),
                          'b.png', 'not a readable image')
    small = tmp_path / 'small'
    write_set(str(small), torch.zeros(4, 3, 8, 8, dtype=torch.uint8))
    assert_one_line_error(py('train_disc.py', f'--real={data / "real"}', f'--fake={small}', f'--outdir={tmp_path / "o3"}', *common),
                          'small', 'resolution')
    assert_one_line_error(py('train_disc.py', f'--real={data / "real_val"}', f'--fake={data / "fake"}', f'--outdir={tmp_path / "o4"}', '--cond', *common),
                          'real_val', '--cond needs class labels')
    wrong = tmp_path / 'wrong.pt'
    torch.save({'conv.weight': torch.zeros(3, 3)}, wrong)
    assert_one_line_error(py('train_disc.py', f'--real={data / "real"}', f'--fake={data / "fake"}', f'--outdir={tmp_path / "o5"}',
                             f'--classifier={wrong}', '--epochs=1'), 'wrong.pt', 'do not match')
    assert not os.path.exists(tmp_path / 'o5' / 'disc-0001.pt')

def test_train_classifier_feeds_train_disc(data, tmp_path):
    """A classifier trained by edm_dg.train_classifier is accepted by --classifier."""
    p = run_module('edm_dg.train_classifier', f'--data={data / "real"}', f'--outdir={tmp_path / "cls"}',
                   '--epochs=1', '--batch=64', '--width=64', '--depth=1')
    assert p.returncode == 0, p.stderr
    cls = tmp_path / 'cls' / 'classifier.pt'
    sd = torch.load(cls, weights_only=True)
    assert sd['out.2.c_proj.weight'].shape[0] == 10
    last = train(str(tmp_path / 'd'), str(data / 'real'), str(data / 'fake'), str(cls), epochs=1, batch=32, num=64, **TINY)
    assert load_discriminator(last, str(cls)).classifier.image_size == 16

def run_module(mod, *args):
    import sys
    from helpers import run_cli
    return run_cli([sys.executable, '-m', mod, *args])

def test_lora_alpha_reaches_a_study_files_adapters(data, tmp_path):
    """--lora_alpha scales the adapters that come with a study-format classifier (was: always the default 1)."""
    from edm_dg.disc_training import build
    net = tiny_classifier()
    lora.apply_lora(net, 2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith('lora_B'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    study = tmp_path / 'study.pt'
    torch.save(net.state_dict(), study)
    discs = {a: build(str(study), lora_alpha=a, head_width=64, head_depth=1)[0] for a in (1.0, 3.0)}
    assert lora.lora_config(discs[3.0].classifier) == (2, 3.0) and lora.lora_config(discs[1.0].classifier) == (2, 1.0)
    x, t = torch.randn(2, 3, 16, 16, generator=gen), torch.tensor([0.1, 0.6])
    with torch.no_grad():
        assert not torch.allclose(discs[1.0].classifier.features(x, t), discs[3.0].classifier.features(x, t))
    last = train(str(tmp_path / 'run'), str(data / 'real'), str(data / 'fake'), str(study), epochs=1, batch=16, num=16,
                 lora_alpha=3.0, **TINY)
    ckpt = torch.load(last, weights_only=True)
    assert (ckpt['lora_rank'], ckpt['lora_alpha']) == (2, 3.0)
