"""Block-sparse attention: only the kept (query block, key block) pairs are computed.

Shape legend: B batch, T time, H heads, K key dim, V value dim, b block size, nb blocks,
BH = B * H, R query rows (one row = one query block of one batch-head), c kept key blocks of a row.

A block mask ``[B, H, nb, nb]`` says which key blocks each query block reads (intersected with
the causal / window rule at token level). Rows are grouped by how many key blocks they keep; a
group of rows with c blocks each gathers its keys and values once, ``[R, c*b, D]``, and runs an
ordinary (single-pass) softmax over them: one matmul for the scores ``[R, b, c*b]``, one exp pass,
one matmul with the values. Wider matmuls than one block at a time, no online rescaling, each
query row read once. Groups are cut into pieces of about 2^21 score elements (2^23 where the
pieces go to torch's fused kernel, below), so memory is bounded by that plus the gathered keys of
one piece; work is proportional to the kept pairs.
Only pairs cut by the causal diagonal, the window edge or the padding get a token mask.

The backward recomputes each piece's probabilities from the saved lse,
``P = exp(S - lse)``, writes ``dQ = dS K`` for its rows and scatters ``dK = dS^T Q``,
``dV = P^T dO`` to the key blocks with ``index_add`` (a key block serves many rows).

On CPU (with K == V) a piece whose token mask is at most the shared diagonal one (every row's last
kept block is its diagonal, the common causal case) runs its softmax in torch's fused CPU attention
kernel instead, one call per piece with the rows as the batch and one ``[b, c*b]`` mask, forward
and backward; pieces with other cuts, and gradients flowing into lse, use the matmul path.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import exp_fast, pad_time, state_dtype
from subquad.ops.attention.chunk import _from_blocks, _to_blocks
from subquad.ops.attention.masks import allowed
from subquad.ops.attention.window import _FLASH, _FLASH_BWD, fused_kernel_applies, has_lse_grad

PIECE = 2**21  # score elements per piece of a group
# ... when the pieces go to torch's fused kernel, which holds no scores of its own: fewer, larger
# calls. At T = 16K (B = 1, H = 8, D = 64, b = 128, 2 threads, AMD EPYC VM, one process, sizes
# interleaved, medians of 5), forward / forward+backward at 2^21, 2^22, 2^23 score elements:
# 10% random blocks 0.447 / 1.323, 0.411 / 1.295, 0.403 / 1.296 s; Quest's mask 0.468 / 1.499,
# 0.473 / 1.436, 0.397 / 1.304 s; vertical-slash even. The forward's peak grew by 30-60 MB and
# forward+backward's by 90-120 MB. The matmul path, which holds a piece's scores, got no faster
# (2^21 / 2^23: 0.473 / 1.485 against 0.509 / 1.464 s) and so keeps PIECE
FUSED_PIECE = 2**23


class _Plan:
    """Rows of a block mask grouped by their number of kept key blocks, cut into pieces.

    ``pieces``: list of ``(rows [R], keys [R, c], mask or None)`` with rows and keys indexing the
    block-major ``[nb * BH, b, D]`` tensors; ``mask`` is ``(cut_r, cut_s, hidden [n, b, b])``: the
    (row, slot) pairs cut by the diagonal, window edge or padding and their hidden tokens.
    A piece holds about ``piece`` score elements; one whose token masks differ from row to row
    (``cut_r`` given: the matmul path) is cut at PIECE. (A backward given a gradient on lse runs
    every piece by the matmul path, so with FUSED_PIECE its scores take up to 2^23 values.)
    """

    def __init__(self, block_mask, T, b, causal, window, piece=PIECE):
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
        self.kept = int(keep.sum())
        counts = keep.sum(-1)  # [BH, nb]
        # only pairs cut by the diagonal, the window edge or the padding need a token mask
        need = torch.zeros(nb, nb, dtype=torch.bool, device=dev)
        if nb * b > T:
            need[:, nb - 1] = True
        if causal:
            need |= I_ == J_
        if window is not None:
            need |= ((I_ - J_).abs() + 1) * b - 1 >= window
        pos = torch.arange(b, device=dev)
        self.pieces = []
        for c in counts.unique().tolist():
            if c == 0:
                continue
            bh, I = (counts == c).nonzero(as_tuple=True)
            J = keep[bh, I].nonzero(as_tuple=True)[1].view(-1, c)  # [R, c] ascending
            rows, keys = I * BH + bh, J * BH + bh[:, None]
            cut = need[I[:, None], J]  # [R, c]
            step, small = (max(1, n // (b * b * c)) for n in (piece, PIECE))
            for s in range(0, len(rows), step):
                sl = slice(s, min(s + step, len(rows)))
                mask = self._mask(I[sl], J[sl], cut[sl], T, b, causal, window, pos)
                if step > small and mask is not None and mask[0] is not None:
                    for s2 in range(sl.start, sl.stop, small):
                        sl2 = slice(s2, min(s2 + small, sl.stop))
                        mask2 = self._mask(I[sl2], J[sl2], cut[sl2], T, b, causal, window, pos)
                        self.pieces.append((rows[sl2], keys[sl2], mask2))
                else:
                    self.pieces.append((rows[sl], keys[sl], mask))

    @staticmethod
    def _mask(I, J, cut, T, b, causal, window, pos):
        """The token mask of a piece of rows (query blocks I [R], key blocks J [R, c], cut pairs
        cut [R, c]): None, or ``(cut_r, cut_s, hidden)`` as in the class docstring."""
        R, c = J.shape
        nb = -(-T // b)
        cut_r, cut_s = cut.nonzero(as_tuple=True)  # the cut (row, slot) pairs
        if not len(cut_r):
            return None
        Ic, Jc = I[cut_r], J[cut_r, cut_s]
        qi = (Ic * b).view(-1, 1, 1) + pos.view(1, b, 1)
        kj = (Jc * b).view(-1, 1, 1) + pos.view(1, 1, b)
        # every row cut on its last kept block: one mask for all rows if they share it. Pairs at
        # one block offset I - J, away from the padded last block, do (the mask depends on i - j
        # only), so it is made once; otherwise the masks are compared
        on_last = len(cut_r) == R and bool((cut_s == c - 1).all())
        d = Ic - Jc
        padded = nb * b > T and bool((Ic == nb - 1).any() or (Jc == nb - 1).any())
        if on_last and bool((d == d[0]).all()) and not padded:
            # the common causal case: every row's last kept block is its diagonal
            return (None, None, ~allowed(qi[0], kj[0], causal, window, 0, T))
        hidden = ~allowed(qi, kj, causal, window, 0, T).expand(len(cut_r), b, b)
        shared = on_last and bool((hidden == hidden[0]).all())
        return (None, None, hidden[0]) if shared else (cut_r, cut_s, hidden)


def _scores(qs, k, rows, keys, mask):
    """Scores of a piece ``[R, b, c*b]``, -inf where a token of a cut pair is not visible."""
    R, c = keys.shape
    b = k.shape[1]
    kk = torch.index_select(k, 0, keys.reshape(-1)).view(R, c * b, -1)
    s = torch.bmm(torch.index_select(qs, 0, rows), kk.transpose(1, 2))
    if mask is not None:
        cut_r, cut_s, hidden = mask
        s4 = s.view(R, b, c, b)
        if cut_r is None:  # the same token mask on every row's last slot: one strided pass
            s4[:, :, c - 1, :].masked_fill_(hidden, float("-inf"))
        else:
            s4[cut_r, :, cut_s, :] = s4[cut_r, :, cut_s, :].masked_fill_(hidden, float("-inf"))
    return s, kk


def _fused(q, v, mask):
    """Whether a piece goes to the fused kernel, and its float mask ``[b, c*b]`` (or None)."""
    if not fused_kernel_applies(q, v):
        return False, None
    if mask is None:
        return True, None
    cut_r, _, hidden = mask
    if cut_r is not None:
        return False, None
    return True, hidden


def _float_mask(hidden, c, dtype):
    """The shared diagonal token mask as the kernel's additive ``[b, c*b]`` mask."""
    b = hidden.shape[0]
    m = torch.zeros(b, c, b, dtype=dtype, device=hidden.device)
    m[:, c - 1].masked_fill_(hidden, float("-inf"))
    return m.view(b, c * b)


