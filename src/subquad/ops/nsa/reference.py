"""Native Sparse Attention, the specification: one query at a time.

Shape legend: B batch, T queries, S keys (S >= T; query t sits at position p_t = S - T + t),
H query heads, Hk key/value heads, G = H / Hk, K key dim, V value dim, b block size,
n selected blocks, w window.

For query t at position p (per head h, key head c = h // G):

    compressed keys/values: kc_j = mean(k[j b : (j+1) b]), vc_j likewise, for complete blocks j
    cmp:  p_j = softmax_j(scale q . kc_j) over the blocks that end at or before p;  o_cmp = sum_j p_j vc_j
    importance of block j for key head c: the sum of p_j over the G query heads of c
    selection: the first block, p's own block and the most important others, n blocks in all
    slc:  softmax attention over the tokens of the selected blocks at or before p
    swa:  softmax attention over the tokens p - w < j <= p
    o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype


def _softmax_attend(s, v):
    """``s [n]`` scores with -inf for hidden keys, ``v [n, V]``: the attended value (0 if none)."""
    if torch.isinf(s).all():
        return v.new_zeros(v.shape[-1]), None
    p = torch.softmax(s, -1)
    return p @ v, p


def reference_nsa(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window, scale):
    B, T, H, _ = q.shape
    S, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    b = block_size
    cd = state_dtype(q.dtype)
    q, k, v, g_cmp, g_slc, g_swa = (x.to(cd) for x in (q, k, v, g_cmp, g_slc, g_swa))
    nc = S // b
    kc = torch.stack([k[:, j * b : (j + 1) * b].mean(1) for j in range(nc)], 1) if nc else k[:, :0]
    vc = torch.stack([v[:, j * b : (j + 1) * b].mean(1) for j in range(nc)], 1) if nc else v[:, :0]
    keys = torch.arange(S, device=q.device)
    out = torch.zeros(B, T, H, v.shape[-1], dtype=cd, device=q.device)
    for bi in range(B):
        for t in range(T):
            p_t = S - T + t
            for c in range(Hk):
                # 1. compressed attention of each query head of the group, and the group's importance
                importance = torch.zeros(nc, dtype=cd, device=q.device)
                o_cmp = []
                for h in range(c * G, (c + 1) * G):
                    s = scale * (kc[bi, :, c] @ q[bi, t, h])  # [nc]
                    s = s.masked_fill((torch.arange(nc, device=q.device) + 1) * b - 1 > p_t, float("-inf"))
                    o, p = _softmax_attend(s, vc[bi, :, c])
                    o_cmp.append(o)
                    if p is not None:
                        importance = importance + p.detach()
                # 2. selection: first block, own block, then the most important earlier ones
                own = p_t // b
                candidates = list(range(own + 1))
                forced = sorted({0, own})
                rest = sorted(
                    (j for j in candidates if j not in forced),
                    key=lambda j: (-float(importance[j]) if j < nc else 0.0, j),
                )
                chosen = (forced + rest)[:block_count] if block_count >= len(forced) else forced
                sel = torch.zeros(S, dtype=torch.bool, device=q.device)
                for j in chosen:
                    sel[j * b : (j + 1) * b] = True
                sel &= keys <= p_t
                near = (keys <= p_t) & (keys > p_t - window)
                for i, h in enumerate(range(c * G, (c + 1) * G)):
                    s = scale * (k[bi, :, c] @ q[bi, t, h])  # [S]
                    o_slc, _ = _softmax_attend(s.masked_fill(~sel, float("-inf")), v[bi, :, c])
                    o_swa, _ = _softmax_attend(s.masked_fill(~near, float("-inf")), v[bi, :, c])
                    out[bi, t, h] = (
                        g_cmp[bi, t, h] * o_cmp[i] + g_slc[bi, t, h] * o_slc + g_swa[bi, t, h] * o_swa
                    )
    return out
