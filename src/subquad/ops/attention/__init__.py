"""attention: exact softmax attention (tiled, O(T) memory), causal / windowed / with sinks, GQA.

Shape legend: B batch, T time, H query heads, Hk key/value heads (dividing H), K key dim,
V value dim, N sequences.
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import per_sequence
from subquad.ops.attention.chunk import chunk_attention
from subquad.ops.attention.decode import decode_attention
from subquad.ops.attention.estimators import (
    ESTIMATORS,
    mask_density,
    nsa_mask,
    quest_mask,
    vertical_slash_mask,
    xattention_mask,
)
from subquad.ops.attention.masks import block_indices_to_mask
from subquad.ops.attention.reference import reference_attention
from subquad.ops.attention.sparse import sparse_attention

MODES = ("reference", "chunk")

__all__ = [
    "ESTIMATORS",
    "attention",
    "attention_decode",
    "block_indices_to_mask",
    "mask_density",
    "nsa_mask",
    "quest_mask",
    "vertical_slash_mask",
    "xattention_mask",
]


@autocast_exempt
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    sinks: int = 0,
    block_mask: torch.Tensor | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 256,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, ``o_i = sum_j softmax_j(scale q_i . k_j) v_j`` over the keys query
    i may see: all (``causal=False``), ``j <= i`` (causal), the last ``window`` positions
    (``i - j < window``; two-sided when not causal), plus the first ``sinks`` keys (attention sinks,
    StreamingLLM, https://arxiv.org/abs/2309.17453).

    ``mode="chunk"`` is the FlashAttention algorithm (Dao et al. 2022,
    https://arxiv.org/abs/2205.14135): online softmax over key blocks, forward and a recomputing
    backward in O(T) memory, cost proportional to the visited blocks. A window shorter than T / 2
    instead scores each query block once against its token-aligned key span (``w + b - 1`` keys,
    query blocks of ``min(chunk_size, 64)``). ``mode="reference"`` is the per-query specification.

    Args:
        q: ``[B, T, H, K]``. k: ``[B, T, Hk, K]``, v: ``[B, T, Hk, V]`` with Hk dividing H (grouped
            query heads: query head h reads key/value head ``h // (H / Hk)``).
        causal, window, sinks: which keys each query sees (``window >= 1``; sinks need a window).
        block_mask: bool ``[B, H, nb, nb]`` with ``nb = ceil(T / chunk_size)``: query block I reads
            key block J only where it is True (and the causal / window rule allows the token).
            Only kept blocks are computed (cost proportional to them); a query that keeps no
            visible key gets o = 0 (and lse = +inf). Or per-query-block index lists, int64
            ``[B, H, nb, S]``: the key blocks each query block reads, -1 for an empty slot
            (``block_indices_to_mask``).
        scale: default ``K ** -0.5``.
        cu_seqlens: int64 ``[N + 1]`` packed sequences (B = 1); no attention across them.
        chunk_size: the block size b of the tiled form (256: fastest of 128 / 256 / 512 at T = 8K here).
        return_lse: also return the log-sum-exp of the scores ``[B, T, H]`` (float32; float64 for
            float64 inputs), with which partial results over disjoint key sets merge exactly.

    Returns:
        ``o [B, T, H, V]`` in q's dtype, or ``(o, lse)`` with ``return_lse``.
    """
    B, T, _, H, Hk, K = val.check_grouped_qkv(q, k, v)
    val.check_same_dtype_device({"q": q, "k": k, "v": v})
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
    if sinks and window is None:
        raise ValueError("sinks only apply with a window (without one every key is already seen)")
    val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    if block_mask is not None:
        nb = -(-T // chunk_size)
        if isinstance(block_mask, torch.Tensor) and block_mask.dtype == torch.int64:
            if block_mask.dim() != 4 or tuple(block_mask.shape[:3]) != (B, H, nb) or block_mask.shape[3] < 1:
                raise ValueError(
                    f"block_mask as index lists must have shape [B, H, nb, S] = [{B}, {H}, {nb}, S >= 1] "
                    f"(nb = ceil(T / chunk_size)), got {list(block_mask.shape)}"
                )
            block_mask = block_indices_to_mask(block_mask, nb)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(
                "block_mask must be a bool torch.Tensor [B, H, nb, nb] or int64 index lists "
                f"[B, H, nb, S], got {block_mask!r:.80}"
            )
        if tuple(block_mask.shape) != (B, H, nb, nb):
            raise ValueError(
                f"block_mask must have shape [B, H, nb, nb] = [{B}, {H}, {nb}, {nb}] "
                f"(nb = ceil(T / chunk_size)), got {list(block_mask.shape)}"
            )
        if sinks or cu_seqlens is not None:
            raise ValueError("block_mask does not combine with sinks or cu_seqlens (keep block 0 for sinks)")
    if Hk != H:
        # grouped heads: each key/value head serves H / Hk query heads (autograd sums them back)
        k, v = (x.repeat_interleave(H // Hk, dim=2) for x in (k, v))

    def run(q_, k_, v_):
        if mode == "reference":
            o_, lse_ = reference_attention(q_, k_, v_, causal, window, sinks, scale, block_mask, chunk_size)
            return o_.to(q.dtype), lse_
        if block_mask is not None:
            return sparse_attention(q_, k_, v_, block_mask, causal, window, scale, chunk_size)
        return chunk_attention(q_, k_, v_, causal, window, sinks, scale, chunk_size)

    o, lse = per_sequence(run, cu_seqlens, q, k, v)  # one sequence at a time: softmax is not padded
    return (o, lse) if return_lse else o


@autocast_exempt
def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    cache_seqlens: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: a single query per sequence against its KV cache, split over the keys
    and merged by log-sum-exp (split-K / Flash-Decoding).

    Args:
        q: ``[B, 1, H, K]`` the new token's queries.
        k_cache, v_cache: ``[B, S, Hk, K]``, ``[B, S, Hk, V]`` (the library's layout; read in place
            through strided views), Hk dividing H.
        cache_seqlens: int ``[B]`` valid cache lengths (keys past them are ignored); default S.
        scale: default ``K ** -0.5``.
        num_splits: key splits merged by lse; None (default) cuts the cache into splits of about
            ``decode.SPLIT_ELEMENTS`` values, which keeps each split in the CPU's cache.
        return_lse: also return the log-sum-exp ``[B, 1, H]``.

    Returns:
        ``o [B, 1, H, V]`` in q's dtype, or ``(o, lse)``.
    """
    val.check_tensor("q", q, 4, "[B, 1, H, K]")
    val.check_tensor("k_cache", k_cache, 4, "[B, S, Hk, K]")
    val.check_tensor("v_cache", v_cache, 4, "[B, S, Hk, V]")
    val.check_same_dtype_device({"q": q, "k_cache": k_cache, "v_cache": v_cache})
    B, one, H, K = q.shape
    if one != 1:
        raise ValueError(f"q must have shape [B, 1, H, K] (one new token), got {list(q.shape)}")
    S, Hk = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != K or S == 0 or Hk == 0 or H % Hk:
        raise ValueError(
            f"k_cache must have shape [B, S, Hk, K] = [{B}, S >= 1, Hk, {K}] with Hk dividing H = {H}, "
            f"got {list(k_cache.shape)}"
        )
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must have shape [B, S, Hk, V] like k_cache, got {list(v_cache.shape)}")
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    scale = val.resolve_scale(scale, K)
    lengths = None
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,):
            raise ValueError(
                f"cache_seqlens must be an int tensor of shape [B] = [{B}], got {cache_seqlens!r}"
            )
        lengths = cache_seqlens.tolist()
        if any(not 1 <= n <= S for n in lengths):
            raise ValueError(f"cache_seqlens must lie in [1, S = {S}], got {lengths}")
    o, lse = decode_attention(q[:, 0], k_cache, v_cache, lengths, scale, num_splits)
    o = o.unsqueeze(1).to(q.dtype)
    return (o, lse.unsqueeze(1)) if return_lse else o
