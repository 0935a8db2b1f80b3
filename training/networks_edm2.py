"""EDM2's magnitude-preserving denoiser (Karras et al., 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", Sections 3-5 and Appendix B): the MP functions,
MPFourier, MPConv, Block, UNet and Precond with its uncertainty output.

Class names, constructor arguments and defaults, parameter and buffer names and
shapes, the order of random draws at initialisation and the arithmetic follow
NVlabs' EDM2 (module `training.networks_edm2`), so state dicts and pickles move
between the two code bases in both directions and give the same numbers
(docs/compat.md, "EDM2 networks and pickles").

This module's source travels in every pickle holding one of its objects and is
executed by whoever loads the pickle, NVlabs' EDM2 included: it imports only the
standard library, numpy, torch and `torch_utils.persistence`.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch_utils import persistence

#----------------------------------------------------------------------------
# Magnitude-preserving functions (the paper's equations are cited by number).

def normalize(x, dim=None, eps=1e-4):
    """x scaled to unit RMS over `dim` (default: all but the first): x / (eps + ||x|| / sqrt(n)).

    The norm is taken in float32 whatever x's precision.
    """
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    rms = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / rms.to(x.dtype)

_filters = {}

def _resample_kernel(taps, like):
    """The separable FIR filter outer(f, f) / sum(f)^2 as [1, 1, n, n], in like's dtype and device (cached)."""
    key = (tuple(taps), like.dtype, like.device)
    kernel = _filters.get(key)
    if kernel is None:
        f = np.asarray(taps, dtype=np.float32)
        if f.ndim != 1 or len(f) % 2:
            raise ValueError(f'resample filter must be a 1-D list of even length, got {taps!r}')
        f = f / f.sum()
        kernel = torch.as_tensor(np.outer(f, f)[None, None], dtype=like.dtype, device=like.device)
        _filters[key] = kernel
    return kernel

