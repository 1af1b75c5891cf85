"""``subquad bench decode``: per-token decode latency and cache memory of whole models against the
length of the context they have already read.

For each model kind (a layer pattern at one size) and each context length L, the model prefills L
random tokens in pieces (chunked prefill, so softmax attention's prefill memory stays bounded),
then decodes ``steps`` tokens one at a time with its ``SubquadCache``. Reported per (kind, L):
median per-token latency over the decode steps, tokens/s, the bytes of every tensor the cache
holds (``SubquadCache.nbytes``: states, conv tails, allocated key/value buffers), the process's
peak-RSS growth while decoding, and the prefill time. Ratios against the softmax-attention model
(pattern ``A``) are computed within the same run. Weights are random: decode cost does not depend
on their values.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from subquad.bench.machine import PeakMemory, allocator_label, load_average, machine_info, results_dir
from subquad.models import SubquadConfig, SubquadForCausalLM, expand_pattern


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """What ``subquad bench decode`` measures."""

    patterns: tuple[str, ...] = ("A", "G", "N", "GGGA", "S")
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    window: int = 512
    vocab_size: int = 4096
    batch: int = 1
    steps: int = 32
    warmup: int = 4
    prefill_chunk: int = 2048
    dtype: str = "float32"
    threads: int | None = None
    seed: int = 0
    out: str = "results/decode"

    def __post_init__(self) -> None:
        if not self.patterns or not self.contexts:
            raise ValueError("patterns and contexts must not be empty")
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "vocab_size",
            "batch",
            "steps",
            "prefill_chunk",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if any(c < 1 for c in self.contexts):
            raise ValueError(f"contexts must be >= 1, got {self.contexts}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        for p in self.patterns:
            expand_pattern(p, self.num_layers)  # unknown letters or a length not dividing num_layers


def _model(cfg: DecodeConfig, pattern: str) -> SubquadForCausalLM:
    torch.manual_seed(cfg.seed)
    config = SubquadConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        layer_pattern=pattern,
        window=cfg.window,
    )
    return SubquadForCausalLM(config).to(getattr(torch, cfg.dtype)).eval()


@torch.no_grad()
def measure_one(cfg: DecodeConfig, model: SubquadForCausalLM, context: int, probe: PeakMemory) -> dict:
    """Prefill ``context`` tokens, then time ``warmup + steps`` single-token decode steps."""
    gen = torch.Generator().manual_seed(cfg.seed + context)
    ids = torch.randint(0, cfg.vocab_size, (cfg.batch, context + cfg.warmup + cfg.steps), generator=gen)
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = None
    for start in range(0, context, cfg.prefill_chunk):
        logits = model(
            ids[:, start : min(context, start + cfg.prefill_chunk)], cache=cache, logits_to_keep=1
        ).logits
    prefill_s = time.perf_counter() - t0
    times = []
    pos = context
    for _ in range(cfg.warmup):
        logits = model(ids[:, pos : pos + 1], cache=cache).logits
        pos += 1
    bytes_before = cache.nbytes()
    with probe.measure() as peak:
        for _ in range(cfg.steps):
            t = time.perf_counter()
            logits = model(ids[:, pos : pos + 1], cache=cache).logits
            times.append(time.perf_counter() - t)
            pos += 1
    assert logits is not None and torch.isfinite(logits).all()
    per_token = statistics.median(times)
    return {
        "context": context,
        "per_token_ms": 1000 * per_token,
        "tokens_per_s": cfg.batch / per_token,
        "cache_bytes": cache.nbytes(),
        "cache_bytes_before_decode": bytes_before,
        "cache_used_bytes": cache.used_bytes(),
        "decode_peak_rss_growth": peak["bytes"],
        "prefill_s": prefill_s,
    }


def run_decode(cfg: DecodeConfig, progress: bool = True) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    probe = PeakMemory(torch.device("cpu"))
    rows = []
    bar = tqdm(total=len(cfg.patterns) * len(cfg.contexts), disable=not progress, desc="decode", unit="case")
    for pattern in cfg.patterns:
        model = _model(cfg, pattern)
        params = sum(p.numel() for p in model.parameters())
        for context in cfg.contexts:
            bar.set_postfix(pattern=pattern, context=context)
            row = {"pattern": pattern, "mixers": model.config.mixers, "params": params}
            row.update(measure_one(cfg, model, context, probe))
            rows.append(row)
            bar.update(1)
        del model
    bar.close()
    _ratios(rows)
    result = {
        "benchmark": "decode",
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(torch.device("cpu")),
        "load_average": load_average(),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "peak_rss_available": probe.available,
        "rows": rows,
    }
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "decode.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _ratios(rows: list[dict]) -> None:
    """Per row: softmax model's latency / this latency and softmax cache bytes / these, at the same L;
    and this latency / this model's latency at the shortest context (flat = 1)."""
    ref = {r["context"]: r for r in rows if r["pattern"] == "A"}
    first = {}
    for r in rows:
        first.setdefault(r["pattern"], r)
        base = ref.get(r["context"])
        r["speedup_vs_softmax"] = base["per_token_ms"] / r["per_token_ms"] if base else None
        r["cache_smaller_vs_softmax"] = (
            base["cache_bytes"] / r["cache_bytes"] if base and r["cache_bytes"] else None
        )
        r["latency_vs_shortest"] = r["per_token_ms"] / first[r["pattern"]]["per_token_ms"]


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def format_table(result: dict) -> str:
    head = (
        "pattern",
        "context",
        "ms/token",
        "tok/s",
        "vs L0",
        "x faster than A",
        "cache",
        "x smaller than A",
        "decode RSS growth",
        "prefill s",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in result["rows"]:
        cells = (
            r["pattern"],
            str(r["context"]),
            f"{r['per_token_ms']:.2f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['latency_vs_shortest']:.2f}",
            "-" if r["speedup_vs_softmax"] is None else f"{r['speedup_vs_softmax']:.2f}",
            _fmt_bytes(r["cache_bytes"]),
            "-" if r["cache_smaller_vs_softmax"] is None else f"{r['cache_smaller_vs_softmax']:.0f}",
            _fmt_bytes(r["decode_peak_rss_growth"]),
            f"{r['prefill_s']:.2f}",
        )
        lines.append(" | ".join(cells))
    m = result["machine"]
    lines.append(
        f"\n{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, load {result['load_average']}, "
        f"{allocator_label(m)}; "
        f"batch {result['config']['batch']}, {result['config']['dtype']}, median of "
        f"{result['config']['steps']} decode steps; 'vs L0': latency / latency at the shortest context"
    )
    return "\n".join(lines)


def plot_decode(result: dict, path: str) -> str | None:
    """Latency and cache bytes against context, one line per pattern (log-log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for pattern in dict.fromkeys(r["pattern"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["pattern"] == pattern]
        xs = [r["context"] for r in rows]
        axes[0].plot(xs, [r["per_token_ms"] for r in rows], marker="o", label=pattern)
        axes[1].plot(xs, [r["cache_bytes"] for r in rows], marker="o", label=pattern)
    for ax, title in zip(axes, ("decode latency (ms / token)", "cache bytes"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens already read")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="layer pattern")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_out_dir() -> str:
    return results_dir("decode")


__all__ = ["DecodeConfig", "format_table", "measure_one", "plot_decode", "run_decode"]
