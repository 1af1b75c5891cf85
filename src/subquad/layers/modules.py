"""Building blocks the mixer layers share: norms, the short causal convolution, token shift and
rotary embeddings, all streaming (they read and write a ``LayerCache``) and packed-sequence aware.

Shape legend: B batch, T time, H heads, D channels, K key dim, V value dim, W conv width,
N sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from subquad.layers.cache import LayerCache


def positions_in_sequence(T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``[T]`` index of each token inside its own sequence (0 at every packed sequence start)."""
    pos = torch.arange(T, device=device)
    if cu_seqlens is None:
        return pos
    starts = cu_seqlens[:-1].to(device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device)
    return pos - torch.repeat_interleave(starts, lengths, output_size=T)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (half and bfloat16 go up; float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def token_positions(
    T: int,
    past: int,
    cu_seqlens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Position of each of a call's T tokens: ``[B, T]`` counted over real tokens when left-padded
    (so a padded row sees the positions of its unpadded sequence), ``[T]`` per packed sequence, or
    ``past .. past + T`` after ``past`` cached tokens."""
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    if cu_seqlens is not None:
        return positions_in_sequence(T, cu_seqlens, device)
    return torch.arange(past, past + T, device=device)


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on for its device (else unchanged), so that the
    projections, the gates computed from ``x`` and every op input share one dtype."""
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        return x.to(torch.get_autocast_dtype(dev))
    return x


def check_layer_call(x: torch.Tensor, hidden_size: int, cache: LayerCache | None, cu_seqlens, attention_mask):
    """Shared argument checks of every mixer's ``forward``."""
    if x.ndim != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"x must be [B, T, {hidden_size}] (hidden_size={hidden_size}), got {tuple(x.shape)}")
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs B == 1 (packed sequences), got x of shape {tuple(x.shape)}")
        if cache is not None:
            raise ValueError("cu_seqlens with a cache is not supported: decode packed sequences as a batch")
        if attention_mask is not None:
            raise ValueError("give either cu_seqlens (packed) or attention_mask (padded), not both")
    if attention_mask is not None and (attention_mask.ndim != 2 or attention_mask.shape[0] != x.shape[0]):
        raise ValueError(
            f"attention_mask must be [B, S] with B={x.shape[0]} and S >= T={x.shape[1]} (1 = token, 0 = "
            f"padding), got {tuple(attention_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.shape[1] < x.shape[1]:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, fewer than T={x.shape[1]}")


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * upcast(self.weight)).to(x.dtype)


class GatedHeadNorm(nn.Module):
    """Per-head RMSNorm of the mixer output, times ``silu(gate)`` when a gate is given (the output
    norm + output gate of GLA, RetNet, Mamba-2 and the delta-rule layers)."""

    def __init__(self, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = RMSNorm(head_dim, eps)

    def forward(self, o: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        # o: [B, T, H, V]; gate: [B, T, H, V] or None
        o = self.norm(o)
        return o if gate is None else o * F.silu(gate)


def _shifted(x: torch.Tensor, s: int, pos: torch.Tensor | None) -> torch.Tensor:
    """``x`` delayed by ``s`` steps along time with zeros coming in (and at packed sequence starts)."""
    if s == 0:
        return x
    out = F.pad(x, (0, 0, s, 0))[:, : x.shape[1]]
    if pos is not None:
        out = out * (pos >= s).to(x.dtype)[None, :, None]
    return out


class ShortConvolution(nn.Module):
    """Causal depthwise convolution over time, ``y_t = act(sum_i w_i * x_{t-W+1+i})``.

    Written as W shifted multiply-adds (W is 2-4), so packed sequences only need a mask and the
    streaming state is the last ``W - 1`` inputs ``[B, W - 1, D]``, kept in ``cache.conv[name]``.
    """

    def __init__(self, dim: int, kernel_size: int = 4, activation: str | None = "silu") -> None:
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be None or 'silu', got {activation!r}")
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(kernel_size, dim))
        nn.init.uniform_(self.weight, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def forward(
        self,
        x: torch.Tensor,
        *,
        cache: LayerCache | None = None,
        name: str = "conv",
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [B, T, D]
        B, T, D = x.shape
        W = self.kernel_size
        prefix = 0
        if cache is not None and W > 1:
            tail = cache.conv.get(name)
            if tail is None:
                tail = x.new_zeros(B, W - 1, D)
            x = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W - 1 + T, D]
            prefix = W - 1
            cache.conv[name] = x[:, -(W - 1) :].detach().clone()
        pos = positions_in_sequence(T, cu_seqlens, x.device) if cu_seqlens is not None else None
        w = self.weight.to(x.dtype)
        y = x * w[W - 1]
        for i in range(W - 1):
            y = y + _shifted(x, W - 1 - i, pos) * w[i]
        y = y[:, prefix:]
        return F.silu(y) if self.activation == "silu" else y


def token_shift(
    x: torch.Tensor, *, cache: LayerCache | None, name: str, cu_seqlens: torch.Tensor | None
) -> torch.Tensor:
    """``x_{t-1}`` for each t (zeros before a sequence starts; the previous call's last token when
    decoding), the token shift of RWKV."""
    B, T, D = x.shape
    if cache is not None:
        prev = cache.conv.get(name)
        prev = x.new_zeros(B, 1, D) if prev is None else prev.to(x.dtype)
        cache.conv[name] = x[:, -1:].detach().clone()
        return torch.cat([prev, x[:, :-1]], dim=1)
    pos = positions_in_sequence(T, cu_seqlens, x.device) if cu_seqlens is not None else None
    return _shifted(x, 1, pos)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, https://arxiv.org/abs/2104.09864), half-split layout."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        # computed per call (D/2 numbers) rather than held in a buffer, so loading never leaves it unset
        self.head_dim, self.base = head_dim, base

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, T, H, D]; positions: [T] or [B, T]
        # angles in float64 for float64 inputs (float32 angles would limit them to ~1e-7)
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        exponents = torch.arange(0, self.head_dim, 2, device=x.device, dtype=dt) / self.head_dim
        inv_freq = 1.0 / (self.base**exponents)
        angles = positions.to(dt)[..., None] * inv_freq  # [(B,) T, D/2]
        if angles.ndim == 2:
            angles = angles[None]
        cos = angles.cos()[:, :, None, :]
        sin = angles.sin()[:, :, None, :]
        x1, x2 = upcast(x).chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
