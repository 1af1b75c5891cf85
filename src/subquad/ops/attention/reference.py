"""Reference attention: the specification, one query at a time.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

    o_i = sum_j softmax_j(scale * q_i . k_j over the keys query i may see) v_j
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops.attention.masks import allowed


def reference_attention(q, k, v, causal, window, sinks, scale, block_mask=None, block_size=None):
    """q ``[B, T, H, K]``, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads already matched);
    returns ``o [B, T, H, V]`` and the log-sum-exp ``[B, T, H]`` (compute dtype). With a block
    mask ``[B, H, nb, nb]`` query i also needs ``block_mask[.., i // b, j // b]``; a query that sees
    no key gets o = 0 and lse = +inf (the tiled forms' convention)."""
    T = q.shape[1]
    cd = state_dtype(q.dtype)
    q, k, v = (x.to(cd) for x in (q, k, v))
    keys = torch.arange(T, device=q.device)
    outs, lses = [], []
    for i in range(T):
        # 1. the scores of query i against every key, the unseen ones removed
        s = scale * torch.einsum("bhk,bjhk->bhj", q[:, i], k)  # [B, H, T]
        seen = allowed(torch.tensor(i, device=q.device), keys, causal, window, sinks, T)
        if block_mask is not None:
            seen = seen & block_mask[:, :, i // block_size, keys // block_size]  # [B, H, T]
        s = s.masked_fill(~seen, float("-inf"))
        # 2. softmax over the seen keys, then the weighted values
        lse = torch.logsumexp(s, -1)  # [B, H]
        none = lse == float("-inf")
        w = torch.exp(s - lse.masked_fill(none, 0.0)[..., None])
        outs.append(torch.einsum("bhj,bjhv->bhv", w, v))
        lses.append(lse.masked_fill(none, float("inf")))
    return torch.stack(outs, 1), torch.stack(lses, 1)
