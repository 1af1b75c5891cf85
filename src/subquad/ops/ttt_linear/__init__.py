"""ttt_linear: TTT-Linear, a linear model trained at test time by mini-batch gradient descent.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.ttt_linear.chunk import chunk_ttt_linear
from subquad.ops.ttt_linear.recurrent import recurrent_ttt_linear
from subquad.ops.ttt_linear.reference import reference_ttt_linear

MODES = ("reference", "chunk", "recurrent")


def check_mini_batch_size(mini_batch_size: int) -> None:
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int):
        raise TypeError(f"mini_batch_size must be an int, got {type(mini_batch_size).__name__}")
    if mini_batch_size < 1:
        raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")


def check_rate(name: str, x: torch.Tensor, q: torch.Tensor) -> None:
    """A per-token, per-head rate ``[B, T, H]`` that must be >= 0."""
    B, T, H = q.shape[:3]
    val.check_tensor(name, x, 3, "[B, T, H]")
    val.check_same_dtype_device({"q": q, name: x})
    val.check_shape(name, x, (B, T, H), "[B, T, H]")
    if x.numel() and (low := float(x.detach().min())) < 0:
        raise ValueError(f"{name} is a learning rate and must be >= 0, got min {low:.4g}")


@autocast_exempt
def ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    *,
    mini_batch_size: int = 16,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TTT-Linear (Sun et al. 2024, https://arxiv.org/abs/2407.04620), linear inner model.

    The state ``W [K, V]`` is trained on ``l(W; k_t, v_t) = 1/2 ||W^T k_t - v_t||^2`` by one gradient
    step per token, every gradient of a mini-batch taken at the mini-batch's starting weights W0:
    ``W_t = W_{t-1} - eta_t k_t (W0^T k_t - v_t)^T``, ``o_t = scale * W_t^T q_t``. With
    ``mini_batch_size=1`` this is the delta rule with ``beta = eta``.

    Mini-batches are counted from the start of each sequence of the call, and ``final_state`` is
    the weights after the last token (a last, shorter mini-batch is complete there). So carrying the
    state into a next call equals one call only when the split falls on a mini-batch boundary.

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        eta: ``[B, T, H]`` per-token learning rate, ``>= 0``.
        mini_batch_size: tokens per mini-batch (the paper's b, default 16).
        mode: ``"reference"``, ``"chunk"`` (the paper's dual form) or ``"recurrent"``.
        scale, initial_state ``[N, H, K, V]``, output_final_state, cu_seqlens: as every op.
        chunk_size: accepted for the common signature and validated; the dual form's chunk is the
            mini-batch itself, so it does not change anything.

    Returns:
        ``(o [B, T, H, V], final_state [N, H, K, V] or None)``.
    """
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    check_mini_batch_size(mini_batch_size)
    scale = val.resolve_scale(scale, K)
    check_rate("eta", eta, q)
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, H, K, V), "[N, H, K, V]", q.device)
    common = dict(
        mini_batch_size=mini_batch_size, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state,
    )  # fmt: skip
    if mode == "reference":
        return reference_ttt_linear(q, k, v, eta, cu_seqlens=cu_seqlens, **common)
    kernel = chunk_ttt_linear if mode == "chunk" else recurrent_ttt_linear
    return run_padded(kernel, dict(q=q, k=k, v=v, eta=eta), cu_seqlens, **common)