def _gather(x, idx, R, width):
    """Blocks ``idx`` of ``x [NR, b, D]`` as ``[R, 1, width, D]`` (rows as the kernel's batch)."""
    return torch.index_select(x, 0, idx.reshape(-1)).view(R, 1, width, x.shape[-1])


def _sparse_forward(q, k, v, plan, scale):
    NR, b, _ = q.shape
    Vd = v.shape[-1]
    qs = None
    o = torch.zeros(NR, b, Vd, dtype=q.dtype, device=q.device)
    lse = torch.full((NR, b), float("inf"), dtype=q.dtype, device=q.device)
    for rows, keys, mask in plan.pieces:
        R, c = keys.shape
        fused, hidden = _fused(q, v, mask)
        if fused:
            am = None if hidden is None else _float_mask(hidden, c, q.dtype)
            o_r, l_r = _FLASH(
                _gather(q, rows, R, b), _gather(k, keys, R, c * b), _gather(v, keys, R, c * b),
                attn_mask=am, scale=scale,
            )  # fmt: skip
            o.index_copy_(0, rows, o_r.view(R, b, Vd))
            lse.index_copy_(0, rows, l_r.view(R, b))
            continue
        qs = q * scale if qs is None else qs
        s, _ = _scores(qs, k, rows, keys, mask)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill_(m == float("-inf"), 0.0)
        p = exp_fast(s.sub_(m))
        vv = torch.index_select(v, 0, keys.reshape(-1)).view(R, c * b, Vd)
        l = p.sum(-1)  # [R, b]
        seen = l > 0  # a query none of whose kept keys is visible gets o = 0, lse = +inf
        o.index_copy_(0, rows, torch.bmm(p, vv).div_(torch.where(seen, l, 1.0).unsqueeze(-1)))
        lse.index_copy_(0, rows, torch.where(seen, m.squeeze(-1) + torch.log(l), float("inf")))
    return o, lse


