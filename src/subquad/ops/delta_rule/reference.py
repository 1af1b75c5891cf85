"""Reference (gated) delta rule: the specification, a plain per-step loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = scale * S_t^T q_t

Without ``g`` (``g_t = 0``) this is DeltaNet. ``beta_t`` in [0, 2]: above 1 the transition has a
negative eigenvalue ``1 - beta_t`` along a unit key.
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    def step(S, x):
        # S [H, K, V]; q, k [H, K]; v [H, V]; beta (and g) [H]
        k_t, beta_t = x["k"], x["beta"][:, None, None]
        if "g" in x:
            S = x["g"].exp()[:, None, None] * S
        # (I - beta k k^T) S + beta k v^T
        S = S - beta_t * k_t[:, :, None] * torch.einsum("hk,hkv->hv", k_t, S)[:, None, :]
        S = S + beta_t * k_t[:, :, None] * x["v"][:, None, :]
        return S, scale * torch.einsum("hk,hkv->hv", x["q"], S)

    tensors = {"q": q, "k": k, "v": v, "beta": beta}
    if g is not None:
        tensors["g"] = g
    return reference_loop(step, tensors, v.shape[-1], initial_state, output_final_state, cu_seqlens)
