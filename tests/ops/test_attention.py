"""Softmax attention specifics: grouped heads, log-sum-exp merging, windows with sinks against a
dense mask, agreement with torch's SDPA, and bad inputs."""

from __future__ import annotations

import contextlib
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import attention, attention_decode
from subquad.registry import get_op
from subquad.testing import assert_close

sparse_mod = importlib.import_module("subquad.ops.attention.sparse")

F64 = torch.float64


def _qkv(B=2, T=40, H=4, Hk=4, K=8, V=6, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, Hk, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, Hk, V, generator=gen, dtype=dtype)
    return q, k, v


def _sdpa(q, k, v, mask=None, causal=False):
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=causal
    )
    return o.transpose(1, 2)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_torch_sdpa(mode, causal):
    q, k, v = _qkv(T=45)
    got = attention(q, k, v, causal=causal, mode=mode, chunk_size=16)
    assert_close(got, _sdpa(q, k, v, causal=causal), F64, name="o vs SDPA")


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_window_and_sinks_match_a_dense_mask(mode):
    q, k, v = _qkv(T=50)
    i = torch.arange(50)[:, None]
    j = torch.arange(50)[None, :]
    mask = (j <= i) & ((i - j < 7) | (j < 3))
    got = attention(q, k, v, window=7, sinks=3, mode=mode, chunk_size=8)
    assert_close(got, _sdpa(q, k, v, mask=mask), F64, name="window 7 + 3 sinks")


@pytest.mark.parametrize("path", ["fused", "spans"])
@pytest.mark.parametrize(
    ("T", "causal", "sinks"), [(50, True, 3), (50, False, 3), (61, True, 0), (200, True, 9), (77, False, 0)]
)
def test_window_paths_match_the_reference_with_gradients(T, causal, sinks, path, monkeypatch):
    """Short windows run by key spans (through torch's fused CPU kernel without sinks, or the
    span loop), long ones by the key-block walk: all against the per-query reference, with
    gradients of o alone and of o and lse (padding, sinks inside and before spans; both paths
    share the key-side band backward)."""
    window_mod = importlib.import_module("subquad.ops.attention.window")
    if path == "fused":
        monkeypatch.setattr(window_mod, "FLASH_BLOCK", 8)  # interior and edge blocks at this size
        monkeypatch.setattr(window_mod, "GROUP_ELEMENTS", 500)  # several kernel calls per sequence
    else:
        monkeypatch.setattr(window_mod, "_FLASH", None)
    # the backward in groups of one to three key blocks
    monkeypatch.setattr(window_mod, "BAND_GROUP_ELEMENTS", 200)
    # the fused kernel needs the value head size to equal the key's (else the span loop runs)
    q, k, v = (x.requires_grad_(True) for x in _qkv(T=T, Hk=2, V=8 if path == "fused" else 6))
    # spans (window < and > the block; at 8 and 16 the fused path's first blocks are plain causal
    # attention), then the key-block walk
    for window in (5, 8, 12, 16, T // 2 + 1):
        _check_with_gradients(q, k, v, f"window {window}", causal=causal, window=window, sinks=sinks)


def _check_with_gradients(q, k, v, label, **kw):
    """``attention(**kw)`` (chunk_size 8) against the reference: o, lse, and the gradients of o
    alone and of o and lse."""
    o, lse = attention(q, k, v, chunk_size=8, return_lse=True, **kw)
    ro, rl = attention(q, k, v, mode="reference", return_lse=True, **kw)
    assert_close(o, ro, F64, name=f"o, {label}")
    assert_close(lse, rl, F64, name=f"lse, {label}")
    go, gl = torch.randn_like(o), torch.randn_like(lse)
    for with_lse in (False, True):
        loss, ref = (o * go).sum(), (ro * go).sum()
        if with_lse:
            loss, ref = loss + (lse * gl).sum(), ref + (rl * gl).sum()
        g = torch.autograd.grad(loss, [q, k, v], retain_graph=True)
        rg = torch.autograd.grad(ref, [q, k, v], retain_graph=True)
        for name, a, b in zip("qkv", g, rg, strict=True):
            assert_close(a, b, F64, name=f"d{name}, {label}, lse gradient {with_lse}")


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize(("T", "causal"), [(37, True), (37, False), (64, True), (1, True)])
def test_full_attention_paths_match_the_reference_with_gradients(T, causal, own):
    """Full attention with K == V runs in torch's fused CPU kernel, or by the key-block walk under
    ``own_tiling()``: both against the reference, with gradients of o alone and of o and lse (the
    kernel has no lse input, so that backward recomputes by the walk)."""
    window_mod = importlib.import_module("subquad.ops.attention.window")
    q, k, v = (x.requires_grad_(True) for x in _qkv(T=T, Hk=2, V=8))
    with window_mod.own_tiling() if own else contextlib.nullcontext():
        assert window_mod.fused_kernel_applies(q, v) is not own
        _check_with_gradients(q, k, v, f"causal {causal}", causal=causal)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_grouped_heads_equal_repeated_heads(mode):
    q, k, v = (x.requires_grad_(True) for x in _qkv(Hk=2))
    o = attention(q, k, v, mode=mode, chunk_size=16)
    ro = attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), mode="reference")
    assert_close(o, ro, F64, name="GQA output")
    g = torch.autograd.grad(o.sum(), [k, v])
    rg = torch.autograd.grad(ro.sum(), [k, v])
    for a, b in zip(g, rg, strict=True):
        assert_close(a, b, F64, name="GQA key/value gradient")


