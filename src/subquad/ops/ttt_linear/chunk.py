"""TTT-Linear's dual form: every mini-batch of a segment with batched matmuls.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C = b the mini-batch size,
n mini-batches per segment.

Within a mini-batch all gradients are taken at its starting weights W0, so with the prediction
errors ``Z = K W0 - V`` and ``E = diag(eta)`` (the paper's dual form, section 2.5):

    O     = scale * (Q W0 - tril(Q K^T) E Z) = scale * [(Q - tril(Q K^T) E K) W0 + tril(Q K^T) E V]
    W_end = W0 - K^T E Z                     = (I - K^T E K) W0 + K^T E V

The update is affine in W0, so both factors are batched over every mini-batch and the sequential
pass is one [K, K] x [K, V] gemm per mini-batch (``affine_state_pass``); the outputs then follow
batched from the weights entering each mini-batch. No exponentials: nothing can overflow.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import (
    SegmentOutputs,
    affine_state_pass,
    batched_kv,
    batched_qk,
    causal_mask,
    pad_time,
    records_grad,
    segment_length,
    state_dtype,
    to_chunks,
)


def chunk_ttt_linear(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eta: torch.Tensor,
    mini_batch_size: int,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = mini_batch_size
    cd = state_dtype(q.dtype)
    dev = q.device
    # 0. pad to whole mini-batches with zeros: eta = 0 learns nothing
    q, k, v, eta = (pad_time(x, C) for x in (q, k, v, eta))
    Tp = q.shape[1]
    L = segment_length(B * H, max(K, V), C)
    mask = causal_mask(C, dev)
    eye_k = torch.eye(K, dtype=cd, device=dev)
    W = initial_state.to(cd) if initial_state is not None else torch.zeros(B, H, K, V, dtype=cd, device=dev)
    grad = records_grad(q, k, v, eta, initial_state)
    outs = SegmentOutputs(B, T, H, V, q.dtype, dev, grad)
    pieces = [x.split(L, 1) for x in (q, k, v, eta)]
    for s, (q_s, k_s, v_s, eta_s) in zip(range(0, Tp, L), zip(*pieces, strict=True), strict=True):
        n = q_s.shape[1] // C
        # 1. the segment's mini-batches [B, H, n, C, D]; eta [B, H, n, C, 1]
        qc, kc, vc = (to_chunks(x, C, cd) for x in (q_s, k_s, v_s))
        ek = kc * eta_s.to(cd).permute(0, 2, 1).reshape(B, H, n, C, 1)  # E K
        # 2. tril(Q K^T) E and the affine update factors
        A = batched_qk(qc, ek) * mask  # [B, H, n, C, C]: (q_t . k_s) eta_s for s <= t
        M = eye_k - batched_kv(ek, kc)  # I - K^T E K
        Nm = batched_kv(ek, vc)  # K^T E V
        # 3. the weights entering each mini-batch, sequentially
        W_prev, W = affine_state_pass(M, Nm, W)
        # 4. O = scale [(Q - A K) W_prev + A V]
        q_eff = qc - torch.matmul(A, kc)
        o = torch.matmul(A, vc)
        o = o.view(-1, C, V).baddbmm_(q_eff.view(-1, C, K), W_prev.view(-1, K, V)) * scale
        outs.add(s, o.view(B, H, n * C, V))
    return outs.result(), (W if output_final_state else None)