def _sparse_backward(q, k, v, o, lse, do, dlse, plan, scale):
    with_dlse = has_lse_grad(dlse)
    delta = (do * o).sum(-1) - dlse
    qs = None
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    b = q.shape[1]
    for rows, keys, mask in plan.pieces:
        R, c = keys.shape
        flat = keys.reshape(-1)
        fused, hidden = _fused(q, v, mask)
        if fused and not with_dlse:
            am = None if hidden is None else _float_mask(hidden, c, q.dtype)
            gq, gk, gv = _FLASH_BWD(
                _gather(do, rows, R, b), _gather(q, rows, R, b), _gather(k, keys, R, c * b),
                _gather(v, keys, R, c * b), _gather(o, rows, R, b),
                torch.index_select(lse, 0, rows).view(R, 1, b), 0.0, False, attn_mask=am, scale=scale,
            )  # fmt: skip
            dq.index_copy_(0, rows, gq.view(R, b, -1))
            dk.index_add_(0, flat, gk.view(R * c, b, -1))
            dv.index_add_(0, flat, gv.view(R * c, b, -1))
            continue
        qs = q * scale if qs is None else qs
        s, kk = _scores(qs, k, rows, keys, mask)
        p = exp_fast(s.sub_(torch.index_select(lse, 0, rows).unsqueeze(-1)))  # lse = +inf gives p = 0
        do_r = torch.index_select(do, 0, rows)
        vv = torch.index_select(v, 0, flat).view(R, c * b, -1)
        dv.index_add_(0, flat, torch.bmm(p.transpose(1, 2), do_r).view(R * c, b, -1))
        ds = p.mul_(
            torch.bmm(do_r, vv.transpose(1, 2)).sub_(torch.index_select(delta, 0, rows).unsqueeze(-1))
        )
        dq.index_copy_(0, rows, torch.bmm(ds, kk).mul_(scale))
        q_r = torch.index_select(qs, 0, rows)
        dk.index_add_(0, flat, torch.bmm(ds.transpose(1, 2), q_r).view(R * c, b, -1))
    return dq, dk, dv


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        o, lse = _sparse_forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dlse = torch.where(torch.isfinite(lse), dlse, 0.0)
        dq, dk, dv = _sparse_backward(q, k, v, o, lse, do.contiguous(), dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


def sparse_attention(q, k, v, block_mask, causal, window, scale, b):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads matched), block_mask bool
    ``[B, H, nb, nb]`` at block size b: ``(o, lse [B, T, H])``."""
    B, T, H, _ = q.shape
    cd = state_dtype(q.dtype)
    plan = _Plan(block_mask, T, b, causal, window, FUSED_PIECE if fused_kernel_applies(q, v) else PIECE)
    qb, kb, vb = (_to_blocks(pad_time(x, b), b, cd) for x in (q, k, v))
    nb = qb.shape[0]
    flat = [x.reshape(nb * B * H, b, x.shape[-1]) for x in (qb, kb, vb)]
    o, lse = _SparseAttention.apply(*flat, plan, scale)
    o = _from_blocks(o.view(nb, B * H, b, -1), B, H, T).to(q.dtype)
    lse = _from_blocks(lse.view(nb, B * H, b, 1), B, H, T).squeeze(-1)
    return o, lse
