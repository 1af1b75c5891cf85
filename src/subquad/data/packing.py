"""Packing tokenized documents into fixed-length training windows with ``cu_seqlens``.

Shape legend: B windows per batch, T window length, N packed sequences.

Documents are tokenized, each followed by the end-of-text token, and concatenated into one stream
cut into non-overlapping windows of T tokens. A batch of B windows is one packed row ``[1, B * T]``
whose ``cu_seqlens`` cut at every document end and every window edge, so no token attends across
documents (or windows). The window order is a seeded permutation per epoch, a pure function of
(seed, window index): resuming at step s replays exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class TokenStream:
    """Documents' tokens in one stream, served as packed batches.

    Args:
        docs: token id lists, one per document.
        eos_id: appended after every document.
        seq_len: T, the window length.
    """

    def __init__(self, docs: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        flat: list[int] = []
        for doc in docs:
            flat.extend(doc)
            flat.append(eos_id)
        self.tokens = torch.tensor(flat, dtype=torch.long)
        self.eos_id, self.seq_len = eos_id, seq_len
        self.num_windows = len(flat) // seq_len
        if self.num_windows == 0:
            raise ValueError(f"{len(flat)} tokens are fewer than one window of seq_len={seq_len}")

    def __len__(self) -> int:
        return self.num_windows

    def window_ids(self, start: int, count: int, seed: int) -> list[int]:
        """Windows ``start .. start + count`` of the infinite seeded order (epoch after epoch)."""
        out, cache = [], {}
        for i in range(start, start + count):
            epoch, j = divmod(i, self.num_windows)
            if epoch not in cache:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                cache[epoch] = torch.randperm(self.num_windows, generator=gen)
            out.append(int(cache[epoch][j]))
        return out

    def batch(self, windows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids [1, B * T], cu_seqlens [N + 1])`` of the given windows, packed."""
        T = self.seq_len
        rows = torch.stack([self.tokens[w * T : (w + 1) * T] for w in windows])  # [B, T]
        flat = rows.reshape(1, -1)
        is_end = flat[0] == self.eos_id
        is_end[T - 1 :: T] = True  # window edges end a sequence too
        ends = torch.nonzero(is_end).flatten() + 1
        cu = torch.cat([torch.zeros(1, dtype=torch.long), ends])
        return flat, cu

    def eval_batches(
        self, max_tokens: int, windows_per_batch: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``max_tokens`` tokens (whole windows, in stream order) as packed batches."""
        n = max(1, min(self.num_windows, max_tokens // self.seq_len))
        ids = list(range(n))
        return [self.batch(ids[i : i + windows_per_batch]) for i in range(0, n, windows_per_batch)]


def unigram_cross_entropy(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """Nats per token of ``held_out`` under the add-one-smoothed unigram distribution of ``train``:
    the loss of a model that ignores context, the baseline a language model must beat."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[held_out].mean()) if held_out.numel() else math.nan
