"""Reference simple GLA: the specification, a plain per-step loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

``g_t`` is a scalar per head: data-dependent ``g [B, T, H]`` (Mamba-2 / SSD) or the constant
``g_gamma [H]`` (RetNet, Lightning Attention). Without either it is plain linear attention.
Computed in float32 (float64 for float64 inputs), one sequence and one token at a time.
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    g_gamma: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    def step(S, x):
        # S [H, K, V]; x holds this token's q, k, v [H, D] and log-decay [H]
        if "g" in x:
            S = x["g"].exp()[:, None, None] * S
        elif g_gamma is not None:
            S = g_gamma.exp()[:, None, None] * S
        S = S + x["k"][:, :, None] * x["v"][:, None, :]
        o = scale * torch.einsum("hk,hkv->hv", x["q"], S)
        return S, o

    tensors = {"q": q, "k": k, "v": v}
    if g is not None:
        tensors["g"] = g
    if g_gamma is not None:
        g_gamma = g_gamma.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    return reference_loop(step, tensors, v.shape[-1], initial_state, output_final_state, cu_seqlens)
