"""Selective scan specifics beyond the generated matrix: the skip term, dt_bias / dt_softplus,
the sign constraints on A and dt, a scan by hand, and a 1M-token stability run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import selective_scan
from subquad.testing import assert_close, assert_pieces_agree

F64 = torch.float64


def _inputs(Bt=2, T=20, Dm=6, N=4, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Bt, T, Dm, generator=gen, dtype=dtype)
    dt = F.softplus(torch.randn(Bt, T, Dm, generator=gen, dtype=dtype))
    A = -torch.exp(torch.randn(Dm, N, generator=gen, dtype=dtype))
    B = torch.randn(Bt, T, N, generator=gen, dtype=dtype)
    C = torch.randn(Bt, T, N, generator=gen, dtype=dtype)
    return x, dt, A, B, C


def test_one_channel_by_hand():
    x, dt, A, B, C = _inputs(Bt=1, T=3, Dm=1, N=2)
    h = torch.zeros(2, dtype=F64)
    ys = []
    for t in range(3):
        h = torch.exp(dt[0, t, 0] * A[0]) * h + dt[0, t, 0] * x[0, t, 0] * B[0, t]
        ys.append(C[0, t] @ h)
    for mode in ("reference", "chunk", "recurrent"):
        y, s = selective_scan(x, dt, A, B, C, mode=mode, output_final_state=True, chunk_size=2)
        assert_close(y[0, :, 0], torch.stack(ys), F64, name=f"{mode} y")
        assert_close(s[0, 0], h, F64, name=f"{mode} state")


@pytest.mark.parametrize("mode", ["reference", "chunk", "recurrent"])
def test_skip_and_dt_processing(mode):
    x, dt, A, B, C = _inputs()
    D = torch.randn(6, dtype=F64)
    bias = torch.randn(6, dtype=F64)
    raw = torch.randn_like(dt)
    y0, _ = selective_scan(x, dt, A, B, C, mode=mode)
    y1, _ = selective_scan(x, dt, A, B, C, D, mode=mode)
    assert_close(y1, y0 + D * x, F64, name="skip term")
    y2, _ = selective_scan(x, raw, A, B, C, dt_bias=bias, dt_softplus=True, mode=mode)
    y3, _ = selective_scan(x, F.softplus(raw + bias), A, B, C, mode="reference")
    assert_close(y2, y3, F64, name="softplus(dt + dt_bias)")


def test_sign_constraints_and_shapes():
    x, dt, A, B, C = _inputs(T=5)
    with pytest.raises(ValueError, match=r"A .*<= 0"):
        selective_scan(x, dt, -A, B, C)
    with pytest.raises(ValueError, match=r"dt must be >= 0"):
        selective_scan(x, -dt, A, B, C)
    # a negative dt is fine when softplus makes it positive
    selective_scan(x, -dt, A, B, C, dt_softplus=True)
    with pytest.raises(ValueError, match=r"A must have shape \[D, N\]"):
        selective_scan(x, dt, A[:-1], B, C)
    with pytest.raises(ValueError, match=r"B must have shape"):
        selective_scan(x, dt, A, B[..., :-1], C)
    with pytest.raises(ValueError, match=r"D must have shape"):
        selective_scan(x, dt, A, B, C, torch.ones(5, dtype=F64))
    with pytest.raises(TypeError, match="dt_softplus must be a bool"):
        selective_scan(x, dt, A, B, C, dt_softplus=1)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[S, D, N\]"):
        selective_scan(x, dt, A, B, C, initial_state=torch.zeros(2, 4, 6, dtype=F64))


def test_decay_to_zero_is_exact():
    """dt * A of -1e4 per step: exp underflows to exactly 0 and every mode forgets the past."""
    x, dt, A, B, C = _inputs(T=40)
    A = A * 1e4
    ref = selective_scan(x, dt, A, B, C, mode="reference", output_final_state=True)
    for mode in ("chunk", "recurrent"):
        got = selective_scan(x, dt, A, B, C, mode=mode, output_final_state=True)
        assert torch.isfinite(got[0]).all()
        assert_close(got[0], ref[0], F64, name=f"{mode} y")
        assert_close(got[1], ref[1], F64, name=f"{mode} state")


@pytest.mark.slow
def test_million_tokens_stay_finite_and_agree():
    """1M tokens, log-decays dt * A from ~0 down to -20 and beyond: recurrent vs chunk in pieces."""
    T, piece = 1 << 20, 1 << 16
    x, dt, A, B, C = _inputs(Bt=1, T=T, Dm=16, N=16, dtype=torch.float32)
    dt = dt * torch.rand(1, T, 1, generator=torch.Generator().manual_seed(1)) ** 4 * 8
    D = torch.ones(16)
    assert_pieces_agree(selective_scan, (x, dt, A, B, C, D), T, piece)
    assert float((dt[..., None] * A).min()) < -20
