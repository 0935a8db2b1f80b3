"""Denoiser networks of EDM (Karras et al., 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): layers, the DDPM++/NCSN++ and ADM U-Nets, and
the VP, VE, iDDPM and EDM preconditionings.

Class names, constructor arguments and defaults, parameter and buffer names and
shapes, the order of random draws at initialisation and the arithmetic follow
NVlabs' EDM, so state dicts and pickles move between the two code bases in both
directions and give the same numbers (docs/compat.md).

This module's source is stored in every pickle holding one of its objects and is
executed by whoever loads the pickle, NVlabs' EDM included. It therefore imports
only the standard library, torch and `torch_utils.persistence`, and uses no
PyTorch feature newer than what EDM's environment has.
"""

import math

import torch
import torch.nn.functional as F
from torch_utils import persistence

#----------------------------------------------------------------------------
# Small helpers.

def weight_init(shape, mode, fan_in, fan_out):
    """A new random tensor of `shape` for `mode` = xavier|kaiming + _uniform|_normal.

    The target variance is 2 / (fan_in + fan_out) for Xavier (Glorot & Bengio)
    and 1 / fan_in for Kaiming (He et al.); uniform modes scale U(-1, 1), normal
    modes N(0, 1). One torch.rand/torch.randn call per tensor, as in EDM, so a
    seeded construction draws the same numbers.
    """
    rule, _, dist = mode.partition('_')
    fan = {'xavier': (fan_in + fan_out) / 2, 'kaiming': fan_in}.get(rule)
    if fan is None or dist not in ('uniform', 'normal'):
        raise ValueError(f'Invalid init mode "{mode}"')
    if dist == 'normal':
        return math.sqrt(1 / fan) * torch.randn(*shape)
    return math.sqrt(3 / fan) * (torch.rand(*shape) * 2 - 1)

def _as_dtype(tensor, like):
    """`tensor` in the dtype of `like`, None stays None: layers compute in their input's precision."""
    return None if tensor is None else tensor.to(like.dtype)

