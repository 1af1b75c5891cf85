"""Training: packing, exact resume (in process and after SIGKILL), atomic and verified checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from subquad.data import TokenStream, load_corpus, split_documents, train_bpe, unigram_cross_entropy
from subquad.train import CheckpointError, TrainConfig, latest_checkpoint, learning_rate, train

TINY = dict(
    corpus="bible",
    layer_pattern="GA",
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    vocab_size=300,
    seq_len=32,
    batch_size=2,
    warmup_steps=2,
    eval_every=4,
    eval_tokens=256,
    checkpoint_every=2,
    max_docs=3,
    progress=False,
    threads=1,
)


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_token_stream_packs_documents_with_boundaries():
    stream = TokenStream([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, seq_len=4)
    assert stream.tokens.tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    ids, cu = stream.batch([0, 1])
    assert ids.tolist() == [[1, 2, 3, 0, 4, 5, 0, 6]]
    assert cu.tolist() == [0, 4, 7, 8]  # a document end at 4 and 7, the window edge at 8
    order = stream.window_ids(0, 6, seed=3)
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [0, 1, 2]  # a permutation per epoch
    assert order == stream.window_ids(0, 6, seed=3) and order[2:5] == stream.window_ids(2, 3, seed=3)


def test_split_is_disjoint_and_unigram_baseline():
    docs = load_corpus("bible")
    train_docs, held = split_documents(docs)
    assert len(train_docs) + len(held) == len(docs) == 66
    assert not {d.name for d in train_docs} & {d.name for d in held}
    uniform = unigram_cross_entropy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1]), 4)
    assert abs(uniform - math.log(4.0)) < 1e-12


def test_tokenizer_round_trips_bytes():
    tok = train_bpe(["hello world, hello there"] * 20, vocab_size=300)
    text = "hello wörld ✓"
    assert tok.decode(tok(text).input_ids) == text
    assert tok.eos_token_id == 0


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(out_dir="x", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.55) and learning_rate(cfg, 110) == pytest.approx(0.1)


def test_resume_continues_exactly(tmp_path):
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), max_steps=8, **TINY))
    train(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=8, **TINY), stop_after_steps=3)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step-00000003"
    resumed = train(TrainConfig(out_dir=str(tmp_path / "b"), max_steps=8, **TINY), resume=True)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(out_dir=str(tmp_path / "a"), max_steps=8, **TINY))


def _cli(out: Path, steps: int, resume: bool = False) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "subquad",
        "train",
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--corpus",
        "bible",
        "--pattern",
        "GA",
        "--hidden-size",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--vocab-size",
        "300",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--warmup-steps",
        "2",
        "--eval-every",
        "50",
        "--eval-tokens",
        "256",
        "--checkpoint-every",
        "1",
        "--max-docs",
        "3",
        "--threads",
        "1",
        "--no-progress",
    ]
    return args + (["--resume"] if resume else [])


def test_sigkill_mid_run_then_resume_gives_the_same_curve(tmp_path):
    steps = 60
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(tmp_path / "full", steps), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(
        _cli(tmp_path / "killed", steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    pointer = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists() and int(pointer.read_text().strip().split("-")[1]) >= 5:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(pointer.read_text().strip().split("-")[1])
    assert killed_at < steps
    subprocess.run(_cli(tmp_path / "killed", steps, resume=True), check=True, env=env, capture_output=True)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "killed")
    assert sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_corrupted_or_truncated_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out_dir=str(out), max_steps=2, **TINY))
    ckpt = latest_checkpoint(out / "checkpoints")
    model_file = ckpt / "model.safetensors"
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        train(TrainConfig(out_dir=str(out), max_steps=4, **TINY), resume=True)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    model_file.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(TrainConfig(out_dir=str(out), max_steps=4, **TINY), resume=True)
    result = subprocess.run(
        [*_cli(out, 4, resume=True)[:-1], "--checkpoint-every", "2", "--resume"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "SHA-256" in result.stderr


def test_bad_train_config_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(out_dir="x", batch_size=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(out_dir="x", min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="corpus"):
        load_corpus("nope")


def test_bf16_autocast_and_accumulation_train(tmp_path):
    opts = {**TINY, "batch_size": 1, "grad_accum": 2, "bf16": True}
    summary = train(TrainConfig(out_dir=str(tmp_path / "bf16"), max_steps=3, **opts))
    assert summary["step"] == 3 and math.isfinite(summary["eval_loss"])
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)
