"""Train small models of each mixer on synthetic tasks and record what they learn: the runner behind
``subquad bench recall`` (MQAR) and ``subquad bench state`` (parity, S5).

For each setting (task parameters), mixer, learning rate and seed, a ``SubquadForCausalLM`` whose
layers are all that mixer is trained on the task's train split with AdamW; every ``eval_every`` steps
it is evaluated on the test split (and, for state tracking, on longer test sequences), and training
stops early once test accuracy reaches ``threshold``. Recorded per run: best accuracy, steps and wall
time to threshold (None if never), train tokens/s, decode tokens/s (one token at a time through
the cache), and the state size in bytes measured from the
``SubquadCache`` after reading one test sequence (recurrent state, window or KV cache). The best
learning rate per (setting, mixer, seed) is the one with the highest accuracy (mean over the test
splits when every split must pass; ties: fewer steps).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subquad.data.synthetic import IGNORE, TASKS, TaskData, accuracy
from subquad.layers import MIXERS
from subquad.models import SubquadConfig, SubquadForCausalLM


@dataclass(frozen=True, kw_only=True)
class TaskBenchConfig:
    """One task, several settings of it, several mixers, a small learning-rate sweep and seeds.

    ``settings``: task keyword arguments per setting (e.g. ``{"seq_len": 64, "num_pairs": 8}``);
    ``test_settings``: for length generalisation, per setting the extra test keyword overrides
    (e.g. longer ``seq_len``), each evaluated alongside the in-distribution test split.
    ``stop_when``: ``"test"`` stops a run once the in-distribution test split reaches ``threshold``;
    ``"all"`` only once every test split does (state tracking: a model that has just learned the
    training length is not done learning to extrapolate).
    ``lr_sweep``: ``"every_seed"`` trains every (learning rate, seed) pair; ``"first_seed"`` sweeps the
    learning rates with the first seed only and trains the other seeds at the learning rate that won
    for that (setting, mixer), which buys more seeds for the same time.
    ``lr_schedule``: after a 20-step warmup, ``"cosine"`` decays to 0 at ``max_steps``; ``"constant"``
    keeps the rate, so a run that early-stops never trained at a rate its budget decided.
    """

    task: str
    settings: tuple[dict[str, Any], ...]
    mixers: tuple[str, ...]
    test_settings: tuple[dict[str, Any], ...] = ()
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    window: int = 16
    lrs: tuple[float, ...] = (1e-3, 3e-3)
    seeds: tuple[int, ...] = (0,)
    num_train: int = 2000
    num_test: int = 200
    batch_size: int = 32
    max_steps: int = 400
    eval_every: int = 50
    threshold: float = 0.99
    weight_decay: float = 0.1
    stop_when: str = "test"
    lr_sweep: str = "every_seed"
    lr_schedule: str = "cosine"
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        unknown = [m for m in self.mixers if m not in MIXERS]
        if unknown or not self.mixers:
            raise ValueError(f"unknown mixers {unknown}; expected names from {sorted(MIXERS)}")
        if not self.settings:
            raise ValueError("settings must not be empty")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_train",
            "num_test",
            "batch_size",
            "max_steps",
            "eval_every",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs must be positive, got {self.lrs}")
        if self.stop_when not in ("test", "all"):
            raise ValueError(f"stop_when must be 'test' or 'all', got {self.stop_when!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.lr_sweep not in ("every_seed", "first_seed"):
            raise ValueError(f"lr_sweep must be 'every_seed' or 'first_seed', got {self.lr_sweep!r}")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")


def _model(cfg: TaskBenchConfig, mixer: str, vocab: int, seed: int) -> SubquadForCausalLM:
    torch.manual_seed(seed)
    config = SubquadConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        layer_pattern=[mixer],
        window=cfg.window,
        mixer_options=cfg.mixer_options,
        tie_word_embeddings=False,
    )
    return SubquadForCausalLM(config)


@torch.no_grad()
def _evaluate(model: SubquadForCausalLM, data: TaskData, batch: int) -> float:
    model.eval()
    hits, total = 0.0, 0
    for i in range(0, data.inputs.shape[0], batch):
        x, y = data.inputs[i : i + batch], data.targets[i : i + batch]
        n = int((y != IGNORE).sum())
        if n:
            hits += accuracy(model(x).logits, y) * n
            total += n
    model.train()
    return hits / total if total else math.nan


@torch.no_grad()
def decode_tokens_per_s(model: SubquadForCausalLM, x: torch.Tensor, steps: int = 32) -> float:
    """Tokens/s of one-token decoding steps through the model's cache (batch 1, after one token
    of prefill): what serving the trained model one token at a time costs."""
    model.eval()
    cache = model.new_cache()
    model(x[:, :1], cache=cache)
    n = max(1, min(steps, x.shape[1] - 1))
    t0 = time.perf_counter()
    for t in range(1, n + 1):
        model(x[:, t : t + 1], cache=cache)
    seconds = time.perf_counter() - t0
    model.train()
    return n / seconds


@torch.no_grad()
def state_bytes(model: SubquadForCausalLM, x: torch.Tensor) -> int:
    """Bytes the model's cache holds after reading ``x [1, L]``: what it remembers of the context."""
    cache = model.new_cache()
    model.eval()
    model(x, cache=cache)
    model.train()
    return cache.used_bytes()


