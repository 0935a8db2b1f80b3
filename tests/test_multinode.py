"""Beyond one machine: two torchrun launchers as two nodes of one job (gloo over loopback)."""

import os
import socket
import subprocess
import sys
import time

from helpers import ROOT, py, save_edm_pickle, tiny_edm

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def _images(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f.endswith('.png'):
                with open(os.path.join(root, f), 'rb') as fh:
                    out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out

def test_two_nodes_split_seeds_and_match_one_process(tmp_path):
    """Seeds are dealt over every rank of every node; the images are those of a single process."""
    net = save_edm_pickle(tiny_edm(), str(tmp_path / 'net.pkl'))
    args = [f'--network={net}', '--seeds=0-10', '--steps=3', '--batch=2', '--subdirs']
    p = py('generate_dg.py', *args, f'--outdir={tmp_path / "one"}')
    assert p.returncode == 0, p.stderr
    ref = _images(tmp_path / 'one')
    assert len(ref) == 11

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    nodes = []
    for node_rank in range(2):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={node_rank}',
               '--nproc_per_node=1', f'--rdzv_id=mn-{os.getpid()}', '--rdzv_backend=c10d',
               f'--rdzv_endpoint=127.0.0.1:{port}', '--local_addr=127.0.0.1',
               os.path.join(ROOT, 'generate_dg.py'), *args, f'--outdir={tmp_path / "two"}']
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT))
    t0 = time.monotonic()
    try:
        outs = [n.communicate(timeout=240) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
                n.wait()
    for n, (stdout, stderr) in zip(nodes, outs):
        assert n.returncode == 0, stderr[-3000:]
    assert time.monotonic() - t0 < 240
    # One job: only global rank 0 reports, with the count summed over both nodes (two separate
    # one-node jobs would each report all 11).
    done = [int(s.split(' generated')[0].split()[-1]) for s, _ in outs if ' generated' in s]
    assert done == [11], [s for s, _ in outs]
    assert _images(tmp_path / 'two') == ref
