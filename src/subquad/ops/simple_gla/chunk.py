"""Chunkwise-parallel simple GLA: scalar decay per head (and plain linear attention, no decay).

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk, n chunks per segment,
L segment length (n * C).

Within a chunk, with ``b_i = sum_{s <= i} g_s`` the log-decay accumulated since the chunk start
(``b_i <= 0``, non-increasing) and ``S`` the state entering the chunk:

    o_i = scale * [ sum_{j <= i} exp(b_i - b_j) (q_i . k_j) v_j  +  exp(b_i) S^T q_i ]
    S'  = exp(b_C) S + sum_j exp(b_C - b_j) k_j v_j^T

Every exponent is <= 0 (masked entries are exp(-inf) = 0), so nothing overflows whatever the
gates. Across the n chunks of a segment the state pass is one small matmul with the decay matrix
``W[c, c'] = exp(E_c - G_c')`` for c' < c (``G`` inclusive, ``E`` exclusive cumulative chunk decay),
whose extra last row ``exp(G_n - G_c')`` gives the state leaving the segment. With a constant
decay ``g_gamma`` (RetNet, Lightning Attention) all these factors are the same for every chunk and
are computed once per call: Lightning Attention-2's tiling, intra-block by a masked decay matmul,
inter-block through the carried KV state.
"""

from __future__ import annotations

import math

import torch

from subquad.ops._common.chunking import (
    SAFE_SPAN,
    SegmentOutputs,
    batched_kv,
    batched_qk,
    causal_mask,
    exp_fast,
    pad_time,
    records_grad,
    segment_length,
    state_dtype,
    to_chunks,
)


def _decay_factors(bc: torch.Tensor, mask: torch.Tensor, log_scale: float, dtype: torch.dtype):
    """Decay factors of one segment from ``bc [.., n, C]``, the in-chunk cumulative log-decay.

    Every exponent is formed in ``bc``'s dtype before the cast to ``dtype``: the caller passes
    float64 when the decay is strong, since ``b`` then reaches thousands of nats, where float32
    would lose the small differences ``b_i - b_j`` of nearby tokens, which carry all the weight.

    Returns ``scale * exp(b_i - b_j)`` masked to j <= i ``[.., n, C, C]``, ``scale * exp(b_i)``
    ``[.., n, C, 1]``, ``exp(b_C - b_j)`` ``[.., n, C, 1]``, the state-pass matrix ``[.., n + 1, n]``,
    ``exp(E_c)`` ``[.., n, 1]`` (segment start to chunk start) and ``exp(G_n)`` ``[.., 1]``.
    """
    n = bc.shape[-2]
    last = bc[..., -1]  # [.., n] decay over each chunk
    # 1. intra-chunk: scale * exp(b_i - b_j) for j <= i; the scale rides in the exponent
    diff = bc.unsqueeze(-1) - bc.unsqueeze(-2) + log_scale
    decay_qk = exp_fast(torch.where(mask, diff, float("-inf")).to(dtype))
    decay_q = (bc + log_scale).to(dtype).exp().unsqueeze(-1)
    decay_k = (last.unsqueeze(-1) - bc).to(dtype).exp().unsqueeze(-1)
    # 2. inter-chunk: G inclusive, E exclusive cumulative decay over the segment's chunks
    G = last.cumsum(-1)
    E = G - last
    rows = torch.cat([E, G[..., -1:]], -1)  # [.., n + 1]: chunk starts, then the segment end
    allowed = causal_mask(n + 1, bc.device, strict=True)[:, :n]
    w = exp_fast(torch.where(allowed, rows.unsqueeze(-1) - G.unsqueeze(-2), float("-inf")).to(dtype))
    return decay_qk, decay_q, decay_k, w, E.to(dtype).exp().unsqueeze(-1), G[..., -1:].to(dtype).exp()


