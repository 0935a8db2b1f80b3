"""ADM's noise-conditional encoder (guided-diffusion `EncoderUNetModel`), written anew.

State dicts use guided-diffusion's names so the DG release's classifier and
discriminator heads load with `strict=True`. Time input is VP time in [0, 1];
it is multiplied by 999 before the sinusoidal embedding (DG convention).
"""

import contextlib
import contextvars
import math

import torch
from torch import nn
from torch.nn import functional as F

#----------------------------------------------------------------------------

def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [cos | sin] as in guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb

class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (guided-diffusion's `normalization`)."""
    def forward(self, x):
        h = x.float() if x.element_size() < 4 else x
        return F.group_norm(h, self.num_groups, self.weight.to(h.dtype), self.bias.to(h.dtype), self.eps).type(x.dtype)

def normalization(channels):
    return GroupNorm32(32, channels)

class TimestepBlock(nn.Module):
    """A module that takes the time embedding as a second input."""

class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x

#----------------------------------------------------------------------------

class ResBlock(TimestepBlock):
    """Residual block with scale-shift time conditioning and optional 2x average-pool downsampling."""

    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=True, down=False, dropout=0.0):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.down = down
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels))
        self.out_layers = nn.Sequential(normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
                                        nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if self.out_channels == channels else nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        if self.down:
            h = self.in_layers[:-1](x)
            h = F.avg_pool2d(h, 2)
            x = F.avg_pool2d(x, 2)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h

_MATH_ATTENTION = contextvars.ContextVar('edm_dg_adm_math_attention', default=False)

@contextlib.contextmanager
def math_attention(enabled=True):
    """Inside this block ADM attention is plain autograd math instead of the fused kernel.

    The fused scaled_dot_product_attention kernels (flash / memory-efficient on
    CUDA, flash on CPU) have no double backward, so anything that differentiates
    a gradient of an ADM network (the NLL's Hutchinson divergence of the DG
    correction, taken with create_graph=True) must run its forward in here. The
    math path computes softmax(q k^T / sqrt(ch)) v in float32 (float64 stays
    float64) from the same strided q/k/v, so it agrees with the fused path to
    float32 rounding; it is slower and materialises the [T, T] weights, so the
    sampler keeps the fused kernel. Per thread / task (a context variable);
    `math_attention(False)` switches back inside an enclosing block.
    """
    token = _MATH_ATTENTION.set(bool(enabled))
    try:
        yield
    finally:
        _MATH_ATTENTION.reset(token)

def math_attention_enabled():
    return _MATH_ATTENTION.get()

def _attention_by_autograd(q, k, v):
    """softmax(q k^T / sqrt(ch)) v on [B, H, T, ch] with ordinary (arbitrarily differentiable) ops."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5
    weights = torch.softmax(torch.matmul(q.to(dtype) * scale, k.to(dtype).transpose(-2, -1)), dim=-1)
    return torch.matmul(weights, v.to(dtype)).to(q.dtype)

def _token_attention(qkv, num_heads, legacy):
    """Multi-head softmax(q k^T / sqrt(ch)) v over tokens (ADM's math; fused kernel unless
    `math_attention()` is active).

    qkv: [B, T, 3 * C] from a token-major projection, its channels ordered
    heads x (q, k, v) x ch when legacy (AttentionBlock) or (q, k, v) x heads x ch
    (AttentionPool2d). Returns [B, T, C]. q, k, v are strided views and the
    kernel writes its output token-major, so the forward makes no layout copies.
    """
    b, length, width = qkv.shape
    ch = width // (3 * num_heads)
    qkv = qkv.view(b, length, num_heads, 3, ch) if legacy else qkv.view(b, length, 3, num_heads, ch).transpose(2, 3)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    attend = _attention_by_autograd if _MATH_ATTENTION.get() else F.scaled_dot_product_attention
    return attend(q, k, v).transpose(1, 2).reshape(b, length, num_heads * ch)

def _pointwise(conv, tokens):
    """A 1x1 Conv1d applied to token-major [B, T, C]: one GEMM (on CPU about twice as fast as
    the 1x1 convolution at T = 1024)."""
    return F.linear(tokens, conv.weight.squeeze(-1), conv.bias)

class AttentionBlock(nn.Module):
    """Spatial self-attention with the legacy (heads-first) qkv layout."""

    def __init__(self, channels, num_head_channels=64):
        super().__init__()
        self.num_heads = max(channels // num_head_channels, 1)
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = _pointwise(self.qkv, self.norm(x).transpose(1, 2))
        h = _pointwise(self.proj_out, _token_attention(qkv, self.num_heads, legacy=True))
        return (x + h.transpose(1, 2)).reshape(b, c, *spatial)

class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (qkv chunked first, then split into heads)."""

    def __init__(self, spacial_dim, embed_dim, num_head_channels, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim ** 2 + 1) / embed_dim ** 0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.num_heads = max(embed_dim // num_head_channels, 1)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        a = _token_attention(_pointwise(self.qkv_proj, x.transpose(1, 2)), self.num_heads, legacy=False)
        return _pointwise(self.c_proj, a[:, 0])  # Only the pooled token is used.

#----------------------------------------------------------------------------

def channel_mult_for(image_size):
    """Channel multipliers by input size (docs/compat.md §4; guided-diffusion plus DG's small sizes)."""
    table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4),
             64: (1, 2, 3, 4), 32: (1, 2, 4), 16: (1, 2), 8: (1,)}
    if image_size not in table:
        raise ValueError(f'unsupported ADM classifier image_size {image_size}; expected one of {sorted(table)}')
    return table[image_size]

