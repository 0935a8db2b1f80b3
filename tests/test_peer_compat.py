"""The files and command lines users bring from the DG release and the reproduction study.

Real layouts at reduced width (tests/helpers.py: real_layout_files): the release's 32x32 classifier layout,
its unconditional head and 1000-row conditional head, the study's adapter-only LoRA files, EDM's published
CIFAR-10 configurations. The peers' README lines (tests/data/peer_commands.txt) run with generate_dg.py /
train_disc.py in place of their scripts; only the files their code hard-codes are added, and counts and steps
are cut so that the suite stays short.
"""

import json
import os
import shlex

import numpy as np
import pytest
import torch

import generate_dg
import train_disc
from edm_dg import fileio
from edm_dg.disc_checkpoint import load_discriminator
from edm_dg.disc_training import train
from helpers import DATA, cache_url, invoke, link_tree, merge_adapters_by_hand, real_layout_files

SEEDS = [0, 1, 2, 3]

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('real-layouts'))
    real_layout_files(root)
    return root

@pytest.fixture
def cwd(base, tmp_path, monkeypatch):
    """A private working folder holding (links to) every user file, and a dnnlib cache that serves EDM's URLs."""
    work = link_tree(base, str(tmp_path / 'work'))
    cache = str(tmp_path / 'cache')
    for kind in ('uncond', 'cond'):
        cache_url(cache, f'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-{kind}-vp.pkl',
                  os.path.join(base, f'checkpoints/edm-cifar10-32x32-{kind}-vp.pkl'))
    monkeypatch.setenv('DNNLIB_CACHE_DIR', cache)
    monkeypatch.chdir(work)
    return work

def images(folder, seeds=SEEDS):
    return np.stack([fileio.read_image(os.path.join(folder, fileio.image_relpath(s, False))) for s in seeds]).astype(int)

def gen(*args):
    code, out, errors = invoke(generate_dg.main, [*args, '--steps=2', '--device=cpu'])
    assert code == 0 and not errors, out
    return out

def assert_images_close(a, b):
    """Same math by two routes on one machine: uint8 within one gray level (float rounding at a .5 boundary),
    on at most 0.5% of the values (measured here: none)."""
    diff = np.abs(a - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.005, (diff.max(), (diff > 0).mean())

#----------------------------------------------------------------------------
# The release's 1000-row conditional head on a 10-class network.

def test_release_conditional_head_guides_a_10_class_network(cwd, tmp_path):
    net = 'checkpoints/edm-cifar10-32x32-cond-vp.pkl'
    common = [f'--network={net}', '--classifier=checkpoints/32x32_classifier.pt', '--seeds=0-3', '--batch=4']
    gen(*common, '--disc=checkpoints/discriminator_250.pt', '--preset=edm-g++-cifar10-cond', '--outdir=full')
    gen(f'--network={net}', '--seeds=0-3', '--outdir=plain')
    # Class c uses row c: the head cut to its first 10 rows guides identically.
    head = torch.load('checkpoints/discriminator_250.pt', weights_only=True)
    assert head['label_emb.weight'].shape[0] == 1000
    torch.save(dict(head, **{'label_emb.weight': head['label_emb.weight'][:10].clone()}), tmp_path / 'head10.pt')
    gen(*common, f'--disc={tmp_path / "head10.pt"}', '--preset=edm-g++-cifar10-cond', '--outdir=ten')
    assert np.array_equal(images('full'), images('ten'))
    assert np.abs(images('full') - images('plain')).max() > 0  # the head guides
    # Fewer rows than the network's classes cannot judge every class: one line naming the file and the fix.
    torch.save(dict(head, **{'label_emb.weight': head['label_emb.weight'][:5].clone()}), tmp_path / 'head5.pt')
    code, out, errors = invoke(generate_dg.main, [*common, f'--disc={tmp_path / "head5.pt"}', '--outdir=bad', '--device=cpu'])
    assert code != 0 and len(errors) == 1, out
    assert 'head5.pt' in errors[0] and 'embeds 5 classes' in errors[0] and 'at least 10' in errors[0]

#----------------------------------------------------------------------------
# The study's adapter-only LoRA files.

def test_lora_checkpoint_equals_adapters_merged_by_hand(cwd, tmp_path):
    cls_sd = torch.load('checkpoints/32x32_classifier.pt', weights_only=True)
    adapters = torch.load('models/lora_adm_final16.pt', weights_only=True)
    assert adapters and all(k.endswith(('in_layers.2.lora_A', 'in_layers.2.lora_B')) for k in adapters)
    torch.save(merge_adapters_by_hand(cls_sd, adapters), tmp_path / 'merged.pt')
    for alpha in (None, 2.0):
        by_file = load_discriminator('checkpoints/discriminator_60.pt', 'checkpoints/32x32_classifier.pt',
                                     lora_checkpoint='models/lora_adm_final16.pt', lora_alpha=alpha)
        merged = merge_adapters_by_hand(cls_sd, adapters, alpha or 1.0)
        torch.save(merged, tmp_path / f'merged{alpha}.pt')
        by_hand = load_discriminator('checkpoints/discriminator_60.pt', str(tmp_path / f'merged{alpha}.pt'))
        x, tau = torch.randn(3, 3, 32, 32), torch.tensor([0.05, 0.3, 0.9])
        a, b = by_file.logits(x, tau), by_hand.logits(x, tau)
        # W + dW in float32 either way; the logits pass through ~20 layers: bound 1e-5 of their scale.
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a, b)
        plain = load_discriminator('checkpoints/discriminator_60.pt', 'checkpoints/32x32_classifier.pt').logits(x, tau)
        assert (a - plain).abs().max() > 1e-2 * b.abs().max()  # the adapters matter, far beyond that bound
    common = ['--network=checkpoints/edm-cifar10-32x32-uncond-vp.pkl', '--disc=checkpoints/discriminator_60.pt', '--seeds=0-3']
    gen(*common, '--classifier=checkpoints/32x32_classifier.pt', '--lora_checkpoint=models/lora_adm_final16.pt',
        '--lora_rank=16', '--outdir=lora')
    gen(*common, f'--classifier={tmp_path / "mergedNone.pt"}', '--outdir=merged')
    assert_images_close(images('lora'), images('merged'))