def test_lse_merges_partial_results():
    """Attention over keys [0, s) and [s, T) separately, merged by their log-sum-exps, equals
    attention over all keys: the split-K rule a decode step relies on."""
    q, k, v = _qkv(T=33)
    s = 14
    o, lse = attention(q, k, v, causal=False, return_lse=True, chunk_size=8)
    o1, l1 = _partial(q, k[:, :s], v[:, :s])
    o2, l2 = _partial(q, k[:, s:], v[:, s:])
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m), torch.exp(l2 - m)
    merged = (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
    assert_close(merged, o, F64, name="merged output")
    assert_close(m + torch.log(w1 + w2), lse, F64, name="merged lse")


def _partial(q, k, v):
    """Non-causal attention of every query over a subset of the keys, with its lse (dense)."""
    s = torch.einsum("bthk,bshk->bhts", q, k) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhts,bshv->bthv", torch.softmax(s, -1), v)
    return o, lse.transpose(1, 2)


def test_memory_is_linear_in_blocks():
    """The tiled forward never forms a [T, T] score matrix: its largest intermediate is one
    offset's block pairs, [nb, B*H, b, b], i.e. T * b per head."""
    q, k, v = _qkv(B=1, T=512, H=1, Hk=1, dtype=torch.float32)
    seen = []

    class Probe(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append(out.numel())
            return out

    with torch.no_grad(), Probe():
        attention(q, k, v, chunk_size=32)
    assert max(seen) <= 512 * 32 * 2, f"largest intermediate {max(seen)} elements"


def test_bad_inputs():
    q, k, v = _qkv(T=6)
    with pytest.raises(ValueError, match="Hk dividing H"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="window must be None or an int >= 1"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="sinks only apply with a window"):
        attention(q, k, v, sinks=2)
    with pytest.raises(ValueError, match="sinks must be an int >= 0"):
        attention(q, k, v, window=3, sinks=-1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="keeps no recurrent state"):
        get_op("attention").fn(q, k, v, initial_state=torch.zeros(2, 4, 8, 6))


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8, "auto-small"])
def test_decode_step_matches_attention(num_splits, monkeypatch):
    """A one-query step against a cache == the last row of causal attention over cache + token;
    with cache_seqlens, each sequence sees only its own prefix."""
    if num_splits == "auto-small":  # automatic splits of a few keys each: many partials merged
        decode = importlib.import_module("subquad.ops.attention.decode")
        monkeypatch.setattr(decode, "SPLIT_ELEMENTS", 100)
        num_splits = None
    q, k, v = _qkv(B=2, T=30, H=4, Hk=2)
    o = attention_decode(q[:, -1:], k, v, num_splits=num_splits)
    ref = attention(q, k, v, mode="reference")[:, -1:]
    assert_close(o, ref, F64, name="decode vs attention")
    lens = torch.tensor([30, 17])
    o, lse = attention_decode(q[:, -1:], k, v, cache_seqlens=lens, num_splits=num_splits, return_lse=True)
    k1, v1 = (x[1:, :17].repeat_interleave(2, 2) for x in (k, v))
    ro, rl = _partial(q[1:, -1:], k1, v1)  # the second sequence: only its first 17 cached keys
    assert_close(o[1:], ro, F64, name="decode with cache_seqlens")
    assert_close(lse[1:], rl, F64, name="decode lse")


