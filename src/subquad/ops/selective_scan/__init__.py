"""selective_scan: Mamba's S6 scan with a diagonal A, input-dependent dt, B, C.

Shape legend: B batch, T time, D inner channels (D_inner), N state size per channel, S sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import run_padded
from subquad.ops.selective_scan.chunk import chunk_selective_scan
from subquad.ops.selective_scan.recurrent import recurrent_selective_scan
from subquad.ops.selective_scan.reference import reference_selective_scan

MODES = ("reference", "chunk", "recurrent")


@autocast_exempt
def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    mode: str = "chunk",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba's selective scan S6 (Gu & Dao 2023, https://arxiv.org/abs/2312.00752).

    Per channel d: ``h_t[d] = exp(dt_t[d] A[d]) * h_{t-1}[d] + dt_t[d] x_t[d] B_t`` (``h [D, N]``),
    ``y_t[d] = C_t . h_t[d] + D[d] x_t[d]``. ``dt * A`` is the natural-log decay, so ``A <= 0``.

    Args:
        x: ``[B, T, D]`` the channels' inputs.
        dt: ``[B, T, D]`` step sizes, ``>= 0`` after ``dt_bias`` / ``dt_softplus``.
        A: ``[D, N]`` diagonal state matrix, ``<= 0`` (Mamba stores ``-exp(A_log)``).
        B, C: ``[B, T, N]`` input and output projections (shared by the channels).
        D: ``[D]`` optional skip connection.
        dt_bias: ``[D]`` added to dt first (as Mamba's ``delta_bias``).
        dt_softplus: apply softplus to ``dt (+ dt_bias)`` (as Mamba's ``delta_softplus``).
        mode: ``"reference"`` (per-step loop, the spec), ``"chunk"`` (two-level scan, no per-token
            Python loop) or ``"recurrent"`` (step form, the decode step).
        initial_state: ``[S, D, N]`` (S = B, or the number of packed sequences).
        output_final_state: also return the state after the last token.
        cu_seqlens: int64 ``[S + 1]`` offsets of packed sequences (then B must be 1).
        chunk_size: positions per chunk of the two-level scan (8: fastest measured of 8/16/32, see
            README).

    Returns:
        ``(y [B, T, D], final_state [S, D, N] or None)``; state float32 (float64 for float64 inputs).
    """
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    val.check_tensor("x", x, 3, "[B, T, D]")
    val.check_tensor("dt", dt, 3, "[B, T, D]")
    val.check_tensor("A", A, 2, "[D, N]")
    val.check_tensor("B", B, 3, "[B, T, N]")
    val.check_tensor("C", C, 3, "[B, T, N]")
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    if D is not None:
        named["D"] = val.check_tensor("D", D, 1, "[D]")
    if dt_bias is not None:
        named["dt_bias"] = val.check_tensor("dt_bias", dt_bias, 1, "[D]")
    val.check_same_dtype_device(named)
    Bt, T, Dm = x.shape
    if T == 0 or Dm == 0:
        raise ValueError(f"x must have T >= 1 and D >= 1, got shape {list(x.shape)}")
    val.check_shape("dt", dt, (Bt, T, Dm), "[B, T, D] like x")
    if A.shape[0] != Dm or A.shape[1] == 0:
        raise ValueError(f"A must have shape [D, N] = [{Dm}, N >= 1] (D from x), got {list(A.shape)}")
    N = A.shape[1]
    val.check_shape("B", B, (Bt, T, N), "[B, T, N] (N from A)")
    val.check_shape("C", C, (Bt, T, N), "[B, T, N] (N from A)")
    if D is not None:
        val.check_shape("D", D, (Dm,), "[D] (D from x)")
    if dt_bias is not None:
        val.check_shape("dt_bias", dt_bias, (Dm,), "[D] (D from x)")
    if not isinstance(dt_softplus, bool):
        raise TypeError(f"dt_softplus must be a bool, got {type(dt_softplus).__name__}")
    val.check_log_gate("A", A)
    S = val.check_cu_seqlens(cu_seqlens, Bt, T, x.device)
    val.check_initial_state(initial_state, (S, Dm, N), "[S, D, N]", x.device)
    # 1. the step sizes every mode scans with
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if dt.numel() and (low := float(dt.detach().min())) < 0:
        raise ValueError(
            f"dt must be >= 0 (after dt_bias and dt_softplus): dt * A is a log-decay; got min {low:.4g}"
        )
    if mode == "reference":
        return reference_selective_scan(x, dt, A, B, C, D, initial_state, output_final_state, cu_seqlens)
    common = dict(A=A, D=D, initial_state=initial_state, output_final_state=output_final_state)
    tensors = dict(x=x, dt=dt, B=B, C=C)
    if mode == "chunk":
        return run_padded(chunk_selective_scan, tensors, cu_seqlens, chunk_size=chunk_size, **common)
    return run_padded(recurrent_selective_scan, tensors, cu_seqlens, **common)
