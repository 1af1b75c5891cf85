"""Chunkwise-parallel RWKV-7 (a generalized delta rule with diagonal-plus-low-rank transitions).

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk, n chunks per segment.

Name the low-rank read ``y_t = a_t^T S_{t-1}`` (``[V]``). Then ``S_t = diag(d_t) S_{t-1} + b_t y_t^T
+ k_t v_t^T`` with ``d_t = exp(w_t)`` is a GLA recurrence with two rank-1 writes per token. Inside a
chunk, with ``G_t`` the cumulative log-decay (inclusive), ``G'_t = G_{t-1}`` and ``S`` the entering
state, ``Gam_t = exp(G_t)``:

    Y = (a Gam') S + L_ab Y + L_ak V               (strictly lower: y_t reads S_{t-1})
    O = scale [(r Gam) S + L_rb Y + L_rk V]       (lower incl. the diagonal)
    S' = diag(Gam_C) S + (b Gam_C / Gam)^T Y + (k Gam_C / Gam)^T V

with ``L_xy[t, s] = sum_k x_t[k] y_s[k] exp(G^x_t[k] - G_s[k])``. So ``Y = Wy S + Uy`` with
``[Wy | Uy] = (I - L_ab)^{-1} [a Gam' | L_ak V]`` (one batched unit-triangular inversion per chunk,
as the delta rule's UT transform), and the chunk's update is affine in S:

    S' = (diag(Gam_C) + Bt^T Wy) S + Bt^T Uy + Kt^T V,   Bt = b Gam_C / Gam, Kt = k Gam_C / Gam
    O  = scale [(r Gam + L_rb Wy) S + L_rb Uy + L_rk V]

Both factors are batched over the chunks; the sequential pass is one ``[K, K] x [K, V]`` gemm per
chunk (``affine_state_pass``). The ``L`` matrices are matmuls of factored operands: with the
per-dimension midpoint ``m = G_C / 2``, ``exp(G_t - G_s) = exp(G_t - m) exp(m - G_s)`` and both
factors stay within ``exp(SAFE_SPAN / 2)`` while a chunk decays by at most SAFE_SPAN nats. Past
that (very negative log-decays) the ``L`` matrices are formed directly from masked ``[C, C, K]``
exponentials, every exponent <= 0. Cumulative log-decays are float64.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import (
    SAFE_SPAN,
    SegmentOutputs,
    affine_state_pass,
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


def _pair_matrices(G, Gp, r, a, b, k, cd, incl, strict):
    """``L_ab, L_ak`` (strictly lower, query side at G') and ``L_rb, L_rk`` (lower, at G)."""
    span = -float(G[..., -1, :].detach().min()) if G.numel() else 0.0
    if span <= SAFE_SPAN:
        m = G[..., -1:, :] / 2  # per-dimension midpoint of each chunk's decay
        up = exp_fast((m - G).to(cd))  # exp(m - G_s), for the key side
        r_f = r * exp_fast((G - m).to(cd))
        a_f = a * exp_fast((Gp - m).to(cd))
        b_f, k_f = b * up, k * up
        L_ab, L_ak = batched_qk(a_f, b_f) * strict, batched_qk(a_f, k_f) * strict
        L_rb, L_rk = batched_qk(r_f, b_f) * incl, batched_qk(r_f, k_f) * incl
        return L_ab, L_ak, L_rb, L_rk
    # strong decay: exp(G_t - G_s) per dimension, masked before the exponential (no overflow)
    inc = exp_fast(torch.where(incl[..., None], G.unsqueeze(-2) - G.unsqueeze(-3), float("-inf")).to(cd))
    exc = exp_fast(torch.where(strict[..., None], Gp.unsqueeze(-2) - G.unsqueeze(-3), float("-inf")).to(cd))
    # [.., C_t, C_s, K]: contract over K with the query-side and key-side vectors
    L_ab = torch.einsum("...tk,...tsk,...sk->...ts", a, exc, b)
    L_ak = torch.einsum("...tk,...tsk,...sk->...ts", a, exc, k)
    L_rb = torch.einsum("...tk,...tsk,...sk->...ts", r, inc, b)
    L_rk = torch.einsum("...tk,...tsk,...sk->...ts", r, inc, k)
    return L_ab, L_ak, L_rb, L_rk


def chunk_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, chunk_size):
    B, T, H, K = r.shape
    V = v.shape[-1]
    C = chunk_size
    cd = state_dtype(r.dtype)
    dev = r.device
    # 0. pad to whole chunks with zeros: w = 0 decays nothing, a = b = 0 no low-rank term, k = v = 0
    r, w, k, v, a, b = (pad_time(x, C) for x in (r, w, k, v, a, b))
    Tp = r.shape[1]
    L = segment_length(B * H, max(K, V), C)
    incl = causal_mask(C, dev)
    strict = causal_mask(C, dev, strict=True)
    eye = torch.eye(C, dtype=cd, device=dev)
    S = initial_state.to(cd) if initial_state is not None else torch.zeros(B, H, K, V, dtype=cd, device=dev)
    grad = records_grad(r, w, k, v, a, b, initial_state)
    outs = SegmentOutputs(B, T, H, V, r.dtype, dev, grad)
    pieces = [x.split(L, 1) for x in (r, w, k, v, a, b)]  # split once: O(T) backward
    for s, segment in zip(range(0, Tp, L), zip(*pieces, strict=True), strict=True):
        n = segment[0].shape[1] // C
        # 1. the segment's chunks [B, H, n, C, D]; cumulative log-decays in float64
        rc, kc, vc, ac, bc = (to_chunks(x, C, cd) for x in (segment[0], *segment[2:]))
        wc = to_chunks(segment[1], C, torch.float64)
        G = wc.cumsum(-2)
        Gp = G - wc  # G_{t-1}
        # 2. intra-chunk pair matrices and the UT transform of the low-rank reads
        L_ab, L_ak, L_rb, L_rk = _pair_matrices(G, Gp, rc, ac, bc, kc, cd, incl, strict)
        inv = torch.linalg.solve_triangular(eye - L_ab, eye.expand_as(L_ab), upper=False, unitriangular=True)
        Wy = torch.matmul(inv, ac * Gp.to(cd).exp())  # [B, H, n, C, K]
        Uy = torch.matmul(inv, torch.matmul(L_ak, vc))  # [B, H, n, C, V]
        # 3. the affine chunk update and the sequential pass
        to_end = exp_fast((G[..., -1:, :] - G).to(cd))  # Gam_C / Gam_s, <= 1
        b_end, k_end = bc * to_end, kc * to_end
        M = torch.diag_embed(G[..., -1, :].to(cd).exp()) + batched_kv(b_end, Wy)
        Nm = batched_kv(b_end, Uy) + batched_kv(k_end, vc)
        S_prev, S = affine_state_pass(M, Nm, S)
        # 4. O = scale [(r Gam + L_rb Wy) S_prev + L_rb Uy + L_rk V]
        r_read = rc * G.to(cd).exp() + torch.matmul(L_rb, Wy)
        o = torch.matmul(L_rb, Uy) + torch.matmul(L_rk, vc)
        o = o.view(-1, C, V).baddbmm_(r_read.view(-1, C, K), S_prev.view(-1, K, V)) * scale
        outs.add(s, o.view(B, H, n * C, V))
    return outs.result(), (S if output_final_state else None)