@pytest.mark.parametrize("path", ["kernel", "onednn", "product"])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_float32_decode_paths_match_float64(path, num_splits, monkeypatch):
    """A float32 cache: torch's fused kernel (short caches, no grouped heads), the whole-cache
    block-diagonal matmul scores (oneDNN) and the per-split product buffer each give dense float64
    attention over the cached keys, with per-sequence lengths, a partial last split, a cache that
    is a strided view (its time rows longer than Hk * K) and queries strided along K."""
    decode = importlib.import_module("subquad.ops.attention.decode")
    taken, calls = [], []
    real_scores, real_flash = decode._block_scores, decode._FLASH
    if path != "kernel":
        monkeypatch.setattr(decode, "KERNEL_ELEMENTS", 0)
    if path == "product":
        monkeypatch.setattr(decode, "_ONEDNN_LINEAR", None)
    monkeypatch.setattr(decode, "_block_scores", lambda *a: taken.append(r := real_scores(*a)) or r)
    monkeypatch.setattr(decode, "_FLASH", lambda *a, **kw: calls.append(1) or real_flash(*a, **kw))
    Hk = 6 if path == "kernel" else 2
    q, k, v = _qkv(B=2, T=30, H=6, Hk=Hk, K=8, V=8)
    k = torch.cat([k, torch.randn_like(k[:, :, :1])], 2)[:, :, :Hk]  # time rows of Hk + 1 heads
    q1 = q[:, -1:].transpose(2, 3).contiguous().transpose(2, 3)  # K is not the unit-stride axis
    lens = [30, 17]
    want = [_partial(q[b : b + 1, -1:], *(x[b : b + 1, :n].repeat_interleave(6 // Hk, 2) for x in (k, v)))
            for b, n in enumerate(lens)]  # fmt: skip
    got = attention_decode(*(x.float() for x in (q1, k, v)), cache_seqlens=torch.tensor(lens),
                           num_splits=num_splits, return_lse=True)  # fmt: skip
    assert_close(got[0], torch.cat([o for o, _ in want]), torch.float32, name="o")
    assert_close(got[1], torch.cat([l for _, l in want]), torch.float32, name="lse")
    used = [s is not None for s in taken]
    onednn = decode._ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available()
    onednn = onednn and torch.backends.mkldnn.enabled
    kernel = decode._FLASH is not None and path == "kernel" and num_splits is None
    assert len(calls) == (2 if kernel else 0)
    assert used == ([] if kernel else [path != "product" and onednn] * 2)
    # without cache_seqlens the batch goes through the same path at once
    calls.clear()
    got = attention_decode(*(x.float() for x in (q1, k, v)), num_splits=num_splits)
    want = _partial(q[:, -1:], *(x.repeat_interleave(6 // Hk, 2) for x in (k, v)))[0]
    assert_close(got, want, torch.float32, name="o, whole batch")
    assert len(calls) == (1 if kernel else 0)


def test_decode_step_gradients_match_attention():
    """Under autograd the decode step (many splits, a partial last one, per-sequence lengths) gives
    the gradients of the last row of causal attention over cache + token."""
    q, k, v = (x.requires_grad_(True) for x in _qkv(B=2, T=30, H=4, Hk=2))
    lens = torch.tensor([30, 17])
    o, lse = attention_decode(q[:, -1:], k, v, cache_seqlens=lens, num_splits=4, return_lse=True)
    w_o, w_l = torch.randn_like(o), torch.randn_like(lse)
    got = torch.autograd.grad((o * w_o).sum() + (lse * w_l).sum(), (q, k, v))
    want = []
    for b, n in enumerate(lens.tolist()):
        kb, vb = (x[b : b + 1, :n].repeat_interleave(2, 2) for x in (k, v))
        ro, rl = _partial(q[b : b + 1, -1:], kb, vb)
        want.append((ro * w_o[b : b + 1]).sum() + (rl * w_l[b : b + 1]).sum())
    want = torch.autograd.grad(sum(want), (q, k, v))
    for name, a, r in zip("qkv", got, want, strict=True):
        assert_close(a, r, F64, name=f"d{name}")


def test_decode_bad_inputs():
    q, k, v = _qkv(T=6)
    with pytest.raises(ValueError, match=r"q must have shape \[B, 1, H, K\]"):
        attention_decode(q, k, v)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        attention_decode(q[:, :1], k, v, cache_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="num_splits must be None or an int >= 1"):
        attention_decode(q[:, :1], k, v, num_splits=0)


@pytest.mark.parametrize(("causal", "window"), [(True, None), (False, None), (True, 20)])
@pytest.mark.parametrize("V", [6, 8])  # K == V also runs pieces through torch's fused kernel
@pytest.mark.parametrize("pieces", ["default", "small"])
def test_block_sparse_matches_reference_with_gradients(causal, window, V, pieces, monkeypatch):
    if pieces == "small":  # several pieces per group: 1 row (matmul path) or 6 / c rows (fused)
        monkeypatch.setattr(sparse_mod, "PIECE", 8 * 8)
        monkeypatch.setattr(sparse_mod, "FUSED_PIECE", 6 * 8 * 8)
    q, k, v = (x.requires_grad_(True) for x in _qkv(T=45, Hk=2, V=V))
    mask = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    mask |= torch.eye(6, dtype=torch.bool)  # most rows keep their diagonal: the fused pieces
    res = {}
    for mode in ("reference", "chunk"):
        o, lse = attention(q, k, v, causal=causal, window=window, block_mask=mask, mode=mode, chunk_size=8,
                           return_lse=True)  # fmt: skip
        lse = torch.where(torch.isfinite(lse), lse, 0.0)  # rows that keep no visible key: +inf
        g_o = torch.autograd.grad((o * o).sum(), [q, k, v], retain_graph=True)  # no gradient on lse
        res[mode] = (o, lse, *g_o, *torch.autograd.grad((o * o).sum() + (lse * lse).sum(), [q, k, v]))
    names = ["o", "lse", "dq", "dk", "dv", "dq with lse", "dk with lse", "dv with lse"]
    for name, got, ref in zip(names, res["chunk"], res["reference"], strict=True):
        assert_close(got, ref, F64, name=f"block-sparse {name}")


def test_block_sparse_pieces_with_per_row_masks_are_cut_at_the_matmul_size(monkeypatch):
    # pieces whose rows have different token masks (window 20 cuts several slots of a row) run the
    # matmul path and are cut at PIECE; pieces that share the diagonal's mask (the fused kernel)
    # keep the larger size. 8-token blocks, PIECE = 8 rows of one block, fused pieces 48
    monkeypatch.setattr(sparse_mod, "PIECE", 8 * 8 * 8)
    big = 48 * 8 * 8
    mask = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    mask |= torch.eye(8, dtype=torch.bool)
    for window, T in ((20, 64), (None, 61)):
        plan = sparse_mod._Plan(mask, T, 8, True, window, piece=big)
        rows = torch.cat([r for r, _, _ in plan.pieces])
        assert len(rows) == len(rows.unique()) == 4 * 8  # every row in exactly one piece
        per_pair = [(len(r), c.shape[1]) for r, c, m in plan.pieces if m is not None and m[0] is not None]
        shared = [(len(r), c.shape[1]) for r, c, m in plan.pieces if m is None or m[0] is None]
        if window is not None:
            assert per_pair and all(n <= max(1, 8 // c) for n, c in per_pair)
        else:
            assert any(n > max(1, 8 // c) for n, c in shared)


def test_block_sparse_full_mask_is_dense_and_cost_follows_the_kept_blocks():
    q, k, v = _qkv(B=1, T=64, H=2, Hk=2, dtype=torch.float32)
    full = torch.ones(1, 2, 4, 4, dtype=torch.bool)
    assert_close(attention(q, k, v, block_mask=full, chunk_size=16), attention(q, k, v, chunk_size=16),
                 torch.float32, name="full block mask")  # fmt: skip
    from subquad.ops.attention.sparse import _Plan

    diag = torch.eye(4, dtype=torch.bool).expand(1, 2, 4, 4)
    assert _Plan(full, 64, 16, True, None).kept == 2 * 10  # causal: only blocks J <= I are kept
    assert _Plan(diag, 64, 16, True, None).kept == 2 * 4
    with pytest.raises(ValueError, match=r"block_mask must have shape \[B, H, nb, nb\]"):
        attention(q, k, v, block_mask=full[..., :3], chunk_size=16)
    with pytest.raises(TypeError, match="block_mask must be a bool"):
        attention(q, k, v, block_mask=full.float(), chunk_size=16)


def test_block_sparse_index_lists_are_the_same_mask():
    """Per-query-block index lists (-1 empty, repeats allowed) select the same blocks as the bool
    mask built from them by hand, forward and gradients; bad lists name the argument."""
    from subquad.ops.attention import block_indices_to_mask

    g = torch.Generator().manual_seed(4)
    idx = torch.randint(-1, 6, (2, 4, 6, 3), generator=g)
    idx[..., 0] = torch.arange(6).view(1, 1, 6)  # every query block keeps its diagonal
    mask = torch.zeros(2, 4, 6, 6, dtype=torch.bool)
    for b, h, i, s in itertools.product(range(2), range(4), range(6), range(3)):
        if idx[b, h, i, s] >= 0:
            mask[b, h, i, idx[b, h, i, s]] = True
    assert torch.equal(block_indices_to_mask(idx, 6), mask)
    res = []
    for bm in (idx, mask):
        q, k, v = (x.requires_grad_(True) for x in _qkv(T=45, Hk=2, V=6))
        o = attention(q, k, v, block_mask=bm, chunk_size=8)
        res.append((o, *torch.autograd.grad((o * o).sum(), [q, k, v])))
    for name, got, ref in zip(["o", "dq", "dk", "dv"], *res, strict=True):
        assert_close(got, ref, F64, name=f"index lists {name}")
    q, k, v = _qkv(T=45, Hk=2, V=6)
    for bad, exc, match in (
        (idx.clamp(max=5) + 1, ValueError, r"block indices must lie in \[0, nb\) = \[0, 6\)"),
        (idx.clamp(min=-1) - 1, ValueError, "or be -1"),
        (idx[:, :, :5], ValueError, r"block_mask as index lists must have shape \[B, H, nb, S\]"),
        (idx.int(), TypeError, "block_mask must be a bool torch.Tensor .* or int64 index lists"),
    ):
        with pytest.raises(exc, match=match):
            attention(q, k, v, block_mask=bad, chunk_size=8)
