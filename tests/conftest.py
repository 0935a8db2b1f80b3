"""Session fixtures: the reference fixtures and networks built from them (helpers live in helpers.py)."""

import json
import os

import pytest
import torch

from helpers import DATA, build_encoder, tiny_classifier, write_tiny_files
from training import networks

@pytest.fixture(scope='session')
def ref():
    return torch.load(os.path.join(DATA, 'dg_reference.pt'), weights_only=True)

@pytest.fixture(scope='session')
def layouts():
    with open(os.path.join(DATA, 'checkpoint_layouts.json')) as f:
        return json.load(f)

@pytest.fixture(scope='session')
def ref_nets(ref):
    e = ref['edm_net']
    net = getattr(networks, e['class_name'])(**e['init_kwargs']).eval()
    net.load_state_dict(e['state_dict'])
    return dict(net=net, classifier=build_encoder(ref['classifier']),
                head_uncond=build_encoder(ref['head_uncond']), head_cond=build_encoder(ref['head_cond']))

@pytest.fixture
def tiny_files(tmp_path):
    """A tiny conditional EDM pickle, classifier .pt and own-format discriminator .pt."""
    return write_tiny_files(str(tmp_path))

@pytest.fixture(scope='module')
def classifier(tmp_path_factory):
    """A tiny ADM classifier state dict (16x16, 10 classes) saved as .pt; its path."""
    path = tmp_path_factory.mktemp('cls') / 'cls.pt'
    torch.save(tiny_classifier().state_dict(), path)
    return str(path)