def _factored_factors(bc: torch.Tensor, log_scale: float):
    """Factors for moderate decay (every chunk's decay <= SAFE_SPAN), ``bc [.., n, C]``.

    With ``r = b_C / 2`` the chunk midpoint, ``exp(b_i - b_j) = exp(b_i - r) exp(r - b_j)`` and both
    factors lie in ``[e^-SAFE_SPAN/2, e^SAFE_SPAN/2]``, so ``q~ = scale q exp(b - r)`` and
    ``k~ = k exp(r - b)`` give the intra-chunk scores as one matmul. The remaining per-chunk
    scalars fold into the state pass: the query needs ``exp(b_i)``, i.e. ``q~ * exp(r)``, and the
    state contribution ``exp(b_C - b_j) k_j`` is ``k~ * exp(b_C - r)``, so with ``U~ = k~^T V``

        S_prev'_c = exp(r_c) S_prev_c = sum_{c' < c} exp(r_c + E_c - G_c' + b_C,c' - r_c') U~_c'
                    + exp(r_c + E_c) S

    (every exponent <= 0). Returns ``e_q [.., n, C, 1]``, ``e_k [.., n, C, 1]``, the state-pass
    matrix ``[.., n + 1, n]`` (last row: the state leaving the segment), ``[.., n, 1]`` and ``[.., 1]``.
    """
    n = bc.shape[-2]
    last = bc[..., -1]  # [.., n]
    r = 0.5 * last
    e_q = (bc - r.unsqueeze(-1) + log_scale).exp().unsqueeze(-1)
    e_k = (r.unsqueeze(-1) - bc).exp().unsqueeze(-1)
    G = last.cumsum(-1)
    E = G - last
    rows = torch.cat([E + r, G[..., -1:]], -1)  # [.., n + 1]: chunk starts (times exp(r)), segment end
    cols = G - last + r  # [.., n]: -(G_c' - b_C,c' + r_c')
    allowed = causal_mask(n + 1, bc.device, strict=True)[:, :n]
    w = exp_fast(torch.where(allowed, rows.unsqueeze(-1) - cols.unsqueeze(-2), float("-inf")))
    return e_q, e_k, w, (E + r).exp().unsqueeze(-1), G[..., -1:].exp()


def chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked causal linear attention with an optional scalar log-decay (``g`` or ``g_gamma``).

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` data-dependent log-decay or None. g_gamma: ``[H]`` constant log-decay or None.
        initial_state: ``[B, H, K, V]`` or None.

    Returns:
        ``o [B, T, H, V]`` in the input dtype and the final state ``[B, H, K, V]`` (float32; float64
        for float64 inputs) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    cd = state_dtype(q.dtype)
    dev = q.device
    if g_gamma is not None and T % C:
        # a constant decay would also decay the zero padding of the last chunk: run the whole
        # chunks with the shared factors and the tail with the decay written out per token
        Tm = T - T % C
        parts = []
        state = initial_state
        if Tm:
            o_main, state = chunk_scalar_decay(
                q[:, :Tm], k[:, :Tm], v[:, :Tm], None, g_gamma, scale, state, True, chunk_size
            )
            parts.append(o_main)
        g_tail = g_gamma.to(q.dtype).expand(B, T - Tm, H)
        o_tail, state = chunk_scalar_decay(
            q[:, Tm:], k[:, Tm:], v[:, Tm:], g_tail, None, scale, state, output_final_state, chunk_size
        )
        parts.append(o_tail)
        return torch.cat(parts, 1), state

    # 0. pad time to whole chunks with zeros: zero k, v and log-gates leave the state unchanged
    q, k, v = (pad_time(x, C) for x in (q, k, v))
    if g is not None:
        g = pad_time(g, C)
    Tp = q.shape[1]
    L = segment_length(B * H, max(K, V), C)
    mask = causal_mask(C, dev)
    decayed = g is not None or g_gamma is not None
    # a positive scale rides inside the exponentials; any other is applied to the output
    log_scale = math.log(scale) if (decayed and scale > 0) else 0.0
    post_scale = scale if (decayed and scale <= 0) else 1.0
    scaled_mask = mask.to(cd) * scale
    inter_scale = 1.0 if decayed else scale
    S = initial_state.to(cd) if initial_state is not None else torch.zeros(B, H, K, V, dtype=cd, device=dev)
    shared: dict[int, tuple[torch.Tensor, ...]] = {}
    grad = records_grad(q, k, v, g, g_gamma, initial_state)
    # a non-positive scale cannot ride in the exponentials: the output is scaled at the end
    outs = SegmentOutputs(B, T, H, V, cd if post_scale != 1.0 else q.dtype, dev, grad)
    # split once: slicing x[:, s:e] per segment would make backward build a full-size zero
    # gradient per slice, O(T^2 / L) work (seen as 42 s instead of ~4 s at T = 64K)
    pieces = [x.split(L, 1) if x is not None else [None] * len(range(0, Tp, L)) for x in (q, k, v, g)]
    for seg, s in enumerate(range(0, Tp, L)):
        e = min(s + L, Tp)
        n = (e - s) // C
        q_s, k_s, v_s, g_s = (p[seg] for p in pieces)
        # 1. this segment's chunks, contiguous [B, H, n, C, D] in the compute dtype (in 2b the decay
        # multiply writes the chunk layout of q and k itself)
        vc = to_chunks(v_s, C, cd)
        if not decayed:
            qc, kc = (to_chunks(x, C, cd) for x in (q_s, k_s))
            # 2a. no decay: masked scores; W is all ones below the diagonal (a cumulative sum)
            scores = batched_qk(qc, kc) * scaled_mask  # [B, H, n, C, C]
            U = batched_kv(kc, vc).view(B, H, n, K * V)
            w = causal_mask(n + 1, dev, strict=True)[:, :n].to(cd)
            SU = torch.matmul(w, U)  # [B, H, n + 1, K * V]
            S_prev = SU[:, :, :n] + S.view(B, H, 1, K * V)
            S = SU[:, :, n].view(B, H, K, V) + S
        else:
            bc = None
            if g is not None:
                # g is 1/K the size of q: its cumulative sums and all factors are formed in float64,
                # which keeps the segment-wide sums accurate (float32 lost ~1e-4 at T = 4096)
                gs = g_s.permute(0, 2, 1).reshape(B, H, n, C)
                bc = gs.to(torch.float64).cumsum(-1)  # [B, H, n, C]
            if bc is not None and -float(bc[..., -1].detach().min()) <= SAFE_SPAN:
                # 2b. moderate data-dependent decay: factor each chunk around its midpoint, so
                # the decays are two passes over q and k and the rest folds into W
                e_q, e_k, w, to_start, whole = (x.to(cd) for x in _factored_factors(bc, log_scale))
                # the factor first: a broadcast product takes its layout, so the result is the
                # contiguous chunk layout and the strided q and k are read once (no separate copy)
                qv, kv = (x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q_s, k_s))
                qc = torch.mul(e_q, qv)
                kc = torch.mul(e_k, kv)
                scores = batched_qk(qc, kc).mul_(mask)
            else:
                qc, kc = (to_chunks(x, C, cd) for x in (q_s, k_s))
                # 2c. constant decay (factors shared by all chunks) or strong decay (float64
                # exponents, see _decay_factors)
                if g_gamma is not None:
                    if n not in shared:
                        steps = torch.arange(1, C + 1, device=dev, dtype=torch.float64)
                        bc = g_gamma.to(torch.float64)[:, None, None] * steps
                        shared[n] = _decay_factors(bc.expand(H, n, C), mask, log_scale, cd)
                    decay_qk, decay_q, decay_k, w, to_start, whole = shared[n]
                else:
                    decay_qk, decay_q, decay_k, w, to_start, whole = _decay_factors(bc, mask, log_scale, cd)
                scores = batched_qk(qc, kc) * decay_qk
                kc = kc * decay_k
                qc = qc * decay_q
            U = batched_kv(kc, vc).view(B, H, n, K * V)
            # 3. inter-chunk state pass: one matmul with the chunk decay matrix W
            SU = torch.matmul(w, U)  # [B, H, n + 1, K * V]
            S_prev = SU[..., :n, :] + to_start * S.view(B, H, 1, K * V)
            S = (SU[..., n, :] + whole * S.view(B, H, K * V)).view(B, H, K, V)
        # 4. output: intra-chunk scores @ v, plus (accumulated by the same gemm) the carried state
        o = torch.bmm(scores.reshape(-1, C, C), vc.view(-1, C, V))
        o = o.baddbmm_(qc.view(-1, C, K), S_prev.reshape(-1, K, V), alpha=inter_scale)
        outs.add(s, o.view(B, H, e - s, V))
    o = outs.result()
    if post_scale != 1.0:
        o = o * post_scale
    return o.to(q.dtype), (S if output_final_state else None)
