"""Train a DG discriminator: frozen ADM classifier features + a shallow head (optionally LoRA).

Real images come from an EDM dataset (zip or folder with dataset.json), an
image folder or the DG release's true_data.npz; fake images from a
generate_dg.py output folder or its .npz shards, or the release's samples_*.npz
folder (its sample_*.png grid previews are skipped) or
gen_data_for_discriminator_training.npz. One-hot labels are read by argmax.
One checkpoint per epoch, each usable as `generate_dg.py --disc`; each records
the seeds its fakes came from (fake_seeds) when the file names or shards say.
Rerunning the same command continues an interrupted run (--no-resume starts over).
--batch is per process, as in every edm-dg command: under torchrun the global
batch is --batch times the processes.

The DG release's and the reproduction study's train.py option names work as
aliases (--gendir/--sample_dir, --datadir, --savedir/--save_dir, --epoch/--n_epochs,
--batch_size, --cond 0|1, --lora_rank, --num_gen_samples, --wd); the files their
code hard-codes must be given (docs/compat.md §9). --lora_checkpoint continues
training from the study's adapter file; --export=study|release also writes
their checkpoint files.

After every epoch --eval_images real and fake images (held out of training
with --holdout, else the first training images) are evaluated at the centres
of 10 equal bins of VP time tau, with the same noise every epoch:
metrics.jsonl records bin_edges, loss_by_tau and acc_by_tau, training-curves.png
plots them, and log-ratio-histogram.png shows log(d/(1-d)) of real vs fake at
the lowest bin's centre (tau = 0.05). Accuracy near 0.5 at large tau is
expected (the images are almost pure noise there). A line "Warning: ..." is
printed once when, from epoch 3 on (or the last epoch of a shorter run) and
with n >= 16 evaluation images of each kind, the mean accuracy of the two
lowest bins (tau < 0.2) is within max(0.05, 1/sqrt(2n)) of 0.5 (the second
term, two standard errors at chance, matters only for n < 200).

\b
  torchrun --standalone --nproc_per_node=8 train_disc.py --real=datasets/cifar10-32x32.zip \\
      --fake=samples/edm-uncond --classifier=32x32_classifier.pt --outdir=disc-runs/uncond --epochs=60 --batch=16
"""

import click

from torch_utils import distributed as dist
from edm_dg.cli import command_body
from edm_dg.disc_training import train
from edm_dg.options import check_train_files, train_options

@click.command(help=__doc__)
@train_options
@command_body
def main(device, cond, lora_rank, img_resolution, disc_time, **kwargs):
    check_train_files(kwargs)
    if lora_rank == -1:  # The study's "no LoRA".
        lora_rank = 0
    train(device=dist.init_device(device), log=dist.print0, cond=bool(cond), lora_rank=lora_rank or 0,
          time_schedule=disc_time, img_resolution=img_resolution, **kwargs)

if __name__ == '__main__':
    main()
