"""Mixture-of-Memories specifics beyond the generated matrix: every base op, reductions to the
base op, untouched memories, and the op's own bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import subquad
from subquad.registry import get_op
from subquad.testing import assert_close, assert_pieces_agree

F64 = torch.float64


def _inputs(B=2, T=30, H=2, K=8, V=6, M=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, M, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, M, H, V, generator=gen, dtype=F64)
    logits = torch.randn(B, T, M, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, M, H, K, generator=gen, dtype=F64) + 2)
    beta = torch.sigmoid(torch.randn(B, T, M, H, generator=gen, dtype=F64))
    return q, k, v, logits, g, beta


@pytest.mark.parametrize("op", ["linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule"])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_every_base_op_matches_reference(op, mode):
    q, k, v, logits, g, beta = _inputs()
    kw = {}
    if op in ("simple_gla", "gated_delta_rule"):
        kw["g"] = g[..., 0]
    if op == "gla":
        kw["g"] = g
    if op in ("delta_rule", "gated_delta_rule"):
        kw["beta"] = beta
    leaves = [q, k, v, logits, *kw.values()]
    for t in leaves:
        t.requires_grad_(True)
    state = torch.randn(2, 3, 2, 8, 6, dtype=F64, requires_grad=True)
    outs = {}
    for m in ("reference", mode):
        o, s = subquad.ops.mom(q, k, v, logits, op=op, **kw, mode=m, initial_state=state,
                               output_final_state=True, chunk_size=8)  # fmt: skip
        grads = torch.autograd.grad((o * o).sum() + (s * s).sum(), [*leaves, state])
        outs[m] = (o, s, *grads)
    for name, a, b in zip(["o", "state", "q", "k", "v", "logits", *kw, "S0"], outs[mode], outs["reference"],
                          strict=True):  # fmt: skip
        assert_close(a, b, F64, name=f"{op}/{mode} {name}")


def test_one_memory_is_the_base_op():
    q, k, v, logits, g, beta = _inputs(M=1)
    o, s = subquad.ops.mom(q, k, v, logits, g=g[..., 0], beta=beta, top_k=1, output_final_state=True)
    ro, rs = subquad.ops.gated_delta_rule(q, k[:, :, 0], v[:, :, 0], g[:, :, 0, :, 0], beta[:, :, 0],
                                          mode="reference", output_final_state=True)  # fmt: skip
    assert_close(o, ro, F64, name="o")
    assert_close(s[:, 0], rs, F64, name="state")


def test_unrouted_memory_keeps_its_state_and_routing_is_by_top_k():
    q, k, v, logits, g, beta = _inputs(T=12)
    logits = logits.clone()
    logits[..., 2] = -50.0  # memory 2 is never in the top 2 of 3
    state = torch.randn(2, 3, 2, 8, 6, dtype=F64)
    for mode in ("chunk", "recurrent", "reference"):
        _, s = subquad.ops.mom(q, k, v, logits, g=g[..., 0], beta=beta, mode=mode, initial_state=state,
                               output_final_state=True)  # fmt: skip
        assert torch.equal(s[:, 2], state[:, 2]), mode
        assert not torch.allclose(s[:, :2], state[:, :2]), mode
    # the output is the router-weighted mix of the two routed memories run alone
    w = torch.softmax(logits[..., :2], -1)
    o, _ = subquad.ops.mom(q, k, v, logits, g=g[..., 0], beta=beta)
    mix = 0
    for m in range(2):
        om, _ = subquad.ops.gated_delta_rule(q, k[:, :, m], v[:, :, m], g[:, :, m, :, 0], beta[:, :, m])
        mix = mix + w[..., m, None, None] * om
    assert_close(o, mix, F64, name="weighted mix")


def _bad(match, exc=ValueError, **over):
    q, k, v, logits, g, beta = _inputs(T=6)
    args = dict(q=q, k=k, v=v, router_logits=logits, g=g[..., 0], beta=beta)
    args.update(over)
    with pytest.raises(exc, match=match):
        subquad.ops.mom(**args)


def test_bad_inputs():
    _, _, _, logits, g, beta = _inputs(T=6)
    _bad("op must be one of", op="retnet")
    _bad(r"top_k must lie in \[1, R = 3\]", top_k=4)
    _bad("top_k must lie", top_k=0)
    _bad("top_k must be an int", TypeError, top_k=2.0)
    _bad("shared_memory must be a bool", TypeError, shared_memory=1)
    _bad(r"needs g", g=None)
    _bad("takes no beta", op="gla", g=g)
    _bad(r"k must have shape \[B, T, M, H, K\].*M = 4", shared_memory=True)
    _bad("beta must lie in", beta=beta * 3)
    _bad(r"initial_state", initial_state=torch.zeros(2, 2, 2, 8, 6, dtype=F64))
    # a positive log-gate is refused even where no memory reads it (validated before routing)
    lg = logits.clone()
    lg[0, 0] = torch.tensor([-9.0, 0.0, 0.0], dtype=F64)
    bad_g = g[..., 0].clone()
    bad_g[0, 0, 0, 0] = 0.5
    _bad(r"g .*<= 0", router_logits=lg, g=bad_g)


def test_registry_state_shape_counts_the_shared_memory():
    spec = get_op("mom")
    assert spec.state_shape(2, 4, 8, 6, spec.variant("default")) == (2, 3, 4, 8, 6)
    assert spec.state_shape(2, 4, 8, 6, spec.variant("shared_delta")) == (2, 4, 4, 8, 6)


@pytest.mark.slow
def test_million_tokens_stay_finite_and_agree():
    """1M tokens over 3 gated-delta memories (beta up to 2, log-gates down to -20): the chunk form
    in carried pieces agrees with the step form."""
    T, piece = 1 << 20, 1 << 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 1, 16, generator=gen)
    k = F.normalize(torch.randn(1, T, 3, 1, 16, generator=gen), dim=-1)
    v = torch.randn(1, T, 3, 1, 16, generator=gen)
    logits = torch.randn(1, T, 3, generator=gen)
    g = -20 * torch.rand(1, T, 3, 1, generator=gen) ** 4
    beta = 2 * torch.rand(1, T, 3, 1, generator=gen)
    assert_pieces_agree(subquad.ops.mom, (q, k, v, logits), T, piece, time_kwargs={"g": g, "beta": beta})
