"""Trust and robustness: safe pickle loading, kill-and-resume, non-finite guard."""

import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from helpers import ROOT, assert_close_to_fixture, assert_one_line_error, float32_layers, py, save_edm_pickle, tiny_edm
from edm_dg import pickles
from torch_utils import persistence

EVIL_SRC = '''
import os, torch
from torch_utils import persistence
open(os.environ.get("EDM_DG_MARKER", "/nonexistent/marker"), "w").write("pwned")
@persistence.persistent_class
class {name}(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 16, 3, 0
        self.sigma_min, self.sigma_max = 0.002, 80.0
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
'''

class _Evil:
    def __init__(self, name):
        self.name = name
    def __reduce__(self):
        meta = dict(type='class', version=6, module_src=EVIL_SRC.format(name=self.name), class_name=self.name,
                    state=dict(training=False, _parameters={}, _buffers={}, _modules={}))
        return (persistence._reconstruct_persistent_obj, (meta,))

@pytest.mark.parametrize('name', ['Evil', 'EDMPrecond'])
def test_crafted_pickle_never_runs_by_default(tmp_path, name, tiny_files):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=_Evil(name))))
    env = {'EDM_DG_MARKER': str(marker)}
    p = py('generate_dg.py', f'--network={path}', f'--outdir={tmp_path / "o"}', '--seeds=0', '--steps=2', env=env)
    line = assert_one_line_error(p, 'evil.pkl')
    assert not marker.exists()  # the embedded source never ran
    if name == 'Evil':
        assert 'class "Evil" is not a known EDM class' in line and '--trust_pickle' in line
    # With --trust_pickle the file is EDM's business: its code runs (this test says so by the marker).
    p = py('generate_dg.py', f'--network={path}', f'--outdir={tmp_path / "o2"}', '--seeds=0', '--steps=2', '--trust_pickle', env=env)
    assert marker.exists() and marker.read_text() == 'pwned'

def test_real_format_pickle_loads_safely_and_matches_trusted(tmp_path, ref):
    """A pickle written by the persistence mechanism from this project's networks: safe == trusted outputs."""
    e = ref['edm_net']
    from training import networks
    net = networks.EDMPrecond(**e['init_kwargs']).eval()
    net.load_state_dict(e['state_dict'])
    path = save_edm_pickle(net, str(tmp_path / 'net.pkl'))
    safe = pickles.load_network_pickle(path)
    trusted = pickles.load_network_pickle(path, trust_pickle=True)
    with torch.no_grad():
        a = safe(e['x'], e['sigma'], e['class_labels'])
        b = trusted(e['x'], e['sigma'], e['class_labels'])
    assert torch.equal(a, b)
    assert_close_to_fixture(a, e['denoised'], *float32_layers(net))

def test_safe_loader_refuses_other_globals(tmp_path):
    path = tmp_path / 'os.pkl'
    path.write_bytes(pickle.dumps(dict(ema=os.system)))  # a global outside the allow-list
    with pytest.raises(ValueError, match='"posix.system" is not allowed.*--trust_pickle'):
        pickles.load_network_pickle(str(path))

#----------------------------------------------------------------------------
# Kill in a given state of the run, rerun, compare with an uninterrupted run.
#
# The kill is what `kill -9 PID` of the command a user started does: SIGKILL to the launcher process
# alone (python, or torchrun's launcher). torchrun's workers sit in sessions of their own, so a SIGKILL
# of the launcher's process group (`kill -9 -- -PGID`) reaches them no more than this does: either
# way, nothing tells them; they must notice by themselves that their launcher is gone. (Ctrl-C and a
# plain `kill` are SIGINT and SIGTERM, which torchrun's launcher catches and passes on to its workers.)
# The tests wait for the state to kill in (files on disk), not for a time, so they kill on a machine
# of any speed: the work left after that state (dozens of images, several epochs) outlasts the polling
# interval by far.

MARKER = 'EDM_DG_TEST_MARKER'
_spawned = 0

