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

The backward (``_band_backward``, for both forwards) walks the band from the key side instead:
key block m is seen by a span of query blocks, so per head and group of key blocks ``S^T``, ``P``
(recomputed from the saved lse), ``dV = P^T dO`` and ``dK = dS^T q`` are batched matmuls over
strided views whose rows never overlap; each key block adds its ``dS^T k`` into the query rows it
serves. At T = 16K, window 512 (AMD EPYC VM, one process, interleaved) forward+backward went
from 919-1119 to 691-889 ms against the per-query-block walk that added ``dK``, ``dV`` into
overlapping span slices (numbers for other windows in the attention README).

On CPU (with K == V) the spans go to torch's fused CPU attention kernel instead (the one behind
``scaled_dot_product_attention``, which fuses the score, softmax and ``P @ v`` passes per tile and
returns lse): ``_FlashWindow``. There every block's span reaches ``P`` keys before it and ``R``
after (the window's reach, ``P`` widened by masked keys to make the span a multiple of SPAN_ALIGN
keys), so every interior block scores the same ``[b, P + b + R]`` band mask and all
interior blocks go to the kernel as batches of overlapping strided views of k and v, read in
place (span rows H * D apart). Head-major copies of k and v (contiguous ``[L, D]`` spans) were
2-4% faster on an Intel Xeon VM, copies included, but 3-6% slower on an AMD EPYC VM (T = 16K,
window 512: 265-278 against 273-296 ms forward, one process each, interleaved), and they added
25 MB of forward peak, so the spans are views. When the
window reaches back to key 0 for every query of the first blocks (causal), those rows are plain
causal attention, one kernel call; other blocks cut by the sequence ends are gathered with their
own masks. Sinks beyond a query's
window are merged by log-sum-exp after the kernel, as in the span path. The backward is the band
backward, given the kernel's output and lse: it measured faster than the kernel's own backward
(numbers in ``_FlashWindow``), and it also takes the sinks and a gradient flowing into lse.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

from subquad.ops._common.chunking import LOG2_E, exp_fast, state_dtype
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
            p = exp_fast(s.sub_(mI.unsqueeze(-1)))
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
        p = exp_fast(s_sink.sub_(lse_all.unsqueeze(-1)))
        vs = _heads(v[bi], 0, p.shape[-1]).contiguous()
        acc[bi].add_(torch.bmm(p, vs).transpose(0, 1))
        lse[bi] = lse_all.view(H, nb, b).transpose(0, 1)
    return acc[:, : plan.T], lse


def _row_dots(x, y, rows=1024):
    """``(x * y).sum(-1)`` for ``[B, T, H, D]`` tensors, a block of rows at a time: the full-size
    product would be a fresh buffer as large as x, paid for in page faults on first touch."""
    B, T = x.shape[:2]
    out = x.new_empty(x.shape[:-1])
    buf = x.new_empty(min(rows, T), *x.shape[2:])
    for bi in range(B):
        for r0 in range(0, T, rows):
            r1 = min(r0 + rows, T)
            torch.sum(torch.mul(x[bi, r0:r1], y[bi, r0:r1], out=buf[: r1 - r0]), -1, out=out[bi, r0:r1])
    return out


# values per score tensor of the band backward (4 MB in float32: 28 key blocks at window 512)
BAND_GROUP_ELEMENTS = 1 << 20


def _column_runs(mask):
    """The runs ``(lo, hi)`` of columns of bool ``mask [r, c]`` that hold any True."""
    runs, lo = [], None
    for j, on in enumerate([*mask.any(0).tolist(), False]):
        if on and lo is None:
            lo = j
        elif not on and lo is not None:
            runs.append((lo, j))
            lo = None
    return runs


