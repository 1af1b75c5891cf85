"""Native Sparse Attention, batched: the three branches as tensor programs.

Shape legend: B batch, T queries, S keys (query t at position S - T + t), H query heads,
Hk key/value heads, G = H / Hk, K key dim, V value dim, b block size, nc complete blocks,
nb = ceil(S / b) blocks, n selected blocks, C query chunk.

- cmp: one masked softmax of every query against the nc mean-pooled blocks, ``[B, H, T, nc]``
  (T * S / b scores: 1/b of dense attention), autograd through it.
- selection: the group-summed cmp probabilities, the first and own blocks forced, top-n by a
  stable sort (ties to the earlier block, as in the reference); no gradient flows through it.
- slc: the (query, block) pairs of one key head are grouped by block, so a block's b keys are read
  once for all the queries (and their G query heads) that selected it: one ``[pairs*G, K] @
  [K, b]`` matmul per group of blocks with similar pair counts (padded by < 25%), a softmax partial
  per pair, and a log-sum-exp merge per query (``index_add``). Cost T * n * b * G scores whatever
  the selection looks like; what is gathered is one query vector per pair (1/b of gathering the
  keys per query). Each (batch, key head) runs under activation checkpointing.
- swa: the tiled ``attention(window=w)`` when T = S; for a suffix of queries (decoding), one
  masked softmax over the last ``w + T - 1`` keys.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from subquad.ops._common.chunking import exp_fast, records_grad, state_dtype


def _expand(x, G):
    return x if G == 1 else x.repeat_interleave(G, dim=2)


def compressed(q, k, v, b, scale):
    """``(o_cmp [B, T, H, V], p [B, H, T, nc])``: attention over the mean-pooled complete blocks.
    Queries before the first complete block see none: o = 0, p = 0."""
    B, T, H, K = q.shape
    S, Hk = k.shape[1], k.shape[2]
    nc = S // b
    first = max(0, b - 1 - (S - T))  # the first query that sees a complete block
    if nc == 0 or first >= T:
        return q.new_zeros(B, T, H, v.shape[-1]), q.new_zeros(B, H, T, nc)
    G = H // Hk
    # the scale rides on the nc mean keys; each head's queries are read in place (strided)
    kc = _expand(k[:, : nc * b].reshape(B, nc, b, Hk, K).mean(2) * scale, G).permute(0, 2, 3, 1)
    vc = _expand(v[:, : nc * b].reshape(B, nc, b, Hk, -1).mean(2), G).transpose(1, 2)  # [B, H, nc, V]
    pos = torch.arange(S - T + first, S, device=q.device)
    hidden = (torch.arange(nc, device=q.device) + 1) * b - 1 > pos[:, None]  # [T - first, nc]
    p = q.new_zeros(B, H, T, nc)
    o = q.new_zeros(B, T, H, v.shape[-1])
    for bi in range(B):
        s = torch.matmul(q[bi, first:].transpose(0, 1), kc[bi])  # [H, T - first, nc]
        pb = torch.softmax(s.masked_fill_(hidden, float("-inf")), -1)
        p[bi, :, first:] = pb
        o[bi, first:] = torch.matmul(pb, vc[bi]).transpose(0, 1)
    return o, p


# score elements of one query chunk of the selection: its temporaries stay small enough to be
# reused by the allocator (fresh large buffers cost page faults on first touch here)
SELECT_ELEMENTS = 1 << 19


@torch.no_grad()
def select(p, S, T, b, n, Hk):
    """``(idx [B, Hk, T, m], ok [B, Hk, T, m])``: the blocks each query of each key head reads,
    computed in query chunks of about SELECT_ELEMENTS scores."""
    B, H, _, nc = p.shape
    G = H // Hk
    nb = -(-S // b)
    m = min(max(n, 2), nb)
    j = torch.arange(nb, device=p.device)
    rank = torch.arange(m, device=p.device)
    idx = torch.empty(B, Hk, T, m, dtype=torch.long, device=p.device)
    ok = torch.empty(B, Hk, T, m, dtype=torch.bool, device=p.device)
    pv = p.view(B, Hk, G, T, nc)
    step = max(1, SELECT_ELEMENTS // max(1, B * Hk * nb))
    for a in range(0, T, step):
        e = min(T, a + step)
        imp = pv[:, :, :, a:e].sum(2)
        imp = torch.nn.functional.pad(imp, (0, nb - nc))  # the partial last block has no score
        own = torch.arange(S - T + a, S - T + e, device=p.device).unsqueeze(1) // b  # [t, 1]
        score = imp.masked_fill_(j > own, float("-inf")).masked_fill_((j == own) | (j == 0), float("inf"))
        if score.dtype == torch.float32:
            # the top m by score, ties to the earlier block (the reference's stable order), by
            # topk on unique int64 keys instead of a full sort: a float32 >= 0 orders like its bit
            # pattern, so key = bits * nb + (nb - 1 - j); hidden blocks (-inf) get the lowest keys
            bits = score.clamp(min=0.0).view(torch.int32).to(torch.int64)  # -0.0 -> +0.0; +inf kept
            key = bits.mul_(nb).add_(nb - 1 - j).masked_fill_(score == float("-inf"), -1)
            sel = key.topk(m, dim=-1).indices
            top = torch.gather(score, -1, sel)
        else:  # float64: a stable sort (the keys above need 32-bit floats)
            order = score.sort(dim=-1, descending=True, stable=True)
            sel, top = order.indices[..., :m], order.values[..., :m]
        forced = torch.isinf(top) & (top > 0)
        idx[:, :, a:e] = sel
        ok[:, :, a:e] = (top > float("-inf")) & ((rank < n) | forced)
    return idx, ok


def _buckets(counts, ratio=1.25):
    """Blocks grouped by how many pairs they hold: ``[(blocks [n], width)]`` with every count in
    a group within ``ratio`` of its largest, which is the group's padded width (less than 25% of
    padding per group, and few groups: counts span 1 .. T)."""
    order = torch.argsort(counts, descending=True, stable=True)
    sizes = counts[order].tolist()
    groups, i = [], 0
    while i < len(sizes) and sizes[i] > 0:
        j = i
        while j < len(sizes) and sizes[j] > 0 and sizes[j] * ratio >= sizes[i]:
            j += 1
        groups.append((order[i:j], sizes[i]))
        i = j
    return groups


def _selected_head(qh, kh, vh, idx, ok, pos, b, scale):
    """The selected branch for one key head: qh ``[T, G, K]`` (its query heads), kh ``[S, K]``,
    vh ``[S, V]``, idx/ok ``[T, m]``, query positions ``pos [T]``. Returns ``[T, G, V]``.

    The (query, block) pairs are grouped by block, so each block's b keys are read once for all
    the queries that selected it: one ``[pairs * G, K] @ [K, b]`` matmul per group of blocks.
    Only a query's own block can hold keys after it (a later block is never selected, and the
    partial last block is only the own block of its queries), so only own-block pairs, grouped
    apart, get a causal mask. Padding rows of a group write to a dummy query row ``T``."""
    T, G, K = qh.shape
    S = kh.shape[0]
    nb = -(-S // b)
    t_all = torch.arange(T, device=qh.device).unsqueeze(1).expand_as(idx)
    j_p, t_p = idx[ok], t_all[ok]  # every selected (block, query) pair
    pad = nb * b - S
    kb = torch.nn.functional.pad(kh, (0, 0, 0, pad)).view(nb, b, K)
    vb = torch.nn.functional.pad(vh, (0, 0, 0, pad)).view(nb, b, -1)
    offs = torch.arange(b, device=qh.device)
    q_flat = qh.reshape(T, G * K)
    # 1. every pair's scores, grouped by block (own-block pairs apart), and each query's largest
    parts = []
    M = torch.full((T + 1,), float("-inf"), dtype=qh.dtype, device=qh.device)
    own = j_p == pos[t_p] // b
    for sel in (own, ~own):
        j_s, t_s = j_p[sel], t_p[sel]
        order = torch.argsort(j_s, stable=True)
        j_s, t_s = j_s[order], t_s[order]
        counts = torch.bincount(j_s, minlength=nb)
        starts = torch.cumsum(counts, 0) - counts
        for blocks, width in _buckets(counts):
            n = len(blocks)
            r = torch.arange(width, device=qh.device)
            valid = r < counts[blocks].unsqueeze(1)  # [n, width]
            pair = (starts[blocks].unsqueeze(1) + r).masked_fill(~valid, 0)
            t = t_s[pair].masked_fill(~valid, T)  # padding rows -> the dummy row T
            qg = torch.index_select(q_flat, 0, t.clamp(max=T - 1).reshape(-1)).view(n, width * G, K)
            s = torch.bmm(qg, kb[blocks].transpose(1, 2)).mul_(scale).view(n, width, G, b)
            if sel is own:  # causal inside the own block (and the partial last block's padding)
                kpos = blocks.view(-1, 1, 1) * b + offs.view(1, 1, b)  # [n, 1, b]
                hidden = (kpos > pos[t.clamp(max=T - 1)].unsqueeze(-1)) & valid.unsqueeze(-1)
                s = s.masked_fill(hidden.unsqueeze(2), float("-inf"))
            # a stabiliser only (no gradient); every real row holds a visible key
            M = M.scatter_reduce(0, t.reshape(-1), s.detach().amax(-1).amax(-1).reshape(-1), "amax")
            parts.append((blocks, t, s))
    M[T] = float("inf")  # the dummy row: exp(s - inf) = 0
    # 2. exp(s - M) per pair, so the pairs of a query add up directly: o = sum e v / sum e
    num = qh.new_zeros((T + 1) * G, vb.shape[-1])
    den = qh.new_zeros((T + 1) * G)
    g = torch.arange(G, device=qh.device)
    for blocks, t, s in parts:
        n, width = t.shape
        e = exp_fast(s.sub_(M[t].view(n, width, 1, 1)))
        rows = (t.unsqueeze(-1) * G + g).reshape(-1)  # (query, head) rows
        num = num.index_add(0, rows, torch.bmm(e.view(n, width * G, b), vb[blocks]).view(-1, num.shape[-1]))
        den = den.index_add(0, rows, e.sum(-1).reshape(-1))
    return (num[: T * G] / den[: T * G].unsqueeze(-1)).view(T, G, -1)


def selected(q, k, v, idx, ok, b, scale):
    """Selected-block attention ``[B, T, H, V]``, one (batch, key head) at a time; each runs
    under activation checkpointing, so the backward recomputes it instead of keeping its
    per-pair scores."""
    B, T, H, K = q.shape
    S, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    pos = torch.arange(S - T, S, device=q.device)
    grad = records_grad(q, k, v)
    qv = q.view(B, T, Hk, G, K)
    outs = []
    for bi in range(B):
        heads = []
        for h in range(Hk):
            args = (qv[bi, :, h], k[bi, :, h], v[bi, :, h], idx[bi, h], ok[bi, h], pos, b, scale)
            heads.append(
                checkpoint(_selected_head, *args, use_reentrant=False) if grad else _selected_head(*args)
            )
        outs.append(torch.stack(heads, 1))  # [T, Hk, G, V]
    return torch.stack(outs).view(B, T, H, -1)


def windowed_suffix(q, k, v, window, scale):
    """Sliding-window attention of queries that are the last T of S positions (T < S)."""
    _, T, H, _ = q.shape
    S, Hk = k.shape[1], k.shape[2]
    lo = max(0, S - T - window + 1)
    kk, vv = _expand(k[:, lo:], H // Hk), _expand(v[:, lo:], H // Hk)
    s = torch.einsum("bthk,bjhk->bhtj", q, kk) * scale
    pos = torch.arange(S - T, S, device=q.device)[:, None]
    j = torch.arange(lo, S, device=q.device)[None, :]
    s = s.masked_fill((j > pos) | (j <= pos - window), float("-inf"))
    return torch.einsum("bhtj,bjhv->bthv", torch.softmax(s, -1), vv)


def chunk_nsa(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window, scale, chunk):
    from subquad.ops.attention import attention

    cd = state_dtype(q.dtype)
    q, k, v, g_cmp, g_slc, g_swa = (x.to(cd) for x in (q, k, v, g_cmp, g_slc, g_swa))
    T, S, Hk = q.shape[1], k.shape[1], k.shape[2]
    o_cmp, p = compressed(q, k, v, block_size, scale)
    idx, ok = select(p, S, T, block_size, block_count, Hk)
    o_slc = selected(q, k, v, idx, ok, block_size, scale)
    if T == S:
        o_swa = attention(q, k, v, window=window, scale=scale, chunk_size=chunk)
    else:
        o_swa = windowed_suffix(q, k, v, window, scale)
    return g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_swa.unsqueeze(-1) * o_swa