def _fir_kernel(taps):
    """Separable 2-D FIR kernel [1, 1, n, n] from 1-D taps, normalised to unit DC gain."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    n = f.numel()
    return torch.outer(f, f).div(f.sum().square()).reshape(1, 1, n, n)

def _per_channel(kernel, channels):
    """The [1, 1, n, n] kernel repeated for a depthwise (groups=channels) convolution."""
    return kernel.repeat(channels, 1, 1, 1)

def _fir_up2(x, kernel, padding):
    """2x upsampling: transposed depthwise convolution; gain 4 keeps a constant image constant."""
    c = x.shape[1]
    return F.conv_transpose2d(x, _per_channel(kernel * 4, c), groups=c, stride=2, padding=padding)

def _fir_down2(x, kernel, padding):
    """2x downsampling: FIR low-pass and stride-2 depthwise convolution."""
    c = x.shape[1]
    return F.conv2d(x, _per_channel(kernel, c), groups=c, stride=2, padding=padding)

def _swap_halves(emb):
    """[cos, sin] -> [sin, cos] along channels (the order DDPM++/NCSN++ were trained with)."""
    first, second = emb.chunk(2, dim=1)
    return torch.cat([second, first], dim=1)

def _drop_labels(labels, p, batch_size, training):
    """Classifier-free-guidance label dropout: zero each sample's labels with probability p in training."""
    if not (training and p):
        return labels
    keep = torch.rand([batch_size, 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)

def _role(name):
    """What a U-Net entry does, from its name: '16x16_aux_skip' -> 'aux_skip', '8x8_block1' -> 'block1'."""
    return name.split('_', 1)[1]

def _concat_skip(x, skips, block):
    """Decoder blocks whose input is wider than x take the newest encoder activation as well."""
    if x.shape[1] == block.in_channels:
        return x
    return torch.cat([x, skips.pop()], dim=1)

#----------------------------------------------------------------------------
# Layers.

@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer y = x W^T + b, initialised by `weight_init` times init_weight / init_bias."""

    def __init__(self, in_features, out_features, bias=True,
                 init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(init_weight * weight_init([out_features, in_features], **fans))
        self.bias = torch.nn.Parameter(init_bias * weight_init([out_features], **fans)) if bias else None

    def forward(self, x):
        y = torch.matmul(x, self.weight.to(x.dtype).t())
        return y if self.bias is None else y + self.bias.to(x.dtype)

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2-D convolution with 'same' padding and optional 2x up- or downsampling by a FIR filter.

    kernel=0 gives a resampling-only layer without parameters. The filter is
    [1,1] (box) in DDPM++/ADM and [1,3,3,1] in NCSN++ (Song et al., 2021). With
    fused_resample the resampling and the convolution share one padding, as in
    NCSN++'s residual input branch. The filter is a buffer only when resampling.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        taps = kernel * kernel
        fans = dict(mode=init_mode, fan_in=in_channels * taps, fan_out=out_channels * taps)
        weight = weight_init([out_channels, in_channels, kernel, kernel], **fans) if kernel else None
        self.weight = torch.nn.Parameter(init_weight * weight) if kernel else None
        self.bias = torch.nn.Parameter(init_bias * weight_init([out_channels], **fans)) if kernel and bias else None
        self.register_buffer('resample_filter', _fir_kernel(resample_filter) if (up or down) else None)

    def forward(self, x):
        w = _as_dtype(self.weight, x)
        f = _as_dtype(self.resample_filter, x)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            x = _fir_up2(x, f, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = _fir_down2(x, f, padding=0)
        else:
            if self.up:
                x = _fir_up2(x, f, padding=f_pad)
            if self.down:
                x = _fir_down2(x, f, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with at most num_groups groups of at least min_channels_per_group channels."""

    def __init__(self, num_channels, num_groups=32,
                 min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.eps, self.num_groups = eps, min(num_groups, num_channels // min_channels_per_group)
        self.weight, self.bias = torch.nn.Parameter(torch.ones(num_channels)), torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, _as_dtype(self.weight, x), _as_dtype(self.bias, x), self.eps)

class AttentionOp(torch.autograd.Function):
    """Attention weights softmax_k(q . k / sqrt(C)) for q, k of shape [N, C, L] -> [N, Lq, Lk].

    Logits, softmax and both gradients are computed in float32 whatever the
    input precision (half-precision logits overflow); the weights come back in
    q's dtype. The backward pass applies the softmax Jacobian explicitly,
    dlogits = w * (dw - sum_k(dw * w)).
    """

    @staticmethod
    def forward(ctx, q, k):
        logits = torch.einsum('ncq,nck->nqk', q.to(torch.float32), (k / math.sqrt(k.shape[1])).to(torch.float32))
        weights = logits.softmax(dim=2).to(q.dtype)
        ctx.save_for_backward(q, k, weights)
        return weights

    @staticmethod
    def backward(ctx, grad):
        q, k, weights = ctx.saved_tensors
        root_c = math.sqrt(k.shape[1])
        w32, dw32 = weights.to(torch.float32), grad.to(torch.float32)
        dlogits = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))
        dq = torch.einsum('nck,nqk->ncq', k.to(torch.float32), dlogits).to(q.dtype) / root_c
        dk = torch.einsum('ncq,nqk->nck', q.to(torch.float32), dlogits).to(k.dtype) / root_c
        return dq, dk

