"""``subquad bench all``: the project's main job. Recall (MQAR), state tracking (parity), a short
language-model race on Shakespeare, op speed and whole-model decoding, in one run and one report,
with a "which mixer for which job" summary and the literature's expected effects checked, all
computed from the run's ``results.json``.

Every part writes its own files under ``<out>/<part>/`` (the same files its own ``subquad bench``
command writes) and its results into ``<out>/results.json`` as soon as it finishes, so a run that
is stopped keeps what it measured; ``report.md`` is regenerated from ``results.json`` alone
(``report(results, out)``), so every number in it is one the JSON records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from subquad.bench.machine import allocator_label, machine_info
from subquad.bench.task_report import _mean

PARTS = ("recall", "state", "lm", "speed", "decode")

#: per-token accuracy on the longer test sequences above which a state-tracking model "extrapolates"
#: and below which it "fails" (chance is 0.5 for parity): the training threshold (0.99) is for the
#: training length; a model that learned the algorithm can still slip on a few of 4x more positions
EXTRAPOLATES, FAILS = 0.95, 0.75


@dataclass(frozen=True, kw_only=True)
class LMRace:
    """The language-model part: each pattern trained for the same wall time on Shakespeare."""

    patterns: tuple[str, ...] = ("A", "N", "GA")
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    seq_len: int = 256
    batch_size: int = 16
    vocab_size: int = 2048
    minutes: float = 1.25
    eval_every: int = 25
    eval_tokens: int = 16384
    lr: float = 2e-3

    def __post_init__(self) -> None:
        from subquad.layers import PATTERN_LETTERS

        for pattern in self.patterns:
            if not pattern or self.num_layers % len(pattern) or set(pattern) - set(PATTERN_LETTERS):
                raise ValueError(
                    f"each LM pattern must be letters of {sorted(PATTERN_LETTERS)} whose length divides "
                    f"num_layers={self.num_layers}, got {pattern!r}"
                )


@dataclass(frozen=True, kw_only=True)
class AllConfig:
    """A named preset of every part (``quick``: ~15 min on 2 cores; ``standard``: ~2 hours)."""

    preset: str = "quick"
    parts: tuple[str, ...] = PARTS
    lm: LMRace = dataclasses.field(default_factory=LMRace)
    speed_lens: tuple[int, ...] = (1024, 4096)
    speed_repeats: int = 3
    decode_patterns: tuple[str, ...] = ("A", "N", "GGGA", "S")
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384)
    threads: int | None = None
    # field overrides of each part's own config (TaskBenchConfig, SpeedConfig, DecodeConfig)
    recall_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    state_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    speed_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preset not in ("quick", "standard", "paper"):
            raise ValueError(f"preset must be quick, standard or paper, got {self.preset!r}")
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown or not self.parts:
            raise ValueError(f"parts must be a non-empty subset of {list(PARTS)}, got {list(self.parts)}")


def preset(name: str, **overrides) -> AllConfig:
    """``quick`` | ``standard`` | ``paper`` (the last scales recall and state up; LM as standard)."""
    if name == "quick":
        return AllConfig(preset=name, **overrides)
    if name in ("standard", "paper"):
        base = {
            "lm": LMRace(
                patterns=("A", "N", "G", "GGGA", "S"),
                hidden_size=256,
                num_layers=4,
                num_heads=4,
                minutes=4.0,
                eval_every=50,
                eval_tokens=32768,
            ),
            "speed_lens": (1024, 4096, 16384),
            "speed_repeats": 3,
            "decode_contexts": (1024, 4096, 16384, 32768),
        }
        return AllConfig(preset=name, **{**base, **overrides})
    raise ValueError(f"preset must be quick, standard or paper, got {name!r}")


# ---------------------------------------------------------------------------------------------
# running


def _save(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def run_all(cfg: AllConfig, out: str | os.PathLike, progress: bool = True) -> dict:
    """Run the selected parts in order, saving ``results.json`` after each; returns the results."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results: dict[str, Any] = {
        "benchmark": "all",
        "preset": cfg.preset,
        "config": dataclasses.asdict(cfg),
        "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "parts": {},
        "wall_s": {},
    }
    runners = {
        "recall": _run_recall,
        "state": _run_state,
        "lm": _run_lm,
        "speed": _run_speed,
        "decode": _run_decode,
    }
    for part in cfg.parts:
        t0 = time.perf_counter()
        results["parts"][part] = runners[part](cfg, out / part, progress)
        results["wall_s"][part] = time.perf_counter() - t0
        _save(results, out)
    report(results, out)
    return results


