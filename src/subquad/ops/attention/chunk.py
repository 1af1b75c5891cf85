"""Exact tiled attention (the FlashAttention algorithm) with a recomputing backward, on CPU.

Shape legend: B batch, T time, H heads, K key dim, V value dim, b block size, nb blocks,
I query block, J key block, d = I - J the block offset.

Forward: online softmax over key blocks. A running max m, normalizer l and output accumulator
are kept per query row; each visited key block updates them, and o = acc / l,
lse = m + log l. Memory is O(T b), never O(T^2).

The visited (I, J) pairs are walked by offset d: for one d, every query block I pairs with key
block J = I - d, so all of them are one batched matmul (blocks are stored block-major,
``[nb, B*H, b, D]``, so the slices of one offset are contiguous). Causal attention visits
d = 0 .. nb-1, a window of w tokens only the ~w/b offsets it reaches, and attention sinks add one
pass over the first keys for the query blocks the window does not reach. Only block pairs cut
by the causal diagonal, the window edge or the padding are masked.

Backward recomputes the probabilities block by block from the saved lse,
``P = exp(S - lse)``, and accumulates ``dV += P^T dO``, ``dS = P * (dO V^T - delta)`` with
``delta = rowsum(dO * O)``, ``dQ += dS K``, ``dK += dS^T Q``: O(T b) memory again.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import exp_fast, pad_time, state_dtype
from subquad.ops.attention.masks import allowed
from subquad.ops.attention.window import (
    _FLASH,
    _FLASH_BWD,
    fused_kernel_applies,
    has_lse_grad,
    kernel_input,
    recompute_grads,
    window_attention,
)

# query block of the windowed path: 64 was fastest of 64 / 96 / 128 / 256 for window 512 at
# T = 16K on 2 cores (the span a block scores is w + b - 1 keys, so smaller blocks waste less)
WINDOW_BLOCK = 64


def _to_blocks(x: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, Tp, H, D]`` -> block-major ``[nb, B*H, b, D]`` (one copy)."""
    B, Tp, H, D = x.shape
    xp = x.view(B, Tp // b, b, H, D).permute(1, 0, 3, 2, 4)
    return torch.empty(xp.shape, dtype=dtype, device=x.device).copy_(xp).view(Tp // b, B * H, b, D)


def _from_blocks(x: torch.Tensor, B: int, H: int, T: int) -> torch.Tensor:
    """Block-major ``[nb, B*H, b, D]`` -> ``[B, T, H, D]``."""
    nb, _, b, D = x.shape
    return x.view(nb, B, H, b, D).permute(1, 0, 3, 2, 4).reshape(B, nb * b, H, D)[:, :T]


class _Plan:
    """The block pairs to visit: offsets ``d`` with their query / key block ranges and masks."""

    def __init__(self, T, b, causal, window, sinks, device):
        self.T, self.b, self.causal, self.window, self.sinks = T, b, causal, window, sinks
        nb = -(-T // b)
        self.nb = nb
        reach = nb - 1 if window is None else min(nb - 1, (window + b - 2) // b)
        self.offsets = range(0, reach + 1) if causal else range(-reach, reach + 1)
        self.pos = torch.arange(nb * b, device=device).view(nb, b)
        # sink pass over every query block, for the sink keys in blocks the offsets do not visit
        self.reach = reach
        self.sink_from = 0 if (window is not None and sinks and reach + 1 < nb) else None

    def pairs(self, d):
        """``(I0, I1, J0, J1, mask or None)`` for offset d (mask ``[nI, 1, b, b]``)."""
        nb, b = self.nb, self.b
        I0, I1 = max(0, d), nb + min(0, d)
        J0, J1 = I0 - d, I1 - d
        edge = self.window is not None and (abs(d) + 1) * b - 1 >= self.window
        padded = J1 == nb and nb * b > self.T
        if (self.causal and d == 0) or edge or padded:
            qi = self.pos[I0:I1].unsqueeze(-1)
            kj = self.pos[J0:J1].unsqueeze(-2)
            return I0, I1, J0, J1, allowed(qi, kj, self.causal, self.window, self.sinks, self.T).unsqueeze(1)
        return I0, I1, J0, J1, None

    def sink_mask(self):
        """Mask ``[nI, 1, b, s]`` of the first s keys for query blocks ``sink_from ..``: visible,
        and not in a block the offsets visit (those keys were counted there)."""
        s = min(self.sinks, self.T)
        qi = self.pos[self.sink_from :].unsqueeze(-1)  # [nI, b, 1]
        kj = torch.arange(s, device=qi.device).view(1, 1, s)
        q_block = torch.arange(self.sink_from, self.nb, device=qi.device).view(-1, 1, 1)
        offset = q_block - kj // self.b
        # causal: blocks earlier than the offsets reach; otherwise beyond them on either side
        ok = (offset > self.reach) & (kj <= qi) if self.causal else offset.abs() > self.reach
        return ok.unsqueeze(1)


def _first_keys(x: torch.Tensor, s: int) -> torch.Tensor:
    """The first s positions of block-major ``x [nb, BH, b, D]`` as ``[1, BH, s, D]``."""
    _, BH, b, D = x.shape
    n = -(-s // b)
    return x[:n].permute(1, 0, 2, 3).reshape(1, BH, n * b, D)[:, :, :s]


def _add_first_keys(x: torch.Tensor, grad: torch.Tensor) -> None:
    """``x[:, :, first s positions] += grad [BH, s, D]`` for block-major ``x``, in place."""
    _, BH, b, D = x.shape
    s = grad.shape[1]
    n = -(-s // b)
    full = grad.new_zeros(BH, n * b, D)
    full[:, :s] = grad
    x[:n] += full.view(BH, n, b, D).permute(1, 0, 2, 3)


def _scores(q, k, scale, mask):
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
    return s if mask is None else s.masked_fill_(~mask, float("-inf"))


# elements of one group's scores: query blocks of an offset are taken in groups this large so the
# several elementwise passes over the scores stay in the caches
GROUP_ELEMENTS = 1 << 19


def _groups(I0: int, I1: int, per_block: int):
    """Split query blocks ``I0 .. I1`` into runs of about GROUP_ELEMENTS score elements."""
    step = max(1, GROUP_ELEMENTS // max(1, per_block))
    return [(a, min(a + step, I1)) for a in range(I0, I1, step)]


def _forward(q, k, v, plan, scale):
    nb, BH, b, _ = q.shape
    Vd = v.shape[-1]
    qs = q * scale  # the scale rides on q: one pass over q instead of one over every score
    # a ones column after the values: p @ [v | 1] yields the weighted values and the row sums
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    m = torch.full((nb, BH, b), float("-inf"), dtype=q.dtype, device=q.device)
    acc = torch.zeros(nb, BH, b, Vd + 1, dtype=q.dtype, device=q.device)  # [.., V] and l

    def update(I0, I1, s, vb):
        # online softmax: rescale what was accumulated under the old max
        m_old = m[I0:I1]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing seen yet
        p = exp_fast(s.sub_(m_safe.unsqueeze(-1)))
        corr = torch.exp(m_old - m_safe)
        acc[I0:I1].mul_(corr.unsqueeze(-1)).add_(torch.matmul(p, vb))
        m_old.copy_(m_new)

    for d in plan.offsets:
        I0, I1, _, _, mask = plan.pairs(d)
        for a, e in _groups(I0, I1, BH * b * b):
            sub = None if mask is None else mask[a - I0 : e - I0]
            update(a, e, _scores(qs[a:e], k[a - d : e - d], 1.0, sub), v1[a - d : e - d])
    if plan.sink_from is not None:
        n_s = min(plan.sinks, plan.T)
        ks, vs = _first_keys(k, n_s), _first_keys(v1, n_s)
        update(plan.sink_from, nb, _scores(qs[plan.sink_from :], ks, 1.0, plan.sink_mask()), vs)
    l = acc[..., Vd]
    # a row that saw no key (only padding rows: every real query sees itself or a key) gets o = 0
    # and lse = +inf, so its recomputed probabilities exp(s - lse) are 0, not NaN
    seen = l > 0
    lse = torch.where(seen, m + torch.log(l), float("inf"))
    return acc[..., :Vd] / torch.where(seen, l, 1.0).unsqueeze(-1), lse


def _backward(q, k, v, o, lse, do, dlse, plan, scale):
    # d lse_i / d s_ij = p_ij, so a gradient on lse enters dS = P * (dP - delta + dlse)
    delta = (do * o).sum(-1) - dlse  # [nb, BH, b]
    _, BH, b, _ = q.shape
    qs = q * scale  # scores are qs k^T, so dK = dS^T qs and dQ = scale dS K
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def accumulate(I, qb, kb, vb, s):
        """dV, dQ (unscaled) of query blocks I; returns the keys' gradient."""
        p = exp_fast(s.sub_(lse[I].unsqueeze(-1)))  # masked scores give exactly 0
        dv_part = torch.matmul(p.transpose(-1, -2), do[I])
        ds = p.mul_(torch.matmul(do[I], vb.transpose(-1, -2)).sub_(delta[I].unsqueeze(-1)))
        dq[I] += torch.matmul(ds, kb)
        return dv_part, torch.matmul(ds.transpose(-1, -2), qb)

    for d in plan.offsets:
        I0, I1, _, _, mask = plan.pairs(d)
        for a, e in _groups(I0, I1, BH * b * b):
            I, J = slice(a, e), slice(a - d, e - d)
            sub = None if mask is None else mask[a - I0 : e - I0]
            dv_part, dk_part = accumulate(I, qs[I], k[J], v[J], _scores(qs[I], k[J], 1.0, sub))
            dv[J] += dv_part
            dk[J] += dk_part
    if plan.sink_from is not None:
        n_s = min(plan.sinks, plan.T)
        I = slice(plan.sink_from, plan.nb)
        ks, vs = _first_keys(k, n_s), _first_keys(v, n_s)
        dv_part, dk_part = accumulate(I, qs[I], ks, vs, _scores(qs[I], ks, 1.0, plan.sink_mask()))
        _add_first_keys(dv, dv_part.sum(0))
        _add_first_keys(dk, dk_part.sum(0))
    return dq.mul_(scale), dk, dv


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        o, lse = _forward(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do.contiguous(), dlse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None


class _FlashFull(torch.autograd.Function):
    """Full (causal or not) attention through torch's fused CPU kernel, ``[B, T, H, D]`` in and out.
    The kernel is the FlashAttention algorithm in C++ (tiles, online softmax, lse out, recomputing
    backward); it has no input for a gradient on lse, so such a backward recomputes this call by
    the key-block walk above."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, block_size):
        cd = state_dtype(q.dtype)
        qt, kt, vt = (kernel_input(x.transpose(1, 2), cd) for x in (q, k, v))  # [B, H, T, D] views
        o, lse = _FLASH(qt, kt, vt, is_causal=causal, scale=scale)
        ctx.save_for_backward(qt, kt, vt, o, lse)
        ctx.causal, ctx.scale, ctx.block_size = causal, scale, block_size
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return o.transpose(1, 2).to(q.dtype), lse.transpose(1, 2)

    @staticmethod
    def backward(ctx, do, dlse):
        qt, kt, vt, o, lse = ctx.saved_tensors
        if has_lse_grad(dlse):
            walk = lambda *x: _walk(*x, ctx.causal, None, 0, ctx.scale, ctx.block_size)  # noqa: E731
            grads = recompute_grads(walk, [x.transpose(1, 2) for x in (qt, kt, vt)], do, dlse)
        else:
            dot = kernel_input(do.transpose(1, 2), qt.dtype)
            g = _FLASH_BWD(dot, qt, kt, vt, o, lse, 0.0, ctx.causal, scale=ctx.scale)
            grads = [x.transpose(1, 2) for x in g]
        return (*(g.to(dt) for g, dt in zip(grads, ctx.dtypes, strict=True)), None, None, None)


def _walk(q, k, v, causal, window, sinks, scale, block_size):
    """The key-block walk of this module on ``[B, T, H, D]`` inputs: ``(o, lse)``."""
    B, T, H, _ = q.shape
    cd = state_dtype(q.dtype)
    b = min(block_size, T)
    plan = _Plan(T, b, causal, window, sinks, q.device)
    # zero padding to whole blocks: padded keys are masked, padded queries dropped
    qb, kb, vb = (_to_blocks(pad_time(x, b), b, cd) for x in (q, k, v))
    o, lse = _TiledAttention.apply(qb, kb, vb, plan, scale)
    o = _from_blocks(o, B, H, T).to(q.dtype)
    lse = _from_blocks(lse.unsqueeze(-1), B, H, T).squeeze(-1)
    return o, lse


def chunk_attention(q, k, v, causal, window, sinks, scale, block_size):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads already matched): ``(o, lse [B, T, H])``.
    A window shorter than half the sequence runs by key spans (window.py), in query blocks of
    ``min(block_size, WINDOW_BLOCK)``; full attention on CPU with K == V runs in torch's fused
    kernel (``_FlashFull``); longer windows, sinks and the rest walk key blocks here."""
    T = q.shape[1]
    if window is not None and window < T // 2:
        return window_attention(q, k, v, causal, window, sinks, scale, min(block_size, WINDOW_BLOCK))
    if window is None and fused_kernel_applies(q, v):
        return _FlashFull.apply(q, k, v, causal, scale, block_size)
    return _walk(q, k, v, causal, window, sinks, scale, block_size)
