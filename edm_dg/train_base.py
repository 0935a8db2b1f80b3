"""This project's small base-model trainers: EDMPrecond(SongUNet) with EDMLoss, and EDM2's Precond
with EDM2's loss, each with Adam and an EMA copy.

They exist for the self-contained demo, the latent toy and the benchmarks, on a
CPU or one GPU; real models come from NVlabs' EDM `train.py` and EDM2
`train_edm2.py`. Snapshots have EDM's layout (`{ema, loss_fn, augment_pipe,
dataset_kwargs}`; docs/compat.md §1) or EDM2's (`{ema, encoder, loss_fn, dataset_kwargs}`;
§10), networks pickled by `torch_utils.persistence`, so they load in EDM's or
EDM2's generators as well as here.
"""

import copy
import pickle
import time

import torch
import tqdm

import dnnlib
from training import networks, networks_edm2
from training.loss import EDMLoss
from .fileio import atomic_open

def save_snapshot(path, ema, loss_fn, dataset_kwargs):
    """Write an EDM network pickle atomically (no half-written file on interruption)."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=None, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    with atomic_open(path) as f:
        pickle.dump(data, f)

def fit(net, loss_fn, x_all, y_all, *, steps, batch, lr, betas, ema_halflife_steps, seed, desc, progress=True, log=print,
        finite_grads=False):
    """Adam on `loss_fn(net, x, labels)` over random batches of x_all, the learning rate warmed up linearly over
    the first 5% of the steps; returns an EMA copy of the given half-life (eval mode, frozen).
    finite_grads: zero non-finite gradient values first, as EDM2 does."""
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=betas, eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    ema_beta = 0.5 ** (1 / max(ema_halflife_steps, 1e-8))
    warmup = max(steps * 0.05, 1)
    start = time.time()
    bar = tqdm.tqdm(range(steps), desc=f'train {desc}', disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(x_all), (batch,), generator=gen).to(x_all.device)
        loss = loss_fn(net, x_all[idx], None if y_all is None else y_all[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if finite_grads:
            for p in net.parameters():
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        for group in opt.param_groups:
            group['lr'] = lr * min(step / warmup, 1)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.copy_(p.detach().lerp(p_ema, ema_beta))
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    bar.close()
    log(f'{desc} training: {steps} steps in {time.time() - start:.0f}s')
    return ema

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
    loss_fn = EDMLoss()
    x_all = (images_u8.to(torch.float32) / 127.5 - 1).to(device)
    y_all = torch.eye(label_dim, device=device)[labels.to(device)] if label_dim else None
    ema = fit(net, loss_fn, x_all, y_all, steps=steps, batch=batch, lr=lr, betas=(0.9, 0.999),
              ema_halflife_steps=ema_halflife_steps, seed=seed, desc='EDM', progress=progress, log=log)
    ema = ema.cpu()
    save_snapshot(outfile, ema, loss_fn, dataset_kwargs or {})
    return ema

#----------------------------------------------------------------------------
# EDM2 (Karras et al., 2024).

def edm2_loss(net, y, labels=None, P_mean=-0.4, P_std=1.0):
    """EDM2's per-element loss: ln(sigma) ~ N(P_mean, P_std^2), EDM's weight
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, divided by the learned exp(u(sigma)), plus u(sigma)."""
    sigma = (torch.randn([y.shape[0], 1, 1, 1], device=y.device) * P_std + P_mean).exp()
    weight = (sigma ** 2 + net.sigma_data ** 2) / (sigma * net.sigma_data) ** 2
    D, logvar = net(y + torch.randn_like(y) * sigma, sigma, labels, return_logvar=True)
    return weight / logvar.exp() * (D - y) ** 2 + logvar

def save_edm2_snapshot(path, ema, encoder, dataset_kwargs):
    """Write an EDM2 network pickle atomically: EDM2's keys, the training-only `loss_fn` None (EDM2's
    class is not this project's)."""
    data = dnnlib.EasyDict(ema=ema, encoder=encoder, loss_fn=None, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    with atomic_open(path) as f:
        pickle.dump(data, f)

def train_edm2(latents, labels, outfile, *, encoder, label_dim=0, steps=1000, batch=256, lr=1e-2,
               ema_halflife_steps=100, model_kwargs=None, seed=0, device='cpu', dataset_kwargs=None, progress=True,
               log=print):
    """Train EDM2's Precond on final latents float32 [N,C,H,W] (std about sigma_data = 0.5; labels:
    class indices, used when label_dim > 0); `encoder` maps them to pixels and goes into the snapshot.

    A toy version of EDM2's training: Adam (EDM2's betas) with a linear warm-up and a
    plain EMA of the given half-life, where EDM2 decays the learning rate as
    1/sqrt(t) and reconstructs EMAs post hoc; non-finite gradients are zeroed as EDM2
    does. Returns the EMA network as written to `outfile` (float16 weights, eval mode).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    n, c, h, _ = latents.shape
    kwargs = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    kwargs.update(model_kwargs or {})
    net = networks_edm2.Precond(img_resolution=h, img_channels=c, label_dim=label_dim, **kwargs).train().to(device)
    y_all = latents.to(device, torch.float32)
    labels_all = torch.eye(label_dim, device=device)[labels.to(device)] if label_dim else None
    ema = fit(net, edm2_loss, y_all, labels_all, steps=steps, batch=batch, lr=lr, betas=(0.9, 0.99),
              ema_halflife_steps=ema_halflife_steps, seed=seed, desc='EDM2', progress=progress, log=log, finite_grads=True)
    ema = ema.cpu().to(torch.float16)
    save_edm2_snapshot(outfile, ema, encoder, dataset_kwargs or {})
    return ema
