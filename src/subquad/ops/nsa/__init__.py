"""nsa: Native Sparse Attention (Yuan et al. 2025, https://arxiv.org/abs/2502.11089), a trainable
sparse softmax attention: compressed-block attention + selected-block attention + sliding window,
mixed by per-token gates.

Shape legend: B batch, T queries, S keys (S >= T), H query heads, Hk key/value heads (dividing H),
K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import per_sequence
from subquad.ops.nsa.chunk import chunk_nsa
from subquad.ops.nsa.reference import reference_nsa

MODES = ("reference", "chunk")


@autocast_exempt
def nsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_cmp: torch.Tensor,
    g_slc: torch.Tensor,
    g_swa: torch.Tensor,
    *,
    block_size: int = 64,
    block_count: int = 16,
    window: int = 512,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Native Sparse Attention. For query t at position p (causal; with S > T the queries are the
    last T positions of the keys, which is how a decoding step against a cache is called):

    - **cmp**: softmax attention over the mean of every complete block of ``block_size`` keys
      (values likewise) that ends at or before p;
    - **slc**: its probabilities, summed over the query heads that share a key head, rank the
      blocks; the first block, p's own block and the highest-ranked others, ``block_count`` in
      all, are read token by token (causally). Grouped heads share the selection, as in the paper;
    - **swa**: softmax attention over the last ``window`` positions;
    - ``o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa``.

    The paper compresses with a learned MLP over overlapping blocks; here compression is mean
    pooling (a layer can transform k, v before the call), and selection blocks equal compression
    blocks. Gradients flow through all three branches and the gates, not through the discrete
    selection. ``chunk`` mode: see ``subquad/ops/nsa/README.md``; ``reference``: one query at a time.

    Args:
        q: ``[B, T, H, K]``. k: ``[B, S, Hk, K]``, v: ``[B, S, Hk, V]``, S >= T, Hk dividing H.
        g_cmp, g_slc, g_swa: ``[B, T, H]`` branch gates (a layer passes sigmoids).
        block_size, block_count, window: ints >= 1.
        scale: default ``K ** -0.5``. cu_seqlens: int64 ``[N + 1]`` packed sequences (B = 1, S = T).
        chunk_size: query block of the sliding-window branch (``attention``'s chunk_size).

    Returns:
        ``o [B, T, H, V]`` in q's dtype.
    """
    B, T, S, H, _, K = val.check_grouped_qkv(q, k, v, keys="suffix")
    gates = {"g_cmp": g_cmp, "g_slc": g_slc, "g_swa": g_swa}
    for name, g in gates.items():
        val.check_tensor(name, g, 3, "[B, T, H]")
    val.check_same_dtype_device({"q": q, "k": k, "v": v, **gates})
    for name, g in gates.items():
        val.check_shape(name, g, (B, T, H), "[B, T, H]")
    for name, x in (("block_size", block_size), ("block_count", block_count), ("window", window)):
        val.check_positive_int(name, x)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    if cu_seqlens is not None and S != T:
        raise ValueError("cu_seqlens needs as many keys as queries (S = T)")

    def run(q_, k_, v_, gc, gs, gw):
        if mode == "reference":
            o_ = reference_nsa(q_, k_, v_, gc, gs, gw, block_size, block_count, window, scale)
        else:
            o_ = chunk_nsa(q_, k_, v_, gc, gs, gw, block_size, block_count, window, scale, chunk_size)
        return o_.to(q.dtype)

    return per_sequence(run, cu_seqlens, q, k, v, g_cmp, g_slc, g_swa)


__all__ = ["nsa"]
