"""``subquad bench all``: every part runs end to end at toy sizes, results.json holds what the
report shows, and the literature checks / recommendations are computed from the numbers."""

from __future__ import annotations

import copy
import json

import pytest

from subquad.bench.all import AllConfig, LMRace, checks, preset, report, run_all, which_mixer

TASK = dict(
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    lrs=(1e-3,),
    num_train=64,
    num_test=16,
    batch_size=8,
    max_steps=4,
    eval_every=2,
    seeds=(0,),
)


def toy(parts=("recall", "state", "lm", "speed", "decode")):
    return AllConfig(
        preset="quick",
        parts=parts,
        lm=LMRace(
            patterns=("N", "A"),
            hidden_size=32,
            num_layers=1,
            seq_len=32,
            batch_size=4,
            vocab_size=300,
            minutes=0.03,
            eval_every=2,
            eval_tokens=256,
        ),
        speed_lens=(64,),
        speed_repeats=1,
        decode_patterns=("A", "N"),
        decode_contexts=(32,),
        recall_overrides=dict(
            TASK,
            settings=(
                {"seq_len": 16, "num_pairs": 2, "vocab_size": 32},
                {"seq_len": 32, "num_pairs": 4, "vocab_size": 32},
            ),
            mixers=("attention", "linear_attn", "deltanet", "swa"),
            window=8,
        ),
        state_overrides=dict(TASK, mixers=("deltanet", "deltanet_neg"), test_settings=({"seq_len": 16},)),
        speed_overrides=dict(ops=("linear_attn",), backward=False, sdpa_max_len=64),
        decode_overrides=dict(hidden_size=32, num_layers=1, num_heads=2, steps=2, warmup=1, vocab_size=64),
    )


def test_bench_all_runs_every_part_and_the_report_comes_from_the_json(tmp_path):
    pytest.importorskip("tokenizers")
    from subquad.data.corpora import load_corpus

    try:
        load_corpus("shakespeare", download=False)
    except Exception:
        parts = ("recall", "state", "speed", "decode")
    else:
        parts = ("recall", "state", "lm", "speed", "decode")
    results = run_all(toy(parts), tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["parts"]) == set(parts) and set(saved["wall_s"]) == set(parts)
    text = (tmp_path / "report.md").read_text()
    assert "Which mixer for which job" in text and "Effects the literature reports" in text
    # the report is a function of the JSON alone: regenerate it from the saved copy
    assert report(saved, tmp_path) == text
    claims = {c["claim"].split(" ")[0] for c in checks(saved)}
    assert {"softmax", "delta-rule", "sliding-window", "parity"} <= claims
    assert any("Recall" in line for line in which_mixer(results))


def test_checks_follow_the_numbers():
    """Change the recorded accuracies and the verdicts change: the checks read the numbers."""

    def rec(mixer, seq_len, acc, state=100, extra=None):
        best = {"test": acc, **(extra or {})}
        return {
            "setting": {"seq_len": seq_len, "num_pairs": 4, "vocab_size": 64},
            "mixer": mixer,
            "accuracy": acc,
            "state_bytes": state,
            "best": best,
            "seed": 0,
        }

    recall = {
        "config": {"threshold": 0.99, "window": 16},
        "best": [
            rec("attention", 8, 1.0, 600),
            rec("deltanet", 8, 1.0),
            rec("linear_attn", 8, 0.9),
            rec("swa", 8, 1.0),
            rec("attention", 64, 0.9, 5000),
            rec("deltanet", 64, 0.9),
            rec("linear_attn", 64, 0.5),
            rec("swa", 64, 0.3),
        ],
    }
    parity = {
        "config": {"threshold": 0.99, "task": "parity"},
        "best": [
            rec("deltanet", 16, 1.0, extra={"test_seq_len64": 0.6}),
            rec("deltanet_neg", 16, 1.0, extra={"test_seq_len64": 1.0}),
        ],
    }
    results = {"parts": {"recall": {"sections": [recall]}, "state": {"sections": [parity]}}}
    verdicts = {c["claim"].split(" ")[0]: c["holds"] for c in checks(results)}
    assert verdicts == {"softmax": False, "delta-rule": True, "sliding-window": True, "parity": True}
    broken = copy.deepcopy(results)
    broken["parts"]["recall"]["sections"][0]["best"][5]["accuracy"] = 0.4  # deltanet below linear
    broken["parts"]["state"]["sections"][0]["best"][0]["best"]["test_seq_len64"] = 1.0  # no-neg extrapolates
    verdicts = {c["claim"].split(" ")[0]: c["holds"] for c in checks(broken)}
    assert verdicts["delta-rule"] is False and verdicts["parity"] is False
    near = copy.deepcopy(results)  # a few slips at 4x the length still count as extrapolating ...
    near["parts"]["state"]["sections"][0]["best"][1]["best"]["test_seq_len64"] = 0.97
    assert {c["claim"].split(" ")[0]: c["holds"] for c in checks(near)}["parity"] is True
    near["parts"]["state"]["sections"][0]["best"][0]["best"]["test_seq_len64"] = 0.8  # ... not failing
    assert {c["claim"].split(" ")[0]: c["holds"] for c in checks(near)}["parity"] is False


def test_presets_and_bad_parts():
    assert preset("quick").parts == ("recall", "state", "lm", "speed", "decode")
    assert preset("standard").lm.minutes > preset("quick").lm.minutes
    with pytest.raises(ValueError, match="preset must be"):
        preset("huge")
    with pytest.raises(ValueError, match="parts must be"):
        AllConfig(parts=("recall", "nope"))
    with pytest.raises(ValueError, match="divides num_layers=2"):
        LMRace(patterns=("GGGA",), num_layers=2)
    for name in ("quick", "standard", "paper"):  # every preset's LM patterns fit its depth
        lm = preset(name).lm
        assert all(lm.num_layers % len(p) == 0 for p in lm.patterns)
