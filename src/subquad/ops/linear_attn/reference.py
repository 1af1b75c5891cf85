"""Reference linear attention: the specification, a plain per-step loop.

Shape legend: B batch, T time, H heads, K key dim, V value dim, N sequences.

    S_t = S_{t-1} + k_t v_t^T          z_t = z_{t-1} + k_t          (z only when normalized)
    o_t = scale * S_t^T q_t            (divided by scale * q_t . z_t when normalized)

Non-causal: every token reads the state after the whole sequence, ``o_t = scale * S_T^T q_t``.
With the normalizer the state is ``[H, K, V + 1]``: S with z appended as its last column.
"""

from __future__ import annotations

import torch

from subquad.ops._common.reference import reference_loop


def reference_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    normalize: bool,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    V = v.shape[-1]

    def read(S, q_t):
        # S [H, K, V (+1)], q_t [H, K]
        o = scale * torch.einsum("hk,hkv->hv", q_t, S[..., :V])
        if normalize:
            o = o / (scale * torch.einsum("hk,hk->h", q_t, S[..., V]))[:, None]
        return o

    def step(S, x):
        kv = x["k"][:, :, None] * x["v"][:, None, :]
        if normalize:
            # the normalizer z accumulates the keys: the state's last column
            kv = torch.cat([kv, x["k"][:, :, None]], -1)
        S = S + kv
        return S, read(S, x["q"])

    state_v = V + 1 if normalize else V
    tensors = {"q": q, "k": k, "v": v}
    if causal:
        return reference_loop(step, tensors, state_v, initial_state, output_final_state, cu_seqlens)

    # non-causal: first accumulate each sequence's full state, then let every token read it
    _, final = reference_loop(step, tensors, state_v, initial_state, True, cu_seqlens)

    def read_final(S, x):
        return S, read(S, x["q"])

    o, _ = reference_loop(read_final, tensors, state_v, final, False, cu_seqlens)
    return o, (final if output_final_state else None)
