"""Reference RWKV-7: the specification, a plain per-step loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    S_t = (diag(exp(w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T r_t

(the transpose of RWKV-7's [V, K] form S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T).
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_rwkv7(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens):
    def step(S, x):
        # S [H, K, V]; r, w, k, a, b [H, K]; v [H, V]
        read = torch.einsum("hk,hkv->hv", x["a"], S)  # a^T S: what the low-rank term removes / adds
        S = x["w"].exp()[:, :, None] * S + x["b"][:, :, None] * read[:, None, :]
        S = S + x["k"][:, :, None] * x["v"][:, None, :]
        return S, scale * torch.einsum("hk,hkv->hv", x["r"], S)

    tensors = {"r": r, "w": w, "k": k, "v": v, "a": a, "b": b}
    return reference_loop(step, tensors, v.shape[-1], initial_state, output_final_state, cu_seqlens)
