"""The test helpers themselves: they pass on agreeing modes and fail on disagreeing ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import delta_rule
from subquad.testing import assert_close, assert_pieces_agree


def _inputs(T=300):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, 2, 8, generator=gen)
    k = F.normalize(torch.randn(1, T, 2, 8, generator=gen), dim=-1)
    v = torch.randn(1, T, 2, 8, generator=gen)
    return q, k, v, torch.rand(1, T, 2, generator=gen)


def test_pieces_agree_passes_for_an_op_and_fails_for_a_perturbed_mode():
    args = _inputs()
    assert_pieces_agree(delta_rule, args, 300, 128)

    def off_by_a_little(*a, mode, **kw):
        o, s = delta_rule(*a, mode=mode, **kw)
        return (o + 1e-3 if mode == "chunk" else o), s

    with pytest.raises(AssertionError, match="output of piece at 0"):
        assert_pieces_agree(off_by_a_little, args, 300, 128)

    def nan_state(*a, mode, **kw):
        o, s = delta_rule(*a, mode=mode, **kw)
        return o * float("nan") if mode == "recurrent" else o, s

    with pytest.raises(AssertionError, match="non-finite"):
        assert_pieces_agree(nan_state, args, 300, 128)


def test_assert_close_reports_both_metrics():
    with pytest.raises(AssertionError, match=r"max-abs .* rel-RMS"):
        assert_close(torch.ones(3), torch.zeros(3), torch.float32)
