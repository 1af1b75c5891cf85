"""The speed benchmark's harness: structure of its results, its config checks, its memory probe.

Benchmarks are not timed tests: nothing here asserts a speed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from subquad.bench.machine import PeakMemory, measure_peak
from subquad.bench.plot import plot_speed
from subquad.bench.speed import SpeedConfig, _default_chunk_size, format_table, run_speed
from subquad.registry import list_ops


def test_tiny_run_covers_every_op_mode_and_sdpa(tmp_path):
    cfg = SpeedConfig(
        seq_lens=(32, 64),
        heads=2,
        head_dim=8,
        repeats=1,
        sdpa_max_len=32,
        backward_max_len_recurrent=32,
        out=str(tmp_path),
    )
    result = run_speed(cfg, progress=False)
    data = json.loads((tmp_path / "speed.json").read_text())
    assert data["config"]["seq_lens"] == [32, 64]
    assert data["machine"]["matmul_peak_gflops"] > 0
    rows = {(r["name"], r["mode"], r["T"]): r for r in data["rows"]}
    for spec in list_ops():
        for mode in [m for m in ("chunk", "recurrent") if m in spec.modes]:
            for T in (32, 64):
                r = rows[(spec.name, mode, T)]
                assert r["fwd_s"] > 0 and r["fwd_gflops"] > 0 and 0 < r["fwd_peak_fraction"]
                assert r["per_token_vs_shortest"] > 0
                if mode == "recurrent" and T == 64:
                    assert "fwdbwd_s" not in r and "backward-max-len-recurrent" in r["backward_skipped"]
                else:
                    assert r["fwdbwd_s"] > 0
    assert "fwd_speedup_vs_sdpa" in rows[("gla", "chunk", 32)]
    # SDPA past its limit is recorded as skipped with the reason, never dropped
    assert "sdpa-max-len" in rows[("sdpa", "sdpa", 64)]["skipped"]
    table = format_table(result)
    assert "skipped" in table and "gla" in table
    png = plot_speed(result, os.path.join(tmp_path, "speed.png"))
    assert os.path.getsize(png) > 1000


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seq_lens", (0,)),
        ("heads", 0),
        ("dtype", "int8"),
        ("modes", ("fast",)),
        ("ops", ("no_such_op",)),
        ("repeats", 0),
        ("variants", "some"),
        ("device", "tpu"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SpeedConfig(**{field: value})


def test_named_variants_are_measured(tmp_path):
    cfg = SpeedConfig(
        seq_lens=(64,), heads=2, head_dim=8, repeats=1, ops=("attention",), variants="window512",
        backward=False, out=str(tmp_path),
    )  # fmt: skip
    rows = [r for r in run_speed(cfg, progress=False)["rows"] if r["name"] == "attention"]
    assert [r["variant"] for r in rows] == ["window512"]
    # in the table every variant but the default is named, also one called "causal" (SDPA's row,
    # whose variant is its causal form, stays plain), and long names keep their columns apart
    cfg = dataclasses.replace(cfg, ops=("neighborhood_attention",), variants="all")
    table = format_table(run_speed(cfg, progress=False))
    for label in ("neighborhood_attention ", "neighborhood_attention[causal] ", "sdpa "):
        assert any(line.startswith(label) for line in table.splitlines()), label


def test_peak_memory_probe_sees_a_known_allocation():
    probe = PeakMemory(torch.device("cpu"))
    if not probe.available:
        pytest.skip(probe.reason)

    def allocate():
        x = torch.ones(64 * 2**18)  # 64 MiB, touched
        return x.sum()

    peak = measure_peak(allocate, probe)
    assert 48 * 2**20 <= peak <= 96 * 2**20


def test_each_op_is_timed_at_its_own_default_chunk_size():
    """A registry wrapper that forwards ``**kwargs`` must not hide its op's default (attention's
    tiles of 256 were timed at 64: 555 ms instead of about 350 ms at T = 4096)."""
    import inspect

    from subquad import ops
    from subquad.registry import get_op

    for name in ("attention", "routing_attention", "gla", "delta_rule", "mom"):
        expected = inspect.signature(getattr(ops, name)).parameters["chunk_size"].default
        assert _default_chunk_size(get_op(name)) == expected
    # the delta rules (and MoM over them) pick their size per call, so the benchmark passes none
    # (MoM's None had read as "no default" and was timed at 64)
    assert _default_chunk_size(get_op("delta_rule")) is None
    assert _default_chunk_size(get_op("mom")) is None


def test_cpu_model_names_family_and_model(tmp_path, monkeypatch):
    """VMs may call every generation "AMD EPYC": the name carries the family and model numbers of
    the first processor block of /proc/cpuinfo, and stays the bare name where they are absent."""
    import builtins

    from subquad.bench import machine

    text = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n\n"
    text += "processor\t: 1\nmodel name\t: Other\ncpu family\t: 25\nmodel\t\t: 1\n"
    real_open = builtins.open
    for content, want in ((text, "AMD EPYC (cpu family 26, model 2)"), ("model name : Xeon\n", "Xeon")):
        path = tmp_path / "cpuinfo"
        path.write_text(content)
        monkeypatch.setattr(
            builtins, "open", lambda f, *a, p=path, **k: real_open(p if f == "/proc/cpuinfo" else f, *a, **k)
        )
        assert machine.cpu_model() == want
