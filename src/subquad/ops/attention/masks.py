"""Which keys a query may see: the one rule every attention mode shares.

Shape legend: T time, i query position, j key position.
"""

from __future__ import annotations

import torch


def allowed(
    i: torch.Tensor, j: torch.Tensor, causal: bool, window: int | None, sinks: int, T: int
) -> torch.Tensor:
    """Boolean ``allowed[..., i, j]`` for broadcastable query / key positions ``i [.., Q, 1]`` and
    ``j [.., 1, S]``: a real key (``j < T``), at or before the query when causal, within the last
    ``window`` positions (``i - j < window``) or one of the first ``sinks`` keys."""
    ok = j < T
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        near = (i - j < window) & (j - i < window)  # non-causal windows are two-sided
        if sinks:
            near = near | (j < sinks)
        ok = ok & near
    return ok


def block_indices_to_mask(indices: torch.Tensor, nb: int) -> torch.Tensor:
    """Per-query-block index lists -> block mask: ``indices [B, H, nb, S]`` (int64, the key blocks
    query block I reads, -1 for an empty slot, repeats allowed) -> bool ``[B, H, nb, nb]``."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 4:
        raise TypeError(f"block indices must be an int64 torch.Tensor [B, H, nb, S], got {indices!r:.80}")
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= nb):
        raise ValueError(
            f"block indices must lie in [0, nb) = [0, {nb}) or be -1 (an empty slot), "
            f"got values from {int(indices.min())} to {int(indices.max())}"
        )
    B, H, rows, _ = indices.shape
    mask = torch.zeros(B, H, rows, nb + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, indices.where(indices >= 0, nb), True)  # -1 lands in the extra column
    return mask[..., :nb]
