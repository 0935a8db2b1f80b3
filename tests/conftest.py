"""Shared test helpers: reference fixtures, tiny seeded networks, CLI runners."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

import dnnlib
from edm_dg.adm import EncoderUNet
from edm_dg.discriminator import Discriminator, discriminator_checkpoint, make_head
from training import loss, networks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')

@pytest.fixture(scope='session')
def ref():
    return torch.load(os.path.join(DATA, 'dg_reference.pt'), weights_only=True)

@pytest.fixture(scope='session')
def layouts():
    with open(os.path.join(DATA, 'checkpoint_layouts.json')) as f:
        return json.load(f)

def build_encoder(entry):
    net = EncoderUNet.from_create_classifier_args(**entry['create_classifier_args']).eval()
    net.load_state_dict(entry['state_dict'])
    return net

@pytest.fixture(scope='session')
def ref_nets(ref):
    e = ref['edm_net']
    net = getattr(networks, e['class_name'])(**e['init_kwargs']).eval()
    net.load_state_dict(e['state_dict'])
    return dict(net=net, classifier=build_encoder(ref['classifier']),
                head_uncond=build_encoder(ref['head_uncond']), head_cond=build_encoder(ref['head_cond']))

def tiny_edm(label_dim=0, res=16, channels=3, seed=0, model_channels=16):
    torch.manual_seed(seed)
    return networks.EDMPrecond(img_resolution=res, img_channels=channels, label_dim=label_dim, model_type='SongUNet',
                               model_channels=model_channels, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[res // 2],
                               dropout=0.0).eval()

def save_edm_pickle(net, path):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=None, dataset_kwargs=dnnlib.EasyDict()), f)
    return path

def tiny_classifier(res=16, channels=3, seed=0, width=64, num_classes=10):
    torch.manual_seed(seed)
    net = EncoderUNet.from_create_classifier_args(image_size=res, in_channels=channels, classifier_width=width,
                                                  classifier_depth=1, out_channels=num_classes).eval()
    with torch.no_grad():  # Non-zero residual outputs so gradients are informative.
        for p in net.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return net

def tiny_discriminator(classifier, cond=False, seed=1, num_classes=10):
    torch.manual_seed(seed)
    head = make_head(classifier.feature_channels, classifier.feature_resolution, cond=cond, width=64, depth=1, num_classes=num_classes)
    with torch.no_grad():
        for p in head.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return Discriminator(classifier, head.eval()).eval()

@pytest.fixture
def tiny_files(tmp_path):
    """A tiny conditional EDM pickle, classifier .pt and own-format discriminator .pt."""
    net = tiny_edm(label_dim=10)
    cls = tiny_classifier()
    disc = tiny_discriminator(cls)
    paths = dict(net=save_edm_pickle(net, str(tmp_path / 'net.pkl')), classifier=str(tmp_path / 'cls.pt'),
                 disc=str(tmp_path / 'disc.pt'), head=str(tmp_path / 'head.pt'))
    torch.save(cls.state_dict(), paths['classifier'])
    torch.save(disc.head.state_dict(), paths['head'])
    from edm_dg.discriminator import read_weights
    _, sha = read_weights(paths['classifier'], 'classifier')
    from edm_dg.discriminator import infer_encoder_args
    torch.save(discriminator_checkpoint(disc, sha, infer_encoder_args(cls.state_dict())), paths['disc'])
    return paths

def run_cli(args, timeout=600, env=None, cwd=None):
    """Run a command with the project on PYTHONPATH; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)

def py(script, *args, **kwargs):
    return run_cli([sys.executable, os.path.join(ROOT, script), *args], **kwargs)

def torchrun(script, *args, nproc=2, **kwargs):
    return run_cli([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                    os.path.join(ROOT, script), *args], **kwargs)

def assert_one_line_error(proc, *needles):
    """Non-zero exit, no traceback, a one-line 'Error:' message containing all needles."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert 'Traceback' not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
