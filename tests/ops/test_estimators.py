"""Block-mask estimators (XAttention, MInference vertical-slash, Quest, NSA selection): the mask
contract (mandatory blocks, nothing invisible, budgets), the math each one rests on, that each
finds the pattern it is built for on structured inputs, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from subquad.bench.attention import structured_qkv
from subquad.ops import attention
from subquad.ops.attention import (
    ESTIMATORS,
    mask_density,
    nsa_mask,
    quest_mask,
    vertical_slash_mask,
    xattention_mask,
)
from subquad.ops.attention.estimators import antidiagonal_scores, nsa_block_scores

SETTINGS = {
    "xattention": {"stride": 8, "threshold": 0.9},
    "vertical_slash": {"last_q": 16, "vertical": 4, "slash": 4},
    "quest": {"topk": 3},
    "nsa": {"topk": 3},
}


def _qk(B=2, T=200, H=4, Hk=2, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, K, generator=g), torch.randn(B, T, Hk, K, generator=g)


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_mask_contract(name):
    q, k = _qk()
    m = ESTIMATORS[name](q, k, block_size=32, **SETTINGS[name])
    nb = 7  # ceil(200 / 32)
    assert m.dtype == torch.bool and m.shape == (2, 4, nb, nb)
    eye = torch.eye(nb, dtype=torch.bool)
    assert m[..., eye].all(), "the diagonal block is always kept"
    assert m[..., :, 0].all(), "the first key block (sinks) is always kept"
    assert not m[..., ~torch.ones(nb, nb, dtype=torch.bool).tril()].any(), "no block above the diagonal"
    assert 0 < mask_density(m) <= 1


@pytest.mark.parametrize("name", ["quest", "nsa"])
def test_topk_is_the_number_of_blocks_per_query_block(name):
    q, k = _qk(T=256)
    for topk in (1, 3, 8):
        m = ESTIMATORS[name](q, k, block_size=32, topk=topk)
        counts = m.sum(-1)  # [B, H, nb]
        rows = torch.arange(8)
        expect = torch.clamp(torch.full((8,), topk), max=rows + 1).clamp(min=torch.where(rows > 0, 2, 1))
        assert torch.equal(counts, expect.expand_as(counts)), (topk, counts[0, 0])


def test_nsa_selection_is_shared_by_grouped_heads():
    q, k = _qk(H=4, Hk=2)
    m = nsa_mask(q, k, block_size=32, topk=3)
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 2], m[:, 3])


@pytest.mark.parametrize("T", [32, 200, 256])
def test_nsa_block_scores_follow_the_definition(T):
    """Per query: softmax over the mean keys of the blocks wholly before its own (block 0's queries:
    block 0 only), summed over the block's queries and the heads sharing a key head."""
    q, k = _qk(T=T)
    b, scale = 32, 0.3
    B, _, H, _ = q.shape
    Hk, nb = k.shape[2], -(-T // b)
    want = torch.zeros(B, Hk, nb, nb)
    means = torch.stack([k[:, J * b : (J + 1) * b].mean(1) for J in range(nb)], 2)  # [B, Hk, nb, K]
    for t in range(T):
        I = t // b
        cols = range(max(I, 1))
        for h in range(H):
            s = torch.stack([(q[:, t, h] * means[:, h // (H // Hk), J]).sum(-1) * scale for J in cols], -1)
            want[:, h // (H // Hk), I, : len(cols)] += s.softmax(-1)
    got = nsa_block_scores(q, k, b, scale)
    torch.testing.assert_close(got, want.repeat_interleave(H // Hk, dim=1), rtol=1e-5, atol=1e-5)


def test_antidiagonal_scores_sum_the_antidiagonals_of_each_cell():
    q, k = _qk(B=1, T=24, H=2, Hk=2, K=5)
    S = 4
    got = antidiagonal_scores(q, k, S)
    full = torch.einsum("bthk,bshk->bhts", q, k)
    want = torch.zeros(1, 2, 6, 6)
    for i in range(6):
        for j in range(6):
            want[:, :, i, j] = sum(full[:, :, i * S + S - 1 - s, j * S + s] for s in range(S))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("T", "L"), [(40, 7), (12, 12), (9, 1)])
def test_vertical_slash_probe_sums_match_definition(T, L):
    """Column and diagonal sums of the last L queries' causal softmax, against a per-query loop."""
    from subquad.ops.attention.estimators import _probe_sums

    q, k = _qk(B=1, T=T, H=2, Hk=2)
    scale = q.shape[-1] ** -0.5
    col, diag = _probe_sums(q, k, L, scale)
    want_col, want_diag = torch.zeros(1, 2, T), torch.zeros(1, 2, T)
    for h in range(2):
        for i in range(T - L, T):
            p = (k[0, : i + 1, h].double() @ q[0, i, h].double() * scale).softmax(0)
            for j in range(i + 1):
                want_col[0, h, j] += p[j].item()
                want_diag[0, h, i - j] += p[j].item()
    torch.testing.assert_close(col, want_col, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(diag, want_diag, rtol=1e-5, atol=1e-6)


def test_quest_bounds_are_upper_bounds():
    """Keeping the single best-bounded block per row must never discard a block that holds the
    row's largest true score while the kept one's true maximum is smaller than that bound says
    is possible: check the bound itself through topk = 2 on a block the bound must rank first."""
    g = torch.Generator().manual_seed(1)
    T, b, K = 128, 16, 8
    q = torch.randn(1, T, 1, K, generator=g) * 0.1
    k = torch.randn(1, T, 1, K, generator=g) * 0.1
    k[0, 3 * b + 5, 0] = 4.0  # one key in block 3 that every query aligns with
    q[0, :, 0] += 1.0
    for per_query in (False, True):
        m = quest_mask(q, k, block_size=b, topk=3, per_query=per_query)
        assert m[0, 0, 4:, 3].all(), per_query  # every query block after it picks block 3


def _rel_err_per_head(mask, q, k, v, b):
    o = attention(q, k, v, block_mask=mask, chunk_size=b)
    full = attention(q, k, v)
    return ((o - full).pow(2).sum((0, 1, 3)) / full.pow(2).sum((0, 1, 3))).sqrt()


@pytest.mark.parametrize(
    ("name", "kwargs", "heads"),
    [
        ("quest", {"topk": 6}, "retrieval"),
        ("nsa", {"topk": 6}, "retrieval"),
        ("vertical_slash", {"last_q": 32, "vertical": 4, "slash": 4}, "slash"),
        ("xattention", {"stride": 8, "threshold": 0.95}, "retrieval"),
    ],
)
def test_each_estimator_finds_the_pattern_it_is_built_for(name, kwargs, heads):
    """Retrieval heads (even) attend to whole earlier segments; slash heads (odd) to one diagonal.
    Block estimators must find the segments, vertical-slash the diagonals; a random mask of the
    same density must not (the test can fail). XAttention is held to the retrieval heads: a
    one-token-wide diagonal whose offset is even never meets an antidiagonal of an even stride
    (both slash offsets here are even), see xattention_mask."""
    T, b = 2048, 64
    q, k, v = structured_qkv(T, heads=4, head_dim=64, segment=256)
    mask = ESTIMATORS[name](q, k, block_size=b, **kwargs)
    err = _rel_err_per_head(mask, q, k, v, b)
    target = {"retrieval": [0, 2], "slash": [1, 3], "all": [0, 1, 2, 3]}[heads]
    assert (err[target] < 0.1).all(), err
    rand = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) < mask_density(mask)
    rand |= mask & (torch.eye(mask.shape[-1], dtype=torch.bool) | (torch.arange(mask.shape[-1]) == 0))
    assert (_rel_err_per_head(rand & torch.ones_like(mask).tril(), q, k, v, b)[target] > 0.3).any()


def test_xattention_threshold_orders_density():
    q, k, _ = structured_qkv(1024, heads=2, head_dim=32)
    d = [mask_density(xattention_mask(q, k, block_size=64, stride=8, threshold=t)) for t in (0.3, 0.7, 0.99)]
    assert d[0] <= d[1] <= d[2] and d[0] < d[2]


def test_noncausal_masks():
    q, k = _qk(T=128, H=2, Hk=2)
    for m in (
        xattention_mask(q, k, block_size=32, stride=8, causal=False),
        quest_mask(q, k, block_size=32, topk=2, causal=False),
    ):
        assert m[..., torch.eye(4, dtype=torch.bool)].all()
        assert m.sum(-1).ge(1).all()
    assert quest_mask(q, k, block_size=32, topk=2, causal=False).sum(-1).eq(2).all()


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        (xattention_mask, {"block_size": 32, "stride": 5}, "multiple of stride"),
        (xattention_mask, {"block_size": 32, "threshold": 0.0}, "threshold"),
        (xattention_mask, {"block_size": 32, "threshold": 1.5}, "threshold"),
        (vertical_slash_mask, {"block_size": 32, "vertical": 0}, "vertical"),
        (vertical_slash_mask, {"block_size": 32, "last_q": -1}, "last_q"),
        (quest_mask, {"block_size": 32, "topk": 0}, "topk"),
        (nsa_mask, {"block_size": 32, "topk": 2.5}, "topk"),
        (nsa_mask, {"block_size": 0}, "chunk_size|block"),
    ],
)
def test_bad_inputs(fn, kwargs, match):
    q, k = _qk()
    with pytest.raises((ValueError, TypeError), match=match):
        fn(q, k, **kwargs)
    with pytest.raises(ValueError, match="k must have shape"):
        fn(q, k[:, :-1], block_size=32)
