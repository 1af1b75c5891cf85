"""Neighborhood attention beyond the generated matrix (which runs the 1D variants): the
neighbourhood rule pinned by hand-worked cases, 2D and 3D grids, several gather chunks, low
precision on a grid, the link to sliding windows, and bad grid arguments."""

from __future__ import annotations

import importlib

import pytest
import torch

from subquad.ops import attention, neighborhood_attention
from subquad.ops.neighborhood.core import axis_neighbours
from subquad.ops.neighborhood.reference import axis_window
from subquad.testing import assert_close

core = importlib.import_module("subquad.ops.neighborhood.core")


@pytest.mark.parametrize(
    ("L", "k", "d", "causal", "expected"),
    [
        # centred, moved inwards at both ends
        (10, 3, 1, False, {0: [0, 1, 2], 5: [4, 5, 6], 9: [7, 8, 9]}),
        # dilation 2: only the query's own parity, e.g. 5 -> 3, 5, 7 and 9 -> 5, 7, 9
        (10, 3, 2, False, {0: [0, 2, 4], 5: [3, 5, 7], 9: [5, 7, 9], 8: [4, 6, 8]}),
        # even kernel: one more before than after
        (10, 4, 1, False, {5: [3, 4, 5, 6], 0: [0, 1, 2, 3]}),
        # causal: the kernel's worth of members up to the query, fewer at the start
        (10, 3, 1, True, {0: [0], 1: [0, 1], 5: [3, 4, 5]}),
        (10, 3, 3, True, {7: [1, 4, 7], 2: [2]}),
        # a group shorter than the kernel: all of it (L = 5, d = 2: groups {0, 2, 4} and {1, 3})
        (5, 4, 2, False, {2: [0, 2, 4], 3: [1, 3]}),
    ],
)
def test_axis_windows_by_hand(L, k, d, causal, expected):
    pos, ok = axis_neighbours(L, k, d, causal, "cpu")
    for i, want in expected.items():
        assert axis_window(i, L, k, d, causal) == want
        assert sorted(pos[i][ok[i]].tolist()) == want


def test_tensor_and_integer_rules_agree():
    """The chunk form's tensor construction and the reference's integer one, over many sizes."""
    for L in range(1, 19):
        for k in range(1, 8):
            for d in range(1, 5):
                for causal in (False, True):
                    pos, ok = axis_neighbours(L, k, d, causal, "cpu")
                    for i in range(L):
                        assert sorted(pos[i][ok[i]].tolist()) == axis_window(i, L, k, d, causal)


def _qkv(T, H=4, Hk=2, K=8, V=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, T, h, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        for h, dim in ((H, K), (Hk, K), (Hk, V))
    ]


def _run(q, k, v, mode, **kw):
    o = neighborhood_attention(q, k, v, mode=mode, **kw)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(o.dtype)
    return o, torch.autograd.grad((o * do).sum(), [q, k, v])


GRIDS = [
    dict(grid=(5, 6), kernel_size=3),
    dict(grid=(7, 9), kernel_size=(3, 5), dilation=(2, 1), causal=(True, False)),
    dict(grid=(4, 3), kernel_size=5),  # kernels longer than the axes: whole axes
    dict(grid=(3, 4, 5), kernel_size=(3, 3, 2), dilation=(1, 2, 1)),
]


@pytest.mark.parametrize("kw", GRIDS, ids=lambda kw: "x".join(map(str, kw["grid"])))
@pytest.mark.parametrize("chunks", ["one", "many"])
def test_grids_match_the_reference(kw, chunks, monkeypatch):
    if chunks == "many":
        monkeypatch.setattr(core, "GATHER_ELEMENTS", 200)  # a few queries per chunk
    T = 1
    for n in kw["grid"]:
        T *= n
    q, k, v = _qkv(T)
    o, grads = _run(q, k, v, "chunk", **kw)
    ro, rgrads = _run(q, k, v, "reference", **kw)
    assert_close(o, ro, torch.float64, name="o")
    for name, g, rg in zip("qkv", grads, rgrads, strict=True):
        assert_close(g, rg, torch.float64, name=f"grad_{name}")


