"""``subquad train``: a small, readable language-model training loop on real text.

AdamW with decoupled weight decay, linear warmup then cosine decay to ``min_lr_ratio * lr``,
gradient clipping, gradient accumulation, optional bfloat16 autocast, packed documents with
``cu_seqlens`` (no attention across documents), held-out loss and perplexity, a progress bar with
loss and tokens/s, atomic checkpoints (``subquad.train.checkpoint``) and an exact ``--resume``.

Outputs in ``out_dir``: ``tokenizer.json`` (+ HF tokenizer files), ``run.json`` (config, corpus
stats, unigram baseline), ``metrics.jsonl`` (one line per step and per evaluation),
``checkpoints/`` and, at the end, the model (``config.json`` + ``model.safetensors``) loadable
with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from subquad.data import (
    TokenStream,
    load_corpus,
    load_tokenizer,
    split_documents,
    train_bpe,
    unigram_cross_entropy,
)
from subquad.models import SubquadConfig, SubquadForCausalLM
from subquad.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on (saved in ``run.json`` and every checkpoint)."""

    out_dir: str
    corpus: str = "shakespeare"
    layer_pattern: str = "G"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    window: int = 128
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 2000
    max_minutes: float | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 100
    eval_tokens: int = 65536
    checkpoint_every: int = 100
    log_every: int = 1
    seed: int = 0
    threads: int | None = None
    max_docs: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "num_layers",
            "num_heads",
            "vocab_size",
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_tokens",
            "checkpoint_every",
            "log_every",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")

    def model_config(self) -> SubquadConfig:
        return SubquadConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            layer_pattern=self.layer_pattern,
            window=self.window,
        )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on norms, biases, gate constants
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def evaluate(model: SubquadForCausalLM, batches: list, bf16: bool) -> float:
    """Mean next-token cross-entropy (nats) over the held-out batches."""
    model.eval()
    total, count = 0.0, 0
    for ids, cu in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids, cu_seqlens=cu).loss
        n = ids.shape[1] - 1 - (cu.numel() - 2)  # predicted positions (boundary crossings excluded)
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def _prepare_data(cfg: TrainConfig, out: Path, resume: bool):
    docs = load_corpus(cfg.corpus)
    train_docs, held_docs = split_documents(docs)
    if cfg.max_docs is not None:
        train_docs = train_docs[: cfg.max_docs]
        held_docs = held_docs[: max(1, cfg.max_docs // 4)]
    if resume and (out / "tokenizer.json").exists():
        tokenizer = load_tokenizer(out)
    else:
        tokenizer = train_bpe((d.text for d in train_docs), cfg.vocab_size)
        tokenizer.save_pretrained(str(out))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    encode = tokenizer.backend_tokenizer.encode_batch
    train_ids = [e.ids for e in encode([d.text for d in train_docs])]
    held_ids = [e.ids for e in encode([d.text for d in held_docs])]
    train = TokenStream(train_ids, eos, cfg.seq_len)
    held = TokenStream(held_ids, eos, cfg.seq_len)
    stats = {
        "train_documents": len(train_docs),
        "held_out_documents": [d.name for d in held_docs],
        "train_tokens": int(train.tokens.numel()),
        "held_out_tokens": int(held.tokens.numel()),
        "vocab_size": len(tokenizer),
        "unigram_loss": unigram_cross_entropy(train.tokens, held.tokens, len(tokenizer)),
    }
    return tokenizer, train, held, stats


def train(cfg: TrainConfig, *, resume: bool = False, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns the final summary (also the last line of metrics.jsonl).

    ``stop_after_steps`` ends this call early (after a checkpoint) without changing the schedule,
    as if the process were killed there: tests use it to check that resuming is exact.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise FileExistsError(
            f"{out} already has checkpoints: pass --resume to continue, or pick a new out_dir"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    _, train_stream, held_stream, stats = _prepare_data(cfg, out, resume)
    model_cfg = cfg.model_config()
    if stats["vocab_size"] != model_cfg.vocab_size:
        model_cfg.vocab_size = stats["vocab_size"]  # the BPE may stop below the asked size on tiny corpora
    model = SubquadForCausalLM(model_cfg)
    optimizer = _optimizer(model, cfg)
    step, elapsed, tokens_seen = 0, 0.0, 0
    metrics_path = out / "metrics.jsonl"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        if state["config"] != _jsonable(cfg, ignore=("max_steps", "max_minutes", "progress", "threads")):
            raise ValueError(
                f"--resume with a different config than the checkpoint's ({ckpt}); use the same flags"
            )
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]
        _truncate_metrics(metrics_path, step)
    else:
        metrics_path.write_text("")
        (out / "run.json").write_text(json.dumps({"config": dataclasses.asdict(cfg), **stats}, indent=1))
    eval_batches = held_stream.eval_batches(cfg.eval_tokens, cfg.batch_size)
    model.train()
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    # a wall-time limit shows seconds (a race of max_minutes against a nominal max_steps would
    # otherwise show an ETA of hours); otherwise steps
    timed = cfg.max_minutes is not None
    bar = tqdm(
        total=round(60 * cfg.max_minutes) if timed else cfg.max_steps,
        initial=round(elapsed) if timed else step,
        disable=not cfg.progress,
        desc=f"train {cfg.layer_pattern}",
        unit="s" if timed else "step",
        dynamic_ncols=True,
    )
    start_step, stop_reason, last = step, "max_steps", {}
    t0 = time.perf_counter() - elapsed
    while step < cfg.max_steps:
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step = time.perf_counter()
        loss_sum = 0.0
        windows = train_stream.window_ids(
            step * cfg.batch_size * cfg.grad_accum, cfg.batch_size * cfg.grad_accum, cfg.seed
        )
        for micro in range(cfg.grad_accum):
            ids, cu = train_stream.batch(windows[micro * cfg.batch_size : (micro + 1) * cfg.batch_size])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = model(ids, labels=ids, cu_seqlens=cu).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        dt = time.perf_counter() - t_step
        elapsed = time.perf_counter() - t0
        last = {
            "step": step,
            "loss": loss_sum / cfg.grad_accum,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_step / dt,
            "elapsed_s": elapsed,
            "tokens": tokens_seen,
        }
        if step % cfg.log_every == 0:
            _append(metrics_path, last)
        bar.update(min(round(elapsed), bar.total) - bar.n if timed else 1)
        bar.set_postfix(step=step, loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        out_of_time = cfg.max_minutes is not None and elapsed >= 60 * cfg.max_minutes
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            held = evaluate(model, eval_batches, cfg.bf16)
            _append(
                metrics_path,
                {
                    "step": step,
                    "eval_loss": held,
                    "eval_ppl": math.exp(held),
                    "elapsed_s": elapsed,
                    "tokens": tokens_seen,
                },
            )
        stopping = out_of_time or (stop_after_steps is not None and step - start_step >= stop_after_steps)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stopping:
            save_checkpoint(
                ckpt_root,
                step,
                model,
                optimizer,
                {
                    "config": _jsonable(cfg, ignore=("max_steps", "max_minutes", "progress", "threads")),
                    "elapsed": elapsed,
                    "tokens_seen": tokens_seen,
                },
            )
        if out_of_time:
            stop_reason = "max_minutes"
            break
        if stopping:
            stop_reason = "stop_after_steps"
            break
    bar.close()
    if stop_reason != "stop_after_steps":
        model.save_pretrained(str(out))
    summary = {
        "summary": True,
        "step": step,
        "stop_reason": stop_reason,
        "elapsed_s": elapsed,
        "tokens": tokens_seen,
        "unigram_loss": stats["unigram_loss"],
        **_last_eval(metrics_path),
    }
    if stop_reason != "stop_after_steps":
        _append(metrics_path, summary)
    return summary


def _jsonable(cfg: TrainConfig, ignore: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignore and k != "out_dir"}


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (written after the checkpoint a killed run resumes from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if record.get("step", 0) <= step and not record.get("summary"):
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _last_eval(path: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "eval_loss" in record:
            found = {"eval_loss": record["eval_loss"], "eval_ppl": record["eval_ppl"]}
    return found
