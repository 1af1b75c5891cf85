"""The hybrid LM's configuration: a Hugging Face ``PretrainedConfig`` whose layer pattern picks a
token mixer per layer.

``layer_pattern`` is a string of one-letter codes (``subquad.layers.PATTERN_LETTERS``: ``"GGGA"``
is three GLA layers then one softmax attention layer) or a list of mixer names
(``["gla", "gla", "gla", "attention"]``, any of ``subquad.layers.mixer_names()``). A pattern shorter
than ``num_layers`` repeats (``"GGGA"`` with 8 layers is ``GGGAGGGA``; MiniMax-M1's 7:1 is
``"LLLLLLLA"``); its length must divide ``num_layers``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from subquad.layers import PATTERN_LETTERS, mixer_names


def expand_pattern(pattern: str | list[str], num_layers: int) -> list[str]:
    """The mixer name of each layer for ``pattern`` repeated over ``num_layers`` layers."""
    if isinstance(pattern, str):
        unknown = sorted(set(pattern) - set(PATTERN_LETTERS))
        if unknown or not pattern:
            raise ValueError(
                f"layer_pattern {pattern!r}: unknown letters {unknown}; letters are "
                + ", ".join(f"{k}={v}" for k, v in PATTERN_LETTERS.items())
            )
        names = [PATTERN_LETTERS[c] for c in pattern]
    else:
        names = list(pattern)
        known = mixer_names()
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ValueError(f"layer_pattern has unknown mixers {bad}; expected names from {known}")
    if num_layers % len(names):
        raise ValueError(f"layer_pattern of length {len(names)} does not divide num_layers={num_layers}")
    return names * (num_layers // len(names))


class SubquadConfig(PretrainedConfig):
    """Configuration of ``SubquadForCausalLM``.

    Args:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width D.
        num_layers: decoder blocks.
        num_heads: heads of every mixer (``head_dim = hidden_size // num_heads``).
        num_kv_heads: key/value heads of attention layers (grouped-query attention), default num_heads.
        layer_pattern: see the module docstring.
        window: the sliding window of ``swa`` layers.
        mixer_options: per mixer name, options passed to its constructor (e.g.
            ``{"linear_attn": {"feature_map": "relu"}}``); ``num_heads`` there gives that mixer its
            own head count (its head dim then ``hidden_size // num_heads``; for attention layers
            ``num_kv_heads`` defaults to it), e.g. Zoology's one-head attention on MQAR.
        intermediate_size: SwiGLU hidden width (default ``8/3 * hidden_size`` rounded up to 64).
        rms_norm_eps, initializer_range, tie_word_embeddings: as usual.
    """

    model_type = "subquad"

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        layer_pattern: str | list[str] = "G",
        window: int = 512,
        mixer_options: dict[str, dict[str, Any]] | None = None,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.layer_pattern = layer_pattern
        self.mixers = expand_pattern(layer_pattern, num_layers)
        self.window = window
        self.mixer_options = dict(mixer_options or {})
        self.intermediate_size = intermediate_size or 64 * -(-(8 * hidden_size // 3) // 64)
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_hidden_layers(self) -> int:
        return self.num_layers

    def mixer_kwargs(self, name: str) -> dict[str, Any]:
        """Constructor options of the mixer ``name`` in this model, ``num_heads`` included."""
        own = self.mixer_options.get(name, {})
        heads = own.get("num_heads", self.num_heads)
        if not isinstance(heads, int) or heads < 1 or self.hidden_size % heads:
            raise ValueError(
                f"mixer_options[{name!r}]['num_heads'] must be a positive int dividing "
                f"hidden_size={self.hidden_size}, got {heads!r}"
            )
        opts: dict[str, Any] = {"num_heads": heads}
        if name in ("attention", "swa"):
            opts["num_kv_heads"] = self.num_kv_heads if "num_heads" not in own else heads
        if name == "swa":
            opts["window"] = self.window
        return {**opts, **own}
