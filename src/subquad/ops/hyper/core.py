"""HyperAttention's pieces shared by both modes: the random draws, the sortLSH buckets, the
non-causal estimate in a dense (reference) and a blocked (fast) form, and the causal recursion.

Shape legend: B batch, H heads, Tq queries, Tk keys, K key dim, V value dim, r hash bits,
n blocks, bq / bk queries / keys per block, m sampled keys.
"""

from __future__ import annotations

import math

import torch


def draws(seed: int, offset: int, Tq: int, Tk: int, H: int, K: int, bits: int, m: int, device):
    """The random hyperplanes ``[H, K, r]`` and sampled key indices ``[H, m]`` of one non-causal
    piece, a pure function of (seed, where the piece sits, its size): both modes draw the same."""
    g = torch.Generator(device="cpu").manual_seed(hash((seed, offset, Tq, Tk)) & (2**62 - 1))
    planes = torch.randn(H, K, bits, generator=g, dtype=torch.float64)
    idx = torch.randint(0, Tk, (H, m), generator=g)
    return planes.to(device), idx.to(device)


def gray_rank(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Angular LSH bucket of every row, as its position in Gray-code order (neighbouring ranks differ
    in one hyperplane): x ``[B, T, H, K]``, planes ``[H, K, r]`` -> ``[B, H, T]`` int64."""
    bits = torch.einsum("bthk,hkr->bhtr", x, planes.to(x.dtype)) > 0
    code = (bits.long() << torch.arange(bits.shape[-1], device=x.device)).sum(-1)
    rank, shift = code.clone(), code >> 1
    while bool(shift.any()):  # inverse Gray code: rank = code ^ code >> 1 ^ code >> 2 ^ ...
        rank ^= shift
        shift >>= 1
    return rank


def layout(Tq: int, Tk: int, block: int) -> tuple[int, int, int]:
    """``(n, bq, bk)``: n blocks along the sorted order, queries and keys per block."""
    n = max(1, -(-max(Tq, Tk) // block))
    return n, -(-Tq // n), -(-Tk // n)


def sorted_blocks(q, k, planes, block):
    """Each query's and key's block id ``[B, H, Tq]``, ``[B, H, Tk]``, and the sort orders."""
    Tq, Tk = q.shape[1], k.shape[1]
    n, bq, bk = layout(Tq, Tk, block)
    oq = gray_rank(q, planes).sort(dim=-1, stable=True).indices  # [B, H, Tq]
    ok = gray_rank(k, planes).sort(dim=-1, stable=True).indices
    bid_q = torch.empty_like(oq).scatter_(-1, oq, torch.arange(Tq, device=q.device).expand_as(oq) // bq)
    bid_k = torch.empty_like(ok).scatter_(-1, ok, torch.arange(Tk, device=q.device).expand_as(ok) // bk)
    return bid_q, bid_k, oq, ok, (n, bq, bk)


def dense_piece(q, k, v, scale, planes, idx, block):
    """The non-causal estimate written densely (the reference): every (query, key) score, weight 1
    where they share a block, ``Tk / m`` per time the key was sampled where they do not, 0 elsewhere.
    Returns ``(o [B, Tq, H, V], lse [B, Tq, H])`` with lse the log of the weighted normaliser."""
    Tk, m = k.shape[1], idx.shape[-1]
    bid_q, bid_k, *_ = sorted_blocks(q, k, planes, block)
    same = bid_q.unsqueeze(-1) == bid_k.unsqueeze(-2)  # [B, H, Tq, Tk]
    counts = torch.zeros(idx.shape[0], Tk, dtype=q.dtype, device=q.device)
    counts.scatter_add_(-1, idx, torch.ones_like(idx, dtype=q.dtype))  # [H, Tk]
    w = torch.where(same, torch.ones((), dtype=q.dtype), (Tk / m) * counts[None, :, None, :])
    s = torch.einsum("bqhk,bshk->bhqs", q, k) * scale
    logw = torch.where(w > 0, w.clamp(min=1e-30).log(), torch.full((), -math.inf, dtype=q.dtype))
    a = s + logw
    lse = torch.logsumexp(a, -1)  # [B, H, Tq]; the own block is never empty, so finite
    o = torch.einsum("bhqs,bshv->bqhv", torch.exp(a - lse.unsqueeze(-1)), v)
    return o, lse.transpose(1, 2)


def blocked_piece(q, k, v, scale, planes, idx, block):
    """The same estimate computed in O(Tq * (bk + m)): queries and keys sorted by bucket and cut into
    n blocks, one batched matmul per block, plus every query against the m sampled keys with the
    sampled keys of its own block masked out (they are already counted exactly). Everything is
    computed in sorted query order, with one exponential pass, and put back in order at the end."""
    B, Tq, H, K = q.shape
    Tk, Vd, m = k.shape[1], v.shape[-1], idx.shape[-1]
    _, bid_k, oq, ok, (n, bq, bk) = sorted_blocks(q, k, planes, block)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
    # 1. queries and keys in sorted order, padded to n * bq and n * bk (padding masked / dropped)
    oq_p = torch.nn.functional.pad(oq, (0, n * bq - Tq))
    ok_p = torch.nn.functional.pad(ok, (0, n * bk - Tk))
    qs = qh.gather(2, oq_p.unsqueeze(-1).expand(-1, -1, -1, K)).view(B, H, n, bq, K)
    ks = kh.gather(2, ok_p.unsqueeze(-1).expand(-1, -1, -1, K)).view(B, H, n, bk, K)
    vs = vh.gather(2, ok_p.unsqueeze(-1).expand(-1, -1, -1, Vd)).view(B, H, n, bk, Vd)
    real_k = (torch.arange(n * bk, device=q.device) < Tk).view(n, 1, bk)
    s_blk = torch.einsum("bhnqk,bhnsk->bhnqs", qs, ks) * scale
    s_blk = s_blk.masked_fill(~real_k, -math.inf)  # [B, H, n, bq, bk]
    # 2. sampled keys, weight Tk / m each (log added to the score), except inside the query's block
    ksm = kh.gather(2, idx[None, :, :, None].expand(B, -1, -1, K))  # [B, H, m, K]
    vsm = vh.gather(2, idx[None, :, :, None].expand(B, -1, -1, Vd))
    s_smp = torch.einsum("bhnqk,bhsk->bhnqs", qs, ksm) * scale + math.log(Tk / m)  # [B, H, n, bq, m]
    smp_block = bid_k.gather(-1, idx[None].expand(B, -1, -1))  # [B, H, m]
    own = torch.arange(n, device=q.device).view(1, 1, n, 1, 1) == smp_block[:, :, None, None, :]
    s_smp = s_smp.masked_fill(own, -math.inf)
    # 3. one normaliser over both parts, one exponential pass
    mx = torch.maximum(s_blk.amax(-1, keepdim=True), s_smp.amax(-1, keepdim=True))
    mx = mx.clamp(min=torch.finfo(mx.dtype).min)  # padded query slots may see nothing; dropped below
    e_blk, e_smp = torch.exp(s_blk - mx), torch.exp(s_smp - mx)
    z = e_blk.sum(-1) + e_smp.sum(-1)  # [B, H, n, bq]
    num = torch.einsum("bhnqs,bhnsv->bhnqv", e_blk, vs) + torch.einsum("bhnqs,bhsv->bhnqv", e_smp, vsm)
    o = (num / z.clamp(min=torch.finfo(z.dtype).tiny).unsqueeze(-1)).reshape(B, H, n * bq, Vd)
    lse = (mx.squeeze(-1) + z.log()).reshape(B, H, n * bq)
    # 4. back to query order
    inv = torch.empty_like(oq).scatter_(-1, oq, torch.arange(Tq, device=q.device).expand_as(oq))
    o = o.gather(2, inv.unsqueeze(-1).expand(-1, -1, -1, Vd))
    return o.transpose(1, 2), lse.gather(2, inv).transpose(1, 2)


def exact_causal(q, k, v, scale):
    """Exact causal attention of a short diagonal piece: ``(o [B, T, H, V], lse [B, T, H])``."""
    T = q.shape[1]
    s = torch.einsum("bqhk,bshk->bhqs", q, k) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    m = s.amax(-1, keepdim=True)  # the diagonal is always visible: finite
    e = torch.exp(s - m)  # one exponential pass, shared by the normaliser and the output
    z = e.sum(-1)
    o = torch.einsum("bhqs,bshv->bqhv", e, v) / z.transpose(1, 2).unsqueeze(-1)
    return o, (m.squeeze(-1) + z.log()).transpose(1, 2)


def merge(o1, l1, o2, l2):
    """Two partial attentions over disjoint key sets, each normalised by its own lse, as one."""
    lse = torch.logaddexp(l1, l2)
    return torch.exp(l1 - lse).unsqueeze(-1) * o1 + torch.exp(l2 - lse).unsqueeze(-1) * o2, lse


def tiled_causal(q, k, v, scale):
    """Exact causal attention of a diagonal piece by the tiled (FlashAttention-style) op, with its
    log-sum-exp: what the fast mode uses for the same numbers as :func:`exact_causal`."""
    from subquad.ops.attention import attention

    o, lse = attention(q, k, v, scale=scale, return_lse=True)
    return o, lse.to(o.dtype)


def causal(q, k, v, scale, piece, *, seed, bits, block, samples, min_len, offset=0, exact=exact_causal):
    """The paper's causal recursion: the causal attention of [0, T) is the causal attention of each
    half plus the non-causal estimate of the second half's queries over the first half's keys,
    merged by log-sum-exp; pieces of at most ``min_len`` are exact (``exact``)."""
    T, H, K = q.shape[1], q.shape[2], q.shape[3]
    if T <= min_len:
        return exact(q, k, v, scale)
    h = T // 2
    same = dict(seed=seed, bits=bits, block=block, samples=samples, min_len=min_len, exact=exact)
    o1, l1 = causal(q[:, :h], k[:, :h], v[:, :h], scale, piece, offset=offset, **same)
    o2, l2 = causal(q[:, h:], k[:, h:], v[:, h:], scale, piece, offset=offset + h, **same)
    planes, idx = draws(seed, offset, T - h, h, H, K, bits, samples, q.device)
    o3, l3 = piece(q[:, h:], k[:, :h], v[:, :h], scale, planes, idx, block)
    o2, l2 = merge(o2, l2, o3, l3)
    return torch.cat([o1, o2], 1), torch.cat([l1, l2], 1)
