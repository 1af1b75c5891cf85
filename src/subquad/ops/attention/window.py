"""Sliding-window attention by key spans: one softmax per query block, no online rescaling.

Shape legend: B batch, T time, H heads, K key dim, V value dim, b block size, w window,
L span length, s sink keys.

A query block ``[Ib, Ib + b)`` under a window w can only see the keys ``[Ib - w + 1, Ib + b - 1]``
(causal; two-sided windows reach ``w - 1`` further right), a span of ``L = w + b - 1`` keys
(``2w + b - 2`` two-sided). In the library's ``[B, T, H, D]`` layout a span is a strided
``[H, L, D]`` view that BLAS reads in place (row stride H*D), so one batched matmul scores the
whole block against its span without copying, and the softmax is taken once over the span (max,
exp, sum, ``P @ v``). Compared with the FlashAttention walk over key blocks (chunk.py), no running
max or rescaling pass is needed, and the span is token-aligned, so a query scores ``w + b - 1``
keys instead of whole key blocks.

Masks: inside the span the token rule is the same relative pattern for every interior block, and
only its first and last b columns can be masked, so only those two strips are touched. Blocks
whose span is cut by the sequence ends or holds sink keys get their own mask from ``allowed``.
Attention sinks that lie before a block's span are handled for all queries at once after the
blocks: one score matrix ``[H, T, s]`` merged into each row's softmax by log-sum-exp.

Backward recomputes ``P = exp(S - lse)`` per block and accumulates ``dV``, ``dK`` into the
overlapping span slices of head-major gradient buffers.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops.attention.masks import allowed


class _SpanPlan:
    """Query blocks, their key spans and masks for windowed attention over T tokens. Queries are
    zero-padded to ``nb * b`` rows; a padding row sees its whole span (finite softmax, dropped)."""

    def __init__(self, T, b, causal, window, sinks, device):
        self.T, self.b, self.causal, self.window, self.sinks = T, b, causal, window, sinks
        self.nb = -(-T // b)
        self.Tp = self.nb * b
        self.right = 0 if causal else window - 1  # how far a span reaches past its block
        self.L = b + window - 1 + self.right
        self.device = device
        r = torch.arange(b, device=device).view(b, 1)
        c = torch.arange(self.L, device=device).view(1, self.L)
        # interior block: key c of the span is position I*b - w + 1 + c, query r is I*b + r.
        # Only columns before the window's full reach can be masked; they are kept as strips
        blocked = ~allowed(r + window - 1, c, causal, window, 0, T + self.L + window)
        cols = blocked.any(0).nonzero().flatten().tolist()
        left = sum(1 for j in cols if j < self.L // 2)
        right = len(cols) - left
        strips = ((0, left), (self.L - right, self.L))
        self._interior = [(lo, hi, blocked[:, lo:hi]) for lo, hi in strips if hi > lo]
        self._masks = {}

    def span(self, I):
        """Keys ``lo .. hi`` block I may see (before sinks)."""
        r0 = I * self.b
        return max(0, r0 - self.window + 1), min(self.T, r0 + self.b + self.right)

    def blocked(self, I):
        """Where block I's queries may NOT see its span's keys: a list of ``(lo, hi, mask)`` with
        bool ``mask [b, hi - lo]`` for span columns ``lo .. hi`` (other columns are visible)."""
        k0, k1 = self.span(I)
        if k1 - k0 == self.L and k0 >= self.sinks and (I + 1) * self.b <= self.T:
            return self._interior
        if I not in self._masks:
            i = torch.arange(I * self.b, (I + 1) * self.b, device=self.device).view(-1, 1)
            j = torch.arange(k0, k1, device=self.device).view(1, -1)
            ok = allowed(i, j, self.causal, self.window, self.sinks, self.T) | (i >= self.T)
            self._masks[I] = [(0, k1 - k0, ~ok)]
        return self._masks[I]

    def sink_count(self, I):
        """How many sink keys lie before block I's span (each visible to all its queries)."""
        return min(self.sinks, self.span(I)[0])


def _heads(x, r0, r1):
    """``x [T, H, D]`` rows ``r0 .. r1`` as a strided ``[H, n, D]`` view (BLAS reads it in place)."""
    return x[r0:r1].transpose(0, 1)


def _blocks_to_time(x, T):
    """Block-major ``[B, nb, H, b, *D]`` -> time-major ``[B, T, H, *D]`` (a copy)."""
    B, nb, H, b = x.shape[:4]
    return x.transpose(2, 3).reshape(B, nb * b, H, *x.shape[4:])[:, :T]


