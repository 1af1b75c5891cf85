"""The ``subquad`` command line: ``list``, ``bench speed|decode``, ``train``, ``generate``."""

from __future__ import annotations

import argparse
import os
import sys

from subquad.registry import list_ops


def _csv(cast):
    def parse(text: str):
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from err

    return parse


def cmd_list(args: argparse.Namespace) -> int:
    specs = list_ops()
    rows = []
    for spec in specs:
        state = "[" + ", ".join(spec.state) + "]" if spec.stateful else "KV cache"
        kib = f"{spec.state_bytes_per_sequence(H=8, K=64, V=64) / 1024:.0f} KiB" if spec.stateful else "-"
        variants = ",".join(v.name for v in spec.variants)
        rows.append(
            (spec.name, ",".join(spec.modes), variants, spec.gate, state, kib, f"{spec.paper} <{spec.url}>")
        )
    head = ("op", "modes", "variants", "gate", "state", "state/seq", "paper")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(6)]
    for r in [head, *rows]:
        cells = [
            c.rjust(w) if i == 5 else c.ljust(w) for i, (c, w) in enumerate(zip(r[:6], widths, strict=True))
        ]
        print("  ".join(cells) + "  " + r[6])
    print("state/seq: float32 state of one sequence at H=8, K=V=64 (independent of T; attention keeps a")
    print("KV cache instead, which grows with T)")
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from subquad.bench.plot import plot_speed
    from subquad.bench.speed import SpeedConfig, default_out_dir, format_table, run_speed

    fields = dict(
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        ops=args.ops,
        variants=args.variants,
        modes=args.modes,
        backward=not args.no_backward,
        chunk_size=args.chunk_size,
        sdpa_max_len=args.sdpa_max_len,
        recurrent_max_len=args.recurrent_max_len,
        backward_max_len_recurrent=args.backward_max_len_recurrent,
        threads=args.threads,
        device=args.device,
        out=args.out or default_out_dir(),
    )
    if args.quick:
        fields.update(seq_lens=(1024, 4096), repeats=3)
    if args.seq_lens is not None:
        fields["seq_lens"] = args.seq_lens
    if args.repeats is not None:
        fields["repeats"] = args.repeats
    try:
        cfg = SpeedConfig(**fields)
    except ValueError as err:
        print(f"subquad bench speed: {err}", file=sys.stderr)
        return 2
    result = run_speed(cfg, progress=not args.no_progress)
    print(format_table(result))
    png = plot_speed(result, os.path.join(cfg.out, "speed.png"))
    print(f"wrote {os.path.join(cfg.out, 'speed.json')} and {png}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from subquad.bench.decode import DecodeConfig, default_out_dir, format_table, plot_decode, run_decode

    fields = {
        "hidden_size": args.hidden_size,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "window": args.window,
        "batch": args.batch,
        "steps": args.steps,
        "dtype": args.dtype,
        "threads": args.threads,
        "out": args.out or default_out_dir(),
    }
    if args.patterns is not None:
        fields["patterns"] = args.patterns
    if args.contexts is not None:
        fields["contexts"] = args.contexts
    if args.quick:
        fields.setdefault("contexts", (1024, 4096, 16384))
        fields["patterns"] = args.patterns or ("A", "G")
    try:
        cfg = DecodeConfig(**fields)
    except ValueError as err:
        print(f"subquad bench decode: {err}", file=sys.stderr)
        return 2
    result = run_decode(cfg, progress=not args.no_progress)
    print(format_table(result))
    png = plot_decode(result, os.path.join(cfg.out, "decode.png"))
    print(f"wrote {os.path.join(cfg.out, 'decode.json')}" + (f" and {png}" if png else ""))
    return 0


def cmd_bench_kv(args: argparse.Namespace) -> int:
    from subquad.bench.kv import KVBenchConfig, default_out_dir, format_report, plot_kv, quick_config, run_kv

    fields = {
        name: value
        for name, value in {
            "contexts": args.contexts,
            "depths": args.depths,
            "ratios": args.ratios,
            "policies": args.policies,
            "quants": None if args.quants is None else tuple(q for q in args.quants if q != "none"),
            "samples": args.samples,
            "ppl_segments": args.ppl_segments,
            "decode_tokens": args.decode_tokens,
            "decode_budget": args.decode_budget,
            "threads": args.threads,
        }.items()
        if value is not None
    }
    fields["out"] = args.out or default_out_dir()
    try:
        cfg = quick_config(**fields) if args.quick else KVBenchConfig(**fields)
    except ValueError as err:
        print(f"subquad bench kv: {err}", file=sys.stderr)
        return 2
    try:
        result = run_kv(cfg, progress=not args.no_progress)
    except RuntimeError as err:  # the model is not installed
        print(f"subquad bench kv: {err}", file=sys.stderr)
        return 2
    report = format_report(result)
    with open(os.path.join(cfg.out, "report.md"), "w") as f:
        f.write(report)
    print(report)
    png = plot_kv(result, os.path.join(cfg.out, "kv.png"))
    print(f"wrote {os.path.join(cfg.out, 'kv.json')}, report.md" + (f" and {png}" if png else ""))
    return 0


def cmd_bench_attention(args: argparse.Namespace) -> int:
    from subquad.bench.attention import AttentionBenchConfig, quick_config, run_attention_bench, write_results
    from subquad.bench.machine import results_dir

    fields = {
        name: value
        for name, value in {
            "T": args.seq_len,
            "exact_lens": args.exact_lens,
            "memory_lens": args.memory_lens,
            "decode_len": args.decode_len,
            "window": args.window,
            "block_size": args.block_size,
            "repeats": args.repeats,
            "threads": args.threads,
            "backward": False if args.no_backward else None,
        }.items()
        if value is not None
    }
    try:
        cfg = quick_config(**fields) if args.quick else AttentionBenchConfig(**fields)
    except ValueError as err:
        print(f"subquad bench attention: {err}", file=sys.stderr)
        return 2
    result = run_attention_bench(cfg, progress=not args.no_progress)
    path, md, png = write_results(result, args.out or results_dir("attention"))
    with open(md) as f:
        print(f.read())
    print(f"wrote {path}, {md}" + (f" and {png}" if png else ""))
    return 0


def cmd_bench_all(args: argparse.Namespace) -> int:
    from subquad.bench.all import preset, run_all
    from subquad.bench.machine import results_dir

    try:
        overrides = {"threads": args.threads}
        if args.parts:
            overrides["parts"] = tuple(args.parts)
        cfg = preset(args.preset, **overrides)
    except ValueError as err:
        print(f"subquad bench all: {err}", file=sys.stderr)
        return 2
    out = args.out or results_dir(f"all-{args.preset}")
    run_all(cfg, out, progress=not args.no_progress)
    with open(os.path.join(out, "report.md")) as f:
        print(f.read())
    print(f"wrote {os.path.join(out, 'results.json')} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_bench_lm_report(args: argparse.Namespace) -> int:
    from subquad.bench.lm_report import format_table, plot, summarize

    try:
        summary = summarize(args.runs)
    except (FileNotFoundError, ValueError) as err:
        print(f"subquad bench lm-report: {err}", file=sys.stderr)
        return 2
    table = format_table(summary)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lm_report.md"), "w") as f:
            f.write(table + "\n")
        png = plot(summary, os.path.join(args.out, "lm_report.png"))
        print(f"wrote {os.path.join(args.out, 'lm_report.md')}" + (f" and {png}" if png else ""))
    return 0


def cmd_bench_tasks(args: argparse.Namespace) -> int:
    import dataclasses
    from datetime import datetime, timezone

    import torch

    from subquad.bench.machine import machine_info
    from subquad.bench.task_report import recall_preset, report, state_preset, write_results
    from subquad.bench.tasks import run_task_bench

    try:
        if args.bench == "recall":
            configs = [recall_preset(args.preset)]
        else:
            configs = [state_preset(args.preset, task) for task in args.tasks]
        if args.mixers:
            configs = [dataclasses.replace(c, mixers=args.mixers) for c in configs]
        if args.max_steps:
            configs = [dataclasses.replace(c, max_steps=args.max_steps) for c in configs]
    except ValueError as err:
        print(f"subquad bench {args.bench}: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    stamp = datetime.now(timezone.utc)
    out = args.out or os.path.join(
        "results", f"{args.bench}-{args.preset}-" + stamp.strftime("%Y%m%d-%H%M%S")
    )
    sections = [run_task_bench(c, progress=not args.no_progress) for c in configs]
    results = {
        "benchmark": args.bench,
        "preset": args.preset,
        "utc": stamp.isoformat(timespec="seconds"),
        "machine": machine_info(torch.device("cpu")),
        "sections": sections,
    }
    path = write_results(results, out)
    print(report(results, out))
    print(f"wrote {path} and {os.path.join(out, 'report.md')}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from subquad.train import CheckpointError, TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    fields["progress"] = not args.no_progress
    try:
        cfg = TrainConfig(**fields)
        summary = train(cfg, resume=args.resume)
    except (ValueError, FileExistsError, CheckpointError) as err:
        print(f"subquad train: {err}", file=sys.stderr)
        return 2
    line = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items() if k != "summary"
    )
    print(f"done: {line}")
    print(f"model, tokenizer and metrics.jsonl in {cfg.out_dir}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, TextStreamer

    import subquad.models  # noqa: F401  (registers the Auto classes)
    from subquad.data import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model)
    except FileNotFoundError as err:
        print(f"subquad generate: {err}", file=sys.stderr)
        return 2
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=False)
    with torch.no_grad():
        model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.temperature > 0,
            temperature=args.temperature if args.temperature > 0 else None,
            top_k=args.top_k if args.temperature > 0 else None,
            top_p=args.top_p if args.temperature > 0 else None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subquad", description="Sub-quadratic token mixers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="ops in the registry: modes, variants, state size, papers")
    p_list.set_defaults(func=cmd_list)

    p_bench = sub.add_parser("bench", help="benchmarks")
    bench = p_bench.add_subparsers(dest="bench", required=True)
    p = bench.add_parser("speed", help="time/throughput/GFLOP/s/memory of every op and mode vs causal SDPA")
    p.add_argument("--seq-lens", type=_csv(int), default=None, help="default 1024,4096,16384")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64, help="K = V = head dim")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float64")
    p.add_argument("--ops", type=_csv(str), default=None, help="comma list of registry ops (default: all)")
    p.add_argument(
        "--variants", default="default", help="'default', 'all', or variant names (e.g. window512)"
    )
    p.add_argument("--modes", type=_csv(str), default=("chunk", "recurrent"), help="default chunk,recurrent")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk modes: default each op's")
    p.add_argument("--sdpa-max-len", type=int, default=16384, help="longest T for quadratic SDPA")
    p.add_argument("--recurrent-max-len", type=int, default=4096, help="longest T for step loops")
    p.add_argument("--backward-max-len-recurrent", type=int, default=1024, help="step-loop backward up to")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output directory (default results/speed-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="T = 1K, 4K and 3 repeats")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_speed)

    p = bench.add_parser(
        "decode", help="per-token decode latency and cache memory of whole models vs context"
    )
    p.add_argument("--patterns", type=_csv(str), default=None, help="layer patterns (default A,G,N,GGGA,S)")
    p.add_argument("--contexts", type=_csv(int), default=None, help="default 1024,...,32768")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=512, help="window of S layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per case (median reported)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default results/decode-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="patterns A,G at 1K, 4K, 16K")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_decode)

    for name, help_text in (
        ("recall", "train each mixer on MQAR (multi-query associative recall): accuracy vs state size"),
        ("state", "train each mixer on parity / S5 short, test long: state tracking and extrapolation"),
    ):
        p = bench.add_parser(name, help=help_text)
        p.add_argument("--preset", default="quick", help="quick | standard | paper")
        p.add_argument("--mixers", type=_csv(str), default=None, help="mixer names (default: the preset's)")
        if name == "state":
            p.add_argument("--tasks", type=_csv(str), default=("parity",), help="parity and/or s5")
        p.add_argument("--max-steps", type=int, default=None, help="override the preset's training steps")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--out", default=None, help="default results/<bench>-<preset>-<UTC time>")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=cmd_bench_tasks)

    p = bench.add_parser(
        "kv", help="KV-cache compression on SmolLM2-135M: passkey, perplexity, bytes, bounded decoding"
    )
    p.add_argument("--contexts", type=_csv(int), default=None, help="default 1024,...,8192")
    p.add_argument("--depths", type=_csv(float), default=None, help="needle depths (default 0.1,...,0.9)")
    p.add_argument("--ratios", type=_csv(float), default=None, help="fractions removed (0.25,0.5,0.75,0.875)")
    p.add_argument("--policies", type=_csv(str), default=None, help="default: all policies")
    p.add_argument("--quants", type=_csv(str), default=None, help="int8,int4 (default) or none")
    p.add_argument("--samples", type=int, default=None, help="passkey prompts per (context, depth)")
    p.add_argument("--ppl-segments", type=int, default=None, help="Shakespeare segments for perplexity")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens decoded in the bounded-memory run")
    p.add_argument("--decode-budget", type=int, default=None, help="token budget of that run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default results/kv-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="1K and 2K contexts, 3 depths, short decode")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_kv)

    p = bench.add_parser(
        "attention",
        help="exact, decode, sliding-window and block-sparse attention (with mask estimators) vs SDPA",
    )
    p.add_argument(
        "--seq-len", type=int, default=None, help="T of the window and sparse rows (default 16384)"
    )
    p.add_argument(
        "--exact-lens", type=_csv(int), default=None, help="T of the exact rows (default 4096,8192)"
    )
    p.add_argument(
        "--memory-lens", type=_csv(int), default=None, help="T of the memory rows (default 4096,32768)"
    )
    p.add_argument(
        "--decode-len", type=int, default=None, help="cache tokens of the decode row (default 65536)"
    )
    p.add_argument("--window", type=int, default=None, help="sliding window (default 512)")
    p.add_argument("--block-size", type=int, default=None, help="block size of the sparse rows (default 128)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-backward", action="store_true", help="forward timings only")
    p.add_argument("--out", default=None, help="output directory (default results/attention-<UTC time>)")
    p.add_argument("--quick", action="store_true", help="T = 4K, 16K-token decode cache, 3 repeats")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_attention)

    p = bench.add_parser(
        "all", help="the main job: recall, state tracking, LM race, speed and decoding in one report"
    )
    p.add_argument("--preset", default="quick", help="quick (~15 min on 2 cores) | standard (~2 h) | paper")
    p.add_argument("--parts", type=_csv(str), default=None, help="subset of recall,state,lm,speed,decode")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="output directory (default results/all-<preset>-<UTC time>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench_all)

    p = bench.add_parser("lm-report", help="compare subquad train runs at equal steps and equal wall time")
    p.add_argument("runs", nargs="+", help="run directories written by subquad train")
    p.add_argument("--out", default=None, help="write lm_report.md and lm_report.png here")
    p.set_defaults(func=cmd_bench_lm_report)

    from subquad.data import CORPORA

    p = sub.add_parser(
        "train", help="train a hybrid LM on a built-in corpus (resumable, safetensors checkpoints)"
    )
    p.add_argument("--out", dest="out_dir", required=True, help="run directory (model, tokenizer, metrics)")
    p.add_argument("--corpus", choices=CORPORA, default=None, help="default shakespeare")
    p.add_argument(
        "--pattern",
        dest="layer_pattern",
        default=None,
        help="layer pattern letters, e.g. GGGA (A attention, S sliding window, G GLA, N Gated DeltaNet,"
        " D DeltaNet, L linear attention, R RetNet, M Mamba-2, K RWKV-7, X MoM); default G",
    )
    p.add_argument("--hidden-size", type=int, default=None, help="default 256")
    p.add_argument("--layers", dest="num_layers", type=int, default=None, help="default 4")
    p.add_argument("--heads", dest="num_heads", type=int, default=None, help="default 4")
    p.add_argument("--window", type=int, default=None, help="sliding-window size of S layers (default 128)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 4096)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per step (default 16)")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default 50")
    p.add_argument("--max-steps", type=int, default=None, help="schedule length (default 2000)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--eval-every", type=int, default=None, help="steps between held-out evaluations (100)")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens per evaluation (65536)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (100)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--max-docs", type=int, default=None, help="use only the first N training documents")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="stream text from a trained model directory")
    p.add_argument("--model", required=True, help="directory written by subquad train")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)
    return parser


