"""LoRA on the ADM feature extractor (docs/compat.md §6), in loralib's key convention.

Every residual block's first 3x3 convolution (`in_layers[2]`) becomes
`LoRAConv2d`, whose keys are `in_layers.2.conv.weight/bias`, `in_layers.2.lora_A`
`[r*k, C_in*k]` and `in_layers.2.lora_B` `[C_out*k, r*k]`; the effective weight is
`W + (lora_B @ lora_A).view(W.shape) * alpha / r`.
"""

import math

from torch import nn
from torch.nn import functional as F

from .adm import ResBlock

# The reproduction study's alpha (docs/compat.md §6). Its LoRA files do not record alpha,
# so this is what they load with unless the caller says otherwise.
DEFAULT_ALPHA = 1.0

class LoRAConv2d(nn.Module):
    """A frozen Conv2d plus a trainable low-rank weight update."""

    def __init__(self, conv: nn.Conv2d, rank: int, alpha: float = DEFAULT_ALPHA):
        super().__init__()
        if rank <= 0:
            raise ValueError(f'LoRA rank must be positive, got {rank}')
        if not math.isfinite(alpha):
            raise ValueError(f'LoRA alpha must be a finite number, got {alpha}')
        k = conv.kernel_size[0]
        self.conv = conv
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(conv.weight.new_zeros(rank * k, conv.in_channels * k))
        self.lora_B = nn.Parameter(conv.weight.new_zeros(conv.out_channels * k, rank * k))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        conv.weight.requires_grad_(False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)

    def delta_weight(self):
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x):
        w = self.conv.weight + self.delta_weight().to(self.conv.weight.dtype)
        return F.conv2d(x, w, self.conv.bias, self.conv.stride, self.conv.padding)

def resblocks(encoder):
    """The residual blocks LoRA applies to: input blocks (incl. down-sampling) and middle block."""
    return [m for m in list(encoder.input_blocks.modules()) + list(encoder.middle_block.modules()) if isinstance(m, ResBlock)]

def apply_lora(encoder, rank, alpha=DEFAULT_ALPHA):
    """Wrap in_layers[2] of every residual block in place; returns the encoder.

    Convolutions that already carry adapters (e.g. from a study-format file) are left as they are.
    """
    for block in resblocks(encoder):
        if not isinstance(block.in_layers[2], LoRAConv2d):
            block.in_layers[2] = LoRAConv2d(block.in_layers[2], rank, alpha)
    return encoder

def lora_config(encoder):
    """(rank, alpha) of the encoder's adapters, or (0, None) without adapters."""
    convs = [m for m in encoder.modules() if isinstance(m, LoRAConv2d)]
    return (convs[0].rank, convs[0].alpha) if convs else (0, None)

def lora_state_dict(encoder):
    """Only the adapter tensors (what a checkpoint needs besides the classifier's hash)."""
    return {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items() if k.endswith(('lora_A', 'lora_B'))}

def lora_parameters(encoder):
    return [p for n, p in encoder.named_parameters() if n.endswith(('lora_A', 'lora_B'))]

def has_lora_keys(state_dict):
    return any(k.endswith(('.lora_A', '.lora_B')) for k in state_dict)

def is_adapter_only(state_dict):
    """True for a file of adapters alone, as loralib's `lora_state_dict` saves them (the study's lora_adm_*.pt)."""
    return bool(state_dict) and all(k.endswith(('.lora_A', '.lora_B')) for k in state_dict)

def rank_from_state_dict(state_dict):
    """loralib stores lora_A as [r*k, C_in*k] with k = 3 here; every adapter must give the same rank."""
    rows = sorted({v.shape[0] for k, v in state_dict.items() if k.endswith('.lora_A') and v.ndim == 2})
    if len(rows) != 1 or rows[0] == 0 or rows[0] % 3:
        raise ValueError(f'lora_A row counts {rows} do not give one rank (rows = 3 * rank)')
    return rows[0] // 3

def to_plain_state_dict(state_dict):
    """Map loralib conv keys back to guided-diffusion names, dropping the adapters."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(('.lora_A', '.lora_B')):
            continue
        out[k.replace('in_layers.2.conv.', 'in_layers.2.')] = v
    return out
