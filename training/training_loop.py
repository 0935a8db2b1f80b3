"""A compact EDM training loop (EDMLoss, Adam, EMA) for small models on a CPU or one GPU.

It writes EDM-format snapshots (`{ema, loss_fn, augment_pipe, dataset_kwargs}`
pickled with the persistence mechanism), so the result loads in EDM's own
generate.py and in edm-dg. Large-scale training belongs to EDM's train.py.
"""

import copy
import pickle
import time

import torch
import tqdm

import dnnlib
from training import networks
from training.loss import EDMLoss
from edm_dg.io import atomic_open

def save_snapshot(path, ema, loss_fn, dataset_kwargs):
    """Atomically write an EDM network pickle."""
    with atomic_open(path) as f:
        pickle.dump(dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs)), f)

def train_edm(images_u8, labels, outfile, *, label_dim=0, steps=1500, batch=256, lr=1e-3, ema_halflife_steps=100,
              model_kwargs=None, seed=0, device='cpu', dataset_kwargs=None, progress=True, log=print):
    """Train EDMPrecond(SongUNet) on uint8 images [N,C,H,W]; returns the EMA network (also pickled to outfile)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    n, c, h, _ = images_u8.shape
    mk = dict(model_type='SongUNet', model_channels=32, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[h // 2], dropout=0.1)
    mk.update(model_kwargs or {})
    net = networks.EDMPrecond(img_resolution=h, img_channels=c, label_dim=label_dim, **mk).train().to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    x_all = (images_u8.to(torch.float32) / 127.5 - 1).to(device)
    y_all = None if not label_dim else torch.eye(label_dim, device=device)[labels.to(device)]
    gen = torch.Generator().manual_seed(seed)
    beta = 0.5 ** (1 / max(ema_halflife_steps, 1e-8))
    t0 = time.time()
    bar = tqdm.tqdm(range(steps), desc='train EDM', disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(n, (batch,), generator=gen).to(device)
        loss = loss_fn(net, x_all[idx], None if y_all is None else y_all[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = lr * min(step / max(steps * 0.05, 1), 1)  # short warm-up
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    bar.close()
    log(f'EDM training: {steps} steps in {time.time() - t0:.0f}s')
    ema = ema.cpu()
    save_snapshot(outfile, ema, loss_fn, dataset_kwargs or {})
    return ema
