"""Step form of simple GLA: one token at a time, constant cost per token. Also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype


def recurrent_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent linear attention with optional scalar log-decay ``g [B, T, H]`` or ``g_gamma [H]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = state_dtype(q.dtype)
    S = initial_state.to(cd) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=cd)
    # contiguous time-major steps, split by unbind: indexing x[t] per step would make backward build a
    # full-size zero gradient per step, O(T^2)
    qt, kt, vt = (x.to(cd).transpose(0, 1).contiguous().unbind(0) for x in (q, k, v))
    decay = None
    if g is not None:
        decay = g.to(cd).exp().transpose(0, 1)[..., None, None].unbind(0)  # T x [B, H, 1, 1]
    elif g_gamma is not None:
        const = g_gamma.to(cd).exp()[:, None, None]  # [H, 1, 1]
    outs = []
    for t in range(T):
        kv = kt[t].unsqueeze(-1) * vt[t].unsqueeze(-2)  # [B, H, K, V]
        if decay is not None:
            S = decay[t] * S + kv
        elif g_gamma is not None:
            S = const * S + kv
        else:
            S = S + kv
        outs.append(torch.matmul(qt[t].unsqueeze(-2), S).squeeze(-2))  # [B, H, V]
    o = (torch.stack(outs, 1) * scale).to(q.dtype)
    return o, (S if output_final_state else None)
