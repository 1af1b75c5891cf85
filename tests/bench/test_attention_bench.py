"""``subquad bench attention`` at toy sizes: every section is measured, ratios come from the same
run, and the structured inputs have the few strong matches they promise."""

from __future__ import annotations

import json

import pytest
import torch

from subquad.bench.attention import (
    OWN_TILING,
    AttentionBenchConfig,
    quick_config,
    random_block_mask,
    run_attention_bench,
    structured_qkv,
    write_results,
)


def test_structured_inputs_concentrate_attention():
    T = 1024
    q, k, _ = structured_qkv(T, heads=2, head_dim=64, segment=128)
    s = torch.einsum("thd,shd->hts", q[0, -32:], k[0]) / 8
    p = s.masked_fill(torch.arange(T) > torch.arange(T - 32, T)[:, None], float("-inf")).softmax(-1)
    # retrieval head 0: one referenced 128-token segment (+ sinks); copy head 1: one key (+ sinks)
    assert p[0].topk(128 + 4, -1).values.sum(-1).min() > 0.95
    assert p[1].topk(1 + 4, -1).values.sum(-1).min() > 0.9


def test_random_mask_density_and_mandatory_blocks():
    m = random_block_mask(1, 4, 32, 0.2, seed=3)
    vis = torch.ones(32, 32, dtype=torch.bool).tril()
    frac = (m & vis).sum() / (4 * vis.sum())
    assert abs(float(frac) - 0.2) < 0.05
    assert m[..., torch.eye(32, dtype=torch.bool)].all() and m[..., :, 0].all() and not m[..., ~vis].any()


def test_bench_runs_every_section(tmp_path):
    cfg = quick_config(
        heads=2, head_dim=16, exact_lens=(256,), memory_lens=(256,), T=512, decode_len=512, block_size=64,
        window=64, repeats=1, estimators={"quest": {"topk": 3}, "xattention": {"stride": 8}},
        hyper={"block_size": 32, "num_samples": 32, "min_seq_len": 128}, routing_clusters=4,
    )  # fmt: skip
    result = run_attention_bench(cfg, progress=False)
    sections = {r["section"] for r in result["rows"]}
    assert sections == {"exact", "memory", "decode", "dense", "window", "sparse", "approx"}
    approx = {r["method"]: r for r in result["rows"] if r["section"] == "approx"}
    assert set(approx) == {"hyper", "routing"}
    assert all(0 <= r["rel_err"] < 2 and r["fwd_speedup_vs_sdpa"] > 0 for r in approx.values())
    sparse = {r["method"]: r for r in result["rows"] if r["section"] == "sparse"}
    assert set(sparse) == {"quest", "xattention", "random", f"random, {OWN_TILING}"}
    # the own-tiling rows time the same computation as the kernel rows: same output, same density
    assert sparse["random"]["rel_err"] == pytest.approx(sparse[f"random, {OWN_TILING}"]["rel_err"], rel=1e-4)
    exact = {r["method"] for r in result["rows"] if r["section"] == "exact"}
    assert exact == {"sdpa", "attention", OWN_TILING}
    windows = {r["method"] for r in result["rows"] if r["section"] == "window"}
    assert windows == {"attention window=64", "attention window=64 sinks=4", f"{OWN_TILING} window=64"}
    for r in sparse.values():
        assert 0 < r["density"] <= 1 and r["rel_err"] >= 0 and r["fwd_speedup_vs_sdpa"] > 0
    assert sparse["quest"]["estimate_over_fwd"] == pytest.approx(
        sparse["quest"]["estimate_s"] / sparse["quest"]["fwd_s"]
    )
    # each row at T is against SDPA timed right before and right after it: the mean of the dense
    # row's sample before (its median for the first row) and the one taken after the row
    (dense,) = [r for r in result["rows"] if r["section"] == "dense"]
    at_T = [r for r in result["rows"] if r["section"] in ("window", "sparse", "approx")]
    for key in ("fwd_s", "fwdbwd_s"):
        samples = dense["samples"][key]
        assert len(samples) == len(at_T) and all(t > 0 for t in samples)
        for i, r in enumerate(at_T):
            before = dense[key] if i == 0 else samples[i - 1]
            assert r[f"sdpa_{key}"] == pytest.approx((before + samples[i]) / 2)
            assert r[f"{key[:-2]}_speedup_vs_sdpa"] == pytest.approx(r[f"sdpa_{key}"] / r[key])
    dec = [r for r in result["rows"] if r["section"] == "decode"]
    assert all(r["rel_err"] < 1e-4 for r in dec)
    path, md, _ = write_results(result, str(tmp_path))
    from pathlib import Path

    assert json.loads(Path(path).read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    report = Path(md).read_text()
    assert "Sliding window and block-sparse" in report and "SDPA over the section" in report
    peak = result["machine"]["matmul_peak_gflops"]
    assert peak > 0 and f", float32 matmul peak {peak:.0f} GFLOP/s, " in report


def test_bad_config():
    with pytest.raises(ValueError, match="unknown estimators"):
        AttentionBenchConfig(estimators={"magic": {}})
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        AttentionBenchConfig(T=0)
