"""The README is executable: every generate_dg.py, train_disc.py, fid.py, nll.py and stats.py command of its
recipe table and code blocks runs as written, on small files in the real layouts at the paths it names.

What is changed, and only that: counts and steps are cut (CUT below), torchrun runs 2 processes (gloo) instead
of 8, the multi-node launcher runs one node on loopback, the download URLs are served from a dnnlib cache (NVIDIA's
FID detector by a 16-feature stand-in, so that no 2048-d matrix square root is taken), and a command whose input is another command's output
(e.g. training on the fakes of the row above) runs after that command in the same folder. A README edit that
breaks a command, or drops the recipe, fails here.
"""

import csv
import os
import re
import shlex
import socket
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from helpers import ROOT, cache_url, link_tree, real_layout_files, run_cli, serve_nvidia_detector

SCRIPTS = ('generate_dg.py', 'train_disc.py', 'fid.py', 'nll.py', 'stats.py')
CUT = [  # (pattern, replacement) on each word of a command
    (r'^--nproc_per_node=\d+$', '--nproc_per_node=2'),
    (r'^--seeds=(\d+)-\d+$', lambda m: f'--seeds={m[1]}-{int(m[1]) + 3}'),
    (r'^--num_images=\d+$', '--num_images=2'),
    (r'^--num_samples=\d+$', '--num_samples=4'),
    (r'^--epochs=\d+$', '--epochs=2'),
    (r'^--every=\d+$', '--every=1'),
    (r'^--values=.*$', '--values=0,4'),
    (r'^--refine=\d+$', '--refine=1'),
]
APPEND = {'generate_dg.py': ['--steps=2'], 'fid.py calc': ['--num_images=4'], 'fid.py epochs': ['--steps=2'],
          'fid.py sweep': ['--steps=2'], 'nll.py': ['--steps=2']}
INPUT_OPTIONS = ('--images', '--fake', '--run_dir', '--run', '--a')
# Six FID values for the significance row (made up here; their mean is the study's 1.8433).
SIX_FIDS = [1.8333, 1.8336, 1.8414, 1.8486, 1.8452, 1.8577]

def readme_commands():
    """Commands of our scripts in README.md: backticked in its tables, and lines of its code blocks."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read()
    found = []
    for line in text.splitlines():
        if line.startswith('|'):
            found += [span for span in re.findall(r'`([^`]+)`', line)]
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        found += [l.split(' #')[0].strip() for l in block.replace('\\\n', ' ').splitlines()]
    keep = []
    for cmd in found:
        words = cmd.split()
        if words and words[0] in ('torchrun', 'python') and any(w in SCRIPTS for w in words) and cmd not in keep:
            keep.append(cmd)
    return keep

def script_of(words):
    i = next(i for i, w in enumerate(words) if w in SCRIPTS)
    sub = words[i + 1] if words[i] == 'fid.py' and i + 1 < len(words) and not words[i + 1].startswith('-') else None
    return i, words[i] + (f' {sub}' if sub else '')

def option(words, name):
    """The value of --name=V or --name V in a command's words."""
    for i, w in enumerate(words):
        if w.startswith(name + '='):
            return w.split('=', 1)[1]
        if w == name and i + 1 < len(words):
            return words[i + 1]
    return None

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def runnable(cmd):
    """The argv to run: cut counts, our interpreter and script paths, one node on loopback."""
    words = shlex.split(cmd)
    port = free_port()
    words = [w.replace('HOST:29500', f'127.0.0.1:{port}') for w in words]
    words = [{'--nnodes=N': '--nnodes=1', '--node_rank=K': '--node_rank=0'}.get(w, w) for w in words]
    for pattern, repl in CUT:
        words = [re.sub(pattern, repl, w) for w in words]
    i, name = script_of(words)
    if name in ('fid.py epochs', 'fid.py sweep') and option(words, '--seeds') is None:
        words.append('--seeds=0-3')  # their default is FID-10k's 0-9999
    launcher = ([sys.executable, '-m', 'torch.distributed.run'] + words[1:i]) if words[0] == 'torchrun' else [sys.executable]
    return launcher + [os.path.join(ROOT, words[i])] + words[i + 1:] + APPEND.get(name, []), name

COMMANDS = readme_commands()

def test_readme_has_the_recipe():
    names = [script_of(shlex.split(c))[1] for c in COMMANDS]
    assert sorted(set(sinks()) | {j for i in sinks() for j in producers(i)}) == list(range(len(COMMANDS)))
    for name in ('generate_dg.py', 'train_disc.py', 'fid.py calc', 'fid.py epochs', 'fid.py sweep', 'nll.py', 'stats.py'):
        assert name in names, (name, names)
    assert len(COMMANDS) >= 10, COMMANDS

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('readme-files'))
    real_layout_files(root, fid_dims=16)
    with open(os.path.join(root, 'runs.csv'), 'w', newline='') as f:
        csv.writer(f).writerows([['seed', 'fid']] + [[i, v] for i, v in enumerate(SIX_FIDS)])
    return root

