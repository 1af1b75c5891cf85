"""The ``subquad`` command line."""

from __future__ import annotations

import json

from subquad.cli import main
from subquad.registry import list_ops


def test_list_names_every_op(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in list_ops():
        assert spec.name in out and spec.url in out


def test_bench_speed_end_to_end(tmp_path, capsys):
    args = ["bench", "speed", "--quick", "--seq-lens", "16,32", "--heads", "1", "--head-dim", "4"]
    args += ["--ops", "gla", "--repeats", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gla" in out and "sdpa" in out
    data = json.loads((tmp_path / "speed.json").read_text())
    assert {r["name"] for r in data["rows"]} == {"gla", "sdpa"}
    assert (tmp_path / "speed.png").exists()


def test_bench_speed_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", "speed", "--dtype", "int8", "--out", str(tmp_path)]) == 2
    assert "dtype" in capsys.readouterr().err
