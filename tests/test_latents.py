"""EDM2's latent models end to end: the VAE of StabilityVAEEncoder, latent files, latent classifiers and discriminators.

A tiny random diffusers AutoencoderKL, built from a config and written with
save_pretrained in the test, serves as --vae (no weights are downloaded); the
latent networks are tests/data/edm2_reference.pt's tiny `latent8` (4x8x8
latents, 10 classes) and a variant of it.
"""

import json
import os

import numpy as np
import pytest
import torch

import fid
import generate_dg
import train_disc
from helpers import (assert_same_up_to_rounding, edm2_precond, invoke, latent_encoder, sharp_and_blurred,
                     tiny_vae, write_edm2_pickle, write_set)
from edm_dg import fileio, latents, models
from edm_dg.pickles import EDM2Network, load_network_pickle
from edm_dg.sampling import edm_sampler
from edm_dg.train_classifier import train_classifier

diffusers = pytest.importorskip('diffusers')

def quiet(*_args, **_kwargs):
    pass

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    """A tiny VAE folder, the latent pickle, a latent guide, and 24 labelled 16x16 images."""
    d = tmp_path_factory.mktemp('latent')
    vae = tiny_vae(d / 'vae')
    net = edm2_precond('latent8')
    torch.manual_seed(3)
    guide = edm2_precond('latent8', model_channels=8)
    images, _ = sharp_and_blurred(24, seed=5)
    labels = torch.arange(24) % 10
    write_set(d / 'images', images, labels)
    return dict(dir=d, vae_dir=str(d / 'vae'), vae=vae, net=net, pkl=write_edm2_pickle(net, d / 'latent.pkl', latent_encoder()),
                gnet=write_edm2_pickle(guide, d / 'guide.pkl', latent_encoder()),
                pixels_pkl=write_edm2_pickle(edm2_precond('cond16'), d / 'pixels.pkl'), images=images, labels=labels)

def by_hand_decode(vae, enc, x, batch):
    """EDM2's decode written out against diffusers: undo the standardisation, decode in batches, clamp to [0, 1]."""
    scale = torch.as_tensor(enc.scale).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(enc.bias).reshape(1, -1, 1, 1)
    raw = (x - bias) / scale
    with torch.no_grad():
        y = torch.cat([vae.decode(b).sample for b in raw.split(batch)])
    return y.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
# The encoder against diffusers called directly.

def test_encoder_agrees_with_diffusers(toy):
    enc = latents.prepare_encoder(latent_encoder(batch_size=5), 'cpu', vae=toy['vae_dir'], source='test')
    pixels = toy['images'][:7]
    with torch.no_grad():
        post = toy['vae'].encode(pixels.to(torch.float32) / 255).latent_dist  # EDM2 feeds the VAE [0, 1] pixels
    raw = latents.encode_images(enc, pixels)
    assert raw.shape == (7, 8, 8, 8)
    torch.testing.assert_close(raw, torch.cat([post.mean, post.std], dim=1), rtol=1e-5, atol=1e-6 * float(post.mean.abs().max()))
    final = torch.randn(7, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        got = enc.decode(final)
    assert got.dtype == torch.uint8 and got.shape == (7, 3, 16, 16)
    assert_same_up_to_rounding(got.numpy(), by_hand_decode(toy['vae'], enc, final, 5).numpy())
    # Standardisation: a raw latent of EDM2's assumed mean and std per channel is final_std * eps exactly.
    mean = torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1).expand(3, 4, 2, 2)
    std = torch.tensor([4.17, 4.62, 3.71, 3.28]).reshape(1, 4, 1, 1).expand(3, 4, 2, 2)
    out = latents.standardise(torch.cat([mean, std], 1), enc.scale, enc.bias, torch.Generator().manual_seed(1))
    eps = torch.randn([3, 4, 2, 2], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, 0.5 * eps, rtol=1e-5, atol=1e-5 * float(eps.abs().max()))  # float32 rounding of the scale
    # ... and it is EDM2's encode_latents (which draws from the global generator) given the same draw.
    torch.manual_seed(7)
    edm2 = enc.encode_latents(torch.cat([mean, std], 1))
    torch.manual_seed(7)
    assert torch.equal(latents.standardise(torch.cat([mean, std], 1), enc.scale, enc.bias, torch.default_generator), edm2)

