"""Generation throughput with 1 and N processes: generate_dg.py run as a user runs it.

Writes real-size networks with seeded random weights (EDM's CIFAR-10 DDPM++
pickle, the 32x32 ADM classifier, the released head layout) to a temporary
folder, then runs `generate_dg.py` plain and guided, alone and under `torchrun`,
and reports the images/s it prints (its sampling loop; loading excluded).
torchrun gives each process one thread unless OMP_NUM_THREADS is set.

    python bench/generate_scaling.py --seeds=0-15 --batch=4 --steps=6 --nproc=1,2
"""

import os
import re
import subprocess
import sys
import tempfile

import click
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from edm_dg.bench import cifar10_ddpmpp, released_discriminator
from training.loss import EDMLoss
from edm_dg.train_base import save_snapshot

def write_networks(tmp):
    paths = dict(net=os.path.join(tmp, 'net.pkl'), classifier=os.path.join(tmp, 'classifier.pt'), disc=os.path.join(tmp, 'head.pt'))
    save_snapshot(paths['net'], cifar10_ddpmpp(), EDMLoss(), {})
    disc = released_discriminator()
    torch.save(disc.classifier.state_dict(), paths['classifier'])
    torch.save(disc.head.state_dict(), paths['disc'])
    return paths

def generate(paths, outdir, nproc, seeds, batch, steps, guided, device):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    cmd = launcher + [os.path.join(ROOT, 'generate_dg.py'), f'--network={paths["net"]}', f'--outdir={outdir}',
                      f'--seeds={seeds}', f'--batch={batch}', f'--steps={steps}', f'--device={device}', '--no-resume']
    if guided:
        cmd += [f'--disc={paths["disc"]}', f'--classifier={paths["classifier"]}']
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    m = re.search(r'Done: (\d+) generated.*?([\d.]+) images/s', out.stdout)
    if out.returncode or not m:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise click.ClickException(f'generate_dg.py failed (exit {out.returncode}): {lines[-1] if lines else "no output"}')
    return int(m.group(1)), float(m.group(2))

@click.command()
@click.option('--seeds', default='0-15', show_default=True)
@click.option('--batch', type=int, default=4, show_default=True)
@click.option('--steps', type=int, default=6, show_default=True)
@click.option('--nproc', default='1,2', show_default=True, help='Process counts to compare')
@click.option('--device', default='cpu', show_default=True, help='cpu, or cuda (one GPU per process)')
def main(seeds, batch, steps, nproc, device):
    counts = [int(n) for n in nproc.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_networks(tmp)
        print(f'generate_dg.py, seeds {seeds}, --batch={batch} per process, --steps={steps}, --device={device}, {os.cpu_count()} CPU cores, '
              f'OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS", "unset")}')
        print(f'{"":<8}' + ''.join(f'{f"{n} proc images/s":>20}' for n in counts))
        for guided in (False, True):
            rates = [generate(paths, os.path.join(tmp, f'out-{n}-{guided}'), n, seeds, batch, steps, guided, device) for n in counts]
            print(f'{"guided" if guided else "plain":<8}' + ''.join(f'{r:>20.3f}' for _, r in rates))

if __name__ == '__main__':
    main()
