"""Step form of TTT-Linear: one token at a time, keeping the mini-batch's starting weights.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    W_t = W_{t-1} - eta_t k_t (W0^T k_t - v_t)^T        o_t = scale * W_t^T q_t

with W0 the weights at the current mini-batch's start (tokens 0, b, 2b, ... of the call).
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


def recurrent_ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mini_batch_size: int,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = state_dtype(q.dtype)
    W = initial_state.to(cd) if initial_state is not None else q.new_zeros(B, H, K, V, dtype=cd)
    grad = records_grad(q, k, v, eta, initial_state)
    qt, kt, vt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (q, k, v))
    et = time_steps(eta.to(cd).transpose(0, 1).unsqueeze(-1), grad)  # T x [B, H, 1]
    outs = StepOutputs(B, T, H, V, cd, q.device, grad)
    W0 = W
    for t in range(T):
        if t % mini_batch_size == 0:
            W0 = W
        err = torch.matmul(kt[t].unsqueeze(-2), W0).squeeze(-2) - vt[t]  # [B, H, V]
        W = W - kt[t].unsqueeze(-1) * (et[t] * err).unsqueeze(-2)
        outs.add(t, torch.matmul(qt[t].unsqueeze(-2), W).squeeze(-2))
    o = (outs.result() * scale).to(q.dtype)
    return o, (W if output_final_state else None)
