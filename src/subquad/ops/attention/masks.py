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
