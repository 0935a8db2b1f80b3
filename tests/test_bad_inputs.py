"""The bad-input matrix: every command, each bad input -> non-zero exit, one 'Error:' line naming the culprit,
no traceback, no partial output. Runs the click commands in-process (CliRunner) for speed."""

import json
import os
import socket

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
from helpers import save_edm_pickle, tiny_classifier, tiny_discriminator, tiny_edm
from edm_dg.disc_checkpoint import discriminator_checkpoint, infer_encoder_args, read_weights

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
    # Real-file mistakes: files cut in half (interrupted download/copy), a released-style head, and a
    # 32x32-layout classifier with its head next to 16x16 networks and data.
    f['net_half'] = _cut_in_half(f['net'], d / 'net_half.pkl')
    f['disc_half'] = _cut_in_half(f['disc'], d / 'disc_half.pt')
    torch.save(tiny_discriminator(cls).head.state_dict(), d / 'head.pt')
    f['head'] = str(d / 'head.pt')
    cls32 = tiny_classifier(res=32)
    torch.save(cls32.state_dict(), d / 'cls32.pt')
    torch.save(tiny_discriminator(cls32).head.state_dict(), d / 'head32.pt')
    f['cls32'], f['head32'] = str(d / 'cls32.pt'), str(d / 'head32.pt')
    f['url'] = f'http://127.0.0.1:{_closed_port()}/x.pkl'
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
    (d / 'cols.csv').write_text('run,FID\n1,1.8\n2,1.9\n')
    (d / 'nohead.csv').write_text('1.8\n1.9\n')
    (d / 'ragged.csv').write_text('run,fid\n1,1.8\n2\n')
    (d / 'cols3.csv').write_text('FID\n1.8\n1.9\n2.0\n')
    for k in ('vals', 'one', 'nan', 'cols', 'cols3', 'nohead', 'ragged'):
        f[k + '_csv'] = str(d / f'{k}.csv')
    (d / 'keys.json').write_text(json.dumps([{'FID': 1.8}, {'FID': 1.9}]))
    (d / 'bool.json').write_text(json.dumps([1.8, True]))
    f['keys_json'], f['bool_json'] = str(d / 'keys.json'), str(d / 'bool.json')
    f['out'] = str(d / 'out')
    return f

