"""Chunked (two-level) selective scan: batched over chunks, sequential only in short loops.

Shape legend: B batch, T time, D inner channels, N state size per channel, C chunk, n chunks per
segment, L segment length.

The S6 recurrence ``h_t = a_t * h_{t-1} + u_t`` (``a_t = exp(dt_t A)``, ``u_t = dt_t x_t B_t``,
all ``[D, N]``) is elementwise in (d, n) with a different decay per entry, so it has no matmul form
(unlike Mamba-2's scalar decay). It is still split in two levels so that no Python loop runs per
token:

1. per segment, ``a`` and ``u`` for every token at once;
2. intra-chunk scan from a zero state, ``hl_j = a_j * hl_{j-1} + u_j``: C steps, each batched over
   all n chunks of the segment;
3. the decay from each chunk's start, ``P_j = prod_{i <= j} a_i`` (a cumulative product);
4. inter-chunk pass: ``h_in(c+1) = P_C(c) * h_in(c) + hl_C(c)``: n steps;
5. every state ``h_j = hl_j + P_j * h_in`` and the read ``y_j = h_j C_j`` as one batched matmul.

Only products of factors in (0, 1] appear: no division by cumulative decays, so any decay
(dt * A down to -inf) is exact and cannot overflow. A segment holds about SCAN_SEGMENT_ELEMENTS
per [L, D, N] tensor so the working set stays in the caches.
"""

from __future__ import annotations

import torch

from subquad.ops._common.chunking import pad_time, records_grad, state_dtype

# elements of one [B, L, D, N] tensor per segment (4 MiB of float32; measured, see README)
SCAN_SEGMENT_ELEMENTS = 1 << 20


def chunk_selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    Bt, T, Dm = x.shape
    N = A.shape[1]
    cd = state_dtype(x.dtype)
    Cc = chunk_size
    grad = records_grad(x, dt, A, B, C, D, initial_state)
    h = initial_state.to(cd) if initial_state is not None else x.new_zeros(Bt, Dm, N, dtype=cd)
    A_ = A.to(cd)
    # 0. pad to whole chunks: dt = 0 is no decay and, with x = 0, no input
    u_in = pad_time(dt.to(cd) * x.to(cd), Cc)  # [B, Tp, D]
    dt_p, B_p, C_p = (pad_time(t.to(cd), Cc) for t in (dt, B, C))
    L = max(1, SCAN_SEGMENT_ELEMENTS // max(1, Bt * Cc * Dm * N)) * Cc
    ys = []
    # split once (slicing per segment would make backward O(T^2 / L))
    pieces = [t.split(L, 1) for t in (u_in, dt_p, B_p, C_p)]
    for u_s, dt_s, B_s, C_s in zip(*pieces, strict=True):
        Ls = u_s.shape[1]
        n = Ls // Cc
        # 1. decays and inputs of every token of the segment, [B, n, C, D, N]
        a = torch.exp(dt_s[..., None] * A_).view(Bt, n, Cc, Dm, N)
        u = (u_s[..., None] * B_s[:, :, None, :]).view(Bt, n, Cc, Dm, N)
        # 2. intra-chunk scan from zero, one step per position, batched over the chunks
        if grad:
            steps = [u[:, :, 0]]
            for j in range(1, Cc):
                steps.append(torch.addcmul(u[:, :, j], a[:, :, j], steps[-1]))
            hl = torch.stack(steps, 2)
        else:
            hl = u  # scanned in place: u is not needed afterwards
            for j in range(1, Cc):
                hl[:, :, j].addcmul_(a[:, :, j], hl[:, :, j - 1])
        # 3. decay from each chunk's start (inclusive), products of factors <= 1
        P = a.cumprod(2)
        # 4. inter-chunk pass: the state entering each chunk
        entering = []
        for c in range(n):
            entering.append(h)
            h = torch.addcmul(hl[:, c, -1], P[:, c, -1], h)
        h_in = torch.stack(entering, 1)  # [B, n, D, N]
        # 5. every state, and its read by C_t as one batched matmul
        full = torch.addcmul(hl, P, h_in[:, :, None])
        y = torch.bmm(full.reshape(Bt * Ls, Dm, N), C_s.reshape(Bt * Ls, N, 1))
        ys.append(y.view(Bt, Ls, Dm))
    y = torch.cat(ys, 1)[:, :T] if len(ys) > 1 else ys[0][:, :T]
    if D is not None:
        y = y + D.to(cd) * x.to(cd)
    return y.to(x.dtype), (h if output_final_state else None)