def _run_recall(cfg: AllConfig, out: Path, progress: bool) -> dict:
    from subquad.bench.task_report import recall_preset
    from subquad.bench.tasks import run_task_bench

    tc = dataclasses.replace(recall_preset(cfg.preset), **cfg.recall_overrides)
    return {"sections": [run_task_bench(tc, progress=progress)]}


def _run_state(cfg: AllConfig, out: Path, progress: bool) -> dict:
    from subquad.bench.task_report import state_preset
    from subquad.bench.tasks import run_task_bench

    tasks = ("parity",) if cfg.preset == "quick" else ("parity", "s5")
    return {
        "sections": [
            run_task_bench(
                dataclasses.replace(state_preset(cfg.preset, t), **cfg.state_overrides), progress=progress
            )
            for t in tasks
        ]
    }


def _run_lm(cfg: AllConfig, out: Path, progress: bool) -> dict:
    from subquad.bench.lm_report import summarize
    from subquad.train.loop import TrainConfig, train

    lm = cfg.lm
    dirs = []
    for pattern in lm.patterns:
        run_dir = out / pattern
        if run_dir.exists():
            raise FileExistsError(f"{run_dir} exists: pick a new --out for a new run")
        tc = TrainConfig(
            out_dir=str(run_dir),
            layer_pattern=pattern,
            hidden_size=lm.hidden_size,
            num_layers=lm.num_layers,
            num_heads=lm.num_heads,
            seq_len=lm.seq_len,
            batch_size=lm.batch_size,
            vocab_size=lm.vocab_size,
            lr=lm.lr,
            warmup_steps=20,
            max_steps=100_000,  # the wall-time limit ends every run
            max_minutes=lm.minutes,
            eval_every=lm.eval_every,
            eval_tokens=lm.eval_tokens,
            checkpoint_every=100_000,
            log_every=5,
            threads=cfg.threads,
            progress=progress,
        )
        train(tc)
        dirs.append(run_dir)
    summary = summarize(dirs)
    return {"config": dataclasses.asdict(lm), "summary": summary}


def _run_speed(cfg: AllConfig, out: Path, progress: bool) -> dict:
    from subquad.bench.speed import SpeedConfig, run_speed

    sc = SpeedConfig(
        **{"seq_lens": cfg.speed_lens, "repeats": cfg.speed_repeats, "threads": cfg.threads, "out": str(out)}
        | cfg.speed_overrides
    )
    return run_speed(sc, progress=progress)


def _run_decode(cfg: AllConfig, out: Path, progress: bool) -> dict:
    from subquad.bench.decode import DecodeConfig, run_decode

    dc = DecodeConfig(
        **{
            "patterns": cfg.decode_patterns,
            "contexts": cfg.decode_contexts,
            "threads": cfg.threads,
            "out": str(out),
        }
        | cfg.decode_overrides
    )
    return run_decode(dc, progress=progress)


# ---------------------------------------------------------------------------------------------
# the report: computed from results.json alone


def _best_by(section: dict) -> dict[tuple[str, str], dict]:
    """``(setting label, mixer) -> {"acc", "state_bytes", "extra": {test name: acc}}`` (seed means)."""
    from subquad.bench.task_report import _setting_label

    groups: dict[tuple[str, str], list] = {}
    for r in section["best"]:
        groups.setdefault((_setting_label(r["setting"]), r["mixer"]), []).append(r)
    table = {}
    for key, rs in groups.items():
        extra = {k: _mean([r["best"][k] for r in rs]) for k in rs[0]["best"] if k != "test"}
        table[key] = {
            "acc": _mean([r["accuracy"] for r in rs]),
            "state_bytes": _mean([r["state_bytes"] for r in rs]),
            "extra": extra,
        }
    return table