def _time_to_blocks(x, b):
    """Time-major ``[B, Tp, H, *D]`` -> block-major ``[B, nb, H, b, *D]`` (a view)."""
    B, Tp, H = x.shape[:3]
    return x.view(B, Tp // b, b, H, *x.shape[3:]).transpose(2, 3)


def _scores(q, k, strips):
    s = torch.bmm(q, k.transpose(1, 2))
    for lo, hi, mask in strips:
        s[:, :, lo:hi].masked_fill_(mask, float("-inf"))
    return s


def _sink_scores(qs, k, plan):
    """For one sequence (``qs [Tp, H, K]``, ``k [T, H, K]``): scores ``[H, Tp, s]`` of every query
    against the sink keys before its block's span (others -inf), and those keys ``[H, s, K]``;
    ``(None, None)`` when no block has such keys."""
    n_s = plan.sink_count(plan.nb - 1)
    if n_s == 0:
        return None, None
    ks = _heads(k, 0, n_s).contiguous()  # tiny; a strided k with so few rows is slow in bmm
    s = torch.bmm(qs.transpose(0, 1), ks.transpose(1, 2)).view(-1, plan.nb, plan.b, n_s)
    counts = torch.tensor([plan.sink_count(I) for I in range(plan.nb)], device=qs.device)
    hidden = torch.arange(n_s, device=qs.device) >= counts.view(-1, 1)  # [nb, s]
    return s.masked_fill_(hidden.view(plan.nb, 1, n_s), float("-inf")).view(-1, plan.Tp, n_s), ks


def _forward(qs, k, v, plan):
    """qs ``[B, Tp, H, K]`` (scaled, zero-padded), k ``[B, T, H, K]``, v ``[B, T, H, V]``:
    ``o [B, T, H, V]`` and block-major ``lse [B, nb, H, b]``."""
    B, Tp, H, _ = qs.shape
    nb, b = plan.nb, plan.b
    # outputs go straight into the time-major result (a large fresh buffer costs page faults
    # on first touch here, so there is no second one to transpose into)
    acc = qs.new_empty(B, Tp, H, v.shape[-1])
    m, l = qs.new_empty(B, nb, H, b), qs.new_empty(B, nb, H, b)
    for bi in range(B):
        for I in range(nb):
            k0, k1 = plan.span(I)
            s = _scores(_heads(qs[bi], I * b, (I + 1) * b), _heads(k[bi], k0, k1), plan.blocked(I))
            mI = torch.amax(s, -1, out=m[bi, I])  # every row sees a key: finite
            p = s.sub_(mI.unsqueeze(-1)).exp_()
            torch.sum(p, -1, out=l[bi, I])
            _heads(acc[bi], I * b, (I + 1) * b).copy_(torch.bmm(p, _heads(v[bi], k0, k1)))
    lse = torch.log(l).add_(m)
    acc_blocks = _time_to_blocks(acc, b)  # a view
    sinks = plan.sink_count(nb - 1) > 0
    acc_blocks.div_(l.unsqueeze(-1) if not sinks else torch.exp(lse - m).unsqueeze(-1))
    for bi in range(B if sinks else 0):
        # the sinks before each span, merged by log-sum-exp: o = e^{lse_w - lse} o_w + P_s v_s
        s_sink, _ = _sink_scores(qs[bi], k[bi], plan)  # [H, Tp, s]
        lse_w = lse[bi].transpose(0, 1).reshape(H, Tp)
        lse_all = torch.logaddexp(lse_w, torch.logsumexp(s_sink, -1))  # [H, Tp]
        acc_blocks[bi].mul_(torch.exp(lse_w - lse_all).view(H, nb, b, 1).transpose(0, 1))
        p = s_sink.sub_(lse_all.unsqueeze(-1)).exp_()
        vs = _heads(v[bi], 0, p.shape[-1]).contiguous()
        acc[bi].add_(torch.bmm(p, vs).transpose(0, 1))
        lse[bi] = lse_all.view(H, nb, b).transpose(0, 1)
    return acc[:, : plan.T], lse


def _backward(qs, k, v, o, lse, do, dlse, plan):
    """Gradients of the scaled queries ``[B, Tp, H, K]`` and of the keys, values (head-major
    ``[B, H, T, D]``). ``do``, ``o`` are zero-padded to ``Tp``; lse, dlse block-major."""
    B, Tp, H, _ = qs.shape
    nb, b = plan.nb, plan.b
    # d lse / d s = p, so a gradient on lse enters dS = P * (dP - delta) as delta - dlse
    delta = _time_to_blocks((do * o).sum(-1), b).sub(dlse)  # [B, nb, H, b]
    dq = qs.new_empty(B, Tp, H, qs.shape[-1])
    dk, dv = k.new_zeros(B, H, plan.T, k.shape[-1]), v.new_zeros(B, H, plan.T, v.shape[-1])
    for bi in range(B):
        for I in range(nb):
            k0, k1 = plan.span(I)
            qI, doI = _heads(qs[bi], I * b, (I + 1) * b), _heads(do[bi], I * b, (I + 1) * b)
            kS, vS = _heads(k[bi], k0, k1), _heads(v[bi], k0, k1)
            p = _scores(qI, kS, plan.blocked(I)).sub_(lse[bi, I].unsqueeze(-1)).exp_()
            # (a fresh product added to the strided span slice: baddbmm_ into it runs per head)
            dv[bi, :, k0:k1].add_(torch.bmm(p.transpose(1, 2), doI))
            ds = p.mul_(torch.bmm(doI, vS.transpose(1, 2)).sub_(delta[bi, I].unsqueeze(-1)))
            _heads(dq[bi], I * b, (I + 1) * b).copy_(torch.bmm(ds, kS))
            dk[bi, :, k0:k1].add_(torch.bmm(ds.transpose(1, 2), qI))
        s_sink, ks = _sink_scores(qs[bi], k[bi], plan)
        if s_sink is not None:
            n_s = ks.shape[1]
            lse_t = lse[bi].transpose(0, 1).reshape(H, Tp)
            delta_t = delta[bi].transpose(0, 1).reshape(H, Tp)
            p = s_sink.sub_(lse_t.unsqueeze(-1)).exp_()  # [H, Tp, s]
            do_h = do[bi].transpose(0, 1)
            dv[bi, :, :n_s].baddbmm_(p.transpose(1, 2), do_h)
            vs = _heads(v[bi], 0, n_s).contiguous()
            ds = p.mul_(torch.bmm(do_h, vs.transpose(1, 2)).sub_(delta_t.unsqueeze(-1)))
            dq[bi].add_(torch.bmm(ds, ks).transpose(0, 1))
            dk[bi, :, :n_s].baddbmm_(ds.transpose(1, 2), qs[bi].transpose(0, 1))
    return dq[:, : plan.T], dk, dv


def _pad_rows(x, Tp):
    """Zero-pad ``[B, T, ...]`` to ``Tp`` rows (no copy when T == Tp)."""
    if x.shape[1] == Tp:
        return x
    out = x.new_zeros(x.shape[0], Tp, *x.shape[2:])
    out[:, : x.shape[1]] = x
    return out


class _SpanAttention(torch.autograd.Function):
    """q, k, v ``[B, T, H, D]`` in, ``o [B, T, H, V]`` and ``lse [B, T, H]`` out."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale):
        cd = state_dtype(q.dtype)
        qs = _pad_rows(q.to(cd) * scale, plan.Tp)  # the scale rides on q: one pass, not one per score
        kc, vc = k.to(cd), v.to(cd)
        o, lse = _forward(qs, kc, vc, plan)
        ctx.save_for_backward(qs, kc, vc, o, lse)
        ctx.plan, ctx.scale, ctx.dtypes = plan, scale, (q.dtype, k.dtype, v.dtype)
        return o.to(q.dtype), _blocks_to_time(lse, plan.T)

    @staticmethod
    def backward(ctx, do, dlse):
        qs, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        do, o = (_pad_rows(x.to(qs.dtype), plan.Tp) for x in (do, o))
        dlse = _time_to_blocks(_pad_rows(dlse.to(qs.dtype), plan.Tp), plan.b)
        dq, dk, dv = _backward(qs, k, v, o, lse, do.contiguous(), dlse, plan)
        dq = dq.mul_(ctx.scale)
        dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)
        return (*(g.to(dt) for g, dt in zip((dq, dk, dv), ctx.dtypes, strict=True)), None, None)


def window_attention(q, k, v, causal, window, sinks, scale, block_size):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads already matched), window >= 1:
    ``(o, lse [B, T, H])``."""
    T = q.shape[1]
    plan = _SpanPlan(T, min(block_size, T), causal, window, sinks, q.device)
    return _SpanAttention.apply(q, k, v, plan, scale)