def lr_at(cfg: TaskBenchConfig, lr: float, step: int) -> float:
    """The learning rate of step ``step`` (1-based): linear warmup over 20 steps, then
    ``cfg.lr_schedule``."""
    lr_now = lr * min(1.0, step / 20)
    if cfg.lr_schedule == "cosine":
        lr_now *= 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps))
    return lr_now


def train_one(cfg: TaskBenchConfig, mixer: str, setting: dict, lr: float, seed: int) -> dict:
    """Train one model on one setting; returns its record."""
    make = TASKS[cfg.task]
    train = make(cfg.num_train, seed=2 * seed, **setting)
    tests = {"test": make(cfg.num_test, seed=2 * seed + 1, **setting)}
    for extra in cfg.test_settings:
        tests["test_" + "_".join(f"{k}{v}" for k, v in extra.items())] = make(
            cfg.num_test, seed=2 * seed + 1, **{**setting, **extra}
        )
    vocab = max(train.vocab_size, *(t.vocab_size for t in tests.values()))
    model = _model(cfg, mixer, vocab, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    history, best, steps_to = [], {name: 0.0 for name in tests}, None
    train_time, tokens, t_start, seconds_to = 0.0, 0, time.perf_counter(), None
    for step in range(1, cfg.max_steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, lr, step)
        idx = torch.randint(0, train.inputs.shape[0], (cfg.batch_size,), generator=gen)
        x, y = train.inputs[idx], train.targets[idx]
        t0 = time.perf_counter()
        logits = model(x).logits
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            accs = {name: _evaluate(model, data, 4 * cfg.batch_size) for name, data in tests.items()}
            for name, a in accs.items():
                best[name] = max(best[name], a)
            history.append({"step": step, "loss": float(loss.detach()), **accs})
            if steps_to is None and accs["test"] >= cfg.threshold:
                steps_to, seconds_to = step, time.perf_counter() - t_start
            if steps_to is not None and (
                cfg.stop_when == "test" or all(a >= cfg.threshold for a in accs.values())
            ):
                break
    return {
        "task": cfg.task,
        "setting": setting,
        "mixer": mixer,
        "lr": lr,
        "seed": seed,
        "accuracy": best["test"],
        "final": history[-1],
        "best": best,
        "steps_to_threshold": steps_to,
        "seconds_to_threshold": seconds_to,
        "wall_s": time.perf_counter() - t_start,
        "train_tokens_per_s": tokens / train_time,
        "state_bytes": state_bytes(model, tests["test"].inputs[:1]),
        "decode_tokens_per_s": decode_tokens_per_s(model, tests["test"].inputs[:1]),
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }


def _rank(r: dict, cfg: TaskBenchConfig) -> tuple:
    """Higher is better. With ``stop_when="test"`` a run that reached the threshold beats one that
    did not, and between two that did, fewer steps win: a run stops at its first evaluation at or
    above the threshold, so its accuracy there (0.991 or 0.998) says little. Runs that never reached
    it compare by accuracy. With ``stop_when="all"`` the accuracy is the mean over every test split
    (length generalisation decides between learning rates that both solve the training length),
    then fewer steps."""
    steps = r["steps_to_threshold"]
    if cfg.stop_when == "all":
        return (statistics.fmean(r["best"].values()), -(steps or cfg.max_steps + 1))
    return (1, -steps) if steps is not None else (0, r["accuracy"])


def run_task_bench(cfg: TaskBenchConfig, progress: bool = True) -> dict:
    """Every (setting, mixer, lr, seed) run that ``cfg.lr_sweep`` asks for, and the best-lr summary
    per (setting, mixer, seed)."""
    first, rest = cfg.seeds[0], cfg.seeds[1:]
    per_pair = len(cfg.lrs) * len(cfg.seeds) if cfg.lr_sweep == "every_seed" else len(cfg.lrs) + len(rest)
    runs: list[dict] = []
    bar = tqdm(
        total=len(cfg.settings) * len(cfg.mixers) * per_pair,
        disable=not progress,
        desc=f"bench {cfg.task}",
        unit="run",
    )

    def run(setting: dict, mixer: str, lr: float, seed: int) -> dict:
        bar.set_postfix(
            mixer=mixer, lr=lr, seed=seed, **{k: v for k, v in setting.items() if k != "vocab_size"}
        )
        r = train_one(cfg, mixer, setting, lr, seed)
        runs.append(r)
        bar.update(1)
        return r

    for setting in cfg.settings:
        for mixer in cfg.mixers:
            if cfg.lr_sweep == "every_seed":
                for seed in cfg.seeds:
                    for lr in cfg.lrs:
                        run(setting, mixer, lr, seed)
            else:
                swept = [run(setting, mixer, lr, first) for lr in cfg.lrs]
                lr_best = max(swept, key=lambda r: _rank(r, cfg))["lr"]
                for seed in rest:
                    run(setting, mixer, lr_best, seed)
    bar.close()
    best: dict[tuple, dict] = {}
    for r in runs:
        key = (tuple(sorted(r["setting"].items())), r["mixer"], r["seed"])
        if key not in best or _rank(r, cfg) > _rank(best[key], cfg):
            best[key] = r
    return {"config": dataclasses.asdict(cfg), "runs": runs, "best": list(best.values())}