def _recall(parts: dict):
    """``(section, threshold, table, settings)`` of the recall part, or None if it did not run."""
    if "recall" not in parts:
        return None
    section = parts["recall"]["sections"][0]
    table = _best_by(section)
    return section, section["config"]["threshold"], table, list(dict.fromkeys(s for s, _ in table))


def checks(results: dict) -> list[dict]:
    """The effects the literature reports, each evaluated on this run's numbers:
    ``{"claim", "holds": True/False/None (not measured), "evidence"}``."""
    out = []
    parts = results.get("parts", {})
    recall = _recall(parts)
    if recall:
        section, thr, table, settings = recall
        att = [(s, table.get((s, "attention"), {}).get("acc")) for s in settings]
        if all(a is not None for _, a in att):
            out.append(
                {
                    "claim": "softmax attention solves MQAR at the tested lengths (Zoology)",
                    "holds": all(a >= thr for _, a in att),
                    "evidence": ", ".join(f"{s}: {a:.3f}" for s, a in att),
                }
            )
        pairs = [
            (s, table.get((s, "deltanet"), {}).get("acc"), table.get((s, "linear_attn"), {}).get("acc"))
            for s in settings
        ]
        if all(d is not None and li is not None for _, d, li in pairs):
            sizes = [
                (table[(s, "deltanet")]["state_bytes"], table[(s, "linear_attn")]["state_bytes"])
                for s in settings
            ]
            out.append(
                {
                    "claim": "delta-rule recalls better than linear attention at equal state size "
                    "(DeltaNet: both keep an H x K x V matrix per layer; DeltaNet's measured bytes "
                    "add its short-convolution buffers)",
                    "holds": all(d > li for _, d, li in pairs),
                    "evidence": "; ".join(
                        f"{s}: deltanet {d:.3f} vs linear_attn {li:.3f}, state {int(sz[0])} vs {int(sz[1])} B"
                        for (s, d, li), sz in zip(pairs, sizes, strict=True)
                    ),
                }
            )
        window = section["config"]["window"]
        swa = []
        for r in section["best"]:
            if r["mixer"] == "swa":
                span = r["setting"]["seq_len"]  # queries come after all pairs: the first key is ~L back
                swa.append((r["setting"], span > window, r["accuracy"]))
        beyond = [a for _, far, a in swa if far]
        if beyond:
            out.append(
                {
                    "claim": f"sliding-window attention (window {window}) fails once pairs fall "
                    "outside the window",
                    "holds": all(a < thr for a in beyond),
                    "evidence": ", ".join(
                        f"seq_len {s['seq_len']} ({'beyond' if far else 'within'} the window): {a:.3f}"
                        for s, far, a in swa
                    ),
                }
            )
    state = parts.get("state")
    if state:
        for section in state["sections"]:
            if section["config"]["task"] != "parity":
                continue
            thr = section["config"]["threshold"]
            table = _best_by(section)
            longest = None
            rows = []
            for (_, mixer), v in table.items():
                if mixer.endswith("_neg") or mixer in ("deltanet", "gated_deltanet"):
                    long_tests = sorted(
                        v["extra"], key=lambda k: int("".join(c for c in k if c.isdigit()) or 0)
                    )
                    longest = long_tests[-1] if long_tests else None
                    rows.append((mixer, v["acc"], v["extra"].get(longest) if longest else None))
            neg = [r for r in rows if r[0].endswith("_neg")]
            pos = [r for r in rows if not r[0].endswith("_neg")]
            if neg and pos and longest:
                out.append(
                    {
                        "claim": "parity extrapolates with negative eigenvalues (beta in (0, 2)) "
                        f"and fails without (at the longest test length: >= {EXTRAPOLATES} with, "
                        f"<= {FAILS} without; chance 0.5)",
                        "holds": all(x is not None and x >= EXTRAPOLATES for _, _, x in neg)
                        and all(x is not None and x <= FAILS for _, _, x in pos),
                        "evidence": ", ".join(
                            f"{m}: train-length {a:.3f}, {longest} {x:.3f}" for m, a, x in rows
                        ),
                    }
                )
    return out


