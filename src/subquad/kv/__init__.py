"""KV-cache compression for pretrained Hugging Face causal LMs.

Two ways in::

    cache = subquad.kv.CompressedCache(model, "snapkv", ratio=0.5)
    out = model.generate(**inputs, cache=cache)

    with subquad.kv.compress(model, "snapkv", budget=1024) as press:
        out = model.generate(**inputs)          # every call gets a fresh CompressedCache
    press.last_cache.kv_bytes()

The cache stores only kept tokens (ragged per head, packed, not masked); see
:mod:`subquad.kv.cache` for the layout and :mod:`subquad.kv.policies` for the scoring rules.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from transformers.cache_utils import DynamicCache

from subquad.kv.attention import check_supported, install, uninstall
from subquad.kv.budget import Budget, resolve_budgets
from subquad.kv.cache import CompressedCache, CompressedLayer
from subquad.kv.policies import (
    H2O,
    POLICIES,
    TOVA,
    DuoAttention,
    HeadRoles,
    LazyEviction,
    Policy,
    PyramidKV,
    RazorAttention,
    ScoreContext,
    SnapKV,
    StreamingLLM,
    ThinK,
    make_policy,
)


@dataclass
class Press:
    """What :func:`compress` yields: the settings and the cache of the latest forward that made one."""

    policy: Policy | None
    cache_kwargs: dict
    last_cache: CompressedCache | None = None


@contextmanager
def compress(
    model,
    policy: Policy | str | None,
    *,
    budget=None,
    ratio=None,
    tokens=None,
    evict_every: int = 32,
    quant: str | None = None,
    **kw,
):
    """Within the block, every forward/generate call of ``model`` without a cache of its own uses a
    fresh :class:`CompressedCache` with these settings (a forward pre-hook swaps it in for an empty
    ``DynamicCache``); the model's attention implementation is restored on exit."""
    policy = make_policy(policy, **kw) if policy is not None else None
    num_layers = check_supported(model)
    settings = dict(budget=budget, ratio=ratio, tokens=tokens, evict_every=evict_every, quant=quant)
    # build one cache now so bad settings fail here, not in the middle of generate()
    CompressedCache(num_layers=num_layers, policy=policy, **settings)
    install(model)
    press = Press(policy, settings)

    def swap_in(module, args, kwargs):
        if kwargs.get("use_cache") is False:
            return None
        # transformers 5.24 names the argument `cache` (`past_key_values` is deprecated there)
        name = "past_key_values" if "past_key_values" in kwargs else "cache"
        current = kwargs.get(name)
        if current is None or (type(current) is DynamicCache and current.get_seq_length() == 0):
            press.last_cache = CompressedCache(num_layers=num_layers, policy=policy, **press.cache_kwargs)
            kwargs[name] = press.last_cache
            return args, kwargs
        return None

    handle = model.register_forward_pre_hook(swap_in, with_kwargs=True)
    try:
        yield press
    finally:
        handle.remove()
        uninstall(model)


__all__ = [
    "H2O",
    "POLICIES",
    "TOVA",
    "Budget",
    "CompressedCache",
    "CompressedLayer",
    "DuoAttention",
    "HeadRoles",
    "LazyEviction",
    "Policy",
    "Press",
    "PyramidKV",
    "RazorAttention",
    "ScoreContext",
    "SnapKV",
    "StreamingLLM",
    "ThinK",
    "check_supported",
    "compress",
    "install",
    "make_policy",
    "resolve_budgets",
    "uninstall",
]