#----------------------------------------------------------------------------
# U-Net block and noise embeddings.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual U-Net block shared by DDPM++/NCSN++ and ADM, optionally with self-attention.

    Main path: GroupNorm, SiLU, 3x3 conv (with the block's resampling), then the
    noise embedding enters through `affine` -- as a per-channel shift, or with
    adaptive_scale as scale and shift around the second GroupNorm (ADM's
    scale-shift norm) -- then SiLU, dropout and a 3x3 conv. The shortcut is a
    1x1 conv when the channel count changes or resample_proj is set, a
    parameter-free resampling when only the resolution changes, and identity
    otherwise. The sum, and again the attention output plus its input, are
    multiplied by skip_scale (1/sqrt(2) in DDPM++/NCSN++, 1 in ADM).
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **resample, **init)
        emb_out = out_channels * 2 if adaptive_scale else out_channels
        self.affine = Linear(in_features=emb_channels, out_features=emb_out, **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if up or down or in_channels != out_channels:
            project = resample_proj or in_channels != out_channels
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=1 if project else 0,
                               **resample, **init)

        if self.num_heads:
            qkv_init = init if init_attn is None else init_attn
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        cond = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = cond.chunk(chunks=2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + cond))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        shortcut = x if self.skip is None else self.skip(x)
        x = (h + shortcut) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self._attend(self.qkv(self.norm2(x)))) + x) * self.skip_scale
        return x

    def _attend(self, qkv):
        """Multi-head self-attention over the pixels; qkv [N, 3C, H, W] -> [N, C, H, W]."""
        n, c, h, w = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
        # Channel layout (head, channel, q|k|v): trained qkv weights depend on it.
        q, k, v = qkv.reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        out = torch.einsum('nqk,nck->ncq', AttentionOp.apply(q, k), v)
        return out.reshape(n, c, h, w)

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal noise-level embedding [cos(x f_i), sin(x f_i)], f_i = max_positions^(-i / d)
    with d = num_channels/2 (endpoint=False, ADM) or d = num_channels/2 - 1 (endpoint=True, DDPM++)."""

    def __init__(self, num_channels,
                 max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1 if self.endpoint else half)
        freqs = torch.pow(1 / self.max_positions, exponents)
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)] of the noise level (NCSN++);
    the frequencies are a buffer drawn once from N(0, scale^2)."""

    def __init__(self, num_channels,
                 scale=16):
        super().__init__()
        self.register_buffer('freqs', scale * torch.randn(num_channels // 2))

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)

#----------------------------------------------------------------------------
# U-Nets.

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ (Song et al., 2021, "Score-Based Generative Modeling through SDEs"),
    in EDM's re-implementation.

    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
    resample_filter=[1,1]. NCSN++: 'fourier', 2, 'residual', [1,3,3,1]. The 'skip'
    encoder/decoder types add progressive-growing style image paths. Arguments:
    img_resolution, in_channels, out_channels; label_dim (0 = unconditional);
    augment_dim (0 = no augmentation labels); model_channels (base width);
    channel_mult (per-resolution width multipliers); channel_mult_emb (embedding
    width / model_channels); num_blocks (per resolution); attn_resolutions;
    dropout; label_dropout (for classifier-free guidance).
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=[16], dropout=0.10, label_dropout=0,
                 embedding_type='positional', channel_mult_noise=1, encoder_type='standard',
                 decoder_type='standard', resample_filter=[1, 1]):
        for arg, value, allowed in (('embedding_type', embedding_type, ('positional', 'fourier')),
                                    ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                    ('decoder_type', decoder_type, ('standard', 'skip'))):
            if value not in allowed:
                raise ValueError(f'{arg} must be one of {allowed}, got {value!r}')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        xavier = dict(init_mode='xavier_uniform')
        near_zero = dict(xavier, init_weight=1e-5)  # residual branches start almost switched off
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=xavier, init_zero=near_zero, init_attn=dict(xavier, init_weight=math.sqrt(0.2)))

        # Mapping network: noise level (+ labels) -> embedding.
        if embedding_type == 'fourier':
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        else:
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **xavier) if label_dim else None
        self.map_augment = None
        if augment_dim:  # augmentation labels are added without a bias
            self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **xavier)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **xavier)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **xavier)

        # Encoder. Entries named *_aux_* act on the auxiliary image path, not on the main features.
        self.enc = torch.nn.ModuleDict()
        width = in_channels
        aux_width = in_channels
        for level, mult in enumerate(channel_mult):
            tag = f'{img_resolution >> level}x{img_resolution >> level}'
            if level > 0:
                self.enc[f'{tag}_down'] = UNetBlock(in_channels=width, out_channels=width, down=True, **block)
                if encoder_type == 'skip':
                    self.enc[f'{tag}_aux_down'] = Conv2d(in_channels=aux_width, out_channels=aux_width, kernel=0,
                                                         down=True, resample_filter=resample_filter)
                    self.enc[f'{tag}_aux_skip'] = Conv2d(in_channels=aux_width, out_channels=width, kernel=1, **xavier)
                elif encoder_type == 'residual':
                    self.enc[f'{tag}_aux_residual'] = Conv2d(in_channels=aux_width, out_channels=width, kernel=3, down=True,
                                                             resample_filter=resample_filter, fused_resample=True, **xavier)
                    aux_width = width
            else:
                self.enc[f'{tag}_conv'] = Conv2d(in_channels=width, out_channels=model_channels, kernel=3, **xavier)
                width = model_channels
            has_attn = (img_resolution >> level) in attn_resolutions
            for idx in range(num_blocks):
                self.enc[f'{tag}_block{idx}'] = UNetBlock(in_channels=width, out_channels=model_channels * mult,
                                                          attention=has_attn, **block)
                width = model_channels * mult
        skip_widths = [m.out_channels for name, m in self.enc.items() if not _role(name).startswith('aux')]

        # Decoder; the output is the sum of the *_aux_conv heads (one, at full resolution, unless decoder 'skip').
        self.dec = torch.nn.ModuleDict()
        lowest = len(channel_mult) - 1
        for level in range(lowest, -1, -1):
            res = img_resolution >> level
            tag = f'{res}x{res}'
            if level < lowest:
                self.dec[f'{tag}_up'] = UNetBlock(in_channels=width, out_channels=width, up=True, **block)
            else:
                self.dec[f'{tag}_in0'] = UNetBlock(in_channels=width, out_channels=width, attention=True, **block)
                self.dec[f'{tag}_in1'] = UNetBlock(in_channels=width, out_channels=width, **block)
            for idx in range(num_blocks + 1):
                wide = width + skip_widths.pop()
                width = model_channels * channel_mult[level]
                self.dec[f'{tag}_block{idx}'] = UNetBlock(in_channels=wide, out_channels=width,
                                                          attention=(idx == num_blocks and res in attn_resolutions), **block)
            if level == 0 or decoder_type == 'skip':
                if decoder_type == 'skip' and level < lowest:
                    self.dec[f'{tag}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0,
                                                       up=True, resample_filter=resample_filter)
                self.dec[f'{tag}_aux_norm'] = GroupNorm(num_channels=width, eps=1e-6)
                self.dec[f'{tag}_aux_conv'] = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **near_zero)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch_size):
        emb = _swap_halves(self.map_noise(noise_labels))
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, batch_size, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])

        skips, aux = [], x
        for name, layer in self.enc.items():
            role = _role(name)
            if role == 'aux_down':
                aux = layer(aux)
            elif role == 'aux_skip':
                x = x + layer(aux)
                skips[-1] = x
            elif role == 'aux_residual':
                x = (x + layer(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)

        out, head = None, None
        for name, layer in self.dec.items():
            role = _role(name)
            if role == 'aux_up':
                out = layer(out)
            elif role == 'aux_norm':
                head = layer(x)
            elif role == 'aux_conv':
                head = layer(F.silu(head))
                out = head if out is None else head + out
            else:
                x = layer(_concat_skip(x, skips, layer), emb)
        return out

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol, 2021, "Diffusion Models Beat GANs on Image Synthesis"), in EDM's
    re-implementation: scale-shift norm, 64-channel attention heads, Kaiming-uniform init.
    Arguments as for SongUNet (without the DDPM++/NCSN++ switches)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        kaiming = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)  # still draws, keeping the RNG order
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=kaiming, init_zero=zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **kaiming)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **kaiming)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                    init_mode='kaiming_normal', init_weight=math.sqrt(label_dim))

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        width = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=width, out_channels=width, down=True, **block)
            else:
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=width, out_channels=model_channels * mult, kernel=3, **kaiming)
                width = model_channels * mult
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=width, out_channels=model_channels * mult,
                                                                attention=res in attn_resolutions, **block)
                width = model_channels * mult
        skip_widths = [m.out_channels for m in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        lowest = len(channel_mult) - 1
        for level in range(lowest, -1, -1):
            res = img_resolution >> level
            if level < lowest:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=width, out_channels=width, up=True, **block)
            else:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=width, out_channels=width, attention=True, **block)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=width, out_channels=width, **block)
            for idx in range(num_blocks + 1):
                wide = width + skip_widths.pop()
                width = model_channels * channel_mult[level]
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=wide, out_channels=width,
                                                                attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(num_channels=width)
        self.out_conv = Conv2d(in_channels=width, out_channels=out_channels, kernel=3, **zero)

    def _embedding(self, noise_labels, class_labels, augment_labels, batch_size):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, batch_size, self.training))
        return F.silu(emb)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        for layer in self.enc.values():
            x = layer(x, emb) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        for layer in self.dec.values():
            x = layer(_concat_skip(x, skips, layer), emb)
        return self.out_conv(F.silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditionings: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM, Table 1).