#----------------------------------------------------------------------------
# Generation on a latent pickle.

def reference_images(toy, seeds, num_steps):
    """EDM2's generate_images.py for a latent model, by hand: per-seed latent then class, its sampler, decode."""
    xs, ys = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        xs.append(torch.randn([4, 8, 8], generator=g))
        ys.append(int(torch.randint(10, [], generator=g)))
    net = EDM2Network(toy['net'])
    labels = torch.nn.functional.one_hot(torch.tensor(ys), 10).to(torch.float32)
    with torch.no_grad():  # S_churn = 0: the sampler draws no noise after the latents
        x = edm_sampler(net, torch.stack(xs), labels, num_steps=num_steps)
    return by_hand_decode(toy['vae'], latent_encoder(), x, 4).permute(0, 2, 3, 1).numpy()

def test_latent_pickle_generates_as_the_reference(toy, tmp_path):
    seeds = list(range(5))
    code, text, errors = invoke(generate_dg.main, [f'--network={toy["pkl"]}', f'--vae={toy["vae_dir"]}', f'--outdir={tmp_path / "a"}',
                                                   '--seeds=0-4', '--batch=3', '--steps=4', '--save_latents', '--encoder_batch=2'])
    assert code == 0, text
    got = np.stack([fileio.read_image(str(tmp_path / 'a' / f'{s:06d}.png')) for s in seeds])
    assert_same_up_to_rounding(got, reference_images(toy, seeds, 4))
    # The latents shards hold the sampler's final latents, which decode to the PNGs.
    x, y, s, space = latents.read_latent_shards(str(tmp_path / 'a'))
    assert s.tolist() == seeds and x.shape == (5, 4, 8, 8) and space['kind'] == 'latents'
    assert space == latents.space_of(latent_encoder())
    labels = json.load(open(tmp_path / 'a' / 'dataset.json'))['labels']
    assert y.tolist() == [lab for _, lab in labels]
    decoded = latents.DecodedLatents(str(tmp_path / 'a' / 'latents'), vae=toy['vae_dir'], batch_size=2)
    assert np.array_equal(decoded.images(range(5)).permute(0, 2, 3, 1).numpy(), got)
    # Another batch and decode batch: the same images up to rounding (a seed's image depends only on its seed).
    code, text, _ = invoke(generate_dg.main, [f'--network={toy["pkl"]}', f'--vae={toy["vae_dir"]}', f'--outdir={tmp_path / "b"}',
                                              '--seeds=0-4', '--batch=5', '--steps=4', '--encoder_batch=5'])
    assert code == 0, text
    again = np.stack([fileio.read_image(str(tmp_path / 'b' / f'{s:06d}.png')) for s in seeds])
    assert_same_up_to_rounding(again, got)

def test_save_latents_resumes_a_batch_without_its_shard(toy, tmp_path):
    args = dict(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path), seeds='0-3', max_batch_size=2, num_steps=3,
                save_latents=True, device='cpu', log=quiet)
    generate_dg.run(**args)
    first = latents.read_latent_shards(str(tmp_path))[0]
    shard = latents.shard_path(str(tmp_path), [2, 3])
    os.remove(shard)
    generate_dg.run(**args)
    assert os.path.isfile(shard)
    assert torch.equal(latents.read_latent_shards(str(tmp_path))[0], first)
    # Resumed with another --batch: seeds already held are not sampled or stored again.
    generate_dg.run(**dict(args, seeds='0-5', max_batch_size=4))
    x, _, seeds, _ = latents.read_latent_shards(str(tmp_path))
    assert seeds.tolist() == list(range(6)) and torch.equal(x[:4], first)
    names = sorted(os.listdir(tmp_path / 'latents'))
    assert names == ['seeds-000000-000001-n2.npz', 'seeds-000002-000003-n2.npz', 'seeds-000004-000005-n2.npz'], names
    # A copy of one seed in two shards is refused, naming both.
    latents.save_latent_shard(latents.shard_path(str(tmp_path), [1]), first[1:2], [-1], [1], latents.space_of(latent_encoder()))
    with pytest.raises(ValueError, match='seed 1 is also in'):
        latents.read_latent_shards(str(tmp_path))

