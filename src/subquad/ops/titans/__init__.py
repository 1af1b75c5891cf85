"""titans: the Titans neural long-term memory, linear memory variant.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import seq_bounds
from subquad.ops.titans.chunk import chunk_titans
from subquad.ops.titans.recurrent import recurrent_titans
from subquad.ops.titans.reference import reference_titans
from subquad.ops.ttt_linear import check_mini_batch_size, check_rate

MODES = ("reference", "chunk", "recurrent")


@autocast_exempt
def titans(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    g: torch.Tensor,
    g_momentum: torch.Tensor,
    *,
    mini_batch_size: int = 16,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Titans linear memory (Behrouz, Zhong, Mirrokni 2024, https://arxiv.org/abs/2501.00663).

    Memory ``M [K, V]`` learns ``l(M; k, v) = 1/2 ||M^T k - v||^2`` with momentum ("surprise") and
    forgetting, gradients of a mini-batch taken at its starting memory ``M0``:
    ``S_t = exp(gm_t) S_{t-1} - theta_t k_t (M0^T k_t - v_t)^T``, ``M_t = exp(g_t) M_{t-1} + S_t``,
    ``o_t = scale * M_t^T q_t``. The paper's ``eta_t = exp(g_momentum_t)`` and ``alpha_t = 1 - exp(g_t)``
    are passed as log-values (<= 0) like every gate of the library.

    Mini-batches are counted from the start of each sequence of the call (see ``ttt_linear``).

    Args:
        q, k: ``[B, T, H, K]``. v: ``[B, T, H, V]``.
        theta: ``[B, T, H]`` learning rate of the surprise, ``>= 0``.
        g: ``[B, T, H]`` log of the memory's retention ``1 - alpha`` (``<= 0``).
        g_momentum: ``[B, T, H]`` log of the momentum decay ``eta`` (``<= 0``).
        mini_batch_size: tokens per mini-batch (gradients at the mini-batch's start).
        mode: ``"reference"``, ``"chunk"`` or ``"recurrent"``.
        scale, cu_seqlens: as every op. chunk_size: validated, unused (the chunk is the mini-batch).
        initial_state: ``[N, 2, H, K, V]``: memory ``M`` then momentum ``S``.

    Returns:
        ``(o [B, T, H, V], final_state [N, 2, H, K, V] or None)``.
    """
    B, T, H, K, V = val.check_qkv(q, k, v)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    check_mini_batch_size(mini_batch_size)
    scale = val.resolve_scale(scale, K)
    check_rate("theta", theta, q)
    for name, x in (("g", g), ("g_momentum", g_momentum)):
        val.check_tensor(name, x, 3, "[B, T, H]")
        val.check_same_dtype_device({"q": q, name: x})
        val.check_shape(name, x, (B, T, H), "[B, T, H]")
        val.check_log_gate(name, x)
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, 2, H, K, V), "[N, 2, H, K, V]", q.device)
    tensors = (q, k, v, theta, g, g_momentum)
    if mode == "reference":
        return reference_titans(
            *tensors, mini_batch_size, scale, initial_state, output_final_state, cu_seqlens
        )
    kernel = chunk_titans if mode == "chunk" else recurrent_titans
    if cu_seqlens is None:
        return kernel(*tensors, mini_batch_size, scale, initial_state, output_final_state)
    # zero padding is not an identity of this recurrence (M keeps adding its momentum), so packed
    # sequences run one by one
    sizes = [e - s for s, e in seq_bounds(cu_seqlens)]
    pieces = [x.split(sizes, 1) for x in tensors]  # split once: O(T) backward
    outs, finals = [], []
    for i in range(len(sizes)):
        state = None if initial_state is None else initial_state[i : i + 1]
        o, f = kernel(*(p[i] for p in pieces), mini_batch_size, scale, state, output_final_state)
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, 1), (torch.cat(finals, 0) if output_final_state else None)
