"""The latent toy's trainers: a small diffusers VAE (edm_dg.train_vae) and EDM2's Precond (edm_dg.train_base.train_edm2)."""

import json
import os

import pytest
import torch

from helpers import invoke
from edm_dg import pickles
from edm_dg.digits import digits_u8, write_dataset
from edm_dg.train_base import edm2_loss, train_edm2
from training.encoders import StabilityVAEEncoder

diffusers = pytest.importorskip('diffusers')

VAE_ARGS = dict(batch=16, lr=1e-2, block_out_channels=(8,), progress=False, log=lambda *_: None)

@pytest.fixture(scope='module')
def digits():
    return digits_u8()[0][:64]

@pytest.fixture(scope='module')
def vaes(digits, tmp_path_factory):
    """The untrained VAE (0 steps) and two 12-step runs with the same seed."""
    from edm_dg.train_vae import train_vae
    root = tmp_path_factory.mktemp('vae')
    return {name: (str(root / name), *train_vae(digits, str(root / name), steps=steps, **VAE_ARGS))
            for name, steps in (('start', 0), ('trained', 12), ('again', 12))}

@torch.no_grad()
def reconstruct(vae, x_u8):
    return vae.decode(vae.encode(x_u8.float() / 255).latent_dist.mean).sample

def test_vae_training_lowers_reconstruction_error(digits, vaes):
    x = digits.float() / 255
    err = {name: (reconstruct(vae, digits) - x).square().mean().item() for name, (_, vae, _) in vaes.items()}
    assert err['trained'] < 0.5 * err['start'], err
    assert vaes['trained'][2]['recon_psnr'] > vaes['start'][2]['recon_psnr']

def test_vae_training_is_deterministic(vaes):
    (_, a, stats_a), (_, b, stats_b) = vaes['trained'], vaes['again']
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert stats_a == stats_b

def test_vae_folder_round_trip(digits, vaes):
    """The saved folder loads in diffusers with the same numbers, and latent_stats.json describes its posterior."""
    outdir, vae, stats = vaes['trained']
    # Frozen as StabilityVAEEncoder freezes it: with trainable weights torch picks another attention kernel
    # (its outputs then differ by float rounding, measured 6e-7).
    loaded = diffusers.AutoencoderKL.from_pretrained(outdir, low_cpu_mem_usage=False).eval().requires_grad_(False)
    assert torch.equal(reconstruct(loaded, digits), reconstruct(vae, digits))
    with open(os.path.join(outdir, 'latent_stats.json')) as f:
        saved = json.load(f)
    assert saved == stats  # JSON keeps Python floats exactly
    with torch.no_grad():
        posterior = loaded.encode(digits.float() / 255).latent_dist
    mean = posterior.mean.double()
    expected = dict(raw_mean=mean.mean(dim=(0, 2, 3)), raw_std=mean.std(dim=(0, 2, 3), correction=0),
                    sample_std=(mean.var(dim=(0, 2, 3), correction=0) + posterior.var.double().mean(dim=(0, 2, 3))).sqrt())
    for key, value in expected.items():
        # Sums of squares (the trainer) against two-pass moments (here), in float64: rounding only.
        assert torch.allclose(torch.tensor(saved[key], dtype=torch.float64), value, rtol=1e-9, atol=0), key
    assert len(saved['raw_mean']) == 4 and min(saved['raw_std']) > 0
    assert not [f for f in os.listdir(os.path.dirname(outdir)) if f.startswith('.tmp-')]

def test_vae_cli(tmp_path, digits):
    from edm_dg.train_vae import main
    write_dataset(str(tmp_path / 'data'), digits[:8], torch.zeros(8, dtype=torch.int64))
    code, text, errors = invoke(main, ['--help'])
    assert code == 0 and 'latent_stats.json' in text and '--kl_weight' in text
    code, _, errors = invoke(main, [f'--data={tmp_path / "data"}', f'--outdir={tmp_path / "vae"}', '--steps=1',
                                    '--batch=4', '--channels=8', '--device=cpu'])
    assert code == 0 and not errors
    loaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / 'vae'), low_cpu_mem_usage=False)
    assert loaded.config.block_out_channels == [8] and loaded.config.in_channels == 1
    code, _, errors = invoke(main, [f'--data={tmp_path / "data"}', f'--outdir={tmp_path / "vae"}', '--steps=0',
                                    '--channels=4', '--device=cpu'])  # replaces the previous VAE folder
    assert code == 0 and not errors and not [f for f in os.listdir(tmp_path) if f.startswith('.tmp-')]
    loaded = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / 'vae'), low_cpu_mem_usage=False)
    assert loaded.config.block_out_channels == [4]
    code, _, errors = invoke(main, [f'--data={tmp_path / "data"}', f'--outdir={tmp_path}', '--steps=1'])
    assert code != 0 and len(errors) == 1 and '--outdir' in errors[0]
    code, _, errors = invoke(main, [f'--data={tmp_path / "data"}', f'--outdir={tmp_path / "vae2"}', '--channels=8,x'])
    assert code != 0 and len(errors) == 1 and '--channels' in errors[0]

#----------------------------------------------------------------------------

EDM2_ARGS = dict(batch=16, lr=1e-2, ema_halflife_steps=4, model_kwargs=dict(model_channels=16), progress=False,
                 log=lambda *_: None)

def toy_encoder():
    return StabilityVAEEncoder(vae_name='toy-vae-dir', raw_mean=[0.5, -1, 2, 0], raw_std=[1, 2, 0.5, 3])

def test_edm2_snapshot_round_trip(tmp_path):
    """The pickle's network (restricted loader) computes exactly what train_edm2 returned; the encoder travels along."""
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    labels = torch.arange(32) % 3
    ema = train_edm2(latents, labels, str(tmp_path / 'net.pkl'), encoder=toy_encoder(), label_dim=3, steps=3,
                     **EDM2_ARGS)
    data = pickles.read_pickle(str(tmp_path / 'net.pkl'))
    assert sorted(data) == ['dataset_kwargs', 'ema', 'encoder', 'loss_fn']
    assert next(data['ema'].parameters()).dtype == torch.float16 and not data['ema'].training
    enc = data['encoder']
    assert enc.vae_name == 'toy-vae-dir' and (enc.scale == toy_encoder().scale).all() and (enc.bias == toy_encoder().bias).all()
    net = pickles.load_network_pickle(str(tmp_path / 'net.pkl'))
    x, sigma = latents[:4] + torch.randn(4, 4, 8, 8), torch.tensor([0.05, 0.5, 2.0, 20.0])
    onehot = torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        ref = ema(x, sigma, onehot)
        assert torch.equal(net(x, sigma, onehot), ref)
        assert not torch.equal(ema(x, sigma, torch.eye(3)[[1, 2, 0, 1]]), ref)  # the labels reach the network

def test_edm2_loss_decreases_on_constant_latents(tmp_path):
    """All latents equal one constant: a denoiser learns it fast, so EDM2's loss drops."""
    latents = torch.full([64, 4, 8, 8], 0.3)
    nets = {steps: train_edm2(latents, None, str(tmp_path / f'{steps}.pkl'), encoder=toy_encoder(), steps=steps,
                              **EDM2_ARGS) for steps in (0, 30)}
    losses = {}
    for steps, net in nets.items():
        torch.manual_seed(5)  # the same noise levels and noise for both nets
        with torch.no_grad():
            losses[steps] = edm2_loss(net, latents.repeat(4, 1, 1, 1)).mean().item()
    assert losses[30] < losses[0] - 0.5, losses
