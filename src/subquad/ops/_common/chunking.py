"""Helpers shared by the chunked forms.

Shape legend: B batch, T time, H heads, D head dim, C chunk, n chunks, L segment length.

The chunked forms walk the sequence in *segments* of a few chunks: all chunks of a segment are
handled by batched matmuls, and the state is carried from one segment to the next. A segment's
working set is sized to stay in the per-core caches (about 512 KiB per input tensor); processing
the whole sequence at once instead allocates tensors of hundreds of MB whose first touch
(page faults) and cache misses made per-token time grow with T. See ``ops/simple_gla/README.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# elements of one input tensor per segment: 2**17 float32 = 512 KiB
SEGMENT_ELEMENTS = 1 << 17

# Largest log-decay (nats) within one chunk for which float32 cumulative sums and factored
# exponentials are used. Past it, cumulative log-decays reach magnitudes where float32 loses the
# small differences between nearby tokens (and exp(-b) would overflow), so exponents are formed
# in float64 / by secondary chunking instead.
SAFE_SPAN = 60.0


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and internal compute dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_length(batch_heads: int, head_dim: int, chunk_size: int) -> int:
    """Tokens per segment: a multiple of ``chunk_size`` with about SEGMENT_ELEMENTS per tensor."""
    chunks = max(1, SEGMENT_ELEMENTS // max(1, batch_heads * head_dim * chunk_size))
    return chunks * chunk_size


def pad_time(x: torch.Tensor, multiple: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad dimension ``dim`` (time) up to a multiple of ``multiple``."""
    T = x.shape[dim]
    extra = (-T) % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L, H, *D]`` time-major slice -> contiguous ``[B, H, n, C, *D]`` in ``dtype`` (one copy)."""
    B, L, H = x.shape[:3]
    perm = (0, 2, 1, *range(3, x.dim()))
    xp = x.permute(perm)
    out = torch.empty(xp.shape, dtype=dtype, device=x.device).copy_(xp)
    return out.view(B, H, L // chunk_size, chunk_size, *x.shape[3:])


def causal_mask(chunk_size: int, device: torch.device, strict: bool = False) -> torch.Tensor:
    """``[C, C]`` bool, True where key j may be seen by query i (j <= i, or j < i when strict)."""
    return torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril(-1 if strict else 0)
