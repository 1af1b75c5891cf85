"""Every mixer: cached decoding == full forward, packed == per-sequence, left padding == unpadded.

Generated over ``subquad.layers.mixer_names()`` so a new mixer (or a new stateful op, through
``op:<name>``) is covered with no test code.
"""

from __future__ import annotations

import pytest
import torch

from subquad.layers import LayerCache, make_mixer, mixer_names
from subquad.testing import assert_close

D, H = 32, 2
SMALL = {
    "swa": {"window": 5},
    "based": {"key_dim": 4},
    "mamba2": {"state_size": 8},
    "nsa": {"block_size": 2, "block_count": 2, "window": 3},  # every branch at these lengths
    "routing": {"num_clusters": 3},
    "hyper": {"block_size": 2, "num_samples": 3},  # exact below min_seq_len (256): see below
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    mixer = make_mixer(name, D, H, **SMALL.get(name, {})).double().eval()
    with torch.no_grad():  # give every parameter (zero-initialised ones too) a generic value
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mixer


def inputs(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", mixer_names())
def test_step_by_step_decode_matches_full_forward(name):
    mixer = build(name)
    x = inputs(2, 11)
    with torch.no_grad():
        full = mixer(x)
        cache = LayerCache()
        prefill = mixer(x[:, :4], cache=cache)  # chunked prefill, then one token at a time
        steps = [mixer(x[:, t : t + 1], cache=cache) for t in range(4, 11)]
    assert_close(torch.cat([prefill, *steps], dim=1), full, dtype=torch.float64, name=f"{name} decode")
    assert cache.seen_tokens == 11


@pytest.mark.parametrize("name", mixer_names())
def test_chunked_prefill_in_pieces_matches_one_call(name):
    mixer = build(name)
    x = inputs(1, 13)
    with torch.no_grad():
        full = mixer(x)
        cache = LayerCache()
        pieces = [mixer(x[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 13))]
    assert_close(torch.cat(pieces, dim=1), full, dtype=torch.float64, name=f"{name} pieces")


@pytest.mark.parametrize("name", mixer_names())
def test_packed_sequences_match_separate_calls(name):
    mixer = build(name)
    lengths = (5, 1, 9)
    xs = [inputs(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    cu = torch.tensor([0, 5, 6, 15])
    with torch.no_grad():
        packed = mixer(torch.cat(xs, dim=1), cu_seqlens=cu)
        separate = torch.cat([mixer(x) for x in xs], dim=1)
    assert_close(packed, separate, dtype=torch.float64, name=f"{name} packed")


@pytest.mark.parametrize("name", mixer_names())
def test_left_padding_matches_unpadded_and_decodes(name):
    mixer = build(name)
    short, long = inputs(1, 4, seed=3), inputs(1, 7, seed=4)
    x = torch.cat([torch.cat([torch.zeros(1, 3, D, dtype=torch.float64), short], dim=1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    nxt = inputs(2, 2, seed=5)
    with torch.no_grad():
        cache = LayerCache()
        y = mixer(x, cache=cache, attention_mask=mask)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step1 = mixer(nxt[:, :1], cache=cache, attention_mask=mask)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step2 = mixer(nxt[:, 1:], cache=cache, attention_mask=mask)
        want_short = mixer(torch.cat([short, nxt[:1]], dim=1))
        want_long = mixer(torch.cat([long, nxt[1:]], dim=1))
    got_short = torch.cat([y[:1, 3:], step1[:1], step2[:1]], dim=1)
    got_long = torch.cat([y[1:], step1[1:], step2[1:]], dim=1)
    assert_close(got_short, want_short, dtype=torch.float64, name=f"{name} padded row")
    assert_close(got_long, want_long, dtype=torch.float64, name=f"{name} unpadded row")


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "attention", "op:ttt_linear"])
def test_backward_reaches_every_parameter(name):
    mixer = make_mixer(name, D, H)
    x = inputs(2, 9).float().requires_grad_()
    mixer(x).square().mean().backward()
    missing = [n for n, p in mixer.named_parameters() if p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", mixer_names())
def test_bfloat16_weights_and_autocast_run_forward_and_backward(name):
    """bf16 weights, and float32 weights under CPU autocast (inputs then mix float32 activations with
    bf16 projections), both run forward and backward and stay near the float64 output."""
    ref = build(name)
    x = inputs(2, 9)
    with torch.no_grad():
        want = ref(x).float()
    bf = build(name).bfloat16()
    xb = x.bfloat16().requires_grad_()
    got_bf = bf(xb)
    got_bf.float().square().mean().backward()
    mixed = build(name).float()
    xf = x.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_ac = mixed(xf)
    got_ac.float().square().mean().backward()
    for got, xin in ((got_bf, xb), (got_ac, xf)):
        assert torch.isfinite(xin.grad).all(), name
        err = (got.float() - want).norm() / want.norm().clamp_min(1e-6)
        assert err < 0.1, f"{name}: bf16 relative error {err:.3f}"


def test_recurrent_cache_is_fixed_size_and_window_cache_bounded():
    rec, swa, full = build("gla"), build("swa"), build("attention")
    caches = [LayerCache(), LayerCache(), LayerCache()]
    sizes = []
    with torch.no_grad():
        for n in (8, 64):
            for m, c in zip((rec, swa, full), caches, strict=True):
                m(inputs(1, n, seed=n), cache=c)
            sizes.append([c.used_bytes() for c in caches])
    assert sizes[0][0] == sizes[1][0]  # recurrent state does not grow
    assert sizes[0][1] == sizes[1][1]  # the window (5 tokens) is full after 8 tokens
    assert caches[1].kv_len == 5
    assert caches[2].kv_len == 72 and sizes[1][2] > sizes[0][2]


def test_bad_layer_inputs_raise():
    mixer = build("gla")
    with pytest.raises(ValueError, match="x must be"):
        mixer(torch.zeros(2, 3, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="cu_seqlens needs B == 1"):
        mixer(inputs(2, 4), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="unknown mixer"):
        make_mixer("nope", D, H)
    with pytest.raises(ValueError, match="feature_map"):
        make_mixer("linear_attn", D, H, feature_map="nope")
    with pytest.raises(ValueError, match="stateful"):
        make_mixer("op:attention", D, H)


def test_feature_maps_shapes_positivity_and_performer_redraw():
    from subquad.layers import FEATURE_MAPS, make_feature_map

    x = torch.randn(2, 5, H, 8, dtype=torch.float64)
    for name in FEATURE_MAPS:
        fmap = make_feature_map(name, 8, H).double()
        y = fmap(x)
        assert y.shape == (2, 5, H, fmap.feature_dim()), name
        if fmap.positive:  # every kernel value phi(q) . phi(k) is >= 0
            flat = y.reshape(-1, y.shape[-1])
            assert (flat @ flat.T >= 0).all(), name
    taylor = make_feature_map("taylor", 8, H).double()
    q, k = x[0, 0, 0], x[0, 1, 0]
    exact = 1 + q @ k / 8**0.5 + (q @ k / 8**0.5) ** 2 / 2
    assert torch.allclose(taylor(x)[0, 0, 0] @ taylor(x)[0, 1, 0], exact)
    perf = make_feature_map("performer", 8, H)
    perf.redraw_interval = 2
    before = perf.projection.clone()
    perf.eval()
    for _ in range(3):
        perf(x.float())
    assert torch.equal(perf.projection, before)  # evaluation never redraws
    perf.train()
    for _ in range(3):
        perf(x.float())
    assert not torch.equal(perf.projection, before)  # training redraws every 2 calls


def test_retnet_rotation_is_relative():
    """RetNet's q/k rotation and decay depend only on n - m: counting positions from 7 (an empty
    state) gives the same output, and the rotation is really applied (rotary=False differs)."""
    mixer = build("retnet")
    x = inputs(2, 9)
    with torch.no_grad():
        y = mixer(x)
        cache = LayerCache()
        cache.seen_tokens = 7
        shifted = mixer(x, cache=cache)
        mixer.rotary, rot = None, mixer.rotary
        plain = mixer(x)
    assert rot is not None
    assert_close(shifted, y, dtype=torch.float64, name="retnet shifted positions")
    assert not torch.allclose(plain, y)


def test_routing_centroids_move_in_training_only():
    mixer = build("routing")
    before = mixer.centroids.clone()
    with torch.no_grad():
        mixer(inputs(2, 9))  # eval mode: routing only
    assert torch.equal(mixer.centroids, before)
    mixer.train()
    mixer(inputs(2, 9).float().double())
    assert not torch.equal(mixer.centroids, before)


def test_hyper_layer_estimates_uncached_calls_and_decodes_exactly():
    """Above min_seq_len an uncached call is HyperAttention's estimate (not exact attention); after
    a prefill, decoding steps are exact attention over the cache."""
    approx = build("hyper")
    approx.hyper["min_seq_len"] = 4
    exact = build("hyper")  # same weights, exact at these lengths
    x = inputs(2, 12)
    with torch.no_grad():
        est, ref = approx(x), exact(x)
        cache = LayerCache()
        approx(x[:, :6], cache=cache)
        steps = torch.cat([approx(x[:, t : t + 1], cache=cache) for t in range(6, 12)], dim=1)
    assert not torch.allclose(est, ref)
    assert_close(steps, ref[:, 6:], dtype=torch.float64, name="hyper decode steps")
