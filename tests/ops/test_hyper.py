"""HyperAttention specifics beyond the generated matrix: when the estimate is exact, determinism,
keys of another length (non-causal), bad inputs."""

from __future__ import annotations

import pytest
import torch

from subquad.ops import attention, hyper_attention
from subquad.ops.hyper.core import gray_rank
from subquad.testing import assert_close

F64 = torch.float64
SMALL = dict(block_size=4, num_samples=3, lsh_bits=3, min_seq_len=8)


def _inputs(B=2, T=40, S=None, H=4, Hk=2, K=8, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=F64)
    k = torch.randn(B, S or T, Hk, K, generator=g, dtype=F64)
    v = torch.randn(B, S or T, Hk, V, generator=g, dtype=F64)
    return q, k, v


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_one_block_is_exact_attention(mode):
    """With one block every key is counted exactly (sampled keys inside the block are masked), so
    the recursion's merges must rebuild causal attention exactly."""
    q, k, v = _inputs()
    kw = dict(block_size=1000, num_samples=2, lsh_bits=2, min_seq_len=4, mode=mode)
    assert_close(hyper_attention(q, k, v, **kw), attention(q, k, v), F64, name="causal")
    full = attention(q, k, v, causal=False)
    assert_close(hyper_attention(q, k, v, causal=False, **kw), full, F64, name="non-causal")


def test_short_sequences_are_exact_and_long_ones_approximate():
    q, k, v = _inputs(T=64)
    assert_close(hyper_attention(q, k, v, min_seq_len=64), attention(q, k, v), F64, name="T <= min_seq_len")
    approx = hyper_attention(q, k, v, **SMALL)
    assert (approx - attention(q, k, v)).abs().max() > 1e-3  # the small sizes do approximate


def test_deterministic_per_seed():
    q, k, v = _inputs()
    a, b = hyper_attention(q, k, v, seed=1, **SMALL), hyper_attention(q, k, v, seed=1, **SMALL)
    assert torch.equal(a, b)
    assert not torch.equal(a, hyper_attention(q, k, v, seed=2, **SMALL))


@pytest.mark.parametrize("S", [17, 60])
def test_non_causal_keys_of_another_length(S):
    q, k, v = _inputs(T=40, S=S)
    ref = hyper_attention(q, k, v, causal=False, mode="reference", **SMALL)
    assert_close(hyper_attention(q, k, v, causal=False, **SMALL), ref, F64, name=f"S={S}")


def test_gray_order_puts_one_hyperplane_flips_next_to_each_other():
    planes = torch.eye(3, dtype=F64)[None]  # [1, K=3, r=3]: the sign of each coordinate is one bit
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=F64)
    rank = gray_rank(corners[None, :, None, :], planes)[0, 0]
    by_rank = corners[rank.argsort()]
    assert sorted(rank.tolist()) == list(range(8))
    assert all(int((by_rank[i] != by_rank[i + 1]).sum()) == 1 for i in range(7))


def test_bad_inputs():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="k must have shape"):
        hyper_attention(q, k[:, :30], v[:, :30])  # causal needs S = T
    with pytest.raises(ValueError, match="block_size"):
        hyper_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        hyper_attention(q, k, v, num_samples=0)
    with pytest.raises(ValueError, match="seed"):
        hyper_attention(q, k, v, seed=1.5)
