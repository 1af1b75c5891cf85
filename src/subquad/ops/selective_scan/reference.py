"""Reference selective scan (Mamba's S6): the specification, a plain per-step loop.

Shape legend: B batch, T time, D inner channels, N state size per channel, S sequences.

    h_t[d] = exp(dt_t[d] A[d]) * h_{t-1}[d] + dt_t[d] x_t[d] B_t        (h_t[d] in R^N)
    y_t[d] = C_t . h_t[d] + Dskip[d] x_t[d]
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, dt ``[B, T, D]``; A ``[D, N]``; B, C ``[B, T, N]``; D ``[D]`` or None (dt already
    biased / softplus-ed by the caller)."""
    A_ = A.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    skip = None if D is None else D.to(A_.dtype)

    def step(h, s):
        # h [D, N]; x, dt [D]; B, C [N]
        h = torch.exp(s["dt"][:, None] * A_) * h + (s["dt"] * s["x"])[:, None] * s["B"][None, :]
        y = h @ s["C"]
        if skip is not None:
            y = y + skip * s["x"]
        return h, y

    return reference_loop(
        step, {"x": x, "dt": dt, "B": B, "C": C}, 0, initial_state, output_final_state, cu_seqlens,
        state_shape=tuple(A.shape),
    )  # fmt: skip