def which_mixer(results: dict) -> list[str]:
    """Recommendations computed from the numbers."""
    lines = []
    parts = results.get("parts", {})
    recall = _recall(parts)
    if recall:
        section, thr, table, settings = recall
        mixers = list(dict.fromkeys(m for _, m in table))
        solve_all = [
            m for m in mixers if all((table.get((s, m)) or {}).get("acc", 0) >= thr for s in settings)
        ]
        hardest = settings[-1]
        ranked = sorted(mixers, key=lambda m: -(table.get((hardest, m)) or {}).get("acc", 0))
        if solve_all:
            small = min(solve_all, key=lambda m: table[(hardest, m)]["state_bytes"])
            lines.append(
                f"- **Recall** (MQAR): {', '.join(solve_all)} reach {thr} at every tested setting; "
                f"the smallest state among them is `{small}` "
                f"({table[(hardest, small)]['state_bytes']:.0f} bytes at {hardest})."
            )
        top = ranked[0]
        lines.append(
            f"- **Recall at the hardest setting** ({hardest}): best `{top}` "
            f"({table[(hardest, top)]['acc']:.3f}); best fixed-size state: "
            + next(
                (
                    f"`{m}` ({table[(hardest, m)]['acc']:.3f}, "
                    f"{table[(hardest, m)]['state_bytes']:.0f} bytes)"
                    for m in ranked
                    if m not in ("attention",)
                ),
                "-",
            )
            + "."
        )
    state = parts.get("state")
    if state:
        for section in state["sections"]:
            thr = section["config"]["threshold"]
            table = _best_by(section)
            ok = [
                m
                for (_, m), v in table.items()
                if v["acc"] is not None
                and v["acc"] >= thr
                and v["extra"]
                and all(x is not None and x >= EXTRAPOLATES for x in v["extra"].values())
            ]
            lines.append(
                f"- **State tracking** ({section['config']['task']}, trained short, tested long): "
                + (
                    f"{', '.join(f'`{m}`' for m in ok)} reach {thr} at the training length and "
                    f">= {EXTRAPOLATES} at every longer one."
                    if ok
                    else f"no mixer reaches {thr} at the training length and {EXTRAPOLATES} beyond it "
                    "at this budget."
                )
            )
    lm = parts.get("lm")
    if lm:
        rows = [r for r in lm["summary"]["rows"] if r.get("ppl_at_equal_time") is not None]
        if rows:
            best = min(rows, key=lambda r: r["ppl_at_equal_time"])
            lines.append(
                "- **Language modeling** (Shakespeare, equal wall time "
                f"{lm['summary']['equal_time_s']:.0f} s): "
                f"lowest held-out perplexity `{best['pattern']}` ({best['ppl_at_equal_time']:.1f}); "
                + ", ".join(f"`{r['pattern']}` {r['ppl_at_equal_time']:.1f}" for r in rows)
                + "."
            )
    speed = parts.get("speed")
    if speed:
        T = max(r["T"] for r in speed["rows"])
        chunk = [
            r
            for r in speed["rows"]
            if r["T"] == T and r["mode"] == "chunk" and r.get("fwd_s") and r["variant"] == "default"
        ]
        sdpa = next(
            (r for r in speed["rows"] if r["T"] == T and r["mode"] == "sdpa" and r.get("fwd_s")), None
        )
        if chunk and sdpa:
            fast = sorted(chunk, key=lambda r: r["fwd_s"])
            lines.append(
                f"- **Training / prefill speed** (T = {T}, forward): fastest "
                + ", ".join(f"`{r['name']}` {sdpa['fwd_s'] / r['fwd_s']:.1f}x SDPA" for r in fast[:3])
                + f"; slowest `{fast[-1]['name']}` {sdpa['fwd_s'] / fast[-1]['fwd_s']:.1f}x."
            )
    decode = parts.get("decode")
    if decode:
        C = max(r["context"] for r in decode["rows"])
        rows = [r for r in decode["rows"] if r["context"] == C and r.get("per_token_ms")]
        if rows:
            fast = min(rows, key=lambda r: r["per_token_ms"])
            small = min(rows, key=lambda r: r["cache_bytes"])
            lines.append(
                f"- **Decoding** at a {C}-token context: fastest `{fast['pattern']}` "
                f"({fast['per_token_ms']:.2f} ms/token), smallest cache `{small['pattern']}` "
                f"({small['cache_bytes'] / 2**10:.0f} KiB); "
                + ", ".join(
                    f"`{r['pattern']}` {r['per_token_ms']:.2f} ms, {r['cache_bytes'] / 2**10:.0f} KiB"
                    for r in rows
                )
                + "."
            )
    return lines


