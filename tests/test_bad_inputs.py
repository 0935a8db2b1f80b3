"""The bad-input matrix: every command, each bad input -> non-zero exit, one 'Error:' line naming the culprit,
no traceback, no partial output. Runs the click commands in-process (CliRunner) for speed."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fid as fid_cli
import generate_dg
import nll as nll_cli
import stats as stats_cli
import train_disc
from conftest import save_edm_pickle, tiny_classifier, tiny_discriminator, tiny_edm
from edm_dg.discriminator import discriminator_checkpoint, infer_encoder_args, read_weights

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('bad')
    f = {}
    f['net'] = save_edm_pickle(tiny_edm(label_dim=10), str(d / 'net.pkl'))
    f['unet'] = save_edm_pickle(tiny_edm(label_dim=0), str(d / 'unet.pkl'))
    raw = open(f['net'], 'rb').read()
    (d / 'trunc.pkl').write_bytes(raw[: len(raw) // 3])
    f['trunc'] = str(d / 'trunc.pkl')
    cls = tiny_classifier()
    torch.save(cls.state_dict(), d / 'cls.pt')
    f['cls'] = str(d / 'cls.pt')
    raw = open(f['cls'], 'rb').read()
    (d / 'cls_trunc.pt').write_bytes(raw[: len(raw) // 2])
    f['cls_trunc'] = str(d / 'cls_trunc.pt')
    sd = cls.state_dict()
    sd['middle_block.0.in_layers.2.weight'] = torch.zeros(1)
    torch.save(sd, d / 'cls_shape.pt')
    f['cls_shape'] = str(d / 'cls_shape.pt')
    torch.save(tiny_classifier(res=8).state_dict(), d / 'cls8.pt')
    f['cls8'] = str(d / 'cls8.pt')
    _, sha = read_weights(f['cls'], 'classifier')
    args = infer_encoder_args(cls.state_dict())
    torch.save(discriminator_checkpoint(tiny_discriminator(cls), sha, args), d / 'disc.pt')
    torch.save(discriminator_checkpoint(tiny_discriminator(cls, cond=True), sha, args), d / 'cdisc.pt')
    f['disc'], f['cdisc'] = str(d / 'disc.pt'), str(d / 'cdisc.pt')
    rng = np.random.default_rng(0)
    for name, res, n in (('real', 16, 12), ('fake', 16, 12), ('small', 8, 4)):
        os.makedirs(d / name)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(d / name / f'{i:06d}.png')
        f[name] = str(d / name)
    with open(d / 'fake' / 'dataset.json', 'w') as fh:
        json.dump({'labels': [[f'{i:06d}.png', i % 10] for i in range(12)]}, fh)
    os.makedirs(d / 'corrupt')
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / 'corrupt' / 'a.png')
    (d / 'corrupt' / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n\x00\x00broken')
    f['corrupt'] = str(d / 'corrupt')
    os.makedirs(d / 'empty')
    f['empty'] = str(d / 'empty')
    np.savez(d / 'float.npz', samples=np.zeros((4, 16, 16, 3), np.float32))
    f['float_npz'] = str(d / 'float.npz')
    np.savez(d / 'nomu.npz', mean=np.zeros(3))
    f['nomu'] = str(d / 'nomu.npz')
    np.savez(d / 'nanref.npz', mu=np.full(4, np.nan), sigma=np.eye(4))
    f['nanref'] = str(d / 'nanref.npz')
    (d / 'trunc.npz').write_bytes(open(d / 'nomu.npz', 'rb').read()[:40])
    f['trunc_npz'] = str(d / 'trunc.npz')
    np.savez(d / 'ref.npz', mu=np.zeros(8), sigma=np.eye(8))
    f['ref'] = str(d / 'ref.npz')
    (d / 'afile').write_text('x')
    f['unwritable'] = str(d / 'afile' / 'sub')   # a folder below a file: cannot be created, even as root
    f['png'] = str(d / 'real' / '000000.png')
    (d / 'vals.csv').write_text('fid\n1.8\nabc\n')
    (d / 'one.csv').write_text('fid\n1.8\n')
    (d / 'nan.csv').write_text('fid\n1.8\nnan\n')
    for k in ('vals', 'one', 'nan'):
        f[k + '_csv'] = str(d / f'{k}.csv')
    f['out'] = str(d / 'out')
    return f

G = generate_dg.main
T = train_disc.main
F = fid_cli.main
N = nll_cli.main
S = stats_cli.main
TD = ['--epochs=1', '--batch=4', '--head_width=64', '--head_depth=1']

CASES = [
    # generate_dg.py
    ('gen: missing network', G, ['--network={d}/nope.pkl', '--outdir={out}'], ['nope.pkl', 'no such file']),
    ('gen: truncated network', G, ['--network={trunc}', '--outdir={out}'], ['trunc.pkl', 'not a readable EDM network pickle']),
    ('gen: PNG as network', G, ['--network={png}', '--outdir={out}'], ['000000.png', 'not a readable EDM network pickle']),
    ('gen: .pt as network', G, ['--network={cls}', '--outdir={out}'], ['cls.pt']),
    ('gen: missing disc', G, ['--network={net}', '--outdir={out}', '--disc={d}/no_disc.pt', '--classifier={cls}'], ['no_disc.pt', 'not found']),
    ('gen: truncated classifier', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls_trunc}'], ['cls_trunc.pt', 'cannot read classifier']),
    ('gen: classifier shapes', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls_shape}'], ['cls_shape.pt', 'keys or shapes']),
    ('gen: classifier as disc', G, ['--network={net}', '--outdir={out}', '--disc={png}', '--classifier={cls}'], ['000000.png', 'cannot read discriminator']),
    ('gen: wrong resolution', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls8}'], ['cls8.pt']),
    ('gen: cond disc, uncond net', G, ['--network={unet}', '--outdir={out}', '--disc={cdisc}', '--classifier={cls}'], ['cdisc.pt', 'unconditional']),
    ('gen: --class on uncond net', G, ['--network={unet}', '--outdir={out}', '--class=1'], ['unet.pkl', 'drop --class']),
    ('gen: --class out of range', G, ['--network={net}', '--outdir={out}', '--class=10'], ['--class=10', '0-9']),
    ('gen: malformed seeds', G, ['--network={net}', '--outdir={out}', '--seeds=3-x'], ['3-x']),
    ('gen: empty seed range', G, ['--network={net}', '--outdir={out}', '--seeds=5-2'], ['5-2']),
    ('gen: steps out of range', G, ['--network={net}', '--outdir={out}', '--steps=1'], ['--steps']),
    ('gen: time_max out of range', G, ['--network={net}', '--outdir={out}', '--time_max=2'], ['--time_max']),
    ('gen: non-finite weight', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls}', '--dg_weight_1st_order=nan'], ['dg_weight_1st_order', 'finite']),
    ('gen: non-finite S_noise', G, ['--network={net}', '--outdir={out}', '--S_noise=inf'], ['S_noise', 'finite']),
    ('gen: disc without classifier', G, ['--network={net}', '--outdir={out}', '--disc={disc}'], ['disc.pt', '--classifier']),
    ('gen: unwritable outdir', G, ['--network={net}', '--outdir={unwritable}'], ['sub', 'not writable']),
    # train_disc.py
    ('train: empty folder', T, ['--real={empty}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', *TD], ['empty', 'no images']),
    ('train: missing folder', T, ['--real={d}/nowhere', '--fake={fake}', '--classifier={cls}', '--outdir={out}', *TD], ['nowhere', 'no such file']),
    ('train: corrupt image', T, ['--real={corrupt}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', *TD], ['b.png', 'not a readable image']),
    ('train: mismatched resolution', T, ['--real={real}', '--fake={small}', '--classifier={cls}', '--outdir={out}', *TD], ['small', 'resolution']),
    ('train: --cond without labels', T, ['--real={real}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', '--cond', *TD], ['real', '--cond needs class labels']),
    ('train: wrong classifier layout', T, ['--real={real}', '--fake={fake}', '--classifier={cls_shape}', '--outdir={out}', *TD], ['cls_shape.pt', 'do not match']),
    ('train: classifier resolution', T, ['--real={real}', '--fake={fake}', '--classifier={cls8}', '--outdir={out}', *TD], ['cls8.pt', 'classifier takes']),
    ('train: float npz', T, ['--real={float_npz}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', *TD], ['float.npz', 'uint8']),
    ('train: --num too large', T, ['--real={real}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', '--num=100', *TD], ['--num=100']),
    ('train: batch out of range', T, ['--real={real}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', '--batch=0'], ['--batch']),
    ('train: non-finite lr', T, ['--real={real}', '--fake={fake}', '--classifier={cls}', '--outdir={out}', '--lr=nan', '--epochs=1'], ['--lr=nan', 'finite']),
    ('train: unwritable outdir', T, ['--real={real}', '--fake={fake}', '--classifier={cls}', '--outdir={unwritable}', *TD], ['sub']),
    # fid.py
    ('fid: ref without mu/sigma', F, ['calc', '--images={real}', '--ref={nomu}', '--num=4', '--detector=offline'], ['nomu.npz', '"mu" and "sigma"']),
    ('fid: truncated ref', F, ['calc', '--images={real}', '--ref={trunc_npz}', '--num=4', '--detector=offline'], ['trunc.npz', 'cannot read reference']),
    ('fid: non-finite ref', F, ['calc', '--images={real}', '--ref={nanref}', '--num=4', '--detector=offline'], ['nanref.npz', 'non-finite']),
    ('fid: too few images', F, ['calc', '--images={real}', '--ref={ref}', '--num=50', '--detector={tiny_det}'], ['found 12 images', 'at least 50']),
    ('fid: corrupt png', F, ['calc', '--images={corrupt}', '--ref={ref}', '--num=2', '--detector={tiny_det}'], ['b.png', 'not a readable image']),
    ('fid: empty folder', F, ['calc', '--images={empty}', '--ref={ref}', '--num=2', '--detector={tiny_det}'], ['empty', 'no images']),
    ('fid: bad detector', F, ['calc', '--images={real}', '--ref={ref}', '--num=2', '--detector={png}'], ['000000.png', 'TorchScript']),
    ('fid: num out of range', F, ['calc', '--images={real}', '--ref={ref}', '--num=1'], ['--num']),
    ('fid: unwritable dest', F, ['ref', '--data={real}', '--dest={unwritable}/r.npz', '--detector={tiny_det}'], ['sub']),
    # nll.py
    ('nll: missing network', N, ['--network={d}/none.pkl', '--data={real}'], ['none.pkl', 'no such file']),
    ('nll: wrong resolution', N, ['--network={unet}', '--data={small}', '--steps=2'], ['small', 'network expects']),
    ('nll: cond net without labels', N, ['--network={net}', '--data={real}', '--steps=2'], ['real', 'needs labels']),
    ('nll: disc without classifier', N, ['--network={unet}', '--data={real}', '--disc={disc}'], ['disc.pt', '--classifier']),
    # stats.py
    ('stats: non-numeric', S, ['--a={vals_csv}'], ['vals.csv', 'cannot read numbers']),
    ('stats: one value', S, ['--a={one_csv}'], ['at least 2 values']),
    ('stats: non-finite', S, ['--a={nan_csv}'], ['nan.csv', 'non-finite']),
    ('stats: missing file', S, ['--a={d}/missing.csv'], ['missing.csv', 'no such file']),
]

@pytest.fixture(scope='module')
def tiny_det(files, tmp_path_factory):
    from test_metrics import TinyDetector
    p = tmp_path_factory.mktemp('det') / 'tiny.pt'
    torch.jit.script(TinyDetector()).save(str(p))
    return str(p)

@pytest.mark.parametrize('name,cmd,args,needles', CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, cmd, args, needles, files, tiny_det, tmp_path):
    fmt = dict(files, d=os.path.dirname(files['net']), out=str(tmp_path / 'out'), tiny_det=tiny_det)
    result = CliRunner().invoke(cmd, [a.format(**fmt) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    err = result.stderr if hasattr(result, 'stderr') else result.output
    lines = [l for l in err.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    out = tmp_path / 'out'
    if out.exists():  # never partial output
        leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(('.png', '.pt', '.npz'))]
        assert not leftovers, leftovers