def _cut_in_half(src, dst):
    raw = open(src, 'rb').read()
    dst.write_bytes(raw[: len(raw) // 2])
    return str(dst)

def _closed_port():
    """A local port nothing listens on (bound, then released): a download that fails at once."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

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
    ('gen: .pt as network', G, ['--network={cls}', '--outdir={out}'], ['cls.pt', 'not a readable EDM network pickle', 'pass a .pkl']),
    ('gen: missing disc', G, ['--network={net}', '--outdir={out}', '--disc={d}/no_disc.pt', '--classifier={cls}'], ['no_disc.pt', 'not found']),
    ('gen: truncated classifier', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls_trunc}'], ['cls_trunc.pt', 'cannot read classifier', 'truncated']),
    ('gen: classifier shapes', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls_shape}'], ['cls_shape.pt', 'keys or shapes']),
    ('gen: classifier as disc', G, ['--network={net}', '--outdir={out}', '--disc={png}', '--classifier={cls}'], ['000000.png', 'cannot read discriminator']),
    ('gen: wrong resolution', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={cls8}'], ['cls8.pt']),
    ('gen: cond disc, uncond net', G, ['--network={unet}', '--outdir={out}', '--disc={cdisc}', '--classifier={cls}'], ['cdisc.pt', 'unconditional']),
    ('gen: --class on uncond net', G, ['--network={unet}', '--outdir={out}', '--class=1'], ['unet.pkl', 'drop --class']),
    ('gen: --class out of range', G, ['--network={net}', '--outdir={out}', '--class=10'], ['--class=10', '0-9']),
    ('gen: malformed seeds', G, ['--network={net}', '--outdir={out}', '--seeds=3-x'], ['--seeds', '3-x', '0-49999']),
    ('gen: empty seed range', G, ['--network={net}', '--outdir={out}', '--seeds=5-2'], ['--seeds', '5-2']),
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
    ('stats: non-numeric', S, ['--a={vals_csv}'], ['vals.csv', 'line 3', "'abc' is not a number"]),
    ('stats: one value', S, ['--a={one_csv}'], ['one.csv', 'at least 2 values', '--a']),
    ('stats: non-finite', S, ['--a={nan_csv}'], ['nan.csv', 'non-finite']),
    ('stats: missing file', S, ['--a={d}/missing.csv'], ['missing.csv', 'no such file', '--a']),

    # Real files, real mistakes. Truncated downloads/copies:
    ('gen: disc cut in half', G, ['--network={net}', '--outdir={out}', '--disc={disc_half}', '--classifier={cls}'], ['disc_half.pt', 'truncated', 'copy it again']),
    ('gen: network cut in half', G, ['--network={net_half}', '--outdir={out}'], ['net_half.pkl', 'not a readable EDM network pickle', 'truncated']),
    ('nll: network cut in half', N, ['--network={net_half}', '--data={real}'], ['net_half.pkl', 'truncated']),
    ('fid: network cut in half', F, ['sweep', '--network={net_half}', '--disc={disc}', '--classifier={cls}', '--ref={ref}', '--outdir={out}',
                                     '--param=S_churn', '--values=0', '--detector=offline'], ['net_half.pkl', 'truncated']),
    # Swapped checkpoints:
    ('gen: classifier as --disc', G, ['--network={net}', '--outdir={out}', '--disc={cls}', '--classifier={cls}'], ['cls.pt', 'not a discriminator head', 'as --classifier']),
    ('gen: --disc/--classifier swapped', G, ['--network={net}', '--outdir={out}', '--disc={cls}', '--classifier={head}'], ['head.pt', 'not an ADM classifier', 'as --disc']),
    ('nll: --disc/--classifier swapped', N, ['--network={net}', '--data={real}', '--disc={cls}', '--classifier={head}'], ['head.pt', 'as --disc']),
    ('gen: EDM pickle as --classifier', G, ['--network={net}', '--outdir={out}', '--disc={disc}', '--classifier={net}'], ['net.pkl', 'EDM network pickle', 'as --network']),
    ('gen: EDM pickle as --disc', G, ['--network={net}', '--outdir={out}', '--disc={net}', '--classifier={cls}'], ['net.pkl', 'as --network']),
    ('train: EDM pickle as --classifier', T, ['--real={real}', '--fake={fake}', '--classifier={net}', '--outdir={out}', *TD], ['net.pkl', 'as --network']),
    ('train: head as --classifier', T, ['--real={real}', '--fake={fake}', '--classifier={head}', '--outdir={out}', *TD], ['head.pt', 'not an ADM classifier']),
    # Resolutions that do not fit together:
    ('gen: 32x32 classifier, 16x16 net', G, ['--network={net}', '--outdir={out}', '--disc={head32}', '--classifier={cls32}'], ['cls32.pt', '3x32x32', '3x16x16', 'matching classifier']),
    ('gen: head for another classifier', G, ['--network={net}', '--outdir={out}', '--disc={head32}', '--classifier={cls}'], ['head32.pt', 'features', 'matching classifier']),
    ('nll: 32x32 classifier, 16x16 net', N, ['--network={unet}', '--data={real}', '--disc={head32}', '--classifier={cls32}', '--steps=2'],
     ['cls32.pt', '3x32x32']),
    ('fid: 32x32 classifier, 16x16 net', F, ['sweep', '--network={net}', '--disc={head32}', '--classifier={cls32}', '--ref={ref}', '--outdir={out}',
                                             '--param=S_churn', '--values=0', '--detector=offline'], ['cls32.pt', '3x32x32']),
    ('train: 32x32 classifier, 16x16 data', T, ['--real={real}', '--fake={fake}', '--classifier={cls32}', '--outdir={out}', *TD], ['cls32.pt', 'classifier takes']),
    ('train: real 16x16, fake 8x8', T, ['--real={real}', '--fake={small}', '--classifier={cls}', '--outdir={out}', *TD], ['small', 'resolution']),
    # Unreachable URLs (a closed local port; never an external address):
    ('gen: unreachable network URL', G, ['--network={url}', '--outdir={out}'], ['{url}', 'download failed', 'local path']),
    ('nll: unreachable network URL', N, ['--network={url}', '--data={real}'], ['{url}', 'download failed']),
    ('gen: URL as --disc', G, ['--network={net}', '--outdir={out}', '--disc={url}', '--classifier={cls}'], ['{url}', 'local path']),
    ('fid: unreachable ref URL', F, ['calc', '--images={real}', '--ref={url}', '--num=4', '--detector=offline'], ['{url}', 'download failed', 'local path']),
    ('fid: unreachable detector URL', F, ['calc', '--images={real}', '--ref={ref}', '--num=4', '--detector={url}'], ['{url}', 'download failed']),
    # Empty folders:
    ('train: empty fake folder', T, ['--real={real}', '--fake={empty}', '--classifier={cls}', '--outdir={out}', *TD], ['empty', 'no images']),
    ('nll: empty data folder', N, ['--network={unet}', '--data={empty}'], ['empty', 'no images']),
    ('fid: ref of empty folder', F, ['ref', '--data={empty}', '--dest={out}/r.npz', '--detector=offline'], ['empty', 'no images']),
    # Seed lists:
    ('gen: seed list with a gap', G, ['--network={net}', '--outdir={out}', '--seeds=1,,2'], ['--seeds']),
    ('gen: seeds named twice', G, ['--network={net}', '--outdir={out}', '--seeds=1-3,2'], ['--seeds', 'twice']),
    ('fid: malformed seeds', F, ['sweep', '--network={net}', '--disc={disc}', '--classifier={cls}', '--ref={ref}', '--outdir={out}',
                                '--param=S_churn', '--values=0', '--seeds=a-b', '--detector=offline'], ['--seeds', 'a-b']),
    # stats.py never guesses a column:
    ('stats: column missing', S, ['--a={cols_csv}'], ['cols.csv', 'no column "fid"', '"run", "FID"', '--column']),
    ('stats: no header row', S, ['--a={nohead_csv}'], ['nohead.csv', 'no column "fid"', 'header row']),
    ('stats: empty cell', S, ['--a={ragged_csv}'], ['ragged.csv', 'line 3', 'no "fid" value']),
    ('stats: column missing in --b', S, ['--a={cols_csv}', '--column=FID', '--b={one_csv}'], ['one.csv', '--b']),
    ('stats: JSON key missing', S, ['--a={keys_json}'], ['keys.json', 'no key "fid"', "'FID'", '--column']),
    ('stats: JSON boolean', S, ['--a={bool_json}'], ['bool.json', 'item 1', 'not a number']),
    ('stats: --paired without --b', S, ['--a={cols_csv}', '--column=FID', '--paired'], ['--paired', '--b']),
    ('stats: --paired, unequal counts', S, ['--a={cols_csv}', '--b={cols3_csv}', '--column=FID', '--paired'], ['--paired', '2 and 3']),
    ('stats: non-finite baseline', S, ['--a={cols_csv}', '--column=FID', '--baseline=nan'], ['--baseline=nan', 'finite']),
    ('stats: unwritable --json', S, ['--a={cols_csv}', '--column=FID', '--json={unwritable}/r.json'], ['r.json', '--json']),
]

@pytest.fixture(scope='module')
def tiny_det(files, tmp_path_factory):
    from helpers import TinyDetector
    p = tmp_path_factory.mktemp('det') / 'tiny.pt'
    torch.jit.script(TinyDetector()).save(str(p))
    return str(p)

@pytest.mark.parametrize('name,cmd,args,needles', CASES, ids=[c.values[0] if hasattr(c, 'values') else c[0] for c in CASES])
def test_bad_input(name, cmd, args, needles, files, tiny_det, tmp_path):
    fmt = dict(files, d=os.path.dirname(files['net']), out=str(tmp_path / 'out'), tiny_det=tiny_det)
    result = CliRunner().invoke(cmd, [a.format(**fmt) for a in args])
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no traceback
    err = result.stderr if hasattr(result, 'stderr') else result.output
    lines = [l for l in err.strip().splitlines() if l.startswith('Error:')]
    assert len(lines) == 1, err
    for n in needles:
        n = n.format(**fmt)
        assert n in lines[0], (n, lines[0])
    out = tmp_path / 'out'
    if out.exists():  # never partial output
        leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(('.png', '.pt', '.npz'))]
        assert not leftovers, leftovers
