"""The hybrid decoder-only LM: embeddings, ``num_layers`` blocks of (RMSNorm, token mixer, RMSNorm,
SwiGLU MLP) with residuals, a final RMSNorm and a (tied) LM head, as Hugging Face ``PreTrainedModel``s.

Shape legend: B batch, T time, D hidden size, V vocabulary.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from subquad.layers import RMSNorm, make_mixer
from subquad.models.cache import SubquadCache
from subquad.models.config import SubquadConfig


class SwiGLU(nn.Module):
    """``W_down (silu(W_gate x) * W_up x)`` (Shazeer 2020, https://arxiv.org/abs/2002.05202)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: SubquadConfig, mixer_name: str) -> None:
        super().__init__()
        self.mixer_name = mixer_name
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        kwargs = config.mixer_kwargs(mixer_name)
        self.mixer = make_mixer(mixer_name, config.hidden_size, kwargs.pop("num_heads"), **kwargs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, cache=None, cu_seqlens=None, attention_mask=None, shared=None):
        """``shared``: one dict per model call, handed to mixers that use it (``uses_shared``)."""
        extra = {"shared": shared} if getattr(self.mixer, "uses_shared", False) else {}
        x = x + self.mixer(
            self.mixer_norm(x), cache=cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask, **extra
        )
        return x + self.mlp(self.mlp_norm(x))


class SubquadPreTrainedModel(PreTrainedModel):
    config_class = SubquadConfig
    base_model_prefix = "model"
    _no_split_modules: ClassVar[list[str]] = ["Block"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        # only plain projections and embeddings: mixers initialise their own gates and decays
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)


def _check_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size}), got values in "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]"
        )


class SubquadModel(SubquadPreTrainedModel):
    """The decoder stack without the LM head; returns the final hidden states."""

    def __init__(self, config: SubquadConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, name) for name in config.mixers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def new_cache(self) -> SubquadCache:
        """An empty generation cache for this model."""
        return SubquadCache(len(self.layers), [block.mixer.memory for block in self.layers])

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SubquadCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            _check_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is None and kwargs.get("past_key_values") is not None:
            cache = kwargs["past_key_values"]
        if cache is not None and not isinstance(cache, SubquadCache):
            raise TypeError(f"cache must be a SubquadCache (model.new_cache()), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = self.new_cache()
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: take the unmasked fast paths
        x = inputs_embeds
        shared: dict = {}  # per-call values layers pass on (RWKV-7's first-layer values)
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = block(
                x, cache=layer_cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask, shared=shared
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class SubquadForCausalLM(SubquadPreTrainedModel, GenerationMixin):
    """The hybrid LM with its head; ``generate`` decodes with a ``SubquadCache`` (fixed-size states for
    recurrent layers, the window for sliding layers, a growing KV cache for full attention)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SubquadConfig) -> None:
        super().__init__(config)
        self.model = SubquadModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def new_cache(self) -> SubquadCache:
        return self.model.new_cache()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: we build our own below

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs) -> None:
        if model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is not None:
            model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = self.new_cache()
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SubquadCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``[B, T, V]`` (the last ``logits_to_keep`` positions when > 0) and, with ``labels``,
        the mean next-token cross-entropy over labels != -100 (labels are shifted inside; with
        ``cu_seqlens`` the last token of each packed sequence predicts nothing)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cu_seqlens=cu_seqlens,
            **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, cu_seqlens)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]``; positions whose
    target is -100, or that cross a packed-sequence boundary, are ignored."""
    targets = labels[:, 1:].clone()
    if cu_seqlens is not None:
        ends = cu_seqlens[1:-1] - 1  # last token of each sequence but the final one
        targets[:, ends.to(targets.device)] = -100
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100
    )
