"""Packed variable-length sequences (``cu_seqlens``), written once for every op.

Shape legend: T packed time, N sequences, L longest sequence, H heads, D any trailing dims.

Fast modes run on a padded batch: each packed sequence is copied into its own row of an
``[N, L, ...]`` tensor, right-padded with zeros. Zero is the identity transition of every op in
the registry (``k = v = 0`` adds nothing to the state, a log-gate of 0 decays nothing, ``beta = 0``
writes nothing), so padding changes neither the outputs of real tokens nor the final states.
"""

from __future__ import annotations

import itertools

import torch


def seq_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each packed sequence."""
    offsets = cu_seqlens.tolist()
    return list(itertools.pairwise(offsets))


def pad_packed(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[1, T, ...]`` packed -> ``[N, L, ...]`` zero right-padded (differentiable)."""
    bounds = seq_bounds(cu_seqlens)
    longest = max(e - s for s, e in bounds)
    rows = []
    for s, e in bounds:
        row = x[0, s:e]
        if e - s < longest:
            # 1. zero rows after the sequence's end: the identity transition of every op
            pad = row.new_zeros((longest - (e - s), *row.shape[1:]))
            row = torch.cat([row, pad], 0)
        rows.append(row)
    return torch.stack(rows, 0)


def unpad_packed(y: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[N, L, ...]`` padded -> ``[1, T, ...]`` packed, dropping the padding (differentiable)."""
    bounds = seq_bounds(cu_seqlens)
    return torch.cat([y[i, : e - s] for i, (s, e) in enumerate(bounds)], 0).unsqueeze(0)


def run_padded(kernel, time_inputs: dict, cu_seqlens: torch.Tensor | None, **kwargs):
    """Call ``kernel(**time_inputs, **kwargs) -> (o, state)`` on a padded batch when packed.

    ``time_inputs`` are ``[B, T, H, ...]`` tensors (or None); with ``cu_seqlens`` they are padded to
    ``[N, L, H, ...]`` and the output is packed back to ``[1, T, H, V]``. ``kwargs`` pass unchanged.
    """
    if cu_seqlens is None:
        return kernel(**time_inputs, **kwargs)
    padded = {n: (None if t is None else pad_packed(t, cu_seqlens)) for n, t in time_inputs.items()}
    o, state = kernel(**padded, **kwargs)
    return unpad_packed(o, cu_seqlens), state


def per_sequence(run, cu_seqlens: torch.Tensor | None, *time_inputs: torch.Tensor):
    """``run(*time_inputs)`` once, or with ``cu_seqlens`` once per packed sequence (each input split
    along T) with the outputs joined along T again; ``run`` returns a tensor or a tuple of them.
    For ops that padding would change (softmax attention: a zero key still scores 0)."""
    if cu_seqlens is None:
        return run(*time_inputs)
    sizes = [e - s for s, e in seq_bounds(cu_seqlens)]
    outs = [run(*p) for p in zip(*(x.split(sizes, 1) for x in time_inputs), strict=True)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, 1) for parts in zip(*outs, strict=True))
    return torch.cat(outs, 1)
