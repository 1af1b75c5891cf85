"""NSA specifics beyond the generated matrix: decoding against a cache, grouped-head selection,
each branch alone against what it must equal, bad inputs."""

from __future__ import annotations

import pytest
import torch

from subquad.ops import attention, nsa
from subquad.testing import assert_close

F64 = torch.float64
KW = dict(block_size=4, block_count=3, window=8)


def _inputs(B=2, T=45, H=4, Hk=2, K=8, V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=F64)
    k = torch.randn(B, T, Hk, K, generator=g, dtype=F64)
    v = torch.randn(B, T, Hk, V, generator=g, dtype=F64)
    gates = [torch.rand(B, T, H, generator=g, dtype=F64) for _ in range(3)]
    return q, k, v, gates


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_decoding_steps_equal_the_rows_of_a_full_call(mode):
    q, k, v, gates = _inputs()
    full = nsa(q, k, v, *gates, mode="chunk", **KW)
    for t in (0, 3, 17, 44):  # before the first complete block, inside, later
        step = nsa(
            q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], *(g[:, t : t + 1] for g in gates), mode=mode, **KW
        )
        assert_close(step, full[:, t : t + 1], F64, name=f"decode step at {t}")


def test_window_branch_alone_is_sliding_window_attention():
    q, k, v, (gc, _, _) = _inputs()
    zero, one = torch.zeros_like(gc), torch.ones_like(gc)
    o = nsa(q, k, v, zero, zero, one, **KW)
    assert_close(o, attention(q, k, v, window=8), F64, name="swa branch")


def test_selection_covering_everything_is_causal_attention():
    """With as many selected blocks as there are, slc reads every earlier token: full attention."""
    q, k, v, (gc, _, _) = _inputs(T=40)
    zero, one = torch.zeros_like(gc), torch.ones_like(gc)
    for mode in ("reference", "chunk"):
        o = nsa(q, k, v, zero, one, zero, block_size=4, block_count=10, window=8, mode=mode)
        assert_close(o, attention(q, k, v), F64, name=f"slc with every block ({mode})")


def test_grouped_heads_share_their_selection():
    """Query heads of one key head read the same blocks: with identical queries in a group, the
    slc outputs of the group's heads coincide; a different key head may select differently."""
    q, k, v, (gc, _, _) = _inputs(H=4, Hk=2, T=60)
    q[:, :, 1] = q[:, :, 0]
    zero, one = torch.zeros_like(gc), torch.ones_like(gc)
    o = nsa(q, k, v, zero, one, zero, block_size=4, block_count=2, window=8)
    assert_close(o[:, :, 1], o[:, :, 0], F64, name="heads of one group")


def test_selection_is_query_aware():
    """A query aligned with one early block's keys must select it: its slc output then equals
    attention restricted to that block (plus first and own blocks)."""
    B, T, K = 1, 64, 8
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, 1, K, generator=g, dtype=F64) * 0.1
    k = torch.randn(B, T, 1, K, generator=g, dtype=F64) * 0.1
    v = torch.randn(B, T, 1, K, generator=g, dtype=F64)
    k[0, 20:24, 0] += 3.0  # block 5 (b = 4) stands out
    q[0, -1, 0] += 3.0
    gates = [torch.full((B, T, 1), x, dtype=F64) for x in (0.0, 1.0, 0.0)]
    o = nsa(q, k, v, *gates, block_size=4, block_count=3, window=4)
    keep = torch.zeros(T, dtype=torch.bool)
    keep[0:4] = keep[20:24] = keep[60:64] = True  # first, selected, own
    s = (q[0, -1, 0] @ k[0, :, 0].T) * K**-0.5
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v[0, :, 0]
    assert_close(o[0, -1, 0], want, F64, name="query-aware selection")


def test_bad_inputs():
    q, k, v, gates = _inputs()
    with pytest.raises(ValueError, match="block_count must be an int >= 1"):
        nsa(q, k, v, *gates, block_count=0)
    with pytest.raises(ValueError, match="k must have shape"):
        nsa(q, k[:, :10], v[:, :10], *gates)
    with pytest.raises(ValueError, match="g_slc"):
        nsa(q, k, v, gates[0], gates[1][:, :3], gates[2])
    with pytest.raises(ValueError, match="mode"):
        nsa(q, k, v, *gates, mode="recurrent")