def test_guided_latent_model_composes(toy, tmp_path):
    """--gnet with a latent guide: w = 1 is the main net alone; another w changes the images."""
    run = lambda name, **kw: generate_dg.run(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path / name), seeds='0-3',
                                             num_steps=4, device='cpu', log=quiet, **kw) or \
        np.stack([fileio.read_image(str(tmp_path / name / f'{s:06d}.png')) for s in range(4)])
    plain = run('plain')
    assert np.array_equal(run('w1', gnet=toy['gnet'], guidance=1.0), plain)
    guided = run('w2', gnet=toy['gnet'], guidance=2.0, guidance_interval='0.05,5')
    assert (guided != plain).mean() > 0.1

def test_fid_decodes_latent_shards_first(toy, tmp_path):
    generate_dg.run(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path / 'gen'), seeds='0-7', num_steps=3,
                    save_latents=True, device='cpu', log=quiet)
    from helpers import TinyDetector
    det = tmp_path / 'det.pt'
    torch.jit.script(TinyDetector()).save(str(det))
    code, text, _ = invoke(fid.main, ['ref', f'--data={toy["dir"] / "images"}', f'--dest={tmp_path / "ref.npz"}', f'--detector={det}'])
    assert code == 0, text
    common = [f'--ref={tmp_path / "ref.npz"}', '--num_images=8', f'--detector={det}']
    code, on_png, _ = invoke(fid.main, ['calc', f'--images={tmp_path / "gen"}', *common, f'--json={tmp_path / "png.json"}'])
    assert code == 0, on_png
    code, on_latents, _ = invoke(fid.main, ['calc', f'--images={tmp_path / "gen" / "latents"}', f'--vae={toy["vae_dir"]}', *common,
                                            f'--json={tmp_path / "latents.json"}'])
    assert code == 0, on_latents
    assert 'Decoding 8 latents' in on_latents
    fids = [json.load(open(tmp_path / f'{k}.json'))['fid'] for k in ('png', 'latents')]
    assert fids[0] > 0 and fids[1] == fids[0]  # the decoded latents are the PNGs

#----------------------------------------------------------------------------
# Latent classifier -> latent discriminator -> DG generation.

