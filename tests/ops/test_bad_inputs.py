"""Every documented bad input raises a clear ValueError/TypeError naming the argument.

Generated from the registry: each op's tensor inputs get the wrong number of dims, a wrong dim,
an integer dtype, a mismatched dtype; log-gates get positive values; cu_seqlens, initial_state,
mode, chunk_size and scale get invalid values.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import subquad
from subquad.registry import list_ops

CASES = [pytest.param(spec, spec.variants[0], id=spec.name) for spec in list_ops()]


def _inputs(spec, var, **kw):
    return spec.make_inputs(var, B=1, T=12, H=2, K=4, V=4, dtype=torch.float32, **kw)


def _raises(exc, match, spec, var, inputs, **kw):
    with pytest.raises(exc, match=match):
        spec.call(inputs, var, **kw)


@pytest.mark.parametrize(("spec", "var"), CASES)
@pytest.mark.parametrize("mode", ["reference", "chunk", "recurrent"])
def test_tensor_inputs(spec, var, mode):
    if mode not in spec.modes_for(var):
        pytest.skip(f"{spec.name} has no {mode} mode")
    for name in var.tensor_names:
        good = _inputs(spec, var)
        # 1. one dim too many
        bad = dict(good, **{name: good[name].unsqueeze(0)})
        _raises(ValueError, name, spec, var, bad, mode=mode)
        # 2. integer dtype
        bad = dict(good, **{name: good[name].to(torch.int64)})
        _raises(TypeError, name, spec, var, bad, mode=mode)
        # 3. not a tensor at all
        bad = dict(good, **{name: good[name].tolist()})
        _raises(TypeError, name, spec, var, bad, mode=mode)
        # 4. a wrong size in its last dim (ok for v, whose V is free: change its T instead)
        t = good[name]
        wrong = t[..., :-1] if name != "v" else t[:, :-1]
        if t.shape[-1] > 1 and wrong.shape != t.shape:
            bad = dict(good, **{name: wrong})
            _raises(ValueError, name if name != "q" else "k|q", spec, var, bad, mode=mode)
    # 5. dtypes that do not match q's
    good = _inputs(spec, var)
    for name in var.tensor_names:
        if name in ("q", "g_gamma"):
            continue
        bad = dict(good, **{name: good[name].double()})
        _raises(TypeError, "dtype", spec, var, bad, mode=mode)


ALL_VARIANTS = [pytest.param(s, v, id=f"{s.name}-{v.name}") for s in list_ops() for v in s.variants]


@pytest.mark.parametrize(("spec", "var"), ALL_VARIANTS)
def test_positive_log_gates(spec, var):
    for name in var.tensor_names:
        if not spec.tensors[name].kind.startswith("log_gate"):
            continue
        good = _inputs(spec, var)
        bad = dict(good)
        bad[name] = good[name].clone()
        bad[name].view(-1)[0] = 0.5
        for mode in spec.modes_for(var):
            _raises(ValueError, f"{name}.*<= 0", spec, var, bad, mode=mode)


@pytest.mark.parametrize(("spec", "var"), CASES)
def test_cu_seqlens(spec, var):
    inputs = _inputs(spec, var)
    cases = [
        (torch.tensor([0, 5, 5, 12]), ValueError, "strictly increasing"),
        (torch.tensor([0, 7, 5, 12]), ValueError, "strictly increasing"),
        (torch.tensor([0, 5, 11]), ValueError, "end at T = 12"),
        (torch.tensor([1, 5, 12]), ValueError, "start at 0"),
        (torch.tensor([0.0, 12.0]), TypeError, "cu_seqlens.*int64"),
        (torch.tensor([[0, 12]]), ValueError, r"cu_seqlens.*\[N \+ 1\]"),
        ([0, 12], TypeError, "cu_seqlens"),
    ]
    for cu, exc, match in cases:
        _raises(exc, match, spec, var, inputs, mode="chunk", cu_seqlens=cu)
    batched = spec.make_inputs(var, B=2, T=12, H=2, K=4, V=4)
    _raises(ValueError, "B must be 1", spec, var, batched, mode="chunk", cu_seqlens=torch.tensor([0, 12]))


@pytest.mark.parametrize(("spec", "var"), CASES)
def test_initial_state(spec, var):
    if not spec.stateful:
        pytest.skip(f"{spec.name} keeps no recurrent state")
    inputs = _inputs(spec, var)
    shape = spec.state_shape(1, 2, 4, 4, var)
    bad_states = [
        (ValueError, torch.zeros(*shape[:-1], shape[-1] + 1)),
        (ValueError, torch.zeros(2, *shape[1:])),
        (TypeError, torch.zeros(shape, dtype=torch.int32)),
    ]
    for exc, bad in bad_states:
        _raises(exc, "initial_state", spec, var, inputs, initial_state=bad)
    # with packed sequences N is the number of sequences, not B
    cu = torch.tensor([0, 4, 12])
    _raises(ValueError, "initial_state", spec, var, inputs, cu_seqlens=cu, initial_state=torch.zeros(shape))


@pytest.mark.parametrize(("spec", "var"), CASES)
def test_mode_chunk_size_scale(spec, var):
    inputs = _inputs(spec, var)
    _raises(ValueError, "mode must be one of", spec, var, inputs, mode="fast")
    _raises(ValueError, "chunk_size must be >= 1", spec, var, inputs, chunk_size=0)
    _raises(TypeError, "chunk_size must be an int", spec, var, inputs, chunk_size=16.0)
    if "scale" not in inspect.signature(spec.fn).parameters:
        return  # e.g. a selective scan has no query scale
    _raises(TypeError, "scale", spec, var, inputs, scale="0.5")
    _raises(ValueError, "scale must be finite", spec, var, inputs, scale=float("nan"))


@pytest.mark.parametrize(("spec", "var"), CASES)
def test_nan_inputs_when_checking(spec, var):
    inputs = _inputs(spec, var)
    first = var.positional[0]
    bad = dict(inputs)
    bad[first] = inputs[first].clone()
    bad[first][0, 3].view(-1)[1] = float("nan")
    spec.call(bad, var)  # off by default: no scan, no error
    with subquad.check_finite():
        _raises(ValueError, f"{first} contains NaN", spec, var, bad)
    assert not subquad.ops._common.check_finite_enabled()


def test_simple_gla_gate_choice():
    spec = subquad.registry.get_op("simple_gla")
    x = spec.make_inputs("default", B=1, T=8, H=2, K=4, V=4)
    with pytest.raises(ValueError, match="needs a decay"):
        subquad.ops.simple_gla(x["q"], x["k"], x["v"])
    with pytest.raises(ValueError, match="not both"):
        subquad.ops.simple_gla(x["q"], x["k"], x["v"], x["g"], g_gamma=-torch.ones(2))


def test_linear_attn_noncausal_recurrent_is_refused():
    x = subquad.registry.get_op("linear_attn").make_inputs("default", B=1, T=8, H=2, K=4, V=4)
    with pytest.raises(ValueError, match=r"recurrent.*causal"):
        subquad.ops.linear_attn(x["q"], x["k"], x["v"], mode="recurrent", causal=False)
