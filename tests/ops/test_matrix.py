"""The op test matrix of DESIGN.md section 4, generated from the registry.

Every (op, variant, mode) is checked against the op's reference: float64 outputs, final state and
every gradient; float32/bfloat16 against float64 with the shared tolerance table; streaming;
packed sequences; edge shapes; extreme gates. A new op is covered by its registry entry alone.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from subquad.registry import list_ops
from subquad.testing import assert_close, differentiable_inputs, is_timed, run_with_grads

CASES = [(spec, var) for spec in list_ops() for var in spec.variants]
MODE_CASES = [
    pytest.param(spec, var, mode, id=f"{spec.name}-{var.name}-{mode}")
    for spec, var in CASES
    for mode in spec.modes_for(var)
    if mode != "reference"
]
# variants that take a log-gate input (an op's other variants may have none)
GATED_MODE_CASES = [
    p
    for p in MODE_CASES
    if any(p.values[0].tensors[n].kind.startswith("log_gate") for n in p.values[1].tensor_names)
]


def _compare(actual: dict, expected: dict, dtype: torch.dtype, what: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], dtype, name=f"{what}: {name}")


def _reference_on(inputs, state, spec, var, dtype_in, **kw):
    """The float64 reference on the same (rounded) values as the low-precision inputs."""
    inputs64 = {n: t.detach().to(torch.float64).requires_grad_(True) for n, t in inputs.items()}
    state64 = None if state is None else state.detach().to(torch.float64).requires_grad_(True)
    return run_with_grads(spec, var, inputs64, state64, mode="reference", **kw)


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
@pytest.mark.parametrize(("T", "chunk_size"), [(45, 16), (20, 64), (64, 16)])
def test_float64_matches_reference(spec, var, mode, T, chunk_size, device):
    dims = dict(B=2, T=T, H=2, K=8, V=6, dtype=torch.float64, device=device, seed=T)
    inputs, state = differentiable_inputs(spec, var, **dims)
    got = run_with_grads(spec, var, inputs, state, mode=mode, chunk_size=chunk_size)
    ref = run_with_grads(spec, var, inputs, state, mode="reference")
    _compare(got, ref, torch.float64, f"{spec.name}/{var.name}/{mode} vs reference")


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_precision_against_float64(spec, var, mode, dtype, device):
    dims = dict(B=2, T=100, H=2, K=16, V=16, dtype=dtype, device=device, seed=7)
    inputs, state = differentiable_inputs(spec, var, **dims)
    got = run_with_grads(spec, var, inputs, state, mode=mode, chunk_size=32)
    assert got["o"].dtype == dtype, "output must have the input dtype"
    if spec.stateful:
        assert got["final_state"].dtype == torch.float32, "state must be float32 for low-precision inputs"
    ref = _reference_on(inputs, state, spec, var, dtype)
    _compare(got, ref, dtype, f"{spec.name}/{var.name}/{mode} {dtype} vs float64 reference")


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
@pytest.mark.parametrize(
    "splits", [(1,), (17, 28), (40, 41, 60)], ids=lambda s: "split" + "-".join(map(str, s))
)
def test_streaming_split_equals_one_call(spec, var, mode, splits, device):
    if not var.streaming:
        pytest.skip(f"{spec.name}/{var.name} is marked streaming=False (non-causal, or a split changes it)")
    T = 63
    dims = dict(B=2, T=T, H=2, K=8, V=8, dtype=torch.float64, device=device)
    inputs, state = differentiable_inputs(spec, var, **dims)
    whole, whole_state = spec.call(
        inputs, var, mode=mode, initial_state=state, output_final_state=True, chunk_size=16
    )
    bounds = [0, *splits, T]
    outs, carried = [], state
    for a, b in itertools.pairwise(bounds):
        piece = {n: (t[:, a:b] if is_timed(spec, n) else t) for n, t in inputs.items()}
        o, carried = spec.call(
            piece, var, mode=mode, initial_state=carried, output_final_state=True, chunk_size=16
        )
        outs.append(o)
    assert_close(torch.cat(outs, 1), whole, torch.float64, name="streamed output")
    assert_close(carried, whole_state, torch.float64, name="streamed final state")


@pytest.mark.parametrize(
    ("spec", "var", "mode"),
    [*MODE_CASES, *[pytest.param(s, v, "reference", id=f"{s.name}-{v.name}-reference") for s, v in CASES]],
)
def test_packed_sequences_equal_separate_calls(spec, var, mode, device):
    lengths = [5, 1, 20, 19]
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=device)
    inputs, state = differentiable_inputs(
        spec, var, B=1, T=T, H=2, K=8, V=6, N=len(lengths), dtype=torch.float64, device=device
    )
    packed = run_with_grads(spec, var, inputs, state, mode=mode, cu_seqlens=cu, chunk_size=8)
    # the same through one call per sequence, gradients flowing to the same leaves
    outs, finals = [], []
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        piece = {n: (t[:, a:b] if is_timed(spec, n) else t) for n, t in inputs.items()}
        piece_state = None if state is None else state[i : i + 1]
        o, s = spec.call(
            piece, var, mode=mode, initial_state=piece_state, output_final_state=True, chunk_size=8
        )
        outs.append(o)
        finals.append(s)
    o, final = torch.cat(outs, 1), (torch.cat(finals, 0) if spec.stateful else None)
    assert_close(packed["o"], o, torch.float64, name="packed output")
    assert_close(packed["final_state"], final, torch.float64, name="packed final state")
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    loss = (o * do).sum()
    if final is not None:
        loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=torch.float64)).sum()
    leaves = [*inputs.values()] + ([state] if state is not None else [])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = [*inputs.keys()] + (["initial_state"] if state is not None else [])
    for name, g in zip(names, grads, strict=True):
        assert_close(packed[f"grad_{name}"], g, torch.float64, name=f"packed grad_{name}")


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
@pytest.mark.parametrize(
    "dims",
    [dict(B=1, T=1, H=3, K=4, V=4), dict(B=2, T=33, H=1, K=4, V=12), dict(B=1, T=7, H=2, K=16, V=3)],
    ids=["T1", "H1-KneV", "K>V"],
)
def test_edge_shapes(spec, var, mode, dims, device):
    inputs, state = differentiable_inputs(spec, var, **dims, dtype=torch.float64, device=device)
    got = run_with_grads(spec, var, inputs, state, mode=mode, chunk_size=16)
    ref = run_with_grads(spec, var, inputs, state, mode="reference")
    _compare(got, ref, torch.float64, f"{spec.name}/{var.name}/{mode} {dims}")


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
def test_long_sequence_float32(spec, var, mode, device):
    """T = 4096: float32 forward and final state against the float64 reference."""
    dims = dict(B=1, T=4096, H=1, K=8, V=8, device=device, seed=3)
    inputs, state = differentiable_inputs(spec, var, **dims, dtype=torch.float32)
    with torch.no_grad():
        o, s = spec.call(inputs, var, mode=mode, initial_state=state, output_final_state=True)
        inputs64 = {n: t.to(torch.float64) for n, t in inputs.items()}
        state64 = None if state is None else state.double()
        ro, rs = spec.call(inputs64, var, mode="reference", initial_state=state64, output_final_state=True)
    assert_close(o, ro, torch.float32, name="long-T output")
    assert_close(s, rs, torch.float32, name="long-T final state")


@pytest.mark.parametrize(("spec", "var", "mode"), GATED_MODE_CASES)
@pytest.mark.parametrize("gates", ["near_zero", "strong"])
def test_extreme_gates(spec, var, mode, gates, device):
    dims = dict(B=2, T=70, H=2, K=8, V=8, device=device, gates=gates, seed=11)
    inputs, state = differentiable_inputs(spec, var, **dims, dtype=torch.float64)
    got = run_with_grads(spec, var, inputs, state, mode=mode, chunk_size=32)
    ref = run_with_grads(spec, var, inputs, state, mode="reference")
    _compare(got, ref, torch.float64, f"{spec.name}/{var.name}/{mode} gates={gates}")
    # float32 with strong decay over many tokens: finite and right, no overflow
    inputs32, state32 = differentiable_inputs(spec, var, **{**dims, "T": 1000}, dtype=torch.float32)
    got32 = run_with_grads(spec, var, inputs32, state32, mode=mode, chunk_size=64)
    ref32 = _reference_on(inputs32, state32, spec, var, torch.float32)
    _compare(got32, ref32, torch.float32, f"{spec.name}/{var.name}/{mode} float32 gates={gates}")


@pytest.mark.parametrize(("spec", "var", "mode"), MODE_CASES)
def test_many_segments_with_and_without_autograd(spec, var, mode, device, monkeypatch):
    """Chunked forms work segment by segment (about SEGMENT_ELEMENTS per tensor), which at test
    sizes is one segment; shrinking it to one chunk per segment runs the state carry between
    segments, and the forward without autograd (which several ops run through preallocated,
    in-place buffers) must give the same float64 results as the one with it."""
    import subquad.ops._common.chunking as chunking

    monkeypatch.setattr(chunking, "SEGMENT_ELEMENTS", 1)
    dims = dict(B=2, T=70, H=2, K=8, V=6, dtype=torch.float64, device=device, seed=5)
    inputs, state = differentiable_inputs(spec, var, **dims)
    ref = run_with_grads(spec, var, inputs, state, mode="reference")
    got = run_with_grads(spec, var, inputs, state, mode=mode, chunk_size=16)
    _compare(got, ref, torch.float64, f"{spec.name}/{var.name}/{mode} one chunk per segment")
    with torch.no_grad():
        o, final = spec.call(
            inputs, var, mode=mode, initial_state=state, output_final_state=True, chunk_size=16
        )
    assert_close(o, ref["o"], torch.float64, name="output without autograd")
    if final is not None:
        assert_close(final, ref["final_state"], torch.float64, name="final state without autograd")