def test_latents_to_classifier_to_discriminator_to_dg(toy, tmp_path):
    enc = latents.prepare_encoder(latent_encoder(), 'cpu', vae=toy['vae_dir'], source='test')
    raw = latents.encode_images(enc, toy['images'])
    dataset = latents.write_raw_dataset(str(tmp_path / 'real-latents'), raw, toy['labels'])
    assert torch.equal(latents.read_raw_dataset(dataset)[0], raw)  # EDM2's dataset_tool.py layout round-trips
    cls = train_classifier(dataset, str(tmp_path / 'cls'), epochs=1, batch=8, width=64, depth=1, attention='4',
                           encoder_pkl=toy['pkl'], progress=False, log=quiet)
    # Fakes: the latent model's own samples, which a discriminator tells from the real latents.
    generate_dg.run(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path / 'fake'), seeds='1000-1023', num_steps=3,
                    save_latents=True, device='cpu', log=quiet)
    code, text, _ = invoke(train_disc.main, [f'--real={dataset}', f'--fake={tmp_path / "fake"}', f'--classifier={cls}',
                                             f'--outdir={tmp_path / "disc"}', '--epochs=4', '--batch=16', '--lr=3e-3',
                                             '--head_width=64', '--head_depth=1', '--eval_images=16'])
    assert code == 0, text
    assert 'Training on latents [4, 8, 8]' in text
    ckpt = torch.load(tmp_path / 'disc' / 'disc-0004.pt', weights_only=True)
    assert ckpt['space'] == latents.space_of(latent_encoder())
    last = [json.loads(l) for l in open(tmp_path / 'disc' / 'metrics.jsonl')][-1]
    acc = last['acc_by_tau']
    assert acc[0] >= 0.9 and acc[0] > acc[-1], acc  # the smallest tau: nearly clean latents, an easy pair; noise hides it
    # DG on the latent model with it.
    disc = tmp_path / 'disc' / 'disc-0004.pt'
    out = lambda name: np.stack([fileio.read_image(str(tmp_path / name / f'{s:06d}.png')) for s in range(3)])
    for name, w in (('plain', 0.0), ('dg', 4.0)):
        generate_dg.run(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path / name), seeds='0-2', num_steps=4,
                        disc_path=str(disc), classifier_path=cls, dg_weight_1st_order=w, device='cpu', log=quiet)
    assert (out('dg') != out('plain')).mean() > 0.01
    # Through the command: a latent discriminator on a pixel model.
    code, text, errors = invoke(generate_dg.main, [f'--network={toy["pixels_pkl"]}', f'--outdir={tmp_path / "no"}', '--seeds=0',
                                                   f'--disc={disc}', f'--classifier={cls}'])
    assert code != 0 and len(errors) == 1 and 'judges latents but' in errors[0] and str(disc) in errors[0], text
    # A latent discriminator on a pixel model, and a pixel one (no record) on a latent model: refused.
    net, _ = models.load_models(toy['pkl'], 'cpu', vae=toy['vae_dir'], log=quiet)
    _, latent_disc = models.load_models(toy['pkl'], 'cpu', vae=toy['vae_dir'], disc_path=str(disc), classifier_path=cls, log=quiet)
    with pytest.raises(ValueError, match='judges latents but pixels.pkl samples pixels'):
        models.check_pair(load_network_pickle(toy['pixels_pkl']), latent_disc, 'pixels.pkl', 'disc.pt')
    latent_disc.space = None
    with pytest.raises(ValueError, match='judges pixels but latent.pkl samples latents'):
        models.check_pair(net, latent_disc, 'latent.pkl', 'disc.pt')
    other = dict(latents.space_of(latent_encoder()), scale=[1.0] * 4)
    latent_disc.space = other
    with pytest.raises(ValueError, match='same standardisation'):
        models.check_pair(net, latent_disc, 'latent.pkl', 'disc.pt')

#----------------------------------------------------------------------------
# Bad inputs: one line each.

def test_missing_vae_is_one_line(toy, tmp_path, monkeypatch):
    # A VAE name the file chose: fetched only with --trust_pickle; --vae is named.
    code, text, errors = invoke(generate_dg.main, [f'--network={toy["pkl"]}', f'--outdir={tmp_path}', '--seeds=0'])
    assert code != 0 and len(errors) == 1 and '--vae=DIR' in errors[0] and 'tests/tiny-vae' in errors[0], text
    code, text, errors = invoke(generate_dg.main, [f'--network={toy["pkl"]}', f'--outdir={tmp_path}', '--seeds=0',
                                                   f'--vae={tmp_path / "nowhere"}'])
    assert code != 0 and len(errors) == 1 and 'no such folder' in errors[0], text
    # EDM2's own VAE with the hub unreachable and nothing cached: both ways named.
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)  # read at import: set the module's value
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    hub = write_edm2_pickle(toy['net'], tmp_path / 'hub.pkl', latent_encoder(vae_name='stabilityai/sd-vae-ft-mse'))
    code, text, errors = invoke(generate_dg.main, [f'--network={hub}', f'--outdir={tmp_path}', '--seeds=0'])
    assert code != 0 and len(errors) == 1, text
    assert 'stabilityai/sd-vae-ft-mse' in errors[0] and '--vae=DIR' in errors[0] and 'hub' in errors[0]
    # The messages themselves are one line (the command would show only the first).
    from training.encoders import StabilityVAEEncoder
    other_space = write_edm2_pickle(edm2_precond('latent8'), tmp_path / 'other.pkl',
                                    StabilityVAEEncoder(vae_name='tests/tiny-vae', raw_mean=[0, 0, 0, 0]))
    for kw, needle in ((dict(network_pkl=toy['pixels_pkl'], vae=toy['vae_dir']), 'samples pixels, it has no VAE; drop --vae'),
                       (dict(network_pkl=toy['pixels_pkl'], save_latents=True), 'samples pixels, not latents; drop --save_latents'),
                       (dict(network_pkl=toy['pkl'], vae=toy['vae_dir'], save_latents=True, rejection='diffrs'), 'DiffRS'),
                       (dict(network_pkl=toy['pkl'], vae=toy['vae_dir'], gnet=other_space, guidance=2.0), 'pass a guide of the same space')):
        with pytest.raises(ValueError) as info:
            generate_dg.run(outdir=str(tmp_path / 'x'), seeds='0', num_steps=2, device='cpu', log=quiet, **kw)
        assert needle in str(info.value) and '\n' not in str(info.value), str(info.value)

