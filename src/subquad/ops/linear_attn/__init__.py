"""linear_attn: causal (or non-causal) linear attention, optionally normalized.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.linear_attn.chunk import chunk_linear_attn
from subquad.ops.linear_attn.reference import reference_linear_attn
from subquad.ops.simple_gla.recurrent import recurrent_scalar_decay

MODES = ("reference", "chunk", "recurrent")


def _recurrent(q, k, v, scale, initial_state, output_final_state):
    return recurrent_scalar_decay(q, k, v, None, None, scale, initial_state, output_final_state)


@autocast_exempt
def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    normalize: bool = False,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Linear attention (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236).

    ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``; with ``normalize=True`` also
    ``z_t = z_{t-1} + k_t`` and ``o_t`` is divided by ``scale * q_t . z_t`` (q and k should then be
    non-negative feature maps, e.g. ELU + 1). With ``causal=False`` every token reads the state
    after the whole sequence.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        mode: ``"reference"``, ``"chunk"`` or ``"recurrent"`` (causal only).
        scale: query scale, default ``K ** -0.5`` (it cancels when normalized).
        initial_state: ``[N, H, K, V]``, or ``[N, H, K, V + 1]`` when normalized (z is the last column).
        output_final_state: also return the state after the last token.
        cu_seqlens: int64 ``[N + 1]`` offsets of packed sequences (then B must be 1).
        chunk_size: chunk length of the chunked form.
        normalize: divide by the normalizer ``scale * q_t . z_t``.
        causal: False for bidirectional (encoder) use.

    Returns:
        ``(o [B, T, H, V], final_state or None)``; state float32 (float64 for float64 inputs).
    """
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not causal and mode == "recurrent":
        raise ValueError(
            "mode='recurrent' is causal by definition; use mode='chunk' or 'reference' with causal=False"
        )
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    state_v = V + 1 if normalize else V
    val.check_initial_state(
        initial_state, (N, H, K, state_v), "[N, H, K, V + 1]" if normalize else "[N, H, K, V]", q.device
    )

    if mode == "reference":
        return reference_linear_attn(
            q, k, v, scale, initial_state, output_final_state, cu_seqlens, normalize, causal
        )
    if normalize:
        # the normalizer is linear attention on a constant value channel: append ones to v
        v = torch.cat([v, v.new_ones(B, T, H, 1)], -1)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if mode == "chunk":
        o, state = run_padded(
            chunk_linear_attn, dict(q=q, k=k, v=v), cu_seqlens, chunk_size=chunk_size, causal=causal, **common
        )
    else:
        o, state = run_padded(_recurrent, dict(q=q, k=k, v=v), cu_seqlens, **common)
    if normalize:
        o = o[..., :V] / o[..., V:]
    return o, state