def _band_backward(q, k, v, o, lse, do, dlse, causal, window, sinks, scale, b):
    """Gradients ``dq, dk, dv`` (time-major like the inputs) of windowed attention, given the
    forward's output ``o`` and final ``lse [B, T, H]`` (sinks included) and ``dlse`` (or None); q
    unscaled. The window's pairs are walked from the key side, one head at a time, in groups of key
    blocks; the extra pairs of the sinks are a second, small pass (``_sink_backward``).

    Key block m (keys ``[m b, m b + b)``) is seen by the ``Lq = (a + 1 + c) b`` queries from block
    ``m - a`` to ``m + c`` (c blocks reach back a window, a = c two-sided, else 0): in a copy of
    the queries zero-padded by a blocks in front and c behind, rows ``m b .. m b + Lq``, a strided
    view. So the group's scores ``S^T [n, b, Lq]`` are one batched matmul, the band mask is one
    relative ``[b, Lq]`` pattern (added on the columns it masks), padded queries get lse = +inf
    (P = 0), and ``dV = P^T dO``, ``dK = dS^T q`` come out whole per key block (inner size Lq),
    with no accumulation into overlapping slices. Each key block then adds ``dS^T k_m`` into the
    Lq rows of ``dQ`` it serves (one ``addmm_`` into a contiguous slice).

    (A version that read ``dQ`` off a diagonal of the stored ``dS^T``, one batched matmul with
    inner size Lq, needed the ``dS^T`` of the last a + c key blocks carried from group to group,
    about w^2 values copied per group: at T = 16K it measured 554-562 ms against 543-545 ms for
    these additions at window 512, 980 vs 931 ms at 1024 and 2738 vs 1873 ms at 2048.)"""
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    dev, dt = q.device, q.dtype
    nkb = -(-T // b)
    c = -(-(window - 1) // b)  # query blocks after a key block that see some of its keys
    a = 0 if causal else c  # ... and before it
    Lq = (a + 1 + c) * b
    # d lse / d s = p, so a gradient on lse enters dS = P * (dP - delta) as delta - dlse
    delta = _row_dots(do, o)
    if dlse is not None:
        delta = delta.sub_(dlse.to(dt))
    far = Lq + window  # positions far from the sequence ends: the interior pattern
    keys = torch.arange(b, device=dev).view(b, 1) + far
    queries = torch.arange(Lq, device=dev).view(1, Lq) - a * b + far
    hidden = ~allowed(queries, keys, causal, window, 0, 4 * far)  # [b keys, Lq queries]
    bias = torch.zeros(b, Lq, dtype=dt, device=dev).masked_fill_(hidden, -math.inf)
    strips = [(lo, hi, bias[:, lo:hi]) for lo, hi in _column_runs(hidden)]
    g = max(1, BAND_GROUP_ELEMENTS // (b * Lq))  # key blocks per group
    # one head's padded copies: queries scaled into log2 units (scores are exp2'd). Zero keys and
    # values past T (which a two-sided window reaches) add nothing to dQ, and their own gradients
    # are dropped
    Tq = (nkb + a + c) * b
    qh, doh, dqh = q.new_zeros(Tq, K), q.new_zeros(Tq, Vd), q.new_empty(Tq, K)
    lse2, dlh = q.new_full((Tq,), math.inf), q.new_zeros(Tq)
    kh, vh = q.new_zeros(nkb * b, K), q.new_zeros(nkb * b, Vd)
    dkh, dvh = q.new_empty(nkb * b, K), q.new_empty(nkb * b, Vd)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    r0 = a * b  # row of query 0 in the padded copies
    for bi, h in itertools.product(range(B), range(H)):
        torch.mul(q[bi, :, h], scale * LOG2_E, out=qh[r0 : r0 + T])
        doh[r0 : r0 + T] = do[bi, :, h]
        torch.mul(lse[bi, :, h], LOG2_E, out=lse2[r0 : r0 + T])
        dlh[r0 : r0 + T] = delta[bi, :, h]
        kh[:T], vh[:T] = k[bi, :, h], v[bi, :, h]
        dqh.zero_()
        for m0 in range(0, nkb, g):
            m1 = min(m0 + g, nkb)
            n = m1 - m0
            kb = kh[m0 * b : m1 * b].view(n, b, K)
            qs = qh.as_strided((n, Lq, K), (b * K, K, 1), m0 * b * K)
            p = torch.bmm(kb, qs.transpose(1, 2))
            for lo, hi, strip in strips:
                p[:, :, lo:hi].add_(strip)
            p.sub_(lse2.as_strided((n, 1, Lq), (b, 1, 1), m0 * b)).exp2_()
            dos = doh.as_strided((n, Lq, Vd), (b * Vd, Vd, 1), m0 * b * Vd)
            torch.bmm(p, dos, out=dvh[m0 * b : m1 * b].view(n, b, Vd))
            ds = torch.bmm(vh[m0 * b : m1 * b].view(n, b, Vd), dos.transpose(1, 2))
            ds.sub_(dlh.as_strided((n, 1, Lq), (b, 1, 1), m0 * b)).mul_(p)
            del p
            torch.bmm(ds, qs, out=dkh[m0 * b : m1 * b].view(n, b, K))
            for i, m in enumerate(range(m0, m1)):
                dqh[m * b : m * b + Lq].addmm_(ds[i].t(), kb[i])
        torch.mul(dqh[r0 : r0 + T], scale, out=dq[bi, :, h])
        torch.mul(dkh[:T], 1 / LOG2_E, out=dk[bi, :, h])  # dS^T qh carries the log2 factor
        dv[bi, :, h] = dvh[:T]
    _sink_backward(q, k, v, lse, do, delta, dq, dk, dv, causal, window, sinks, scale)
    return dq, dk, dv


def _sink_backward(q, k, v, lse, do, delta, dq, dk, dv, causal, window, sinks, scale):
    """Add the gradients of the pairs a query has with sink keys beyond its window, in place."""
    T = q.shape[1]
    hidden = _extra_sinks_hidden(T, causal, window, sinks, q.device)
    if hidden is None:
        return
    n_s = hidden.shape[1]
    for bi in range(q.shape[0]):
        s = _extra_sink_scores(q[bi], k[bi], hidden, scale)  # [T, H, s]
        p = s.sub_(lse[bi].unsqueeze(-1)).exp_()
        # dV_s = P^T dO and dP = dO V_s^T per head; dQ += dS K_s, dK_s = dS^T q
        dv[bi, :n_s] += torch.bmm(p.permute(1, 2, 0), do[bi].transpose(0, 1)).transpose(0, 1)
        dp = torch.mm(do[bi].reshape(T, -1), _head_blocks(v[bi, :n_s]).t()).view(p.shape)
        ds = p.mul_(dp.sub_(delta[bi].unsqueeze(-1)))
        dq[bi] += torch.mm(ds.view(T, -1), _head_blocks(k[bi, :n_s])).view(dq[bi].shape).mul_(scale)
        dk[bi, :n_s] += torch.bmm(ds.permute(1, 2, 0), q[bi].transpose(0, 1)).mul_(scale).transpose(0, 1)


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
        p = ctx.plan
        lse = _blocks_to_time(lse, p.T)
        qs = qs[:, : p.T]  # scaled already: the band backward gets scale 1 and dq is rescaled here
        args = (p.causal, p.window, p.sinks, 1.0, p.b)
        dq, dk, dv = _band_backward(qs, k, v, o, lse, do.to(qs.dtype), dlse, *args)
        dq = dq.mul_(ctx.scale)
        return (*(g.to(dt) for g, dt in zip((dq, dk, dv), ctx.dtypes, strict=True)), None, None)


# ---------------------------------------------------------------------------------------------
# spans through torch's fused CPU attention kernel

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
# query block of the fused forward. A span holds b + window - 1 keys for b queries, and the kernel
# computes all of them (its causal skipping works on whole 512-key blocks), so smaller blocks waste
# fewer masked keys but run smaller gemms. The kernel tiles queries by 32 rows below 192 rows (64
# below 768), so 32 and 64 run the same tiles and 32 scores 544 keys per query instead of 576 (its
# cost per score element alone measured the same, 1.8 ns, for 32 x 544 and 64 x 576). At window
# 512, T = 16K, B = 1, H = 8, D = 64, 2 threads, one process with the sizes interleaved (medians of
# 5 rounds of 3 calls), on a 2-core AMD EPYC VM of cpu family 26 (mm peak 225-230 GFLOP/s): 137 ms
# at 16, 135 at 24, 124 at 32, 136 at 48, 132 at 64, 145 at 128, 151 at 192, 160 at 256; 32 against
# 64 also at windows 128 / 256 / 1024 / 2048: 39 / 79 / 252 / 470 against 45 / 85 / 259 / 477 ms,
# two-sided 512: 265 against 274, 4 sinks: 148 against 157. An earlier AMD EPYC VM with about half
# that mm peak ran 64 fastest of 16-128 (200 ms at 64, 216 at 128, 208 at 192, 221 at 256); an
# Intel Xeon VM had 64 and 256 even (0.18 s).
FLASH_BLOCK = 32
# keys per span are rounded up to a multiple of this (the extra keys masked): the kernel's softmax
# loops run in vectors of 8 floats and finish a row's remainder one exp at a time
SPAN_ALIGN = 8
# values per span tensor in one kernel call (views: 16 MB of spans read, 15 blocks at window 512;
# see _BandPlan.groups). At T = 16K, window 512 on an AMD EPYC VM, one process, interleaved:
# 274 / 311 ms against 282 / 340 ms for 2^20 (with / without the bench's allocator setting); with
# blocks of 32 on the family-26 VM, 2^21 to 2^24 ran even (121-122 ms) and 2^20 took 125 ms
GROUP_ELEMENTS = 1 << 22


_USE_FUSED = True


@contextlib.contextmanager
def own_tiling():
    """Within this block attention runs by this library's own tiling only (torch's fused CPU kernel
    off): to test those paths on inputs the kernel would take, and to time them against it."""
    global _USE_FUSED
    before, _USE_FUSED = _USE_FUSED, False
    try:
        yield
    finally:
        _USE_FUSED = before


def fused_kernel_applies(q, v):
    """Whether torch's fused CPU attention kernel can run these inputs: it is present (forward and
    backward) and not switched off by ``own_tiling``, the tensors are on the CPU and the value head
    size equals the key's."""
    return (
        _USE_FUSED
        and _FLASH is not None
        and _FLASH_BWD is not None
        and q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
    )


def kernel_input(x, dtype):
    """``x`` in ``dtype`` as the fused kernel takes it: any strides, but unit stride along the head dim."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def has_lse_grad(dlse):
    """Whether a backward received a gradient on lse (the fused backward has no input for one)."""
    return dlse is not None and bool(dlse.ne(0).any())


def recompute_grads(fn, inputs, do, dlse):
    """Gradients of ``(o, lse) = fn(*inputs)`` given ``(do, dlse)``, by running ``fn`` again under
    autograd: the fallback of a fused backward that receives a gradient on lse."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in inputs]
        return torch.autograd.grad(fn(*leaves), leaves, (do, dlse))


class _BandPlan:
    """Spans: block I (queries ``[I b, I b + b)``) scores keys ``[I b - P, I b + b + R)`` with ``P``,
    ``R`` the window's reach (``window - 1`` back, and forward too when not causal); interior blocks
    are those whose span and queries lie inside ``[0, T)``, the others are edge blocks."""

    def __init__(self, T, b, causal, window, sinks, device, dtype):
        self.T, self.b, self.causal, self.window, self.sinks = T, b, causal, window, sinks
        # sink keys a query sees beyond its window (None: no query has any)
        self.sink_hidden = _extra_sinks_hidden(T, causal, window, sinks, device)
        self.nb = -(-T // b)
        # the window's reach, widened on the left by masked keys so that a span holds a multiple of
        # SPAN_ALIGN keys (a span need not start on a block boundary: it is a strided view)
        self.R = 0 if causal else window - 1
        self.P = window - 1 + (-(window - 1 + b + self.R) % SPAN_ALIGN)
        self.L = self.P + b + self.R
        self.first = -(-self.P // b)  # first block whose span starts at or after key 0
        self.last = (T - self.R) // b - 1  # may be < first: no interior block
        r = torch.arange(b, device=device).view(b, 1)
        c = torch.arange(self.L, device=device).view(1, self.L)
        band = allowed(r + self.P, c, causal, window, 0, self.T + self.L + self.P)
        self.mask = torch.zeros(b, self.L, dtype=dtype, device=device).masked_fill_(~band, float("-inf"))
        # the blocks before the first interior one: when their window reaches back to key 0 (causal,
        # first * b <= window), their rows are plain causal attention over the first keys, one
        # kernel call with its own causal skipping (no gathered copies, no masked keys)
        self.lead = min(T, self.first * b) if causal and self.first * b <= window else 0
        edges = [I for I in range(self.nb) if not self.first <= I <= self.last and I * b >= self.lead]
        self.edges = torch.tensor(edges, dtype=torch.long, device=device)
        if edges:
            e = self.edges.view(-1, 1)
            # padding rows past T repeat row T - 1 (same query, same mask): finite, dropped, and
            # with no incoming gradient they add nothing in backward
            i = (e * b + torch.arange(b, device=device)).clamp(max=T - 1).view(-1, b, 1)
            j = (e * b - self.P + torch.arange(self.L, device=device)).view(-1, 1, self.L)
            ok = allowed(i, j, causal, window, 0, T) & (j >= 0)
            self.edge_mask = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, -math.inf)
            self.edge_q = i.flatten()  # [nE * b]
            self.edge_k = j.clamp(0, T - 1).flatten()  # [nE * L]
            self.edge_mask = self.edge_mask.unsqueeze(1)  # [nE, 1, b, L]: shared by the heads

    @property
    def n(self):
        return max(0, self.last - self.first + 1)

    def queries(self, x):
        """Interior query blocks of ``x [T, H, D]`` as a view ``[n, H, b, D]``."""
        return self._view(x, self.first * self.b, self.b)

    def spans(self, x, g0, g1):
        """Key spans of interior blocks ``g0 .. g1`` of ``x [T, H, D]`` as a view ``[g1 - g0, H, L, D]``
        (overlapping: consecutive spans start b rows apart)."""
        return self._view(x, (self.first + g0) * self.b - self.P, self.L, g1 - g0)

    def _view(self, x, t0, rows, n=None):
        st = x.stride()
        return x.as_strided(
            (self.n if n is None else n, x.shape[1], rows, x.shape[2]),
            (self.b * st[0], st[1], st[0], st[2]),
            x.storage_offset() + t0 * st[0],
        )

    @staticmethod
    def gather(x, idx, rows):
        """Rows ``idx`` of ``x [T, H, D]`` as a copy ``[nE, H, rows, D]``."""
        return x.index_select(0, idx).view(-1, rows, *x.shape[1:]).transpose(1, 2)

    def groups(self, H, D):
        """Interior blocks in groups ``(g0, g1)`` whose span tensors ``[g, H, L, D]`` hold about
        GROUP_ELEMENTS values: fewer, larger kernel calls (each allocates its output and
        per-thread buffers and spreads its blocks x heads over the threads), while the output of
        one call stays small (``[g, H, b, D]``, under 2 MB at window 512)."""
        if self.n == 0:
            return []
        g = max(1, GROUP_ELEMENTS // (H * self.L * D))
        return [(g0, min(g0 + g, self.n)) for g0 in range(0, self.n, g)]


def _flash_forward(q, k, v, plan, scale):
    """q, k, v ``[B, T, H, D]`` (compute dtype): ``o [B, T, H, V]``, ``lse [B, T, H]``."""
    B, T, H, _ = q.shape
    b, first = plan.b, plan.first
    o, lse = q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H)
    for bi in range(B):
        qv = plan.queries(q[bi])
        for g0, g1 in plan.groups(H, k.shape[-1]):
            ks, vs = plan.spans(k[bi], g0, g1), plan.spans(v[bi], g0, g1)
            ob, lb = _FLASH(qv[g0:g1], ks, vs, attn_mask=plan.mask, scale=scale)
            rows = slice((first + g0) * b, (first + g1) * b)
            o[bi, rows].view(g1 - g0, b, H, -1).copy_(ob.transpose(1, 2))
            lse[bi, rows].view(g1 - g0, b, H).copy_(lb.transpose(1, 2))
        if plan.lead:
            r = slice(bi, bi + 1), slice(0, plan.lead)
            ob, lb = _FLASH(*(x[r].transpose(1, 2) for x in (q, k, v)), is_causal=True, scale=scale)
            o[r].copy_(ob.transpose(1, 2))
            lse[r].copy_(lb.transpose(1, 2))
        if len(plan.edges):
            qe = plan.gather(q[bi], plan.edge_q, b)
            ke, ve = (plan.gather(x[bi], plan.edge_k, plan.L) for x in (k, v))
            ob, lb = _FLASH(qe, ke, ve, attn_mask=plan.edge_mask, scale=scale)
            ob, lb = ob.transpose(1, 2).reshape(-1, H, ob.shape[-1]), lb.transpose(1, 2).reshape(-1, H)
            for e, I in enumerate(plan.edges.tolist()):
                r0, r1 = I * b, min(T, I * b + b)
                o[bi, r0:r1] = ob[e * b : e * b + r1 - r0]
                lse[bi, r0:r1] = lb[e * b : e * b + r1 - r0]
    return o, lse


def _head_blocks(x):
    """``x [s, H, D]`` -> block-diagonal ``[H * s, H * D]`` (head h's rows against its own columns),
    so a product with a time-major ``[T, H * D]`` matrix does every head in one large gemm (the
    per-head products have an inner or outer size of s, a few sink keys, which BLAS runs slowly)."""
    return torch.block_diag(*x.transpose(0, 1))


def _extra_sinks_hidden(T, causal, window, sinks, device):
    """Bool ``[T, s]``: True where query i does NOT see sink key j beyond its window (None when no
    query sees any sink beyond its window)."""
    i, j = torch.arange(T, device=device).view(-1, 1), torch.arange(min(sinks, T), device=device)
    extra = allowed(i, j, causal, window, sinks, T) & ~allowed(i, j, causal, window, 0, T)
    return ~extra if bool(extra.any()) else None


def _extra_sink_scores(q, k, hidden, scale):
    """One sequence's queries ``q [T, H, K]`` against the sink keys they see beyond their window
    (``hidden [T, s]`` from ``_extra_sinks_hidden``): scores ``[T, H, s]`` (-inf elsewhere)."""
    T, H, K = q.shape
    n_s = hidden.shape[1]
    s = torch.mm(q.reshape(T, H * K), _head_blocks(k[:n_s]).t()).view(T, H, n_s).mul_(scale)
    return s.masked_fill_(hidden.unsqueeze(1), -math.inf)


def _merge_sinks(q, k, v, o, lse, plan, scale):
    """Fold the extra sinks into the window's softmax by log-sum-exp, in place:
    ``o = e^{lse_w - lse} o_w + P_s v_s`` with ``lse_w`` the window's own lse."""
    T = q.shape[1]
    lse_w = lse.clone()
    for bi in range(q.shape[0]):
        s_sink = _extra_sink_scores(q[bi], k[bi], plan.sink_hidden, scale)  # [T, H, s]
        torch.logaddexp(lse_w[bi], torch.logsumexp(s_sink, -1), out=lse[bi])
        o[bi].mul_(torch.exp(lse_w[bi] - lse[bi]).unsqueeze(-1))
        p = exp_fast(s_sink.sub_(lse[bi].unsqueeze(-1))).view(T, -1)
        o[bi].view(T, -1).addmm_(p, _head_blocks(v[bi, : s_sink.shape[-1]]))


class _FlashWindow(torch.autograd.Function):
    """q, k, v ``[B, T, H, D]`` in, ``o [B, T, H, V]`` and ``lse [B, T, H]`` out: the forward through
    torch's fused kernel (sinks merged by log-sum-exp), the backward by this library's band walk
    (``_band_backward``) given that forward's output and lse. It handles the sinks and a gradient
    on lse itself. The per-query-block span walk it replaced had made forward+backward 0.66 s
    against 0.71 s with the fused kernel's backward at T = 16K, window 512 (AMD EPYC, 2 threads,
    B = 1, H = 8, D = 64; 0.75 vs 0.82 s with 4 sinks), equally accurate against float64; the band
    walk then took forward+backward from 919-1119 to 691-889 ms against that span walk (983-1186
    to 775-981 ms with 4 sinks), one process each time, same VM, a later day."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, span_block):
        cd = state_dtype(q.dtype)
        qc, kc, vc = (kernel_input(x, cd) for x in (q, k, v))
        o, lse = _flash_forward(qc, kc, vc, plan, scale)
        if plan.sink_hidden is not None:
            _merge_sinks(qc, kc, vc, o, lse, plan, scale)
        ctx.save_for_backward(qc, kc, vc, o, lse)
        ctx.plan, ctx.scale, ctx.span_block = plan, scale, span_block
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return o.to(q.dtype), lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        plan = ctx.plan
        args = (plan.causal, plan.window, plan.sinks, ctx.scale, min(ctx.span_block, plan.T))
        dq, dk, dv = _band_backward(q, k, v, o, lse, do.to(q.dtype), dlse, *args)
        return (*(g.to(dt) for g, dt in zip((dq, dk, dv), ctx.dtypes, strict=True)), None, None, None)


def window_attention(q, k, v, causal, window, sinks, scale, block_size):
    """q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` (heads already matched), window >= 1:
    ``(o, lse [B, T, H])``. CPU tensors with K == V (the kernel's requirement) go through the fused
    kernel (``_FlashWindow``); others by spans of ``block_size`` queries."""
    T = q.shape[1]
    if fused_kernel_applies(q, v):
        plan = _BandPlan(T, min(FLASH_BLOCK, T), causal, window, sinks, q.device, state_dtype(q.dtype))
        return _FlashWindow.apply(q, k, v, plan, scale, block_size)
    plan = _SpanPlan(T, min(block_size, T), causal, window, sinks, q.device)
    return _SpanAttention.apply(q, k, v, plan, scale)