@pytest.mark.parametrize('args, needles', [
    (['--lora_checkpoint=models/lora_adm_final16.pt', '--lora_rank=8'], ['lora_adm_final16.pt', '--lora_rank=8', 'rank 16', '--lora_rank=16']),
    (['--lora_rank=4'], ['32x32_classifier.pt', '--lora_rank=4', 'no LoRA adapters', '--lora_checkpoint']),
    (['--lora_checkpoint=checkpoints/32x32_classifier.pt'], ['32x32_classifier.pt', 'not an adapter-only', '--lora_checkpoint']),
])
def test_lora_file_errors_are_one_line(cwd, args, needles):
    code, out, errors = invoke(generate_dg.main, ['--network=checkpoints/edm-cifar10-32x32-uncond-vp.pkl', '--outdir=o',
                                                  '--disc=checkpoints/discriminator_60.pt', '--classifier=checkpoints/32x32_classifier.pt',
                                                  '--seeds=0', '--device=cpu', *args])
    assert code != 0 and len(errors) == 1, out
    for n in needles:
        assert n in errors[0], (n, errors[0])

def test_adapter_file_as_classifier_names_the_option(cwd):
    code, out, errors = invoke(generate_dg.main, ['--network=checkpoints/edm-cifar10-32x32-uncond-vp.pkl', '--outdir=o',
                                                  '--disc=checkpoints/discriminator_60.pt', '--classifier=models/lora_adm_final16.pt',
                                                  '--device=cpu'])
    assert code != 0 and len(errors) == 1 and '--lora_checkpoint' in errors[0] and 'lora_adm_final16.pt' in errors[0], out

