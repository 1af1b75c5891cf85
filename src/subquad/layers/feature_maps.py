"""Feature maps phi for linear attention: ``softmax(q . k)`` is approximated by ``phi(q) . phi(k)``.

Shape legend: B batch, T time, H heads, K head dim in, F feature dim out.

Each map takes ``[B, T, H, K]`` and returns ``[B, T, H, F]``; ``feature_dim(K)`` says F and
``positive`` whether every kernel value ``phi(q) . phi(k)`` is >= 0 (required by the normalized form
``o / (q . sum k)``): elementwise >= 0 features, or Taylor's ``1 + s + s^2 / 2`` whose features are not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FeatureMap(nn.Module):
    """Base class: ``forward(x [B, T, H, K]) -> [B, T, H, F]``."""

    positive = True

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim

    def feature_dim(self) -> int:
        return self.head_dim


class Identity(FeatureMap):
    """phi(x) = x (no normalizer: features may be negative)."""

    positive = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class EluPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, https://arxiv.org/abs/2006.16236)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class ReLU(FeatureMap):
    """phi(x) = relu(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class Cosine(FeatureMap):
    """phi(x) = x / |x| (cosine similarity attention, as in cosFormer/TransNormer's normalised qk)."""

    positive = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class Taylor(FeatureMap):
    """Based's 2nd-order Taylor map (Arora et al. 2024, https://arxiv.org/abs/2402.18668):
    ``phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2`` with ``phi(x) = [1, x, vec(x x^T) / sqrt(2)]`` over
    ``x / K^(1/4)`` so the dot product is ``q . k / sqrt(K)``; F = 1 + K + K^2 (Based projects to a small
    K such as 16 first)."""

    def feature_dim(self) -> int:
        return 1 + self.head_dim + self.head_dim**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.head_dim**0.25
        outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2)  # [B, T, H, K*K]
        return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


class Performer(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021, https://arxiv.org/abs/2009.14794):
    ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with orthogonal Gaussian rows W, over ``x / K^(1/4)``,
    so that ``E[phi(q) . phi(k)] = exp(q . k / sqrt(K))``. W is redrawn every ``redraw_interval``
    training forward calls (0: never); evaluation never redraws, so decoding is deterministic."""

    def __init__(self, head_dim: int, num_features: int | None = None, redraw_interval: int = 1000) -> None:
        super().__init__(head_dim)
        self.num_features = num_features or head_dim
        self.redraw_interval = redraw_interval
        self.register_buffer("projection", self._draw(), persistent=True)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=True)

    def feature_dim(self) -> int:
        return self.num_features

    def _draw(self) -> torch.Tensor:
        blocks, K = [], self.head_dim
        for _ in range(math.ceil(self.num_features / K)):
            q, _ = torch.linalg.qr(torch.randn(K, K))
            blocks.append(q.T)
        w = torch.cat(blocks)[: self.num_features]  # [m, K], orthogonal rows in each block
        norms = torch.randn(self.num_features, K).norm(dim=-1, keepdim=True)
        return w * norms

    @torch.no_grad()
    def redraw(self) -> None:
        self.projection.copy_(self._draw().to(self.projection))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.redraw_interval:
            if int(self.calls) and int(self.calls) % self.redraw_interval == 0:
                self.redraw()
            self.calls += 1
        x = x / self.head_dim**0.25
        proj = x @ self.projection.to(x.dtype).T  # [B, T, H, m]
        sq = x.pow(2).sum(-1, keepdim=True) / 2
        # no overflow: w . x - |x|^2 / 2 <= |w|^2 / 2 for every x, so the features are bounded
        return torch.exp(proj - sq) / math.sqrt(self.num_features)


class Hedgehog(FeatureMap):
    """Hedgehog's learnable map (Zhang et al. 2024, https://arxiv.org/abs/2402.04347):
    ``phi(x) = [softmax(W x), softmax(-W x)]`` with a trainable per-head ``W`` initialised to identity;
    F = 2 K."""

    def __init__(self, head_dim: int, num_heads: int) -> None:
        super().__init__(head_dim)
        self.weight = nn.Parameter(torch.eye(head_dim).repeat(num_heads, 1, 1))  # [H, K, K]

    def feature_dim(self) -> int:
        return 2 * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bthk,hkf->bthf", x, self.weight.to(x.dtype))
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


FEATURE_MAPS = ("identity", "elu", "relu", "cosine", "taylor", "performer", "hedgehog")


def make_feature_map(name: str, head_dim: int, num_heads: int) -> FeatureMap:
    """The feature map called ``name`` (one of ``FEATURE_MAPS``)."""
    if name == "identity":
        return Identity(head_dim)
    if name == "elu":
        return EluPlusOne(head_dim)
    if name == "relu":
        return ReLU(head_dim)
    if name == "cosine":
        return Cosine(head_dim)
    if name == "taylor":
        return Taylor(head_dim)
    if name == "performer":
        return Performer(head_dim)
    if name == "hedgehog":
        return Hedgehog(head_dim, num_heads)
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {name!r}")
