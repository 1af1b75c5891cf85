"""The op registry: one ``OpSpec`` per op, the single place tests, the CLI and benchmarks read.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences, C chunk.

An ``OpSpec`` says which tensors an op takes and how to build valid random ones, the variants
worth testing (normalized, constant decay, ...), its modes, its state shape and its paper. Adding
an op is one folder under ``subquad/ops/`` and one ``register(OpSpec(...))`` below; the generated
test matrix, ``subquad list`` and ``subquad bench speed`` then cover it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F

from subquad import ops
from subquad.ops.delta_rule import CHUNK_SIZE_FORWARD

# Gate regimes the input builders know: typical values, log-gates near 0 (almost no decay)
# and very negative log-gates (strong decay, the overflow trap of chunked forms).
GATE_REGIMES = ("normal", "near_zero", "strong")


@dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One tensor input: its dims (letters of the legend) and what kind of values it holds.

    ``kind``: ``"qk"`` (queries/keys), ``"v"`` (values), ``"log_gate"`` (natural-log decay <= 0),
    ``"log_gate_const"`` (a per-head constant log-decay), ``"unit"`` (L2-normalized over the last
    dim), ``"beta"`` (in (0, 1)), ``"beta2"`` (in (0, 2), negative eigenvalues), ``"positive"``
    (softplus of a normal). Dims are letters of the legend; an op without heads may map its own
    dims onto them (e.g. a selective scan's ``D_inner`` onto ``V`` and ``N`` onto ``K``) and say so.
    ``make(shape, generator, gates) -> float64 tensor`` overrides ``kind`` for unusual inputs.
    """

    dims: tuple[str, ...]
    kind: str
    make: Callable[[tuple[int, ...], torch.Generator, str], torch.Tensor] | None = None

    @property
    def legend(self) -> str:
        return "[" + ", ".join(self.dims) + "]"


