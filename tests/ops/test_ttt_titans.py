"""TTT-Linear and Titans specifics: reductions to the delta rule, mini-batch semantics written out,
streaming on mini-batch boundaries, and 1M-token stability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import delta_rule, titans, ttt_linear
from subquad.testing import assert_close, assert_pieces_agree

F64 = torch.float64
MODES = ("reference", "chunk", "recurrent")


def _qkv(B=2, T=21, H=2, K=6, V=5, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    rate = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, rate


@pytest.mark.parametrize("mode", MODES)
def test_ttt_mini_batch_one_is_the_delta_rule(mode):
    q, k, v, eta = _qkv()
    S0 = torch.randn(2, 2, 6, 5, dtype=F64)
    o, s = ttt_linear(q, k, v, eta, mini_batch_size=1, mode=mode, initial_state=S0, output_final_state=True)
    ro, rs = delta_rule(q, k, v, eta, mode="reference", initial_state=S0, output_final_state=True)
    assert_close(o, ro, F64, name="o")
    assert_close(s, rs, F64, name="state")


@pytest.mark.parametrize("mode", MODES)
def test_ttt_mini_batch_by_hand(mode):
    """b = 4: every gradient of a mini-batch at its starting weights, closed form per mini-batch."""
    q, k, v, eta = _qkv(B=1, T=10, H=1)
    W = torch.zeros(6, 5, dtype=F64)
    outs = []
    for start in range(0, 10, 4):
        W0 = W
        for t in range(start, min(start + 4, 10)):
            kt = k[0, t, 0]
            W = W - eta[0, t, 0] * torch.outer(kt, W0.T @ kt - v[0, t, 0])
            outs.append(0.5 * W.T @ q[0, t, 0])
    o, s = ttt_linear(q, k, v, eta, mini_batch_size=4, mode=mode, scale=0.5, output_final_state=True)
    assert_close(o[0, :, 0], torch.stack(outs), F64, name="o")
    assert_close(s[0, 0], W, F64, name="state")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_ttt_streams_on_mini_batch_boundaries(mode):
    q, k, v, eta = _qkv(T=40)
    whole, S = ttt_linear(q, k, v, eta, mini_batch_size=8, mode=mode, output_final_state=True)
    o1, S1 = ttt_linear(q[:, :16], k[:, :16], v[:, :16], eta[:, :16], mini_batch_size=8, mode=mode,
                        output_final_state=True)  # fmt: skip
    o2, S2 = ttt_linear(q[:, 16:], k[:, 16:], v[:, 16:], eta[:, 16:], mini_batch_size=8, mode=mode,
                        initial_state=S1, output_final_state=True)  # fmt: skip
    assert_close(torch.cat([o1, o2], 1), whole, F64, name="streamed o")
    assert_close(S2, S, F64, name="streamed state")


def test_ttt_bad_inputs():
    q, k, v, eta = _qkv(T=5)
    with pytest.raises(ValueError, match="eta is a learning rate and must be >= 0"):
        ttt_linear(q, k, v, -eta)
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        ttt_linear(q, k, v, eta, mini_batch_size=0)
    with pytest.raises(TypeError, match="mini_batch_size must be an int"):
        ttt_linear(q, k, v, eta, mini_batch_size=2.0)


@pytest.mark.slow
def test_ttt_million_tokens_stay_finite_and_agree():
    T, piece = 1 << 20, 1 << 16
    q, k, v, eta = _qkv(B=1, T=T, H=1, K=16, V=16, dtype=torch.float32)
    assert_pieces_agree(ttt_linear, (q, k, v, eta), T, piece)


@pytest.mark.parametrize("mode", MODES)
def test_titans_without_momentum_or_forgetting_is_ttt(mode):
    """eta = exp(g_momentum) = 0 and alpha = 1 - exp(g) = 0: the surprise is this token's step alone
    and the memory sums them, which is TTT-Linear's mini-batch update with eta = theta."""
    q, k, v, theta = _qkv(T=37)
    zero = torch.zeros_like(theta)
    S0 = torch.randn(2, 2, 6, 5, dtype=F64)
    X0 = torch.stack([S0, torch.zeros_like(S0)], 1)
    o, s = titans(q, k, v, theta, zero, zero - 1e4, mini_batch_size=8, mode=mode, initial_state=X0,
                  output_final_state=True)  # fmt: skip
    ro, rs = ttt_linear(q, k, v, theta, mini_batch_size=8, mode="reference", initial_state=S0,
                        output_final_state=True)  # fmt: skip
    assert_close(o, ro, F64, name="o")
    assert_close(s[:, 0], rs, F64, name="memory")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_titans_streams_on_mini_batch_boundaries(mode):
    q, k, v, theta = _qkv(T=40)
    g = -torch.rand_like(theta)
    gm = -torch.rand_like(theta)
    args = (q, k, v, 0.1 * theta, g, gm)
    whole, S = titans(*args, mini_batch_size=8, mode=mode, output_final_state=True)
    o1, S1 = titans(*(x[:, :24] for x in args), mini_batch_size=8, mode=mode, output_final_state=True)
    o2, S2 = titans(*(x[:, 24:] for x in args), mini_batch_size=8, mode=mode, initial_state=S1,
                    output_final_state=True)  # fmt: skip
    assert_close(torch.cat([o1, o2], 1), whole, F64, name="streamed o")
    assert_close(S2, S, F64, name="streamed state")


def test_titans_bad_inputs():
    q, k, v, theta = _qkv(T=5)
    zero = torch.zeros_like(theta)
    with pytest.raises(ValueError, match="theta is a learning rate"):
        titans(q, k, v, -theta, zero, zero)
    with pytest.raises(ValueError, match=r"g_momentum .*<= 0"):
        titans(q, k, v, theta, zero, zero + 0.1)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, 2, H, K, V\]"):
        titans(q, k, v, theta, zero, zero, initial_state=torch.zeros(2, 2, 6, 5, dtype=F64))


@pytest.mark.slow
def test_titans_million_tokens_stay_finite_and_agree():
    """1M tokens, log-decays down to -20: chunk in carried pieces vs the step form."""
    T, piece = 1 << 20, 1 << 16
    q, k, v, theta = _qkv(B=1, T=T, H=1, K=16, V=16, dtype=torch.float32)
    gen = torch.Generator().manual_seed(2)
    g = -20 * torch.rand(1, T, 1, generator=gen) ** 4
    gm = -20 * torch.rand(1, T, 1, generator=gen) ** 4
    assert_pieces_agree(titans, (q, k, v, 0.1 * theta, g, gm), T, piece)
