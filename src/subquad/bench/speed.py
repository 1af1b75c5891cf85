"""``subquad bench speed``: every op and mode next to causal SDPA, in one run.

Shape legend: B batch, T time, H heads, D head dim (K = V = D).

For each T, causal ``scaled_dot_product_attention`` and each (op, variant, mode) of the registry
are timed forward (under ``no_grad``) and forward+backward (``autograd.grad`` of ``(o * do).sum()``
w.r.t. every input): median over repeats after a warmup, the lengths of one case timed in
interleaved rounds (a slow spell of a shared machine then hits every T alike, so the per-token
ratios across T hold steadier). Each row also gets tokens/s, achieved
GFLOP/s (the op's ``OpSpec`` FLOP count; forward+backward counted as 3x forward, the usual
convention; SDPA causal counted as ``2 B H T^2 D``, half of full attention) as a fraction of the
machine's measured matmul peak, and the peak memory of one call above what was held before it.
Ratios are computed from this one run: speedup vs SDPA at the same T, per-token time relative to
the same op/mode at the shortest T, bytes per token. Rows too long for a mode's limit are kept,
marked skipped, with the reason.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subquad.bench.machine import (
    PeakMemory,
    allocator_label,
    load_average,
    machine_info,
    matmul_peak_gflops,
    matmul_peak_record,
    measure_peak,
    results_dir,
    synchronize,
)
from subquad.registry import get_op, list_ops

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# one call slower than this gets fewer repeats (the median of 3, or a single timing past 4x)
SLOW_CALL_S = 2.0


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """What ``subquad bench speed`` measures. Validated on construction."""

    seq_lens: tuple[int, ...] = (1024, 4096, 16384)
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    ops: tuple[str, ...] | None = None  # None: every registered op
    variants: str = "default"  # "default", "all", or comma-separated variant names
    modes: tuple[str, ...] = ("chunk", "recurrent")
    repeats: int = 5
    backward: bool = True
    chunk_size: int | None = None  # None: each op's own default
    sdpa_max_len: int = 16384
    recurrent_max_len: int = 4096
    backward_max_len_recurrent: int = 1024
    reference_max_len: int = 4096
    threads: int | None = None
    device: str = "cpu"
    out: str | None = None

    def __post_init__(self) -> None:
        if not self.seq_lens or any(not isinstance(t, int) or t < 1 for t in self.seq_lens):
            raise ValueError(f"seq_lens must be positive integers, got {self.seq_lens}")
        if self.chunk_size is not None and (not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {self.chunk_size!r}")
        for name in ("batch", "heads", "head_dim", "repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("sdpa_max_len", "recurrent_max_len", "backward_max_len_recurrent", "reference_max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.variants, str) or not self.variants.strip():
            raise ValueError(f"variants must be 'default', 'all' or variant names, got {self.variants!r}")
        known_modes = ("reference", "chunk", "recurrent")
        if not self.modes or any(m not in known_modes for m in self.modes):
            raise ValueError(f"modes must be a non-empty subset of {known_modes}, got {self.modes}")
        if self.ops is not None:
            for name in self.ops:
                try:
                    get_op(name)
                except KeyError as err:
                    raise ValueError(f"ops: {err.args[0]}") from None
        if self.variants not in ("default", "all"):
            chosen = [get_op(n) for n in self.ops] if self.ops is not None else list_ops()
            known = {v.name for spec in chosen for v in spec.variants}
            missing = [n.strip() for n in self.variants.split(",") if n.strip() not in known]
            if missing:
                raise ValueError(f"variants: {missing} match no variant of the selected ops: {sorted(known)}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")


def quick_config(**overrides) -> SpeedConfig:
    """A small preset for smoke runs: T = 1K and 4K, 3 repeats."""
    return SpeedConfig(**{"seq_lens": (1024, 4096), "repeats": 3, **overrides})


def time_interleaved(
    fns: dict, repeats: int, device: torch.device, on_round: Callable[[], object] | None = None
) -> dict:
    """``{key: (median seconds, repeats)}`` of every callable in ``fns``, timed in rounds: one warmup
    each, then each round times every callable once, in turn. On a shared machine a slow spell
    then lands on all of them alike instead of on whichever happened to run during it, so ratios
    between them (per-token time across T, a method against SDPA) hold steadier. A callable whose
    warmup took longer than SLOW_CALL_S gets 3 repeats (1 past 4x) instead of ``repeats``.
    ``on_round`` is called after the warmups and after every round (progress)."""
    budget, times = {}, {}
    for key, fn in fns.items():
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        first = time.perf_counter() - t0
        budget[key] = 1 if first > 4 * SLOW_CALL_S else min(repeats, 3) if first > SLOW_CALL_S else repeats
        times[key] = []
    if on_round is not None:
        on_round()
    for _ in range(max(budget.values(), default=0)):
        for key, fn in fns.items():
            if len(times[key]) < budget[key]:
                synchronize(device)
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[key].append(time.perf_counter() - t0)
        if on_round is not None:
            on_round()
    return {key: (statistics.median(times[key]), budget[key]) for key in fns}


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, int]:
    """Median seconds of one callable over repeats after a warmup (see ``time_interleaved``)."""
    return time_interleaved({0: fn}, repeats, device)[0]


def _backward_fn(forward: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], object]:
    def run():
        o = forward()
        do = torch.ones_like(o)
        # allow_unused: inputs with no gradient by definition (routing centroids) are still inputs
        return torch.autograd.grad((o * do).sum(), leaves, allow_unused=True)

    return run


def _cases(cfg: SpeedConfig):
    names = cfg.ops if cfg.ops is not None else [s.name for s in list_ops()]
    for name in names:
        spec = get_op(name)
        if cfg.variants == "all":
            variants = spec.variants
        else:
            names = [n.strip() for n in cfg.variants.split(",")]
            variants = tuple(v for v in spec.variants if v.name in names)
        for var in variants:
            for mode in cfg.modes:
                if mode in spec.modes_for(var):
                    yield spec, var, mode


def _default_chunk_size(spec) -> int | None:
    """The chunk size a user gets by not passing one: the registry function's default, else that of
    the public op it wraps (a wrapper taking ``**kwargs`` has none of its own), else 64. None when
    that default is None: the op picks its size per call (e.g. by whether autograd records it)."""
    from subquad import ops

    for fn in (spec.fn, getattr(ops, spec.name, None)):
        param = inspect.signature(fn).parameters.get("chunk_size") if fn is not None else None
        if param is not None and (isinstance(param.default, int) or param.default is None):
            return param.default
    return 64


def _limit(cfg: SpeedConfig, mode: str, backward: bool) -> tuple[int, str]:
    if mode == "reference":
        return cfg.reference_max_len, "reference-max-len"
    if mode == "recurrent":
        if backward:
            return cfg.backward_max_len_recurrent, "backward-max-len-recurrent"
        return cfg.recurrent_max_len, "recurrent-max-len"
    return math.inf, ""


def run_speed(cfg: SpeedConfig, progress: bool = True) -> dict:
    """Run the benchmark; return the results dict (also written as JSON when ``cfg.out`` is set)."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    B, H, D = cfg.batch, cfg.heads, cfg.head_dim
    load_before = load_average()
    peak = matmul_peak_gflops(dtype, device)
    probe = PeakMemory(device)
    cases = list(_cases(cfg))
    rows: list[dict] = []
    total = len(cfg.seq_lens) * (len(cases) + 1)
    bar = tqdm(total=total, desc="bench speed", disable=not progress, unit="case")
    # case by case (SDPA first), each timed at all its lengths in interleaved rounds; rows are
    # listed by T afterwards
    for spec, var, mode in [(None, None, "sdpa"), *cases]:
        name = "sdpa" if spec is None else spec.name
        bar.set_postfix_str(f"{name}/{mode}")
        runs = []  # (row, fn, leaves, flops, backward)
        for T in cfg.seq_lens:
            if spec is None:
                row = {"name": "sdpa", "variant": "causal", "mode": "sdpa", "T": T}
                if T > cfg.sdpa_max_len:
                    row["skipped"] = f"T > sdpa-max-len ({cfg.sdpa_max_len}): quadratic cost"
                    rows.append(row)
                    continue
                gen = torch.Generator().manual_seed(0)
                qkv = [
                    torch.randn(B, H, T, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3)
                ]

                def sdpa(qkv=qkv):
                    return F.scaled_dot_product_attention(*qkv, is_causal=True)

                runs.append((row, sdpa, qkv, 2 * B * H * T * T * D, cfg.backward))
                continue
            row = {"name": spec.name, "variant": var.name, "mode": mode, "T": T}
            fwd_limit, fwd_flag = _limit(cfg, mode, backward=False)
            if T > fwd_limit:
                row["skipped"] = f"T > {fwd_flag} ({fwd_limit}): per-step loop"
                rows.append(row)
                continue
            inputs = spec.make_inputs(var, B=B, T=T, H=H, K=D, V=D, dtype=dtype, device=device, seed=0)
            chunk = cfg.chunk_size or _default_chunk_size(spec)  # None: the op picks per call
            flops_chunk = chunk or spec.forward_chunk_size or 64
            flops = spec.total_flops(mode, B=B, T=T, H=H, K=D, V=D, chunk_size=flops_chunk, variant=var)
            kw = {"mode": mode}
            if mode == "chunk" and chunk is not None:
                kw["chunk_size"] = chunk

            def op(inputs=inputs, spec=spec, var=var, kw=kw):
                return spec.call(inputs, var, **kw)[0]

            bwd_limit, bwd_flag = _limit(cfg, mode, backward=True)
            do_bwd = cfg.backward and T <= bwd_limit
            if cfg.backward and not do_bwd:
                row["backward_skipped"] = f"T > {bwd_flag} ({bwd_limit}): autograd keeps a state per step"
            runs.append((row, op, list(inputs.values()), flops, do_bwd))
        _measure_all(runs, cfg, device, probe, peak)
        rows.extend(run[0] for run in runs)
        bar.update(len(cfg.seq_lens))
        del runs
    order = {T: i for i, T in enumerate(cfg.seq_lens)}
    rows.sort(key=lambda r: order[r["T"]])  # stable: SDPA, then the cases in their order, per T
    bar.close()
    # measured again at the end: the larger of the two is the denominator of every fraction, so a
    # slow spell at the start cannot inflate them
    peak_end = matmul_peak_gflops(dtype, device)
    if peak_end > peak:
        for row in rows:
            for key in ("fwd_peak_fraction", "fwdbwd_peak_fraction"):
                if row.get(key) is not None:
                    row[key] *= peak / peak_end
    peak_start, peak = peak, max(peak, peak_end)
    _ratios(rows)
    result = {
        "benchmark": "speed",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dataclasses.asdict(cfg),
        "machine": {
            **machine_info(device),
            **matmul_peak_record(peak_start, peak_end, cfg.dtype),
            "load_average_before": load_before,
            "load_average_after": load_average(),
        },
        "conventions": {
            "time": "median seconds over repeats after one warmup; forward under no_grad",
            "flops": "op: OpSpec FLOP count of the mode's matmuls; sdpa: causal 2*B*H*T^2*D; "
            "forward+backward counted as 3x forward",
            "memory": probe.reason
            or "peak above the memory held before the call "
            + ("(CUDA allocator)" if device.type == "cuda" else "(process peak RSS, /proc VmHWM)"),
        },
        "rows": rows,
    }
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "speed.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _measure_all(runs, cfg, device, probe, peak) -> None:
    """Fill each ``(row, fn, leaves, flops, backward)`` of one case (its lengths): forward times
    under ``no_grad`` and forward+backward times, each interleaved over the lengths, then the peak
    memory of one call of each."""
    for _, _, leaves, _, _ in runs:
        for x in leaves:
            x.requires_grad_(False)
    with torch.no_grad():
        fwd = time_interleaved({i: run[1] for i, run in enumerate(runs)}, cfg.repeats, device)
        for i, (row, fn, _, flops, _) in enumerate(runs):
            t_fwd, reps = fwd[i]
            tokens = cfg.batch * row["T"]
            row.update(
                fwd_s=t_fwd,
                fwd_repeats=reps,
                fwd_tokens_per_s=tokens / t_fwd,
                fwd_us_per_token=1e6 * t_fwd / tokens,
                fwd_gflops=flops / t_fwd / 1e9,
                fwd_peak_fraction=flops / t_fwd / 1e9 / peak,
                fwd_mem_bytes=measure_peak(fn, probe),
            )
    with_bwd = [i for i, run in enumerate(runs) if run[4]]
    for i in with_bwd:
        for x in runs[i][2]:
            x.requires_grad_(True)  # no graph is built under no_grad, so forward timing was unaffected
    bwd_fns = {i: _backward_fn(runs[i][1], runs[i][2]) for i in with_bwd}
    bwd = time_interleaved(bwd_fns, cfg.repeats, device)
    for i in with_bwd:
        row, flops = runs[i][0], runs[i][3]
        t_bwd, reps = bwd[i]
        row.update(
            fwdbwd_s=t_bwd,
            fwdbwd_repeats=reps,
            fwdbwd_tokens_per_s=cfg.batch * row["T"] / t_bwd,
            fwdbwd_gflops=3 * flops / t_bwd / 1e9,
            fwdbwd_peak_fraction=3 * flops / t_bwd / 1e9 / peak,
            fwdbwd_mem_bytes=measure_peak(bwd_fns[i], probe),
        )
        for x in runs[i][2]:
            x.requires_grad_(False)
    for row, *_ in runs:
        tokens = cfg.batch * row["T"]
        if row.get("fwd_mem_bytes") is not None:
            row["fwd_bytes_per_token"] = row["fwd_mem_bytes"] / tokens
        if row.get("fwdbwd_mem_bytes") is not None:
            row["fwdbwd_bytes_per_token"] = row["fwdbwd_mem_bytes"] / tokens


