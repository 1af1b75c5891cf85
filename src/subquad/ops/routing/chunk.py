"""Routing attention, batched: the queries and keys of one cluster gathered together.

Shape legend: B batch, T time, H query heads, Hk key/value heads, G = H / Hk, K key dim, V value
dim, M clusters, R = B * Hk rows, Lq / Lk a cluster's largest query / key count over the rows, C
queries per piece.

1. Assign every query (per query head) and every key (per key head) to its nearest centroid.
2. Per cluster m (a Python loop over M): a stable sort of the membership flags lists each row's
   members in position order; the cluster's keys ``[R, Lk, K]`` and queries ``[R, Lq, K]`` are
   gathered (padded to the longest row, padding masked).
3. Pieces of C of the cluster's queries score against the cluster's keys up to the piece's last
   position (keys are in position order, so that is a prefix), causally masked, plus one extra
   column for the query's own key when that key lives in another cluster; one softmax; each piece
   runs under activation checkpointing, so the backward recomputes its scores.
4. The outputs go back to their positions with one scatter (every query is in exactly one cluster).

Cost: sum over clusters of Lq * Lk / 2 score pairs, about T^2 G / (2 M) per key head when the
clusters are balanced, T^2 G / 2 (dense) when everything falls in one cluster.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from subquad.ops._common.chunking import records_grad, state_dtype
from subquad.ops.routing.reference import assign


def _members(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """flags ``[R, n]`` -> (indices ``[R, L]`` in ascending order, valid ``[R, L]``, L = max count)."""
    L = int(flags.sum(-1).max())
    order = flags.to(torch.int8).sort(dim=-1, descending=True, stable=True).indices[:, :L]
    return order, flags.gather(-1, order), L


def _piece(qc, kc, vc, k_self, v_self, qpos, kpos, qvalid, kvalid, self_out, scale):
    """qc ``[R, C, K]`` at positions qpos ``[R, C]``; kc/vc ``[R, L, D]`` at kpos ``[R, L]``;
    k_self/v_self ``[R, C, D]``: the query's own key/value; self_out ``[R, C]``: that key is not among
    the cluster's keys. Returns ``[R, C, V]``."""
    s = torch.einsum("rck,rlk->rcl", qc, kc) * scale
    seen = kvalid.unsqueeze(1) & (kpos.unsqueeze(1) <= qpos.unsqueeze(2))  # [R, C, L]
    s = s.masked_fill(~seen, float("-inf"))
    s_self = (qc * k_self).sum(-1, keepdim=True) * scale  # [R, C, 1]
    s_self = s_self.masked_fill(~(self_out & qvalid).unsqueeze(-1), float("-inf"))
    p = torch.softmax(torch.cat([s, s_self], -1), -1).nan_to_num(0.0)  # padded queries: all -inf
    return torch.einsum("rcl,rlv->rcv", p[..., :-1], vc) + p[..., -1:] * v_self


def chunk_routing(q, k, v, centroids, scale, chunk):
    cd = state_dtype(q.dtype)
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    B, T, H, K = q.shape
    Hk, Vd = k.shape[2], v.shape[-1]
    G, R, M = H // Hk, B * Hk, centroids.shape[1]
    # 1. clusters; rows are (batch, key head), a row's queries are its G heads' T positions
    cq = assign(q, centroids).view(B, T, Hk, G).permute(0, 2, 3, 1).reshape(R, G * T)
    ck = assign(k, centroids).permute(0, 2, 1).reshape(R, T)
    qr = q.view(B, T, Hk, G, K).permute(0, 2, 3, 1, 4).reshape(R, G * T, K)
    kr = k.permute(0, 2, 1, 3).reshape(R, T, K)
    vr = v.permute(0, 2, 1, 3).reshape(R, T, Vd)
    qpos_all = torch.arange(G * T, device=q.device) % T
    grad = records_grad(q, k, v)
    outs, where = [], []
    for m in range(M):
        # 2. the cluster's members, in position order
        qidx, qvalid, Lq = _members(cq == m)
        if Lq == 0:
            continue
        kidx, kvalid, Lk = _members(ck == m)
        kpos = kidx
        kc = kr.gather(1, kidx.unsqueeze(-1).expand(-1, -1, K))
        vc = vr.gather(1, kidx.unsqueeze(-1).expand(-1, -1, Vd))
        # 3. pieces of C queries against the prefix of keys they can see
        for a in range(0, Lq, chunk):
            qi = qidx[:, a : a + chunk]
            qv = qvalid[:, a : a + chunk]
            qpos = qpos_all[qi]
            last = int(qpos.masked_fill(~qv, -1).max())
            n = int(((kpos <= last) & kvalid).sum(-1).max()) if Lk else 0
            args = (
                qr.gather(1, qi.unsqueeze(-1).expand(-1, -1, K)),
                kc[:, :n],
                vc[:, :n],
                kr.gather(1, qpos.unsqueeze(-1).expand(-1, -1, K)),
                vr.gather(1, qpos.unsqueeze(-1).expand(-1, -1, Vd)),
                qpos,
                kpos[:, :n],
                qv,
                kvalid[:, :n],
                ck.gather(1, qpos) != m,
                scale,
            )
            outs.append(checkpoint(_piece, *args, use_reentrant=False) if grad else _piece(*args))
            # padded slots write to a spare column G * T that is dropped below
            where.append(qi.masked_fill(~qv, G * T))
    # 4. back to positions
    o = q.new_zeros(R, G * T + 1, Vd).scatter(
        1, torch.cat(where, 1).unsqueeze(-1).expand(-1, -1, Vd), torch.cat(outs, 1)
    )
    return o[:, : G * T].view(B, Hk, G, T, Vd).permute(0, 3, 1, 2, 4).reshape(B, T, H, Vd)