def _spawn(args, env=None, **kwargs):
    """Start a command the way a user does, with an environment variable that marks every process it
    starts (the launcher and its workers)."""
    global _spawned
    _spawned += 1
    marker = f'{os.getpid()}-{_spawned}'
    full = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', **(env or {}), **{MARKER: marker})
    kwargs = {'stdout': subprocess.DEVNULL, 'stderr': subprocess.DEVNULL, **kwargs}
    proc = subprocess.Popen(args, env=full, cwd=ROOT, start_new_session=True, **kwargs)
    proc.marker = marker
    return proc

def _marked(marker):
    """Pids of the live processes (not zombies) whose environment carries `marker`."""
    pids = []
    for q in psutil.process_iter():
        try:
            if q.status() != psutil.STATUS_ZOMBIE and q.environ().get(MARKER) == marker:
                pids.append(q.pid)
        except psutil.Error:  # Gone meanwhile, or not ours.
            pass
    return pids

def _assert_all_gone(proc, within=10.0):
    deadline = time.monotonic() + within
    while (left := _marked(proc.marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:  # Fail, but leave no orphans running behind.
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert not left, f'processes {left} outlived their launcher by {within} s'

def _kill(proc):
    """`kill -9` the launcher; every process it started must be gone within 10 s."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _assert_all_gone(proc)

def _kill_when(proc, ready, state):
    """`kill -9` the run as soon as ready() holds; the run must still be running then, and die by the kill."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f'the run ended (exit {proc.returncode}) before {state}'
        assert time.monotonic() < deadline, f'no {state} within 300 s'
        time.sleep(0.005)
    _kill(proc)
    # A run that had ended by itself meanwhile would report its own exit status here, not the signal.
    assert proc.returncode == -signal.SIGKILL, f'the run ended (exit {proc.returncode}) before it was killed at {state}'

def _pngs(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(root, f), 'rb') as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out

def _finished_pngs(folder):
    """Names of the PNGs written in full (names only: files move while a run writes them)."""
    return {os.path.relpath(os.path.join(root, f), folder) for root, _, files in os.walk(folder)
            for f in files if f.endswith('.png') and not f.startswith('.tmp-')}

GEN_SEEDS = 40

@pytest.fixture(scope='module')
def gen_ref(tmp_path_factory):
    d = tmp_path_factory.mktemp('kill')
    net = save_edm_pickle(tiny_edm(), str(d / 'net.pkl'))
    # Batches of one: every image, in any run and resumed or not, is made in a batch of the same
    # composition on this machine, so its floats and hence its bytes are the same.
    args = [f'--network={net}', f'--seeds=0-{GEN_SEEDS - 1}', '--steps=4', '--batch=1']
    p = py('generate_dg.py', *args, f'--outdir={d / "ref"}')
    assert p.returncode == 0, p.stderr
    return d, args, {k: v for k, v in _pngs(d / 'ref').items() if k.endswith('.png')}

@pytest.mark.parametrize('nproc', [1, 2])
def test_generation_killed_and_resumed(gen_ref, nproc):
    d, args, ref = gen_ref
    assert len(ref) == GEN_SEEDS
    # Just after the first image and half-way; with two processes (slower to start) half-way only.
    for trial, kill_at in enumerate([1, GEN_SEEDS // 2] if nproc == 1 else [GEN_SEEDS // 2]):
        out = d / f'kill{nproc}-{trial}'
        launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        cmd = launcher + [os.path.join(ROOT, 'generate_dg.py'), *args, f'--outdir={out}']
        _kill_when(_spawn(cmd), lambda: len(_finished_pngs(out)) >= kill_at, f'{kill_at} images were written')
        before = _finished_pngs(out)  # not half-written ones
        assert kill_at <= len(before) < len(ref), len(before)  # killed with work left
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'), cwd=ROOT, timeout=600)
        assert p.returncode == 0, p.stderr
        files = _pngs(out)
        assert {k: v for k, v in files.items() if k.endswith('.png')} == ref  # the full set, byte-identical
        assert not [k for k in files if '.tmp-' in k]  # no half-written leftovers
        generated = int(p.stdout.split(' generated')[0].split()[-1])
        assert generated == len(ref) - len(before)  # nothing generated twice

@pytest.mark.parametrize('when', ['starting', 'generating'])
def test_torchrun_workers_stop_with_their_launcher(gen_ref, tmp_path, when):
    """`kill -9` of torchrun's launcher: no worker is left 10 s later, whether they were still starting
    (the launcher may die before a worker has asked to die with it) or writing images."""
    d, args, _ = gen_ref
    out = tmp_path / 'out'
    proc = _spawn([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                   os.path.join(ROOT, 'generate_dg.py'), *args[:1], '--seeds=0-99999', '--steps=6', f'--outdir={out}'])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if when == 'starting' and [p for p in _marked(proc.marker) if p != proc.pid]:
            break
        if when == 'generating' and out.is_dir() and [f for f in os.listdir(out) if f.endswith('.png')]:
            break
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be killed'
    _kill(proc)

# A stand-in for torchrun's launcher: it starts a "worker" in a session of its own, as torchrun does,
# and ends (as if killed) once the worker watches it, or at once (the worker then finds itself
# orphaned before it even imports torch_utils.distributed).
_LAUNCHER = """
import os, subprocess, sys, time
mode, status = sys.argv[1:]
subprocess.Popen([sys.executable, '-c', os.environ['WORKER_SRC'], mode, status, str(os.getpid())], start_new_session=True)
deadline = time.time() + 120
while mode != 'orphaned_first' and not os.path.exists(status) and time.time() < deadline:
    time.sleep(0.05)
"""
_WORKER = """
import ctypes, os, sys, time
mode, status, launcher = sys.argv[1], sys.argv[2], int(sys.argv[3])
import torch  # Before ctypes.CDLL is replaced below (torch loads its libraries with it).
if mode == 'orphaned_first':
    while os.getppid() == launcher:
        time.sleep(0.05)
    if os.getppid() != 1:  # Adopted by a subreaper: the case this project cannot tell from a live launcher.
        open(status, 'w').write('subreaper')
        sys.exit()
libc = ctypes.CDLL(None)
if mode == 'watchdog':  # As on a system without prctl.
    def no_prctl(*args, **kwargs):
        raise OSError('no prctl here')
    ctypes.CDLL = no_prctl
from torch_utils import distributed
death_signal = ctypes.c_int(-1)
libc.prctl(2, ctypes.byref(death_signal))  # PR_GET_PDEATHSIG
open(status, 'w').write(f'watching {death_signal.value}')
time.sleep(120)
"""

@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='prctl and /proc are Linux')
@pytest.mark.parametrize('mode', ['prctl', 'watchdog', 'orphaned_first'])
def test_worker_stops_with_launcher_each_way(tmp_path, mode):
    """Each way a worker learns that its launcher is gone: the kernel's parent-death signal, the
    watchdog thread (where there is no prctl), and the check at import (launcher gone before it)."""
    status = tmp_path / 'status'
    proc = _spawn([sys.executable, '-c', _LAUNCHER, mode, str(status)], env={'TORCHELASTIC_RUN_ID': 'test', 'WORKER_SRC': _WORKER})
    assert proc.wait(timeout=300) == 0
    if mode == 'orphaned_first':
        _assert_all_gone(proc)
        if status.exists() and status.read_text() == 'subreaper':
            pytest.skip('orphans here are adopted by a subreaper, not by pid 1')
        assert not status.exists()  # it stopped at the import
    else:
        _assert_all_gone(proc)
        assert status.read_text() == f'watching {int(signal.SIGKILL) if mode == "prctl" else 0}'

def test_torchrun_click_error_and_plain_python_unaffected(tmp_path):
    """Workers still fail with click's one-line error and leave with their launcher; a process not
    started by torchrun (this one, a plain `python generate_dg.py`) watches no launcher."""
    from torch_utils import distributed as dist
    assert 'TORCHELASTIC_RUN_ID' not in os.environ and dist._launcher_pid is None
    proc = _spawn([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                   os.path.join(ROOT, 'generate_dg.py'), f'--network={tmp_path / "missing.pkl"}', f'--outdir={tmp_path}', '--seeds=0-3'],
                  stderr=subprocess.PIPE, text=True)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0
    errors = [l for l in err.splitlines() if l.startswith('Error:')]
    assert len(errors) == 2 and all('missing.pkl' in l for l in errors), err  # one line from each worker
    _assert_all_gone(proc, within=0)

def test_training_killed_and_resumed(tmp_path):
    from helpers import sharp_and_blurred, write_set
    from helpers import tiny_classifier
    real, fake = sharp_and_blurred(32, 0)
    write_set(str(tmp_path / 'real'), real)
    write_set(str(tmp_path / 'fake'), fake)
    torch.save(tiny_classifier().state_dict(), tmp_path / 'cls.pt')
    epochs = 4  # of 4 steps each: the epochs left after a kill outlast the polling by far
    args = [f'--real={tmp_path / "real"}', f'--fake={tmp_path / "fake"}', f'--classifier={tmp_path / "cls.pt"}',
            f'--epochs={epochs}', '--batch=16', '--head_width=64', '--head_depth=1', '--lora_rank=1']
    p = py('train_disc.py', *args, f'--outdir={tmp_path / "ref"}')
    assert p.returncode == 0, p.stderr
    ref = torch.load(tmp_path / 'ref' / f'disc-{epochs:04d}.pt', weights_only=True)
    for trial, kill_at in enumerate([1, 2]):  # in epoch 2 (or while epoch 1 is saved), and in epoch 3
        out = tmp_path / f'k{trial}'
        cmd = [sys.executable, os.path.join(ROOT, 'train_disc.py'), *args, f'--outdir={out}', '--resume']
        _kill_when(_spawn(cmd), lambda: os.path.isfile(out / f'disc-{kill_at:04d}.pt'), f'epoch {kill_at} was saved')
        saved = sorted(f for f in os.listdir(out) if f.startswith('disc-'))
        assert f'disc-{kill_at:04d}.pt' in saved and f'disc-{epochs:04d}.pt' not in saved, saved  # killed with epochs left
        state = out / 'training-state.pt'
        done = torch.load(state, weights_only=True)['epoch'] if state.exists() else 0
        assert done in (kill_at - 1, kill_at), done  # the state file follows the checkpoint
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1'), cwd=ROOT, timeout=600)
        assert p.returncode == 0, p.stderr
        trained = [int(l.split()[1].split('/')[0]) for l in p.stdout.splitlines() if l.startswith('epoch ') and ': loss' in l]
        assert trained == list(range(done + 1, epochs + 1)), p.stdout  # resumed after the saved epochs, not restarted
        got = torch.load(out / f'disc-{epochs:04d}.pt', weights_only=True)
        assert all(torch.equal(ref['head'][k], got['head'][k]) for k in ref['head'])
        assert all(torch.equal(ref['lora'][k], got['lora'][k]) for k in ref['lora'])
        assert not [f for f in os.listdir(out) if f.startswith('.tmp-')]

#----------------------------------------------------------------------------

class NaNForSomeSeeds(torch.nn.Module):
    """Wraps a net and poisons images whose latent mean is positive."""
    def __init__(self, net):
        super().__init__()
        self.net = net
        for k in ('img_resolution', 'img_channels', 'label_dim', 'sigma_min', 'sigma_max'):
            setattr(self, k, getattr(net, k))
    def round_sigma(self, s):
        return self.net.round_sigma(s)
    def forward(self, x, sigma, labels=None):
        out = self.net(x, sigma, labels)
        bad = (x.flatten(1).mean(1) > 0).reshape(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(out, float('nan')), out)

def test_nonfinite_images_reported_by_seed_not_written(tmp_path):
    from edm_dg.generate import draw_inputs, generate
    net = NaNForSomeSeeds(tiny_edm())
    seeds = list(range(8))
    lat, _, _ = draw_inputs([3, 16, 16], 0, seeds, 'cpu')
    expected_bad = [s for s, l in zip(seeds, lat) if l.mean() * 80 > 0]
    assert 0 < len(expected_bad) < len(seeds)
    with torch.no_grad():
        stats = generate(net, str(tmp_path), seeds, device='cpu', max_batch_size=3, sampler_kwargs=dict(num_steps=3), progress=False)
    assert sorted(stats['nonfinite']) == expected_bad
    written = sorted(int(f[:6]) for f in os.listdir(tmp_path) if f.endswith('.png'))
    assert written == [s for s in seeds if s not in expected_bad]
