"""The synthetic-task runner: records what it measured, and the report is computed from results.json."""

from __future__ import annotations

import json
import math

import pytest

from subquad.bench.task_report import recall_preset, report, state_preset, write_results
from subquad.bench.tasks import TaskBenchConfig, _rank, lr_at, run_task_bench


def tiny(task="mqar", **kw):
    settings = ({"seq_len": 16, "num_pairs": 2, "vocab_size": 32},) if task == "mqar" else ({"seq_len": 8},)
    opts = dict(
        task=task,
        settings=settings,
        mixers=("attention", "gla"),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        lrs=(1e-3,),
        num_train=64,
        num_test=16,
        batch_size=8,
        max_steps=4,
        eval_every=2,
    )
    opts.update(kw)
    return TaskBenchConfig(**opts)


def test_runner_records_runs_and_measured_state(tmp_path):
    result = run_task_bench(tiny(), progress=False)
    assert len(result["runs"]) == 2 and len(result["best"]) == 2
    by = {r["mixer"]: r for r in result["runs"]}
    # attention remembers every token (K and V per layer), GLA a fixed state: measured from the cache
    assert by["attention"]["state_bytes"] == 2 * 16 * 16 * 4
    assert by["gla"]["state_bytes"] == 2 * 4 * 8 * 4  # H=2, K=4 (expand_k 0.5), V=8, float32
    assert all(0 <= r["accuracy"] <= 1 and r["history"] for r in result["runs"])
    assert all(r["decode_tokens_per_s"] > 0 for r in result["runs"])
    results = {"benchmark": "recall", "machine": {}, "sections": [result]}
    write_results(results, tmp_path)
    text = report(json.loads((tmp_path / "results.json").read_text()), tmp_path)
    assert "| attention |" in text.replace("seq_len=16,num_pairs=2 | ", "| ")
    # the report follows the JSON: change a number there and the report changes with it
    results["sections"][0]["best"][0]["accuracy"] = 0.123456
    assert "0.123" in report(results, tmp_path)


def test_state_runner_evaluates_longer_sequences(tmp_path):
    cfg = tiny(task="parity", test_settings=({"seq_len": 24},))
    result = run_task_bench(cfg, progress=False)
    assert "test_seq_len24" in result["runs"][0]["best"]
    text = report({"benchmark": "state", "machine": {}, "sections": [result]}, tmp_path)
    assert "test_seq_len24" in text and (tmp_path / "parity.png").exists()


def test_first_seed_sweep_trains_other_seeds_at_the_winning_lr():
    cfg = tiny(mixers=("gla",), lrs=(1e-4, 3e-2), seeds=(0, 1, 2), lr_sweep="first_seed", max_steps=6)
    result = run_task_bench(cfg, progress=False)
    runs = [(r["seed"], r["lr"]) for r in result["runs"]]
    assert runs[:2] == [(0, 1e-4), (0, 3e-2)] and len(runs) == 4  # 2 lrs on seed 0, then seeds 1, 2
    swept = [r for r in result["runs"] if r["seed"] == 0]
    winner = max(swept, key=lambda r: _rank(r, cfg))["lr"]
    assert runs[2:] == [(1, winner), (2, winner)]
    assert sorted(r["seed"] for r in result["best"]) == [0, 1, 2]
    every = run_task_bench(tiny(mixers=("gla",), lrs=(1e-4, 3e-2), seeds=(0, 1)), progress=False)
    assert [(r["seed"], r["lr"]) for r in every["runs"]] == [(0, 1e-4), (0, 3e-2), (1, 1e-4), (1, 3e-2)]


def test_presets_and_bad_configs():
    assert recall_preset("quick").task == "mqar" and state_preset("quick", "s5").task == "s5"
    with pytest.raises(ValueError, match="preset"):
        recall_preset("huge")
    with pytest.raises(ValueError, match="unknown mixers"):
        tiny(mixers=("nope",))
    with pytest.raises(ValueError, match="task must be"):
        tiny(task="nope")
    with pytest.raises(ValueError, match="stop_when"):
        tiny(stop_when="first")
    with pytest.raises(ValueError, match="lr_sweep"):
        tiny(lr_sweep="best")
    with pytest.raises(ValueError, match="lr_schedule"):
        tiny(lr_schedule="linear")
    with pytest.raises(ValueError, match="seeds must be distinct"):
        tiny(seeds=(0, 0))
    assert state_preset("quick").stop_when == "all"  # extrapolation keeps training past the train length


def test_lr_schedules():
    cos, const = tiny(max_steps=100), tiny(max_steps=100, lr_schedule="constant")
    assert lr_at(const, 1.0, 10) == 0.5  # warmup
    assert lr_at(cos, 1.0, 10) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 10)))
    assert lr_at(const, 1.0, 20) == lr_at(const, 1.0, 100) == 1.0
    assert lr_at(cos, 1.0, 50) == pytest.approx(0.5) and lr_at(cos, 1.0, 100) == pytest.approx(0.0)


def test_rank_uses_every_split_when_every_split_must_pass():
    # both learning rates solve the training length; the second extrapolates better
    a = {"accuracy": 1.0, "best": {"test": 1.0, "test_seq_len64": 0.90}, "steps_to_threshold": 100}
    b = {"accuracy": 1.0, "best": {"test": 1.0, "test_seq_len64": 0.98}, "steps_to_threshold": 300}
    assert _rank(b, tiny(stop_when="all")) > _rank(a, tiny(stop_when="all"))
    assert _rank(a, tiny()) > _rank(b, tiny())  # in-distribution only: a is as accurate and faster


def test_rank_prefers_fewer_steps_among_runs_that_reached_the_threshold():
    # an early-stopped run's accuracy is wherever it first crossed 0.99; steps decide between them
    fast = {"accuracy": 0.991, "best": {"test": 0.991}, "steps_to_threshold": 200}
    slow = {"accuracy": 0.999, "best": {"test": 0.999}, "steps_to_threshold": 900}
    near = {"accuracy": 0.985, "best": {"test": 0.985}, "steps_to_threshold": None}
    far = {"accuracy": 0.400, "best": {"test": 0.400}, "steps_to_threshold": None}
    cfg = tiny()
    assert _rank(fast, cfg) > _rank(slow, cfg) > _rank(near, cfg) > _rank(far, cfg)
