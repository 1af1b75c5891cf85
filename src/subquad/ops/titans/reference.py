"""Reference Titans linear memory: the specification, a plain per-token loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences, b mini-batch size.

Memory M [K, V] and momentum ("surprise") S [K, V]; within a mini-batch the gradient of
l(M; k, v) = 1/2 ||M^T k - v||^2 is taken at the memory M0 the mini-batch started with:

    S_t = exp(gm_t) S_{t-1} - theta_t k_t (M0^T k_t - v_t)^T
    M_t = exp(g_t) M_{t-1} + S_t                                  o_t = scale * M_t^T q_t

(the paper's eta_t = exp(gm_t), 1 - alpha_t = exp(g_t)). M0 is refreshed at tokens 0, b, 2b, ...
of each sequence. The state is [2, H, K, V]: M, then S.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.varlen import seq_bounds


def reference_titans(
    q, k, v, theta, g, gm, mini_batch_size, scale, initial_state, output_final_state, cu_seqlens
):
    B, T, H, K = q.shape
    V = v.shape[-1]
    in_dtype, cd = q.dtype, state_dtype(q.dtype)
    q, k, v, theta, g, gm = (x.to(cd) for x in (q, k, v, theta, g, gm))
    seqs = (
        [(b, 0, T) for b in range(B)]
        if cu_seqlens is None
        else [(0, s, e) for s, e in seq_bounds(cu_seqlens)]
    )
    outs, finals = [], []
    for n, (b, start, end) in enumerate(seqs):
        if initial_state is not None:
            M, S = initial_state[n, 0].to(cd), initial_state[n, 1].to(cd)
        else:
            M = S = torch.zeros(H, K, V, dtype=cd, device=q.device)
        for j, t in enumerate(range(start, end)):
            if j % mini_batch_size == 0:
                M0 = M  # 1. a new mini-batch: gradients are taken at this memory
            kt = k[b, t]
            # 2. surprise: momentum of past surprise minus this token's gradient at M0
            err = torch.einsum("hk,hkv->hv", kt, M0) - v[b, t]
            S = (
                gm[b, t].exp()[:, None, None] * S
                - theta[b, t][:, None, None] * kt[:, :, None] * err[:, None, :]
            )
            # 3. forget, then add the surprise
            M = g[b, t].exp()[:, None, None] * M + S
            outs.append(scale * torch.einsum("hk,hkv->hv", q[b, t], M))
        finals.append(torch.stack([M, S], 0))
    o = torch.stack(outs, 0).reshape(B, T, H, V).to(in_dtype)
    return o, (torch.stack(finals, 0) if output_final_state else None)
