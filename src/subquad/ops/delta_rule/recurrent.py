"""Step form of the (gated) delta rule: constant cost per token; also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = exp(g_t) S_{t-1} + k_t delta_t^T,  delta_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)
    o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


def recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = state_dtype(q.dtype)
    S = initial_state.to(cd) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=cd)
    grad = records_grad(q, k, v, g, beta, initial_state)
    # contiguous time-major steps
    qt, kt, vt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (q, k, v))
    bt = time_steps(beta.to(cd).transpose(0, 1).unsqueeze(-1), grad)  # T x [B, H, 1]
    decay = None if g is None else time_steps(g.to(cd).exp().transpose(0, 1)[..., None, None], grad)
    outs = StepOutputs(B, T, H, V, cd, q.device, grad)
    for t in range(T):
        if decay is not None:
            S = decay[t] * S
        # delta_t = beta_t (v_t - S^T k_t): what the memory mispredicts for key k_t
        pred = torch.matmul(kt[t].unsqueeze(-2), S).squeeze(-2)  # [B, H, V]
        delta = bt[t] * (vt[t] - pred)
        S = S + kt[t].unsqueeze(-1) * delta.unsqueeze(-2)
        outs.add(t, torch.matmul(qt[t].unsqueeze(-2), S).squeeze(-2))
    o = (outs.result() * scale).to(q.dtype)
    return o, (S if output_final_state else None)
