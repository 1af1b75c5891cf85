"""``subquad bench attention``: exact, windowed, decoding and block-sparse softmax attention against
torch's ``scaled_dot_product_attention`` in one run, with the quality of every approximate mask.

Shape legend: B batch, T time, H heads, D head dim, b block size, nb blocks.

Rows (all float32, B=1, H heads, D head dim, ``torch.set_num_threads(threads)``):

- ``exact``: causal SDPA and ``attention`` at each T of ``exact_lens``, forward and
  forward+backward, with the peak memory of the forward per token. ``attention`` runs in torch's
  fused CPU kernel where it applies (as SDPA does); the rows ``attention, own tiling`` switch that
  off (``own_tiling()``) and time this library's own code: the key-block walk here, the span loop
  for the window, the block-sparse engine without fused pieces for the random mask.
- ``decode``: one query against a ``decode_len``-token cache: SDPA and ``attention_decode``.
- ``window``: causal SDPA vs ``attention(window=w)`` and ``attention(window=w, sinks=4)`` at ``T``,
  forward and fwd+bwd.
- ``sparse``: at ``T``, for each mask estimator (and a random mask of the same density, the
  baseline), the time to estimate the mask, the block-sparse attention's time with it (forward
  and fwd+bwd), the kept fraction of the visible blocks, and the relative error of its output
  against full causal attention, ``||o - o_full|| / ||o_full||``.
- ``approx``: at ``T``, HyperAttention (``hyper`` settings) and routing attention
  (``routing_clusters`` centroids from five k-means steps on the input's queries and keys), time
  and relative error against full causal attention.

Inputs are *structured* (see :func:`structured_qkv`): every query has a few strong matches (a
referenced span in retrieval heads, one diagonal in copy heads, sink columns in all) over weak
random scores, the kind of pattern
the estimators are built for; on unstructured random inputs no sparse mask can be accurate and
the errors would say nothing. Timings are medians over ``repeats`` after a warmup; all ratios come
from this one run. Each method is timed over repeated calls of its own, except the decode pair:
SDPA and ``attention_decode`` (a few ms each, small buffers) alternate in interleaved rounds, so a
slow spell of a shared machine lands on both sides of that ratio. At ``T`` dense SDPA takes seconds
a call, so it is not interleaved call by call; instead one more SDPA forward and forward+backward
run after each row, and a row's speedup is against the mean of the SDPA times right before and
right after it (the report shows them, and the spread of all SDPA calls of the section).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from subquad.bench import machine
from subquad.bench.machine import PeakMemory, allocator_label, load_average, machine_info, measure_peak
from subquad.bench.speed import _time as time_median
from subquad.bench.speed import time_interleaved
from subquad.ops import attention, attention_decode, hyper_attention, routing_attention
from subquad.ops.attention.estimators import ESTIMATORS, mask_density
from subquad.ops.attention.window import own_tiling
from subquad.ops.routing import update_centroids


def structured_qkv(
    T: int,
    *,
    heads: int = 8,
    head_dim: int = 64,
    batch: int = 1,
    strength: float = 20.0,
    segment: int = 512,
    sinks: int = 4,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 ``q, k, v [B, T, H, D]`` with the attention patterns of real heads, so that each
    query has a few strong matches over weak random scores.

    The base of every query and key is random, ``N(0, 1/D)`` per coordinate (about unit norm);
    values are ``N(0, 1)``. Two kinds of heads alternate:

    - even heads, *retrieval*: the sequence is cut into segments of ``segment`` tokens, each with
      a random unit topic that its keys carry; every segment after the first looks up one earlier
      segment (drawn at random): its queries carry that segment's topic, so they attend to the
      whole referenced span (block-coherent attention, what block estimators are built for);
    - odd heads, *slash*: one offset ``d`` in ``[1, T/2]`` per head, and query i carries the
      direction of key ``i - d`` (a copy head: attention on one diagonal).

    In every head the first ``sinks`` keys are set to one unit direction that all its queries
    carry (attention sinks: columns every query reads). Each planted match scores about
    ``strength`` nats above a random key (``strength * sqrt(D)`` on unit directions, scores scaled
    by ``D^-1/2``). Random keys score ``N(0, ~2 strength^2 / D)`` (cross-talk of random
    directions in D dims), so the strength must grow with T for the planted keys to dominate:
    with 20 nats at D = 64 they hold ~98% of the attention at T = 16K.
    """
    g = torch.Generator().manual_seed(seed)
    B, H, D = batch, heads, head_dim
    k = torch.randn(B, T, H, D, generator=g) / math.sqrt(D)
    v = torch.randn(B, T, H, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g) / math.sqrt(D)
    amp = strength * math.sqrt(D)
    nseg = -(-T // segment)
    for h in range(H):
        if h % 2 == 0 and nseg > 1:
            topics = F.normalize(torch.randn(nseg, D, generator=g), dim=-1)
            seg = torch.arange(T) // segment
            k[:, :, h] += topics[seg]
            ref = torch.cat(
                [
                    torch.zeros(1, dtype=torch.long),
                    (torch.rand(nseg - 1, generator=g) * torch.arange(1, nseg)).long(),
                ]
            )
            q[:, segment:, h] += amp * topics[ref[seg[segment:]]]
        else:
            d = int(torch.randint(1, max(2, T // 2), (1,), generator=g))
            q[:, d:, h] += amp * F.normalize(k[:, : T - d, h], dim=-1)
        if sinks:
            u = F.normalize(torch.randn(D, generator=g), dim=0)
            k[:, :sinks, h] = u
            q[:, :, h] += amp * u
    return q, k, v


def random_block_mask(B: int, H: int, nb: int, density: float, seed: int = 0) -> torch.Tensor:
    """A causal block mask keeping the diagonal, the first block and random visible blocks, about
    ``density`` of the visible ones in all: the baseline an estimator has to beat."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.ones(nb, nb, dtype=torch.bool).tril()
    must = (torch.eye(nb, dtype=torch.bool) | (torch.arange(nb) == 0)[None, :]) & vis
    extra = density * vis.sum() - must.sum()
    p = max(0.0, float(extra) / float((vis & ~must).sum().clamp(min=1)))
    return ((torch.rand(B, H, nb, nb, generator=g) < p) & vis) | must


@dataclass(frozen=True, kw_only=True)
class AttentionBenchConfig:
    """What ``subquad bench attention`` measures. Validated on construction."""

    heads: int = 8
    head_dim: int = 64
    exact_lens: tuple[int, ...] = (4096, 8192)
    memory_lens: tuple[int, ...] = (4096, 32768)
    T: int = 16384
    window: int = 512
    decode_len: int = 65536
    decode_splits: int | None = None
    block_size: int = 128
    estimators: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "xattention": {"stride": 16, "threshold": 0.9},
            "vertical_slash": {"last_q": 64, "vertical": 8, "slash": 8},
            "quest": {"topk": 7},
            "nsa": {"topk": 7},
        }
    )
    random_density: float = 0.1
    hyper: dict[str, Any] = field(
        default_factory=lambda: {"block_size": 256, "num_samples": 256, "lsh_bits": 6, "min_seq_len": 1024}
    )
    routing_clusters: int = 16
    backward: bool = True
    repeats: int = 5
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "heads",
            "head_dim",
            "T",
            "window",
            "decode_len",
            "block_size",
            "repeats",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        d = self.decode_splits
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"decode_splits must be None (automatic) or an int >= 1, got {d!r}")
        for name in ("exact_lens", "memory_lens"):
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in getattr(self, name)):
                raise ValueError(f"{name} must be ints >= 1, got {getattr(self, name)!r}")
        unknown = sorted(set(self.estimators) - set(ESTIMATORS))
        if unknown:
            raise ValueError(f"unknown estimators {unknown}; expected names from {sorted(ESTIMATORS)}")
        if not 0 < self.random_density <= 1:
            raise ValueError(f"random_density must be in (0, 1], got {self.random_density!r}")


def quick_config(**overrides) -> AttentionBenchConfig:
    """Smaller sizes for a smoke run (a minute): T = 4K, a 16K-token decode cache."""
    base = {
        "exact_lens": (2048,),
        "memory_lens": (1024, 4096),
        "T": 4096,
        "decode_len": 16384,
        "repeats": 3,
    }
    return AttentionBenchConfig(**{**base, **overrides})


def _time(fn, repeats: int) -> float:
    """Median seconds after a warmup (the speed benchmark's timer, on CPU)."""
    return time_median(fn, repeats, torch.device("cpu"))[0]


@contextlib.contextmanager
def _grads_on(leaves):
    """``leaves`` require gradients inside the block (the inputs are shared by every method)."""
    for x in leaves:
        x.requires_grad_(True)
    try:
        yield
    finally:
        for x in leaves:
            x.requires_grad_(False)


def _fwd_bwd(fn, leaves):
    def run():
        o = fn()
        return torch.autograd.grad(o.sum(), leaves)

    return run


def _timed(fn, leaves, cfg, status=None) -> dict:
    """``{"fwd_s", "fwdbwd_s"}``: forward (no grad) and forward+backward medians of ``fn() -> o``,
    each over repeated calls of this one method. (Timing several methods in interleaved rounds was
    tried and dropped: a call made right after other methods pays for their cache and allocator
    state, a systematic cost that repeated calls of one method, as in training, do not pay; in a
    pool of every op at T 16K, mom read 1739 ms against 408 ms timed on its own.)
    ``status(text)`` is told each finished round."""
    cpu = torch.device("cpu")
    phase = {"name": "fwd", "round": 0}

    def on_round():
        if status is not None:
            status(f"{phase['name']} round {phase['round']}/{cfg.repeats}")
        phase["round"] += 1

    with torch.no_grad():
        row = {"fwd_s": time_interleaved({0: fn}, cfg.repeats, cpu, on_round)[0][0]}
    if cfg.backward:
        phase.update(name="fwd+bwd", round=0)
        with _grads_on(leaves):
            row["fwdbwd_s"] = time_interleaved({0: _fwd_bwd(fn, leaves)}, cfg.repeats, cpu, on_round)[0][0]
    return row


def _sample(fn, leaves, cfg) -> dict:
    """One forward (no grad) and, with ``cfg.backward``, one forward+backward of an already warm
    ``fn``: ``{"fwd_s", "fwdbwd_s"}`` seconds."""
    out = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        fn()
        out["fwd_s"] = time.perf_counter() - t0
    if cfg.backward:
        run = _fwd_bwd(fn, leaves)
        with _grads_on(leaves):
            t0 = time.perf_counter()
            run()
            out["fwdbwd_s"] = time.perf_counter() - t0
    return out


def _sdpa(q, k, v, causal=True):
    # SDPA's layout is [B, H, T, D]; the transposes are views, included in its time as in ours
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)


def _rel_err(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.double() - ref.double()).norm() / ref.double().norm())


# the op with torch's fused CPU kernel switched off: this library's own key-block walk
OWN_TILING = "attention, own tiling"


def _own(fn, *args, **kwargs):
    with own_tiling():
        return fn(*args, **kwargs)


def run_attention_bench(cfg: AttentionBenchConfig, progress: bool = True) -> dict:
    """Every row of the benchmark; see the module docstring."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the machine's float32 matmul rate, at the start and the end (the larger is kept): VMs of one
    # name differ by ~2x in it, which the ratios here do not show
    peaks = [machine.matmul_peak_gflops(torch.float32, torch.device("cpu"))]
    probe = PeakMemory(torch.device("cpu"))
    rows: list[dict] = []
    steps = len(cfg.exact_lens) + len(cfg.memory_lens) + len(cfg.estimators) + 2  # progress units
    bar = tqdm(total=steps, disable=not progress, desc="bench attention", unit="step")

    def step(label):
        bar.set_postfix_str(label)
        bar.update(1)

    def status(label):
        bar.set_postfix_str(label)

    # exact causal attention vs SDPA
    for T in cfg.exact_lens:
        q, k, v = structured_qkv(T, heads=cfg.heads, head_dim=cfg.head_dim, seed=cfg.seed)
        fns = {
            "sdpa": lambda q=q, k=k, v=v: _sdpa(q, k, v),
            "attention": lambda q=q, k=k, v=v: attention(q, k, v),
            OWN_TILING: lambda q=q, k=k, v=v: _own(attention, q, k, v),
        }
        for name, fn in fns.items():
            label = f"exact T={T} {name}"
            timed = _timed(fn, [q, k, v], cfg, lambda text, label=label: status(f"{label} {text}"))
            rows.append({"section": "exact", "method": name, "T": T, **timed})
        step(f"exact T={T}")
    for T in cfg.memory_lens:
        q, k, v = structured_qkv(T, heads=cfg.heads, head_dim=cfg.head_dim, seed=cfg.seed)
        for name, fn in (
            ("attention", lambda q=q, k=k, v=v: attention(q, k, v)),
            (OWN_TILING, lambda q=q, k=k, v=v: _own(attention, q, k, v)),
        ):
            with torch.no_grad():
                mem = measure_peak(fn, probe)
            rows.append(
                {
                    "section": "memory",
                    "method": name,
                    "T": T,
                    "fwd_mem_bytes": mem,
                    "fwd_bytes_per_token": None if mem is None else mem / T,
                    "input_bytes_per_token": 4 * 3 * cfg.heads * cfg.head_dim,
                }
            )
        step(f"memory T={T}")

    # one decoding step against a long cache
    S = cfg.decode_len
    g = torch.Generator().manual_seed(cfg.seed)
    kc = torch.randn(1, S, cfg.heads, cfg.head_dim, generator=g)
    vc = torch.randn(1, S, cfg.heads, cfg.head_dim, generator=g)
    q1 = torch.randn(1, 1, cfg.heads, cfg.head_dim, generator=g)
    fns = {
        "sdpa": lambda kc=kc, vc=vc: _sdpa(q1, kc, vc, causal=False),
        "attention_decode": lambda kc=kc, vc=vc: attention_decode(q1, kc, vc, num_splits=cfg.decode_splits),
    }
    with torch.no_grad():
        ref = fns["sdpa"]()
        timed = time_interleaved(fns, max(cfg.repeats, 11), torch.device("cpu"))
        for name, fn in fns.items():
            rows.append(
                {
                    "section": "decode",
                    "method": name,
                    "T": S,
                    "fwd_s": timed[name][0],
                    "rel_err": _rel_err(fn(), ref),
                }
            )
    del kc, vc, fns
    step(f"decode S={S}")

    # sliding window vs dense causal SDPA, and the block-sparse rows, at T
    T, b = cfg.T, cfg.block_size
    q, k, v = structured_qkv(T, heads=cfg.heads, head_dim=cfg.head_dim, seed=cfg.seed)
    with torch.no_grad():
        full = _sdpa(q, k, v)
    # the mask estimators first, then dense SDPA (the ratios' baseline) and every method at T
    masks = {}
    for name, kwargs in cfg.estimators.items():
        est = ESTIMATORS[name]
        with torch.no_grad():
            t_est = _time(lambda est=est, kwargs=kwargs: est(q, k, block_size=b, **kwargs), cfg.repeats)
            masks[name] = (est(q, k, block_size=b, **kwargs), t_est, kwargs)
        step(f"estimate {name}")
    densities = [mask_density(m) for m, _, _ in masks.values()]
    rnd_density = cfg.random_density
    masks["random"] = (
        random_block_mask(1, cfg.heads, -(-T // b), rnd_density, cfg.seed),
        None,
        {"density": rnd_density},
    )
    masks[f"random, {OWN_TILING}"] = masks["random"]
    # approximate attention ops: HyperAttention at cfg.hyper; routing with centroids from 5 k-means
    # (Lloyd) steps on this input's queries and keys, started from randomly drawn queries/keys (random
    # Gaussian starts leave most clusters empty), as a trained layer's EMA would settle on
    with torch.no_grad():
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randint(0, 2 * T, (cfg.routing_clusters,), generator=g)
        mu = torch.cat([q, k], 1)[0, pick].transpose(0, 1).contiguous()  # [H, M, D]
        for _ in range(5):
            mu = update_centroids(mu, q, k, decay=0.0)

    methods: dict[tuple[str, str], tuple[dict, Any]] = {}
    # the plain window (what the speed target names) and with StreamingLLM's 4 sink keys
    # (and the plain window by this library's own span loop, torch's fused kernel off)
    for sinks, own in ((0, False), (4, False), (0, True)):
        fn = lambda sinks=sinks: attention(q, k, v, window=cfg.window, sinks=sinks)  # noqa: E731
        fn = (lambda fn=fn: _own(fn)) if own else fn
        name = (OWN_TILING if own else "attention") + f" window={cfg.window}"
        name += f" sinks={sinks}" if sinks else ""
        methods[("window", name)] = ({}, fn)
    for name, (mask, t_est, kwargs) in masks.items():
        fn = lambda mask=mask: attention(q, k, v, block_mask=mask, chunk_size=b)  # noqa: E731
        fn = (lambda fn=fn: _own(fn)) if name.endswith(OWN_TILING) else fn
        extra = {"settings": kwargs, "density": mask_density(mask), "estimate_s": t_est}
        methods[("sparse", name)] = (extra, fn)
    methods[("approx", "hyper")] = (
        {"settings": dict(cfg.hyper)},
        lambda: hyper_attention(q, k, v, **cfg.hyper),
    )
    methods[("approx", "routing")] = (
        {"settings": {"clusters": cfg.routing_clusters}},
        lambda: routing_attention(q, k, v, mu),
    )
    # dense SDPA (the ratios' baseline) first, then every method, each followed by one more SDPA
    # forward and forward+backward: a row's ratio is against the mean of the SDPA times right before
    # and right after it, so a slow spell of a shared machine (minutes long) lands on both sides
    dense = lambda: _sdpa(q, k, v)  # noqa: E731
    base = _timed(dense, [q, k, v], cfg, lambda text: status(f"T={T} sdpa {text}"))
    sdpa_row = {"section": "dense", "method": "sdpa", "T": T, **base, "samples": {x: [] for x in base}}
    rows.append(sdpa_row)
    before = base
    for (section, name), (extra, fn) in methods.items():
        timed = _timed(fn, [q, k, v], cfg, lambda text, name=name: status(f"T={T} {name} {text}"))
        row = {"section": section, "method": name, "T": T, **extra, **timed}
        with torch.no_grad():
            row["rel_err"] = _rel_err(fn(), full)
        status(f"T={T} sdpa after {name}")
        after = _sample(dense, [q, k, v], cfg)
        for key, t in after.items():
            sdpa_row["samples"][key].append(t)
            row[f"sdpa_{key}"] = (before[key] + t) / 2
        before = after
        rows.append(row)
    step(f"window, sparse and approx T={T}")
    bar.close()
    _ratios(rows)
    peaks.append(machine.matmul_peak_gflops(torch.float32, torch.device("cpu")))
    return {
        "benchmark": "attention",
        "config": dataclasses.asdict(cfg),
        "machine": {
            **machine_info(torch.device("cpu")),
            **machine.matmul_peak_record(*peaks, "float32"),
        },
        "load_average": load_average(),
        "mean_estimator_density": statistics.fmean(densities) if densities else None,
        "rows": rows,
    }


def _ratios(rows: list[dict]) -> None:
    """Speedups against SDPA at the same T and section (dense causal SDPA for window / sparse),
    or against the SDPA times taken around the row (``sdpa_fwd_s``, ``sdpa_fwdbwd_s``) where it has
    them."""
    sdpa = {}
    for r in rows:
        if r["method"] == "sdpa":
            sdpa[(r["section"], r["T"])] = r
            if r["section"] == "dense":
                sdpa[("window", r["T"])] = sdpa[("sparse", r["T"])] = sdpa[("approx", r["T"])] = r
    for r in rows:
        base = sdpa.get((r["section"], r["T"]))
        if base is None or r is base:
            continue
        for key in ("fwd_s", "fwdbwd_s"):
            ref = r.get(f"sdpa_{key}") or base.get(key)  # SDPA timed around the row where it was
            if r.get(key) and ref:
                r[f"{key[:-2]}_speedup_vs_sdpa"] = ref / r[key]
        if r.get("estimate_s") and r.get("fwd_s"):
            r["estimate_over_fwd"] = r["estimate_s"] / r["fwd_s"]


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _peak_words(info: dict) -> str:
    """``, float32 matmul peak X GFLOP/s`` where the run measured it (older runs did not)."""
    peak = info.get("matmul_peak_gflops")
    return "" if peak is None else f", float32 matmul peak {peak:.0f} GFLOP/s"


def format_table(result: dict) -> str:
    """The markdown report of one run."""
    cfg, rows = result["config"], result["rows"]
    m = result["machine"]
    out = [
        f"# subquad bench attention\n\nfloat32, B=1, H={cfg['heads']}, D={cfg['head_dim']}, "
        f"{m['torch_threads']} threads on {m['cpu']}{_peak_words(m)}, torch {m['torch']}, "
        f"{allocator_label(m)}, commit {m.get('git_commit')}; "
        f"load average before the run {result.get('load_average')}. Medians of {cfg['repeats']} repeats.\n",
        "## Exact causal attention vs SDPA\n",
        "| T | method | fwd s | fwd+bwd s | fwd speedup vs SDPA | fwd+bwd speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] == "exact":
            out.append(
                f"| {r['T']} | {r['method']} | {_f(r.get('fwd_s'), '.3f')} | {_f(r.get('fwdbwd_s'), '.3f')} "
                f"| {_f(r.get('fwd_speedup_vs_sdpa'), '.2f')} "
                f"| {_f(r.get('fwdbwd_speedup_vs_sdpa'), '.2f')} |"
            )
    out += ["", "Peak memory of the forward above what was held before it (inputs excluded):", ""]
    out += ["| T | method | peak MB | bytes / token | input bytes / token |", "|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "memory":
            mb = None if r["fwd_mem_bytes"] is None else r["fwd_mem_bytes"] / 2**20
            out.append(
                f"| {r['T']} | {r['method']} | {_f(mb, '.1f')} | {_f(r['fwd_bytes_per_token'], '.0f')} "
                f"| {r['input_bytes_per_token']} |"
            )
    out += ["", "## One decoding step (one query, whole cache)\n"]
    out += ["| cache tokens | method | ms | speedup vs SDPA | rel. error vs SDPA |", "|---|---|---|---|---|"]
    for r in rows:
        if r["section"] == "decode":
            out.append(
                f"| {r['T']} | {r['method']} | {1e3 * r['fwd_s']:.3f} "
                f"| {_f(r.get('fwd_speedup_vs_sdpa'), '.2f')} "
                f"| {r['rel_err']:.1e} |"
            )
    T = cfg["T"]
    out += [
        "",
        f"## Sliding window and block-sparse attention at T = {T} vs dense causal SDPA\n",
        f"Block size {cfg['block_size']}. Density: kept fraction of the causally visible blocks. "
        "Relative error: `||o - o_full|| / ||o_full||` against full causal attention on the "
        "structured inputs. Estimate: time to build the mask, also as a fraction of the sparse "
        "forward. Speedups are against SDPA timed around the row: the mean of one SDPA call right "
        "before the row and one right after it (forward, and forward+backward), shown as SDPA s.\n",
        "| method | settings | density | estimate s | estimate / sparse fwd | fwd s | SDPA fwd s | "
        "fwd speedup | fwd+bwd s | SDPA fwd+bwd s | fwd+bwd speedup | rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["section"] in ("dense", "window", "sparse", "approx"):
            settings = ", ".join(f"{k}={v}" for k, v in (r.get("settings") or {}).items())
            out.append(
                f"| {r['method']} | {settings} | {_f(r.get('density'), '.3f')} "
                f"| {_f(r.get('estimate_s'), '.3f')} "
                f"| {_f(r.get('estimate_over_fwd'), '.2f')} | {_f(r.get('fwd_s'), '.3f')} "
                f"| {_f(r.get('sdpa_fwd_s'), '.3f')} | {_f(r.get('fwd_speedup_vs_sdpa'), '.1f')} "
                f"| {_f(r.get('fwdbwd_s'), '.3f')} | {_f(r.get('sdpa_fwdbwd_s'), '.3f')} "
                f"| {_f(r.get('fwdbwd_speedup_vs_sdpa'), '.1f')} | {_f(r.get('rel_err'), '.3f')} |"
            )
    for r in rows:
        if r["section"] == "dense" and any(r.get("samples", {}).values()):
            spread = "; ".join(
                f"{label} {min(t):.3f}-{max(t):.3f} s"
                for key, label in (("fwd_s", "forward"), ("fwdbwd_s", "forward+backward"))
                if (t := [r[key], *r["samples"].get(key, [])]) and None not in t
            )
            out += ["", f"SDPA over the section (its median and the calls between rows): {spread}."]
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> str | None:
    """Speedup vs relative error of every sparse / window row (PNG), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [
        r
        for r in result["rows"]
        if r["section"] in ("window", "sparse", "approx") and r.get("fwd_speedup_vs_sdpa")
    ]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        err = max(r["rel_err"], 1e-6)
        ax.scatter(r["fwd_speedup_vs_sdpa"], err, s=40)
        ax.annotate(
            r["method"].split(" ")[0],
            (r["fwd_speedup_vs_sdpa"], err),
            fontsize=8,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("forward speedup vs dense causal SDPA")
    ax.set_ylabel("relative error vs full attention")
    ax.set_title(f"T = {result['config']['T']}, structured inputs")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(result: dict, out_dir: str) -> tuple[str, str, str | None]:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "attention.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    md = os.path.join(out_dir, "report.md")
    with open(md, "w") as f:
        f.write(format_table(result))
    png = plot(result, os.path.join(out_dir, "attention.png"))
    return path, md, png
