"""Neighbourhoods and the gathered (chunk) form of neighborhood attention.

Shape legend: B batch, N tokens (the product of the grid's sizes), H heads, K key dim, V value dim,
M neighbour slots per query (the product of the kernel sizes), C queries per chunk.
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
