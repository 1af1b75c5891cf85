"""subquad bench kv: config validation, the case list and the report/plot computed from results."""

from __future__ import annotations

import pytest

from subquad.bench.kv import KVBenchConfig, _cases, format_report, plot_kv, quick_config, summarize


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown policies"):
        KVBenchConfig(policies=("snapkv", "nope"))
    with pytest.raises(ValueError, match="fractions removed"):
        KVBenchConfig(ratios=(0.5, 1.0))
    with pytest.raises(ValueError, match="quants"):
        KVBenchConfig(quants=("int3",))
    assert quick_config().contexts == (1024, 2048)


def test_cases_cover_full_every_policy_ratio_and_quantization():
    cfg = KVBenchConfig(policies=("snapkv", "h2o"), ratios=(0.5, 0.75), quants=("int8",), quant_ratios=(0.5,))
    assert list(_cases(cfg)) == [
        ("full", 0.0),
        ("snapkv", 0.5),
        ("snapkv", 0.75),
        ("h2o", 0.5),
        ("h2o", 0.75),
        ("int8", 0.0),
        ("snapkv+int8", 0.5),
    ]


def fake_result() -> dict:
    rows = []
    for mode in ("question_in_prompt", "question_after"):
        for context in (1024, 4096):
            for depth in (0.2, 0.8):
                for policy, ratio, correct, kept in (
                    ("full", 0.0, True, 1.0),
                    ("snapkv", 0.5, mode == "question_in_prompt" or depth > 0.5, 0.504),
                    ("streamingllm", 0.5, depth > 0.5, 0.51),
                    ("int8", 0.0, True, 0.27),
                ):
                    rows.append(
                        {
                            "mode": mode,
                            "context": context,
                            "depth": depth,
                            "policy": policy,
                            "ratio": ratio,
                            "correct": correct,
                            "kept_fraction": kept,
                        }
                    )
    ppl = [
        {"policy": "full", "ratio": 0.0, "ppl": 20.0, "kept_fraction_after_context": 1.0},
        {"policy": "snapkv", "ratio": 0.5, "ppl": 22.0, "kept_fraction_after_context": 0.5},
    ]
    decode = [
        {"cache": c, "step": s, "held_tokens_max": 10, "kv_bytes": 1000 * s, "rss_bytes": 2**30}
        for c in ("dynamic", "snapkv")
        for s in (128, 256)
    ]
    return {
        "config": {"decode_every": 64, "decode_tokens": 256},
        "passkey": rows,
        "perplexity": ppl,
        "decode": decode,
    }


def test_summary_is_computed_from_the_rows(tmp_path):
    result = fake_result()
    result["summary"] = summarize(result)
    rows = result["summary"]["passkey_table"]
    table = {(t["mode"], t["context"], t["policy"], t["ratio"]): t for t in rows}
    assert table[("question_after", 4096, "snapkv", 0.5)]["accuracy"] == 0.5
    assert table[("question_in_prompt", 4096, "snapkv", 0.5)]["relative_accuracy"] == 1.0
    assert table[("question_after", 1024, "streamingllm", 0.5)]["n"] == 2
    worst = result["summary"]["worst_byte_fraction_error"]
    assert set(worst) == {"snapkv", "streamingllm"}  # quantized cases hold fewer bytes per token
    assert worst["streamingllm"] == pytest.approx(0.02)
    report = format_report(result)
    assert "| snapkv | 0.5 | 1.00 | 1.00 | 0.504 |" in report
    assert "| snapkv | 0.5 | 0.50 | 0.50 | 0.504 |" in report
    assert "| dynamic | 256 |" in report
    png = plot_kv(result, str(tmp_path / "kv.png"))
    assert png and (tmp_path / "kv.png").stat().st_size > 1000
