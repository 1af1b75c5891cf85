"""simple_gla: linear attention with a scalar decay per head (RetNet, Lightning Attention, Mamba-2).

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.simple_gla.chunk import chunk_scalar_decay
from subquad.ops.simple_gla.recurrent import recurrent_scalar_decay
from subquad.ops.simple_gla.reference import reference_simple_gla

MODES = ("reference", "chunk", "recurrent")


@autocast_exempt
def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    g_gamma: torch.Tensor | None = None,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention with a scalar log-decay per head and token.

    ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``; ``g_t`` is ``g[b, t, h]``
    (data-dependent, Mamba-2 / SSD) or the constant ``g_gamma[h]`` (RetNet, Lightning Attention).

    Papers: RetNet https://arxiv.org/abs/2307.08621, Lightning Attention-2
    https://arxiv.org/abs/2401.04658, Mamba-2 https://arxiv.org/abs/2405.21060.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` natural-log decay (``<= 0``), or None when ``g_gamma`` is given.
        g_gamma: ``[H]`` constant natural-log decay (``<= 0``); exclusive with ``g``.
        mode: ``"reference"`` (per-step loop, the spec), ``"chunk"`` or ``"recurrent"``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences).
        output_final_state: also return the state after the last token.
        cu_seqlens: int64 ``[N + 1]`` offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form.

    Returns:
        ``(o [B, T, H, V], final_state [N, H, K, V] or None)``; the state is float32 (float64 for
        float64 inputs), the output has the input dtype.
    """
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    if g is None and g_gamma is None:
        raise ValueError(
            "simple_gla needs a decay: pass g [B, T, H] or g_gamma [H] (use linear_attn for none)"
        )
    if g is not None and g_gamma is not None:
        raise ValueError("pass either g [B, T, H] or g_gamma [H] to simple_gla, not both")
    if g is not None:
        val.check_tensor("g", g, 3, "[B, T, H]")
        val.check_same_dtype_device({"q": q, "g": g})
        val.check_shape("g", g, (B, T, H), "[B, T, H]")
        val.check_log_gate("g", g)
    else:
        val.check_tensor("g_gamma", g_gamma, 1, "[H]")
        val.check_shape("g_gamma", g_gamma, (H,), "[H]")
        if g_gamma.device != q.device:
            raise ValueError(f"g_gamma is on {g_gamma.device} but q is on {q.device}; they must match")
        val.check_log_gate("g_gamma", g_gamma)
        g_gamma = g_gamma.to(state_dtype(q.dtype))
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V]", q.device)

    if mode == "reference":
        return reference_simple_gla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens)
    if cu_seqlens is not None and g_gamma is not None:
        # padded rows must not decay: write the constant decay out per token, padded with zeros
        g, g_gamma = g_gamma.to(q.dtype).expand(B, T, H), None
    common = dict(
        g_gamma=g_gamma, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )
    tensors = dict(q=q, k=k, v=v, g=g)
    if mode == "chunk":
        return run_padded(chunk_scalar_decay, tensors, cu_seqlens, chunk_size=chunk_size, **common)
    return run_padded(recurrent_scalar_decay, tensors, cu_seqlens, **common)
