"""Step form of the selective scan: one token at a time, constant cost per token (the decode step).

Shape legend: B batch, T time, D inner channels, N state size per channel.

    h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t^T        y_t = h_t C_t + Dskip * x_t
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import records_grad, state_dtype, time_steps


def recurrent_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    Bt, T, Dm = x.shape
    N = A.shape[1]
    cd = state_dtype(x.dtype)
    h = initial_state.to(cd) if initial_state is not None else x.new_zeros(Bt, Dm, N, dtype=cd)
    grad = records_grad(x, dt, A, B, C, D, initial_state)
    A_ = A.to(cd)
    # time-major steps: dt [B, D, 1], dt * x [B, D, 1], B [B, 1, N], C [B, N, 1]
    dt_t = time_steps(dt.to(cd).transpose(0, 1).unsqueeze(-1), grad)
    u_t = time_steps((dt.to(cd) * x.to(cd)).transpose(0, 1).unsqueeze(-1), grad)
    b_t = time_steps(B.to(cd).transpose(0, 1).unsqueeze(-2), grad)
    c_t = time_steps(C.to(cd).transpose(0, 1).unsqueeze(-1), grad)
    ys = []
    for t in range(T):
        h = torch.exp(dt_t[t] * A_) * h + u_t[t] * b_t[t]
        ys.append(torch.bmm(h, c_t[t]))  # [B, D, 1]
    y = torch.cat(ys, -1).transpose(1, 2)  # [B, T, D]
    if D is not None:
        y = y + D.to(cd) * x.to(cd)
    return y.to(x.dtype), (h if output_final_state else None)