def _vp_sigma(t, beta_d, beta_min):
    """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).

    Deliberately exp() - 1 rather than expm1(): EDM's sigma_min is the float32
    value of this expression (0.0009765625 for the defaults), see docs/compat.md.
    """
    return (0.5 * beta_d * (t ** 2) + beta_min * t).exp().sub(1).sqrt()

def _vp_sigma_inv(sigma, beta_d, beta_min):
    """Inverse of `_vp_sigma` (the positive root of the quadratic in t)."""
    return ((beta_min ** 2 + 2 * beta_d * (1 + sigma ** 2).log()).sqrt() - beta_min) / beta_d

def _iddpm_alpha_bar(j, M, C_2):
    """Cosine schedule of iDDPM, alpha_bar(j) = sin(pi/2 * j / M / (1 + C_2))^2."""
    return (0.5 * math.pi * j / M / (C_2 + 1)).sin() ** 2

class _Preconditioned(torch.nn.Module):
    """What the four preconditionings share: attributes, backbone and the denoiser formula.

    Subclasses set `_out_channels_per_image` and implement `_coefficients(sigma)`.
    The backbone runs in float16 only for use_fp16 on CUDA without force_fp32;
    inputs, coefficients and the result are float32 (docs/compat.md).
    """

    _out_channels_per_image = 1

    def _attach(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        backbone = globals()[model_type]
        self.model = backbone(img_resolution=img_resolution, in_channels=img_channels,
                              out_channels=img_channels * self._out_channels_per_image, label_dim=label_dim, **model_kwargs)

    def _labels(self, class_labels, device):
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        """Denoised images (float32) for noisy x at noise levels sigma (one per image, or one for all);
        class_labels are one-hot [N, label_dim]; model_kwargs (augment_labels) go to the backbone."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        class_labels = self._labels(class_labels, x.device)
        half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if half else torch.float32

        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        F_x = F_x[:, :self.img_channels]  # iDDPM's backbone also predicts variances; they are not used
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Noise levels the network accepts: any (the discrete iDDPM overrides this)."""
        return torch.as_tensor(sigma)

@persistence.persistent_class
class VPPrecond(_Preconditioned):
    """Variance preserving formulation (Song et al., 2021, VP SDE) as in EDM's "VP" baseline.

    t in [epsilon_t, 1] with sigma(t) from beta_d and beta_min; the network gets
    (M - 1) t as its noise label and predicts the noise, negated (c_out = -sigma).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        # Float32 on the CPU as in EDM, also when the network is built on another (e.g. meta) device.
        self.sigma_min = float(_vp_sigma(torch.tensor(epsilon_t, device='cpu'), beta_d, beta_min))
        self.sigma_max = float(_vp_sigma(torch.tensor(1, device='cpu'), beta_d, beta_min))
        self._attach(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def _coefficients(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        return 1, -sigma, c_in, (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        """Noise level at VP time t."""
        return _vp_sigma(torch.as_tensor(t), self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        """VP time of noise level sigma."""
        return _vp_sigma_inv(torch.as_tensor(sigma), self.beta_d, self.beta_min)

    def sigma_deriv(self, t):
        """d sigma / dt = (beta_min + beta_d t) (sigma + 1 / sigma) / 2."""
        t = torch.as_tensor(t)
        s = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (s + 1 / s)

@persistence.persistent_class
class VEPrecond(_Preconditioned):
    """Variance exploding formulation (Song et al., 2021, VE SDE / NCSN) as in EDM's "VE" baseline:
    the network sees x unscaled and log(sigma / 2), and predicts noise scaled by sigma."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type='SongUNet', **model_kwargs):
        super().__init__()
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self._attach(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def _coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

@persistence.persistent_class
class iDDPMPrecond(_Preconditioned):
    """Improved DDPM (Nichol & Dhariwal, 2021) in EDM's formulation: a cosine schedule with M steps,
    evaluated only at its discrete noise levels `u` (the buffer), with the step index as noise label.
    The backbone has 2 x img_channels outputs (mean and variance); only the first half is used.
    """

    _out_channels_per_image = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self.C_1, self.C_2, self.M = C_1, C_2, M
        self._attach(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        u = self._noise_levels()
        self.register_buffer('u', u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def _noise_levels(self):
        """u_0 > ... > u_M = 0 by u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1).

        One element at a time in float32 on the CPU, as EDM evaluates it, so the
        table (and sigma_min/sigma_max) agree with EDM's to the last bit.
        """
        abar = [_iddpm_alpha_bar(torch.tensor(j, device='cpu'), self.M, self.C_2) for j in range(self.M + 1)]
        levels = [torch.zeros([], device='cpu')]
        for j in range(self.M, 0, -1):
            ratio = (abar[j - 1] / abar[j]).clamp(min=self.C_1)
            levels.append(((levels[-1] ** 2 + 1) / ratio - 1).sqrt())
        return torch.stack(levels[::-1])

    def _coefficients(self, sigma):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        step = self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, c_in, self.M - 1 - step

    def alpha_bar(self, j):
        """Cosine-schedule alpha_bar at step j."""
        return _iddpm_alpha_bar(torch.as_tensor(j), self.M, self.C_2)

    def round_sigma(self, sigma, return_index=False):
        """Nearest table entry u_j to each sigma (or the index j), in sigma's shape, dtype and device."""
        sigma = torch.as_tensor(sigma)
        points = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(points, self.u.reshape(1, -1, 1)).argmin(2).reshape(sigma.shape)
        result = index if return_index else self.u[index].to(sigma.dtype)
        return result.to(sigma.device)

@persistence.persistent_class
class EDMPrecond(_Preconditioned):
    """EDM's own preconditioning (Karras et al., 2022, Table 1): unit-variance network input and
    training target for data of standard deviation sigma_data, noise label log(sigma) / 4."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float('inf'),
                 sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self._attach(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)

    def _coefficients(self, sigma):
        sd = self.sigma_data
        total = sigma ** 2 + sd ** 2
        return sd ** 2 / total, sigma * sd / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4