def test_study_export_loads_back_and_training_continues_from_adapters(cwd):
    kw = dict(epochs=1, batch=8, head_width=64, head_depth=1, eval_images=0, progress=False, log=lambda *a: None)
    start = torch.load('models/lora_adm_final16.pt', weights_only=True)
    last = train('run', 'datasets/cifar10-32x32.zip', 'training_data/unconditional_edm_samples/edm_uncond_samples.npz',
                 'checkpoints/32x32_classifier.pt', lora_checkpoint='models/lora_adm_final16.pt', export='study', **kw)
    assert sorted(f for f in os.listdir('run') if f.startswith(('discrim_', 'lora_'))) == [
        'discrim_uncond_epoch0.pt', 'discrim_uncond_final.pt', 'lora_adm_epoch0.pt', 'lora_adm_final.pt']
    ckpt = torch.load(last, weights_only=True)
    assert ckpt['lora_rank'] == 16 and set(ckpt['lora']) == set(start)
    assert any(not torch.equal(ckpt['lora'][k], start[k]) for k in start)  # the adapters were trained on
    exported = torch.load('run/lora_adm_final.pt', weights_only=True)
    assert all(torch.equal(exported[k], ckpt['lora'][k]) for k in start)
    own = load_discriminator(last, 'checkpoints/32x32_classifier.pt')
    study = load_discriminator('run/discrim_uncond_final.pt', 'checkpoints/32x32_classifier.pt',
                               lora_checkpoint='run/lora_adm_final.pt')
    x, tau = torch.randn(2, 3, 32, 32), torch.tensor([0.1, 0.6])
    assert torch.equal(own(x, tau), study(x, tau))  # the same tensors in the same modules

def test_study_heads_load(cwd):
    cond = load_discriminator('models/lora_cond_disc/discrim_cond_final128.pt', 'guided_diffusion/model/32x32_classifier.pt',
                              lora_checkpoint='models/lora_uncond_disc/cond_adm_final128.pt', lora_rank=128)
    assert cond.cond and cond.head.label_emb.num_embeddings == 1000
    uncond = load_discriminator('models/uncond_disc/discrim_uncond_epoch59.pt', 'guided_diffusion/model/32x32_classifier.pt')
    assert not uncond.cond

def test_study_sample_files_are_image_sets(cwd):
    from edm_dg.image_sets import load_image_set
    x, y = load_image_set('training_data/conditional_edm_samples/edm_cond_samples.npz')
    want = np.load('training_data/conditional_edm_samples/edm_cond_samples.npz')
    assert np.array_equal(x.permute(0, 2, 3, 1).numpy(), want['images'])
    assert y.tolist() == want['labels'].argmax(1).tolist()
    x, y = load_image_set('training_data/unconditional_edm_samples/edm_uncond_samples.npz')
    assert y is None and len(x) == 16

def test_save_format_npz_writes_the_studys_keys(cwd):
    gen('--network=checkpoints/edm-cifar10-32x32-cond-vp.pkl', '--seeds=0-3', '--outdir=o', '--save_format=npz')
    (shard,) = [os.path.join('o/shards', f) for f in os.listdir('o/shards')]
    z = np.load(shard)
    assert np.array_equal(z['images'], images('o').astype(np.uint8))
    with open('o/dataset.json') as f:
        labels = dict(json.load(f)['labels'])
    assert z['labels'].shape == (4, 10) and (z['labels'].sum(1) == 1).all()
    assert z['labels'].argmax(1).tolist() == [labels[fileio.image_relpath(s, False)] for s in SEEDS]
    assert z['seeds'].tolist() == SEEDS

#----------------------------------------------------------------------------
# The peers' README lines.

def peer_lines():
    with open(os.path.join(DATA, 'peer_commands.txt')) as f:
        return [tuple(l.rstrip('\n').split('\t')) for l in f if l.strip() and not l.startswith('#')]

# What their code reads from hard-coded paths: (option, path) that a user passes explicitly here.
HARD_CODED = {
    ('release', 'generate.py'): [('--discriminator_ckpt', 'checkpoints/discriminator/cifar_uncond/discriminator_60.pt'),
                                 ('--pretrained_classifier_ckpt', 'checkpoints/ADM_classifier/32x32_classifier.pt')],
    ('release', 'train.py'): [('--gendir', 'samples/cifar_uncond_vanilla'), ('--datadir', 'data/true_data.npz'),
                              ('--pretrained_classifier_ckpt', 'checkpoints/ADM_classifier/32x32_classifier.pt'),
                              ('--savedir', 'checkpoints/discriminator/cifar_uncond')],
    ('study', 'generate.py'): [('--classifier', 'guided_diffusion/model/32x32_classifier.pt')],
    ('study', 'train.py'): [('--real', 'datasets/cifar10-32x32.zip'), ('--classifier', 'guided_diffusion/model/32x32_classifier.pt')],
}
COMMANDS = {'generate.py': generate_dg.main, 'train.py': train_disc.main}

