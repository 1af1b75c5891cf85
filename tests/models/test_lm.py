"""The hybrid LM: cached decoding == full forward for every mixer kind and for hybrids (with left
padding), generate() == a plain argmax loop, save/load round trips through safetensors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from subquad.layers import MIXERS
from subquad.models import SubquadConfig, SubquadForCausalLM, expand_pattern
from subquad.testing import assert_close

V = 50
SMALL = {"swa": {}, "based": {"key_dim": 4}, "mamba2": {"state_size": 8}}


def tiny(pattern, num_layers=2, seed=0, **kw) -> SubquadForCausalLM:
    torch.manual_seed(seed)
    opts = {name: SMALL[name] for name in SMALL if name != "swa"}
    cfg = SubquadConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=num_layers,
        num_heads=2,
        layer_pattern=pattern,
        window=4,
        mixer_options=opts,
        **kw,
    )
    model = SubquadForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


KINDS = [[name, name] for name in MIXERS] + ["GGGA", "NNNA", "LLLS", "MKXR"]


@pytest.mark.parametrize("pattern", KINDS, ids=lambda p: p if isinstance(p, str) else p[0])
def test_cached_decoding_matches_full_forward_with_padding(pattern):
    model = tiny(pattern, num_layers=4 if isinstance(pattern, str) else 2)
    x = ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0  # row 0 is a 7-token prompt, left-padded
    with torch.no_grad():
        cache = model.new_cache()
        logits = [model(x[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 10):
            logits.append(model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
        got = torch.cat(logits, dim=1)
        want_row0 = model(x[:1, 3:]).logits
        want_row1 = model(x[1:]).logits
    assert_close(got[:1, 3:], want_row0, dtype=torch.float64, name="padded row")
    assert_close(got[1:], want_row1, dtype=torch.float64, name="full row")


@pytest.mark.parametrize("pattern", ["GGGA", "NS"])
def test_generate_greedy_matches_argmax_loop_and_padding(pattern):
    model = tiny(pattern, num_layers=4 if len(pattern) == 4 else 2)
    prompt_a, prompt_b = ids(1, 5, seed=1), ids(1, 8, seed=2)
    with torch.no_grad():
        seq = prompt_b.clone()
        for _ in range(6):  # the uncached definition of greedy decoding
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out_b = model.generate(prompt_b, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out_b, seq)
        batch = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt_a], dim=1)
        batch = torch.cat([batch, prompt_b])
        mask = torch.ones_like(batch)
        mask[0, :3] = 0
        out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out_a = model.generate(prompt_a, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1], out_b[0])
    assert torch.equal(out[0, 3:], out_a[0])


def test_generate_sampling_eos_and_cache_size():
    model = tiny("GA", num_layers=2)
    prompt = ids(2, 6)
    torch.manual_seed(0)
    out = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9, pad_token_id=0)
    assert out.shape == (2, 14)
    eos = int(out[0, 6])  # the first sampled token of row 0, used as eos on a rerun
    torch.manual_seed(0)
    out2 = model.generate(
        prompt, max_new_tokens=8, do_sample=True, top_k=10, top_p=0.9, pad_token_id=0, eos_token_id=eos
    )
    assert out2[0, 6] == eos and (out2[0, 7:] == 0).all()


def test_save_load_round_trip_is_safetensors(tmp_path):
    model = tiny("GGGA", num_layers=4).float()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SubquadForCausalLM)
    x = ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_packed_loss_ignores_boundaries():
    model = tiny("GA", num_layers=2)
    a, b = ids(1, 6, seed=3), ids(1, 4, seed=4)
    with torch.no_grad():
        packed = model(torch.cat([a, b], 1), labels=torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 6, 10]))
        la = model(a, labels=a).loss
        lb = model(b, labels=b).loss
    want = (la * 5 + lb * 3) / 8
    assert_close(packed.loss, want, dtype=torch.float64, name="packed loss")


def test_config_errors():
    assert expand_pattern("GA", 4) == ["gla", "attention", "gla", "attention"]
    with pytest.raises(ValueError, match="unknown letters"):
        SubquadConfig(layer_pattern="GZ", num_layers=2)
    with pytest.raises(ValueError, match="does not divide"):
        SubquadConfig(layer_pattern="GGA", num_layers=4)
    with pytest.raises(ValueError, match="unknown mixers"):
        SubquadConfig(layer_pattern=["gla", "nope"], num_layers=2)
    model = tiny("G", num_layers=1)
    with pytest.raises(ValueError, match="input_ids must lie"):
        model(torch.tensor([[V]]))


def test_rwkv7_value_residual_reads_the_first_rwkv7_layer():
    """Only RWKV-7 layers after the first mix in the first one's values: their v0 / v_lora get
    gradients, the first layer's do not, and turning the residual off changes the output."""
    model = tiny(["gla", "rwkv7", "rwkv7"], num_layers=3).float()
    x = ids(2, 9)
    model(x).logits.square().mean().backward()
    first, second = model.model.layers[1].mixer, model.model.layers[2].mixer
    assert first.v0.grad is None and second.v0.grad is not None
    assert all(p.grad is not None for p in second.v_lora.parameters())
    off = copy.deepcopy(model)
    for block in off.model.layers[1:]:
        block.mixer.value_residual = False
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, off(x).logits)


def test_a_mixer_can_have_its_own_head_count():
    """``mixer_options[name]["num_heads"]`` (Zoology's one-head MQAR attention) sets that mixer's
    heads, and its key/value heads with it; the other mixers keep the model's; cached decoding of
    such a hybrid still equals the full forward."""
    torch.manual_seed(0)
    cfg = SubquadConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, layer_pattern="GA",
        mixer_options={"attention": {"num_heads": 1}},
    )  # fmt: skip
    model = SubquadForCausalLM(cfg).double().eval()
    gla, att = (block.mixer for block in model.model.layers)
    assert (gla.num_heads, att.num_heads, att.head_dim) == (4, 1, 32)
    x = ids(1, 8)
    with torch.no_grad():
        cache = model.new_cache()
        steps = [model(x[:, :5], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(5, 8)]
        assert_close(torch.cat(steps, 1), model(x).logits, torch.float64, name="one-head attention, cached")
    bad = SubquadConfig(vocab_size=V, hidden_size=32, num_layers=1, layer_pattern="A",
                        mixer_options={"attention": {"num_heads": 3}})  # fmt: skip
    with pytest.raises(ValueError, match=r"mixer_options\['attention'\]\['num_heads'\]"):
        SubquadForCausalLM(bad)
