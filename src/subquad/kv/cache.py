"""A Hugging Face cache that keeps, per layer and per KV head, only the tokens a policy keeps.

Storage of one layer:

* a dense *tail* ``[B, H, R, D]`` of the most recent tokens (appended by ``update``), and
* a *packed* part holding what survived the last compression: ``keys [N, D]``, ``values [N, Dv]``,
  ``positions [N]`` (int32, the original token positions) and ``lengths [B, H]``; segment
  ``(b, h)`` holds ``lengths[b, h]`` tokens, so heads may keep different numbers of tokens and
  nothing is padded or masked.

Keys are stored after the model's rotary embedding, so a kept token keeps the position it was
seen at; ``get_seq_length`` counts every token seen, so new tokens get the next positions.
Attention over the two parts goes through :mod:`subquad.kv.attention` (a registered attention
implementation); until a layer has compressed anything it calls the model's own attention
function on the tail, bit for bit what a ``DynamicCache`` gives.

Beam search and batch expansion select rows (``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``): the tail and per-row state are indexed, and the packed tokens of each
selected ``(row, head)`` segment are gathered, so a selected row equals that row's own cache
(tested against caches built from each prompt alone, plain and int8).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from subquad.kv.budget import Budget, resolve_budgets
from subquad.kv.policies import TOKEN_STATS, Policy, ScoreContext, init_stats, make_policy, observe_stats
from subquad.kv.quant import BITS, check_quant, dequantize_rows, quantize

# The layer whose `update` ran last hands itself to the attention function that HF calls next.
_HANDOFF = threading.local()

# scores of one query block stay under this many elements
_BLOCK_ELEMENTS = 1 << 22


def take_handoff():
    layer = getattr(_HANDOFF, "layer", None)
    _HANDOFF.layer = None
    return layer


def allowed_from_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """HF 4D mask (bool: True = attend, or additive float) as bool ``[B, 1, Tq, Kv]``."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return mask
    return mask == 0


