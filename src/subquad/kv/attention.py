"""The attention implementation that lets a compressed cache answer attention for HF models.

No model code is patched: transformers dispatches attention by name through its
``AttentionInterface`` registry, and masks through ``AttentionMaskInterface``. ``install`` registers
``subquad_kv_sdpa`` / ``subquad_kv_eager`` (wrapping the model's own ``sdpa`` or ``eager``) and
points the model's config at it. When a layer's cache is not a :class:`CompressedLayer` (a plain
``DynamicCache``, or no cache) the wrapped function runs unchanged.
"""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    eager_mask,
    sdpa_mask,
)
from transformers.models.llama.modeling_llama import eager_attention_forward

from subquad.kv.cache import take_handoff

_BASES = {"sdpa": (sdpa_attention_forward, sdpa_mask), "eager": (eager_attention_forward, eager_mask)}
PREFIX = "subquad_kv_"


def _make_attention(base):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        layer = take_handoff()
        if layer is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
            raise RuntimeError(
                f"CompressedCache: cache layer {layer.layer_idx} was updated but attention layer "
                f"{module.layer_idx} ran; this model's layer layout is not supported"
            )
        if dropout:
            raise ValueError("CompressedCache is for inference: attention dropout must be 0 (model.eval())")
        if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
            raise ValueError("CompressedCache needs plain softmax attention (no softcap, no sliding window)")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5

        def delegate():
            return base(module, query, key, value, attention_mask, dropout=0.0, scaling=scale, **kwargs)[0]

        return layer.attend(query, attention_mask, scale, delegate), None

    return attention


for _name, (_fn, _mask) in _BASES.items():
    AttentionInterface.register(PREFIX + _name, _make_attention(_fn))
    AttentionMaskInterface.register(PREFIX + _name, _mask)


def _text_config(model):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(model) -> int:
    """Number of decoder layers if ``model`` has a layout the compressed cache supports, else ValueError."""
    config = _text_config(model)
    kind = getattr(config, "model_type", type(model).__name__)
    impl = config._attn_implementation
    base = impl[len(PREFIX) :] if impl and impl.startswith(PREFIX) else impl
    problems = []
    if base not in _BASES:
        problems.append(f"attention implementation {impl!r} (supported: 'sdpa', 'eager')")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        problems.append(f"layer types {sorted(set(layer_types))} (only full attention layers)")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        problems.append("a sliding window")
    n = getattr(config, "num_hidden_layers", None)
    attn = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    if n is None or len(attn) != n or sorted(m.layer_idx for m in attn) != list(range(n)):
        problems.append("attention modules with layer_idx 0..num_hidden_layers-1 and num_key_value_groups")
    if getattr(config, "is_encoder_decoder", False):
        problems.append("an encoder-decoder layout")
    if problems:
        raise ValueError(
            f"subquad.kv: model type {kind!r} is not supported by the compressed cache: it has "
            + "; ".join(problems)
            + ". Supported: decoder-only causal LMs with full softmax attention (Llama, Qwen2/3 style)."
        )
    return n


def install(model) -> int:
    """Route ``model``'s attention through the compressed cache; returns its number of layers."""
    n = check_supported(model)
    config = _text_config(model)
    impl = config._attn_implementation
    if not impl.startswith(PREFIX):
        model.__dict__.setdefault("_subquad_kv_previous", impl)
        for cfg in {id(model.config): model.config, id(config): config}.values():
            cfg._attn_implementation = PREFIX + impl
    return n


def uninstall(model) -> None:
    """Undo :func:`install`."""
    previous = model.__dict__.pop("_subquad_kv_previous", None)
    if previous is not None:
        config = _text_config(model)
        for cfg in {id(model.config): model.config, id(config): config}.values():
            cfg._attn_implementation = previous


__all__ = ["ALL_MASK_ATTENTION_FUNCTIONS", "check_supported", "install", "uninstall"]
