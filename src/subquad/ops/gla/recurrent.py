"""Step form of GLA: one token at a time, constant cost per token. Also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


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
    grad = records_grad(q, k, v, g, initial_state)
    # contiguous time-major steps
    qt, kt, vt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (q, k, v))
    decay = time_steps(g.to(cd).exp().transpose(0, 1).unsqueeze(-1), grad)  # T x [B, H, K, 1]
    outs = StepOutputs(B, T, H, V, cd, q.device, grad)
    for t in range(T):
        S = decay[t] * S + kt[t].unsqueeze(-1) * vt[t].unsqueeze(-2)
        outs.add(t, torch.matmul(qt[t].unsqueeze(-2), S).squeeze(-2))
    o = (outs.result() * scale).to(q.dtype)
    return o, (S if output_final_state else None)
