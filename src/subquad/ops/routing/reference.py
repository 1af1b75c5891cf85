"""Routing attention, the specification: one query position at a time.

Shape legend: B batch, T time, H query heads, Hk key/value heads (dividing H), G = H / Hk,
K key dim, V value dim, M clusters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subquad.ops._common.chunking import state_dtype


@torch.no_grad()
def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid by cosine similarity: x ``[B, T, Hx, K]`` with Hx a multiple of Hk, centroids
    ``[Hk, M, K]`` (head h of x uses centroids[h // (Hx / Hk)]) -> cluster ids ``[B, T, Hx]`` (ties:
    the lower id)."""
    B, T, Hx, K = x.shape
    Hk = centroids.shape[0]
    xn = F.normalize(x.view(B, T, Hk, Hx // Hk, K), dim=-1)
    mn = F.normalize(centroids.to(x.dtype), dim=-1)
    return torch.einsum("bthgk,hmk->bthgm", xn, mn).argmax(-1).reshape(B, T, Hx)


def reference_routing(q, k, v, centroids, scale):
    """For each query position t (all batches and heads at once): scores against keys 0..t, kept
    where the key's cluster is the query's cluster or the key is t itself, softmax, weighted values."""
    cd = state_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    T, H = q.shape[1], q.shape[2]
    Hk = k.shape[2]
    G = H // Hk
    cq = assign(q, centroids)  # [B, T, H]
    ck = assign(k, centroids).repeat_interleave(G, dim=2)  # [B, T, H]: each query head's key clusters
    k = k.repeat_interleave(G, dim=2)
    v = v.repeat_interleave(G, dim=2)
    out = []
    for t in range(T):
        s = torch.einsum("bhk,bshk->bhs", q[:, t], k[:, : t + 1]) * scale  # [B, H, t+1]
        keep = ck[:, : t + 1].transpose(1, 2) == cq[:, t].unsqueeze(-1)  # [B, H, t+1]
        keep[..., t] = True  # a query always sees its own key: never a softmax over nothing
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1)
        out.append(torch.einsum("bhs,bshv->bhv", p, v[:, : t + 1]))
    return torch.stack(out, 1)
