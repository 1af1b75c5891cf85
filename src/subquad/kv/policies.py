"""Eviction policies: each scores the tokens a cache layer holds; the cache keeps the top ones.

A policy sees a :class:`ScoreContext` (the held keys and values of one layer as a padded
``[B, H, L, D]`` view, their original positions, the most recent queries and, for
policies that ask for it, the attention each token has received so far) and returns a
score ``[B, H, L]``: higher is kept, ``+inf`` is always kept. Pad tokens and the padding
of the ragged view are handled by the cache, not by the policy. A policy may also set
per-layer (:meth:`Policy.layer_target`) and per-head (:meth:`Policy.head_targets`)
budgets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

INF = float("inf")


@dataclass
class ScoreContext:
    """What a policy may look at when one layer is compressed.

    Attributes:
        keys: ``[B, H, L, D]`` held keys (after rotary), ragged heads padded at the end.
        values: ``[B, H, L, Dv]``.
        positions: ``[B, H, L]`` original token positions (column in the attention mask), -1 on padding.
        valid: ``[B, H, L]`` True for held real tokens (False on padding and on pad tokens of the batch).
        rank: ``[B, H, L]`` index of the token among the real tokens of its sequence (0 = first real token).
        queries: ``[B, Hq, W, D]`` the most recent query rows (the current chunk's last rows).
        query_positions: ``[W]`` their positions.
        stats: per-token statistics ``[B, H, L]`` the policy asked for in ``token_stats`` (see
            :data:`TOKEN_STATS`), gathered over every forward since the token arrived.
        scaling: the attention scale.
        layer_idx, num_layers: where this layer sits.
        seen: tokens processed so far.
        target: tokens to keep per head in this layer.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    rank: torch.Tensor
    queries: torch.Tensor
    query_positions: torch.Tensor
    stats: dict[str, torch.Tensor]
    scaling: float
    layer_idx: int
    num_layers: int
    seen: int
    target: int

    @property
    def attention_sums(self) -> torch.Tensor:
        """Attention received so far, summed over queries and the query heads of each KV head."""
        return self.stats["attention"]

    def window_attention(self, window: int) -> torch.Tensor:
        """Softmax attention ``[B, H, G, w, L]`` of the last ``w`` query rows over the held tokens."""
        q = self.queries[:, :, -window:].float()
        qpos = self.query_positions[-window:]
        b, hq, w, d = q.shape
        h = self.keys.shape[1]
        q = q.reshape(b, h, hq // h, w, d)
        s = torch.einsum("bhgwd,bhld->bhgwl", q, self.keys.float()) * self.scaling
        allowed = self.valid[:, :, None, None, :] & (self.positions[:, :, None, None, :] <= qpos[:, None])
        s = s.masked_fill(~allowed, -INF)
        p = torch.softmax(s, dim=-1)
        return torch.nan_to_num(p, nan=0.0)


#: Per-token statistics a cache can keep for its policy, updated after every forward from the attention
#: ``a`` each token received (summed over the forward's queries and the query heads of its KV head):
#: ``attention`` sums ``a``; a token is *hit* when ``a`` is at least its uniform share, and
#: ``last_hit`` is the step of its latest hit (initially its own position), ``max_interval`` the longest
#: gap seen between two hits.
TOKEN_STATS = ("attention", "last_hit", "max_interval")


def init_stats(names, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """Initial statistics of new tokens at ``positions [B, H, T]``."""
    out = {}
    for n in names:
        # fresh, contiguous tensors: the statistics are updated in place
        fresh = positions.new_zeros(positions.shape, dtype=torch.float32)
        out[n] = fresh.copy_(positions) if n == "last_hit" else fresh
    return out


def observe_stats(stats: dict[str, torch.Tensor], attn: torch.Tensor, step: int, threshold: float) -> None:
    """Update ``stats`` in place (they may be views) with the attention ``attn`` of one forward."""
    if "attention" in stats:
        stats["attention"] += attn
    if "last_hit" in stats:
        hit = attn >= threshold
        last = stats["last_hit"]
        if "max_interval" in stats:
            longest = stats["max_interval"]
            gap = torch.clamp_min(step - last, 0)
            longest.copy_(torch.where(hit, torch.maximum(longest, gap), longest))
        last.copy_(torch.where(hit, torch.full_like(last, float(step)), last))


class Policy:
    """Base class. Subclasses set ``name`` and implement :meth:`score`."""

    name = "policy"
    #: query rows a policy needs for decode-time compression (0: none)
    window = 0
    #: per-token statistics (names from :data:`TOKEN_STATS`) the cache keeps for this policy
    token_stats: tuple[str, ...] = ()
    #: whether each head folds what it evicts into a compensation token (mean key and value)
    compensate = False

    @property
    def tracks_attention(self) -> bool:
        return bool(self.token_stats)

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        raise NotImplementedError

    def layer_target(self, target: int, layer_idx: int, num_layers: int, seen: int) -> int:
        """Per-layer budget once ``seen`` tokens have been read; the default keeps the global one."""
        return target

    def head_targets(self, ctx: ScoreContext) -> torch.Tensor | None:
        """Per-head budgets ``[H]`` (long), or None for ``ctx.target`` on every head."""
        return None

    def config(self) -> dict:
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _recent(ctx: ScoreContext, count: int) -> torch.Tensor:
    """True for the ``count`` most recent positions."""
    return ctx.positions >= ctx.seen - count


class StreamingLLM(Policy):
    """Attention sinks + recent window (Xiao et al. 2023, https://arxiv.org/abs/2309.17453).

    Score: ``+inf`` for the first ``sinks`` real tokens, else the position (newer is kept).
    """

    name = "streamingllm"

    def __init__(self, sinks: int = 4) -> None:
        if sinks < 0:
            raise ValueError(f"StreamingLLM: sinks must be >= 0, got {sinks}")
        self.sinks = sinks

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.positions.float()
        return s.masked_fill(ctx.rank < self.sinks, INF)


class H2O(Policy):
    """Heavy hitters + recent tokens (Zhang et al. 2023, https://arxiv.org/abs/2306.14048).

    Score: attention accumulated over every query so far (prefill and decoding), summed over the
    query heads of the KV head; the most recent ``recent_fraction`` of the budget is always kept.
    """

    name = "h2o"
    token_stats = ("attention",)

    def __init__(self, recent_fraction: float = 0.5) -> None:
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"H2O: recent_fraction must be in [0, 1], got {recent_fraction}")
        self.recent_fraction = recent_fraction

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.attention_sums.clone()
        return s.masked_fill(_recent(ctx, int(ctx.target * self.recent_fraction)), INF)


class SnapKV(Policy):
    """Observation-window voting with pooling (Li et al. 2024, https://arxiv.org/abs/2404.14469).

    Score: attention of the last ``window`` queries to each token, summed over the window,
    averaged over the query heads of the KV head, max-pooled over ``kernel`` neighbouring
    positions; the window itself is always kept.
    """

    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7) -> None:
        if window < 1:
            raise ValueError(f"SnapKV: window must be >= 1, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be a positive odd number, got {kernel}")
        self.window = window
        self.kernel = kernel

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        votes = ctx.window_attention(self.window).sum(dim=3).mean(dim=2)  # [B, H, L]
        if self.kernel > 1:
            b, h, n = votes.shape
            votes = F.max_pool1d(votes.reshape(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
            votes = votes.reshape(b, h, n)
        return votes.masked_fill(_recent(ctx, self.window), INF)


class PyramidKV(SnapKV):
    """SnapKV scoring with budgets that shrink with depth (Cai et al. 2024, https://arxiv.org/abs/2406.02069).

    Layer ``l`` of ``n`` keeps ``b_max - l (b_max - b_min) / (n - 1)`` tokens with
    ``b_min = target / beta`` and ``b_max = 2 target - b_min``: the same total as a uniform
    budget, more in the lower layers where attention is broad. Where ``b_max`` would exceed the
    tokens seen, it is capped there and ``b_min = 2 target - seen`` keeps the total.
    """

    name = "pyramidkv"

    def __init__(self, window: int = 32, kernel: int = 7, beta: float = 20.0) -> None:
        super().__init__(window=window, kernel=kernel)
        if beta < 1:
            raise ValueError(f"PyramidKV: beta must be >= 1, got {beta}")
        self.beta = beta

    def layer_target(self, target: int, layer_idx: int, num_layers: int, seen: int) -> int:
        if num_layers == 1:
            return target
        low = target / self.beta
        high = 2 * target - low
        if high > seen:
            high, low = seen, 2 * target - seen
        return max(1, round(high - layer_idx * (high - low) / (num_layers - 1)))


class TOVA(Policy):
    """Token Omission Via Attention (Oren et al. 2024, https://arxiv.org/abs/2401.06104).

    Score: the attention of the most recent query, averaged over the query heads of the KV head.
    Run with a token budget and ``evict_every=1`` for the paper's one-out-one-in decoding.
    """

    name = "tova"
    window = 1

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.window_attention(1)[:, :, :, -1].mean(dim=2)
        return s.masked_fill(_recent(ctx, 1), INF)


class LazyEviction(Policy):
    """Evict by observed recurrence interval (after LazyEviction, 2025: lagged eviction for long reasoning).

    Tokens that attention keeps coming back to are kept while they are still expected back: a token
    hit at step ``l`` whose longest gap between hits so far is ``m`` scores ``m - (t - l)`` at step
    ``t`` (>= 0: within its usual interval); tokens never hit score by recency; the most recent
    ``window`` tokens are always kept. Meant for long decoding with a token budget, where the
    statistics accumulate; ``evict_every`` sets how lazily it evicts.
    """

    name = "lazy"
    token_stats = ("last_hit", "max_interval")

    def __init__(self, window: int = 16) -> None:
        if window < 0:
            raise ValueError(f"LazyEviction: window must be >= 0, got {window}")
        self.window = 0  # needs no query rows
        self.recent = window

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.stats["max_interval"] - (ctx.seen - 1 - ctx.stats["last_hit"])
        return s.masked_fill(_recent(ctx, self.recent), INF)


class ThinK(Policy):
    """Query-driven key-channel pruning (Xu et al. 2024, https://arxiv.org/abs/2407.21018), on its own
    or on top of a token policy: packed keys keep only the ``channels`` fraction of each head's
    channels with the largest ``|Q_w[:, c]| |K[:, c]|`` (recent ``window`` queries), and are stored
    that narrow; values and the recent tail stay whole. Without ``inner`` no token is evicted (give
    no budget).
    """

    name = "think"

    def __init__(self, inner: Policy | str | None = None, channels: float = 0.5, window: int = 32) -> None:
        if not 0.0 < channels <= 1.0:
            raise ValueError(
                f"ThinK: channels is the kept fraction of key channels in (0, 1], got {channels}"
            )
        if window < 1:
            raise ValueError(f"ThinK: window must be >= 1, got {window}")
        self.inner = make_policy(inner) if inner is not None else None
        self.key_channels = channels
        self.observation = window
        self.window = max(window, self.inner.window if self.inner else 0)
        self.token_stats = self.inner.token_stats if self.inner else ()
        self.compensate = self.inner.compensate if self.inner else False

    def config(self) -> dict:
        inner = self.inner.config() if self.inner else None
        return {"name": self.name, "channels": self.key_channels, "window": self.observation, "inner": inner}

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        return self.inner.score(ctx) if self.inner else ctx.positions.float()

    def layer_target(self, target: int, layer_idx: int, num_layers: int, seen: int) -> int:
        return self.inner.layer_target(target, layer_idx, num_layers, seen) if self.inner else target

    def head_targets(self, ctx: ScoreContext) -> torch.Tensor | None:
        return self.inner.head_targets(ctx) if self.inner else None


@dataclass
class HeadRoles:
    """Per (layer, KV head) retrieval scores from a calibration; higher means more retrieval-like."""

    scores: list[list[float]]
    source: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"scores": self.scores, "source": self.source}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> HeadRoles:
        data = json.loads(Path(path).read_text())
        scores = data.get("scores")
        if not (isinstance(scores, list) and scores and all(isinstance(r, list) for r in scores)):
            raise ValueError(f"{path}: expected a JSON object with 'scores': [[float per KV head] per layer]")
        return cls(scores=[[float(x) for x in row] for row in scores], source=data.get("source", {}))


class DuoAttention(Policy):
    """Retrieval heads keep every token, streaming heads keep sinks + a recent window.

    After DuoAttention (Xiao et al. 2024, https://arxiv.org/abs/2410.10819); head roles come from
    :func:`subquad.kv.calibrate.calibrate_head_roles` (attention mass on a passkey, model frozen)
    instead of the paper's trained gates. Given a layer target, the number of retrieval heads is
    chosen over all layers so that the average kept fraction meets the budget: the
    highest-scoring heads of the whole model become retrieval heads, and what whole heads leave of
    the budget widens the streaming heads' recent window.
    """

    name = "duo"

    def __init__(self, roles: HeadRoles | str | Path, sinks: int = 4, recent: int = 256) -> None:
        self.roles = roles if isinstance(roles, HeadRoles) else HeadRoles.load(roles)
        if sinks < 0 or recent < 1:
            raise ValueError(f"DuoAttention: sinks >= 0 and recent >= 1 required, got {sinks}, {recent}")
        self.sinks = sinks
        self.recent = recent

    def config(self) -> dict:
        return {"name": self.name, "sinks": self.sinks, "recent": self.recent}

    def head_targets(self, ctx: ScoreContext) -> torch.Tensor:
        scores = torch.tensor(self.roles.scores, dtype=torch.float64)
        if scores.shape != (ctx.num_layers, ctx.keys.shape[1]):
            raise ValueError(
                f"DuoAttention: head roles are {tuple(scores.shape)} (layers, KV heads) but the model has "
                f"{(ctx.num_layers, ctx.keys.shape[1])}"
            )
        full = ctx.seen
        # a budget below sinks + recent shrinks the streaming heads' window (and leaves no retrieval head)
        stream = min(full, self.sinks + self.recent, ctx.target)
        # fraction f of retrieval heads such that f * full + (1 - f) * stream = target
        f = 1.0 if full <= stream else min(1.0, max(0.0, (ctx.target - stream) / (full - stream)))
        n = scores.numel()
        n_retrieval = math.floor(f * n + 1e-9)
        # whole heads round the budget down: the rest widens every streaming head's recent window
        if n_retrieval < n:
            spare = ctx.target * n - (n_retrieval * full + (n - n_retrieval) * stream)
            stream = min(full, stream + max(0, spare) // (n - n_retrieval))
        order = scores.flatten().argsort(descending=True, stable=True)
        is_retrieval = torch.zeros(n, dtype=torch.bool)
        is_retrieval[order[:n_retrieval]] = True
        mine = is_retrieval.view_as(scores)[ctx.layer_idx]
        return torch.where(mine, full, stream).long()

    def score(self, ctx: ScoreContext) -> torch.Tensor:
        s = ctx.positions.float()
        return s.masked_fill(ctx.rank < self.sinks, INF)


class RazorAttention(DuoAttention):
    """Retrieval heads keep everything; the others keep sinks + recent tokens plus one compensation
    token, the running mean of the keys and values they evicted (Tang et al. 2024,
    https://arxiv.org/abs/2407.15891). Heads come from
    :func:`subquad.kv.calibrate.calibrate_induction_heads` (echo + induction attention on a repeated
    random sequence). Retrieval heads are chosen over the whole model to meet the budget, as in
    :class:`DuoAttention`.
    """

    name = "razor"
    compensate = True


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (StreamingLLM, H2O, SnapKV, PyramidKV, TOVA, LazyEviction, DuoAttention, RazorAttention, ThinK)
}


def make_policy(policy: Policy | str, **kwargs) -> Policy:
    """A policy instance from an instance or a registered name."""
    if isinstance(policy, Policy):
        if kwargs:
            raise ValueError("policy options go to the policy's constructor, not beside an instance")
        return policy
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown KV policy {policy!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[policy](**kwargs)
