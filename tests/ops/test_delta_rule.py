"""Delta-rule specifics beyond the generated matrix: negative eigenvalues, beta limits, gating."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import delta_rule, gated_delta_rule
from subquad.testing import assert_close, assert_pieces_agree

MODES = ["reference", "chunk", "recurrent"]


def _inputs(B=1, T=1, H=2, K=4, V=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=torch.float64)
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=torch.float64)
    return q, k, v, S0


@pytest.mark.parametrize("mode", MODES)
def test_beta_two_reflects_the_state_along_k(mode):
    q, k, v, S0 = _inputs()
    beta = torch.full((1, 1, 2), 2.0, dtype=torch.float64)
    o, S = delta_rule(q, k, v, beta, mode=mode, initial_state=S0, output_final_state=True, scale=1.0)
    kk = k[0, 0]  # [H, K]
    householder = torch.eye(4, dtype=torch.float64) - 2 * kk[:, :, None] * kk[:, None, :]
    expected = householder @ S0[0] + 2 * kk[:, :, None] * v[0, 0][:, None, :]
    assert_close(S[0], expected, torch.float64, name="state after a beta = 2 step")
    # the transition's eigenvalue along k is 1 - beta = -1: S^T k flips sign before the write
    assert_close(torch.einsum("hk,hkv->hv", kk, householder @ S0[0]), -torch.einsum("hk,hkv->hv", kk, S0[0]))
    assert_close(o[0, 0], torch.einsum("hk,hkv->hv", q[0, 0], expected), torch.float64, name="output")


@pytest.mark.parametrize("mode", MODES)
def test_beta_zero_writes_nothing(mode):
    q, k, v, S0 = _inputs(T=9)
    beta = torch.zeros(1, 9, 2, dtype=torch.float64)
    o, S = delta_rule(q, k, v, beta, mode=mode, initial_state=S0, output_final_state=True, chunk_size=4)
    assert_close(S, S0, torch.float64, name="state")
    assert_close(o, 4**-0.5 * torch.einsum("bthk,bhkv->bthv", q, S0), torch.float64, name="output")


@pytest.mark.parametrize("mode", MODES)
def test_gated_with_zero_gate_is_delta_rule(mode):
    q, k, v, S0 = _inputs(B=2, T=30, seed=3)
    beta = torch.rand(2, 30, 2, dtype=torch.float64) * 2
    g = torch.zeros(2, 30, 2, dtype=torch.float64)
    a = gated_delta_rule(q, k, v, g, beta, mode=mode, initial_state=S0, output_final_state=True, chunk_size=8)
    b = delta_rule(q, k, v, beta, mode=mode, initial_state=S0, output_final_state=True, chunk_size=8)
    assert_close(a[0], b[0], torch.float64, name="output")
    assert_close(a[1], b[1], torch.float64, name="state")


@pytest.mark.parametrize("bad", [-0.1, 2.5])
def test_beta_outside_zero_two_is_refused(bad):
    q, k, v, _ = _inputs(T=5)
    beta = torch.full((1, 5, 2), bad, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 2\]"):
        delta_rule(q, k, v, beta)


def test_gated_needs_g():
    q, k, v, _ = _inputs(T=5)
    with pytest.raises(ValueError, match="needs g"):
        gated_delta_rule(q, k, v, None, torch.rand(1, 5, 2, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True])
def test_million_tokens_stay_finite_and_agree(gated):
    """1M tokens, beta up to 2, log-gates down to -20: recurrent vs chunk in carried pieces."""
    T, piece = 1 << 20, 1 << 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, 16, generator=gen)
    k = F.normalize(torch.randn(1, T, 1, 16, generator=gen), dim=-1)
    v = torch.randn(1, T, 1, 16, generator=gen)
    beta = 2 * torch.rand(1, T, 1, generator=gen)
    g = -20 * torch.rand(1, T, 1, generator=gen) ** 4 if gated else None

    if gated:
        assert_pieces_agree(gated_delta_rule, (q, k, v, g, beta), T, piece)
    else:
        assert_pieces_agree(delta_rule, (q, k, v, beta), T, piece)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gated_chunk_rescales_the_carried_state(grad, dtype):
    """The gated chunk pass carries S = f S~ and rescales S~ when f would fall below
    exp(-RESCALE_SPAN) for a head: with chunks that rescale and chunks that do not, the chunk
    form (forward without and with autograd, and its gradients) still equals the reference."""
    chunk = importlib.import_module("subquad.ops.delta_rule.chunk")
    B, T, H, C = 2, 150, 3, 8
    q, k, v, S0 = _inputs(B=B, T=T, H=H, K=5, V=4, seed=5)
    gen = torch.Generator().manual_seed(6)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 2
    # up to 0.8 nats per token for 100 tokens, then up to 20; the heads at 1, 1/2 and 1/10 of that
    rate = torch.where(torch.arange(T) < 100, 0.8, 20.0).view(1, T, 1) * torch.tensor([1.0, 0.5, 0.1])
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64) * rate
    # the chunks' log-decays [n, B, H] as the pass sees them (one segment at this size)
    offsets = chunk._StateOffsets(F.pad(g, (0, 0, 0, -T % C)).view(B, -1, C, H).sum(2).transpose(0, 1))
    assert any(offsets.rescale) and not all(offsets.rescale)
    ref = gated_delta_rule(q, k, v, g, beta, mode="reference", initial_state=S0, output_final_state=True)
    inputs = [x.to(dtype).requires_grad_(grad) for x in (q, k, v, g, beta, S0)]
    with torch.set_grad_enabled(grad):
        o, S = gated_delta_rule(
            *inputs[:5], mode="chunk", initial_state=inputs[5], output_final_state=True, chunk_size=C
        )
    assert_close(o, ref[0], dtype, name="output")
    assert_close(S, ref[1], dtype, name="final state")
    if grad:
        ws = [torch.randn(x.shape, generator=gen, dtype=torch.float64) for x in ref]
        ref_in = [x.detach().requires_grad_() for x in (q, k, v, g, beta, S0)]
        r = gated_delta_rule(*ref_in[:5], mode="reference", initial_state=ref_in[5], output_final_state=True)
        want = torch.autograd.grad(sum((a * w).sum() for a, w in zip(r, ws, strict=True)), ref_in)
        loss = sum((a.double() * w).sum() for a, w in zip((o, S), ws, strict=True))
        got = torch.autograd.grad(loss, inputs)
        for name, a, b in zip(["q", "k", "v", "g", "beta", "S0"], got, want, strict=True):
            assert_close(a, b, dtype, name=f"d{name}")