def producers(index):
    """Earlier commands whose --outdir is an input of command index (and theirs), in README order."""
    words = shlex.split(COMMANDS[index])
    inputs = {option(words, o) for o in INPUT_OPTIONS} - {None}
    out = []
    for j in range(index):
        if option(shlex.split(COMMANDS[j]), '--outdir') in inputs:
            out += [k for k in producers(j) + [j] if k not in out]
    return out

def check_output(name, cmd, proc, cwd):
    """What the command claims to write."""
    words = shlex.split(cmd)
    text = proc.stdout + proc.stderr
    outdir = option(words, '--outdir')
    if name == 'generate_dg.py':
        first = int((option(words, '--seeds') or '0').split('-')[0])
        sub = f'{first - first % 1000:06d}/' if '--subdirs' in words else ''
        for s in range(first, first + 4):
            assert os.path.isfile(os.path.join(cwd, outdir, f'{sub}{s:06d}.png')), (s, text)
    elif name == 'train_disc.py':
        assert os.path.isfile(os.path.join(cwd, outdir, 'disc-0002.pt')), text
    elif name == 'fid.py calc':
        assert np.isfinite(float(proc.stdout.strip().splitlines()[-1])), text  # EDM's calc prints the FID alone
    elif name == 'fid.py epochs':
        assert os.path.isfile(os.path.join(cwd, outdir, 'fid_epochs.csv')) and 'Best epoch' in text, text
    elif name == 'fid.py sweep':
        param = option(words, '--param')
        with open(os.path.join(cwd, outdir, f'sweep_{param}.csv')) as f:
            assert len(list(csv.DictReader(f))) == 3, text  # two grid values and one refined point
    elif name == 'nll.py':
        assert re.search(r'NLL: -?\d+\.\d+ \+- \d+\.\d+ bits/dim', text), text
    elif name == 'stats.py':
        t = scipy_stats.ttest_1samp(SIX_FIDS, float(option(words, '--baseline'))).statistic
        assert f't={t:.3f}' in text, (t, text)
    else:
        raise AssertionError(f'no check for {name}')

def sinks():
    """Commands whose output no later command reads: each runs with the commands it needs, so every command runs once."""
    needed = {j for i in range(len(COMMANDS)) for j in producers(i)}
    return [i for i in range(len(COMMANDS)) if i not in needed]

@pytest.mark.parametrize('index', sinks(), ids=[script_of(shlex.split(COMMANDS[i]))[1].replace(' ', '-') + f'-{i}' for i in sinks()])
def test_readme_command_runs(base, tmp_path, index):
    cwd = link_tree(base, str(tmp_path / 'work'))
    cache = str(tmp_path / 'cache')  # The download URLs (EDM's pickles, NVIDIA's detector) served from a dnnlib cache.
    for kind in ('uncond', 'cond'):
        cache_url(cache, f'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-{kind}-vp.pkl',
                  os.path.join(base, f'checkpoints/edm-cifar10-32x32-{kind}-vp.pkl'))
    serve_nvidia_detector(cache, str(tmp_path), dims=16)
    env = dict(DNNLIB_CACHE_DIR=cache, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]))
    for j in producers(index) + [index]:
        argv, name = runnable(COMMANDS[j])
        proc = run_cli(argv, cwd=cwd, timeout=600, env=env)
        assert proc.returncode == 0, (COMMANDS[j], proc.stdout[-2000:], proc.stderr[-4000:])
        check_output(name, COMMANDS[j], proc, cwd)

# Names kept for EDM's and users' habits whose help says what to write under torchrun instead.
TORCHRUN_SAFE_SPELLING = {'--num': '--num_images', '--run': '--run_dir'}

def test_no_option_is_taken_by_torchrun():
    """torchrun's parser reads abbreviations of its own options anywhere in the line (`--num` becomes its
    --numa-binding), so no option of a command that runs under torchrun may be a prefix of one of torchrun's."""
    import fid
    import generate_dg
    import nll
    import train_disc
    from torch.distributed.run import get_args_parser
    theirs = [s for s in get_args_parser()._option_string_actions if s.startswith('--')]
    commands = [generate_dg.main, train_disc.main, nll.main] + list(fid.main.commands.values())
    for command in commands:
        for param in command.params:
            for name in getattr(param, 'opts', []) + getattr(param, 'secondary_opts', []):
                taken = [t for t in theirs if t.startswith(name)]
                if taken and name in TORCHRUN_SAFE_SPELLING:
                    assert TORCHRUN_SAFE_SPELLING[name] in param.opts and TORCHRUN_SAFE_SPELLING[name] in (param.help or '')
                    continue
                assert not taken, f'{command.name}: {name} would be read by torchrun as {taken[0]}'
