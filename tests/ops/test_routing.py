"""Routing attention specifics beyond the generated matrix: what the clusters mean (one cluster is
causal attention; queries never see another cluster's keys), grouped heads, the centroid update,
bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from subquad.ops import attention, routing_attention
from subquad.ops.routing import assign, update_centroids
from subquad.testing import assert_close

F64 = torch.float64


def _inputs(B=2, T=40, H=4, Hk=2, K=8, V=6, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=F64)
    k = torch.randn(B, T, Hk, K, generator=g, dtype=F64)
    v = torch.randn(B, T, Hk, V, generator=g, dtype=F64)
    mu = torch.randn(Hk, M, K, generator=g, dtype=F64)
    return q, k, v, mu


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_one_cluster_is_causal_attention(mode):
    q, k, v, mu = _inputs(M=1)
    assert_close(routing_attention(q, k, v, mu, mode=mode), attention(q, k, v), F64, name="M=1")


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_a_query_sees_only_its_clusters_keys_and_itself(mode):
    q, k, v, mu = _inputs(H=2, Hk=2)
    o = routing_attention(q, k, v, mu, mode=mode, chunk_size=5)
    cq, ck = assign(q, mu), assign(k, mu)
    b, t, h = 1, 31, 0
    keep = [s for s in range(t + 1) if ck[b, s, h] == cq[b, t, h] or s == t]
    p = torch.softmax(k[b, keep, h] @ q[b, t, h] * 8**-0.5, 0)
    assert_close(o[b, t, h], p @ v[b, keep, h], F64, name="one query by hand")


def test_grouped_heads_equal_repeated_key_heads():
    q, k, v, mu = _inputs(H=4, Hk=2)
    o = routing_attention(q, k, v, mu, chunk_size=6)
    kr, vr = k.repeat_interleave(2, 2), v.repeat_interleave(2, 2)
    rep = routing_attention(q, kr, vr, mu.repeat_interleave(2, 0))
    assert_close(o, rep, F64, name="GQA")


def test_no_gradient_reaches_the_centroids():
    q, k, v, mu = _inputs()
    mu.requires_grad_(True)
    o = routing_attention(q.requires_grad_(True), k, v, mu)
    (gq, gmu) = torch.autograd.grad(o.sum(), (q, mu), allow_unused=True)
    assert gq is not None and gmu is None


def test_update_centroids_moves_each_toward_its_members():
    q, k, _, mu = _inputs(H=2, Hk=2, M=2)
    new = update_centroids(mu, q, k, decay=0.0)  # decay 0: the mean of the members itself
    h, m = 1, 0
    members = torch.cat([q[:, :, h][assign(q, mu)[:, :, h] == m], k[:, :, h][assign(k, mu)[:, :, h] == m]])
    assert_close(new[h, m], F.normalize(members, dim=-1).mean(0), F64, name="centroid")
    e1 = F.one_hot(torch.tensor(0), 8).to(F64)
    two = torch.stack([e1, -e1])[None]  # [1, 2, 8]; every token below is e1: cluster 1 stays empty
    x = e1.expand(1, 3, 1, 8)
    assert_close(update_centroids(two, x, x, 0.5), two, F64, name="empty cluster stays")
    with pytest.raises(ValueError, match="decay"):
        update_centroids(mu, q, k, decay=1.0)


def test_bad_inputs():
    q, k, v, mu = _inputs()
    with pytest.raises(ValueError, match="centroids must have shape"):
        routing_attention(q, k, v, mu[:1])
    with pytest.raises(ValueError, match="centroids"):
        routing_attention(q, k, v, mu[..., :4])
    with pytest.raises(ValueError, match="Hk dividing H"):
        routing_attention(q[:, :, :3], k, v, mu)
    with pytest.raises(ValueError, match="mode"):
        routing_attention(q, k, v, mu, mode="recurrent")
