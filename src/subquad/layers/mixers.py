"""Token-mixer layers: the published layer around each op (projections, short convolution, gates,
feature maps, output norm and gate), with one calling convention.

Shape legend: B batch, T time, D hidden size, H heads, K key dim, V value dim, N sequences,
M memories, S cached tokens.

Every mixer has ``forward(x [B, T, D], cache=None, cu_seqlens=None, attention_mask=None) -> [B, T, D]``.

- ``cache`` (a ``LayerCache``): read and updated in place, for chunked prefill and decoding.
- ``cu_seqlens``: packed sequences (B = 1), no mixing across them (training on packed documents).
- ``attention_mask``: ``[B, S]`` with 1 for tokens and 0 for (left) padding, covering the cached
  tokens and this call's; recurrent mixers zero the padded inputs so they leave the state untouched.

Mode rule (explicit, documented): recurrent mixers call their op with ``mode="recurrent"`` when a
call has exactly one token (a decode step) and ``mode="chunk"`` otherwise; attention mixers call
``attention_decode`` for a single unpadded token with a cache, ``ops.attention`` when there is
neither a cache nor padding, and a masked exact attention over ``[cached, new]`` keys otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from subquad import ops
from subquad.layers.cache import LayerCache
from subquad.layers.feature_maps import make_feature_map
from subquad.layers.modules import (
    GatedHeadNorm,
    RotaryEmbedding,
    ShortConvolution,
    autocast_input,
    check_layer_call,
    token_positions,
    token_shift,
    upcast,
)
from subquad.ops import routing
from subquad.ops._common.validation import check_positive_int


def decode_mode(T: int) -> str:
    """The mode rule of recurrent mixers: the step form for one token, the chunked form otherwise."""
    return "recurrent" if T == 1 else "chunk"


class Mixer(nn.Module):
    """Base class of token mixers.

    Args:
        hidden_size: D, the model width.
        num_heads: H.
        head_dim: per-head width (default ``D // H``).
    """

    #: "recurrent" (fixed-size state), "window" (keeps the last ``window`` tokens) or "attention".
    memory = "recurrent"

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        if hidden_size <= 0 or num_heads <= 0:
            raise ValueError(f"hidden_size and num_heads must be > 0, got {hidden_size}, {num_heads}")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
            head_dim = hidden_size // num_heads
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim

    def _heads(self, t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        # [B, T, H * d] -> [B, T, H, d]
        return t.unflatten(-1, (self.num_heads, dim or self.head_dim))


class RecurrentMixer(Mixer):
    """A mixer around a stateful op: subclasses implement ``mix``; this class handles padding,
    the mode rule and the cache's recurrent state. A subclass that sets ``uses_shared = True``
    also gets ``shared``: a dict the model passes to every layer of one forward call (RWKV-7's
    value residual reads the first RWKV-7 layer's values from it)."""

    uses_shared = False
    #: a subclass that sets this gets ``positions`` (``token_positions``) in ``mix``
    uses_positions = False

    def mix(
        self,
        x: torch.Tensor,
        *,
        mode: str,
        cache: LayerCache | None,
        cu_seqlens: torch.Tensor | None,
        keep: torch.Tensor | None,
        initial_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(y [B, T, D], final_state or None)``. ``keep`` (bool ``[B, T, 1]`` or None) marks
        real tokens: the op's key- and value-like inputs are zeroed elsewhere, so padded tokens
        leave the state untouched."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        shared: dict | None = None,
    ) -> torch.Tensor:
        check_layer_call(x, self.hidden_size, cache, cu_seqlens, attention_mask)
        x = autocast_input(x)
        T = x.shape[1]
        keep = None
        if attention_mask is not None:
            keep = attention_mask[:, -T:].bool()[..., None]  # [B, T, 1]
            x = x.masked_fill(~keep, 0)  # masked_fill, not a product: a NaN or inf must not leak in
        y, state = self.mix(
            x,
            mode=decode_mode(T),
            cache=cache,
            cu_seqlens=cu_seqlens,
            keep=keep,
            initial_state=cache.state if cache is not None else None,
            **({"shared": shared} if self.uses_shared else {}),
            **(
                {
                    "positions": token_positions(
                        T, cache.seen_tokens if cache else 0, cu_seqlens, attention_mask, x.device
                    )
                }
                if self.uses_positions
                else {}
            ),
        )
        if cache is not None:
            cache.state = state.detach() if state is not None else None
            cache.seen_tokens += T
        # padded positions output 0 (a normalized map divides 0 by 0 there)
        return y if keep is None else y.masked_fill(~keep, 0)


def _masked(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``t [B, T, ...]`` with padded tokens zeroed."""
    if keep is None:
        return t
    return t.masked_fill(~keep.reshape(*keep.shape[:2], *([1] * (t.ndim - 2))), 0)


class LinearAttention(RecurrentMixer):
    """Linear attention (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236) with a choice of
    feature map (``identity``, ``elu``, ``relu``, ``cosine``, ``taylor`` (Based), ``performer``
    (FAVOR+), ``hedgehog``); normalized (``o / (phi(q) . sum phi(k))``) when the map is positive,
    else followed by a per-head RMSNorm. ``key_dim`` sets the per-head width fed to the map (Based
    uses 16 with the Taylor map)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        feature_map: str = "elu",
        key_dim: int | None = None,
        normalize: bool | None = None,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        self.key_dim = key_dim or self.head_dim
        self.feature_map = make_feature_map(feature_map, self.key_dim, num_heads)
        if normalize is None:
            normalize = self.feature_map.positive
        if normalize and not self.feature_map.positive:
            raise ValueError(f"normalize=True needs a positive feature map, {feature_map!r} is not")
        self.normalize = normalize
        self.q_proj = nn.Linear(hidden_size, num_heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.o_norm = None if normalize else GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        q = self.feature_map(self._heads(self.q_proj(x), self.key_dim))
        k = _masked(self.feature_map(self._heads(self.k_proj(x), self.key_dim)), keep)
        v = _masked(self._heads(self.v_proj(x)), keep)
        o, state = ops.linear_attn(
            q,
            k,
            v,
            mode=mode,
            scale=1.0 if self.normalize else None,
            normalize=self.normalize,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        if self.o_norm is not None:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2)), state


def retnet_log_decays(num_heads: int) -> torch.Tensor:
    """RetNet's per-head decays ``gamma_h = 1 - 2^(-5 - h)`` (Sun et al. 2023), as natural logs."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64)))).float()


class RetNet(RecurrentMixer):
    """Retention / Lightning attention: ``simple_gla`` with a constant per-head decay ``g_gamma``
    (RetNet, https://arxiv.org/abs/2307.08621; Lightning Attention-2, https://arxiv.org/abs/2401.04658),
    swish output gate and per-head norm. ``rotary=True`` (default) applies RetNet's rotation
    ``q_n e^{i n theta}``, ``k_m e^{-i m theta}`` (the xPos rotation without its extra scale, which the
    decay takes over, as in the paper's final form): rotary embeddings of q and k at the tokens'
    positions, so scores depend on ``n - m``."""

    uses_positions = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        rotary: bool = True,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rotary else None
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state, positions=None):
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        k = _masked(k, keep)
        v = _masked(self._heads(self.v_proj(x)), keep)
        o, state = ops.simple_gla(
            q,
            k,
            v,
            g_gamma=retnet_log_decays(self.num_heads).to(x.device, x.dtype),
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        o = self.o_norm(o, self._heads(self.g_proj(x)))
        return self.o_proj(o.flatten(-2)), state


class GLA(RecurrentMixer):
    """Gated Linear Attention (Yang et al. 2023, https://arxiv.org/abs/2312.06635): per-key-dim
    data-dependent decay from a low-rank projection, ``g = logsigmoid(W2 W1 x + b) / 16``, swish
    output gate, per-head norm. ``expand_k`` scales the key width (0.5 in the paper)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        expand_k: float = 0.5,
        gate_low_rank: int = 16,
        gate_normalizer: float = 16.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        self.key_dim = max(1, int(self.head_dim * expand_k))
        self.gate_normalizer = gate_normalizer
        inner = num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank, bias=False),
            nn.Linear(gate_low_rank, num_heads * self.key_dim, bias=True),
        )
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        q = self._heads(self.q_proj(x), self.key_dim)
        k = _masked(self._heads(self.k_proj(x), self.key_dim), keep)
        v = _masked(self._heads(self.v_proj(x)), keep)
        g = F.logsigmoid(upcast(self._heads(self.gk_proj(x), self.key_dim))) / self.gate_normalizer
        o, state = ops.gla(
            q,
            k,
            v,
            g.to(x.dtype),
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        o = self.o_norm(o, self._heads(self.g_proj(x)))
        return self.o_proj(o.flatten(-2)), state


class Mamba2(RecurrentMixer):
    """A Mamba-2 block (Dao & Gu 2024, https://arxiv.org/abs/2405.21060) on ``simple_gla``: the SSD
    recurrence ``h_t = exp(dt_t A_h) h_{t-1} + dt_t B_t x_t^T``, ``y_t = C_t^T h_t + D_h x_t`` is
    ``simple_gla(q=C, k=B, v=dt * x, g=dt * A, scale=1)`` with B, C shared by the heads (one group);
    short convolution over (x, B, C), ``dt = softplus(W x + dt_bias)``, ``A = -exp(A_log)``, gated
    RMSNorm with z, and the D skip. ``head_dim`` is the paper's P, ``state_size`` its N."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        state_size: int = 64,
        conv_size: int = 4,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        self.state_size = state_size
        inner = num_heads * self.head_dim
        self.in_proj = nn.Linear(hidden_size, 2 * inner + 2 * state_size + num_heads, bias=False)
        self.conv = ShortConvolution(inner + 2 * state_size, conv_size)
        self.A_log = nn.Parameter(torch.log(torch.linspace(1.0, 16.0, num_heads)))
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), num_heads))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.D = nn.Parameter(torch.ones(num_heads))
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        inner, N = self.num_heads * self.head_dim, self.state_size
        z, xbc, dt = self.in_proj(x).split([inner, inner + 2 * N, self.num_heads], dim=-1)
        xbc = self.conv(xbc, cache=cache, name="xbc", cu_seqlens=cu_seqlens)
        xs, Bm, Cm = xbc.split([inner, N, N], dim=-1)
        xs = self._heads(_masked(xs, keep))  # [B, T, H, P]
        dt = F.softplus(upcast(dt) + upcast(self.dt_bias))  # [B, T, H]
        g = -torch.exp(upcast(self.A_log)) * dt
        H = self.num_heads
        q = Cm[:, :, None, :].expand(-1, -1, H, -1)  # [B, T, H, N]
        k = _masked(Bm, keep)[:, :, None, :].expand(-1, -1, H, -1)
        o, state = ops.simple_gla(
            q,
            k,
            xs * dt[..., None].to(x.dtype),
            g.to(x.dtype),
            mode=mode,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        o = o + xs * self.D.to(x.dtype)[:, None]
        o = self.o_norm(o, self._heads(z))
        return self.out_proj(o.flatten(-2)), state


class DeltaNet(RecurrentMixer):
    """DeltaNet (Yang et al. 2024, https://arxiv.org/abs/2406.06484): short convolutions on q, k, v
    (SiLU), L2-normalised q and k inside the op, ``beta = sigmoid(W x)`` (times 2 with
    ``allow_neg_eigval``, https://arxiv.org/abs/2411.12537), swish output gate, per-head norm."""

    op_name = "delta_rule"

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        inner = num_heads * self.head_dim
        self.allow_neg_eigval = allow_neg_eigval
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.q_conv = ShortConvolution(inner, conv_size)
        self.k_conv = ShortConvolution(inner, conv_size)
        self.v_conv = ShortConvolution(inner, conv_size)
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def _qkvb(self, x, cache, cu_seqlens, keep):
        q = self._heads(self.q_conv(self.q_proj(x), cache=cache, name="q", cu_seqlens=cu_seqlens))
        k = self._heads(self.k_conv(self.k_proj(x), cache=cache, name="k", cu_seqlens=cu_seqlens))
        v = self._heads(self.v_conv(self.v_proj(x), cache=cache, name="v", cu_seqlens=cu_seqlens))
        beta = torch.sigmoid(upcast(self.b_proj(x)))
        if self.allow_neg_eigval:
            beta = 2 * beta
        return q, _masked(k, keep), _masked(v, keep), beta.to(x.dtype)

    def _out(self, x, o):
        return self.o_proj(self.o_norm(o, self._heads(self.g_proj(x))).flatten(-2))

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        q, k, v, beta = self._qkvb(x, cache, cu_seqlens, keep)
        o, state = ops.delta_rule(
            q,
            k,
            v,
            beta,
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
        )
        return self._out(x, o), state


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (Yang et al. 2024, https://arxiv.org/abs/2412.06464): DeltaNet plus a scalar
    decay ``g = -exp(A_log) * softplus(W x + dt_bias)`` per head and token (Mamba-2's parametrisation)."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None, **kwargs) -> None:
        super().__init__(hidden_size, num_heads, head_dim, **kwargs)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(1, 16)))
        dt = torch.exp(torch.empty(num_heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        q, k, v, beta = self._qkvb(x, cache, cu_seqlens, keep)
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))
        o, state = ops.gated_delta_rule(
            q,
            k,
            v,
            g.to(x.dtype),
            beta,
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            use_qk_l2norm_in_kernel=True,
        )
        return self._out(x, o), state


class RWKV7(RecurrentMixer):
    """RWKV-7 time mixing (Peng et al. 2025, https://arxiv.org/abs/2503.14456): token shift with
    learned interpolation, decay ``w = -0.6065 * sigmoid(w0 + W2 tanh(W1 x))`` (log-space, so
    ``exp(w)`` lies in (0.545, 1)), in-context learning rate ``a = sigmoid(a0 + W2 W1 x)``, the
    normalised removal key ``kk``, the op's low-rank pair ``a_op = -kk``, ``b_op = kk * a``, per-head
    norm, the ``(r . k * r_k) v`` bonus and the output gate.

    Value residual (the paper's full model, ``value_residual=True``): the first RWKV-7 layer of a
    model stores its values in the forward call's ``shared`` dict, and every later one mixes them
    in, ``v = v + (v_first - v) * sigmoid(v0 + W2 W1 x)``. A layer called without ``shared`` (alone)
    is a first layer."""

    uses_shared = True

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        low_rank: int = 32,
        value_residual: bool = True,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        inner = num_heads * self.head_dim
        D = hidden_size
        self.mu = nn.Parameter(torch.rand(6, D) * 0.5)  # r, w, k, v, a, g interpolation
        self.r_proj = nn.Linear(D, inner, bias=False)
        self.k_proj = nn.Linear(D, inner, bias=False)
        self.v_proj = nn.Linear(D, inner, bias=False)
        self.w_lora = nn.Sequential(nn.Linear(D, low_rank, bias=False), nn.Tanh(), nn.Linear(low_rank, inner))
        self.a_lora = nn.Sequential(nn.Linear(D, low_rank, bias=False), nn.Linear(low_rank, inner))
        self.g_lora = nn.Sequential(
            nn.Linear(D, low_rank, bias=False), nn.Sigmoid(), nn.Linear(low_rank, inner)
        )
        self.value_residual = value_residual
        if value_residual:
            self.v0 = nn.Parameter(torch.ones(inner))  # sigmoid(1) = 0.73 of v_first at the start
            self.v_lora = nn.Sequential(
                nn.Linear(D, low_rank, bias=False), nn.Linear(low_rank, inner, bias=False)
            )
        self.k_k = nn.Parameter(torch.full((inner,), 0.85))
        self.k_a = nn.Parameter(torch.ones(inner))
        self.r_k = nn.Parameter(torch.zeros(num_heads, self.head_dim))
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, D, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state, shared=None):
        delta = token_shift(x, cache=cache, name="shift", cu_seqlens=cu_seqlens) - x
        xr, xw, xk, xv, xa, xg = (x + delta * m.to(x.dtype) for m in self.mu)
        r = self._heads(self.r_proj(xr))
        w = -0.606531 * torch.sigmoid(upcast(self._heads(self.w_lora(xw))))
        k = self.k_proj(xk)
        v = _masked(self._heads(self.v_proj(xv)), keep)
        if self.value_residual and shared is not None:
            if "rwkv7_v_first" not in shared:
                shared["rwkv7_v_first"] = v  # the first RWKV-7 layer of this call
            else:
                mix = torch.sigmoid(self._heads(self.v0.to(x.dtype) + self.v_lora(xv)))
                v = v + (shared["rwkv7_v_first"] - v) * mix
        lr = torch.sigmoid(upcast(self.a_lora(xa))).to(x.dtype)
        kk = F.normalize(upcast(self._heads(k * self.k_k.to(x.dtype))), dim=-1).to(x.dtype)
        k = _masked(self._heads(k * (1 + (lr - 1) * self.k_a.to(x.dtype))), keep)
        lr = self._heads(lr)
        o, state = ops.rwkv7(
            r,
            w.to(x.dtype),
            k,
            v,
            _masked(-kk, keep),
            _masked(kk * lr, keep),
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
        )
        o = self.o_norm(o)
        o = o + (r * k * self.r_k.to(x.dtype)).sum(-1, keepdim=True) * v
        return self.o_proj((o.flatten(-2)) * self.g_lora(xg)), state


class MoM(RecurrentMixer):
    """Mixture-of-Memories (Du et al. 2025, https://arxiv.org/abs/2502.13685): a router picks each
    token's ``top_k`` of ``num_memories`` gated delta-rule memories, each with its own key, value,
    decay and beta projections (query shared), outputs mixed by router weights; swish output gate,
    per-head norm."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_memories: int = 4,
        top_k: int = 2,
        op: str = "gated_delta_rule",
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        if op not in ("gated_delta_rule", "delta_rule"):
            raise ValueError(f"MoM layer op must be 'gated_delta_rule' or 'delta_rule', got {op!r}")
        self.num_memories, self.top_k, self.op = num_memories, top_k, op
        inner, M, H = num_heads * self.head_dim, num_memories, num_heads
        self.router = nn.Linear(hidden_size, M, bias=False)
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, M * inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, M * inner, bias=False)
        self.b_proj = nn.Linear(hidden_size, M * H, bias=False)
        self.a_proj = nn.Linear(hidden_size, M * H, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(M, H).uniform_(1, 16)))
        dt = torch.exp(torch.empty(M, H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_norm = GatedHeadNorm(self.head_dim)
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        B, T, _ = x.shape
        M, H, d = self.num_memories, self.num_heads, self.head_dim
        q = F.normalize(upcast(self._heads(self.q_proj(x))), dim=-1).to(x.dtype)
        k = F.normalize(upcast(self.k_proj(x).view(B, T, M, H, d)), dim=-1).to(x.dtype)
        v = self.v_proj(x).view(B, T, M, H, d)
        beta = torch.sigmoid(upcast(self.b_proj(x))).view(B, T, M, H).to(x.dtype)
        kwargs = {}
        if self.op == "gated_delta_rule":
            a = upcast(self.a_proj(x)).view(B, T, M, H)
            kwargs["g"] = (-torch.exp(upcast(self.A_log)) * F.softplus(a + upcast(self.dt_bias))).to(x.dtype)
        o, state = ops.mom(
            q,
            _masked(k, keep),
            _masked(v, keep),
            self.router(x),
            op=self.op,
            beta=beta,
            top_k=self.top_k,
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            **kwargs,
        )
        o = self.o_norm(o, self._heads(self.g_proj(x)))
        return self.o_proj(o.flatten(-2)), state


class Attention(Mixer):
    """Multi-head softmax attention with rotary embeddings and grouped key/value heads, full or
    sliding-window (``window``: each token sees itself and the previous ``window - 1``), through
    ``subquad.ops.attention``. The cache keeps every key/value (full) or only the last ``window``
    (sliding), so a windowed layer decodes in memory bounded by the window."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        window: int | None = None,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_kv_heads = num_kv_heads
        self.window = window
        self.memory = "window" if window is not None else "attention"
        d = self.head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * d, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(num_heads * d, hidden_size, bias=False)
        self.rotary = RotaryEmbedding(d, rope_base)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, past, q, k, v = self.prepare(x, cache, cu_seqlens, attention_mask)
        T = x.shape[1]
        # attention over the keys this call may see
        if cache is None and attention_mask is None:
            o = ops.attention(q, k, v, causal=True, window=self.window, cu_seqlens=cu_seqlens)
        elif cache is not None and T == 1 and attention_mask is None:
            cache.append_kv(k, v, keep_last=self.window)
            k_all, v_all = cache.keys_values()
            o = ops.attention_decode(q, k_all, v_all)
        else:
            k_all, v_all = self._with_cached(k, v, cache)
            o = self._masked_attention(q, k_all, v_all, attention_mask, past)
            if cache is not None:
                cache.append_kv(k, v, keep_last=self.window)
        if cache is not None:
            cache.seen_tokens += T
        return self.o_proj(o.flatten(-2))

    def prepare(self, x, cache, cu_seqlens, attention_mask):
        """The shared start of a call: checks, the autocast input, the cached token count and
        ``(x, past, q, k, v)`` from ``rotated_qkv``."""
        check_layer_call(x, self.hidden_size, cache, cu_seqlens, attention_mask)
        x = autocast_input(x)
        past = cache.seen_tokens if cache is not None else 0
        return (x, past, *self.rotated_qkv(x, past, cu_seqlens, attention_mask))

    def rotated_qkv(self, x, past, cu_seqlens, attention_mask):
        """Projections ``q [B, T, H, d]``, ``k, v [B, T, Hk, d]`` with rotary embeddings at the
        tokens' positions: per packed sequence, or counted over real tokens when left-padded."""
        T = x.shape[1]
        d, Hk = self.head_dim, self.num_kv_heads
        q = self._heads(self.q_proj(x))
        k = self.k_proj(x).unflatten(-1, (Hk, d))
        v = self.v_proj(x).unflatten(-1, (Hk, d))
        positions = token_positions(T, past, cu_seqlens, attention_mask, x.device)
        return self.rotary(q, positions), self.rotary(k, positions), v

    @staticmethod
    def _with_cached(k, v, cache):
        """This call's keys and values after the cached ones (the cache itself is not changed)."""
        prev = cache.keys_values() if cache is not None else None
        if prev is None:
            return k, v
        return torch.cat([prev[0], k], dim=1), torch.cat([prev[1], v], dim=1)

    def _masked_attention(self, q, k, v, attention_mask, past, extra=None):
        """Exact attention of T new queries over S = cached + new keys, with causal / window rules
        by absolute slot and padded keys masked; a padded query also sees itself (its output is
        unused, and it must not be a softmax over nothing). ``extra`` (bool ``[B, H, T, S]``)
        further restricts which keys a query sees, its own key always kept. Queries go in blocks
        so the score matrix of one block stays below ``MASKED_SCORE_ELEMENTS``."""
        B, T, H, _ = q.shape
        S = k.shape[1]
        total = past + T
        rep = self.num_heads // self.num_kv_heads
        kh = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # [B, H, S, K]
        vh = v.repeat_interleave(rep, dim=2).transpose(1, 2)
        kj = torch.arange(total - S, total, device=q.device)[None, :]
        key_ok = (
            attention_mask[:, -S:].bool()[:, None, :] if attention_mask is not None else None
        )  # [B, 1, S]
        block = max(1, MASKED_SCORE_ELEMENTS // max(1, B * H * S))
        outs = []
        for start in range(0, T, block):
            stop = min(T, start + block)
            qi = torch.arange(total - T + start, total - T + stop, device=q.device)[:, None]
            allowed = kj <= qi
            if self.window is not None:
                allowed = allowed & (qi - kj < self.window)
            allowed = allowed[None]  # [1, t, S]
            if key_ok is not None:
                allowed = (allowed & key_ok) | (qi == kj)[None]
            mask = allowed[:, None]  # [B or 1, 1, t, S]
            if extra is not None:
                mask = mask & (extra[:, :, start:stop] | (qi == kj))
            qh = q[:, start:stop].transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(1, 2))
        return torch.cat(outs, dim=1)


#: largest score matrix (elements) one block of the masked attention path materialises
MASKED_SCORE_ELEMENTS = 1 << 25


class HyperAttention(Attention):
    """HyperAttention (Han et al. 2024, https://arxiv.org/abs/2310.05774) as a layer: ``Attention``'s
    rotary q/k/v projections with ``subquad.ops.hyper_attention`` (LSH-sorted blocks + sampled keys,
    causal by the recursive split, exact below ``min_seq_len``) for calls that start a sequence
    without padding (training, and the prefill of a fresh cache). HyperAttention speeds up long
    prefills; decoding steps, calls after a cached prefix and left-padded calls run exact attention
    (the masked path), so a cached sequence longer than ``min_seq_len`` gets exact attention where
    the uncached forward uses the estimate.

    Args (beyond ``Attention``'s, without ``window``): block_size, num_samples, lsh_bits,
    min_seq_len, seed of the op.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        num_samples: int = 64,
        lsh_bits: int = 6,
        min_seq_len: int = 256,
        seed: int = 0,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, num_kv_heads=num_kv_heads, rope_base=rope_base)
        self.hyper = {
            "block_size": block_size,
            "num_samples": num_samples,
            "lsh_bits": lsh_bits,
            "min_seq_len": min_seq_len,
            "seed": seed,
        }
        for name, value in self.hyper.items():
            if name != "seed":
                check_positive_int(name, value)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, past, q, k, v = self.prepare(x, cache, cu_seqlens, attention_mask)
        T = x.shape[1]
        if past == 0 and attention_mask is None:
            o = ops.hyper_attention(q, k, v, cu_seqlens=cu_seqlens, **self.hyper)
        else:
            k_all, v_all = self._with_cached(k, v, cache)
            o = self._masked_attention(q, k_all, v_all, attention_mask, past)
        if cache is not None:
            cache.append_kv(k, v)
            cache.seen_tokens += T
        return self.o_proj(o.flatten(-2))


class RoutingAttention(Attention):
    """Routing Transformer attention (Roy et al. 2021, https://arxiv.org/abs/2003.05997) as a layer:
    ``Attention``'s rotary q/k/v projections, and each query attends causally to the keys of its
    own k-means cluster (and its own key) through ``subquad.ops.routing_attention``. The centroids
    ``[Hk, M, d]`` are a buffer (saved with the model), moved by the paper's exponential moving
    average after every training-mode call (``update_centroids``), not by gradients. The cache
    keeps every key and value; a cached or padded call routes the cached keys with the same
    centroids and runs the masked exact path, which equals the op on the whole sequence.

    Args (beyond ``Attention``'s, without ``window``): num_clusters M, decay of the EMA.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        num_clusters: int = 8,
        decay: float = 0.999,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, num_kv_heads=num_kv_heads, rope_base=rope_base)
        check_positive_int("num_clusters", num_clusters)
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.register_buffer("centroids", torch.randn(self.num_kv_heads, num_clusters, self.head_dim))

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, past, q, k, v = self.prepare(x, cache, cu_seqlens, attention_mask)
        T = x.shape[1]
        c = self.centroids.to(q.dtype).clone()  # this call's routing, unaffected by the update below
        if cache is None and attention_mask is None:
            o = ops.routing_attention(q, k, v, c, cu_seqlens=cu_seqlens)
        else:
            k_all, v_all = self._with_cached(k, v, cache)
            G = self.num_heads // self.num_kv_heads
            cq = routing.assign(q, c).transpose(1, 2)  # [B, H, T]
            ck = routing.assign(k_all, c).repeat_interleave(G, dim=2).transpose(1, 2)  # [B, H, S]
            same = cq.unsqueeze(-1) == ck.unsqueeze(-2)  # [B, H, T, S]
            o = self._masked_attention(q, k_all, v_all, attention_mask, past, extra=same)
            if cache is not None:
                cache.append_kv(k, v)
        if cache is not None:
            cache.seen_tokens += T
        if self.training and T > 0:
            keep = attention_mask[:, -T:].bool() if attention_mask is not None else None
            qd, kd = q.detach(), k.detach()
            if keep is not None:  # padding takes no part in the k-means step
                qd, kd = qd[keep].unsqueeze(0), kd[keep].unsqueeze(0)
            with torch.no_grad():
                self.centroids.copy_(routing.update_centroids(self.centroids, qd, kd, self.decay))
        return self.o_proj(o.flatten(-2))


class NSA(Attention):
    """Native Sparse Attention (Yuan et al. 2025, https://arxiv.org/abs/2502.11089) as a layer:
    ``Attention``'s rotary q/k/v projections (grouped heads share their block selection, as in the
    paper) plus a per-token, per-head sigmoid gate for each branch (compressed blocks, selected
    blocks, sliding window), through ``subquad.ops.nsa``. The cache keeps every key and value;
    a call with a cache passes the whole cached prefix as keys (the op's decode form: the queries
    are the last T key positions). Left padding is removed row by row (padding is a prefix of
    the row's slots), so a padded row computes exactly what its unpadded sequence would.

    Args (beyond ``Attention``'s, without ``window`` there): block_size, block_count, window of
    the op (the paper's 64, 16, 512).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        num_kv_heads: int | None = None,
        block_size: int = 64,
        block_count: int = 16,
        window: int = 512,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, num_kv_heads=num_kv_heads, rope_base=rope_base)
        for name, value in (("block_size", block_size), ("block_count", block_count), ("window", window)):
            check_positive_int(name, value)
        self.block_size, self.block_count, self.nsa_window = block_size, block_count, window
        self.g_proj = nn.Linear(hidden_size, 3 * num_heads)  # cmp, slc, swa gates per head

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, _, q, k, v = self.prepare(x, cache, cu_seqlens, attention_mask)
        B, T = x.shape[:2]
        gates = torch.sigmoid(self.g_proj(x)).unflatten(-1, (3, self.num_heads)).unbind(2)
        if cache is not None:
            cache.append_kv(k, v)
            k, v = cache.keys_values()
            cache.seen_tokens += T
        opts = {"block_size": self.block_size, "block_count": self.block_count, "window": self.nsa_window}
        if attention_mask is None:
            o = ops.nsa(q, k, v, *gates, cu_seqlens=cu_seqlens, **opts)
        else:
            o = q.new_zeros(*q.shape[:3], v.shape[-1])
            S = k.shape[1]
            real = attention_mask[:, -S:].bool()
            for b in range(B):
                p = int((~real[b]).sum())  # left padding: the first p slots of this row
                if bool(real[b, :p].any()) or not bool(real[b, p:].all()):
                    raise ValueError("NSA supports left padding only (attention_mask 0s then 1s per row)")
                first = max(0, p - (S - T))  # this call's first real query
                if first < T:
                    rows = slice(b, b + 1)
                    o[rows, first:] = ops.nsa(
                        q[rows, first:], k[rows, p:], v[rows, p:], *(g[rows, first:] for g in gates), **opts
                    )
        return self.o_proj(o.flatten(-2))


class OpMixer(RecurrentMixer):
    """A generic layer for any stateful op in the registry, built from its ``OpSpec`` alone: each
    per-token input gets a linear projection from x shaped by its dims, mapped into its valid range
    by its kind (``unit``: L2-normalised; ``log_gate``: ``logsigmoid / 16``; ``beta``: sigmoid;
    ``beta2``: 2 sigmoid; ``positive``: softplus; ``qk`` / ``v``: as is); inputs without a time dim
    are parameters (log-gates as ``-exp(A_log)``), constant log-decays RetNet's. The output (the op's
    ``[B, T, ..., V]``) is flattened into ``o_proj``. A new op with standard input kinds needs no
    layer class; ops with joint constraints (RWKV-7's ``a`` and ``b``) should have one.

    The variant is the op's ``default`` one when it streams (splitting T equals one call, needed for
    decoding), else its first streaming variant with a step form.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int | None = None,
        *,
        op: str,
        variant: str | None = None,
        key_dim: int | None = None,
    ) -> None:
        from subquad.registry import REGISTRY  # registry imports ops only; layers sit above it

        super().__init__(hidden_size, num_heads, head_dim)
        if op not in REGISTRY:
            raise ValueError(f"op must be one of {sorted(REGISTRY)}, got {op!r}")
        spec = REGISTRY[op]
        if not spec.stateful:
            raise ValueError(f"OpMixer needs a stateful op; {op!r} has no recurrent state (use Attention)")
        if variant is None:
            candidates = [v for v in spec.variants if v.streaming and "recurrent" in spec.modes_for(v)]
            if not candidates:
                raise ValueError(f"op {op!r} has no streaming variant with a recurrent mode to decode with")
            var = spec.variant("default") if spec.variant("default") in candidates else candidates[0]
        else:
            var = spec.variant(variant)
        self.spec, self.variant = spec, var
        self.key_dim = key_dim or self.head_dim
        has_heads = any("H" in spec.tensors[n].dims for n in var.tensor_names)
        # an op without heads (a selective scan's [B, T, D_inner]) gets the full inner width as V
        width = self.head_dim if has_heads else num_heads * self.head_dim
        sizes = {**spec.fixed_dims, **var.fixed_dims, "H": num_heads, "K": self.key_dim, "V": width}
        self.time_shapes: dict[str, tuple[int, ...]] = {}
        self.const_sizes: dict[str, int] = {}
        self.proj = nn.ModuleDict()
        self.params = nn.ParameterDict()
        for name in var.tensor_names:
            ts = spec.tensors[name]
            if ts.dims[:2] == ("B", "T"):
                shape = tuple(sizes[d] for d in ts.dims[2:])
                self.time_shapes[name] = shape
                gate_bias = ts.kind.startswith("log_gate")
                self.proj[name] = nn.Linear(hidden_size, math.prod(shape), bias=gate_bias)
            elif ts.kind == "log_gate_const":
                self.const_sizes[name] = sizes[ts.dims[0]]
            else:
                shape = tuple(sizes[d] for d in ts.dims)
                if ts.kind == "log_gate":
                    init = torch.log(torch.empty(shape).uniform_(1, 16))
                else:
                    init = torch.zeros(shape)
                self.params[name] = nn.Parameter(init)
        # the output has the dims of the value-like input: [B, T, (H,) V] for most ops
        main_v = next(n for n in var.tensor_names if spec.tensors[n].kind == "v" and n in self.time_shapes)
        self.value_name = main_v
        self.out_features = math.prod(sizes[d] for d in spec.tensors[main_v].dims if d in ("H", "V"))
        self.o_proj = nn.Linear(self.out_features, hidden_size, bias=False)

    def _input(self, name: str, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        ts = self.spec.tensors[name]
        if name in self.time_shapes:
            t = self.proj[name](x).unflatten(-1, self.time_shapes[name])
            kind = ts.kind
            if kind == "unit":
                t = F.normalize(upcast(t), dim=-1).to(x.dtype)
            elif kind == "log_gate":
                t = (F.logsigmoid(upcast(t)) / 16).to(x.dtype)
            elif kind == "beta":
                t = torch.sigmoid(t)
            elif kind == "beta2":
                t = 2 * torch.sigmoid(t)
            elif kind == "positive":
                t = F.softplus(t)
            if kind in ("qk", "unit", "v"):
                t = _masked(t, keep)
            return t
        if ts.kind == "log_gate_const":
            return retnet_log_decays(self.const_sizes[name]).to(x.device, x.dtype)
        p = self.params[name]
        return (-torch.exp(upcast(p))).to(x.dtype) if ts.kind == "log_gate" else p.to(x.dtype)

    def mix(self, x, *, mode, cache, cu_seqlens, keep, initial_state):
        var = self.variant
        args = [self._input(n, x, keep) for n in var.positional]
        kwargs = {n: self._input(n, x, keep) for n in var.keyword}
        o, state = self.spec.fn(
            *args,
            mode=mode,
            initial_state=initial_state,
            output_final_state=cache is not None,
            cu_seqlens=cu_seqlens,
            **kwargs,
            **dict(var.kwargs),
        )
        return self.o_proj(o.flatten(2)), state
