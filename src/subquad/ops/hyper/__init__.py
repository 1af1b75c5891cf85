"""hyper: HyperAttention (Han et al. 2023, https://arxiv.org/abs/2310.05869), approximate softmax
attention in near-linear time: angular-LSH sorting finds the large scores, exact attention within
blocks of the sorted order covers them, uniformly sampled keys estimate the rest; causal attention
by the paper's recursive split.

Shape legend: B batch, T time, H query heads, Hk key/value heads (dividing H), K key dim, V value
dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import per_sequence
from subquad.ops.hyper import core

MODES = ("reference", "chunk")


@autocast_exempt
def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    block_size: int = 64,
    num_samples: int = 64,
    lsh_bits: int = 6,
    min_seq_len: int = 256,
    seed: int = 0,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> torch.Tensor:
    """HyperAttention. Non-causal (queries ``[0, Tq)`` over keys ``[0, Tk)``): queries and keys are
    sorted by their bucket under ``lsh_bits`` random hyperplanes (Gray-code order, so neighbouring
    buckets are similar directions) and cut into the same number of blocks; a query attends exactly
    (weight 1) to the keys of its block, and ``num_samples`` keys drawn uniformly (with replacement)
    stand for all the others with weight ``Tk / num_samples`` each:
    ``o_i = sum_j w_ij e^{s_ij} v_j / sum_j w_ij e^{s_ij}``.
    Causal: the sequence is split in halves recursively; each half is causal attention of itself
    (exact once it is at most ``min_seq_len`` long) and the second half's queries add the non-causal
    estimate over the first half's keys, merged by log-sum-exp.

    The paper samples keys by the norms of V's rows for the product with V; here one uniform sample
    serves both the normaliser and the product (unbiased for both). Draws are a function of ``seed``
    and each piece's place, so a call is deterministic and both modes draw the same. No gradient
    flows through the hashing or sampling.

    Args:
        q: ``[B, T, H, K]``. k: ``[B, T, Hk, K]``, v: ``[B, T, Hk, V]``; with ``causal=False`` k and v
            may have another length S.
        causal: the recursive causal form (needs S = T) or one non-causal estimate.
        block_size, num_samples, lsh_bits, min_seq_len: ints >= 1.
        seed: int for the hyperplanes and samples.
        scale: default ``K ** -0.5``. cu_seqlens: int64 ``[N + 1]`` packed sequences (B = 1).
        mode: ``"chunk"`` (sorted blocks + sampled keys, ``O(T (b + m) log T)``) or ``"reference"``
            (the same estimate written with dense, masked, weighted score matrices).
        chunk_size: unused by this op; accepted for the op contract.

    Returns:
        ``o [B, T, H, V]`` in q's dtype.
    """
    B, T, S, H, Hk, K = val.check_grouped_qkv(q, k, v, keys="same" if causal else "any")
    val.check_same_dtype_device({"q": q, "k": k, "v": v})
    for name, x in (
        ("block_size", block_size),
        ("num_samples", num_samples),
        ("lsh_bits", lsh_bits),
        ("min_seq_len", min_seq_len),
    ):
        val.check_positive_int(name, x)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    if cu_seqlens is not None and S != T:
        raise ValueError("cu_seqlens needs as many keys as queries (S = T)")
    piece = core.dense_piece if mode == "reference" else core.blocked_piece

    def run(q_, k_, v_):
        cd = state_dtype(q.dtype)
        G = H // Hk
        q_, k_, v_ = q_.to(cd), k_.repeat_interleave(G, 2).to(cd), v_.repeat_interleave(G, 2).to(cd)
        if causal:
            o_, _ = core.causal(
                q_,
                k_,
                v_,
                scale,
                piece,
                seed=seed,
                bits=lsh_bits,
                block=block_size,
                samples=num_samples,
                min_len=min_seq_len,
                exact=core.exact_causal if mode == "reference" else core.tiled_causal,
            )
        else:
            planes, idx = core.draws(seed, 0, q_.shape[1], k_.shape[1], H, K, lsh_bits, num_samples, q.device)
            o_, _ = piece(q_, k_, v_, scale, planes, idx, block_size)
        return o_.to(q.dtype)

    return per_sequence(run, cu_seqlens, q, k, v)


__all__ = ["hyper_attention"]