class EncoderUNet(nn.Module):
    """Noise-conditional ADM encoder: input blocks, middle block, attention-pool head.

    `features(x, t)` returns the middle-block output (the DG feature extractor);
    `forward(x, t, condition)` returns logits. Constructor arguments are those of
    guided-diffusion's `create_classifier` (see `from_create_classifier_args`).
    """

    def __init__(self, image_size, in_channels=3, model_channels=128, out_channels=1000, num_res_blocks=4,
                 attention_resolutions=(1, 2, 4), channel_mult=None, num_head_channels=64,
                 use_scale_shift_norm=True, resblock_updown=True, pool='attention', condition=False,
                 num_classes=1000, dropout=0.0):
        super().__init__()
        if pool != 'attention':
            raise ValueError(f'only pool="attention" is supported, got {pool!r}')
        if not resblock_updown:
            raise ValueError('only resblock_updown=True is supported')
        channel_mult = channel_mult or channel_mult_for(image_size)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.condition = condition
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if condition:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, int(mult * model_channels), use_scale_shift_norm, dropout=dropout)]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, time_embed_dim, ch, use_scale_shift_norm, down=True, dropout=dropout)))
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, ch, use_scale_shift_norm, dropout=dropout),
            AttentionBlock(ch, num_head_channels),
            ResBlock(ch, time_embed_dim, ch, use_scale_shift_norm, dropout=dropout))
        self.feature_channels = ch
        self.feature_resolution = image_size // ds
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels))

    @classmethod
    def from_create_classifier_args(cls, image_size, classifier_width=128, classifier_depth=4,
                                    classifier_attention_resolutions='32,16,8', classifier_use_scale_shift_norm=True,
                                    classifier_resblock_updown=True, classifier_pool='attention', out_channels=1000,
                                    in_channels=3, condition=False, classifier_use_fp16=False, num_classes=1000):
        """Build from guided-diffusion / DG `create_classifier` keyword arguments."""
        attention_ds = tuple(image_size // int(r) for r in str(classifier_attention_resolutions).split(','))
        return cls(image_size=image_size, in_channels=in_channels, model_channels=classifier_width,
                   out_channels=out_channels, num_res_blocks=classifier_depth, attention_resolutions=attention_ds,
                   use_scale_shift_norm=classifier_use_scale_shift_norm, resblock_updown=classifier_resblock_updown,
                   pool=classifier_pool, condition=condition, num_classes=num_classes)

    def embed(self, t, condition=None):
        emb = self.time_embed(timestep_embedding(t * 999, self.model_channels).to(self.time_embed[0].weight.dtype))
        if self.condition:
            if condition is None:
                raise ValueError('this network is class-conditional: pass class labels')
            if condition.ndim == 2:
                condition = condition.argmax(dim=1)
            emb = emb + self.label_emb(condition.long())
        return emb

    def features(self, x, t, condition=None):
        """Middle-block output at VP time t (shape [N, feature_channels, r, r])."""
        emb = self.embed(t, condition)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        return self.middle_block(h, emb)

    def forward(self, x, t, condition=None):
        emb = self.embed(t, condition)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h.type(x.dtype))
