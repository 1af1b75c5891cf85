"""Neighbourhoods and the two chunk forms of neighborhood attention: tiled (dilation 1) and gathered.

Shape legend: B batch, N tokens (the product of the grid's sizes), H heads, K key dim, V value dim,
M neighbour slots per query (the product of the kernel sizes), C queries per chunk; tiled form: n
tiles, Q queries and R keys per tile.
"""

from __future__ import annotations

import math

import torch

# gathered key and value values per chunk (C * M * H * max(K, V)): bounds the chunk form's memory
GATHER_ELEMENTS = 1 << 21


def axis_neighbours(L: int, k: int, d: int, causal: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of one grid axis of size L: the positions of its neighbours ``[L, k]`` (long)
    and which slots hold one ``[L, k]`` (bool). Position i lies in dilation group ``i mod d``, at
    rank ``i // d`` of the group's ``n`` members. Non-causal: the ``min(k, n)`` consecutive members
    starting at ``clamp(rank - k // 2, 0, n - min(k, n))`` (centred, shifted inwards at the ends).
    Causal: the members of rank ``rank - k + 1 .. rank`` that exist. Empty slots point at position
    i itself (any valid index) and are masked."""
    i = torch.arange(L, device=device)
    group, rank = i % d, i // d
    n = (L - group + d - 1) // d  # members of i's group
    slot = torch.arange(k, device=device)
    if causal:
        members = rank.view(-1, 1) - (k - 1) + slot  # ranks rank - k + 1 .. rank
        ok = members >= 0
    else:
        width = n.clamp(max=k)
        start = torch.minimum((rank - k // 2).clamp(min=0), n - width)
        members = start.view(-1, 1) + slot
        ok = slot.view(1, -1) < width.view(-1, 1)
    pos = group.view(-1, 1) + d * members
    return torch.where(ok, pos, i.view(-1, 1)), ok


def neighbours(grid, kernel, dilation, causal, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token indices ``[N, M]`` of every token's neighbourhood on the row-major grid (the
    product of the per-axis neighbourhoods) and which slots are real ``[N, M]``."""
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)
    ok = torch.ones(1, 1, dtype=torch.bool, device=device)
    for L, k, d, c in zip(grid, kernel, dilation, causal, strict=True):
        pos, valid = axis_neighbours(L, k, d, c, device)
        # [N_prev, M_prev] x [L, k] -> [N_prev * L, M_prev * k] (row-major: the new axis varies fastest)
        idx = (idx.view(-1, 1, idx.shape[1], 1) * L + pos.view(1, L, 1, k)).reshape(-1, idx.shape[1] * k)
        ok = (ok.view(-1, 1, ok.shape[1], 1) & valid.view(1, L, 1, k)).reshape(-1, ok.shape[1] * k)
    return idx, ok


def _chunks(N: int, M: int, H: int, D: int) -> range:
    step = max(1, GATHER_ELEMENTS // max(1, M * H * D))
    return range(0, N, step)


def _gather(x, idx):
    """Rows ``idx [C, M]`` of ``x [B, N, H, D]``: ``[B, C, M, H, D]``."""
    return x.index_select(1, idx.flatten()).view(x.shape[0], *idx.shape, *x.shape[2:])


def _scores(q, k, idx, ok, scale):
    """Scores ``[B, C, M, H]`` of queries ``q [B, C, H, K]`` against their gathered neighbours
    (masked slots at -inf) and the gathered keys ``[B, C, M, H, K]``. Products and sums over the
    head dim, not einsum: with M in the tens, einsum's batched matmuls of one row took 6.8x as long
    (1.33 ms against 0.19 ms for C = 512, M = 7, H = 8, K = 64 on 2 cores)."""
    kg = _gather(k, idx)
    s = (kg * q.unsqueeze(2)).sum(-1).mul_(scale)
    return s.masked_fill_(~ok.view(1, *ok.shape, 1), -math.inf), kg


class _Gathered(torch.autograd.Function):
    """q, k ``[B, N, H, K]``, v ``[B, N, H, V]`` (compute dtype) -> ``o [B, N, H, V]``: each chunk of
    queries gathers its neighbours' keys and values, one softmax over the M slots. The backward
    recomputes the scores from the saved lse chunk by chunk (nothing of size N * M is kept) and
    scatters the key and value gradients back with ``index_add_``."""

    @staticmethod
    def forward(ctx, q, k, v, idx, ok, scale):
        B, N, H, K = q.shape
        o, lse = q.new_empty(B, N, H, v.shape[-1]), q.new_empty(B, N, H)
        chunks = _chunks(N, idx.shape[1], H, max(K, v.shape[-1]))
        for c0 in chunks:
            c1 = min(c0 + chunks.step, N)
            s, _ = _scores(q[:, c0:c1], k, idx[c0:c1], ok[c0:c1], scale)
            lse[:, c0:c1] = torch.logsumexp(s, 2)  # every query has itself as a neighbour: finite
            p = s.sub_(lse[:, c0:c1].unsqueeze(2)).exp_()  # [B, C, M, H]
            o[:, c0:c1] = (p.unsqueeze(-1) * _gather(v, idx[c0:c1])).sum(2)
        ctx.save_for_backward(q, k, v, o, lse, idx, ok)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, ok = ctx.saved_tensors
        scale = ctx.scale
        N, H, K = q.shape[1:]
        do = do.to(q.dtype)
        delta = (do * o).sum(-1)  # [B, N, H]: sum_m p dp, the softmax backward's row term
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        chunks = _chunks(N, idx.shape[1], H, max(K, v.shape[-1]))
        for c0 in chunks:
            c1 = min(c0 + chunks.step, N)
            flat = idx[c0:c1].flatten()
            s, kg = _scores(q[:, c0:c1], k, idx[c0:c1], ok[c0:c1], scale)
            p = s.sub_(lse[:, c0:c1].unsqueeze(2)).exp_()  # [B, C, M, H]
            dch = do[:, c0:c1].unsqueeze(2)  # [B, C, 1, H, V]
            dv.index_add_(1, flat, (p.unsqueeze(-1) * dch).flatten(1, 2))
            dp = (_gather(v, idx[c0:c1]) * dch).sum(-1)
            ds = p.mul_(dp.sub_(delta[:, c0:c1].unsqueeze(2))).mul_(scale).unsqueeze(-1)
            dq[:, c0:c1] = (ds * kg).sum(2)
            dk.index_add_(1, flat, (ds * q[:, c0:c1].unsqueeze(2)).flatten(1, 2))
        return dq, dk, dv, None, None, None


def gathered(q, k, v, idx, ok, scale):
    """The chunk form: ``o [B, N, H, V]`` (see ``_Gathered``)."""
    return _Gathered.apply(q, k, v, idx, ok, scale)


# queries per tile along each axis of the tiled form, by the number of axes. Kernel 7, B = 1, float32,
# 2 threads (forward / forward+backward, ms): 56 x 56 grid, H = 4, D = 32: 7.7 / 20.0 at 4, 9.8 /
# 24.7 at 5, 10.0 / 23.9 at 7, 12.3 / 27.4 at 8, 23.7 / 47.9 at 14 (the gathered form 14.6 / 50.8);
# T = 16K in 1D, H = 8, D = 64: 37.0 / 121.0 at 8, 37.1 / 112.4 at 12, 38.7 / 114.4 at 16, 50.8 /
# 139.1 at 32 (gathered 39.6 / 137.5). 3D is not measured: 3 keeps about 27 queries per tile
TILE = {1: 16, 2: 4, 3: 3}


def _axis_tiles(L: int, k: int, causal: bool, t: int, device):
    """One axis (dilation 1) cut into tiles of t queries: their positions ``[n, t]``, which of them
    the tile owns ``[n, t]`` (the last tile is moved back to end at L, and the positions an earlier
    tile already holds are not its own), its keys ``[n, R]`` (R = t + k - 1 consecutive positions,
    at most L, covering every window of its queries) and the band mask ``[n, t, R]``."""
    pos, ok = axis_neighbours(L, k, 1, causal, device)
    lo = torch.where(ok, pos, L).amin(1)  # the window of query i is [lo_i, hi_i]
    hi = torch.where(ok, pos, -1).amax(1)
    t = min(t, L)
    starts = list(range(0, L - t + 1, t))
    if starts[-1] + t < L:
        starts.append(L - t)
    s0 = torch.tensor(starts, device=device)
    qpos = s0.view(-1, 1) + torch.arange(t, device=device)
    owned = torch.ones_like(qpos, dtype=torch.bool)
    if len(starts) > 1 and starts[-1] < starts[-2] + t:
        owned[-1] = qpos[-1] >= starts[-2] + t
    R = min(t + k - 1, L)
    r0 = lo[qpos].amin(1).clamp(max=L - R)
    kpos = r0.view(-1, 1) + torch.arange(R, device=device)
    band = (kpos.view(-1, 1, R) >= lo[qpos].unsqueeze(-1)) & (kpos.view(-1, 1, R) <= hi[qpos].unsqueeze(-1))
    return qpos, owned, kpos, band


def tiles(grid, kernel, causal, device):
    """The tiled form's plan for a dilation-1 neighbourhood on the row-major grid: query indices
    ``[n, Q]``, owned ``[n, Q]``, key indices ``[n, R]`` and mask ``[n, Q, R]`` of every tile (the
    product of one axis tile per axis)."""
    t = TILE[len(grid)]
    qi = ki = torch.zeros(1, 1, dtype=torch.long, device=device)
    own = torch.ones(1, 1, dtype=torch.bool, device=device)
    mask = torch.ones(1, 1, 1, dtype=torch.bool, device=device)
    for L, k, c in zip(grid, kernel, causal, strict=True):
        qpos, owned, kpos, band = _axis_tiles(L, k, c, t, device)
        n, tq = qpos.shape
        R = kpos.shape[1]
        # [n_prev, X] x [n, x] -> [n_prev * n, X * x], the new axis varying fastest in both
        qi = (qi.view(-1, 1, qi.shape[1], 1) * L + qpos.view(1, n, 1, tq)).reshape(-1, qi.shape[1] * tq)
        ki = (ki.view(-1, 1, ki.shape[1], 1) * L + kpos.view(1, n, 1, R)).reshape(-1, ki.shape[1] * R)
        own = (own.view(-1, 1, own.shape[1], 1) & owned.view(1, n, 1, tq)).reshape(-1, own.shape[1] * tq)
        Qp, Rp = mask.shape[1:]
        mask = (mask.view(-1, 1, Qp, 1, Rp, 1) & band.view(1, n, 1, tq, 1, R)).reshape(-1, Qp * tq, Rp * R)
    return qi, own, ki, mask


def _tile_gather(x, idx):
    """Rows ``idx [n, Q]`` of ``x [B, N, H, D]`` as ``[B, n, H, Q, D]`` (matmul batches)."""
    return _gather(x, idx).permute(0, 1, 3, 2, 4)


def _untile(x):
    """``[B, n, H, Q, D]`` -> ``[B, n * Q, H, D]``, rows in the order of the flattened indices."""
    return x.permute(0, 1, 3, 2, 4).flatten(1, 2)


class _Tiled(torch.autograd.Function):
    """The tiled form (dilation 1): each tile of queries scores the union of their windows, ``R``
    keys, in one matmul, masked to each query's own window; one softmax, ``P @ V``. Tiles go in
    chunks (about GATHER_ELEMENTS gathered values); the backward recomputes from lse and scatters
    ``dK``, ``dV`` (and ``dQ``, since the last tile of an axis repeats queries that an earlier tile
    owns: those rows are zeroed in the backward and not written in the forward)."""

    @staticmethod
    def forward(ctx, q, k, v, qi, own, ki, mask, scale):
        B, N, H, K = q.shape
        o, lse = q.new_empty(B, N, H, v.shape[-1]), q.new_empty(B, N, H)
        chunks = _chunks(qi.shape[0], ki.shape[1], H, max(K, v.shape[-1]))
        for c0 in chunks:
            c1 = min(c0 + chunks.step, qi.shape[0])
            s = torch.matmul(_tile_gather(q, qi[c0:c1]), _tile_gather(k, ki[c0:c1]).transpose(-1, -2))
            s = s.mul_(scale).masked_fill_(~mask[c0:c1].unsqueeze(1), -math.inf)  # [B, n, H, Q, R]
            ls = torch.logsumexp(s, -1)
            ot = torch.matmul(s.sub_(ls.unsqueeze(-1)).exp_(), _tile_gather(v, ki[c0:c1]))
            sel = own[c0:c1].flatten()
            rows = qi[c0:c1].flatten()[sel]
            o.index_copy_(1, rows, _untile(ot)[:, sel])
            lse.index_copy_(1, rows, ls.permute(0, 1, 3, 2).flatten(1, 2)[:, sel])
        ctx.save_for_backward(q, k, v, o, lse, qi, own, ki, mask)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, qi, own, ki, mask = ctx.saved_tensors
        scale = ctx.scale
        H, K = q.shape[2:]
        do = do.to(q.dtype)
        delta = (do * o).sum(-1)  # [B, N, H]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        chunks = _chunks(qi.shape[0], ki.shape[1], H, max(K, v.shape[-1]))
        for c0 in chunks:
            c1 = min(c0 + chunks.step, qi.shape[0])
            qt, kt, vt = _tile_gather(q, qi[c0:c1]), _tile_gather(k, ki[c0:c1]), _tile_gather(v, ki[c0:c1])
            s = torch.matmul(qt, kt.transpose(-1, -2)).mul_(scale)
            s.masked_fill_(~mask[c0:c1].unsqueeze(1), -math.inf)
            # rows a tile does not own get P = 0: lse +inf there
            ls = _gather(lse.unsqueeze(-1), qi[c0:c1]).squeeze(-1).permute(0, 1, 3, 2)  # [B, n, H, Q]
            ls = ls.masked_fill(~own[c0:c1].unsqueeze(1), math.inf)
            p = s.sub_(ls.unsqueeze(-1)).exp_()
            dot = _tile_gather(do, qi[c0:c1])
            dl = _gather(delta.unsqueeze(-1), qi[c0:c1]).squeeze(-1).permute(0, 1, 3, 2)
            qrows, krows = qi[c0:c1].flatten(), ki[c0:c1].flatten()
            dv.index_add_(1, krows, _untile(torch.matmul(p.transpose(-1, -2), dot)))
            ds = p.mul_(torch.matmul(dot, vt.transpose(-1, -2)).sub_(dl.unsqueeze(-1))).mul_(scale)
            dq.index_add_(1, qrows, _untile(torch.matmul(ds, kt)))
            dk.index_add_(1, krows, _untile(torch.matmul(ds.transpose(-1, -2), qt)))
        return dq, dk, dv, None, None, None, None, None


def tiled(q, k, v, grid, kernel, causal, scale):
    """The tiled form for dilation 1: ``o [B, N, H, V]`` (see ``_Tiled``)."""
    qi, own, ki, mask = tiles(grid, kernel, causal, q.device)
    return _Tiled.apply(q, k, v, qi, own, ki, mask, scale)
