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


def test_bench_from_the_shell_reruns_with_kept_buffers(tmp_path):
    """``subquad bench ...`` typed in a shell reruns itself with glibc malloc keeping freed buffers,
    unless SUBQUAD_BENCH_ALLOCATOR is set; the setting is recorded with the results and named."""
    import os
    import platform
    import subprocess
    import sys

    from subquad.bench.machine import ALLOCATOR_ENV, BENCH_TUNABLES, allocator_label

    args = ["bench", "speed", "--quick", "--seq-lens", "16", "--heads", "1", "--head-dim", "4"]
    args += ["--ops", "gla", "--modes", "chunk", "--no-backward", "--repeats", "1", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, "GLIBC_TUNABLES")}
    glibc = platform.libc_ver()[0] == "glibc"
    # "preset": the tunables already typed in the shell are kept as they are, not written twice
    for setting in (None, "system", "preset"):
        out = tmp_path / str(setting)
        run_env = {
            None: env,
            "system": {**env, ALLOCATOR_ENV: "system"},
            "preset": {**env, "GLIBC_TUNABLES": BENCH_TUNABLES},
        }[setting]
        script = "import sys; from subquad.cli import main; sys.argv = ['subquad', *sys.argv[1:]]; main()"
        proc = subprocess.run(
            [sys.executable, "-c", script, *args, "--out", str(out)],
            env=run_env, capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        machine = json.loads((out / "speed.json").read_text())["machine"]
        kept = setting != "system" and glibc
        label = "keep" if kept else "system" if setting == "system" else None
        assert (machine["allocator"]["glibc_tunables"] == BENCH_TUNABLES) == (kept or setting == "preset")
        assert machine["allocator"]["bench_allocator"] == label
        assert allocator_label(machine) in proc.stdout
        assert ("kept for reuse" in allocator_label(machine)) == (kept or setting == "preset")


def test_bench_tunables_take_effect():
    """The tunables string is one glibc reads: with it a 64 MB tensor comes from the heap (no
    mmapped bytes in ``mallinfo2``), without it from its own mapping."""
    import ctypes
    import os
    import platform
    import subprocess
    import sys

    import pytest

    from subquad.bench.machine import BENCH_TUNABLES

    if platform.libc_ver()[0] != "glibc" or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    script = (
        "import ctypes, torch\n"
        "class M(ctypes.Structure): _fields_ = [(n, ctypes.c_size_t) for n in "
        "('arena','ordblks','smblks','hblks','hblkhd','usmblks','fsmblks','uordblks','fordblks','keepcost')]\n"
        "f = ctypes.CDLL('libc.so.6').mallinfo2; f.restype = M\n"
        "x = torch.empty(1 << 24); x.fill_(1.0)\n"
        "print(f().hblkhd)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    mapped = {}
    for name, run_env in (("default", env), ("bench", {**env, "GLIBC_TUNABLES": BENCH_TUNABLES})):
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        mapped[name] = int(proc.stdout.split()[-1])
    assert mapped["default"] >= 1 << 26 and mapped["bench"] == 0, mapped


def test_allocator_label():
    from subquad.bench.machine import BENCH_TUNABLES, allocator_label

    assert allocator_label({}) == "allocator not recorded"
    kept = allocator_label({"allocator": {"glibc_tunables": BENCH_TUNABLES}})
    assert "kept for reuse" in kept
    assert "defaults" in allocator_label({"allocator": {"glibc_tunables": None}})
