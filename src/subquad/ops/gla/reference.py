"""Reference GLA: the specification, a plain per-step loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t

``g_t [K]`` decays the rows of the state ``S [K, V]`` one key dimension at a time.
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    def step(S, x):
        # S [H, K, V]; q, k, g [H, K]; v [H, V]
        S = x["g"].exp()[:, :, None] * S + x["k"][:, :, None] * x["v"][:, None, :]
        return S, scale * torch.einsum("hk,hkv->hv", x["q"], S)

    return reference_loop(
        step, {"q": q, "k": k, "v": v, "g": g}, v.shape[-1], initial_state, output_final_state, cu_seqlens
    )