def test_latents_of_another_shape_are_one_line(toy, tmp_path):
    generate_dg.run(network_pkl=toy['pkl'], vae=toy['vae_dir'], outdir=str(tmp_path / 'fake'), seeds='0-3', num_steps=2,
                    save_latents=True, device='cpu', log=quiet)
    raw = torch.randn(4, 8, 4, 4)  # latents of 32x32 images, not 64x64
    dataset = latents.write_raw_dataset(str(tmp_path / 'small'), raw)
    from helpers import tiny_classifier
    cls = tmp_path / 'cls.pt'
    torch.save(tiny_classifier(res=8, channels=4).state_dict(), cls)
    code, text, errors = invoke(train_disc.main, [f'--real={dataset}', f'--fake={tmp_path / "fake"}', f'--classifier={cls}',
                                                  f'--outdir={tmp_path / "disc"}', '--epochs=1'])
    assert code != 0 and len(errors) == 1, text
    assert 'latents are [4, 8, 8]' in errors[0] and str(tmp_path / 'small') in errors[0]
    # Shards of two shapes in one folder.
    latents.save_latent_shard(latents.shard_path(str(tmp_path / 'fake'), [50]), torch.zeros(1, 4, 4, 4), [-1], [50],
                              latents.space_of(latent_encoder()))
    with pytest.raises(ValueError, match='keep one model'):
        latents.read_latent_shards(str(tmp_path / 'fake'))

def test_encode_dataset_writes_edm2_latent_datasets(toy, tmp_path):
    """python -m edm_dg.encode_dataset (EDM2's dataset_tool.py encode): raw latents per image in EDM2's layout, with labels."""
    from edm_dg import encode_dataset
    code, text, _ = invoke(encode_dataset.main, [f'--source={toy["dir"] / "images"}', f'--dest={tmp_path / "enc"}',
                                                 f'--vae={toy["vae_dir"]}', '--batch=5', '--max_images=12'])
    assert code == 0, text
    names = sorted(os.listdir(tmp_path / 'enc' / '00000'))
    assert names[0] == 'img-mean-std-00000000.npy' and len(names) == 12
    raw, labels = latents.read_raw_dataset(str(tmp_path / 'enc'))
    enc = latents.prepare_encoder(latent_encoder(batch_size=5), 'cpu', vae=toy['vae_dir'], source='test')
    torch.testing.assert_close(raw, latents.encode_images(enc, toy['images'][:12]), rtol=1e-5, atol=1e-6 * float(raw.abs().max()))
    assert labels.tolist() == toy['labels'][:12].tolist()
    code, text, errors = invoke(encode_dataset.main, [f'--source={toy["dir"] / "images"}', f'--dest={tmp_path / "x"}',
                                                      f'--vae={tmp_path / "missing"}'])
    assert code != 0 and len(errors) == 1 and 'no such folder' in errors[0], text
