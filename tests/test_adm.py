"""ADM encoder and DG discriminator against the reference fixtures and released layouts."""

import pytest
import torch

from edm_dg import lora
from edm_dg.adm import EncoderUNet
from helpers import assert_close_to_fixture, float32_layers, tiny_classifier, tiny_discriminator
from edm_dg.disc_checkpoint import (CheckpointError, build_encoder, discriminator_checkpoint, load_classifier,
                                    load_discriminator)
from edm_dg.discriminator import Discriminator

def test_classifier_features_and_logits(ref, ref_nets):
    c = ref['classifier']
    layers = float32_layers(ref_nets['classifier'])  # all its layers: more than the features pass through
    with torch.no_grad():
        assert_close_to_fixture(ref_nets['classifier'].features(c['x'], c['t']), c['features'], *layers)
        assert_close_to_fixture(ref_nets['classifier'](c['x'], c['t']), c['logits'], *layers)

@pytest.mark.parametrize('name', ['head_uncond', 'head_cond'])
def test_heads(ref, ref_nets, name):
    c, h = ref['classifier'], ref[name]
    disc = Discriminator(ref_nets['classifier'], ref_nets[name])
    with torch.no_grad():
        d = disc(c['x'], c['t'], h.get('condition_onehot'))
        # Integer labels work as well as one-hot ones.
        if name == 'head_cond':
            assert torch.equal(d, disc(c['x'], c['t'], h['condition_onehot'].argmax(1)))
    assert d.shape == (4,)
    assert_close_to_fixture(d, h['sigmoid_output'], *float32_layers(ref_nets['classifier'], ref_nets[name]))

@pytest.mark.parametrize('family', ['adm_classifier_32x32', 'adm_classifier_64x64',
                                    'dg_discriminator_head_uncond', 'dg_discriminator_head_cond'])
def test_released_layouts_load_strictly(layouts, family):
    entry = layouts[family]
    shapes = entry['state_dict_shapes']
    net = EncoderUNet.from_create_classifier_args(**entry['create_classifier_args'])
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: tuple(v) for k, v in shapes.items()}
    # And the loader infers the same architecture from the keys and shapes alone.
    sd = {k: torch.zeros(v) for k, v in shapes.items()}
    built, args, rank = build_encoder(sd, family, 'test')
    assert rank == 0
    assert args['image_size'] == entry['create_classifier_args']['image_size']
    assert args['condition'] == entry['create_classifier_args'].get('condition', False)

def test_feature_shape_of_released_classifier(layouts):
    net = EncoderUNet.from_create_classifier_args(**layouts['adm_classifier_32x32']['create_classifier_args'])
    assert (net.feature_channels, net.feature_resolution) == (512, 8)

def test_wrong_layout_is_a_clear_error(tmp_path, ref):
    p = tmp_path / 'wrong.pt'
    sd = dict(ref['classifier']['state_dict'])
    sd['input_blocks.1.0.in_layers.2.weight'] = torch.zeros(3, 3)
    torch.save(sd, p)
    with pytest.raises(CheckpointError, match='wrong.pt: keys or shapes do not match'):
        load_classifier(str(p))
    torch.save({'a': 1}, p)
    with pytest.raises(CheckpointError, match='not a state dict of tensors'):
        load_classifier(str(p))
    p.write_bytes(b'garbage')
    with pytest.raises(CheckpointError, match='cannot read classifier'):
        load_classifier(str(p))

