"""routing: content-based sparse attention by online k-means (Routing Transformer, Roy et al. 2021,
https://arxiv.org/abs/2003.05997): queries and keys are routed to their nearest centroid and each
query attends, causally, to the keys of its own cluster.

Shape legend: B batch, T time, H query heads, Hk key/value heads (dividing H), K key dim, V value
dim, M clusters, N sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subquad.ops._common import validation as val
from subquad.ops._common.validation import autocast_exempt
from subquad.ops._common.varlen import per_sequence
from subquad.ops.routing.chunk import chunk_routing
from subquad.ops.routing.reference import assign, reference_routing

MODES = ("reference", "chunk")


def _check(q, k, v, centroids):
    *_, Hk, K = val.check_grouped_qkv(q, k, v)
    val.check_tensor("centroids", centroids, 3, "[Hk, M, K]")
    val.check_same_dtype_device({"q": q, "k": k, "v": v, "centroids": centroids})
    if centroids.shape[0] != Hk or centroids.shape[1] == 0 or centroids.shape[2] != K:
        raise ValueError(
            f"centroids must have shape [Hk, M, K] = [{Hk}, M >= 1, {K}], got {list(centroids.shape)}"
        )


@autocast_exempt
def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    mode: str = "chunk",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Causal routing attention. Query t of head h belongs to cluster
    ``c_q = argmax_m cos(q_t, mu_m)``, key s to ``c_k = argmax_m cos(k_s, mu_m)`` (centroids of the key
    head, shared by its query heads); query t attends to keys ``s <= t`` with ``c_k(s) = c_q(t)``,
    and always to its own key, so no softmax is over nothing:
    ``o_t = sum_s softmax_s(scale q_t . k_s) v_s`` over those keys.

    The paper routes with shared centroids for queries and keys and updates them by an exponential
    moving average (:func:`update_centroids`), not by gradients: no gradient flows to ``centroids``
    or through the discrete assignment. Clusters are exact (not the paper's equal-size top-k
    buckets), so every query is in exactly one cluster and nothing is dropped; unbalanced clusters
    cost more (all tokens in one cluster: dense causal attention).

    Args:
        q: ``[B, T, H, K]``. k: ``[B, T, Hk, K]``. v: ``[B, T, Hk, V]``; Hk divides H.
        centroids: ``[Hk, M, K]`` (normalised inside; their norm does not matter).
        scale: default ``K ** -0.5``. cu_seqlens: int64 ``[N + 1]``, packed sequences (B = 1).
        mode: ``"chunk"`` (clusters gathered, see ``subquad/ops/routing/README.md``) or
            ``"reference"`` (one query position at a time).
        chunk_size: queries of a cluster scored at once (memory knob).

    Returns:
        ``o [B, T, H, V]`` in q's dtype.
    """
    _check(q, k, v, centroids)
    val.check_mode(mode, MODES)
    val.check_chunk_size(chunk_size)
    scale = val.resolve_scale(scale, q.shape[-1])
    val.check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], q.device)

    def run(q_, k_, v_):
        if mode == "reference":
            o_ = reference_routing(q_, k_, v_, centroids, scale)
        else:
            o_ = chunk_routing(q_, k_, v_, centroids, scale, chunk_size)
        return o_.to(q.dtype)

    return per_sequence(run, cu_seqlens, q, k, v)


@torch.no_grad()
def update_centroids(
    centroids: torch.Tensor, q: torch.Tensor, k: torch.Tensor, decay: float = 0.999
) -> torch.Tensor:
    """One exponential-moving-average k-means step (the paper's update): each centroid moves toward
    the mean of the unit-normalised queries and keys assigned to it,
    ``mu_m <- decay mu_m + (1 - decay) mean(x : c(x) = m)``; a centroid with no members stays.

    Args:
        centroids: ``[Hk, M, K]``. q: ``[B, T, H, K]``, k: ``[B, T, Hk, K]`` (as in the attention call).
        decay: in [0, 1).

    Returns:
        new centroids ``[Hk, M, K]`` (the input is not modified).
    """
    if not 0 <= decay < 1:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    val.check_tensor("q", q, 4, "[B, T, H, K]")
    val.check_tensor("k", k, 4, "[B, T, Hk, K]")
    val.check_tensor("centroids", centroids, 3, "[Hk, M, K]")
    Hk, M, K = centroids.shape
    if k.shape[2] != Hk or k.shape[3] != K or q.shape[3] != K or q.shape[2] % Hk:
        raise ValueError(
            f"q [B, T, H, K] and k [B, T, Hk, K] must match centroids [Hk={Hk}, M, K={K}], "
            f"got q {list(q.shape)}, k {list(k.shape)}"
        )
    G = q.shape[2] // Hk
    cd = torch.float64 if centroids.dtype == torch.float64 else torch.float32
    c, q, k = centroids.to(cd), q.to(cd), k.to(cd)
    xs = torch.cat(
        [q.unflatten(2, (Hk, G)).transpose(2, 3).flatten(0, 2), k.flatten(0, 1)], 0
    )  # [n, Hk, K]: every query (per head of the group) and every key, per key head
    ids = torch.cat(
        [
            assign(q, c).unflatten(2, (Hk, G)).transpose(2, 3).flatten(0, 2),
            assign(k, c).flatten(0, 1),
        ],
        0,
    )  # [n, Hk]
    onehot = F.one_hot(ids, M).to(cd)  # [n, Hk, M]
    sums = torch.einsum("nhm,nhk->hmk", onehot, F.normalize(xs, dim=-1))
    counts = onehot.sum(0).unsqueeze(-1)  # [Hk, M, 1]
    mean = sums / counts.clamp(min=1)
    new = torch.where(counts > 0, decay * c + (1 - decay) * mean, c)
    return new.to(centroids.dtype)


__all__ = ["assign", "routing_attention", "update_centroids"]
