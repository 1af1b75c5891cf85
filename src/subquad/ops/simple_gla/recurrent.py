"""Step form of simple GLA: one token at a time, constant cost per token. Also the decode step.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import StepOutputs, records_grad, state_dtype, time_steps


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
    grad = records_grad(q, k, v, g, g_gamma, initial_state)
    # contiguous time-major steps
    qt, kt, vt = (time_steps(x.to(cd).transpose(0, 1).contiguous(), grad) for x in (q, k, v))
    decay = None
    if g is not None:
        decay = time_steps(g.to(cd).exp().transpose(0, 1)[..., None, None], grad)  # T x [B, H, 1, 1]
    elif g_gamma is not None:
        const = g_gamma.to(cd).exp()[:, None, None]  # [H, 1, 1]
    outs = StepOutputs(B, T, H, V, cd, q.device, grad)
    for t in range(T):
        kv = kt[t].unsqueeze(-1) * vt[t].unsqueeze(-2)  # [B, H, K, V]
        if decay is not None:
            S = decay[t] * S + kv
        elif g_gamma is not None:
            S = const * S + kv
        else:
            S = S + kv
        outs.add(t, torch.matmul(qt[t].unsqueeze(-2), S).squeeze(-2))  # [B, H, V]
    o = (outs.result() * scale).to(q.dtype)
    return o, (S if output_final_state else None)
