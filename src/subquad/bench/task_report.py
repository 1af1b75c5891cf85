"""Presets of the synthetic-task benchmark, and its report: tables and plots computed from
``results.json`` alone (accuracy vs state size for recall, accuracy vs length for state tracking)."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from subquad.bench.tasks import TaskBenchConfig

# Zoology's MQAR attention baseline has one head (``"num_heads": 1`` in its configs)
ONE_HEAD_ATTENTION = {"attention": {"num_heads": 1}, "swa": {"num_heads": 1}}
RECALL_MIXERS = ("attention", "swa", "linear_attn", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet")
STATE_MIXERS = (
    "attention",
    "gla",
    "mamba2",
    "deltanet",
    "deltanet_neg",
    "gated_deltanet",
    "gated_deltanet_neg",
)


def recall_preset(name: str) -> TaskBenchConfig:
    """MQAR settings per preset: ``quick`` (minutes), ``standard``, ``paper`` (Zoology-like sizes)."""
    if name == "quick":
        # one setting, one learning rate (1e-3: 3e-3 stalls softmax attention on MQAR at this size)
        return TaskBenchConfig(
            task="mqar",
            settings=({"seq_len": 64, "num_pairs": 4, "vocab_size": 128},),
            mixers=RECALL_MIXERS,
            lrs=(1e-3,),
            seeds=(0,),
            max_steps=700,
            eval_every=100,
            num_train=3000,
            num_test=200,
        )
    if name == "standard":
        # Lengths 64 and 128 at 4 pairs: probes of softmax attention (lr 1e-3, 1000 steps) reached 0.95
        # at (128, 4) but 0.30 at (128, 8), 0.34-0.74 at (64, 8) and 0.08 at (256, 16), so larger
        # settings need far longer training than two hours allow (Zoology trains for tens of thousands
        # of steps). 2000 steps: with 1200 the cosine schedule had decayed before attention got past
        # 0.97 (train accuracy too, so not overfitting); cosine over 2000 reached 0.99 at step
        # 1000-1100 at L 64 (a constant rate reached only 0.94-0.99). The learning rates are swept
        # with seed 0; seed 1 reuses the winner. Softmax attention (and the sliding window, to compare
        # like with like) has one head, as Zoology's MQAR attention baseline: with the model's two
        # heads of 32, seed 1 at L 128 reached only 0.984 in 2000 steps, with one head of 64 it reached
        # 0.993 at step 500 (lr 1e-3; probes of weight decay 0 and lr 5e-4 gave 0.990 at 1800, 0.949).
        settings = tuple({"seq_len": L, "num_pairs": 4, "vocab_size": 128} for L in (64, 128))
        return TaskBenchConfig(
            task="mqar",
            settings=settings,
            mixers=RECALL_MIXERS,
            lrs=(1e-3, 2e-3),
            seeds=(0, 1),
            lr_sweep="first_seed",
            max_steps=2000,
            eval_every=100,
            num_train=10000,
            num_test=300,
            mixer_options=dict(ONE_HEAD_ATTENTION),
        )
    if name == "paper":
        settings = tuple(
            {"seq_len": L, "num_pairs": p, "vocab_size": 8192}
            for L, p in ((64, 4), (128, 8), (256, 16), (512, 64))
        )
        return TaskBenchConfig(
            task="mqar",
            settings=settings,
            mixers=RECALL_MIXERS,
            hidden_size=128,
            lrs=(1e-4, 3e-4, 1e-3, 3e-3),
            seeds=(0, 1, 2),
            max_steps=8000,
            eval_every=200,
            num_train=100000,
            num_test=3000,
            mixer_options=dict(ONE_HEAD_ATTENTION),
        )
    raise ValueError(f"preset must be quick, standard or paper, got {name!r}")


def state_preset(name: str, task: str = "parity") -> TaskBenchConfig:
    """Parity or S5: train on short sequences, test on longer ones too."""
    if name not in ("quick", "standard", "paper"):
        raise ValueError(f"preset must be quick, standard or paper, got {name!r}")
    train_len = {"quick": 16, "standard": 40, "paper": 40}[name]
    test_lens = {"quick": (64,), "standard": (128, 256), "paper": (256, 512)}[name]
    # quick: one learning rate (3e-3 beat 1e-3 for every recurrent mixer here; attention fails at both) and
    # 800 steps, which is when DeltaNet with negative eigenvalues passes 0.99 at 4x the train length.
    # standard (about 20 min for parity and S5): learning rates swept with seed 0, seed 1 at the winner;
    # trained at length 40 and tested up to 256, the range of Grazzi et al. (trained on lengths up to
    # 40, tested on 40-256). At length 32 (8x to 256, as the preset first had it) DeltaNet with
    # negative eigenvalues read 0.955 / 0.900 at 256 on seeds 0 / 1 (docs/bench-standard); at 40
    # 0.987 / 0.962 (docs/bench-standard-parity40).
    steps = {"quick": 800, "standard": 1000, "paper": 10000}[name]
    return TaskBenchConfig(
        task=task,
        settings=({"seq_len": train_len},),
        test_settings=tuple({"seq_len": n} for n in test_lens),
        mixers=STATE_MIXERS,
        num_layers=1 if task == "parity" else 2,
        lrs=(3e-3,) if name == "quick" else (1e-3, 3e-3),
        seeds=(0,) if name == "quick" else (0, 1),
        lr_sweep="first_seed" if name == "standard" else "every_seed",
        max_steps=steps,
        eval_every=50 if name == "quick" else 100,
        num_train=4000,
        num_test=200,
        threshold=0.99,
        stop_when="all",
    )


def _setting_label(setting: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in setting.items() if k != "vocab_size")


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else None


def report(results: dict, out_dir: str | Path) -> str:
    """Write ``report.md`` (and PNG plots) for a results dict; returns the markdown."""
    out_dir = Path(out_dir)
    lines = [f"# subquad bench {results.get('benchmark', '')}", ""]
    m = results.get("machine", {})
    lines.append(
        f"Run {results.get('utc', '?')}, commit {m.get('git_commit')}, {m.get('cpu')}, "
        f"torch {m.get('torch')}; every number below is read from `results.json`."
    )
    lines.append("")
    for section in results["sections"]:
        cfg, best = section["config"], section["best"]
        lines.append(f"## {cfg['task']}: best learning rate per mixer, mean over seeds {list(cfg['seeds'])}")
        lines.append("")
        extra_tests = [k for k in best[0]["best"] if k != "test"] if best else []
        head = [
            "setting",
            "mixer",
            "accuracy",
            *extra_tests,
            "steps to " + str(cfg["threshold"]),
            "seconds to " + str(cfg["threshold"]),
            "state bytes",
            "train tok/s",
            "decode tok/s",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        groups: dict[tuple, list] = {}
        for r in best:
            groups.setdefault((_setting_label(r["setting"]), r["mixer"]), []).append(r)
        for (setting, mixer), rs in groups.items():
            steps = [r["steps_to_threshold"] for r in rs]
            solved = [s for s in steps if s is not None]
            cells = [setting, mixer, f"{_mean([r['accuracy'] for r in rs]):.3f}"]
            cells += [f"{_mean([r['best'][k] for r in rs]):.3f}" for k in extra_tests]
            seconds = _mean([r["seconds_to_threshold"] for r in rs])
            decode = _mean([r.get("decode_tokens_per_s") for r in rs])  # absent in older results
            cells += [
                f"{statistics.fmean(solved):.0f} ({len(solved)}/{len(rs)})" if solved else "never",
                f"{seconds:.1f}" if seconds is not None else "-",
                f"{_mean([r['state_bytes'] for r in rs]):.0f}",
                f"{_mean([r['train_tokens_per_s'] for r in rs]):.0f}",
                f"{decode:.0f}" if decode is not None else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        png = _plot(section, out_dir)
        if png:
            lines += [f"![{cfg['task']}]({Path(png).name})", ""]
        lines += _summary(section)
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    return text


def _summary(section: dict) -> list[str]:
    """The 'which mixer' lines, computed from the numbers: per setting, the mixers that reached the
    threshold and the smallest state among them."""
    cfg, best = section["config"], section["best"]
    out = ["Computed summary:", ""]
    by_setting: dict[str, list] = {}
    for r in best:
        by_setting.setdefault(_setting_label(r["setting"]), []).append(r)
    for setting, rs in by_setting.items():
        mixers = {}
        for r in rs:
            mixers.setdefault(r["mixer"], []).append(r)
        acc = {mx: _mean([r["accuracy"] for r in v]) for mx, v in mixers.items()}
        size = {mx: _mean([r["state_bytes"] for r in v]) for mx, v in mixers.items()}
        solved = [mx for mx, a in acc.items() if a is not None and a >= cfg["threshold"]]
        if solved:
            smallest = min(solved, key=lambda mx: size[mx])
            out.append(
                f"- {cfg['task']} {setting}: solved by {', '.join(solved)}; smallest state among them: "
                f"{smallest} ({size[smallest]:.0f} bytes)."
            )
        else:
            top = max(acc, key=lambda mx: acc[mx] or 0)
            out.append(
                f"- {cfg['task']} {setting}: no mixer reached {cfg['threshold']}; "
                f"best {top} ({acc[top]:.3f})."
            )
        for extra in [k for k in rs[0]["best"] if k != "test"]:
            gen = {mx: _mean([r["best"][extra] for r in v]) for mx, v in mixers.items()}
            good = [mx for mx, a in gen.items() if a is not None and a >= cfg["threshold"]]
            out.append(f"  - {extra}: at or above {cfg['threshold']}: {', '.join(good) if good else 'none'}")
    out.append("")
    return out


def _plot(section: dict, out_dir: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cfg, best = section["config"], section["best"]
    if cfg.get("test_settings") and all("seq_len" in t for t in cfg["test_settings"]):
        return _plot_lengths(section, out_dir, plt)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    settings = list(dict.fromkeys(_setting_label(r["setting"]) for r in best))
    markers = "osD^v<>p*h"
    for i, setting in enumerate(settings):
        for mixer in dict.fromkeys(r["mixer"] for r in best):
            rs = [r for r in best if r["mixer"] == mixer and _setting_label(r["setting"]) == setting]
            if not rs:
                continue
            ax.scatter(
                _mean([r["state_bytes"] for r in rs]),
                _mean([r["accuracy"] for r in rs]),
                marker=markers[i % len(markers)],
                label=f"{mixer} ({setting})",
                s=40,
            )
    ax.set_xscale("log")
    ax.set_xlabel("state bytes after one test sequence (measured from the cache)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg['task']}: accuracy vs state size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = out_dir / f"{cfg['task']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _plot_lengths(section: dict, out_dir: Path, plt) -> str:
    """Length generalisation: accuracy at the training length and at each longer test length, one
    line per mixer (and training setting)."""
    cfg, best = section["config"], section["best"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    settings = list(dict.fromkeys(_setting_label(r["setting"]) for r in best))
    for setting in settings:
        for mixer in dict.fromkeys(r["mixer"] for r in best):
            rs = [r for r in best if r["mixer"] == mixer and _setting_label(r["setting"]) == setting]
            if not rs:
                continue
            xs = [rs[0]["setting"]["seq_len"]]
            ys = [_mean([r["accuracy"] for r in rs])]
            for extra in cfg["test_settings"]:
                key = "test_" + "_".join(f"{k}{v}" for k, v in extra.items())
                xs.append(extra["seq_len"])
                ys.append(_mean([r["best"].get(key) for r in rs]))
            label = mixer if len(settings) == 1 else f"{mixer} ({setting})"
            ax.plot(xs, ys, marker="o", label=label)
    ax.axhline(cfg["threshold"], color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (first point: the training length)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{cfg['task']}: accuracy vs sequence length (trained short, tested long)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{cfg['task']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def write_results(results: dict, out_dir: str | Path) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return str(path)
