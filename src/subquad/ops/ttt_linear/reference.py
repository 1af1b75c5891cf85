"""Reference TTT-Linear: the specification, a plain per-token loop with mini-batch semantics.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences, b mini-batch size.

The state W [K, V] is a linear model trained online on l(W; k, v) = 1/2 ||W^T k - v||^2. Within a
mini-batch every gradient is taken at the weights W0 the mini-batch started with:

    W_t = W_{t-1} - eta_t k_t (W0^T k_t - v_t)^T        o_t = scale * W_t^T q_t

and W0 is refreshed to the current W at every mini-batch start (token 0, b, 2b, ... of each
sequence, counted from the start of the call).
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.varlen import seq_bounds


def reference_ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mini_batch_size: int,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    in_dtype, cd = q.dtype, state_dtype(q.dtype)
    q, k, v, eta = (x.to(cd) for x in (q, k, v, eta))
    seqs = (
        [(b, 0, T) for b in range(B)]
        if cu_seqlens is None
        else [(0, s, e) for s, e in seq_bounds(cu_seqlens)]
    )
    outs, finals = [], []
    for n, (b, start, end) in enumerate(seqs):
        W = (
            initial_state[n].to(cd)
            if initial_state is not None
            else torch.zeros(H, K, V, dtype=cd, device=q.device)
        )
        for j, t in enumerate(range(start, end)):
            if j % mini_batch_size == 0:
                W0 = W  # 1. a new mini-batch: gradients are taken at these weights
            kt, vt = k[b, t], v[b, t]  # [H, K], [H, V]
            # 2. gradient of 1/2 ||W0^T k - v||^2 at W0: k (W0^T k - v)^T
            err = torch.einsum("hk,hkv->hv", kt, W0) - vt
            W = W - eta[b, t][:, None, None] * kt[:, :, None] * err[:, None, :]
            outs.append(scale * torch.einsum("hk,hkv->hv", q[b, t], W))
        finals.append(W)
    o = torch.stack(outs, 0).reshape(B, T, H, V).to(in_dtype)
    return o, (torch.stack(finals, 0) if output_final_state else None)
