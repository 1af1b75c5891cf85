"""One decoding step of softmax attention against a long KV cache, split over the keys.

Shape legend: B batch, S cache length, H query heads, Hk key/value heads, G = H / Hk, K key dim,
V value dim, P splits.

Decoding is bound by reading the cache once. In the library's ``[B, S, Hk, D]`` layout the keys
of one position are contiguous across heads, so every head is scored by ONE gemm over the cache
seen as ``[S, Hk*K]``: against a block-diagonal query matrix ``[Hk*K, H]`` (column h holds query
head h in the rows of its key head; zeros elsewhere). The zeros cost Hk times the FLOPs of the dot
products, which is cheap next to the memory traffic, and the cache is read contiguously, never
transposed or copied. The values are read the same way: ``P^T [H, S] @ cache [S, Hk*V]`` and each
head keeps its own block.

The keys are cut into P splits; each split's partial softmax (its max, normalizer and weighted
values) is computed for all splits by the same batched gemms, and the partials are merged by
their log-sum-exps, ``o = sum_p e^{lse_p - lse} o_p`` (split-K decoding, "Flash-Decoding"; Lean
Attention balances the same merge across compute units).
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype


def decode_attention(q, k_cache, v_cache, lengths, scale, num_splits):
    """q ``[B, H, K]``; caches ``[B, S, Hk, D]``; lengths: list of B valid lengths or None.
    Returns ``o [B, H, V]`` and ``lse [B, H]`` (compute dtype)."""
    B, H, K = q.shape
    Hk = k_cache.shape[2]
    V = v_cache.shape[3]
    G = H // Hk
    cd = state_dtype(q.dtype)
    owner = torch.arange(H, device=q.device) // G  # the key head of each query head
    # 1. block-diagonal queries [B, Hk*K, H]: column h is scale * q_h in the rows of its key head
    rows = torch.zeros(B, Hk, K, H, dtype=cd, device=q.device)
    # (separated advanced indices put the indexed dim first: the values go in as [H, B, K])
    rows[:, owner, :, torch.arange(H, device=q.device)] = (q.to(cd) * scale).transpose(0, 1)
    q_bd = rows.view(B, Hk * K, H)
    outs, lses = [], []
    for b in range(B):
        n = k_cache.shape[1] if lengths is None else lengths[b]
        size = -(-n // max(1, min(num_splits, n)))
        P = -(-n // size)  # every split holds at least one real key (an empty one would give NaN)
        kb = k_cache[b, :n].reshape(n, Hk * K).to(cd)  # a view for float32 caches
        vb = v_cache[b, :n].reshape(n, Hk * V).to(cd)
        # 2. scores of every head at every position, split into P parts [P, size, H]
        s = kb @ q_bd[b]  # [n, H]
        pad = P * size - n
        if pad:
            s = torch.cat([s, s.new_full((pad, H), float("-inf"))], 0)
        s = s.view(P, size, H)
        m = s.amax(1, keepdim=True)  # [P, 1, H]
        e = torch.exp(s - m)
        l = e.sum(1)  # [P, H]
        # 3. each split's weighted values: e^T [H, size] @ values [size, Hk*V], own blocks kept
        e = e.view(P * size, H)[:n]
        parts = []
        for p in range(P):
            lo, hi = p * size, min((p + 1) * size, n)
            full = e[lo:hi].T @ vb[lo:hi]  # [H, Hk*V]
            parts.append(full.view(H, Hk, V)[torch.arange(H, device=q.device), owner])  # [H, V]
        po = torch.stack(parts) / l.unsqueeze(-1)  # [P, H, V]
        pl = m.squeeze(1) + torch.log(l)  # [P, H]
        # 4. merge the splits by their log-sum-exps
        lse = torch.logsumexp(pl, 0)
        outs.append((torch.exp(pl - lse).unsqueeze(-1) * po).sum(0))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
