"""The loop every reference shares: over sequences (``cu_seqlens``) and tokens, one step at a time.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.varlen import seq_bounds


def reference_loop(
    step: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    tensors: dict[str, torch.Tensor],
    value_dim: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    state_shape: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``step(S, x_t) -> (S, o_t)`` over every token of every sequence.

    ``tensors`` are ``[B, T, H, ...]``; ``x_t`` holds their slices ``[H, ...]`` at one token,
    in the compute dtype (float64 for float64 inputs, else float32). ``S`` is one sequence's state
    (``[H, K, V]`` unless ``state_shape`` says otherwise), starting from ``initial_state[n]`` or zeros.
    """
    first = next(iter(tensors.values()))
    B, T, H = first.shape[:3]
    in_dtype = first.dtype
    cd = state_dtype(in_dtype)
    x = {name: t.to(cd) for name, t in tensors.items()}
    if state_shape is None:
        state_shape = (H, x["k"].shape[-1], value_dim)
    # 1. the sequences: whole rows, or the packed pieces of row 0
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = [(0, s, e) for s, e in seq_bounds(cu_seqlens)]
    outs, finals = [], []
    for n, (b, start, end) in enumerate(seqs):
        if initial_state is not None:
            S = initial_state[n].to(cd)
        else:
            S = torch.zeros(state_shape, dtype=cd, device=first.device)
        # 2. the recurrence, token by token
        for t in range(start, end):
            S, o = step(S, {name: val[b, t] for name, val in x.items()})
            outs.append(o)
        finals.append(S)
    o = torch.stack(outs, 0).reshape(B, T, *outs[0].shape).to(in_dtype)
    return o, (torch.stack(finals, 0) if output_final_state else None)
