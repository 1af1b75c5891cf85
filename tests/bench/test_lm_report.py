"""``subquad bench lm-report`` compares runs at equal steps and equal wall time from their files."""

from __future__ import annotations

import json
import math

from subquad.bench.lm_report import format_table, summarize
from subquad.cli import main


def fake_run(path, pattern, evals):
    path.mkdir()
    (path / "run.json").write_text(json.dumps({"config": {"layer_pattern": pattern}, "unigram_loss": 6.0}))
    lines = [{"step": s, "loss": 5.0, "tokens_per_s": 100.0} for s, _, _ in evals]
    lines += [
        {"step": s, "eval_loss": loss, "eval_ppl": math.exp(loss), "elapsed_s": t} for s, loss, t in evals
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_equal_step_and_equal_time(tmp_path, capsys):
    fake_run(tmp_path / "fast", "G", [(50, 5.0, 100.0), (100, 4.5, 200.0), (150, 4.2, 300.0)])
    fake_run(tmp_path / "slow", "A", [(50, 4.9, 150.0), (100, 4.4, 300.0)])
    summary = summarize([tmp_path / "fast", tmp_path / "slow"])
    assert summary["equal_step"] == 100 and summary["equal_time_s"] == 300.0
    fast, slow = summary["rows"]
    assert math.isclose(fast["ppl_at_equal_step"], math.exp(4.5))
    assert math.isclose(fast["ppl_at_equal_time"], math.exp(4.2)) and fast["time_point_step"] == 150
    assert math.isclose(slow["ppl_at_equal_time"], math.exp(4.4))
    assert "ppl @ 300 s" in format_table(summary)
    assert main(["bench", "lm-report", str(tmp_path / "fast"), str(tmp_path / "nope")]) == 2
    assert "not a subquad train run" in capsys.readouterr().err
