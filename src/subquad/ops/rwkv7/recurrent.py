"""Step form of RWKV-7: one token at a time, constant cost per token. Also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        o_t = scale * S_t^T r_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


def recurrent_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state):
    B, T, H, K = r.shape
    V = v.shape[-1]
    cd = state_dtype(r.dtype)
    S = initial_state.to(cd) if initial_state is not None else r.new_zeros(B, H, K, V, dtype=cd)
    grad = records_grad(r, w, k, v, a, b, initial_state)
    rt, kt, vt, at, bt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (r, k, v, a, b))
    decay = time_steps(w.to(cd).exp().transpose(0, 1).unsqueeze(-1), grad)  # T x [B, H, K, 1]
    outs = StepOutputs(B, T, H, V, cd, r.device, grad)
    for t in range(T):
        read = torch.matmul(at[t].unsqueeze(-2), S)  # [B, H, 1, V]
        S = decay[t] * S + bt[t].unsqueeze(-1) * read + kt[t].unsqueeze(-1) * vt[t].unsqueeze(-2)
        outs.add(t, torch.matmul(rt[t].unsqueeze(-2), S).squeeze(-2))
    o = (outs.result() * scale).to(r.dtype)
    return o, (S if output_final_state else None)
