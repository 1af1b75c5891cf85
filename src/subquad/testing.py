"""Testing helpers: the tolerance table, ``assert_close`` and inputs built from an ``OpSpec``.

Shape legend: B batch, T time, H heads, K key dim, V value dim.

Low-precision results are compared against the float64 reference run on the *same* (rounded)
inputs, so the tolerance measures the op's own error, not the rounding of its inputs.
Two numbers are checked and both printed on failure:

* max-abs: ``max |actual - expected|``, relative to ``max(1, max |expected|)``;
* relative RMS: ``||actual - expected||_2 / ||expected||_2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subquad.registry import OpSpec, Variant


@dataclass(frozen=True)
class Tolerance:
    max_abs: float
    rel_rms: float


# The shared tolerance table, by the dtype the op ran in (compared with float64 references).
# Never relaxed in CI; a test needing more slack has found a bug or a documented limitation.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(max_abs=1e-9, rel_rms=1e-10),
    torch.float32: Tolerance(max_abs=1e-4, rel_rms=2e-5),
    torch.float16: Tolerance(max_abs=1e-2, rel_rms=5e-3),
    torch.bfloat16: Tolerance(max_abs=5e-2, rel_rms=2e-2),
}


def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """``(max-abs error relative to max(1, max|expected|), relative RMS error)`` in float64."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    diff = a - e
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    max_abs = float(diff.abs().max()) / scale if diff.numel() else 0.0
    denom = float(e.norm())
    rel_rms = float(diff.norm()) / denom if denom > 0 else float(diff.norm())
    return max_abs, rel_rms


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    *,
    name: str = "tensor",
    tol: Tolerance | None = None,
) -> None:
    """Assert ``actual`` matches ``expected`` within the table's tolerance for ``dtype``.

    ``dtype`` defaults to ``actual.dtype``. Raises ``AssertionError`` printing both metrics.
    """
    if actual is None or expected is None:
        if actual is None and expected is None:
            return
        raise AssertionError(
            f"{name}: one side is None (actual={actual is None}, expected={expected is None})"
        )
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{name}: actual has NaN or Inf values")
    tol = tol or TOLERANCES[dtype or actual.dtype]
    max_abs, rel_rms = error_stats(actual, expected)
    if max_abs > tol.max_abs or rel_rms > tol.rel_rms:
        raise AssertionError(
            f"{name}: max-abs {max_abs:.3e} (tol {tol.max_abs:.1e}), rel-RMS {rel_rms:.3e} "
            f"(tol {tol.rel_rms:.1e}) [dtype {dtype or actual.dtype}, shape {tuple(actual.shape)}]"
        )


def is_timed(spec: OpSpec, name: str) -> bool:
    """Whether input ``name`` of ``spec`` runs along time (dim 1 is ``T``), so that cutting a
    sequence cuts it too; per-head parameters (a decay ``[H]``, centroids ``[H, M, K]``) pass whole."""
    dims = spec.tensors[name].dims
    return len(dims) > 1 and dims[1] == "T"


def differentiable_inputs(
    spec: OpSpec, variant: Variant, *, with_state: bool = True, N: int | None = None, **dims
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Random inputs (``requires_grad``) plus a random initial state ``[N, H, K, V]`` (float32;
    float64 for float64 inputs; None for an op without state) for ``variant``; ``dims`` go to
    ``OpSpec.make_inputs``."""
    inputs = spec.make_inputs(variant, **dims)
    dtype = dims.get("dtype", torch.float32)
    device = dims.get("device", "cpu")
    state = None
    if with_state and spec.stateful:
        B, H = dims.get("B", 2), dims.get("H", 2)
        K, V = dims.get("K", 16), dims.get("V", 16)
        shape = spec.state_shape(N if N is not None else B, H, K, V, variant)
        gen = torch.Generator().manual_seed(dims.get("seed", 0) + 1)
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        state = torch.randn(shape, generator=gen, dtype=torch.float64)
        if variant.positive_qk:
            state = state.abs()  # a normalizer's accumulated keys are non-negative
        state = (0.5 * state).to(device=device, dtype=sd).requires_grad_(True)
    for t in inputs.values():
        t.requires_grad_(True)
    return inputs, state


def run_with_grads(
    spec: OpSpec,
    variant: Variant,
    inputs: dict[str, torch.Tensor],
    initial_state: torch.Tensor | None,
    *,
    seed: int = 123,
    **kwargs,
) -> dict[str, torch.Tensor | None]:
    """Run the op, backpropagate a fixed random cotangent through the output and the final state,
    and return ``{"o", "final_state", "grad_<input>", "grad_initial_state"}``."""
    o, final = spec.call(inputs, variant, initial_state=initial_state, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    loss = (o * do).sum()
    if final is not None:
        dS = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final)
        loss = loss + (final * dS).sum()
    leaves = [*inputs.values()] + ([initial_state] if initial_state is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    out: dict[str, torch.Tensor | None] = {
        "o": o.detach(),
        "final_state": None if final is None else final.detach(),
    }
    for name, g in zip([*inputs.keys()], grads, strict=False):
        out[f"grad_{name}"] = g
    if initial_state is not None:
        out["grad_initial_state"] = grads[-1]
    return out


def assert_pieces_agree(fn, args, T: int, piece: int, time_kwargs=None, **fixed) -> None:
    """Long-run stability of an op: run it over ``[0, T)`` in consecutive pieces, once in ``"chunk"``
    and once in ``"recurrent"`` mode, each carrying its own final state into the next piece; every
    piece's outputs must be finite and agree within the float32 tolerance, and so must the final
    states. ``args`` (positional) and ``time_kwargs`` (keyword) tensors with >= 3 dims are cut along
    time (dim 1); smaller ones (per-channel parameters) and ``fixed`` pass whole."""
    time_kwargs = time_kwargs or {}

    def cut(t, a):
        return t[:, a : a + piece] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t

    states = {"chunk": None, "recurrent": None}
    with torch.no_grad():
        for a in range(0, T, piece):
            outs = {}
            for mode, state in states.items():
                part = [cut(t, a) for t in args]
                kw = {n: cut(t, a) for n, t in time_kwargs.items()}
                outs[mode], states[mode] = fn(
                    *part, **kw, **fixed, mode=mode, initial_state=state, output_final_state=True
                )
                if not bool(torch.isfinite(outs[mode]).all()):
                    raise AssertionError(f"{mode}: non-finite output in the piece at {a}")
            assert_close(outs["chunk"], outs["recurrent"], torch.float32, name=f"output of piece at {a}")
    assert_close(states["chunk"], states["recurrent"], torch.float32, name="final state")
