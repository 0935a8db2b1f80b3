"""Train a DG discriminator: frozen ADM classifier features + a shallow head (optionally LoRA).

Real images come from an EDM dataset (zip or folder with dataset.json), an
image folder or the DG release's true_data.npz; fake images from a
generate_dg.py output folder or its .npz shards, or the release's samples_*.npz
folder (its sample_*.png grid previews are skipped) or
gen_data_for_discriminator_training.npz. One-hot labels are read by argmax.
One checkpoint per epoch, each usable as `generate_dg.py --disc`; each records
the seeds its fakes came from (fake_seeds) when the file names or shards say.
Rerun with --resume to continue an interrupted run.

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
      --fake=samples/edm-uncond --classifier=32x32_classifier.pt --outdir=disc-runs/uncond --epochs=60
"""

import click

from torch_utils import distributed as dist
from edm_dg.cli import command_body
from edm_dg.disc_training import train

@click.command(help=__doc__)
@click.option('--real',        help='Real images: EDM dataset zip/folder, image folder, or .npz (e.g. the release\'s true_data.npz)', metavar='PATH', required=True)
@click.option('--fake',        help='Generated images: generate_dg.py folder, .npz file, or folder of .npz shards (edm-dg\'s or the release\'s samples_*.npz)', metavar='PATH', required=True)
@click.option('--classifier', 'classifier_path', help='ADM classifier used as frozen feature extractor', metavar='PATH', required=True)
@click.option('--outdir',      help='Run folder (checkpoints, metrics.jsonl, training-curves.png, log-ratio-histogram.png)', metavar='DIR', required=True)
@click.option('--epochs',      help='Number of epochs (release: 60 uncond, 250 cond)', type=click.IntRange(min=1), default=60, show_default=True)
@click.option('--batch',       help='Global batch size (all processes)', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr',          help='Adam learning rate', type=click.FloatRange(min=0, min_open=True), default=3e-4, show_default=True)
@click.option('--weight_decay', help='Adam weight decay', type=click.FloatRange(min=0), default=1e-7, show_default=True)
@click.option('--cond',        help='Class-conditional discriminator (needs labels)', is_flag=True)
@click.option('--num_images', '--num', 'num', help='Images of each kind  [default: all, equal counts]; under torchrun write --num_images (torchrun takes --num for its --numa-binding)', type=click.IntRange(min=1), default=None)
@click.option('--lora_rank',   help='LoRA rank on the classifier (0 = off)', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--lora_alpha',  help='LoRA alpha (update scaled by alpha/rank)', type=float, default=1.0, show_default=True)
@click.option('--head_width',  help='Head channels', type=click.IntRange(min=64), default=128, show_default=True)
@click.option('--head_depth',  help='Head residual blocks', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--time_schedule', help='Time the classifier is fed, in training and (recorded in the checkpoint) at sampling: linear VP time, or cosine time (the release\'s training fed linear time at 64x64, its sampler cosine)  [default: the classifier\'s own: cosine for a 64x64 ADM classifier, else linear]', type=click.Choice(['linear', 'cosine']), default=None)
@click.option('--eval_images', help='Images of each kind evaluated at every tau bin after every epoch; 0 = none  [default: 256, at most 1/32 of the images of each kind, none if that is under 16]', type=click.IntRange(min=0), default=None)
@click.option('--holdout',     help='Take the --eval_images evaluation images (the last of each kind) out of training', is_flag=True)
@click.option('--seed',        help='Random seed', type=int, default=0, show_default=True)
@click.option('--snap',        help='Keep a checkpoint every N epochs', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--precision',   help='Autocast precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32', show_default=True)
@click.option('--channels_last', help='channels_last memory format', is_flag=True)
@click.option('--resume',      help='Continue the run in --outdir from its last epoch', is_flag=True)
@click.option('--device',      help='Device  [default: cuda if available]', default=None)
@command_body
def main(device, **kwargs):
    train(device=dist.init_device(device), log=dist.print0, **kwargs)

if __name__ == '__main__':
    main()
