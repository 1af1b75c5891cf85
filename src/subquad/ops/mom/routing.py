"""Routing and token gathering for Mixture-of-Memories, shared by its chunk and recurrent modes.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences, R routed memories,
M memories held in the state (R, plus one when a shared memory is used), P = B * T tokens,
L the longest token list of any (sequence, memory) pair.

Each memory only sees the tokens routed to it, in their order. So the fast modes gather, for every
(sequence, memory) pair, the tokens routed there into one right-padded row of a ``[N * M, L, ...]``
batch, run the base op once on that batch (padding rows are zeros: the identity transition of every
base op), and scatter each row's outputs back to their tokens, weighted by the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def router_weights(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the R memories, keep the top ``top_k``, renormalize them to sum to 1.

    Returns ``(weights [..., top_k], indices [..., top_k])``.
    """
    probs = torch.softmax(router_logits, dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    return top / top.sum(-1, keepdim=True), idx


@dataclass(frozen=True)
class Routing:
    """Where every (token, memory) pair lands in the padded per-memory batch.

    Attributes:
        rows, L: the padded batch is ``[rows = N * M, L]``.
        token: ``[S]`` token index (into the P flattened tokens) of each selected pair.
        pair: ``[S]`` index into the flattened ``[P * M]`` per-memory inputs of each selected pair.
        slot: ``[S]`` position ``row * L + col`` of each selected pair in the padded batch.
        weight: ``[S]`` the router weight of each selected pair (1 for the shared memory).
    """

    rows: int
    L: int
    token: torch.Tensor
    pair: torch.Tensor
    slot: torch.Tensor
    weight: torch.Tensor


def route(
    router_logits: torch.Tensor,
    top_k: int,
    shared_memory: bool,
    seq_starts: torch.Tensor,
    seq_id: torch.Tensor,
    weight_dtype: torch.dtype,
) -> Routing:
    """Plan the gather for ``router_logits [P, R]`` of P tokens in sequences ``seq_id [P]``
    starting at ``seq_starts [N]`` (token indices)."""
    P, R = router_logits.shape
    M = R + int(shared_memory)
    N = seq_starts.numel()
    device = router_logits.device
    # 1. the selection as a dense [P, M] mask and weight table
    w_top, idx = router_weights(router_logits.to(weight_dtype), top_k)
    weight = torch.zeros(P, M, dtype=weight_dtype, device=device).scatter(1, idx, w_top)
    # the mask comes from the indices, not from weight != 0: a weight can underflow to 0
    selected = torch.zeros(P, M, dtype=torch.bool, device=device).scatter_(1, idx, True)
    if shared_memory:
        selected[:, R] = True
        weight = weight.clone()
        weight[:, R] = 1.0
    # 2. each pair's rank among the tokens its memory sees in its sequence
    counts = selected.to(torch.int64)
    before = counts.cumsum(0) - counts  # [P, M] exclusive prefix count over all tokens
    rank = before - before[seq_starts][seq_id]  # restart the count at every sequence
    lengths = counts.new_zeros(N, M).index_add_(0, seq_id, counts)  # [N, M] tokens per memory row
    L = max(int(lengths.max()), 1)
    # 3. flat positions of the selected pairs (token-major order)
    tok, mem = selected.nonzero(as_tuple=True)
    row = seq_id[tok] * M + mem
    slot = row * L + rank[tok, mem]
    return Routing(rows=N * M, L=L, token=tok, pair=tok * M + mem, slot=slot, weight=weight[tok, mem])


def gather_rows(x: torch.Tensor, index: torch.Tensor, rows: int, L: int, slot: torch.Tensor) -> torch.Tensor:
    """``x [P', ...]`` -> ``[rows, L, ...]`` with ``x[index[i]]`` at flat position ``slot[i]``, zeros
    elsewhere (differentiable)."""
    # in place into a fresh zero buffer: autograd still reaches x, and no copy of the buffer is made
    out = x.new_zeros((rows * L, *x.shape[1:]))
    out.index_copy_(0, slot, x.index_select(0, index))
    return out.view(rows, L, *x.shape[1:])
