"""Chunkwise-parallel GLA with secondary chunking, stable for any log-gate.

Shape legend: B batch, T time, H heads, K key dim, V value dim, C chunk, n chunks per segment,
c sub-chunk, m = C / c sub-chunks per chunk.

With ``b_i = sum_{s <= i} g_s`` the per-dimension log-decay accumulated since the chunk start
(``b_i <= 0``, non-increasing in i) and ``S`` the state entering the chunk:

    o_i = scale * [ sum_{j <= i} sum_k q_ik k_jk exp(b_ik - b_jk) v_j  +  (q_i * exp(b_i)) S ]
    S'  = diag(exp(b_C)) S + sum_j (k_j * exp(b_C - b_j)) v_j^T

The intra-chunk weights ``exp(b_ik - b_jk)`` cannot be split into a query factor and a key factor
relative to the chunk start: ``exp(-b_j)`` overflows once the decay inside a chunk passes ~88
nats. So the chunk is cut into sub-chunks of c tokens (the GLA paper's secondary chunking):

* query sub-chunk I against earlier keys ``j < I c``: with the reference point ``r_I = b_{Ic-1}``,
  ``exp(b_i - b_j) = exp(b_i - r_I) * exp(r_I - b_j)`` and both exponents are ``<= 0``, so
  ``A[I] = (q_I * exp(b_I - r_I)) @ (k * exp(r_I - b))^T`` is a matmul with no overflow;
* inside a sub-chunk (``j, i`` in I) the weights are formed directly, ``[c, c, K]`` per sub-chunk.

Every exponent is <= 0 (masked terms are exp(-inf) = 0), whatever the gates.

That path forms ``[c, c, K]`` weights and ``m`` rescaled copies of the keys per chunk, several
times the work of the matmuls. Most gates decay far less than 88 nats within a chunk, so when
the decay over every chunk of a segment stays under ``SAFE_SPAN`` nats the chunk is factored
once around its midpoint ``r = b_C / 2``: ``exp(b_i - b_j) = exp(b_i - r) * exp(r - b_j)`` with
both exponents in ``[-SAFE_SPAN / 2, SAFE_SPAN / 2]``, far from float32's limits (the factors stay
below e^30 ~ 1e13), and the scores are one matmul. The leftover per-chunk factors ``exp(r)`` (the
query's) and ``exp(b_C - r)`` (the keys') are applied to the ``[K, V]`` states in the state pass,
so q and k are each rescaled once. Segments with a larger decay take the
secondary-chunking path; both are exact up to rounding.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import (
    LOG2_E,
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


def sub_chunk_size(chunk_size: int, preferred: int = 16) -> int:
    """The largest divisor of ``chunk_size`` not above ``preferred``."""
    for c in range(min(preferred, chunk_size), 0, -1):
        if chunk_size % c == 0:
            return c
    return 1


def intra_chunk_scores(qc: torch.Tensor, kc: torch.Tensor, bc: torch.Tensor, c: int) -> torch.Tensor:
    """Causal decayed scores ``A[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk)`` (j <= i), ``[.., C, C]``.

    ``qc, kc, bc`` are ``[.., C, K]``; ``bc`` the in-chunk cumulative log-decay.
    """
    *lead, C, K = qc.shape
    m = C // c
    dev = qc.device
    qs = qc.reshape(*lead, m, c, K)
    ks = kc.reshape(*lead, m, c, K)
    bs = bc.reshape(*lead, m, c, K)
    # 1. reference points r_I = b just before sub-chunk I (0 for the first)
    r = torch.cat([torch.zeros_like(bs[..., :1, 0, :]), bs[..., :-1, -1, :]], -2)  # [.., m, K]
    # 2. earlier sub-chunks: (q_I * exp(b_I - r_I)) @ (k_j * exp(r_I - b_j))^T for j < I c
    dt = qc.dtype  # exponents may come in float64; the weights are formed in the compute dtype
    q_hat = qs * exp_fast((bs - r.unsqueeze(-2)).to(dt))  # [.., m, c, K]
    earlier = torch.arange(C, device=dev)[None, :] < (torch.arange(m, device=dev)[:, None] * c)  # [m, C]
    # [.., m, C, K]: key j rescaled for query sub-chunk I, zero where j is not earlier
    expo = (r.unsqueeze(-2) - bc.unsqueeze(-3)).masked_fill(~earlier[..., None], float("-inf"))
    k_hat = kc.unsqueeze(-3) * exp_fast(expo.to(dt))
    scores = torch.matmul(q_hat, k_hat.transpose(-1, -2))  # [.., m, c, C]
    # 3. inside each sub-chunk: the weights formed directly, j <= i
    expo = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill(
        ~causal_mask(c, dev)[..., None], float("-inf")
    )  # [.., m, c, c, K]
    diag = (qs.unsqueeze(-2) * ks.unsqueeze(-3) * exp_fast(expo.to(dt))).sum(-1)  # [.., m, c, c]
    # 4. place the diagonal blocks: column block I of row block I
    eye = torch.eye(m, dtype=qc.dtype, device=dev)
    scores = scores.reshape(*lead, m, c, m, c) + diag.unsqueeze(-2) * eye[:, None, :, None]
    return scores.reshape(*lead, C, C)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA. q, k, g ``[B, T, H, K]``; v ``[B, T, H, V]``; state ``[B, H, K, V]``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    c = sub_chunk_size(C)
    cd = state_dtype(q.dtype)
    dev = q.device
    # 0. pad time to whole chunks with zeros: zero k, v and log-gates leave the state unchanged
    q, k, v, g = (pad_time(x, C) for x in (q, k, v, g))
    Tp = q.shape[1]
    L = segment_length(B * H, max(K, V), C)
    S = initial_state.to(cd) if initial_state is not None else torch.zeros(B, H, K, V, dtype=cd, device=dev)
    scaled_mask = causal_mask(C, dev).to(cd) * scale
    grad = records_grad(q, k, v, g, S)
    outs = SegmentOutputs(B, T, H, V, q.dtype, dev, grad)
    # split once: slicing x[:, s:e] per segment would make backward build a full-size zero
    # gradient per slice, O(T^2 / L) work
    pieces = [x.split(L, 1) for x in (q, k, v, g)]
    for seg, s in enumerate(range(0, Tp, L)):
        e = min(s + L, Tp)
        n = (e - s) // C
        q_s, k_s, v_s, g_s = (p[seg] for p in pieces)
        # [B, H, n, C, D] views of the time-major inputs: the elementwise ops below read them
        # strided and write contiguous results, so q, k and g need no separate layout copy
        qv, kv = (x.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q_s, k_s))
        vc = to_chunks(v_s, C, cd)
        # b in log2 units (b / ln 2), so every factor below is one exp2. Without autograd the
        # scaling writes the contiguous copy that cumsum needs anyway (along a strided middle dim
        # it ran at half the speed), and cumsum runs in place; autograd supports neither
        if grad:
            bc = to_chunks(g_s, C, cd).mul_(LOG2_E).cumsum(-2)
        else:
            gv = g_s.view(B, n, C, H, -1).permute(0, 3, 1, 2, 4).to(cd)  # no copy in float32
            bc = torch.mul(gv, LOG2_E, out=torch.empty(gv.shape, dtype=cd, device=dev)).cumsum_(-2)
        last = bc[..., -1:, :]  # [B, H, n, 1, K] decay over each chunk
        if -float(last.detach().min()) <= SAFE_SPAN * LOG2_E:
            # 1a. moderate decay: factor every chunk around its midpoint r = b_C / 2. The query
            # then needs exp(r) and each key exp(b_C - r) more: per-chunk [K] factors that are
            # applied to the small [K, V] states in the state pass instead of to q and k
            r = last * 0.5
            E = torch.sub(bc, r).exp2_()  # exp(b - r), within [e^-30, e^30]
            # E first: an elementwise result takes the layout of its first operand (contiguous here)
            q_out = torch.mul(E, qv)  # q_i * exp(b_i - r)
            # k_j * exp(r - b_j): one pass into a contiguous buffer without autograd
            k_out = torch.mul(E.reciprocal(), kv) if grad else torch.div(kv, E, out=torch.empty_like(E))
            scores = batched_qk(q_out, k_out).mul_(scaled_mask)
            read = (r.exp2() * scale).transpose(-1, -2)  # [B, H, n, K, 1]
            write = (last - r).exp2().transpose(-1, -2)
            chunk_decay = last.squeeze(-2).exp2().unsqueeze(-1)  # [B, H, n, K, 1]
        else:
            # 1b. strong decay somewhere in the segment: secondary chunking, no overflow possible.
            # b reaches thousands of nats here: accumulate it in float64 so the differences of
            # nearby tokens, which carry all the weight, keep float32 accuracy
            qc, kc = (to_chunks(x, C, cd) for x in (q_s, k_s))
            bc = to_chunks(g_s, C, torch.float64).cumsum(-2)
            last = bc[..., -1:, :]
            scores = intra_chunk_scores(qc, kc, bc, c) * scale
            q_out = qc * bc.to(cd).exp()
            k_out = kc * (last - bc).to(cd).exp()
            read = torch.full((1, 1, n, 1, 1), scale, dtype=cd, device=dev)
            write = None
            chunk_decay = last.squeeze(-2).to(cd).exp().unsqueeze(-1)
        # 2. each chunk's contribution to the state at its end (up to the factor `write`)
        U = batched_kv(k_out, vc)  # [B, H, n, K, V]
        # 3. inter-chunk state pass, sequential over the segment's chunks; each chunk reads the
        # state entering it scaled by `read`
        # (the factors `write` and `read` are applied to all chunks at once, outside the loop,
        # so each step is one addcmul)
        if write is not None:
            U = U * write
        if grad:
            states = []
            for i in range(n):
                states.append(S)
                S = torch.addcmul(U[:, :, i], chunk_decay[:, :, i], S)
            S_prev = torch.stack(states, 2) * read  # [B, H, n, K, V]
        else:
            # without autograd each step writes straight into one buffer (no stack copy): gla at
            # 16K took 0.87-0.88x of the previous time with it, 0.94-0.95x with the stack (A/B)
            buf = U.new_empty(B, H, n + 1, K, V)
            buf[:, :, 0] = S
            for i in range(n):
                torch.addcmul(U[:, :, i], chunk_decay[:, :, i], buf[:, :, i], out=buf[:, :, i + 1])
            S = buf[:, :, n].clone()
            S_prev = buf[:, :, :n] * read
        # 4. output: intra-chunk scores @ v, plus (accumulated by the same gemm) the carried state
        o = torch.bmm(scores.reshape(-1, C, C), vc.view(-1, C, V))
        o = o.baddbmm_(q_out.reshape(-1, C, K), S_prev.view(-1, K, V))
        outs.add(s, o.view(B, H, e - s, V))
    return outs.result(), (S if output_final_state else None)