def _rerun_with_kept_buffers(argv: list[str] | None) -> None:
    """Run a ``bench`` command typed in a shell again, in a fresh process whose glibc malloc keeps
    freed buffers for reuse (``bench.machine.BENCH_TUNABLES``; malloc reads its settings at process
    start, so they cannot be changed from here). Without it, timings of long inputs include
    first-touch page faults on buffers over 32 MB at every call, which grew per-token times with T.
    ``SUBQUAD_BENCH_ALLOCATOR=system`` keeps the allocator as it is; calls from Python (``argv``
    given, as in tests) run as they are."""
    import platform

    from subquad.bench.machine import ALLOCATOR_ENV, BENCH_TUNABLES

    if argv is not None or sys.argv[1:2] != ["bench"] or ALLOCATOR_ENV in os.environ:
        return
    if os.name != "posix" or platform.libc_ver()[0] != "glibc":
        return
    tunables = os.environ.get("GLIBC_TUNABLES") or ""
    if BENCH_TUNABLES not in tunables:  # already set by hand: not written twice (the report quotes it)
        tunables = ":".join(x for x in (tunables, BENCH_TUNABLES) if x)
    env = {**os.environ, ALLOCATOR_ENV: "keep", "GLIBC_TUNABLES": tunables}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "subquad", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    _rerun_with_kept_buffers(argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
