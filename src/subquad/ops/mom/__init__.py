"""mom: Mixture-of-Memories over any (q, k, v, gates...) op of the registry.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences, R routed memories,
M memories in the state (R, plus 1 with a shared memory).
"""

from __future__ import annotations

import torch

from subquad.ops._common import validation as val
from subquad.ops._common.chunking import state_dtype
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import seq_bounds
from subquad.ops.delta_rule import delta_rule, gated_delta_rule
from subquad.ops.gla import gla
from subquad.ops.linear_attn import linear_attn
from subquad.ops.mom.routing import gather_rows, route, router_weights
from subquad.ops.simple_gla import simple_gla

MODES = ("reference", "chunk", "recurrent")

# base op -> (function, its per-token inputs after q, k, v in positional order, with trailing dims
# after [B, T, M, H]: "K" for a vector gate, "" for one value per head)
BASE_OPS = {
    "linear_attn": (linear_attn, ()),
    "simple_gla": (simple_gla, (("g", ""),)),
    "gla": (gla, (("g", "K"),)),
    "delta_rule": (delta_rule, (("beta", ""),)),
    "gated_delta_rule": (gated_delta_rule, (("g", ""), ("beta", ""))),
}


@autocast_exempt
def mom(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    op: str = "gated_delta_rule",
    g: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    top_k: int = 2,
    shared_memory: bool = False,
    mode: str = "chunk",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture-of-Memories (Du et al. 2025, https://arxiv.org/abs/2502.13685).

    A router picks, for each token, its ``top_k`` of R memories (softmax over ``router_logits``,
    top-k, renormalized to sum to 1); only those memories read and write that token, each with the
    base ``op``'s recurrence, and ``o_t = sum_m w_{t,m} o^m_t`` (the read of the mixed memory
    ``sum_m w_{t,m} S^m_t``). With ``shared_memory`` one more memory sees every token with weight 1.

    Args:
        q: ``[B, T, H, K]`` queries, shared by the memories.
        k, v: ``[B, T, M, H, K]``, ``[B, T, M, H, V]`` each memory's own keys and values (MoM gives
            each memory its own key/value projections; the shared memory is index ``M - 1``).
        router_logits: ``[B, T, R]`` router scores (R = M, or M - 1 with a shared memory).
        op: the base op of every memory: ``"gated_delta_rule"`` (the paper's best), ``"delta_rule"``,
            ``"gla"``, ``"simple_gla"`` or ``"linear_attn"``.
        g: the base op's log-decay per memory: ``[B, T, M, H]`` (``gla``: ``[B, T, M, H, K]``).
        beta: ``[B, T, M, H]`` the delta rules' write strength per memory.
        top_k: memories per token, ``1 <= top_k <= R``.
        shared_memory: add a memory that every token reads and writes with weight 1.
        mode: ``"reference"`` (per-token loop over the base op's reference), ``"chunk"`` or
            ``"recurrent"`` (gather each memory's tokens, run the base op in that mode once).
        scale, cu_seqlens: as every op. chunk_size: passed to the base op (None: its default).
        initial_state: ``[N, M, H, K, V]``. output_final_state: also return the ``[N, M, H, K, V]`` state.

    Returns:
        ``(o [B, T, H, V], final_state [N, M, H, K, V] or None)``.
    """
    # 1. validation, all of it before routing (a bad value must not hide in an unrouted token)
    if op not in BASE_OPS:
        raise ValueError(f"op must be one of {sorted(BASE_OPS)}, got {op!r}")
    fn, extra_specs = BASE_OPS[op]
    val.check_mode(mode, MODES)
    if chunk_size is not None:
        val.check_chunk_size(chunk_size)
    val.check_tensor("q", q, 4, "[B, T, H, K]")
    val.check_tensor("k", k, 5, "[B, T, M, H, K]")
    val.check_tensor("v", v, 5, "[B, T, M, H, V]")
    val.check_tensor("router_logits", router_logits, 3, "[B, T, R]")
    val.check_same_dtype_device({"q": q, "k": k, "v": v, "router_logits": router_logits})
    B, T, H, K = q.shape
    if T == 0:
        raise ValueError("q must have at least one time step (T >= 1), got T = 0")
    if isinstance(shared_memory, bool) is False:
        raise TypeError(f"shared_memory must be a bool, got {type(shared_memory).__name__}")
    R = router_logits.shape[2]
    M = R + int(shared_memory)
    if router_logits.shape[:2] != (B, T):
        raise ValueError(
            f"router_logits must have shape [B, T, R] = [{B}, {T}, R], got {list(router_logits.shape)}"
        )
    val.check_shape(
        "k",
        k,
        (B, T, M, H, K),
        f"[B, T, M, H, K] with M = {M} (router_logits has R = {R}"
        f"{' plus the shared memory' if shared_memory else ''}) and q's K",
    )
    if v.shape[:4] != (B, T, M, H) or v.shape[4] == 0:
        raise ValueError(f"v must have shape [B, T, M, H, V] = [{B}, {T}, {M}, {H}, V], got {list(v.shape)}")
    V = v.shape[4]
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= R:
        raise ValueError(f"top_k must lie in [1, R = {R}] (R from router_logits [B, T, R]), got {top_k}")
    scale = val.resolve_scale(scale, K)
    given = {"g": g, "beta": beta}
    extras = []
    for name, trailing in extra_specs:
        x = given.pop(name)
        tail = (K,) if trailing else ()
        legend = "[B, T, M, H" + (", K]" if trailing else "]")
        if x is None:
            raise ValueError(f"op {op!r} needs {name} {legend}")
        val.check_tensor(name, x, 4 + len(tail), legend)
        val.check_same_dtype_device({"q": q, name: x})
        val.check_shape(name, x, (B, T, M, H, *tail), legend)
        extras.append(x)
    for name, x in given.items():
        if x is not None:
            raise ValueError(f"op {op!r} takes no {name}; pass it only to ops that use it")
    if g is not None:
        val.check_log_gate("g", g)
    if beta is not None and beta.numel():
        low, high = float(beta.detach().min()), float(beta.detach().max())
        if low < 0 or high > 2:
            raise ValueError(f"beta must lie in [0, 2], got values in [{low:.4g}, {high:.4g}]")
    N = val.check_cu_seqlens(cu_seqlens, B, T, q.device)
    val.check_initial_state(initial_state, (N, M, H, K, V), "[N, M, H, K, V]", q.device)

    names = ["k", "v", *(n for n, _ in extra_specs)]
    memory_inputs = dict(zip(names, [k, v, *extras], strict=True))
    base_kw = {} if chunk_size is None or mode != "chunk" else {"chunk_size": chunk_size}
    if mode == "reference":
        return _reference(fn, q, memory_inputs, router_logits, top_k, shared_memory, scale,
                          initial_state, output_final_state, cu_seqlens)  # fmt: skip
    return _gathered(fn, q, memory_inputs, router_logits, top_k, shared_memory, mode, scale,
                     initial_state, output_final_state, cu_seqlens, base_kw)  # fmt: skip


def _gathered(fn, q, memory_inputs, router_logits, top_k, shared, mode, scale, initial_state,
              output_final_state, cu_seqlens, base_kw):  # fmt: skip
    """Chunk / recurrent: one base-op call on the ``[N * M, L, ...]`` batch of routed tokens."""
    B, T = q.shape[:2]
    M = memory_inputs["k"].shape[2]
    P = B * T
    device = q.device
    # 1. sequences of the flattened tokens: rows of the batch, or the packed pieces
    if cu_seqlens is None:
        seq_starts = torch.arange(0, P, T, device=device)
        seq_id = torch.arange(P, device=device) // T
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        seq_starts = cu[:-1]
        seq_id = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=device), cu.diff())
    acc = state_dtype(q.dtype)
    plan = route(router_logits.reshape(P, -1), top_k, shared, seq_starts, seq_id, acc)
    # 2. gather: q by token, the per-memory inputs by (token, memory) pair
    padded_q = gather_rows(q.reshape(P, *q.shape[2:]), plan.token, plan.rows, plan.L, plan.slot)
    padded = [
        gather_rows(x.reshape(P * M, *x.shape[3:]), plan.pair, plan.rows, plan.L, plan.slot)
        for x in memory_inputs.values()
    ]  # each [N * M, L, H, ...]
    N = seq_starts.numel()
    state = None if initial_state is None else initial_state.reshape(N * M, *initial_state.shape[2:])
    # 3. every memory of every sequence in one call of the base op
    o_pad, final = fn(padded_q, *padded, mode=mode, scale=scale, initial_state=state,
                      output_final_state=output_final_state, **base_kw)  # fmt: skip
    # 4. scatter back, weighted by the router (accumulated in float32 / float64)
    o_sel = o_pad.reshape(plan.rows * plan.L, *o_pad.shape[2:]).index_select(0, plan.slot)
    contrib = o_sel.to(acc) * plan.weight[:, None, None]
    o = torch.zeros((P, *o_pad.shape[2:]), dtype=acc, device=device).index_add(0, plan.token, contrib)
    o = o.reshape(B, T, *o.shape[1:]).to(q.dtype)
    if final is not None:
        final = final.reshape(N, M, *final.shape[1:])
    return o, final


def _reference(fn, q, memory_inputs, router_logits, top_k, shared, scale, initial_state,
               output_final_state, cu_seqlens):  # fmt: skip
    """The spec: memory m of a sequence runs the base op's reference over exactly the tokens
    routed to it, in order; each token's output mixes the reads of its memories."""
    B, T, H, K = q.shape
    M = memory_inputs["k"].shape[2]
    V = memory_inputs["v"].shape[-1]
    R = router_logits.shape[-1]
    cd = state_dtype(q.dtype)
    if cu_seqlens is None:
        seqs = [(b, 0, T) for b in range(B)]
    else:
        seqs = [(0, s, e) for s, e in seq_bounds(cu_seqlens)]
    outs, finals = [], []
    for n, (b, start, end) in enumerate(seqs):
        # 1. each token's memories and weights, as plain lists per memory
        w, idx = router_weights(router_logits[b, start:end].to(cd), top_k)
        tokens = [[] for _ in range(M)]
        weights = [[] for _ in range(M)]
        for t in range(end - start):
            for i, m in enumerate(idx[t].tolist()):
                tokens[m].append(t)
                weights[m].append(w[t, i])
        if shared:
            tokens[R] = list(range(end - start))
            weights[R] = [torch.ones((), dtype=cd, device=q.device)] * (end - start)
        # 2. every memory over its own tokens; the reads go back to those tokens, weighted
        o_seq = torch.zeros(end - start, H, V, dtype=cd, device=q.device)
        states = []
        for m in range(M):
            S0 = None if initial_state is None else initial_state[n, m][None]
            if not tokens[m]:
                states.append(torch.zeros(H, K, V, dtype=cd, device=q.device) if S0 is None else S0[0].to(cd))
                continue
            ts = torch.tensor(tokens[m], device=q.device)
            own = [x[b, start:end, m][ts][None] for x in memory_inputs.values()]
            o_m, S_m = fn(q[b, start:end][ts][None], *own, mode="reference", scale=scale,
                          initial_state=S0, output_final_state=True)  # fmt: skip
            o_seq = o_seq.index_add(0, ts, o_m[0].to(cd) * torch.stack(weights[m])[:, None, None])
            states.append(S_m[0])
        outs.append(o_seq)
        finals.append(torch.stack(states, 0))
    o = torch.cat(outs, 0).reshape(B, T, H, V).to(q.dtype)
    return o, (torch.stack(finals, 0) if output_final_state else None)
