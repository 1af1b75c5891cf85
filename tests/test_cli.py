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


def test_bench_from_the_shell_runs_with_huge_pages(tmp_path):
    """``subquad bench ...`` typed in a shell reruns itself with PyTorch's huge-page switch unless
    the variable is set; the setting is recorded with the results and named in the table."""
    import os
    import subprocess
    import sys

    from subquad.bench.machine import THP_ENV, huge_pages, huge_pages_label

    args = ["bench", "speed", "--quick", "--seq-lens", "16", "--heads", "1", "--head-dim", "4"]
    args += ["--ops", "gla", "--modes", "chunk", "--no-backward", "--repeats", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != THP_ENV}
    for setting, expected in ((None, "1"), ("0", "0")):
        out = tmp_path / str(setting)
        run_env = env if setting is None else {**env, THP_ENV: setting}
        script = "import sys; from subquad.cli import main; sys.argv = ['subquad', *sys.argv[1:]]; main()"
        proc = subprocess.run(
            [sys.executable, "-c", script, *args, "--out", str(out)],
            env=run_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        machine = json.loads((out / "speed.json").read_text())["machine"]
        if setting is None and huge_pages()["kernel"] not in ("always", "madvise"):
            expected = None  # nothing to gain: no rerun
        assert machine["huge_pages"]["env"] == expected
        assert huge_pages_label(machine) in proc.stdout


def test_huge_pages_label():
    from subquad.bench.machine import huge_pages_label

    assert huge_pages_label({}) == "huge pages not recorded"
    on = huge_pages_label({"huge_pages": {"env": "1", "kernel": "madvise"}})
    assert on.startswith("huge pages on")
    assert huge_pages_label({"huge_pages": {"env": "1", "kernel": "never"}}).startswith("huge pages off")
    assert huge_pages_label({"huge_pages": {"env": "0", "kernel": "always"}}).startswith("huge pages off")
