"""gla: Gated Linear Attention, a vector decay over the key dimension.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.gla.chunk import chunk_gla
from subquad.ops.gla.recurrent import recurrent_gla
from subquad.ops.gla.reference import reference_gla

MODES = ("reference", "chunk", "recurrent")


@autocast_exempt
def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated Linear Attention (Yang et al. 2023, https://arxiv.org/abs/2312.06635).

    ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        g: ``[B, T, H, K]`` natural-log decay per key dimension (``<= 0``; any magnitude is stable).
        mode: ``"reference"`` (per-step loop, the spec), ``"chunk"`` or ``"recurrent"``.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of packed sequences).
        output_final_state: also return the state after the last token.
        cu_seqlens: int64 ``[N + 1]`` offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form.

    Returns:
        ``(o [B, T, H, V], final_state [N, H, K, V] or None)``; state float32 (float64 for float64 inputs).
    """
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    val.check_tensor("g", g, 4, "[B, T, H, K]")
    val.check_same_dtype_device({"q": q, "g": g})
    val.check_shape("g", g, (B, T, H, K), "[B, T, H, K]")
    val.check_log_gate("g", g)
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V]", q.device)

    if mode == "reference":
        return reference_gla(q, k, v, g, scale, initial_state, output_final_state, cu_seqlens)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    tensors = dict(q=q, k=k, v=v, g=g)
    if mode == "chunk":
        return run_padded(chunk_gla, tensors, cu_seqlens, chunk_size=chunk_size, **common)
    return run_padded(recurrent_gla, tensors, cu_seqlens, **common)
