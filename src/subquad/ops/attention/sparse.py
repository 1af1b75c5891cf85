"""Block-sparse attention: only the kept (query block, key block) pairs are computed.

Shape legend: B batch, T time, H heads, K key dim, V value dim, b block size, nb blocks,
BH = B * H, n pairs in a round.

A block mask ``[B, H, nb, nb]`` says which key blocks each query block reads (intersected with
the causal / window rule at token level). The kept pairs are grouped in *rounds*: round r holds
the r-th kept key block of every query block that has one, so within a round each query row
appears once and the online-softmax update is one batched matmul over the round's pairs
(gathered from the block-major ``[nb * BH, b, D]`` tensors). Rounds = the most blocks any query
block keeps; work and memory are proportional to the kept pairs. The backward recomputes each
round's probabilities from the saved lse and scatters dK, dV with ``index_add`` (a key block may
serve several query blocks of a round).
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import pad_time, state_dtype
from subquad.ops.attention.chunk import _from_blocks, _to_blocks
from subquad.ops.attention.masks import allowed


class _Rounds:
    """Kept pairs of a block mask, grouped so that each round touches each query row once."""

    def __init__(self, block_mask, T, b, causal, window):
        B, H, nb, _ = block_mask.shape
        BH = B * H
        dev = block_mask.device
        keep = block_mask.reshape(BH, nb, nb).clone()
        blocks = torch.arange(nb, device=dev)
        # drop pairs no token of which is visible (strictly above the diagonal, beyond the window)
        I_, J_ = blocks[:, None], blocks[None, :]
        if causal:
            keep &= J_ <= I_
        if window is not None:
            reach = (window + b - 2) // b
            keep &= (I_ - J_).abs() <= reach
        bh, I, J = keep.nonzero(as_tuple=True)  # sorted by (bh, I, J)
        qrow, krow = I * BH + bh, J * BH + bh
        # rank of each pair among its query row's pairs (rows are contiguous in nonzero order)
        first = torch.ones_like(qrow, dtype=torch.bool)
        first[1:] = qrow[1:] != qrow[:-1]
        start = torch.cummax(torch.where(first, torch.arange(len(qrow), device=dev), 0), 0).values
        rank = torch.arange(len(qrow), device=dev) - start
        # only pairs cut by the diagonal, the window edge or the padding need a token mask
        need = (J == nb - 1) if nb * b > T else torch.zeros_like(I, dtype=torch.bool)
        if causal:
            need |= I == J
        if window is not None:
            need |= ((I - J).abs() + 1) * b - 1 >= window
        pos = torch.arange(b, device=dev)
        self.rounds = []
        for r in range(int(rank.max()) + 1 if len(rank) else 0):
            sel = (rank == r).nonzero().squeeze(1)
            cut = need[sel].nonzero().squeeze(1)  # positions within the round
            qi = (I[sel][cut] * b).view(-1, 1, 1) + pos.view(1, b, 1)
            kj = (J[sel][cut] * b).view(-1, 1, 1) + pos.view(1, 1, b)
            mask = (cut, allowed(qi, kj, causal, window, 0, T)) if len(cut) else None
            self.rounds.append((qrow[sel], krow[sel], mask))
        self.kept = len(qrow)


def _round_scores(qs, k, qr, kr, mask):
    """Scores of one round's pairs ``[n, b, b]``, -inf where a cut pair's token is not visible."""
    s = torch.bmm(qs[qr], k[kr].transpose(1, 2))
    if mask is not None:
        cut, visible = mask
        s[cut] = s[cut].masked_fill_(~visible, float("-inf"))
    return s


def _sparse_forward(q, k, v, rounds, scale):
    R, b, _ = q.shape
    Vd = v.shape[-1]
    qs = q * scale
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)  # p @ [v | 1] also sums p
    m = torch.full((R, b), float("-inf"), dtype=q.dtype, device=q.device)
    acc = torch.zeros(R, b, Vd + 1, dtype=q.dtype, device=q.device)
    for qr, kr, mask in rounds.rounds:
        s = _round_scores(qs, k, qr, kr, mask)
        m_old = m[qr]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        p = s.sub_(m_safe.unsqueeze(-1)).exp_()
        corr = torch.exp(m_old - m_safe)
        acc.index_copy_(0, qr, acc[qr].mul_(corr.unsqueeze(-1)).add_(torch.bmm(p, v1[kr])))
        m.index_copy_(0, qr, m_new)
    l = acc[..., Vd]
    seen = l > 0  # a query none of whose kept keys is visible gets o = 0, lse = +inf
    lse = torch.where(seen, m + torch.log(l), float("inf"))
    return acc[..., :Vd] / torch.where(seen, l, 1.0).unsqueeze(-1), lse


def _sparse_backward(q, k, v, o, lse, do, dlse, rounds, scale):
    delta = (do * o).sum(-1) - dlse
    qs = q * scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qr, kr, mask in rounds.rounds:
        s = _round_scores(qs, k, qr, kr, mask)
        p = s.sub_(lse[qr].unsqueeze(-1)).exp_()
        do_r = do[qr]
        dv.index_add_(0, kr, torch.bmm(p.transpose(1, 2), do_r))
        ds = p.mul_(torch.bmm(do_r, v[kr].transpose(1, 2)).sub_(delta[qr].unsqueeze(-1)))
        dq.index_add_(0, qr, torch.bmm(ds, k[kr]))
        dk.index_add_(0, kr, torch.bmm(ds.transpose(1, 2), qs[qr]))
    return dq.mul_(scale), dk, dv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rounds, scale):
        o, lse = _sparse_forward(q, k, v, rounds, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.rounds, ctx.scale = rounds, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _sparse_backward(q, k, v, o, lse, do.contiguous(), dlse, ctx.rounds, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q, k, v, block_mask, causal, window, scale, b):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads matched), block_mask bool
    ``[B, H, nb, nb]`` at block size b: ``(o, lse [B, T, H])``."""
    B, T, H, _ = q.shape
    cd = state_dtype(q.dtype)
    rounds = _Rounds(block_mask, T, b, causal, window)
    qb, kb, vb = (_to_blocks(pad_time(x, b), b, cd) for x in (q, k, v))
    nb = qb.shape[0]
    flat = [x.reshape(nb * B * H, b, x.shape[-1]) for x in (qb, kb, vb)]
    o, lse = _SparseAttention.apply(*flat, rounds, scale)
    o = _from_blocks(o.view(nb, B * H, b, -1), B, H, T).to(q.dtype)
    lse = _from_blocks(lse.view(nb, B * H, b, 1), B, H, T).squeeze(-1)
    return o, lse
