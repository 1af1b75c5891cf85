"""Compare language-model training runs (directories written by ``subquad train``) at equal steps and
at equal wall time, from their ``metrics.jsonl`` and ``run.json`` alone: a markdown table and a plot of
held-out perplexity against wall time and against steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def read_run(run_dir: str | Path) -> dict:
    """``{"name", "pattern", "unigram_loss", "evals": [{step, eval_loss, eval_ppl, elapsed_s}], "steps"}``."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    info = run_dir / "run.json"
    if not metrics.exists() or not info.exists():
        raise FileNotFoundError(f"{run_dir} is not a subquad train run (no metrics.jsonl / run.json)")
    run = json.loads(info.read_text())
    evals, steps = [], []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "eval_loss" in record and not record.get("summary"):
            evals.append(record)
        elif "loss" in record:
            steps.append(record)
    return {
        "name": run_dir.name,
        "pattern": run["config"]["layer_pattern"],
        "unigram_loss": run["unigram_loss"],
        "evals": evals,
        "steps": steps,
        "tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2] if steps else math.nan,
    }


def _at_step(run: dict, step: int) -> dict | None:
    return next((e for e in run["evals"] if e["step"] == step), None)


def _within_time(run: dict, seconds: float) -> dict | None:
    inside = [e for e in run["evals"] if e["elapsed_s"] <= seconds + 1e-6]
    return inside[-1] if inside else None


def summarize(run_dirs: list[str | Path]) -> dict:
    """Per run: held-out loss/perplexity at the largest step every run evaluated, and the last
    evaluation within the shortest run's wall time."""
    runs = [read_run(d) for d in run_dirs]
    common = set.intersection(*({e["step"] for e in r["evals"]} for r in runs)) if runs else set()
    equal_step = max(common) if common else None
    equal_time = min(r["evals"][-1]["elapsed_s"] for r in runs if r["evals"]) if runs else None
    rows = []
    for r in runs:
        s, t = _at_step(r, equal_step) if equal_step else None, _within_time(r, equal_time or 0)
        last = r["evals"][-1] if r["evals"] else None
        rows.append(
            {
                "run": r["name"],
                "pattern": r["pattern"],
                "unigram_ppl": math.exp(r["unigram_loss"]),
                "ppl_at_equal_step": s["eval_ppl"] if s else None,
                "ppl_at_equal_time": t["eval_ppl"] if t else None,
                "time_point_step": t["step"] if t else None,
                "final_step": last["step"] if last else None,
                "final_ppl": last["eval_ppl"] if last else None,
                "final_loss": last["eval_loss"] if last else None,
                "elapsed_s": last["elapsed_s"] if last else None,
                "train_tokens_per_s": r["tokens_per_s"],
            }
        )
    return {"equal_step": equal_step, "equal_time_s": equal_time, "rows": rows, "runs": runs}


def format_table(summary: dict) -> str:
    step, secs = summary["equal_step"], summary["equal_time_s"]
    head = (
        "run",
        "pattern",
        f"held-out ppl @ step {step}",
        f"ppl @ {secs:.0f} s (step)",
        "final step",
        "final ppl (loss)",
        "unigram ppl",
        "train tok/s",
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = (
            r["run"],
            r["pattern"],
            "-" if r["ppl_at_equal_step"] is None else f"{r['ppl_at_equal_step']:.1f}",
            "-"
            if r["ppl_at_equal_time"] is None
            else f"{r['ppl_at_equal_time']:.1f} ({r['time_point_step']})",
            str(r["final_step"]),
            f"{r['final_ppl']:.1f} ({r['final_loss']:.3f})",
            f"{r['unigram_ppl']:.0f}",
            f"{r['train_tokens_per_s']:.0f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in summary["runs"]:
        label = f"{r['name']} ({r['pattern']})"
        axes[0].plot(
            [e["elapsed_s"] / 60 for e in r["evals"]],
            [e["eval_ppl"] for e in r["evals"]],
            marker="o",
            label=label,
        )
        axes[1].plot(
            [e["step"] for e in r["evals"]], [e["eval_ppl"] for e in r["evals"]], marker="o", label=label
        )
    unigram = summary["rows"][0]["unigram_ppl"] if summary["rows"] else None
    for ax, xlabel in zip(axes, ("wall time (min)", "step"), strict=True):
        if unigram:
            ax.axhline(unigram, color="gray", linestyle="--", label="unigram baseline")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
