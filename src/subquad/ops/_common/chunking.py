"""Helpers shared by the chunked forms.

Shape legend: B batch, T time, H heads, D head dim, C chunk, n chunks, L segment length.

The chunked forms walk the sequence in *segments* of a few chunks: all chunks of a segment are
handled by batched matmuls, and the state is carried from one segment to the next. A segment's
working set is sized to stay in the caches (about 1 MiB per input tensor); processing
the whole sequence at once instead allocates tensors of hundreds of MB whose first touch
(page faults) and cache misses made per-token time grow with T. See ``ops/simple_gla/README.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# elements of one input tensor per segment: 2**18 float32 = 1 MiB (measured best of 2**16..2**19)
SEGMENT_ELEMENTS = 1 << 18

# Largest log-decay (nats) within one chunk for which float32 cumulative sums and factored
# exponentials are used. Past it, cumulative log-decays reach magnitudes where float32 loses the
# small differences between nearby tokens (and exp(-b) would overflow), so exponents are formed
# in float64 / by secondary chunking instead.
SAFE_SPAN = 60.0


LOG2_E = 1.4426950408889634


def records_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record a call on ``tensors`` (``None`` entries are skipped). Forms that
    work in place in preallocated buffers may do so only when this is False."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def exp_fast(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` as ``2 ** (x log2 e)``, overwriting ``x`` (pass a temporary). On CPU torch's
    ``exp2`` kernel ran about 3x faster than its ``exp`` (AMD EPYC, torch 2.13: 40 vs 111 us for
    262K float32 values on 2 threads); the extra rounding of the product is a few ulp
    (max relative error 1e-6 in float32 for |x| <= 20, measured against float64 exp)."""
    return x.mul_(LOG2_E).exp2_()


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Recurrent state and internal compute dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_length(batch_heads: int, head_dim: int, chunk_size: int) -> int:
    """Tokens per segment: a multiple of ``chunk_size`` with about SEGMENT_ELEMENTS per tensor."""
    chunks = max(1, SEGMENT_ELEMENTS // max(1, batch_heads * head_dim * chunk_size))
    return chunks * chunk_size


def pad_time(x: torch.Tensor, multiple: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad dimension ``dim`` (time) up to a multiple of ``multiple``."""
    T = x.shape[dim]
    extra = (-T) % multiple
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L, H, *D]`` time-major slice -> contiguous ``[B, H, n, C, *D]`` in ``dtype`` (one copy)."""
    B, L, H = x.shape[:3]
    perm = (0, 2, 1, *range(3, x.dim()))
    xp = x.permute(perm)
    out = torch.empty(xp.shape, dtype=dtype, device=x.device).copy_(xp)
    return out.view(B, H, L // chunk_size, chunk_size, *x.shape[3:])


def to_chunks_major(x: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L, H, *D]`` time-major slice -> contiguous chunk-major ``[n, B, H, C, *D]`` in ``dtype``
    (one copy). Chunk-major batches let the per-chunk state factors feed the sequential pass and
    the states it returns feed the next matmuls without further permute copies."""
    B, L, H = x.shape[:3]
    n = L // chunk_size
    xv = x.view(B, n, chunk_size, H, *x.shape[3:])
    xp = xv.permute(1, 0, 3, 2, *range(4, xv.dim()))
    return torch.empty(xp.shape, dtype=dtype, device=x.device).copy_(xp)


def causal_mask(chunk_size: int, device: torch.device, strict: bool = False) -> torch.Tensor:
    """``[C, C]`` bool, True where key j may be seen by query i (j <= i, or j < i when strict)."""
    return torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril(-1 if strict else 0)


class SegmentOutputs:
    """Collects each segment's ``[B, H, L, V]`` output into one ``[B, T, H, V]`` tensor.

    Without autograd the output is allocated once and each segment is copied into place (and
    cast to the output dtype) as soon as it is computed, so the segment buffers are recycled by the
    allocator; holding every segment until a final ``cat`` kept a second copy of the output alive
    and made per-token time grow with T. With autograd the pieces are concatenated at the end
    (an in-place copy into a shared buffer would make backward clone the whole gradient once per
    segment).
    """

    def __init__(self, B: int, T: int, H: int, V: int, dtype: torch.dtype, device: torch.device, grad: bool):
        self.grad = grad
        self.T = T
        self.pieces: list[torch.Tensor] = []
        self.out = None if grad else torch.empty(B, T, H, V, dtype=dtype, device=device)
        self.dtype = dtype

    def add(self, start: int, o: torch.Tensor) -> None:
        """``o [B, H, L, V]``: the output of tokens ``start .. start + L`` (may run past T: padding)."""
        piece = o.transpose(1, 2)  # [B, L, H, V]
        if self.grad:
            self.pieces.append(piece)
            return
        end = min(start + piece.shape[1], self.T)
        if end > start:
            self.out[:, start:end].copy_(piece[:, : end - start])

    def add_chunk_major(self, start: int, o: torch.Tensor) -> None:
        """``o [n, B, H, C, V]``: the output of tokens ``start .. start + n C``, chunk-major."""
        n, B, H, C, V = o.shape
        piece = o.permute(1, 0, 3, 2, 4)  # [B, n, C, H, V]
        if self.grad:
            self.pieces.append(piece.reshape(B, n * C, H, V))
            return
        end = min(start + n * C, self.T)
        if end - start == n * C:
            self.out[:, start:end].view(B, n, C, H, V).copy_(piece)
        elif end > start:
            self.out[:, start:end].copy_(piece.reshape(B, n * C, H, V)[:, : end - start])

    def result(self) -> torch.Tensor:
        if not self.grad:
            return self.out
        return torch.cat(self.pieces, 1)[:, : self.T].to(self.dtype)


def batched_qk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` over the leading dims of contiguous ``[.., M, D]`` and ``[.., N, D]``, as one ``bmm``
    on 3-d views (``torch.matmul`` on 5-d operands with a transposed one copied it first)."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]).transpose(1, 2))
    return out.view(*a.shape[:-1], b.shape[-2])


def batched_kv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a^T @ b`` over the leading dims of contiguous ``[.., C, K]`` and ``[.., C, V]``: ``[.., K, V]``."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]).transpose(1, 2), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], a.shape[-1], b.shape[-1])


def time_steps(x: torch.Tensor, grad: bool):
    """Per-step views of a time-major ``[T, ...]`` tensor for a step loop.

    With autograd, ``unbind`` (indexing ``x[t]`` would make backward build a full-size zero
    gradient per step, O(T^2)); without, the tensor itself (indexing is free, and a list of T
    views would burden Python's garbage collector at long T).
    """
    return x.unbind(0) if grad else x


class StepOutputs:
    """Collects a step loop's ``[B, H, V]`` outputs as ``[B, T, H, V]``: preallocated without
    autograd (no list of T tensors kept alive), stacked with it."""

    def __init__(self, B: int, T: int, H: int, V: int, dtype: torch.dtype, device: torch.device, grad: bool):
        self.grad = grad
        self.items: list[torch.Tensor] = []
        self.out = None if grad else torch.empty(B, T, H, V, dtype=dtype, device=device)

    def add(self, t: int, o: torch.Tensor) -> None:
        if self.grad:
            self.items.append(o)
        else:
            self.out[:, t] = o

    def result(self) -> torch.Tensor:
        return torch.stack(self.items, 1) if self.grad else self.out


def affine_state_pass(
    M: torch.Tensor, N: torch.Tensor, S: torch.Tensor, chunk_major: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequential inter-chunk pass of a state whose per-chunk update is affine,
    ``S_{c+1} = M_c S_c + N_c``: ``M [B, H, n, K, K]``, ``N [B, H, n, K, V]``, ``S [B, H, K, V]``
    (``[n, B, H, ...]`` when ``chunk_major``).

    Both factors are built batched over all chunks beforehand, so the loop is one ``[K, K] x [K, V]``
    gemm per chunk. Returns the state entering each chunk (same layout as N) and the one leaving
    the last ``[B, H, K, V]``.
    """
    if chunk_major:
        n, B, H, K, V = N.shape
        Mc, Nc = M.reshape(n, B * H, K, K), N.reshape(n, B * H, K, V)
    else:
        # chunk-major, so every step reads contiguous memory
        B, H, n, K, V = N.shape
        Mc = M.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, K)
        Nc = N.permute(2, 0, 1, 3, 4).reshape(n, B * H, K, V)
    S3 = S.reshape(B * H, K, V)
    states = []
    for i in range(n):
        states.append(S3)
        S3 = torch.baddbmm(Nc[i], Mc[i], S3)
    if chunk_major:
        return torch.stack(states, 0).view(n, B, H, K, V), S3.view(B, H, K, V)
    return torch.stack(states, 1).view(B, H, n, K, V), S3.view(B, H, K, V)