@dataclass(frozen=True, kw_only=True)
class Variant:
    """A way of calling an op worth testing and benchmarking on its own.

    Attributes:
        name: short id, e.g. ``"default"``, ``"normalize"``, ``"g_gamma"``.
        positional: tensor inputs passed positionally, in order.
        keyword: tensor inputs passed by keyword.
        kwargs: fixed non-tensor keyword arguments.
        modes: modes this variant supports (None: all of the op's).
        positive_qk: build non-negative q and k (needed by a normalizer).
        state_v_extra: extra columns in the state's last dim (the normalizer's z).
        streaming: whether splitting T and carrying the state equals one call (False when
            non-causal).
        fixed_dims: sizes of op-specific dim letters for this variant, over the op's ``fixed_dims``
            (e.g. one more memory when a shared memory is on).
    """

    name: str
    positional: tuple[str, ...]
    keyword: tuple[str, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    modes: tuple[str, ...] | None = None
    positive_qk: bool = False
    state_v_extra: int = 0
    streaming: bool = True
    fixed_dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return self.positional + self.keyword


@dataclass(frozen=True, kw_only=True)
class OpSpec:
    """Everything generic code needs to know about one op.

    Attributes:
        name: the op's name, also its function name in ``subquad.ops``.
        fn: the public function ``fn(*positional, mode=..., **keyword) -> (o, final_state)``.
        tensors: every tensor input the op may take, by name.
        variants: the ways of calling it that tests and benchmarks cover.
        modes: the modes it implements; ``"reference"`` is always the spec.
        gate: ``"none"``, ``"scalar"`` (per head and token), ``"constant"`` (per head) or
            ``"vector"`` (per key dim).
        state: the state's dims, e.g. ``("N", "H", "K", "V")``; ``()`` for an op without a
            recurrent state (softmax attention: its memory is a KV cache that grows with T).
        paper: title and year; url: a link to it.
        summary: the recurrence in one line.
        flops_per_token: ``f(mode, K, V, chunk_size) -> int``, matmul-equivalent FLOPs one token of
            one head costs in that mode (used for GFLOP/s in the speed benchmark).
        prepare: optional ``prepare(inputs, generator) -> inputs`` run on the float64 inputs after
            they are built, for joint constraints between inputs (e.g. RWKV-7's ``a`` and ``b``).
        flops: optional ``f(mode, dims) -> int`` total FLOPs of one call, overriding
            ``flops_per_token`` (dims: B, T, H, K, V, C and the variant's kwargs), for ops whose cost
            is not per head and per token.
        fixed_dims: sizes of op-specific dim letters used in ``tensors`` or ``state`` beyond
            B, T, H, K, V, N (e.g. ``{"M": 4}`` memories), fixed for tests and benchmarks.
        forward_chunk_size: for an op whose ``chunk_size`` defaults to None (the op picks it per
            call), the size a forward without autograd picks; the speed benchmark counts that
            forward's FLOPs with it.
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    tensors: Mapping[str, TensorSpec]
    variants: tuple[Variant, ...]
    modes: tuple[str, ...]
    gate: str
    state: tuple[str, ...]
    paper: str
    url: str
    summary: str
    flops_per_token: Callable[[str, int, int, int], int]
    prepare: Callable[[dict[str, torch.Tensor], torch.Generator], dict[str, torch.Tensor]] | None = None
    flops: Callable[[str, Mapping[str, int]], int] | None = None
    fixed_dims: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    forward_chunk_size: int | None = None

    @property
    def stateful(self) -> bool:
        """Whether the op carries a recurrent state (``initial_state`` / ``final_state``)."""
        return bool(self.state)

    def total_flops(
        self,
        mode: str,
        *,
        B: int,
        T: int,
        H: int,
        K: int,
        V: int,
        chunk_size: int = 64,
        variant: Variant | None = None,
    ) -> int:
        """FLOPs of one forward call: ``flops(mode, dims)`` when the op gives it, else
        ``flops_per_token(mode, K, V, chunk_size) * B * T * H``."""
        if self.flops is not None:
            dims = {"B": B, "T": T, "H": H, "K": K, "V": V, "C": chunk_size}
            return int(self.flops(mode, {**(dict(variant.kwargs) if variant is not None else {}), **dims}))
        return int(self.flops_per_token(mode, K, V, chunk_size)) * B * T * H

    def variant(self, name: str = "default") -> Variant:
        for var in self.variants:
            if var.name == name:
                return var
        raise KeyError(f"op {self.name!r} has no variant {name!r}; it has {[v.name for v in self.variants]}")

    def modes_for(self, variant: Variant) -> tuple[str, ...]:
        return variant.modes if variant.modes is not None else self.modes

    def state_shape(self, N: int, H: int, K: int, V: int, variant: Variant | None = None) -> tuple[int, ...]:
        extra = variant.state_v_extra if variant is not None else 0
        fixed = {**self.fixed_dims, **(variant.fixed_dims if variant is not None else {})}
        sizes = {**fixed, "N": N, "H": H, "K": K, "V": V + extra}
        return tuple(sizes[d] for d in self.state)

    def state_bytes_per_sequence(self, H: int, K: int, V: int) -> int:
        """Bytes of float32 recurrent state one sequence carries (independent of T; 0 if none)."""
        if not self.stateful:
            return 0
        n = 1
        for d in self.state_shape(1, H, K, V):
            n *= d
        return 4 * n

    def make_inputs(
        self,
        variant: Variant | str = "default",
        *,
        B: int = 2,
        T: int = 64,
        H: int = 2,
        K: int = 16,
        V: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int = 0,
        gates: str = "normal",
    ) -> dict[str, torch.Tensor]:
        """Valid random inputs for ``variant``: ``{name: tensor}`` for every tensor it takes."""
        if isinstance(variant, str):
            variant = self.variant(variant)
        if gates not in GATE_REGIMES:
            raise ValueError(f"gates must be one of {GATE_REGIMES}, got {gates!r}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sizes = {**self.fixed_dims, **variant.fixed_dims, "B": B, "T": T, "H": H, "K": K, "V": V}
        out = {}
        for name in variant.tensor_names:
            spec = self.tensors[name]
            shape = tuple(sizes[d] for d in spec.dims)
            if spec.make is not None:
                out[name] = spec.make(shape, gen, gates)
            else:
                out[name] = _random_tensor(spec.kind, shape, gen, gates, variant.positive_qk)
        if self.prepare is not None:
            out = self.prepare(out, gen)
        return {name: t.to(device=device, dtype=dtype) for name, t in out.items()}

    def call(
        self, inputs: Mapping[str, torch.Tensor], variant: Variant | str = "default", **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Call the op with ``inputs`` arranged as ``variant`` says, plus ``kwargs`` (mode, ...)."""
        if isinstance(variant, str):
            variant = self.variant(variant)
        args = [inputs[n] for n in variant.positional]
        kw = {n: inputs[n] for n in variant.keyword}
        return self.fn(*args, **kw, **dict(variant.kwargs), **kwargs)


def _random_tensor(kind: str, shape: tuple[int, ...], gen: torch.Generator, gates: str, positive: bool):
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "qk":
        # unit-variance entries; non-negative (a feature map's output) when normalizing
        return x.abs() + 0.1 if positive else x
    if kind == "v":
        return x
    if kind == "unit":
        return F.normalize(x, dim=-1)
    if kind == "beta":
        return torch.sigmoid(x)
    if kind == "beta2":
        return 2.0 * torch.sigmoid(x)
    if kind == "positive":
        return F.softplus(x)
    if kind in ("log_gate", "log_gate_const"):
        u = torch.rand(shape, generator=gen, dtype=torch.float64)
        if gates == "near_zero":
            return -1e-4 * u
        if gates == "strong":
            return -(5.0 + 15.0 * u)
        if kind == "log_gate_const":
            return -(0.01 + 0.99 * u)
        return F.logsigmoid(x + 2.0)
    raise ValueError(f"unknown tensor kind {kind!r}")


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is already registered")
    if "reference" not in spec.modes:
        raise ValueError(f"op {spec.name!r} must have a 'reference' mode (the spec)")
    REGISTRY[spec.name] = spec
    return spec


def get_op(name: str) -> OpSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; registered: {sorted(REGISTRY)}") from None


def list_ops() -> list[OpSpec]:
    return [REGISTRY[n] for n in sorted(REGISTRY)]


def _chunked_linear_flops(mode: str, K: int, V: int, C: int) -> int:
    """Per token and head: chunk form does q k^T (2CK), scores v (2CV), q S (2KV), k^T v (2KV);
    the step form does the outer product and the read (4KV)."""
    if mode == "chunk":
        return 2 * C * K + 2 * C * V + 4 * K * V
    return 4 * K * V


QKV = {
    "q": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
    "k": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
    "v": TensorSpec(dims=("B", "T", "H", "V"), kind="v"),
}
MODES = ("reference", "chunk", "recurrent")
STATE = ("N", "H", "K", "V")

register(
    OpSpec(
        name="linear_attn",
        fn=ops.linear_attn,
        tensors=QKV,
        variants=(
            Variant(name="default", positional=("q", "k", "v")),
            Variant(
                name="normalize",
                positional=("q", "k", "v"),
                kwargs=MappingProxyType({"normalize": True}),
                positive_qk=True,
                state_v_extra=1,
            ),
            Variant(
                name="noncausal",
                positional=("q", "k", "v"),
                kwargs=MappingProxyType({"causal": False}),
                modes=("reference", "chunk"),
                streaming=False,
            ),
        ),
        modes=MODES,
        gate="none",
        state=STATE,
        paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (2020)",
        url="https://arxiv.org/abs/2006.16236",
        summary="S_t = S_{t-1} + k_t v_t^T; o_t = scale * S_t^T q_t",
        flops_per_token=_chunked_linear_flops,
    )
)

register(
    OpSpec(
        name="simple_gla",
        fn=ops.simple_gla,
        tensors={
            **QKV,
            "g": TensorSpec(dims=("B", "T", "H"), kind="log_gate"),
            "g_gamma": TensorSpec(dims=("H",), kind="log_gate_const"),
        },
        variants=(
            Variant(name="default", positional=("q", "k", "v", "g")),
            Variant(name="g_gamma", positional=("q", "k", "v"), keyword=("g_gamma",)),
        ),
        modes=MODES,
        gate="scalar",
        state=STATE,
        paper="RetNet (2023) / Lightning Attention-2 (2024) / Mamba-2 SSD (2024)",
        url="https://arxiv.org/abs/2401.04658",
        summary="S_t = exp(g_t) S_{t-1} + k_t v_t^T, g_t scalar per head; o_t = scale * S_t^T q_t",
        flops_per_token=_chunked_linear_flops,
    )
)

register(
    OpSpec(
        name="gla",
        fn=ops.gla,
        tensors={**QKV, "g": TensorSpec(dims=("B", "T", "H", "K"), kind="log_gate")},
        variants=(Variant(name="default", positional=("q", "k", "v", "g")),),
        modes=MODES,
        gate="vector",
        state=STATE,
        paper="Gated Linear Attention Transformers with Hardware-Efficient Training (2023)",
        url="https://arxiv.org/abs/2312.06635",
        summary="S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, g_t in R^K; o_t = scale * S_t^T q_t",
        flops_per_token=_chunked_linear_flops,
    )
)


def _delta_flops(mode: str, K: int, V: int, C: int) -> int:
    """Per token and head. Chunk: q k^T and k k^T (4CK), the triangular solve for [U | W]
    (C(K + V)), W S, k^T Delta and q S (6KV), scores @ Delta (2CV). Step form: read, write, output (6KV)."""
    if mode == "chunk":
        return 4 * C * K + C * (K + V) + 2 * C * V + 6 * K * V
    return 6 * K * V


DELTA_TENSORS = {
    "q": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
    "k": TensorSpec(dims=("B", "T", "H", "K"), kind="unit"),
    "k_raw": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
    "v": TensorSpec(dims=("B", "T", "H", "V"), kind="v"),
    "g": TensorSpec(dims=("B", "T", "H"), kind="log_gate"),
    "beta": TensorSpec(dims=("B", "T", "H"), kind="beta"),
    "beta2": TensorSpec(dims=("B", "T", "H"), kind="beta2"),
}

register(
    OpSpec(
        name="delta_rule",
        fn=ops.delta_rule,
        tensors=DELTA_TENSORS,
        variants=(
            Variant(name="default", positional=("q", "k", "v", "beta")),
            Variant(name="beta2", positional=("q", "k", "v", "beta2")),
            Variant(
                name="l2norm",
                positional=("q", "k_raw", "v", "beta"),
                kwargs=MappingProxyType({"use_qk_l2norm_in_kernel": True}),
            ),
        ),
        modes=MODES,
        gate="none",
        state=STATE,
        paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length (2024)",
        url="https://arxiv.org/abs/2406.06484",
        summary="S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; o_t = scale * S_t^T q_t",
        flops_per_token=_delta_flops,
        forward_chunk_size=CHUNK_SIZE_FORWARD,
    )
)

register(
    OpSpec(
        name="gated_delta_rule",
        fn=ops.gated_delta_rule,
        tensors=DELTA_TENSORS,
        variants=(
            Variant(name="default", positional=("q", "k", "v", "g", "beta")),
            Variant(name="beta2", positional=("q", "k", "v", "g", "beta2")),
        ),
        modes=MODES,
        gate="scalar",
        state=STATE,
        paper="Gated Delta Networks: Improving Mamba2 with Delta Rule (2024)",
        url="https://arxiv.org/abs/2412.06464",
        summary="S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; o_t = scale * S_t^T q_t",
        flops_per_token=_delta_flops,
        forward_chunk_size=CHUNK_SIZE_FORWARD,
    )
)


def _router_logits(shape: tuple[int, ...], gen: torch.Generator, gates: str) -> torch.Tensor:
    """Router scores with the memories' order clear by a margin of ~0.7 per token, so top-k picks
    the same memories after rounding to bfloat16 (a near tie would flip the choice between dtypes)."""
    order = torch.rand(shape, generator=gen, dtype=torch.float64).argsort(-1).to(torch.float64)
    return order + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1.0


register(
    OpSpec(
        name="mom",
        fn=ops.mom,
        tensors={
            "q": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
            "k": TensorSpec(dims=("B", "T", "M", "H", "K"), kind="unit"),
            "v": TensorSpec(dims=("B", "T", "M", "H", "V"), kind="v"),
            "router_logits": TensorSpec(dims=("B", "T", "R"), kind="v", make=_router_logits),
            "g": TensorSpec(dims=("B", "T", "M", "H"), kind="log_gate"),
            "beta": TensorSpec(dims=("B", "T", "M", "H"), kind="beta"),
        },
        variants=(
            Variant(
                name="default",
                positional=("q", "k", "v", "router_logits"),
                keyword=("g", "beta"),
                kwargs=MappingProxyType({"op": "gated_delta_rule", "top_k": 2}),
            ),
            Variant(
                name="shared_delta",
                positional=("q", "k", "v", "router_logits"),
                keyword=("beta",),
                kwargs=MappingProxyType({"op": "delta_rule", "top_k": 2, "shared_memory": True}),
                fixed_dims=MappingProxyType({"M": 4, "R": 3}),
            ),
        ),
        modes=MODES,
        gate="scalar",
        state=("N", "M", "H", "K", "V"),
        fixed_dims=MappingProxyType({"M": 3, "R": 3}),
        paper="MoM: Linear Sequence Modeling with Mixture-of-Memories (2025)",
        url="https://arxiv.org/abs/2502.13685",
        summary="top-k of M memories per token, each a base-op state (default gated delta rule); "
        "o_t = sum_m w_tm o^m_t",
        # the default variant: each token takes top_k = 2 gated-delta-rule steps
        flops_per_token=lambda mode, K, V, C: 2 * _delta_flops(mode, K, V, C),
        forward_chunk_size=CHUNK_SIZE_FORWARD,  # the base op's
    )
)


def _scan_A(shape: tuple[int, ...], gen: torch.Generator, gates: str) -> torch.Tensor:
    """S6's diagonal A <= 0. With dt ~ softplus(normal) (0.1..3), ``dt * A`` is a typical
    log-decay for "normal", ~ -1e-4 for "near_zero" and -1..-60 per step for "strong"."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if gates == "near_zero":
        return -1e-4 * u
    if gates == "strong":
        return -(5.0 + 15.0 * u)
    return -torch.exp(torch.randn(shape, generator=gen, dtype=torch.float64) * 0.5)


def _scan_flops(mode: str, dims: Mapping[str, int]) -> int:
    """Total FLOPs of one call, Mamba's S6 at D = V channels and N = K states (no heads): per token
    and state entry, the decay (mul + exp), the input (2 mul), the update (mul + add) and the read
    (mul + add) in every mode; the chunked form adds the cumulative product and the carry (3)."""
    per_entry = 8 if mode == "recurrent" else 11
    return dims["B"] * dims["T"] * dims["V"] * dims["K"] * per_entry


SCAN_POSITIONAL = ("x", "dt", "A", "B", "C")

register(
    OpSpec(
        name="selective_scan",
        fn=ops.selective_scan,
        tensors={
            "x": TensorSpec(dims=("B", "T", "V"), kind="v"),
            "dt": TensorSpec(dims=("B", "T", "V"), kind="positive"),
            "dt_raw": TensorSpec(dims=("B", "T", "V"), kind="v"),
            "A": TensorSpec(dims=("V", "K"), kind="log_gate", make=_scan_A),
            "B": TensorSpec(dims=("B", "T", "K"), kind="qk"),
            "C": TensorSpec(dims=("B", "T", "K"), kind="qk"),
            "D": TensorSpec(dims=("V",), kind="v"),
            "dt_bias": TensorSpec(dims=("V",), kind="v"),
        },
        variants=(
            Variant(name="default", positional=SCAN_POSITIONAL, keyword=("D",)),
            Variant(name="no_skip", positional=SCAN_POSITIONAL),
            Variant(
                name="softplus",
                positional=("x", "dt_raw", "A", "B", "C"),
                keyword=("D", "dt_bias"),
                kwargs=MappingProxyType({"dt_softplus": True}),
            ),
        ),
        modes=MODES,
        gate="vector",
        state=("N", "V", "K"),
        paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces (2023)",
        url="https://arxiv.org/abs/2312.00752",
        summary="h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t^T per channel (D = V, N = K); "
        "y_t = h_t C_t + D x_t",
        flops_per_token=lambda mode, K, V, C: 8 * K * V,
        flops=_scan_flops,
    )
)


def _ttt_flops(mode: str, K: int, V: int, C: int) -> int:
    """Per token and head, C the mini-batch. Dual form: tril(Q K^T) (2CK), A K and A V
    (2C(K + V)), I - K^T E K and K^T E V (2K(K + V)), the state pass (2K^2 V / C) and Q W (2KV).
    Step form: the error at W0, the update and the read (6KV)."""
    if mode == "chunk":
        return 2 * C * K + 2 * C * (K + V) + 2 * K * (K + V) + 2 * K * K * V // C + 2 * K * V
    return 6 * K * V


TTT_TENSORS = {
    "q": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
    "k": TensorSpec(dims=("B", "T", "H", "K"), kind="unit"),
    "v": TensorSpec(dims=("B", "T", "H", "V"), kind="v"),
    "eta": TensorSpec(dims=("B", "T", "H"), kind="beta"),
}

register(
    OpSpec(
        name="ttt_linear",
        fn=ops.ttt_linear,
        tensors=TTT_TENSORS,
        variants=(
            # mini-batches restart at every call, so splitting T elsewhere than on a mini-batch
            # boundary is a different computation: no streaming test for b > 1
            Variant(name="default", positional=("q", "k", "v", "eta"), streaming=False),
            Variant(
                name="mb1",
                positional=("q", "k", "v", "eta"),
                kwargs=MappingProxyType({"mini_batch_size": 1}),
            ),
        ),
        modes=MODES,
        gate="none",
        state=STATE,
        paper="Learning to (Learn at Test Time): RNNs with Expressive Hidden States (2024)",
        url="https://arxiv.org/abs/2407.04620",
        summary="W_t = W_{t-1} - eta_t k_t (W0^T k_t - v_t)^T, W0 = weights at the mini-batch start; "
        "o_t = scale * W_t^T q_t",
        flops_per_token=lambda mode, K, V, C: _ttt_flops(mode, K, V, 16),
    )
)


def _titans_theta(shape: tuple[int, ...], gen: torch.Generator, gates: str) -> torch.Tensor:
    """Surprise learning rates in (0, 0.1): with momentum ~0.9 (a gain of ~10) and 16 unit keys per
    mini-batch, rates near 1 make the memory's gradient descent diverge (inf after ~2K tokens in
    every mode, the reference included), which tests nothing."""
    return 0.1 * torch.sigmoid(torch.randn(shape, generator=gen, dtype=torch.float64))


def _titans_flops(mode: str, K: int, V: int, C: int) -> int:
    """Per token and head, C the mini-batch. Chunked: Q K^T and the decay product L_F L_E (2CK +
    2C^2), A K and A V (2C(K + V)), the four K^T D [K | V] products (4K(K + V)), the [2K, 2K] state
    pass (8K^2 V / C) and the read of [M; S] (4KV). Step form: error, surprise, memory, read (6KV)."""
    if mode == "chunk":
        return 2 * C * K + 2 * C * C + 2 * C * (K + V) + 4 * K * (K + V) + 8 * K * K * V // C + 4 * K * V
    return 6 * K * V


register(
    OpSpec(
        name="titans",
        fn=ops.titans,
        tensors={
            **{n: TTT_TENSORS[n] for n in ("q", "k", "v")},
            "theta": TensorSpec(dims=("B", "T", "H"), kind="beta", make=_titans_theta),
            "g": TensorSpec(dims=("B", "T", "H"), kind="log_gate"),
            "g_momentum": TensorSpec(dims=("B", "T", "H"), kind="log_gate"),
        },
        variants=(
            # as ttt_linear: mini-batches restart at every call, so no streaming test for b > 1
            Variant(name="default", positional=("q", "k", "v", "theta", "g", "g_momentum"), streaming=False),
            Variant(
                name="mb1",
                positional=("q", "k", "v", "theta", "g", "g_momentum"),
                kwargs=MappingProxyType({"mini_batch_size": 1}),
            ),
        ),
        modes=MODES,
        gate="scalar",
        state=("N", "P", "H", "K", "V"),
        fixed_dims=MappingProxyType({"P": 2}),
        paper="Titans: Learning to Memorize at Test Time (2024)",
        url="https://arxiv.org/abs/2501.00663",
        summary="S_t = e^{gm_t} S_{t-1} - theta_t k_t (M0^T k_t - v_t)^T; M_t = e^{g_t} M_{t-1} + S_t; "
        "o_t = scale * M_t^T q_t",
        flops_per_token=lambda mode, K, V, C: _titans_flops(mode, K, V, 16),
    )
)


def _rwkv7_prepare(inputs: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """RWKV-7's parametrisation: ``a = -kappa``, ``b = kappa * lr`` with kappa unit-norm and the
    in-context learning rate lr in (0, 1), so ``diag(exp(w)) + b a^T`` is a contraction."""
    out = dict(inputs)
    kappa = F.normalize(inputs["a"], dim=-1)
    lr = torch.sigmoid(torch.randn(kappa.shape, generator=gen, dtype=kappa.dtype))
    out["a"] = -kappa
    out["b"] = kappa * lr
    return out


def _rwkv7_flops(mode: str, K: int, V: int, C: int) -> int:
    """Per token and head. Chunked: the four pair matrices (8CK), the triangular inverse applied
    to [a Gam' | L_ak V] (2C(K + V) + 2CV), the update factors (2K(K + 2V)), the state pass
    (2K^2 V / C) and the read (2CK + 4CV + 2KV). Step form: a^T S, the update, the read (8KV)."""
    if mode == "chunk":
        return (
            8 * C * K
            + 2 * C * (K + V)
            + 2 * C * V
            + 2 * K * (K + 2 * V)
            + 2 * K * K * V // C
            + (2 * C * K + 4 * C * V + 2 * K * V)
        )
    return 8 * K * V


register(
    OpSpec(
        name="rwkv7",
        fn=ops.rwkv7,
        tensors={
            "r": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
            "w": TensorSpec(dims=("B", "T", "H", "K"), kind="log_gate"),
            "k": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
            "v": TensorSpec(dims=("B", "T", "H", "V"), kind="v"),
            "a": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
            "b": TensorSpec(dims=("B", "T", "H", "K"), kind="qk"),
        },
        variants=(Variant(name="default", positional=("r", "w", "k", "v", "a", "b")),),
        modes=MODES,
        gate="vector",
        state=STATE,
        paper='RWKV-7 "Goose" with Expressive Dynamic State Evolution (2025)',
        url="https://arxiv.org/abs/2503.14456",
        summary="S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T; o_t = scale * S_t^T r_t",
        flops_per_token=lambda mode, K, V, C: _rwkv7_flops(mode, K, V, 16),
        prepare=_rwkv7_prepare,
    )
)


def _stateless(op_name: str):
    """The op contract's calling convention around a softmax-attention op of ``subquad.ops``, which
    returns ``o`` alone: ``(o, None)``; there is no recurrent state to pass in or out (its memory is
    the KV cache)."""

    def call(*tensors, mode="chunk", initial_state=None, output_final_state=False, **kwargs):
        if initial_state is not None:
            raise ValueError(
                f"{op_name} keeps no recurrent state: initial_state must be None (its memory is the KV cache)"
            )
        return getattr(ops, op_name)(*tensors, mode=mode, **kwargs), None

    call.__name__ = call.__qualname__ = f"{op_name}_op"
    return call


def _qkv_variant(name: str, **kwargs: Any) -> Variant:
    """A variant of a softmax-style op called ``fn(q, k, v, **kwargs)``: stateless, so a split of T
    is not one call (no state carries the earlier keys)."""
    return Variant(name=name, positional=("q", "k", "v"), kwargs=MappingProxyType(kwargs), streaming=False)


def _softmax_op(name: str, variants: tuple[Variant, ...], flops, **about: str) -> OpSpec:
    """The entry of a stateless softmax-style op ``fn(q, k, v, **kwargs) -> o``: reference and
    chunk modes, no gate, no state, FLOPs from ``flops(mode, dims)``; ``about``: paper, url, summary."""
    return OpSpec(
        name=name,
        fn=_stateless(name),
        tensors=dict(QKV),
        variants=variants,
        modes=("reference", "chunk"),
        gate="none",
        state=(),
        flops_per_token=lambda mode, K, V, C: 0,
        flops=flops,
        **about,
    )


def _attention_pairs(T: int, causal: bool, window: int | None, sinks: int) -> int:
    """Visible (query, key) pairs: the work of exact attention that skips what is masked."""
    if window is None:
        return T * (T + 1) // 2 if causal else T * T
    w = min(window, T)
    near = w * T - w * (w - 1) // 2  # sum over queries of min(i + 1, w)
    if not causal:
        near = 2 * near - T
    far = sum(max(0, min(sinks, i - w + 1)) for i in range(T)) if sinks else 0
    return near + (far if causal else 2 * far)


def _attention_flops(mode: str, dims: Mapping[str, int]) -> int:
    """2 (K + V) FLOPs per visible (query, key) pair per head: q . k and p * v."""
    pairs = _attention_pairs(dims["T"], dims.get("causal", True), dims.get("window"), dims.get("sinks", 0))
    return dims["B"] * dims["H"] * pairs * 2 * (dims["K"] + dims["V"])


register(
    _softmax_op(
        "attention",
        variants=(
            _qkv_variant("default"),
            _qkv_variant("window", window=8, sinks=2),
            _qkv_variant("window512", window=512, sinks=4),
            _qkv_variant("noncausal", causal=False),
        ),
        flops=_attention_flops,
        paper="FlashAttention (2022) / StreamingLLM attention sinks (2023)",
        url="https://arxiv.org/abs/2205.14135",
        summary="o_i = sum_j softmax_j(scale q_i . k_j) v_j over the visible keys (causal, window, sinks)",
    )
)


def _nsa_flops(mode: str, dims: Mapping[str, int]) -> int:
    """Per query head: cmp over ~t / b pooled keys, slc over n b tokens, swa over w tokens,
    2 (K + V) FLOPs per (query, key) pair (pooling and gathers not counted)."""
    T, b = dims["T"], dims.get("block_size", 64)
    n, w = dims.get("block_count", 16), dims.get("window", 512)
    pairs = (
        sum(t // b for t in range(T))
        + sum(min(t + 1, n * b) for t in range(T))
        + _attention_pairs(T, True, w, 0)
    )
    return dims["B"] * dims["H"] * pairs * 2 * (dims["K"] + dims["V"])


register(
    OpSpec(
        name="nsa",
        fn=_stateless("nsa"),
        tensors={
            **QKV,
            "g_cmp": TensorSpec(dims=("B", "T", "H"), kind="beta"),
            "g_slc": TensorSpec(dims=("B", "T", "H"), kind="beta"),
            "g_swa": TensorSpec(dims=("B", "T", "H"), kind="beta"),
        },
        variants=(
            # the paper's sizes (b = 64, 16 blocks, window 512): what the speed benchmark runs
            Variant(name="default", positional=("q", "k", "v", "g_cmp", "g_slc", "g_swa"), streaming=False),
            # small blocks, so that test lengths exercise compression, selection and the window
            Variant(
                name="small_blocks",
                positional=("q", "k", "v", "g_cmp", "g_slc", "g_swa"),
                kwargs=MappingProxyType({"block_size": 4, "block_count": 3, "window": 8}),
                streaming=False,
            ),
        ),
        modes=("reference", "chunk"),
        gate="none",
        state=(),
        paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention (2025)",
        url="https://arxiv.org/abs/2502.11089",
        summary="o = g_cmp o_cmp(pooled blocks) + g_slc o_slc(top-n blocks by cmp) + g_swa o_swa(window)",
        flops_per_token=lambda mode, K, V, C: 0,
        flops=_nsa_flops,
    )
)


def _routing_flops(mode: str, dims: Mapping[str, int]) -> int:
    """Per query head, balanced clusters: each query scores ~t / M earlier keys plus its own;
    2 (K + V) FLOPs per (query, key) pair (routing and gathers not counted)."""
    T, M = dims["T"], dims.get("M", 8)
    return dims["B"] * dims["H"] * (T * (T + 1) // (2 * M) + T) * 2 * (dims["K"] + dims["V"])


register(
    OpSpec(
        name="routing_attention",
        fn=_stateless("routing_attention"),
        tensors={**QKV, "centroids": TensorSpec(dims=("H", "M", "K"), kind="qk")},
        variants=(
            # 8 clusters: what the speed benchmark runs (about 1/8 of causal attention's pairs)
            Variant(name="default", positional=("q", "k", "v", "centroids"), streaming=False),
            # 3 clusters: larger clusters at test lengths
            Variant(
                name="few_clusters",
                positional=("q", "k", "v", "centroids"),
                fixed_dims=MappingProxyType({"M": 3}),
                streaming=False,
            ),
        ),
        modes=("reference", "chunk"),
        gate="none",
        state=(),
        fixed_dims=MappingProxyType({"M": 8}),
        paper="Efficient Content-Based Sparse Attention with Routing Transformers (2021)",
        url="https://arxiv.org/abs/2003.05997",
        summary="o_t = softmax attention over keys s <= t in q_t's k-means cluster (plus its own key)",
        flops_per_token=lambda mode, K, V, C: 0,
        flops=_routing_flops,
    )
)


def _neighborhood_flops(mode: str, dims: Mapping[str, int]) -> int:
    """Per query head, the (query, key) pairs of the 1D neighbourhoods; 2 (K + V) FLOPs each."""
    from subquad.ops.neighborhood.core import axis_neighbours

    k, d, causal = dims.get("kernel_size", 7), dims.get("dilation", 1), dims.get("causal", False)
    pairs = int(axis_neighbours(dims["T"], k, d, causal, "cpu")[1].sum())
    return dims["B"] * dims["H"] * pairs * 2 * (dims["K"] + dims["V"])


register(
    _softmax_op(
        "neighborhood_attention",
        variants=(
            # NAT's kernel 7 along T (2D / 3D grids take grid=(X, Y[, Z]) with X Y Z = T, which the
            # generated matrix's lengths cannot all meet: tests/ops/test_neighborhood.py covers them)
            _qkv_variant("default"),
            _qkv_variant("dilated", kernel_size=5, dilation=3),
            _qkv_variant("causal", kernel_size=6, dilation=2, causal=True),
        ),
        flops=_neighborhood_flops,
        paper="Neighborhood Attention Transformer (2023); Dilated Neighborhood Attention Transformer (2022)",
        url="https://arxiv.org/abs/2204.07143",
        summary="o_i = softmax attention over the kernel_size nearest keys of i's dilation group (per axis)",
    )
)


def _hyper_flops(mode: str, dims: Mapping[str, int]) -> int:
    """Per query head and recursion level, the second half's queries score one block and the samples
    (b + m keys); pieces of at most min_seq_len are exact causal; 2 (K + V) FLOPs per pair."""
    b, m, low = dims.get("block_size", 64), dims.get("num_samples", 64), dims.get("min_seq_len", 256)

    def pairs(T: int) -> int:
        if T <= low:
            return T * (T + 1) // 2
        h = T // 2
        return pairs(h) + pairs(T - h) + (T - h) * (min(b, h) + m)

    return dims["B"] * dims["H"] * pairs(dims["T"]) * 2 * (dims["K"] + dims["V"])


_HYPER_SMALL = MappingProxyType({"block_size": 4, "num_samples": 3, "lsh_bits": 3, "min_seq_len": 8})

register(
    _softmax_op(
        "hyper_attention",
        variants=(
            # the paper's sizes (block 64, 64 samples, exact below 256 tokens): the speed benchmark's
            _qkv_variant("default"),
            # small blocks and pieces, so that test lengths exercise hashing, sampling and recursion
            _qkv_variant("small", **_HYPER_SMALL),
            _qkv_variant("non_causal", **_HYPER_SMALL, causal=False),
        ),
        flops=_hyper_flops,
        paper="HyperAttention: Long-context Attention in Near-Linear Time (2023)",
        url="https://arxiv.org/abs/2310.05869",
        summary="o = exact attention within sortLSH blocks + sampled keys for the rest; causal by recursion",
    )
)
