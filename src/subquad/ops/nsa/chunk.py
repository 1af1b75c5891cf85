"""Native Sparse Attention, batched: the three branches as tensor programs.

Shape legend: B batch, T queries, S keys (query t at position S - T + t), H query heads,
Hk key/value heads, G = H / Hk, K key dim, V value dim, b block size, nc complete blocks,
nb = ceil(S / b) blocks, n selected blocks, C query chunk.

- cmp: one masked softmax of every query against the nc mean-pooled blocks, ``[B, H, T, nc]``
  (T * S / b scores: 1/b of dense attention), autograd through it.
- selection: the group-summed cmp probabilities, the first and own blocks forced, top-n by a
  stable sort (ties to the earlier block, as in the reference); no gradient flows through it.
- slc: per chunk of C queries, the union of the blocks they selected (U blocks, at most C * n and
  at most nb) is gathered once, ``[B, Hk, U*b, D]``, and attended with one masked softmax in which
  each query sees only its own blocks; each chunk runs under activation checkpointing, so the
  backward recomputes the gather instead of keeping the gathered keys. Cost per chunk C * U * b:
  between sparse (neighbouring queries agree) and dense (they pick disjoint blocks).
- swa: the tiled ``attention(window=w)`` when T = S; for a suffix of queries (decoding), one
  masked softmax over the last ``w + T - 1`` keys.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from subquad.ops._common.chunking import state_dtype


def _expand(x, G):
    return x if G == 1 else x.repeat_interleave(G, dim=2)


def compressed(q, k, v, b, scale):
    """``(o_cmp [B, T, H, V], p [B, H, T, nc])``: attention over the mean-pooled complete blocks."""
    B, T, H, K = q.shape
    S, Hk = k.shape[1], k.shape[2]
    nc = S // b
    if nc == 0:
        return q.new_zeros(B, T, H, v.shape[-1]), q.new_zeros(B, H, T, 0)
    kc = _expand(k[:, : nc * b].reshape(B, nc, b, Hk, K).mean(2), H // Hk)
    vc = _expand(v[:, : nc * b].reshape(B, nc, b, Hk, -1).mean(2), H // Hk)
    s = torch.einsum("bthk,bjhk->bhtj", q, kc) * scale
    pos = torch.arange(S - T, S, device=q.device)
    ends = (torch.arange(nc, device=q.device) + 1) * b - 1
    s = s.masked_fill(ends[None, :] > pos[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # queries before the first complete block: none seen
    return torch.einsum("bhtj,bjhv->bthv", p, vc), p


@torch.no_grad()
def select(p, S, T, b, n, Hk):
    """``(idx [B, Hk, T, m], ok [B, Hk, T, m])``: the blocks each query of each key head reads."""
    B, H, _, nc = p.shape
    G = H // Hk
    nb = -(-S // b)
    imp = p.view(B, Hk, G, T, nc).sum(2)
    imp = torch.nn.functional.pad(imp, (0, nb - nc))  # the partial last block has no score
    pos = torch.arange(S - T, S, device=p.device)
    own = pos // b  # [T]
    j = torch.arange(nb, device=p.device)
    score = imp.masked_fill(j[None, :] > own[:, None], float("-inf"))
    score = score.masked_fill((j[None, :] == own[:, None]) | (j[None, :] == 0), float("inf"))
    m = min(max(n, 2), nb)
    order = score.sort(dim=-1, descending=True, stable=True)
    idx, top = order.indices[..., :m], order.values[..., :m]
    rank = torch.arange(m, device=p.device)
    forced = torch.isinf(top) & (top > 0)
    ok = (top > float("-inf")) & ((rank < n) | forced)
    return idx, ok


def _selected_chunk(q, k, v, idx, ok, pos, b, scale):
    """q ``[B, C, H, K]`` at positions ``pos [C]``; k, v ``[B, S, Hk, D]``; idx/ok ``[B, Hk, C, m]``."""
    B, C, H, K = q.shape
    S, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    nb = -(-S // b)
    # 1. the union of the blocks any query of the chunk selected, per (batch, key head): neighbouring
    #    queries mostly pick the same blocks, so one gather serves all C queries and the scores are one
    #    [G*C, U*b] matmul per head instead of C matrix-vector products over per-query copies
    sel = torch.zeros(B, Hk, C, nb, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, idx, ok)  # [B, Hk, C, nb]
    union = sel.any(2)  # [B, Hk, nb]
    U = max(1, int(union.sum(-1).max()))
    uidx = union.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[..., :U]  # [B, Hk, U]
    uok = union.gather(-1, uidx)
    # 2. gather the union's keys and values once: [B, Hk, U*b, D]
    tok = (uidx.unsqueeze(-1) * b + torch.arange(b, device=q.device)).view(B, Hk, U * b)
    real = tok < S  # the partial last block's missing tokens
    flat = tok.clamp(max=S - 1).unsqueeze(-1)
    kg = k.transpose(1, 2).gather(2, flat.expand(-1, -1, -1, K))
    vg = v.transpose(1, 2).gather(2, flat.expand(-1, -1, -1, v.shape[-1]))
    # 3. each query sees the union tokens of its own selected blocks, causally
    mine = sel.gather(-1, uidx.unsqueeze(2).expand(B, Hk, C, U)) & uok.unsqueeze(2)  # [B, Hk, C, U]
    seen = mine.unsqueeze(-1).expand(B, Hk, C, U, b).reshape(B, Hk, C, U * b)
    seen = seen & real.unsqueeze(2) & (tok.unsqueeze(2) <= pos.view(1, 1, C, 1))
    qg = q.view(B, C, Hk, G, K).permute(0, 2, 3, 1, 4)  # [B, Hk, G, C, K]
    s = torch.einsum("bhgck,bhsk->bhgcs", qg, kg) * scale
    s = s.masked_fill(~seen.unsqueeze(2), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = torch.einsum("bhgcs,bhsv->bhgcv", p, vg)  # [B, Hk, G, C, V]
    return o.permute(0, 3, 1, 2, 4).reshape(B, C, H, -1)


def selected(q, k, v, idx, ok, b, scale, chunk):
    T = q.shape[1]
    S = k.shape[1]
    pos = torch.arange(S - T, S, device=q.device)
    outs = []
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    for a in range(0, T, chunk):
        e = min(a + chunk, T)
        args = (q[:, a:e], k, v, idx[:, :, a:e], ok[:, :, a:e], pos[a:e], b, scale)
        outs.append(
            checkpoint(_selected_chunk, *args, use_reentrant=False) if grad else _selected_chunk(*args)
        )
    return torch.cat(outs, 1)


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
    o_slc = selected(q, k, v, idx, ok, block_size, scale, chunk)
    if T == S:
        o_swa = attention(q, k, v, window=window, scale=scale, chunk_size=min(256, max(16, window)))
    else:
        o_swa = windowed_suffix(q, k, v, window, scale)
    return g_cmp.unsqueeze(-1) * o_cmp + g_slc.unsqueeze(-1) * o_slc + g_swa.unsqueeze(-1) * o_swa
