"""Layers: nn.Modules around the ops (projections, short convolutions, gates, feature maps, norms,
rotary embeddings, cache I/O). See ``mixers.py`` for the calling convention.

``MIXERS`` names every mixer a model's layer pattern may use; ``"op:<name>"`` builds the generic
``OpMixer`` for any stateful op in the registry, so a new op is usable in a model with no layer code.
"""

from __future__ import annotations

from typing import Any

from subquad.layers.cache import LayerCache
from subquad.layers.feature_maps import FEATURE_MAPS, make_feature_map
from subquad.layers.mixers import (
    GLA,
    NSA,
    RWKV7,
    Attention,
    DeltaNet,
    GatedDeltaNet,
    HyperAttention,
    LinearAttention,
    Mamba2,
    Mixer,
    MoM,
    OpMixer,
    RecurrentMixer,
    RetNet,
    RoutingAttention,
)
from subquad.layers.modules import RMSNorm, RotaryEmbedding, ShortConvolution

#: mixer name -> (class, default options)
MIXERS: dict[str, tuple[type[Mixer], dict[str, Any]]] = {
    "attention": (Attention, {}),
    "swa": (Attention, {"window": 512}),
    "linear_attn": (LinearAttention, {}),
    "based": (LinearAttention, {"feature_map": "taylor", "key_dim": 16}),
    "performer": (LinearAttention, {"feature_map": "performer"}),
    "hedgehog": (LinearAttention, {"feature_map": "hedgehog"}),
    "retnet": (RetNet, {}),
    "gla": (GLA, {}),
    "mamba2": (Mamba2, {}),
    "deltanet": (DeltaNet, {}),
    "deltanet_neg": (DeltaNet, {"allow_neg_eigval": True}),
    "gated_deltanet": (GatedDeltaNet, {}),
    "gated_deltanet_neg": (GatedDeltaNet, {"allow_neg_eigval": True}),
    "rwkv7": (RWKV7, {}),
    "mom": (MoM, {}),
    "nsa": (NSA, {}),
    "routing": (RoutingAttention, {}),
    "hyper": (HyperAttention, {}),
}

#: one-letter codes for layer patterns such as ``"GGGA"``
PATTERN_LETTERS = {
    "A": "attention",
    "S": "swa",
    "L": "linear_attn",
    "R": "retnet",
    "G": "gla",
    "M": "mamba2",
    "D": "deltanet",
    "N": "gated_deltanet",
    "K": "rwkv7",
    "X": "mom",
    "P": "nsa",
}

#: the layer a model uses for each registry op (ops absent here get the generic ``op:<name>``)
OP_LAYERS = {
    "attention": "attention",
    "linear_attn": "linear_attn",
    "simple_gla": "retnet",
    "gla": "gla",
    "delta_rule": "deltanet",
    "gated_delta_rule": "gated_deltanet",
    "rwkv7": "rwkv7",
    "mom": "mom",
    "nsa": "nsa",
    "routing_attention": "routing",
    "hyper_attention": "hyper",
}


def mixer_names() -> list[str]:
    """Every accepted mixer name: ``MIXERS`` plus ``op:<name>`` for each stateful registry op."""
    from subquad.registry import REGISTRY

    return [*MIXERS, *(f"op:{n}" for n, s in REGISTRY.items() if s.stateful)]


def make_mixer(name: str, hidden_size: int, num_heads: int, **options: Any) -> Mixer:
    """Build the mixer called ``name`` (a ``MIXERS`` key or ``op:<registry op>``); ``options`` override
    its defaults (e.g. ``window=256``, ``feature_map="relu"``)."""
    if name.startswith("op:"):
        return OpMixer(hidden_size, num_heads, op=name[3:], **options)
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; expected one of {mixer_names()}")
    cls, defaults = MIXERS[name]
    return cls(hidden_size, num_heads, **{**defaults, **options})


__all__ = [
    "FEATURE_MAPS",
    "GLA",
    "MIXERS",
    "NSA",
    "OP_LAYERS",
    "PATTERN_LETTERS",
    "RWKV7",
    "Attention",
    "DeltaNet",
    "GatedDeltaNet",
    "HyperAttention",
    "LayerCache",
    "LinearAttention",
    "Mamba2",
    "Mixer",
    "MoM",
    "OpMixer",
    "RMSNorm",
    "RecurrentMixer",
    "RetNet",
    "RotaryEmbedding",
    "RoutingAttention",
    "ShortConvolution",
    "make_feature_map",
    "make_mixer",
    "mixer_names",
]
