"""neighborhood: Neighborhood Attention (Hassani et al., NAT, https://arxiv.org/abs/2204.07143;
dilation: DiNAT, https://arxiv.org/abs/2209.15001) on 1D sequences and 2D / 3D token grids.

Shape legend: B batch, T tokens (a grid's tokens in row-major order), H query heads, Hk key/value
heads (dividing H), K key dim, V value dim, N sequences.
"""

from __future__ import annotations

import math

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import per_sequence
from subquad.ops.neighborhood import core
from subquad.ops.neighborhood.reference import neighborhood_reference

MODES = ("reference", "chunk")


def _per_axis(name: str, value, dims: int, kind: type) -> tuple:
    """``value`` as one entry per grid axis: a single value for all, or a tuple of ``dims``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(items) != dims:
        raise ValueError(f"{name} must be one value or {dims} (one per grid axis), got {value!r}")
    for x in items:
        if kind is bool and not isinstance(x, bool):
            raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
        if kind is int and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"{name} must be an int >= 1 or a tuple of them, got {value!r}")
    return items


@autocast_exempt
def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kernel_size: int | tuple[int, ...] = 7,
    dilation: int | tuple[int, ...] = 1,
    causal: bool | tuple[bool, ...] = False,
    grid: tuple[int, ...] | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Neighborhood attention: each token attends, by softmax, to the keys of its neighbourhood,
    ``o_i = sum_{j in N(i)} softmax_j(scale q_i . k_j) v_j``. On a grid (``grid = (X, Y)`` or
    ``(X, Y, Z)``, tokens in row-major order along T) the neighbourhood is the product of one window
    per axis. Along an axis of size L, with kernel k and dilation d, position i sees only positions
    of its own dilation group (``j = i mod d``): the k group members around it, centred and moved
    inwards at the ends so that a query always sees k of them (all of its group when the group has
    fewer than k members); with ``causal`` the k members before it, itself included, that exist.
    Cost ``O(T prod(k) (K + V))``.

    Args:
        q: ``[B, T, H, K]``. k: ``[B, T, Hk, K]``, v: ``[B, T, Hk, V]``, Hk dividing H.
        kernel_size: neighbours per axis (int for all axes, or one per axis), >= 1.
        dilation: step between neighbours per axis, >= 1.
        causal: per axis; 1D causal neighborhood attention is a sliding window over every d-th
            token.
        grid: the token grid's sizes, their product T; None is one axis of length T.
        scale: default ``K ** -0.5``.
        cu_seqlens: int64 ``[N + 1]`` packed 1D sequences (B = 1, no grid): no attention across them.
        mode: ``"chunk"`` (without dilation: tiles of queries score the union of their windows in
            matmuls, masked; with dilation: chunks of queries gather their own neighbours' keys and
            values; both backwards recompute the scores from the saved log-sum-exp) or
            ``"reference"`` (a loop over the queries, written from the definition).
        chunk_size: unused by this op (the gather chunks are sized by memory); accepted for the op
            contract.

    Returns:
        ``o [B, T, H, V]`` in q's dtype.
    """
    B, T, _, H, Hk, K = val.check_grouped_qkv(q, k, v)
    val.check_same_dtype_device({"q": q, "k": k, "v": v})
    if grid is None:
        grid = (T,)
    elif (
        not isinstance(grid, (tuple, list))
        or not 1 <= len(grid) <= 3
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in grid)
    ):
        raise ValueError(f"grid must be None or 1-3 ints >= 1 (the token grid's sizes), got {grid!r}")
    grid = tuple(grid)
    if math.prod(grid) != T:
        raise ValueError(f"grid {list(grid)} holds {math.prod(grid)} tokens, but q has T = {T}")
    kernel = _per_axis("kernel_size", kernel_size, len(grid), int)
    dil = _per_axis("dilation", dilation, len(grid), int)
    causal_ = _per_axis("causal", causal, len(grid), bool)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, K)
    val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    if cu_seqlens is not None and len(grid) > 1:
        raise ValueError("cu_seqlens packs 1D sequences; it does not combine with a grid of 2 or 3 axes")

    def run(q_, k_, v_):
        shape = grid if len(grid) > 1 else (q_.shape[1],)  # 1D: one packed sequence's length
        cd = state_dtype(q.dtype)
        G = H // Hk
        q_, k_, v_ = q_.to(cd), k_.repeat_interleave(G, 2).to(cd), v_.repeat_interleave(G, 2).to(cd)
        if mode == "reference":
            o_ = neighborhood_reference(q_, k_, v_, shape, kernel, dil, causal_, scale)
        elif all(d == 1 for d in dil):
            o_ = core.tiled(q_, k_, v_, shape, kernel, causal_, scale)
        else:
            idx, ok = core.neighbours(shape, kernel, dil, causal_, q.device)
            o_ = core.gathered(q_, k_, v_, idx, ok, scale)
        return o_.to(q.dtype)

    return per_sequence(run, cu_seqlens, q, k, v)


__all__ = ["neighborhood_attention"]
