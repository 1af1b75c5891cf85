"""Step form of the Titans linear memory: one token at a time (also the decode step).

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = exp(gm_t) S_{t-1} - theta_t k_t (M0^T k_t - v_t)^T,   M_t = exp(g_t) M_{t-1} + S_t,
    o_t = scale * M_t^T q_t, with M0 the memory at the current mini-batch's start.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


def recurrent_titans(q, k, v, theta, g, gm, mini_batch_size, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    cd = state_dtype(q.dtype)
    if initial_state is not None:
        M, S = initial_state[:, 0].to(cd), initial_state[:, 1].to(cd)
    else:
        M = S = q.new_zeros(B, H, K, V, dtype=cd)
    grad = records_grad(q, k, v, theta, g, gm, initial_state)
    qt, kt, vt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (q, k, v))
    tt, dm, dg = (
        time_steps(x.transpose(0, 1)[..., None, None], grad)
        for x in (theta.to(cd), gm.to(cd).exp(), g.to(cd).exp())
    )  # T x [B, H, 1, 1]
    outs = StepOutputs(B, T, H, V, cd, q.device, grad)
    M0 = M
    for t in range(T):
        if t % mini_batch_size == 0:
            M0 = M
        err = torch.matmul(kt[t].unsqueeze(-2), M0) - vt[t].unsqueeze(-2)  # [B, H, 1, V]
        S = dm[t] * S - tt[t] * kt[t].unsqueeze(-1) * err
        M = dg[t] * M + S
        outs.add(t, torch.matmul(qt[t].unsqueeze(-2), M).squeeze(-2))
    o = (outs.result() * scale).to(q.dtype)
    return o, (torch.stack([M, S], 1) if output_final_state else None)