def multi_part_attention(
    q: torch.Tensor,
    parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    scaling: float,
    want_sums: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Softmax attention of ``q [*, G, Tq, D]`` over the union of several key/value parts.

    Each part is ``(k [*, L, D], v [*, L, Dv], allowed)`` with ``allowed`` broadcastable to
    ``[*, Tq, L]`` (None: all allowed), optionally with a fourth element: the queries to use for that
    part (the same rows, fewer channels: keys stored with pruned channels). One softmax spans all
    parts, so the result equals attention over the concatenated keys without building that
    concatenation. Query rows are processed in blocks so one block's scores stay small. Rows with
    no allowed key give zeros.

    Returns:
        ``out [*, G, Tq, Dv]`` and, if ``want_sums``, per part the attention each key received,
        summed over G and Tq: ``[*, L]``.
    """
    tq = q.shape[-2]
    parts = [(*p, q) if len(p) == 3 else tuple(p) for p in parts]
    sums = [p[0].new_zeros(p[0].shape[:-1], dtype=torch.float32) for p in parts] if want_sums else None
    nonempty = [i for i, p in enumerate(parts) if p[0].shape[-2] > 0]
    parts = [parts[i] for i in nonempty]
    total = sum(p[0].shape[-2] for p in parts) * q.shape[-3]
    block = max(1, _BLOCK_ELEMENTS // max(1, total))
    outs = []
    acc_dtype = torch.promote_types(q.dtype, torch.float32)  # softmax in at least float32
    for r0 in range(0, tq, block):
        scores = []
        for k, _, allowed, qp in parts:
            qb = qp[..., r0 : r0 + block, :]
            s = torch.matmul(qb, k.unsqueeze(-3).transpose(-1, -2)).to(acc_dtype) * scaling
            if allowed is not None:
                s = s.masked_fill(~allowed[..., r0 : r0 + block, :].unsqueeze(-3), -math.inf)
            scores.append(s)
        m = torch.stack([s.amax(dim=-1) for s in scores]).amax(dim=0, keepdim=False).unsqueeze(-1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        probs = [torch.exp(s - m) for s in scores]
        den = sum(p.sum(dim=-1, keepdim=True) for p in probs).clamp_min(torch.finfo(acc_dtype).tiny)
        out = None
        for p, (_, v, _, _) in zip(probs, parts, strict=True):
            o = torch.matmul((p / den).to(v.dtype), v.unsqueeze(-3))
            out = o if out is None else out + o
        outs.append(out)
        if want_sums:
            for i, p in zip(nonempty, probs, strict=True):
                sums[i] += (p / den).sum(dim=(-3, -2))
    return torch.cat(outs, dim=-2), sums


def _empty_tail(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:2], 0, x.shape[-1]))


class CompressedLayer(CacheLayerMixin):
    """One decoder layer's compressed cache (see the module docstring)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(
        self,
        *,
        layer_idx: int,
        num_layers: int,
        policy: Policy | None,
        budget: Budget | None,
        evict_every: int = 32,
        query_window: int | None = None,
        track_attention: bool | None = None,
        quant: str | None = None,
    ) -> None:
        super().__init__()
        self.quant = check_quant(quant)
        # ThinK: fraction of key channels the packed keys keep (channel set per head, fixed once chosen)
        self.key_channels = getattr(policy, "key_channels", None)
        self.kchan = None
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.policy = policy
        self.budget = budget if policy is not None else None
        self.evict_every = evict_every
        active = self.budget is not None
        self.query_window = query_window if query_window is not None else (policy.window if active else 0)
        # per-token statistics kept beside the cache (attention received, hits); all of them when asked
        # to track (a capture for compress_now later), else what the policy scores with
        if track_attention is not None:
            self.stat_names = TOKEN_STATS if track_attention else ()
        else:
            self.stat_names = policy.token_stats if active else ()
        self.track_attention = bool(self.stat_names)
        self.seen = 0
        self.seen_at_compression = 0
        self.compressions = 0
        self.scaling: float | None = None
        self.pk = self.pv = self.ppos = self.plen = None
        self.pstats: dict[str, torch.Tensor] = {}
        self.tstats: dict[str, torch.Tensor] = {}
        self.qwin = None
        self.kgroup = self.kscale = self.kzero = self.vscale = self.vzero = None
        self.comp_k = self.comp_v = self.comp_n = None

    # --- the CacheLayerMixin interface ---------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = _empty_tail(key_states)
        self.values = _empty_tail(value_states)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if getattr(_HANDOFF, "layer", None) is not None:
            raise RuntimeError(
                "CompressedCache: the model's attention did not go through subquad.kv; build the cache with "
                "CompressedCache(model, ...) or use `with subquad.kv.compress(model, ...)`, which install it"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        if self.stat_names:
            t = key_states.shape[-2]
            positions = torch.arange(self.seen - t, self.seen, device=key_states.device)
            fresh = init_stats(self.stat_names, positions.expand(*key_states.shape[:2], t))
            old = self.tstats
            self.tstats = {n: torch.cat([old[n], v], -1) if old else v for n, v in fresh.items()}
        _HANDOFF.layer = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks stay in original-position coordinates: column j is the token seen at position j
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.pk = self.pv = self.ppos = self.plen = None
        self.pstats, self.tstats, self.qwin = {}, {}, None
        self.kgroup = self.kscale = self.kzero = self.vscale = self.vzero = None
        self.comp_k = self.comp_v = self.comp_n = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row r of the cache becomes old row ``beam_idx[r]``."""
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_rows(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(indices)

    def _select_rows(self, idx: torch.Tensor) -> None:
        """Keep batch rows ``idx`` (repeats allowed, any order) of everything held: the dense tail and
        per-row state by indexing, the packed tokens by gathering each selected (row, head) segment."""
        if not self.is_initialized:
            return
        dev = self.keys.device
        idx = torch.as_tensor(idx, device=dev).long()
        h = self.keys.shape[1]
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        self.tstats = {n: t.index_select(0, idx) for n, t in self.tstats.items()}
        for name in ("qwin", "comp_k", "comp_v", "comp_n", "kchan"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx.to(t.device)))
        if self.pk is None:
            return
        lens = self.plen.flatten().to(dev)
        starts = torch.cumsum(lens, 0) - lens
        seg = (idx.unsqueeze(1) * h + torch.arange(h, device=dev)).flatten()  # old (row, head) segments
        new_len = lens[seg]
        first = torch.cumsum(new_len, 0) - new_len
        tok = torch.repeat_interleave(starts[seg] - first, new_len) + torch.arange(
            int(new_len.sum()), device=dev
        )
        for name in ("pk", "pv", "ppos", "kgroup", "vscale", "vzero"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t[tok.to(t.device)])
        self.pstats = {n: t[tok.to(t.device)] for n, t in self.pstats.items()}
        self.plen = self.plen[idx.to(self.plen.device)]

    # --- sizes ---------------------------------------------------------------------------------

    def held_tokens(self) -> torch.Tensor:
        """Tokens held per ``[B, H]``."""
        if not self.is_initialized:
            return torch.zeros(0, 0, dtype=torch.long)
        tail = self.keys.shape[-2]
        if self.plen is None:
            return torch.full(self.keys.shape[:2], tail, dtype=torch.long)
        return self.plen + tail

    def kv_bytes(self) -> int:
        """Bytes of the tensors that hold keys and values (with their positions and lengths)."""
        ts = [self.keys, self.values, self.pk, self.pv, self.ppos, self.plen]
        ts += [self.kgroup, self.kscale, self.kzero, self.vscale, self.vzero]
        ts += [self.comp_k, self.comp_v, self.comp_n, self.kchan]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def state_bytes(self) -> int:
        """Bytes the policy keeps beside the cache (recent queries, accumulated attention)."""
        ts = [self.qwin, *self.pstats.values(), *self.tstats.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # --- attention -----------------------------------------------------------------------------

    def _uniform(self) -> int | None:
        lengths = self.plen.unique()
        return int(lengths[0]) if lengths.numel() == 1 else None

    def attend(self, q: torch.Tensor, mask: torch.Tensor | None, scaling: float, delegate) -> torch.Tensor:
        """Attention output ``[B, Tq, Hq, Dv]`` of ``q [B, Hq, Tq, D]`` over everything held."""
        tq = q.shape[-2]
        self.scaling = scaling
        own = self.pk is not None or self.track_attention
        out = self._attend(q, mask, scaling) if own else delegate()
        if self.query_window:
            qw = q if self.qwin is None else torch.cat([self.qwin, q], dim=-2)
            self.qwin = qw[:, :, -self.query_window :].clone()
        if self.budget is not None and self._due(tq):
            self.compress(mask, chunk_queries=q)
        elif (
            self.budget is None
            and (self.quant or self.key_channels)
            and ((self.key_channels and tq > 1) or self.keys.shape[-2] >= self.evict_every)
        ):
            # keep every token; quantized: once `evict_every` tokens wait in the full-precision tail
            self.compress(mask, chunk_queries=q)
        return out

    def _attend(self, q: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        b, hq, tq, d = q.shape
        h = self.keys.shape[1]
        qg = q.reshape(b, h, hq // h, tq, d)
        allowed = allowed_from_mask(mask)
        if allowed is not None and allowed.shape[0] != b:
            allowed = allowed.expand(b, *allowed.shape[1:])
        seen, tail = self.seen, self.keys.shape[-2]
        if allowed is not None:
            allow_t = allowed[:, :, :, seen - tail : seen]
        else:
            qpos = torch.arange(seen - tq, seen, device=q.device)
            tpos = torch.arange(seen - tail, seen, device=q.device)
            allow_t = (tpos[None, :] <= qpos[:, None])[None, None]
        track = self.track_attention
        share = (hq // h) * tq  # attention mass of this forward per KV head, spread over its keys
        if self.pk is None:
            out, sums = multi_part_attention(qg, [(self.keys, self.values, allow_t)], scaling, track)
            if track:
                observe_stats(self.tstats, sums[0], seen - 1, share / tail)
        elif (lp := self._uniform()) is not None:
            pk, pv = self._packed_kv()
            kp = pk.view(b, h, lp, -1)
            vp = pv.view(b, h, lp, -1)
            allow_p = None
            if allowed is not None:
                pos = self.ppos.long().view(b, 1, h * lp).expand(b, tq, h * lp)
                allow_p = allowed[:, 0].gather(-1, pos).view(b, tq, h, lp).transpose(1, 2)
            packed = (kp, vp, allow_p)
            if self.kchan is not None:  # keys stored with their kept channels only
                idx = self.kchan[:, :, None, None, :].expand(b, h, hq // h, tq, self.kchan.shape[-1])
                packed = (kp, vp, allow_p, qg.gather(-1, idx))
            parts = [packed, (self.keys, self.values, allow_t), *self._compensation_part(tq)]
            out, sums = multi_part_attention(qg, parts, scaling, track)
            if track:
                n = lp + tail
                packed = {k: v.view(b, h, lp) for k, v in self.pstats.items()}
                observe_stats(packed, sums[0], seen - 1, share / n)
                observe_stats(self.tstats, sums[1], seen - 1, share / n)
        else:
            out = q.new_empty(b, h, hq // h, tq, self.values.shape[-1])
            pk, pv = self._packed_kv()
            starts = torch.cumsum(self.plen.flatten(), 0) - self.plen.flatten()
            for bi in range(b):
                for hi in range(h):
                    s0 = int(starts[bi * h + hi])
                    s1 = s0 + int(self.plen[bi, hi])
                    allow_p = None
                    if allowed is not None:
                        allow_p = allowed[bi, 0][:, self.ppos[s0:s1].long()]
                    at = allow_t[bi if allow_t.shape[0] > 1 else 0, 0]
                    parts = [
                        (pk[s0:s1], pv[s0:s1], allow_p)
                        if self.kchan is None
                        else (pk[s0:s1], pv[s0:s1], allow_p, qg[bi, hi][..., self.kchan[bi, hi]]),
                        (self.keys[bi, hi], self.values[bi, hi], at),
                        *self._compensation_part(tq, bi, hi),
                    ]
                    out[bi, hi], sums = multi_part_attention(qg[bi, hi], parts, scaling, track)
                    if track:
                        n = s1 - s0 + tail
                        packed = {k: v[s0:s1] for k, v in self.pstats.items()}
                        recent = {k: v[bi, hi] for k, v in self.tstats.items()}
                        observe_stats(packed, sums[0], seen - 1, share / n)
                        observe_stats(recent, sums[1], seen - 1, share / n)
        return out.reshape(b, hq, tq, -1).transpose(1, 2)

    # --- compression ---------------------------------------------------------------------------

    def _targets(self) -> int:
        target = self.budget.target(self.seen)
        return self.policy.layer_target(target, self.layer_idx, self.num_layers, self.seen)

    def _due(self, tq: int) -> bool:
        # after a multi-token forward (prefill, a prefill chunk) compress at once; while decoding, once
        # every `evict_every` tokens, so a head never holds more than its budget + evict_every
        if int(self.held_tokens().max()) <= self._targets():
            return False
        return tq > 1 or self.seen - self.seen_at_compression >= self.evict_every

    def _compensation_part(self, tq: int, bi: int | None = None, hi: int | None = None) -> list:
        """The compensation token of each head (mean key and value of what it evicted) as one more
        attention part; empty until a compensating policy has evicted something."""
        if self.comp_n is None:
            return []
        k, v = self.comp_k.unsqueeze(-2), self.comp_v.unsqueeze(-2)
        has = (self.comp_n > 0)[..., None, None].expand(*self.comp_n.shape, tq, 1)
        if bi is not None:
            return [(k[bi, hi], v[bi, hi], has[bi, hi])]
        return [(k, v, has)]

    def _packed_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed keys and values ``[N, D]`` in the model's dtype (dequantized when quantized)."""
        if not self.quant:
            return self.pk, self.pv
        dtype, bits = self.keys.dtype, BITS[self.quant]
        k = dequantize_rows(self.pk, self.kscale[self.kgroup], self.kzero[self.kgroup], bits, dtype)
        v = dequantize_rows(self.pv, self.vscale[:, None], self.vzero[:, None], bits, dtype)
        return k, v

    def _candidates(self):
        """Everything held as a padded ``[B, H, L, *]`` view (packed segments first, then the tail) and the
        function that pads any per-token packed tensor the same way."""
        b, h, tail = self.keys.shape[:3]
        dev = self.keys.device
        tpos = torch.arange(self.seen - tail, self.seen, device=dev).expand(b, h, tail)
        if self.pk is None:
            exists = torch.ones(b, h, tail, dtype=torch.bool, device=dev)
            return self.keys, self.values, tpos, exists, dict(self.tstats), None
        lmax = int(self.plen.max())
        seg = torch.repeat_interleave(torch.arange(b * h, device=dev), self.plen.flatten().to(dev))
        starts = torch.cumsum(self.plen.flatten(), 0).to(dev) - self.plen.flatten().to(dev)
        dest = seg * lmax + (torch.arange(seg.numel(), device=dev) - starts[seg])

        def pad(flat: torch.Tensor, fill) -> torch.Tensor:
            out = flat.new_full((b * h * lmax, *flat.shape[1:]), fill)
            out[dest] = flat
            return out.view(b, h, lmax, *flat.shape[1:])

        pk, pv = self._packed_kv()
        if self.kchan is not None:  # pruned channels read as zeros, as attention sees them
            full = pk.new_zeros(pk.shape[0], self.keys.shape[-1])
            pk = full.scatter_(1, self.kchan.reshape(b * h, -1)[seg], pk)
        keys = torch.cat([pad(pk, 0), self.keys], dim=2)
        values = torch.cat([pad(pv, 0), self.values], dim=2)
        pos = torch.cat([pad(self.ppos.long(), -1), tpos], dim=2)
        exists = pos >= 0
        stats = {n: torch.cat([pad(self.pstats[n], 0.0), t], dim=2) for n, t in self.tstats.items()}
        return keys, values, pos, exists, stats, pad

    def compress(
        self,
        mask: torch.Tensor | None = None,
        chunk_queries: torch.Tensor | None = None,
        scaling: float | None = None,
    ) -> None:
        """Score everything held with the policy and keep the top tokens of each head (without a
        budget, keep everything: this moves the tail into the quantized store)."""
        if self.budget is None and not (self.quant or self.key_channels):
            raise ValueError("CompressedLayer.compress needs a policy and a budget (or quant)")
        keys, values, pos, exists, stats, pad = self._candidates()
        if self.budget is None:
            keep = exists
        else:
            keep, real = self._select(keys, values, pos, exists, stats, mask, chunk_queries, scaling)
            if getattr(self.policy, "compensate", False):
                self._compensate(keys, values, real & ~keep)
        if self.quant:
            if self.key_channels is not None and self.kchan is None:
                self._choose_channels(keys, chunk_queries)
            self._store_quantized(keep, pad)
        else:
            self.pk = (
                keys[keep] if self.key_channels is None else self._pruned_keys(keys, keep, chunk_queries)
            )
            self.pv = values[keep]
        self.ppos = pos[keep].to(torch.int32)
        self.plen = keep.sum(-1).cpu()
        self.pstats = {n: v[keep] for n, v in stats.items()}
        # fresh empty tensors, not zero-length views that would keep the old tail's memory alive
        self.keys = _empty_tail(self.keys)
        self.values = _empty_tail(self.values)
        self.tstats = {n: v.new_empty((*v.shape[:2], 0)) for n, v in self.tstats.items()}
        self.compressions += 1
        self.seen_at_compression = self.seen

    def _choose_channels(self, keys: torch.Tensor, chunk_queries) -> None:
        """Fix each head's kept key channels (ThinK, Xu et al. 2024, https://arxiv.org/abs/2407.21018):
        channel ``c`` of a head scores ``|Q_w[:, c]| |K[:, c]|``, the norms of the recent queries of its
        query heads and of its held keys ``keys [B, H, L, D]``; the top ``key_channels`` fraction is
        kept (an even count with int4, whose codes pack two channels per byte), chosen at the first
        compression and fixed after (pruned keys cannot regain channels)."""
        b, h, _, d = keys.shape
        queries = self.qwin if self.query_window else chunk_queries
        if queries is None:
            raise ValueError("ThinK needs queries to rank key channels (run a forward first)")
        window = getattr(self.policy, "observation", queries.shape[-2])
        q = queries[:, :, -window:].float()
        q_norm = q.reshape(b, h, -1, d).norm(dim=2)  # over the group's heads and window rows
        k_norm = keys.float().norm(dim=2)
        n_keep = max(1, math.ceil(self.key_channels * d))
        if self.quant == "int4":
            n_keep = min(d, n_keep + n_keep % 2)
        self.kchan = (q_norm * k_norm).topk(n_keep, dim=-1).indices.sort(dim=-1).values

    def _pruned_keys(self, keys: torch.Tensor, keep: torch.Tensor, chunk_queries) -> torch.Tensor:
        """Kept keys ``[N, Dk]`` with only their head's kept channels (see ``_choose_channels``)."""
        if self.kchan is None:
            self._choose_channels(keys, chunk_queries)
        rows = keep.nonzero()
        seg_channels = self.kchan[rows[:, 0], rows[:, 1]]  # [N, Dk]
        return keys[keep].gather(1, seg_channels)

    def _compensate(self, keys: torch.Tensor, values: torch.Tensor, evicted: torch.Tensor) -> None:
        """Fold the evicted real tokens into each head's compensation token (a running mean)."""
        n = evicted.sum(-1).to(torch.float32)  # [B, H]
        w = evicted.unsqueeze(-1).to(keys.dtype)
        k_sum, v_sum = (keys * w).sum(2).float(), (values * w).sum(2).float()
        if self.comp_n is None:
            self.comp_n = torch.zeros_like(n)
            self.comp_k = torch.zeros_like(k_sum)
            self.comp_v = torch.zeros_like(v_sum)
        total = self.comp_n + n
        denom = total.clamp_min(1).unsqueeze(-1)
        comp_k = (self.comp_k.float() * self.comp_n.unsqueeze(-1) + k_sum) / denom
        comp_v = (self.comp_v.float() * self.comp_n.unsqueeze(-1) + v_sum) / denom
        self.comp_k, self.comp_v, self.comp_n = comp_k.to(keys.dtype), comp_v.to(values.dtype), total

    def _select(self, keys, values, pos, exists, stats, mask, chunk_queries, scaling):
        """The policy's choice ``keep [B, H, L]`` over the candidate view, and which candidates are real."""
        b, h, n = pos.shape
        allowed = allowed_from_mask(mask)
        if allowed is not None:
            real_cols = allowed[:, 0, -1, : self.seen].expand(b, -1)
        else:
            real_cols = torch.ones(b, self.seen, dtype=torch.bool, device=pos.device)
        flat_pos = pos.clamp_min(0).view(b, h * n)
        real = real_cols.gather(1, flat_pos).view(b, h, n) & exists
        rank = (torch.cumsum(real_cols.long(), dim=1) - 1).gather(1, flat_pos).view(b, h, n)
        queries = self.qwin if self.query_window else chunk_queries
        if queries is None:  # the policy needs no queries
            queries = keys.new_zeros(b, h, 0, keys.shape[-1])
        nq = queries.shape[-2]
        ctx = ScoreContext(
            keys=keys,
            values=values,
            positions=pos,
            valid=real,
            rank=rank,
            queries=queries,
            query_positions=torch.arange(self.seen - nq, self.seen, device=pos.device),
            stats=stats,
            scaling=scaling if scaling is not None else self.scaling,
            layer_idx=self.layer_idx,
            num_layers=self.num_layers,
            seen=self.seen,
            target=self._targets(),
        )
        per_head = self.policy.head_targets(ctx)
        want = torch.full((h,), ctx.target, dtype=torch.long) if per_head is None else per_head.long().cpu()
        keep_n = torch.minimum(want.view(1, h).expand(b, h), exists.sum(-1).cpu())
        scores = self.policy.score(ctx).float()
        if scores.shape != pos.shape:
            shape = tuple(pos.shape)
            raise ValueError(f"policy {self.policy.name}: scores {tuple(scores.shape)}, expected {shape}")
        # pad tokens of the batch go first, the padding of the ragged view never stays
        scores = torch.where(real, scores, torch.full_like(scores, -3e38))
        scores = scores.masked_fill(~exists, -math.inf)
        # ties (e.g. several always-kept tokens beyond the budget) go to the most recent token
        by_pos = pos.argsort(dim=-1, descending=True, stable=True)
        order = by_pos.gather(-1, scores.gather(-1, by_pos).argsort(dim=-1, descending=True, stable=True))
        arange = torch.arange(n, device=pos.device).expand(b, h, n)
        ranks = torch.empty_like(order).scatter_(-1, order, arange)
        return ranks < keep_n.to(ranks.device).unsqueeze(-1), real

    def _store_quantized(self, keep: torch.Tensor, pad) -> None:
        """Kept packed tokens keep their codes; kept tail tokens are quantized, one key group per head."""
        bits = BITS[self.quant]
        b, h, tail = self.keys.shape[:3]
        old_groups = 0 if self.kscale is None else self.kscale.shape[0]
        parts_k, parts_g, parts_v, parts_vs, parts_vz = [], [], [], [], []
        scales, zeros = [], []
        if self.pk is not None:
            parts_k.append(pad(self.pk, 0))
            parts_g.append(pad(self.kgroup, 0))
            parts_v.append(pad(self.pv, 0))
            parts_vs.append(pad(self.vscale, 0))
            parts_vz.append(pad(self.vzero, 0))
            scales.append(self.kscale)
            zeros.append(self.kzero)
        if tail:
            tk = self.keys
            if self.kchan is not None:  # ThinK: only the head's kept channels are quantized and stored
                tk = tk.gather(3, self.kchan.unsqueeze(2).expand(b, h, tail, -1))
            kc, ks, kz = quantize(tk, dim=2, bits=bits)  # per channel over the head's tail tokens
            vc, vs, vz = quantize(self.values, dim=3, bits=bits)  # per token
            group = torch.arange(old_groups, old_groups + b * h, device=kc.device, dtype=torch.int32)
            parts_k.append(kc)
            parts_g.append(group.view(b, h, 1).expand(b, h, tail))
            parts_v.append(vc)
            parts_vs.append(vs)
            parts_vz.append(vz)
            scales.append(ks.reshape(b * h, -1))
            zeros.append(kz.reshape(b * h, -1))
        self.pk = torch.cat(parts_k, dim=2)[keep]
        self.pv = torch.cat(parts_v, dim=2)[keep]
        self.vscale = torch.cat(parts_vs, dim=2)[keep]
        self.vzero = torch.cat(parts_vz, dim=2)[keep]
        groups = torch.cat(parts_g, dim=2)[keep]
        used, self.kgroup = torch.unique(groups, return_inverse=True)  # drop groups nobody uses any more
        self.kgroup = self.kgroup.to(torch.int32)
        self.kscale = torch.cat(scales)[used]
        self.kzero = torch.cat(zeros)[used]


class CompressedCache(Cache):
    """A ``transformers`` cache that stores only what an eviction policy keeps.

    Pass it to ``model(...)`` or ``model.generate(cache=cache)``. Building it with a model
    installs subquad's attention implementation on that model (see :func:`subquad.kv.attention.install`).

    Args:
        model: the causal LM (or pass ``num_layers`` and install yourself).
        policy: a :class:`~subquad.kv.policies.Policy` or its name (``snapkv``, ``h2o``, ...). None keeps all.
        budget: kept fraction (float) or kept tokens (int); or ``ratio`` (fraction removed) or ``tokens``.
            Any of them may be a per-layer list.
        evict_every: while decoding, compress once a head holds this many tokens above its budget, so the
            cache stays within ``budget + evict_every`` tokens per head.
        query_window, track_attention: keep this many recent query rows / accumulate attention even when
            the policy does not need them (for :meth:`compress_now` after an uncompressed prefill).
        quant: ``"int8"`` or ``"int4"`` stores the packed keys (per channel) and values (per token) as
            integers; composes with any policy, or alone (then every ``evict_every`` new tokens move from
            the full-precision tail into the quantized store).
    """

    def __init__(
        self,
        model=None,
        policy: Policy | str | None = None,
        *,
        budget=None,
        ratio=None,
        tokens=None,
        evict_every: int = 32,
        num_layers: int | None = None,
        query_window: int | None = None,
        track_attention: bool | None = None,
        quant: str | None = None,
        **policy_kwargs,
    ) -> None:
        if model is not None:
            from subquad.kv.attention import install

            num_layers = install(model)
        if num_layers is None:
            raise ValueError("CompressedCache: pass the model (or num_layers after installing the attention)")
        if isinstance(evict_every, bool) or not isinstance(evict_every, int) or evict_every < 1:
            raise ValueError(f"CompressedCache: evict_every must be a positive int, got {evict_every!r}")
        self.policy = make_policy(policy, **policy_kwargs) if policy is not None else None
        budgets = resolve_budgets(num_layers, budget=budget, ratio=ratio, tokens=tokens)
        if self.policy is None and any(bd is not None for bd in budgets):
            raise ValueError("CompressedCache: a budget needs a policy (e.g. policy='snapkv')")
        layers = [
            CompressedLayer(
                layer_idx=i,
                num_layers=num_layers,
                policy=self.policy,
                budget=budgets[i],
                evict_every=evict_every,
                query_window=query_window,
                track_attention=track_attention,
                quant=quant,
            )
            for i in range(num_layers)
        ]
        super().__init__(layers=layers)

    def kv_bytes(self) -> int:
        """Bytes of every tensor that holds keys and values (positions and lengths included)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def state_bytes(self) -> int:
        """Bytes the policy keeps beside the keys and values."""
        return sum(layer.state_bytes() for layer in self.layers)

    def held_tokens(self) -> torch.Tensor:
        """Tokens held ``[layers, B, H]``."""
        return torch.stack([layer.held_tokens() for layer in self.layers])

    def compress_now(
        self,
        policy: Policy | str | None,
        *,
        budget=None,
        ratio=None,
        tokens=None,
        quant: str | None = None,
        **policy_kwargs,
    ) -> None:
        """Compress every layer now with ``policy`` (using the queries kept by ``query_window``) and, with
        ``quant``, quantize what is kept (``policy=None`` with ``quant``: quantize everything).

        Token budgets above the tokens held are an error here: there is nothing to compress to.
        """
        check_quant(quant)
        if policy is None:
            if quant is None:
                raise ValueError("compress_now: give a policy, a quant, or both")
            for layer in self.layers:
                self._set_quant(layer, quant)
                layer.policy = layer.budget = None
                layer.compress()
            return
        policy = make_policy(policy, **policy_kwargs)
        budgets = resolve_budgets(len(self.layers), budget=budget, ratio=ratio, tokens=tokens)
        for layer, bd in zip(self.layers, budgets, strict=True):
            self._set_quant(layer, quant)
            if bd is not None and bd.tokens is not None and bd.tokens > layer.seen:
                raise ValueError(
                    f"compress_now: tokens={bd.tokens} is above the {layer.seen} tokens in the cache (layer "
                    f"{layer.layer_idx})"
                )
            if not set(policy.token_stats) <= set(layer.stat_names):
                raise ValueError(f"{policy.name} needs token statistics: build with track_attention=True")
            if policy.window and (layer.qwin is None or layer.qwin.shape[-2] < policy.window):
                raise ValueError(
                    f"policy {policy.name} needs the last {policy.window} queries: build the cache with "
                    f"query_window >= {policy.window}"
                )
            layer.policy, layer.budget = policy, bd
            if bd is not None and int(layer.held_tokens().max()) > layer._targets():
                layer.compress(scaling=layer.scaling)
            elif layer.quant:
                layer.policy, layer.budget = None, None
                layer.compress()
                layer.policy, layer.budget = policy, bd

    @staticmethod
    def _set_quant(layer: CompressedLayer, quant: str | None) -> None:
        if not layer.is_initialized:
            raise ValueError("compress_now: the cache is empty; run the prompt through the model first")
        if quant is not None and quant != layer.quant:
            if layer.pk is not None:
                raise ValueError(f"compress_now: layer {layer.layer_idx} is already stored as {layer.quant}")
            layer.quant = quant