def test_lora_study_layout_loads_and_merges(tmp_path, ref, ref_nets):
    """loralib keys: in_layers.2.conv.*, lora_A [r*3, Cin*3], lora_B [Cout*3, r*3]; dW = B@A viewed, alpha/r."""
    c = ref['classifier']
    net = EncoderUNet.from_create_classifier_args(**c['create_classifier_args']).eval()
    net.load_state_dict(c['state_dict'])
    lora.apply_lora(net, rank=2, alpha=1.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith('lora_B'):
                p.normal_(0, 0.01)
    sd = net.state_dict()
    assert 'input_blocks.1.0.in_layers.2.conv.weight' in sd and 'input_blocks.1.0.in_layers.2.lora_A' in sd
    assert tuple(sd['input_blocks.1.0.in_layers.2.lora_A'].shape) == (6, 64 * 3)
    path = tmp_path / 'lora_cls.pt'
    torch.save(sd, path)
    loaded, _, _ = load_classifier(str(path))
    # Merged weights by hand: W + (B @ A).view(W.shape) / r.
    plain = EncoderUNet.from_create_classifier_args(**c['create_classifier_args']).eval()
    merged = lora.to_plain_state_dict(sd)
    for k in list(merged):
        if k.endswith('in_layers.2.weight'):
            base = k[: -len('weight')]
            a, b = sd[base + 'lora_A'], sd[base + 'lora_B']
            merged[k] = merged[k] + (b @ a).view(merged[k].shape) * (1.0 / 2)
    plain.load_state_dict(merged)
    with torch.no_grad():
        f1 = loaded.features(c['x'], c['t'])
        f2 = plain.features(c['x'], c['t'])
        f0 = ref_nets['classifier'].features(c['x'], c['t'])
    assert (f1 - f2).abs().max() < 1e-4
    assert (f1 - f0).abs().max() > 1e-3  # the adapters do change the features

def test_own_checkpoint_round_trip_and_hash_check(tiny_files, tmp_path):
    disc = load_discriminator(tiny_files['disc'], tiny_files['classifier'])
    released = load_discriminator(tiny_files['head'], tiny_files['classifier'])
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(disc(x, t), released(x, t))
    assert not any(p.requires_grad for p in disc.parameters())
    other = tmp_path / 'other_cls.pt'
    sd = torch.load(tiny_files['classifier'], weights_only=True)
    sd['time_embed.0.bias'] = sd['time_embed.0.bias'] + 1
    torch.save(sd, other)
    with pytest.raises(CheckpointError, match='pass the classifier it was trained with'):
        load_discriminator(tiny_files['disc'], str(other))
    with pytest.raises(CheckpointError, match='this is a discriminator checkpoint'):
        load_classifier(tiny_files['disc'])

#----------------------------------------------------------------------------
# LoRA alpha (docs/compat.md §6): study files do not record it; the default is the study's 1.

def _study_lora_file(path, rank=2, seed=0):
    """A classifier in the reproduction study's loralib layout with non-zero B (so dW != 0)."""
    net = tiny_classifier()
    lora.apply_lora(net, rank)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n.endswith('lora_B'):
                p.normal_(0, 0.05)
    torch.save(net.state_dict(), path)
    return net.state_dict()

def test_study_lora_file_scales_with_alpha(tmp_path):
    rank = 2
    sd = _study_lora_file(tmp_path / 'study.pt', rank)
    assert tuple(sd['input_blocks.1.0.in_layers.2.lora_A'].shape) == (rank * 3, 64 * 3)
    assert tuple(sd['input_blocks.1.0.in_layers.2.lora_B'].shape) == (64 * 3, rank * 3)
    plain = tiny_classifier()  # same seed: the frozen weights W of the study file
    nets = {a: load_classifier(str(tmp_path / 'study.pt'), a)[0] for a in (None, 1.0, 2.0, 0.0)}
    assert lora.DEFAULT_ALPHA == 1.0 and lora.lora_config(nets[None]) == (rank, 1.0)
    assert lora.lora_config(nets[2.0]) == (rank, 2.0)
    # One layer: dW = (B @ A).view(C_out, C_in, 3, 3) * alpha / r, so alpha=2 doubles dW's effect on the output.
    x = torch.randn(2, 64, 16, 16)
    conv = {a: n.input_blocks[1][0].in_layers[2] for a, n in nets.items()}
    a_, b_ = sd['input_blocks.1.0.in_layers.2.lora_A'], sd['input_blocks.1.0.in_layers.2.lora_B']
    assert torch.allclose(conv[1.0].delta_weight(), (b_ @ a_).view(64, 64, 3, 3) / rank)
    with torch.no_grad():
        base = plain.input_blocks[1][0].in_layers[2](x)
        d1, d2 = conv[1.0](x) - base, conv[2.0](x) - base
    assert d1.abs().max() > 1e-3
    assert torch.allclose(d2, 2 * d1, atol=1e-5)
    assert torch.allclose(conv[0.0](x), base, atol=1e-6)  # alpha=0: the frozen classifier
    # Whole network: equal to the plain classifier with merged weights W + dW * alpha / r.
    merged = lora.to_plain_state_dict(sd)
    for k in merged:
        if k.endswith('in_layers.2.weight'):
            b = k[: -len('weight')]
            merged[k] = merged[k] + (sd[b + 'lora_B'] @ sd[b + 'lora_A']).view(merged[k].shape) * (2.0 / rank)
    plain.load_state_dict(merged)
    xi, t = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.7])
    with torch.no_grad():
        assert (nets[2.0].features(xi, t) - plain.features(xi, t)).abs().max() < 1e-4

def test_load_discriminator_lora_alpha(tmp_path):
    """None: recorded alpha of an edm-dg checkpoint, else the study's 1; an explicit value wins."""
    study = tmp_path / 'study.pt'
    _study_lora_file(study, rank=2)
    cls, _, _ = load_classifier(str(study))
    head = tiny_discriminator(cls).head
    torch.save(head.state_dict(), tmp_path / 'head.pt')
    released = lambda a: load_discriminator(str(tmp_path / 'head.pt'), str(study), lora_alpha=a)
    assert lora.lora_config(released(None).classifier) == (2, lora.DEFAULT_ALPHA)
    assert lora.lora_config(released(3.0).classifier) == (2, 3.0)
    # Own checkpoint trained with adapters at alpha=2: loads with 2 unless told otherwise.
    cls2, args, sha = load_classifier(str(study), 2.0)
    ckpt = discriminator_checkpoint(Discriminator(cls2, head), sha, args)
    assert (ckpt['lora_rank'], ckpt['lora_alpha']) == (2, 2.0)  # recorded as the adapters have them
    torch.save(ckpt, tmp_path / 'disc.pt')
    own = lambda a: load_discriminator(str(tmp_path / 'disc.pt'), str(study), lora_alpha=a)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        assert lora.lora_config(own(None).classifier) == (2, 2.0)
        assert torch.equal(own(None)(x, t), own(2.0)(x, t))
        assert lora.lora_config(own(1.0).classifier) == (2, 1.0)
        assert not torch.equal(own(None)(x, t), own(1.0)(x, t))
    with pytest.raises(ValueError, match='--lora_alpha=nan'):
        released(float('nan'))
