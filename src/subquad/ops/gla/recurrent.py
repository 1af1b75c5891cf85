"""Step form of GLA: one token at a time, constant cost per token. Also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype


def recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = state_dtype(q.dtype)
    S = initial_state.to(cd) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=cd)
    # contiguous time-major steps, split by unbind: indexing x[t] per step would make backward build a
    # full-size zero gradient per step, O(T^2)
    qt, kt, vt = (x.to(cd).transpose(0, 1).contiguous().unbind(0) for x in (q, k, v))
    decay = g.to(cd).exp().transpose(0, 1).unsqueeze(-1).unbind(0)  # T x [B, H, K, 1]
    outs = []
    for t in range(T):
        S = decay[t] * S + kt[t].unsqueeze(-1) * vt[t].unsqueeze(-2)
        outs.append(torch.matmul(qt[t].unsqueeze(-2), S).squeeze(-2))
    o = (torch.stack(outs, 1) * scale).to(q.dtype)
    return o, (S if output_final_state else None)
