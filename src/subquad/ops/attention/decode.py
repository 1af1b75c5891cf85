"""One decoding step of softmax attention against a long KV cache, split over the keys.

Shape legend: B batch, S cache length, H query heads, Hk key/value heads, G = H / Hk, K key dim,
V value dim, c keys in one split.

Decoding reads the whole cache once to produce H dot products and H weighted sums per key, so it
is bound by memory traffic and per-call overhead, not by FLOPs. The cache is cut into splits of c
keys (Flash-Decoding / split-K; Lean Attention balances the same merge over compute units). One
split in the library's ``[B, S, Hk, D]`` layout is a contiguous ``[c, Hk, D]`` slab, small enough
(about SPLIT_ELEMENTS values) to stay in the last-level cache while it is used, and every op on it
runs on all intra-op threads:

- scores ``s [c, Hk, G] = sum_K k [c, Hk, 1, K] * q [Hk, G, K]``: one elementwise product into a
  reused buffer and one reduction over the contiguous K axis (a per-head gemv on a strided matrix
  or a block-diagonal gemm by torch's BLAS both measured 2-4x slower on an AMD EPYC VM, and
  0.8-0.9x its time on an Intel Xeon VM). For a float32 cache without autograd the scores of the
  whole cache are instead one oneDNN matmul ``[S, Hk * K] @ Qbd [Hk * K, H]`` against the
  block-diagonal queries (``_block_scores``): it reads the cache once and writes only ``[S, H]``;
  on the AMD EPYC VM it took 7.7 ms against 9.6 for the product and sum at a 64K-token cache;
- the splits' softmax partials, for all splits at once: the ``[S, H]`` scores copied once into
  the split-major ``[P, H, c]`` layout the weighted sums read, then over its contiguous last axis
  max ``m_p``, ``e = exp(s - m_p)``, ``l_p = sum e`` (the scores are in log2 units, the scale
  times log2 e folded into q, so the exponential is one exp2 pass);
- weighted values ``o_p [Hk, G, V] = sum_c e [c, Hk, G] v [c, Hk, V] / l_p``: one ``embedding_bag``
  sum over the full splits' ``[P c Hk, V]`` rows, read in place, with a bag per split and query
  head (``weighted_rows``; it streams the values once, where a product buffer and its sum took
  1.6x as long on an Intel Xeon VM), and one more for a shorter last split.

Short caches (at most KERNEL_ELEMENTS key values over the query heads, no grouped heads, K == V,
no autograd, no fixed number of splits) go to torch's fused CPU attention kernel instead, whose
one call costs less than the splits' dozen small ops there: 0.09 against 0.44 ms at 256 cached
tokens, 1.3 against 1.8 ms at 4K, but 4.0 against 3.6 ms at 8K (H = 8, D = 64, AMD EPYC VM).

The partials are merged by their log-sum-exps ``lse_p = m_p + log l_p``:
``o = sum_p e^{lse_p - lse} o_p`` with ``lse = logsumexp_p lse_p``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from subquad.ops._common.chunking import LOG2_E, state_dtype
from subquad.ops.attention.window import _FLASH, fused_kernel_applies, kernel_input

# cache values (keys of all heads) per split when the caller does not fix the number of splits:
# 2^21 float32 values = 8 MiB, which keeps the product buffer in the last-level cache
SPLIT_ELEMENTS = 1 << 21
# caches of at most this many key values over the query heads (n * H * K) run through torch's
# fused kernel when it applies (see above)
KERNEL_ELEMENTS = 1 << 21


def split_size(n: int, row_elements: int, num_splits: int | None) -> int:
    """Keys per split for an n-key cache: ``ceil(n / num_splits)``, or about SPLIT_ELEMENTS
    values per split when num_splits is None. Every split holds at least one key."""
    if num_splits is None:
        return max(1, min(n, SPLIT_ELEMENTS // max(1, row_elements)))
    return -(-n // max(1, min(num_splits, n)))


def weighted_rows(vb, w, cd):
    """``o [P, Hk * G, V]`` with ``o[p, (h, g)] = sum_j w[p, h, g, j] vb[p c + j, h]`` for
    ``vb [P * c, Hk, V]`` (P splits of c keys) and ``w [P, Hk, G, c]``: one ``embedding_bag`` sum
    with a bag per split and query head over the rows of ``vb`` as a ``[P * c * Hk, V]`` table,
    read in place when ``vb`` is a float32/64 slice of a contiguous cache. At a 64K-token cache
    (H = 8, V = 64) one bag per query head and split call took 9 ms where a product buffer and its
    sum took 15 ms (Intel Xeon VM), and the 16 splits in one call 7.4 ms against 8.5 in 16 calls
    (AMD EPYC VM, interleaved in one process)."""
    P, Hk, G, c = w.shape
    idx, offsets = _bags(P, c, Hk, G, vb.device)
    table = vb.to(cd).reshape(P * c * Hk, vb.shape[-1])
    o = F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=w.reshape(-1))
    return o.view(P, Hk * G, -1)


@functools.lru_cache(maxsize=8)
def _bags(P, c, Hk, G, device):
    """``weighted_rows``' bag indices (bag ``(p, h, g)`` holds rows ``(p c + j) Hk + h``, j < c) and
    offsets, made once per shape: the next decode steps reuse them until the cache grows by a
    split."""
    j = torch.arange(P * c, device=device).view(P, 1, 1, c) * Hk
    idx = (j + torch.arange(Hk, device=device).view(1, Hk, 1, 1)).expand(P, Hk, G, c)
    return idx.reshape(-1), torch.arange(P * Hk * G, device=device) * c


# torch's oneDNN linear (an internal op behind inductor's CPU fusions; absent in some builds)
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def _block_scores(q, k_rows):
    """Scores ``[n, Hk * G]`` of scaled queries ``q [Hk, G, K]`` against the keys ``k_rows [n, Hk, K]``
    (float32, each row's ``Hk * K`` values contiguous), as one oneDNN matmul with the block-diagonal
    ``Qbd [Hk * G, Hk * K]`` (row ``(h, g)`` holds ``q[h, g]`` in head h's columns): Hk times the
    FLOPs of the dot products, but one read of the keys and no product buffer. None when the op
    is missing, oneDNN is switched off (``torch.backends.mkldnn.enabled``) or the keys' layout
    does not fit."""
    n, Hk, K = k_rows.shape
    if _ONEDNN_LINEAR is None or k_rows.dtype != torch.float32 or k_rows.device.type != "cpu":
        return None
    if k_rows.stride(2) != 1 or k_rows.stride(1) != K:
        return None
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return None
    qbd = q.new_zeros(Hk, q.shape[1], Hk, K)
    qbd.diagonal(dim1=0, dim2=2).copy_(q.permute(1, 2, 0))  # [G, K, Hk] view of the blocks
    rows = k_rows.as_strided((n, Hk * K), (k_rows.stride(0), 1))
    return _ONEDNN_LINEAR(rows, qbd.view(-1, Hk * K), None, "none", [], "")


def _split_keys(k_cache, b, lo, hi, cd):
    """Keys ``lo .. hi`` of sequence b as ``[c, Hk, 1, K]`` (a view for caches in ``cd``)."""
    return k_cache[b, lo:hi].to(cd).unsqueeze(2)


def _split_major(s, P, c):
    """Scores ``s [n, H]`` as ``[P, H, c]`` (split p holds rows ``p c .. p c + c``), the last
    split's rows past n at -inf; differentiable (copies into a fresh tensor)."""
    n, H = s.shape
    full = n // c
    out = s.new_empty(P, H, c)
    out[:full].transpose(1, 2).copy_(s[: full * c].view(full, c, H))
    if full < P:
        r = n - full * c
        out[full, :, :r].copy_(s[full * c :].t())
        out[full, :, r:].fill_(float("-inf"))
    return out


def _kernel_step(q, k_cache, v_cache, scale, cd):
    """The step by torch's fused kernel: q ``[B, H, K]``, caches ``[B, n, H, D]`` -> ``o [B, H, V]``,
    ``lse [B, H]`` in ``cd``."""
    k, v = (kernel_input(x, cd).transpose(1, 2) for x in (k_cache, v_cache))
    o, lse = _FLASH(kernel_input(q, cd).unsqueeze(2), k, v, scale=scale)
    return o[:, :, 0], lse[:, :, 0]


def decode_attention(q, k_cache, v_cache, lengths, scale, num_splits):
    """q ``[B, H, K]``; caches ``[B, S, Hk, D]``; lengths: list of B valid lengths or None;
    num_splits: int or None (automatic). Returns ``o [B, H, V]`` and ``lse [B, H]`` (compute dtype)."""
    B, H, K = q.shape
    Hk = k_cache.shape[2]
    V = v_cache.shape[3]
    G = H // Hk
    cd = state_dtype(q.dtype)
    # under autograd the same steps run without out= buffers and in-place updates
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_cache, v_cache))
    kernel = num_splits is None and G == 1 and not grad and fused_kernel_applies(q, v_cache)
    if kernel and lengths is None and k_cache.shape[1] * H * K <= KERNEL_ELEMENTS:
        return _kernel_step(q, k_cache, v_cache, scale, cd)  # the whole batch in one call
    # scores in log2 units (the scale times log2 e rides on q), so the exponentials are exp2
    qg = (q.to(cd) * (scale * LOG2_E)).view(B, 1, Hk, G, K)
    outs, lses = [], []
    for b in range(B):
        n = k_cache.shape[1] if lengths is None else lengths[b]
        if kernel and n * H * K <= KERNEL_ELEMENTS:
            o_b, lse_b = _kernel_step(q[b : b + 1], k_cache[b : b + 1, :n], v_cache[b : b + 1, :n], scale, cd)
            outs.append(o_b[0])
            lses.append(lse_b[0])
            continue
        c = split_size(n, Hk * G * max(K, V), num_splits)
        P = -(-n // c)
        ranges = [(lo, min(lo + c, n)) for lo in range(0, n, c)]
        # 1. scores s [n, H] of the whole cache, then each split's exponentials e = 2^(s - m_p)
        #    and sums l_p, in the split-major layout [P, H, c] of the weighted sums
        if grad:
            s = torch.cat([(_split_keys(k_cache, b, lo, hi, cd) * qg[b]).sum(-1) for lo, hi in ranges])
        elif (s := _block_scores(qg[b, 0], k_cache[b, :n])) is None:
            buf = torch.empty(c, Hk, G, K, dtype=cd, device=q.device)
            s = torch.empty(n, Hk, G, dtype=cd, device=q.device)
            for lo, hi in ranges:
                prod = torch.mul(_split_keys(k_cache, b, lo, hi, cd), qg[b], out=buf[: hi - lo])
                torch.sum(prod, -1, out=s[lo:hi])
        e = _split_major(s.view(n, H), P, c)  # the padding is -inf and gives exactly 0
        # (the max over a contiguous last axis: over the middle axis of [P, c, H] torch's amax
        # took 0.9 ms at a 64K-token cache, 12x its sum there); a shift, so no gradient through it
        m = e.detach().amax(-1, keepdim=True)  # [P, H, 1]
        e = torch.exp2(e - m) if grad else e.sub_(m).exp2_()
        l = e.sum(-1)  # [P, H]
        # 2. each split's weighted values, one weighted row sum per query head (embedding_bag)
        #    (the full splits in one call, a shorter last split in another)
        w = e.reshape(P, Hk, G, c)  # a view without autograd
        full = n // c
        po = [weighted_rows(v_cache[b, : full * c], w[:full], cd)] if full else []
        if full < P:
            po.append(weighted_rows(v_cache[b, full * c : n], w[full:, ..., : n - full * c], cd))
        po = torch.cat(po) if len(po) > 1 else po[0]
        po = po / l.unsqueeze(-1)
        pl = (m.squeeze(-1) + torch.log2(l)) / LOG2_E  # [P, H], natural log units
        # 3. merge the splits by their log-sum-exps
        lse = torch.logsumexp(pl, 0)
        outs.append((torch.exp(pl - lse).unsqueeze(-1) * po).sum(0))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
