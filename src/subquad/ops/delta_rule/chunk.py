"""Chunkwise-parallel (gated) delta rule in the WY / UT-transform form.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk, n chunks per segment.

Write the update as ``S_t = exp(g_t) S_{t-1} + k_t delta_t^T`` with the correction
``delta_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)``. Inside a chunk, with ``b_t`` the log-decay
since the chunk start and ``S`` the state entering it,

    S_t     = exp(b_t) S + sum_{j <= t} exp(b_t - b_j) k_j delta_j^T
    delta_t = beta_t (v_t - exp(b_t) S^T k_t - sum_{j < t} exp(b_t - b_j) (k_t . k_j) delta_j)

so the chunk's corrections solve one unit-lower-triangular system (the UT transform),

    (I + tril(diag(beta) (K K^T * D), -1)) Delta = diag(beta) (V - diag(exp(b)) K S),
    D_tj = exp(b_t - b_j),

i.e. ``Delta = U - W S`` with ``[U | W] = A^{-1} diag(beta) [V | exp(b) K]``: one batched
triangular solve for every chunk of a segment, independent of S. Then

    O  = scale * [ (Q * exp(b)) S + (tril(Q K^T) * D) Delta ]
    S' = exp(b_C) S + (K * exp(b_C - b))^T Delta

The sequential part is small gemms per chunk: ``Delta = U - W S``, the queries' read ``Q_out S``,
then ``S' = exp(b_C) S + K_out^T Delta`` with ``K_out = K * exp(b_C - b)``; everything else is
batched over the chunks of a segment. With gates, the pass carries ``S = f S~`` and folds ``f`` into
the chunk's factors, so a chunk's update needs no decay of the state (``_StateOffsets``).
(Folding the pass into one ``[K, K] x [K, V]`` gemm per chunk,
``S' = (exp(b_C) I - K_out^T W) S + K_out^T U``, costs two more batched ``K x C x K`` products and a
``[K, K]`` factor per chunk, and measured 1.3x slower in total at T 4K.)
Every exponent is <= 0 except ``K_out``'s, bounded by RESCALE_SPAN; decays are formed as in
``simple_gla`` (float64 exponents when a chunk decays by more than SAFE_SPAN nats).
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import (
    SAFE_SPAN,
    SegmentOutputs,
    batched_qk,
    causal_mask,
    exp_fast,
    pad_time,
    records_grad,
    segment_length,
    state_dtype,
    to_chunks_major,
)


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g, beta ``[B, T, H]`` (g may be None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    cd = state_dtype(q.dtype)
    dev = q.device
    # 0. pad to whole chunks with zeros: beta = 0 writes nothing, g = 0 decays nothing
    q, k, v, beta = (pad_time(x, C) for x in (q, k, v, beta))
    if g is not None:
        g = pad_time(g, C)
    Tp = q.shape[1]
    L = segment_length(B * H, max(K, V), C)
    mask = causal_mask(C, dev)
    strict = causal_mask(C, dev, strict=True)
    eye = torch.eye(C, dtype=cd, device=dev)
    S = initial_state.to(cd) if initial_state is not None else torch.zeros(B, H, K, V, dtype=cd, device=dev)
    grad = records_grad(q, k, v, g, beta, initial_state)
    outs = SegmentOutputs(B, T, H, V, q.dtype, dev, grad)
    starts = range(0, Tp, L)
    # split once (slicing per segment would make backward O(T^2 / L))
    pieces = [x.split(L, 1) if x is not None else [None] * len(starts) for x in (q, k, v, g, beta)]
    for seg, s in enumerate(starts):
        e = min(s + L, Tp)
        n = (e - s) // C
        q_s, k_s, v_s, g_s, beta_s = (p[seg] for p in pieces)
        # 1. this segment's chunks, chunk-major [n, B, H, C, D]; beta [n, B, H, C, 1]
        qc, kc, vc = (to_chunks_major(x, C, cd) for x in (q_s, k_s, v_s))
        bt = beta_s.to(cd).view(B, n, C, H).permute(1, 0, 3, 2).unsqueeze(-1)
        kk = batched_qk(kc, kc)  # [B, H, n, C, C]
        qk = batched_qk(qc, kc)
        if g_s is None:
            decay_qk = mask.to(cd)
            q_out, k_out, w_scale, offsets = qc, kc, bt, None
        else:
            b64 = g_s.view(B, n, C, H).permute(1, 0, 3, 2).to(torch.float64).cumsum(-1)  # [n, B, H, C]
            bc = b64 if -float(b64[..., -1].detach().min()) > SAFE_SPAN else b64.to(cd)
            # exp(b_i - b_j) masked to j <= i; exponents <= 0
            decay_qk = exp_fast(torch.where(mask, bc.unsqueeze(-1) - bc.unsqueeze(-2), float("-inf")).to(cd))
            # the state is carried as S = f_i S~ (see _StateOffsets), so the chunk's decays absorb f
            offsets = _StateOffsets(b64[..., -1])
            e = offsets.log_f.unsqueeze(-1)  # [n + 1, B, H, 1]
            decay_q = (b64 + e[:-1]).exp().to(cd).unsqueeze(-1)  # f_i exp(b_t), exponents <= 0
            decay_k = (b64[..., -1:] - b64 - e[1:]).exp().to(cd).unsqueeze(-1)  # exp(b_C - b_j) / f_{i+1}
            q_out = qc * decay_q  # f_i exp(b_t) q_t
            k_out = kc * decay_k
            w_scale = bt * decay_q  # W = A^{-1} diag(beta f_i exp(b)) K
        # 2. UT transform: [U | W] = (I + tril(beta K K^T * D, -1))^{-1} beta [V | exp(b) K]
        # (inverting A and applying it by matmuls was 2x faster here than solving for [V | K]); the
        # decays of W scale the columns of the C x C inverse, not the C x K keys
        A = eye + bt * kk * decay_qk * strict
        A_inv = torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
        T_beta = (A_inv * bt.transpose(-1, -2)).view(-1, C, C)  # A^{-1} diag(beta)
        T_w = T_beta if offsets is None else (A_inv * w_scale.transpose(-1, -2)).view(-1, C, C)
        U = torch.bmm(T_beta, vc.view(-1, C, V)).view(n, B, H, C, V)
        W = torch.bmm(T_w, kc.view(-1, C, K)).view(n, B, H, C, K)
        # 3. inter-chunk pass: Delta_c = U_c - W_c S, then S <- exp(b_C) S + K_out^T Delta_c;
        # it also reads the state entering each chunk by that chunk's decayed queries
        Delta, QS, S = _delta_state_pass(U, W, k_out, q_out, offsets, S, grad)
        # 4. output: scale * (Q_out S + (tril(Q K^T) * D) Delta); decay_qk is 0 above the diagonal
        o = QS.view(-1, C, V).baddbmm_(
            (qk * decay_qk).view(-1, C, C), Delta.view(-1, C, V), beta=scale, alpha=scale
        )
        outs.add_chunk_major(s, o.view(n, B, H, C, V))
    return outs.result(), (S if output_final_state else None)


# how far (in nats) the carried state S~ may fall behind the true state S = f S~ before it is
# rescaled: f >= exp(-RESCALE_SPAN), so S~ and K_out / f stay within float32 range (e^30 ~ 1e13)
RESCALE_SPAN = 30.0


class _StateOffsets:
    """The gated pass carries ``S~`` with ``S = f_i S~`` on entering chunk i, instead of multiplying
    the state by the chunk's decay ``exp(b_C)`` once per chunk (a small op per chunk, 10% of the
    forward at T 4K). With ``f`` folded into the chunk's factors (``Q_out``, ``W`` times ``f_i``,
    ``K_out`` over ``f_{i+1}``), a chunk updates ``S~ <- S~ + K_out^T Delta``, and ``f`` only
    shrinks. Before it falls below ``exp(-RESCALE_SPAN)`` for any head, the state is rescaled once
    (``S~ <- f_i exp(b_C) S~``, and ``f_{i+1} = 1``). Everything here is float64 and tiny.

    log_f ``[n + 1, B, H]``: ``log f_i`` on entering chunk i (``log_f[n]`` on leaving the segment);
    rescale: per chunk, whether the state is rescaled after it, and factor ``[n, B, H]`` the
    factor then.
    """

    def __init__(self, lc: torch.Tensor):
        c = torch.cat([torch.zeros_like(lc[:1]), lc.cumsum(0)])  # log decay from the segment start
        # a bound for every head: the most negative chunk decay over the heads
        worst = lc.detach().flatten(1).amin(1).tolist()
        since, run, self.rescale = [], 0.0, []
        last = 0
        for i, w in enumerate(worst):
            since.append(last)
            rescale = run + w < -RESCALE_SPAN
            self.rescale.append(rescale)
            last, run = (i + 1, 0.0) if rescale else (last, run + w)
        since.append(last)
        idx = torch.tensor(since, device=lc.device)
        self.log_f = c - c[idx]
        self.factor = (c[1:] - c[idx[:-1]]).exp()  # f_i exp(b_C) for the chunks that rescale


def _delta_state_pass(
    U: torch.Tensor,
    W: torch.Tensor,
    k_out: torch.Tensor,
    q_out: torch.Tensor,
    offsets: _StateOffsets | None,
    S: torch.Tensor,
    grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential pass over a segment's chunks (chunk-major ``[n, B, H, ...]`` operands).

    Per chunk: ``Delta = U - W S~`` and ``S~ <- S~ + K_out^T Delta``, two small gemms, with the
    state rescaled at the chunks ``offsets`` names (gated only). Returns the corrections
    ``[n, B*H, C, V]``, ``Q_out S~`` with ``S~`` the state entering each chunk ``[n, B*H, C, V]``
    (unscaled), and the true state leaving the segment ``[B, H, K, V]``. Without autograd the
    corrections are written over U.
    """
    n, B, H, C, V = U.shape
    K = W.shape[-1]
    Uc, Wc = U.view(n, B * H, C, V), W.view(n, B * H, C, K)
    Qc = q_out.reshape(n, B * H, C, K)
    kT = k_out.reshape(n, B * H, C, K).transpose(-1, -2)  # [n, BH, K, C]
    rescale = [False] * n if offsets is None else offsets.rescale
    if offsets is not None:
        fac = offsets.factor.to(S.dtype).reshape(n, B * H, 1, 1)
        f_end = offsets.log_f[-1].exp().to(S.dtype).reshape(B * H, 1, 1)
    S3 = S.reshape(B * H, K, V)
    if grad:
        states, deltas = [], []
        for i in range(n):
            states.append(S3)
            d = torch.baddbmm(Uc[i], Wc[i], S3, alpha=-1)
            deltas.append(d)
            S3 = torch.baddbmm(S3 * fac[i] if rescale[i] else S3, kT[i], d)
        QS = torch.matmul(Qc, torch.stack(states))
        if offsets is not None:
            S3 = S3 * f_end
        return torch.stack(deltas), QS, S3.view(B, H, K, V)
    # without autograd every step works in place: Delta is U's buffer, the state is one buffer, and
    # each chunk's queries read the state while it is the one entering that chunk
    Delta = Uc  # U is this pass's own buffer (the UT transform's product), updated in place
    QS = torch.empty_like(Uc)
    S3 = S3.clone()
    d_i, qs_i, w_i, k_i, q_i = Delta.unbind(0), QS.unbind(0), Wc.unbind(0), kT.unbind(0), Qc.unbind(0)
    for i in range(n):
        torch.bmm(q_i[i], S3, out=qs_i[i])
        d_i[i].baddbmm_(w_i[i], S3, alpha=-1)
        if rescale[i]:
            S3.mul_(fac[i])
        S3.baddbmm_(k_i[i], d_i[i])
    if offsets is not None:
        S3.mul_(f_end)
    return Delta, QS, S3.view(B, H, K, V)
