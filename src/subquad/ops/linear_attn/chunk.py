"""Chunked linear attention.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Causal linear attention is simple GLA with no decay, so the causal form is the scalar-decay
chunk kernel of ``ops/simple_gla/chunk.py`` with ``g = None`` (no decay factors computed).
The non-causal form needs no chunks: ``S = S_0 + K^T V`` is one matmul per head and
``o = scale * Q S`` another.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops.simple_gla.chunk import chunk_scalar_decay


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if causal:
        return chunk_scalar_decay(q, k, v, None, None, scale, initial_state, output_final_state, chunk_size)
    cd = state_dtype(q.dtype)
    qh, kh, vh = (x.to(cd).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    S = torch.matmul(kh.transpose(-1, -2), vh)  # [B, H, K, V]
    if initial_state is not None:
        S = S + initial_state.to(cd)
    o = (scale * torch.matmul(qh, S)).transpose(1, 2).to(q.dtype)
    return o.contiguous(), (S if output_final_state else None)
