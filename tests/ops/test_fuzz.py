"""Property-based shape fuzzing: any valid shape, chunk size and split agrees with the reference."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subquad.registry import list_ops
from subquad.testing import assert_close, is_timed

CASES = [(spec, var) for spec in list_ops() for var in spec.variants]


@st.composite
def problems(draw):
    spec, var = draw(st.sampled_from(CASES))
    mode = draw(st.sampled_from([m for m in spec.modes_for(var) if m != "reference"]))
    dims = dict(
        B=draw(st.integers(1, 3)),
        T=draw(st.integers(1, 80)),
        H=draw(st.integers(1, 3)),
        K=draw(st.integers(1, 12)),
        V=draw(st.integers(1, 12)),
    )
    chunk = draw(st.integers(1, 40))
    gates = draw(st.sampled_from(["normal", "near_zero", "strong"]))
    seed = draw(st.integers(0, 2**16))
    with_state = draw(st.booleans())
    return spec, var, mode, dims, chunk, gates, seed, with_state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_any_shape_matches_reference(problem):
    spec, var, mode, dims, chunk, gates, seed, with_state = problem
    inputs = spec.make_inputs(var, **dims, dtype=torch.float64, seed=seed, gates=gates)
    state = None
    if with_state and spec.stateful:
        shape = spec.state_shape(dims["B"], dims["H"], dims["K"], dims["V"], var)
        state = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    o, s = spec.call(inputs, var, mode=mode, chunk_size=chunk, initial_state=state, output_final_state=True)
    ro, rs = spec.call(inputs, var, mode="reference", initial_state=state, output_final_state=True)
    label = f"{spec.name}/{var.name}/{mode} {dims} chunk={chunk} gates={gates}"
    assert_close(o, ro, torch.float64, name=f"{label} output")
    assert_close(s, rs, torch.float64, name=f"{label} state")


@settings(max_examples=30, deadline=None)
@given(
    case=st.sampled_from([(s, v) for s, v in CASES if v.streaming]),
    lengths=st.lists(st.integers(1, 25), min_size=1, max_size=5),
    chunk=st.integers(1, 33),
)
def test_any_packing_matches_separate_calls(case, lengths, chunk):
    spec, var = case
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    inputs = spec.make_inputs(var, B=1, T=T, H=2, K=5, V=3, dtype=torch.float64, seed=T)
    for mode in spec.modes_for(var):
        o, s = spec.call(inputs, var, mode=mode, cu_seqlens=cu, chunk_size=chunk, output_final_state=True)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            piece = {n: (t[:, a:b] if is_timed(spec, n) else t) for n, t in inputs.items()}
            po, ps = spec.call(piece, var, mode="reference", output_final_state=True)
            assert_close(o[:, a:b], po, torch.float64, name=f"{spec.name}/{mode} seq {i} output")
            assert_close(s[i : i + 1], ps, torch.float64, name=f"{spec.name}/{mode} seq {i} state")
