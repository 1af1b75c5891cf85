"""Titans linear memory, chunked: every mini-batch of a segment with batched matmuls.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C = b the mini-batch size,
n mini-batches per segment.

Within a mini-batch the gradients are taken at its starting memory M0, so with the errors
``z_s = M0^T k_s - v_s``, the in-chunk cumulative log-decays ``E`` (momentum, from gm) and ``F``
(memory, from g), and ``S0`` the momentum entering the mini-batch, unrolling both recurrences gives

    S_t = e^{E_t} S0 - sum_{s<=t} e^{E_t - E_s} theta_s k_s z_s^T
    M_t = e^{F_t} M0 + c_t S0 - sum_{s<=t} w_ts theta_s k_s z_s^T
    c_t = sum_{r<=t} e^{F_t - F_r + E_r},   w_ts = sum_{s<=r<=t} e^{F_t - F_r} e^{E_r - E_s}

i.e. ``W = L_F L_E`` and ``c = L_F e^E`` with the lower-triangular decay matrices
``L_X[t, r] = e^{X_t - X_r}`` (every exponent <= 0, differences formed in float64). Then, with
``A = (W * Q K^T) diag(theta)``:

    O = scale * [(e^F Q - A K) M0 + (c Q) S0 + A V]

and the mini-batch's end is affine in the stacked state ``X = [M; S]`` (``[2K, V]``):

    M' = (e^{F_C} I - K^T D_w K) M0 + c_C S0 + K^T D_w V,     D_w = diag(theta * W[C, :])
    S' = -K^T D_e K M0 + e^{E_C} S0 + K^T D_e V,              D_e = diag(theta * e^{E_C - E})

so the sequential pass is one ``[2K, 2K] x [2K, V]`` gemm per mini-batch (``affine_state_pass``).
Zero inputs are not an identity here (the memory keeps adding its momentum), so sequences are
never padded: a last, shorter mini-batch runs as its own chunk, and packed sequences run one by one.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import (
    affine_state_pass,
    batched_kv,
    batched_qk,
    causal_mask,
    exp_fast,
    segment_length,
    state_dtype,
    to_chunks,
)


def _decay_matrix(X: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``L[t, r] = exp(X_t - X_r)`` for r <= t, else 0, from float64 cumulative sums ``X [.., C]``."""
    return exp_fast(torch.where(mask, X.unsqueeze(-1) - X.unsqueeze(-2), float("-inf")).to(dtype))


def _chunks(q, k, v, theta, g, gm, C, scale, X):
    """Whole mini-batches of size C of one segment, ``T`` a multiple of C; ``X [B, H, 2K, V]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = T // C
    cd = X.dtype
    mask = causal_mask(C, q.device)
    eye_k = torch.eye(K, dtype=cd, device=q.device)
    # 1. the segment's mini-batches [B, H, n, C, D]; per-token scalars [B, H, n, C]
    qc, kc, vc = (to_chunks(x, C, cd) for x in (q, k, v))
    th, gs, gms = (x.permute(0, 2, 1).reshape(B, H, n, C) for x in (theta.to(cd), g, gm))
    F = gs.to(torch.float64).cumsum(-1)
    E = gms.to(torch.float64).cumsum(-1)
    # 2. decay matrices and the coefficients of the unrolled recurrences
    L_F, L_E = _decay_matrix(F, mask, cd), _decay_matrix(E, mask, cd)
    W = torch.matmul(L_F, L_E)  # [B, H, n, C, C], lower triangular
    eE, eF = E.to(cd).exp(), F.to(cd).exp()
    c = torch.matmul(L_F, eE.unsqueeze(-1))  # [B, H, n, C, 1]
    A = W * batched_qk(qc, kc) * th.unsqueeze(-2)
    # 3. the affine update of [M; S] over each mini-batch
    kw = kc * (th * W[..., -1, :]).unsqueeze(-1)  # D_w K
    ke = kc * (th * (E[..., -1:] - E).to(cd).exp()).unsqueeze(-1)  # D_e K
    last_F, last_E, last_c = eF[..., -1, None, None], eE[..., -1, None, None], c[..., -1, :, None]
    top = torch.cat([last_F * eye_k - batched_kv(kw, kc), last_c * eye_k.expand(B, H, n, K, K)], -1)
    bottom = torch.cat([-batched_kv(ke, kc), last_E * eye_k.expand(B, H, n, K, K)], -1)
    trans = torch.cat([top, bottom], -2)  # [B, H, n, 2K, 2K]
    add = torch.cat([batched_kv(kw, vc), batched_kv(ke, vc)], -2)  # [B, H, n, 2K, V]
    X_prev, X = affine_state_pass(trans, add, X)
    # 4. O = scale [(e^F Q - A K) M0 + (c Q) S0 + A V], as one read of the stacked state
    q_read = torch.cat([qc * eF.unsqueeze(-1) - torch.matmul(A, kc), qc * c], -1)  # [B, H, n, C, 2K]
    o = torch.matmul(A, vc).view(-1, C, V).baddbmm_(q_read.view(-1, C, 2 * K), X_prev.view(-1, 2 * K, V))
    return (o * scale).view(B, H, T, V).transpose(1, 2), X


def chunk_titans(q, k, v, theta, g, gm, mini_batch_size, scale, initial_state, output_final_state):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = mini_batch_size
    cd = state_dtype(q.dtype)
    if initial_state is not None:
        X = initial_state.to(cd).transpose(1, 2).reshape(B, H, 2 * K, V)  # [M; S] per head
    else:
        X = q.new_zeros(B, H, 2 * K, V, dtype=cd)
    # segments of whole mini-batches, then the shorter last mini-batch on its own
    L = segment_length(B * H, 2 * max(K, V), C)
    whole = T - T % C
    sizes = [min(L, whole - a) for a in range(0, whole, L)] + ([T - whole] if T > whole else [])
    # split once (slicing per segment would make backward O(T^2 / L))
    pieces = [x.split(sizes, 1) for x in (q, k, v, theta, g, gm)]
    outs = []
    for i, size in enumerate(sizes):
        o, X = _chunks(*(p[i] for p in pieces), C if size % C == 0 else size, scale, X)
        outs.append(o)
    o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    final = X.view(B, H, 2, K, V).transpose(1, 2) if output_final_state else None
    return o.to(q.dtype), final
