"""RWKV-7 specifics: reduction to GLA, the delta-rule special case, both intra-chunk paths, and
1M-token stability."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import delta_rule, gla, rwkv7
from subquad.testing import assert_close, assert_pieces_agree

F64 = torch.float64
MODES = ("reference", "chunk", "recurrent")


def _inputs(B=2, T=37, H=2, K=6, V=5, seed=0, dtype=F64, decay=1.0):
    gen = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    w = -decay * torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    kappa = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    lr = torch.rand(B, T, H, 1, generator=gen, dtype=dtype)
    return r, w, k, v, -kappa, kappa * lr


@pytest.mark.parametrize("mode", MODES)
def test_no_low_rank_term_is_gla(mode):
    r, w, k, v, a, b = _inputs()
    o, s = rwkv7(r, w, k, v, 0 * a, 0 * b, mode=mode, output_final_state=True, chunk_size=8)
    ro, rs = gla(r, k, v, w, mode="reference", scale=1.0, output_final_state=True)
    assert_close(o, ro, F64, name="o")
    assert_close(s, rs, F64, name="state")


@pytest.mark.parametrize("mode", MODES)
def test_no_decay_unit_kappa_is_the_delta_rule(mode):
    """w = 0, a = -kappa, b = beta kappa, k = beta kappa: S_t = (I - beta k k^T) S + beta k v^T."""
    r, w, _, v, a, _ = _inputs()
    kappa = -a
    beta = torch.rand(2, 37, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    o, s = rwkv7(r, 0 * w, beta[..., None] * kappa, v, a, beta[..., None] * kappa, mode=mode,
                 output_final_state=True, chunk_size=8)  # fmt: skip
    ro, rs = delta_rule(r, kappa, v, beta, mode="reference", scale=1.0, output_final_state=True)
    assert_close(o, ro, F64, name="o")
    assert_close(s, rs, F64, name="state")


@pytest.mark.parametrize("decay", [0.1, 30.0], ids=["factored", "strong-direct"])
def test_both_intra_chunk_paths_with_gradients(decay):
    """Chunks decaying by less / more than SAFE_SPAN take the factored / the direct path."""
    inputs = [x.requires_grad_(True) for x in _inputs(T=40, decay=decay)]
    S0 = torch.randn(2, 2, 6, 5, dtype=F64, requires_grad=True)
    res = {}
    for mode in ("reference", "chunk"):
        o, s = rwkv7(*inputs, mode=mode, initial_state=S0, output_final_state=True, chunk_size=16)
        res[mode] = (o, s, *torch.autograd.grad((o * o).sum() + (s * s).sum(), [*inputs, S0]))
    for name, got, ref in zip(
        ["o", "S", "r", "w", "k", "v", "a", "b", "S0"], res["chunk"], res["reference"], strict=True
    ):
        assert_close(got, ref, F64, name=f"{name} decay={decay}")


@pytest.mark.slow
def test_million_tokens_stay_finite_and_agree():
    """1M tokens, log-decays from ~0 down to -20 per step: chunk in carried pieces vs step form."""
    T, piece = 1 << 20, 1 << 16
    r, w, k, v, a, b = _inputs(B=1, T=T, H=1, K=16, V=16, dtype=torch.float32)
    w = -20 * torch.rand(1, T, 1, 16, generator=torch.Generator().manual_seed(1)) ** 4
    k = F.normalize(k, dim=-1)
    assert_pieces_agree(rwkv7, (r, w, k, v, a, b), T, piece)