def _ratios(rows: list[dict]) -> None:
    """Speedups vs SDPA at the same T and per-token time vs the same case's shortest T."""
    sdpa = {r["T"]: r for r in rows if r["name"] == "sdpa" and "fwd_s" in r}
    first: dict[tuple, dict] = {}
    for r in rows:
        if "fwd_s" not in r:
            continue
        base = sdpa.get(r["T"])
        if base is not None and r["name"] != "sdpa":
            r["fwd_speedup_vs_sdpa"] = base["fwd_s"] / r["fwd_s"]
            if "fwdbwd_s" in r and "fwdbwd_s" in base:
                r["fwdbwd_speedup_vs_sdpa"] = base["fwdbwd_s"] / r["fwdbwd_s"]
        key = (r["name"], r["variant"], r["mode"])
        first.setdefault(key, r)
        r["per_token_vs_shortest"] = r["fwd_us_per_token"] / first[key]["fwd_us_per_token"]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict) -> str:
    """The terminal table: one line per case and T."""

    def label(r):  # SDPA's row is its causal form; an op's default variant goes unnamed
        return (
            r["name"] if r["variant"] == "default" or r["name"] == "sdpa" else f"{r['name']}[{r['variant']}]"
        )

    w = max([22, *(len(label(r)) + 1 for r in result["rows"])])
    head = (
        f"{'op':<{w}}{'mode':<10}{'T':>7}  {'fwd ms':>9} {'us/tok':>7} {'xSDPA':>7} {'GF/s':>7} {'%peak':>6}"
        f" {'/T0':>5}  {'f+b ms':>9} {'xSDPA':>7} {'MB f+b':>8} {'B/tok':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        name = label(r)
        if "skipped" in r:
            lines.append(f"{name:<{w}}{r['mode']:<10}{r['T']:>7}  skipped: {r['skipped']}")
            continue
        fb = r.get("fwdbwd_s")
        mem = r.get("fwdbwd_mem_bytes")
        lines.append(
            f"{name:<{w}}{r['mode']:<10}{r['T']:>7}  {r['fwd_s'] * 1e3:>9.1f} {r['fwd_us_per_token']:>7.2f}"
            f" {_fmt(r.get('fwd_speedup_vs_sdpa'), '>7.1f')} {r['fwd_gflops']:>7.1f}"
            f" {100 * r['fwd_peak_fraction']:>5.0f}% {r['per_token_vs_shortest']:>5.2f}"
            f"  {_fmt(None if fb is None else fb * 1e3, '>9.1f')}"
            f" {_fmt(r.get('fwdbwd_speedup_vs_sdpa'), '>7.1f')}"
            f" {_fmt(None if mem is None else mem / 2**20, '>8.1f')}"
            f" {_fmt(r.get('fwdbwd_bytes_per_token'), '>8.0f')}"
        )
    m = result["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"matmul peak {m['matmul_peak_gflops']:.1f} GFLOP/s ({result['config']['dtype']}), "
        f"load {m['load_average_before']} -> {m['load_average_after']}, {allocator_label(m)}, "
        f"commit {str(m['git_commit'])[:10]}"
    )
    return "\n".join(lines)


def default_out_dir() -> str:
    return results_dir("speed")


__all__ = ["SpeedConfig", "format_table", "quick_config", "run_speed"]