@pytest.mark.parametrize("grid", [(45,), (5, 6), (9, 7), (3, 4, 5)], ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("causal", [False, True])
def test_both_chunk_forms_match_the_reference_without_dilation(grid, causal, monkeypatch):
    """Without dilation the op runs the tiled form; the gathered one (which dilation needs) must
    agree too. Axes that tiles do not divide make the last tile repeat queries it does not own."""
    monkeypatch.setattr(core, "GATHER_ELEMENTS", 3000)  # several chunks of tiles
    T = 1
    for n in grid:
        T *= n
    kernel = (5, 3, 2)[: len(grid)]
    flags = (causal,) + (False,) * (len(grid) - 1)
    q, k, v = _qkv(T)
    ro, rgrads = _run(q, k, v, "reference", grid=grid, kernel_size=kernel, causal=flags)
    qh, kh, vh = (x.repeat_interleave(2, 2) if i else x for i, x in enumerate((q, k, v)))
    idx, ok = core.neighbours(grid, kernel, (1,) * len(grid), flags, "cpu")
    for name, fn in (
        ("tiled", lambda: core.tiled(qh, kh, vh, grid, kernel, flags, 8**-0.5)),
        ("gathered", lambda: core.gathered(qh, kh, vh, idx, ok, 8**-0.5)),
    ):
        o = fn()
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        grads = torch.autograd.grad((o * do).sum(), [q, k, v])
        assert_close(o, ro, torch.float64, name=f"{name} o")
        for g_name, g, rg in zip("qkv", grads, rgrads, strict=True):
            assert_close(g, rg, torch.float64, name=f"{name} grad_{g_name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grid_low_precision_against_float64(dtype):
    kw = dict(grid=(12, 10), kernel_size=(5, 3), dilation=(1, 2))
    q, k, v = _qkv(120, K=16, V=16, dtype=dtype, seed=3)
    o, grads = _run(q, k, v, "chunk", **kw)
    assert o.dtype == dtype
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rgrads = _run(*leaves, "reference", **kw)
    assert_close(o, ro, dtype, name="o")
    for name, g, rg in zip("qkv", grads, rgrads, strict=True):
        assert_close(g, rg, dtype, name=f"grad_{name}")


def test_causal_1d_without_dilation_is_a_sliding_window():
    """Causal neighbourhoods of kernel w along T are the window op's keys ``i - w + 1 .. i``: the two
    ops, written separately, agree (forward and gradients)."""
    q, k, v = _qkv(50)
    o, grads = _run(q, k, v, "chunk", kernel_size=9, causal=True)
    w = attention(q, k, v, window=9)
    wgrads = torch.autograd.grad((w * torch.randn(w.shape, generator=torch.Generator().manual_seed(1),
                                                   dtype=torch.float64)).sum(), [q, k, v])  # fmt: skip
    assert_close(o, w, torch.float64, name="o")
    for name, g, rg in zip("qkv", grads, wgrads, strict=True):
        assert_close(g, rg, torch.float64, name=f"grad_{name}")


def test_bad_grid_arguments():
    q, k, v = (x.detach() for x in _qkv(12))
    cases = [
        (dict(grid=(3, 5)), ValueError, "grid .* holds 15 tokens, but q has T = 12"),
        (dict(grid=(3, 2, 2, 1)), ValueError, "grid must be None or 1-3 ints"),
        (dict(grid=(3, 0)), ValueError, "grid must be None or 1-3 ints"),
        (dict(grid=12), ValueError, "grid must be None or 1-3 ints"),
        (dict(grid=(3, 4), kernel_size=(3, 3, 3)), ValueError, "kernel_size must be one value or 2"),
        (dict(kernel_size=0), ValueError, "kernel_size must be an int >= 1"),
        (dict(dilation=(2.0,)), ValueError, "dilation must be an int >= 1"),
        (dict(grid=(3, 4), causal=(True, 1)), TypeError, "causal must be a bool"),
    ]
    for kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            neighborhood_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="cu_seqlens packs 1D sequences"):
        neighborhood_attention(q[:1], k[:1], v[:1], grid=(3, 4), cu_seqlens=torch.tensor([0, 12]))
