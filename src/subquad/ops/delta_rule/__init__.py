"""delta_rule and gated_delta_rule: DeltaNet and Gated DeltaNet.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import records_grad
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.delta_rule.chunk import chunk_delta_rule
from subquad.ops.delta_rule.recurrent import recurrent_delta_rule
from subquad.ops.delta_rule.reference import reference_delta_rule

MODES = ("reference", "chunk", "recurrent")

# The chunk size when none is given. Without autograd 16 measured fastest: the batched
# triangular inversions cost C^2 per token while the sequential pass costs the same per token at
# any C (B=1, H=8, K=V=64, T 4K: 21 / 24 / 39 ms at C = 16 / 32 / 64; T 16K: 96 / 125 / 171 ms).
# Under autograd the pass's per-chunk steps are also recorded and replayed, and 32 measured faster
# (T 4K forward+backward: 117 vs 135 ms delta_rule, 147 vs 168 ms gated).
CHUNK_SIZE_FORWARD = 16
CHUNK_SIZE_AUTOGRAD = 32


def default_chunk_size(*tensors: torch.Tensor | None) -> int:
    """The chunk size used when the caller passes none: 32 if autograd will record the call
    (gradients enabled and an input requires them), else 16."""
    grad = records_grad(*tensors)
    return CHUNK_SIZE_AUTOGRAD if grad else CHUNK_SIZE_FORWARD


def _run(q, k, v, g, beta, *, mode, scale, initial_state, output_final_state, cu_seqlens, chunk_size, l2norm):
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    if chunk_size is not None:
        val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    val.check_tensor("beta", beta, 3, "[B, T, H]")
    val.check_same_dtype_device({"q": q, "beta": beta})
    val.check_shape("beta", beta, (B, T, H), "[B, T, H]")
    if beta.numel():
        low, high = float(beta.detach().min()), float(beta.detach().max())
        if low < 0 or high > 2:
            raise ValueError(
                f"beta must lie in [0, 2] (above 1: negative eigenvalues; above 2 the state grows), "
                f"got values in [{low:.4g}, {high:.4g}]"
            )
    if g is not None:
        val.check_tensor("g", g, 3, "[B, T, H]")
        val.check_same_dtype_device({"q": q, "g": g})
        val.check_shape("g", g, (B, T, H), "[B, T, H]")
        val.check_log_gate("g", g)
    if not isinstance(l2norm, bool):
        raise TypeError(f"use_qk_l2norm_in_kernel must be a bool, got {type(l2norm).__name__}")
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V]", q.device)
    if chunk_size is None:
        chunk_size = default_chunk_size(q, k, v, g, beta, initial_state)
    if l2norm:
        # unit keys make (I - beta k k^T) a reflection-like map with eigenvalues in [-1, 1]
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if mode == "reference":
        return reference_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    common = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta)
    if mode == "chunk":
        return run_padded(chunk_delta_rule, tensors, cu_seqlens, chunk_size=chunk_size, **common)
    return run_padded(recurrent_delta_rule, tensors, cu_seqlens, **common)


@autocast_exempt
def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DeltaNet (Yang et al. 2024, https://arxiv.org/abs/2406.06484).

    ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
        q, k: ``[B, T, H, K]`` (keys should be unit-norm, or pass ``use_qk_l2norm_in_kernel=True``).
        v: ``[B, T, H, V]``.
        beta: ``[B, T, H]`` write strength in [0, 2]; above 1 the transition has the negative
            eigenvalue ``1 - beta`` along k (state tracking, https://arxiv.org/abs/2411.12537).
        mode: ``"reference"``, ``"chunk"`` (WY / UT transform) or ``"recurrent"``.
        scale, initial_state ``[N, H, K, V]``, output_final_state, cu_seqlens: as every op.
        chunk_size: tokens per chunk; None picks 16 for a forward without autograd and 32 when
            autograd records the call (the faster of each, measured; see ``default_chunk_size``).
        use_qk_l2norm_in_kernel: L2-normalize q and k inside the op (differentiably).

    Returns:
        ``(o [B, T, H, V], final_state [N, H, K, V] or None)``.
    """
    return _run(
        q, k, v, None, beta, mode=mode, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        l2norm=use_qk_l2norm_in_kernel,
    )  # fmt: skip


@autocast_exempt
def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, https://arxiv.org/abs/2412.06464).

    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, ``o_t = scale * S_t^T q_t``,
    with ``g [B, T, H]`` a natural-log decay (<= 0). Other arguments as :func:`delta_rule`.
    """
    if g is None:
        raise ValueError("gated_delta_rule needs g [B, T, H]; use delta_rule for no decay")
    return _run(
        q, k, v, g, beta, mode=mode, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        l2norm=use_qk_l2norm_in_kernel,
    )  # fmt: skip
