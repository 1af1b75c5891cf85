"""Plots of benchmark results (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_speed(result: dict, path: str) -> str:
    """Forward and forward+backward time vs T, log-log, one line per case plus SDPA."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    cases: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        cases.setdefault((r["name"], r["variant"], r["mode"]), []).append(r)
    for (name, variant, mode), rows in cases.items():
        label = name if variant in ("default", "causal") else f"{name}[{variant}]"
        label = label if mode == "sdpa" else f"{label} / {mode}"
        style = dict(color="black", linewidth=2.5, linestyle="--") if name == "sdpa" else {}
        for ax, key in zip(axes, ("fwd_s", "fwdbwd_s"), strict=True):
            pts = [(r["T"], r[key]) for r in rows if key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", label=label, **style)
    cfg = result["config"]
    for ax, title in zip(axes, ("forward", "forward + backward"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{title}: B={cfg['batch']} H={cfg['heads']} D={cfg['head_dim']} {cfg['dtype']}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    m = result["machine"]
    fig.suptitle(f"subquad bench speed — {m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