def cut(script, args):
    """Counts and steps cut: 4 images, 2 steps, 1 epoch."""
    if script == 'generate.py':
        args = [a.replace('=10000', '=4').replace('=50000', '=4') if a.startswith('--num_samples') else a for a in args]
        return args + ([] if any(a.startswith('--num_samples') for a in args) else ['--seeds=0-3']) + ['--steps=2', '--device=cpu']
    return args + ['--epochs=1', '--head_width=64', '--head_depth=1', '--eval_images=0', '--device=cpu']

def run_peer(source, line, with_files=True):
    words = shlex.split(line)
    script, args = words[1], words[2:]
    extra = [f'{o}={p}' for o, p in HARD_CODED[(source, script)]] if with_files else []
    return invoke(COMMANDS[script], cut(script, args) + extra)

def outdir_of(args):
    words = shlex.split(args)
    for i, w in enumerate(words):
        for name in ('--outdir', '--save_dir', '--savedir'):
            if w == name:
                return words[i + 1]
            if w.startswith(name + '='):
                return w.split('=', 1)[1]
    return None

@pytest.mark.parametrize('index', range(7))
def test_peer_readme_line_runs(cwd, index):
    source, line = peer_lines()[index]
    script = shlex.split(line)[1]
    if (source, script) == ('release', 'generate.py'):
        # EDM's default wins: plain EDM unless a discriminator is given (the release guides with its hard-coded files).
        code, out, errors = run_peer(source, line, with_files=False)
        assert code == 0 and not errors and 'plain EDM' in out, out
        outdir = outdir_of(line)
        assert sorted(f for f in os.listdir(outdir) if f.endswith('.png')) == [f'{s:06d}.png' for s in SEEDS]
        if '--dg_weight_1st_order=0' not in line:
            plain = images(outdir)
            code, out, errors = run_peer(source, line + ' --no-resume')
            assert code == 0 and not errors and 'DG (w1=2.0' in out, out
            assert np.abs(images(outdir) - plain).max() > 0
        return
    if HARD_CODED[(source, script)]:
        # Without the files the peer's code hard-codes: one line naming an option and the peer's default path.
        code, out, errors = run_peer(source, line, with_files=False)
        assert code != 0 and len(errors) == 1, out
        assert any(o in errors[0] and p in errors[0] for o, p in HARD_CODED[(source, script)]), errors[0]
    if (source, script) == ('release', 'train.py'):
        code, out, errors = run_peer(*peer_lines()[0])  # its fakes: the README's step 2
        assert code == 0, out
    code, out, errors = run_peer(source, line)
    assert code == 0 and not errors, out
    if script == 'generate.py':
        outdir = outdir_of(line)
        assert sorted(f for f in os.listdir(outdir) if f.endswith('.png')) == [f'{s:06d}.png' for s in SEEDS]
        if '--adaptive_weight 1' in line:
            assert 'boosting=1' in out and 'w1=1.0' in out, out
    else:
        outdir = outdir_of(line) or dict(HARD_CODED[(source, script)])['--savedir']
        assert os.path.isfile(os.path.join(outdir, 'disc-0001.pt')), os.listdir(outdir)
        disc = load_discriminator(os.path.join(outdir, 'disc-0001.pt'), 'checkpoints/32x32_classifier.pt')
        assert disc.cond == ('--cond 1' in line)
        if '--lora_rank 128' in line:
            assert torch.load(os.path.join(outdir, 'disc-0001.pt'), weights_only=True)['lora_rank'] == 128

@pytest.mark.parametrize('args, needles', [
    (['--disc=edm'], ['--disc=edm', 'discretisation', 'drop it']),
    (['--disc=checkpoints/discriminator_60.pt', '--classifier=checkpoints/32x32_classifier.pt', '--conditional', '1'],
     ['discriminator_60.pt', 'unconditional', '--cond/--conditional=1', '--cond=0']),
    (['--disc=checkpoints/discriminator_60.pt'], ['--classifier', 'guided_diffusion/model/32x32_classifier.pt']),
    (['--lora_checkpoint=models/lora_adm_final16.pt'], ['--lora_checkpoint', 'without --disc']),
])
def test_peer_option_collisions_are_one_line(cwd, args, needles):
    code, out, errors = invoke(generate_dg.main, ['--network=checkpoints/edm-cifar10-32x32-uncond-vp.pkl', '--outdir=o',
                                                  '--seeds=0', '--device=cpu', *args])
    assert code != 0 and len(errors) == 1, out
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert not os.path.exists('o') or not os.listdir('o')
