"""Neighborhood attention, the specification: one query at a time over its neighbourhood, written
from the definition with plain integers (independent of the tensor construction in ``core``).

Shape legend: B batch, N tokens, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import itertools

import torch


def axis_window(i: int, L: int, k: int, d: int, causal: bool) -> list[int]:
    """Positions one query at position ``i`` of an axis of size ``L`` sees along it (kernel k,
    dilation d): only positions of its own dilation group (``j = i mod d``), the k members before
    it up to itself when causal, else the k consecutive members with it at the centre, moved
    inwards where the group ends (all of the group when it has fewer than k members)."""
    members = list(range(i % d, L, d))
    rank = members.index(i)
    if causal:
        return members[max(0, rank - k + 1) : rank + 1]
    width = min(k, len(members))
    start = min(max(rank - k // 2, 0), len(members) - width)
    return members[start : start + width]


def neighborhood_reference(q, k, v, grid, kernel, dilation, causal, scale):
    """q, k ``[B, N, H, K]``, v ``[B, N, H, V]`` (heads matched), N the product of ``grid``:
    ``o [B, N, H, V]`` by a loop over the queries, in the inputs' dtype."""
    o = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    strides = [1] * len(grid)
    for a in range(len(grid) - 2, -1, -1):
        strides[a] = strides[a + 1] * grid[a + 1]
    for point in itertools.product(*(range(L) for L in grid)):
        t = sum(p * s for p, s in zip(point, strides, strict=True))
        windows = [
            axis_window(p, L, kk, d, c)
            for p, L, kk, d, c in zip(point, grid, kernel, dilation, causal, strict=True)
        ]
        keys = [sum(p * s for p, s in zip(nb, strides, strict=True)) for nb in itertools.product(*windows)]
        idx = torch.tensor(keys, device=q.device)
        s = torch.einsum("bhd,bmhd->bhm", q[:, t], k[:, idx]) * scale  # [B, H, M]
        o[:, t] = torch.einsum("bhm,bmhd->bhd", torch.softmax(s, -1), v[:, idx])
    return o