def report(results: dict, out: str | os.PathLike) -> str:
    """Write ``report.md`` (and each part's tables and plots) from ``results`` alone."""
    from subquad.bench.task_report import report as task_report

    out = Path(out)
    m = results["machine"]
    lines = [
        f"# subquad bench all — preset `{results['preset']}`",
        "",
        f"Run {results['utc']}, commit {m.get('git_commit')}, {m.get('cpu')} ({m.get('cores')} cores, "
        f"{m.get('torch_threads')} torch threads), torch {m.get('torch')}, {allocator_label(m)}. "
        "Every number below is read "
        "from `results.json` in this folder. Wall time per part: "
        + ", ".join(f"{p} {s / 60:.1f} min" for p, s in results.get("wall_s", {}).items())
        + ".",
        "",
        "## Which mixer for which job (computed from the numbers below)",
        "",
        *which_mixer(results),
        "",
        "## Effects the literature reports, checked on this run",
        "",
        "| claim | holds here | evidence |",
        "|---|---|---|",
    ]
    for c in checks(results):
        verdict = {True: "yes", False: "**no**", None: "not measured"}[c["holds"]]
        lines.append(f"| {c['claim']} | {verdict} | {c['evidence']} |")
    lines.append("")
    parts = results["parts"]
    for name in ("recall", "state"):
        if name in parts:
            sub = out / name
            sub.mkdir(parents=True, exist_ok=True)
            text = task_report({**results, "benchmark": name, "sections": parts[name]["sections"]}, sub)
            body = text.split("\n", 3)[3] if text.count("\n") > 3 else text
            lines += [f"## {name}", "", body.replace("](", f"]({name}/")]
    if "lm" in parts:
        from subquad.bench.lm_report import format_table as lm_table
        from subquad.bench.lm_report import plot as plot_lm

        sub = out / "lm"
        sub.mkdir(parents=True, exist_ok=True)
        lines += [
            "## Language modeling (equal wall time, Shakespeare)",
            "",
            lm_table(parts["lm"]["summary"]),
            "",
        ]
        png = plot_lm(parts["lm"]["summary"], str(sub / "lm.png"))
        if png:
            lines += [f"![lm](lm/{Path(png).name})", ""]
    if "speed" in parts:
        from subquad.bench.speed import format_table

        sub = out / "speed"
        sub.mkdir(parents=True, exist_ok=True)
        lines += ["## Op speed and memory vs causal SDPA", "", "```", format_table(parts["speed"]), "```", ""]
        try:
            from subquad.bench.plot import plot_speed

            plot_speed(parts["speed"], str(sub / "speed.png"))
            lines += ["![speed](speed/speed.png)", ""]
        except ImportError:
            pass
    if "decode" in parts:
        from subquad.bench.decode import format_table as decode_table
        from subquad.bench.decode import plot_decode

        sub = out / "decode"
        sub.mkdir(parents=True, exist_ok=True)
        lines += ["## Whole-model decoding", "", decode_table(parts["decode"]), ""]
        if plot_decode(parts["decode"], str(sub / "decode.png")):
            lines += ["![decode](decode/decode.png)", ""]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text