def resample(x, f=[1, 1], mode='keep'):
    """2x down- ('down') or upsampling ('up') of each channel by the FIR filter f, or x itself ('keep')."""
    if mode == 'keep':
        return x
    if mode not in ('down', 'up'):
        raise ValueError(f'resample mode must be "keep", "down" or "up", got {mode!r}')
    kernel = _resample_kernel(f, x)
    channels, pad = x.shape[1], (len(f) - 1) // 2
    if mode == 'down':
        return F.conv2d(x, kernel.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    # Gain 4: each input pixel spreads over four outputs.
    return F.conv_transpose2d(x, (kernel * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))

def mp_silu(x):
    """SiLU divided by its output RMS for unit-normal input, 0.596 (Eq. 81)."""
    return F.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """(1 - t) a + t b, rescaled to unit magnitude for independent unit inputs (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation along dim with a balance t between the parts, magnitude preserving (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    total = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (total * (1 - t) / math.sqrt(n_a)), b * (total * t / math.sqrt(n_b))], dim=dim)

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f x + p)) of a scalar per sample, unit RMS (Eq. 75).

    `freqs` (2 pi N(0, bandwidth^2)) and `phases` (2 pi U(0, 1)) are fixed buffers,
    drawn in that order.
    """

    def __init__(self, num_channels, bandwidth=1):
        freqs = 2 * np.pi * torch.randn(num_channels) * bandwidth
        phases = 2 * np.pi * torch.rand(num_channels)
        super().__init__()
        self.register_buffer('freqs', freqs)
        self.register_buffer('phases', phases)

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angles.cos() * math.sqrt(2)).to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (kernel [kh, kw]) or fully connected layer (kernel []) (Eq. 47).

    The weight is used normalised per output channel and scaled by gain / sqrt(fan_in);
    in training mode the stored weight is also overwritten by its normalised value
    before use (forced weight normalisation, Eq. 66).
    """

    def __init__(self, in_channels, out_channels, kernel):
        shape = [out_channels, in_channels, *kernel]
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(shape))

    def forward(self, x, gain=1):
        stored = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(stored))
        fan_in = stored[0].numel()
        w = (normalize(stored) * (gain / math.sqrt(fan_in))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        if w.ndim != 4:
            raise ValueError(f'MPConv weight must be 2-D or 4-D, got shape {list(w.shape)}')
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

#----------------------------------------------------------------------------
# U-Net block (the paper's Figure 21).

@persistence.persistent_class
class Block(torch.nn.Module):
    """Encoder ('enc') or decoder ('dec') block: residual branch modulated by the embedding,
    optional self-attention, all sums magnitude preserving.

    Encoder blocks resample, project the channels (1x1 `conv_skip`) and pixel-normalise
    before the residual branch; decoder blocks project afterwards, on the skip path.
    res_balance / attn_balance weight the residual / attention branch in mp_sum;
    outputs are clipped to +-clip_act (None: no clipping).
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=[1, 1], attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'Block flavor must be "enc" or "dec", got {flavor!r}')
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_filter, self.resample_mode = resample_filter, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.clip_act = dropout, clip_act
        self.res_balance, self.attn_balance = res_balance, attn_balance
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        res0_in = out_channels if flavor == 'enc' else in_channels
        self.conv_res0 = MPConv(res0_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = None if in_channels == out_channels else MPConv(in_channels, out_channels, kernel=[1, 1])
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == 'enc':
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)  # pixel norm

        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        h = self.conv_res0(mp_silu(x))
        h = mp_silu(h * scale[:, :, None, None].to(h.dtype))
        if self.training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        h = self.conv_res1(h)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, h, t=self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attn_proj(self._attend(self.attn_qkv(x))), t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attend(self, qkv):
        """Self-attention of pixel-normalised q, k, v; qkv [N, 3C, H, W] -> [N, C, H, W]."""
        n, _, h, w = qkv.shape
        # Channel layout (head, channel, q|k|v): trained qkv weights depend on it.
        q, k, v = normalize(qkv.reshape(n, self.num_heads, -1, 3, h * w), dim=2).unbind(3)
        weights = torch.einsum('nhcq,nhck->nhqk', q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        return torch.einsum('nhqk,nhck->nhcq', weights, v).reshape(n, -1, h, w)

#----------------------------------------------------------------------------
# The U-Net (Figure 21).

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2's U-Net: per resolution num_blocks encoder blocks (after a 'down' block below the top),
    two decoder blocks at the bottom ('in0' with attention, 'in1'), and per resolution an
    'up' block (below the bottom) and num_blocks + 1 decoder blocks fed the encoder's
    outputs by mp_cat.

    The input gets a constant channel of ones. The embedding is MPFourier of the noise
    label through `emb_noise`, mp_sum-ed with the class embedding (label_balance),
    then mp_silu. channel_mult_noise / channel_mult_emb default to channel_mult[0]
    and max(channel_mult). The output layer's gain `out_gain` starts at zero.
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192, channel_mult=[1, 2, 3, 4],
                 channel_mult_noise=None, channel_mult_emb=None, num_blocks=3, attn_resolutions=[16, 8],
                 label_balance=0.5, concat_balance=0.5, **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_channels = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb, kernel=[])
        self.emb_label = MPConv(label_dim, emb, kernel=[]) if label_dim else None

        self.enc = torch.nn.ModuleDict()
        channels = img_channels + 1
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(channels, width, kernel=[3, 3])
                channels = width
            else:
                self.enc[f'{res}x{res}_down'] = Block(channels, channels, emb, flavor='enc', resample_mode='down',
                                                      **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = Block(channels, width, emb, flavor='enc',
                                                            attention=res in attn_resolutions, **block_kwargs)
                channels = width

        self.dec = torch.nn.ModuleDict()
        skip_widths = [block.out_channels for block in self.enc.values()]
        for level in reversed(range(len(widths))):
            width, res = widths[level], img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(channels, channels, emb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(channels, channels, emb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(channels, channels, emb, flavor='dec', resample_mode='up',
                                                    **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{idx}'] = Block(channels + skip_widths.pop(), width, emb, flavor='dec',
                                                            attention=res in attn_resolutions, **block_kwargs)
                channels = width
        self.out_conv = MPConv(channels, img_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = class_labels * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(labels), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith('_conv') else block(x, emb)
            skips.append(x)

        for name, block in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# Preconditioning and the uncertainty estimate.

@persistence.persistent_class
class Precond(torch.nn.Module):
    """EDM's preconditioning around the UNet (Karras et al., 2022, Table 1), float32 in and out,
    with EDM2's learned log-variance u(sigma) (Eq. 21) from MPFourier(c_noise) when asked.

    The UNet runs in float16 on CUDA when use_fp16 is set (unless force_fp32).
    Missing class labels of a conditional network are a zero vector.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def _labels(self, class_labels, device):
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = self._labels(class_labels, x.device)
        half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if half else torch.float32

        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar
