"""Shared argument validation for every op.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

Every check raises ``ValueError`` (wrong shape or value) or ``TypeError`` (wrong type or dtype)
naming the argument, what was expected and what was received. Nothing is clamped or reshaped.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Sequence

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

_CHECK_FINITE = False


def check_finite_enabled() -> bool:
    """Whether ops scan their inputs for NaN/Inf (off by default: it costs a pass over the data)."""
    return _CHECK_FINITE


def set_check_finite(enabled: bool) -> None:
    """Turn the NaN/Inf scan of op inputs on or off globally."""
    global _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)


@contextlib.contextmanager
def check_finite(enabled: bool = True) -> Iterator[None]:
    """Context manager: inside it, every op raises ``ValueError`` on NaN or Inf inputs."""
    global _CHECK_FINITE
    previous = _CHECK_FINITE
    _CHECK_FINITE = bool(enabled)
    try:
        yield
    finally:
        _CHECK_FINITE = previous


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def check_tensor(name: str, x: object, ndim: int, legend: str) -> torch.Tensor:
    """Check that ``x`` is a floating tensor with ``ndim`` dimensions (``legend`` names them)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {legend}, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float64, float32, bfloat16, float16), got {x.dtype}"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {legend} ({ndim} dims), got {_fmt(x.shape)}")
    if _CHECK_FINITE and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return x


def check_same_dtype_device(named: dict[str, torch.Tensor | None]) -> None:
    """All given tensors must share one dtype and one device."""
    items = [(n, t) for n, t in named.items() if t is not None]
    ref_name, ref = items[0]
    for name, t in items[1:]:
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], legend: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {legend} = {_fmt(expected)}, got {_fmt(x.shape)}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate ``q, k [B, T, H, K]`` and ``v [B, T, H, V]``; return ``(B, T, H, K, V)``."""
    check_tensor("q", q, 4, "[B, T, H, K]")
    check_tensor("k", k, 4, "[B, T, H, K]")
    check_tensor("v", v, 4, "[B, T, H, V]")
    check_same_dtype_device({"q": q, "k": k, "v": v})
    B, T, H, K = q.shape
    check_shape("k", k, (B, T, H, K), "[B, T, H, K] like q")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must have shape [B, T, H, V] = [{B}, {T}, {H}, V], got {_fmt(v.shape)}")
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1), got T = 0")
    if K == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be positive, got K = {K}, V = {v.shape[3]}")
    return B, T, H, K, v.shape[3]


def check_log_gate(name: str, g: torch.Tensor) -> None:
    """Log-space gates must be <= 0 (a decay factor exp(g) in (0, 1])."""
    # one reduction: a `(g > 0).any()` would allocate a bool tensor as large as g (10x slower)
    if g.numel() and (top := float(g.detach().max())) > 0:
        raise ValueError(
            f"{name} holds natural-log decay values and must be <= 0 everywhere, got max {top:.4g}"
        )


def check_mode(mode: str, modes: Sequence[str]) -> None:
    if mode not in modes:
        raise ValueError(f"mode must be one of {list(modes)}, got {mode!r}")


def check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def check_grouped_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None, *, keys: str = "same"
) -> tuple[int, int, int, int, int, int]:
    """Shapes of softmax-style attention inputs with grouped key/value heads: q ``[B, T, H, K]``,
    k ``[B, S, Hk, K]``, v ``[B, S, Hk, V]`` (optional), Hk dividing H, T, K, V >= 1. ``keys`` says
    what S may be: ``"same"`` (S = T), ``"suffix"`` (S >= T: the queries are the last T positions) or
    ``"any"`` (S >= 1). Returns ``(B, T, S, H, Hk, K)``."""
    rule = {"same": "T", "suffix": "S >= T", "any": "S"}[keys]
    letter = "T" if keys == "same" else "S"
    check_tensor("q", q, 4, "[B, T, H, K]")
    check_tensor("k", k, 4, f"[B, {letter}, Hk, K]")
    if v is not None:
        check_tensor("v", v, 4, f"[B, {letter}, Hk, V]")
    B, T, H, K = q.shape
    S, Hk = k.shape[1], k.shape[2]
    if T == 0 or K == 0:
        raise ValueError(f"q must have T >= 1 and K >= 1, got shape {list(q.shape)}")
    length_ok = {"same": S == T, "suffix": S >= T, "any": S >= 1}[keys]
    if k.shape[0] != B or not length_ok or k.shape[3] != K or Hk == 0 or H % Hk:
        shown = T if keys == "same" else rule.replace("T", str(T))
        raise ValueError(
            f"k must have shape [B, {letter}, Hk, K] = [{B}, {shown}, Hk, {K}] with Hk dividing H = {H}, "
            f"got {list(k.shape)}"
        )
    if v is not None and (v.shape[:3] != k.shape[:3] or v.shape[3] == 0):
        raise ValueError(
            f"v must have shape [B, {letter}, Hk, V] like k {list(k.shape)}, got {list(v.shape)}"
        )
    return B, T, S, H, Hk, K


def check_positive_int(name: str, x: object) -> None:
    """An int >= 1 (not a bool), else ValueError naming ``name``."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")


def resolve_scale(scale: float | None, K: int) -> float:
    if scale is None:
        return K**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int, device: torch.device) -> int:
    """Validate packed-sequence offsets; return the number of sequences N (B when not packed)."""
    if cu_seqlens is None:
        return B
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens must be an int64 torch.Tensor of shape [N + 1], got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cu_seqlens must have dtype int64 (or int32), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape [N + 1] with N >= 1, got {_fmt(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(
            f"with cu_seqlens the batch size B must be 1 (sequences packed along T), got B = {B}"
        )
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if offsets[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T}, got {offsets[-1]}")
    for a, b in itertools.pairwise(offsets):
        if b <= a:
            raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequences), got {offsets}")
    return len(offsets) - 1


def check_initial_state(
    initial_state: torch.Tensor | None, expected: Sequence[int], legend: str, device: torch.device
) -> None:
    if initial_state is None:
        return
    if not isinstance(initial_state, torch.Tensor):
        raise TypeError(
            f"initial_state must be a torch.Tensor of shape {legend}, got {type(initial_state).__name__}"
        )
    if initial_state.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"initial_state must be a floating tensor (float32 expected), got {initial_state.dtype}"
        )
    check_shape("initial_state", initial_state, expected, legend)
    if initial_state.device != device:
        raise ValueError(f"initial_state is on {initial_state.device} but q is on {device}; they must match")
    if _CHECK_FINITE and not bool(torch.isfinite(initial_state).all()):
        raise ValueError("initial_state contains NaN or Inf values")


def autocast_exempt(fn):
    """Run the op with autocast off: an op keeps its own precision rules (float32 states and
    accumulation, outputs in the input dtype), which autocast would break by recasting single
    matmuls inside it. Its inputs must still share one dtype (a mixer casts them first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        dev = first.device.type if first is not None else "cpu"
        if torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
