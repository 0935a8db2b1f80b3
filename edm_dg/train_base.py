"""This project's small base-model trainer: EDMPrecond(SongUNet) with EDMLoss, Adam and an EMA copy.

It exists for the self-contained demo and the benchmarks, on a CPU or one GPU;
real EDM models come from NVlabs' EDM `train.py`. Its snapshots have EDM's
layout (`{ema, loss_fn, augment_pipe, dataset_kwargs}`, networks pickled by
`torch_utils.persistence`; docs/compat.md §1), so they load in EDM's
`generate.py` as well as here.
"""

import copy
import pickle
import time

import torch
import tqdm

import dnnlib
from training import networks
from training.loss import EDMLoss
from .fileio import atomic_open

def save_snapshot(path, ema, loss_fn, dataset_kwargs):
    """Write an EDM network pickle atomically (no half-written file on interruption)."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    with atomic_open(path) as f:
        pickle.dump(data, f)

def train_edm(images_u8, labels, outfile, *, label_dim=0, steps=1500, batch=256, lr=1e-3, ema_halflife_steps=100,
              model_kwargs=None, seed=0, device='cpu', dataset_kwargs=None, progress=True, log=print):
    """Train on uint8 images [N,C,H,W] (labels: class indices, used when label_dim > 0).

    Returns the EMA network, also written to `outfile` as an EDM snapshot.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    n, c, h, _ = images_u8.shape
    kwargs = dict(model_type='SongUNet', model_channels=32, channel_mult=[1, 2], num_blocks=2,
                  attn_resolutions=[h // 2], dropout=0.1)
    kwargs.update(model_kwargs or {})
    net = networks.EDMPrecond(img_resolution=h, img_channels=c, label_dim=label_dim, **kwargs).train().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    x_all = (images_u8.to(torch.float32) / 127.5 - 1).to(device)
    y_all = torch.eye(label_dim, device=device)[labels.to(device)] if label_dim else None
    gen = torch.Generator().manual_seed(seed)
    ema_beta = 0.5 ** (1 / max(ema_halflife_steps, 1e-8))
    warmup = max(steps * 0.05, 1)
    start = time.time()
    bar = tqdm.tqdm(range(steps), desc='train EDM', disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(n, (batch,), generator=gen).to(device)
        loss = loss_fn(net, x_all[idx], None if y_all is None else y_all[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group['lr'] = lr * min(step / warmup, 1)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, ema_beta))
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    bar.close()
    log(f'EDM training: {steps} steps in {time.time() - start:.0f}s')
    ema = ema.cpu()
    save_snapshot(outfile, ema, loss_fn, dataset_kwargs or {})
    return ema
