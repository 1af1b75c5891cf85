"""What one mixer layer carries between calls when it decodes: short-conv tails, the op's recurrent
state, or a (windowed) key/value cache.

Shape legend: B batch, T time, S cached tokens, Hk key/value heads, K key dim, V value dim, W conv width.

A ``LayerCache`` is plain tensors, owned by the model's cache (``subquad.models.cache``), and
updated in place by the layer's ``forward(x, cache=...)``. Recurrent layers keep a fixed-size
state whatever the context; window attention keeps at most ``window - 1`` past tokens; full
attention keeps every token in a buffer that grows by doubling (so appending is amortized O(1)).
"""

from __future__ import annotations

import torch


class LayerCache:
    """Per-layer decoding state.

    Attributes:
        conv: short-convolution tails by name, each ``[B, W - 1, D]`` (the last inputs seen).
        state: the op's recurrent state (``[B, H, K, V]`` float32 for most ops), or None.
        seen_tokens: tokens this layer has processed so far (padding included).
    """

    def __init__(self) -> None:
        self.conv: dict[str, torch.Tensor] = {}
        self.state: torch.Tensor | None = None
        self.seen_tokens = 0
        self._k: torch.Tensor | None = None  # [B, capacity, Hk, K]
        self._v: torch.Tensor | None = None  # [B, capacity, Hk, V]
        self._start = 0  # live rows are [_start, _start + _kv_len)
        self._kv_len = 0

    # -- key/value cache (attention layers) ------------------------------------------------------

    @property
    def kv_len(self) -> int:
        """Number of cached key/value tokens."""
        return self._kv_len

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached ``[B, S, Hk, K]`` keys and ``[B, S, Hk, V]`` values (views), or None."""
        if self._k is None or self._kv_len == 0:
            return None
        rows = slice(self._start, self._start + self._kv_len)
        return self._k[:, rows], self._v[:, rows]

    def append_kv(self, k: torch.Tensor, v: torch.Tensor, keep_last: int | None = None) -> None:
        """Append ``[B, T, Hk, K]`` keys and values; keep only the last ``keep_last`` tokens if given.

        Rows are written into a preallocated buffer. When it is full, the rows still needed move to
        its front, and the buffer doubles only when those rows fill more than half of it, so a token
        costs amortized O(1) copies; with ``keep_last`` the buffer holds ``1.25 * keep_last`` rows
        (at least 16 spare), so the window's memory stays bounded.
        """
        if keep_last is not None and keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        B, T = k.shape[:2]
        end = self._start + self._kv_len
        capacity = 0 if self._k is None else self._k.shape[1]
        if end + T > capacity:
            # 1. the rows that survive this append, moved to the front of a (possibly larger) buffer
            live = self._kv_len if keep_last is None else min(self._kv_len, max(keep_last - T, 0))
            want = live + T
            if keep_last is None:
                new_capacity = max(16, want, 2 * capacity if want > capacity // 2 else capacity)
            else:  # a quarter of slack: compaction every keep_last / 4 tokens, amortized O(1)
                new_capacity = max(want, keep_last + max(16, keep_last // 4), capacity)
            new_k = k.new_empty(B, new_capacity, *k.shape[2:])
            new_v = v.new_empty(B, new_capacity, *v.shape[2:])
            if live:
                new_k[:, :live] = self._k[:, end - live : end]
                new_v[:, :live] = self._v[:, end - live : end]
            self._k, self._v, self._start, self._kv_len = new_k, new_v, 0, live
            end = live
        # 2. write the new rows, then forget the ones that fell out of the window
        self._k[:, end : end + T] = k
        self._v[:, end : end + T] = v
        self._kv_len += T
        if keep_last is not None and self._kv_len > keep_last:
            self._start += self._kv_len - keep_last
            self._kv_len = keep_last

    # -- bookkeeping ---------------------------------------------------------------------------------

    def nbytes(self) -> int:
        """Bytes of tensors this cache holds (allocated buffers, not just the used part)."""
        tensors = [*self.conv.values(), self.state, self._k, self._v]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def used_bytes(self) -> int:
        """Bytes of the state and conv tails plus the used part of the key/value buffer."""
        total = sum(t.numel() * t.element_size() for t in self.conv.values())
        if self.state is not None:
            total += self.state.numel() * self.state.element_size()
        if self._k is not None:
            per_token = self._k[:, :1].numel() * self._k.element_size()
            per_token += self._v[:, :1].numel() * self._v.element_size()
            total += per_token * self._kv_len
        return total

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search / dropping finished sequences)."""
        self.conv = {name: t.index_select(0, index) for name, t in self.conv.items()}
        if self.state is not None:
            self.state = self.state.index_select(0, index)
        if self._k is not None:
            self._k = self._k.index_select(0, index)
            self._v = self._v.index_select(0, index)
