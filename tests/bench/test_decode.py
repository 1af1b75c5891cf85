"""``subquad bench decode`` on a tiny model: rows, ratios and files are produced and consistent."""

from __future__ import annotations

import json

import pytest

from subquad.bench.decode import DecodeConfig, format_table, run_decode
from subquad.cli import main


def test_tiny_decode_run_writes_json_and_ratios(tmp_path):
    cfg = DecodeConfig(
        patterns=("A", "G", "S"),
        contexts=(16, 64),
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        window=8,
        vocab_size=64,
        steps=3,
        warmup=1,
        prefill_chunk=32,
        out=str(tmp_path),
        threads=1,
    )
    result = run_decode(cfg, progress=False)
    rows = {(r["pattern"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(p, c) for p in "AGS" for c in (16, 64)}
    # a recurrent model's cache does not grow with context; softmax attention's does; the window's is bounded
    assert rows["G", 16]["cache_bytes"] == rows["G", 64]["cache_bytes"]
    assert rows["A", 64]["cache_bytes"] > rows["A", 16]["cache_bytes"]
    assert rows["S", 64]["cache_used_bytes"] == rows["S", 16]["cache_used_bytes"]
    assert rows["A", 64]["speedup_vs_softmax"] == 1.0
    assert rows["G", 64]["cache_smaller_vs_softmax"] > 1
    saved = json.loads((tmp_path / "decode.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "x faster than A" in format_table(result)


def test_decode_cli_rejects_bad_patterns(tmp_path, capsys):
    assert main(["bench", "decode", "--patterns", "AZ", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown letters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="contexts"):
        DecodeConfig(contexts=(0,))
