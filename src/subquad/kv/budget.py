"""How many tokens a compressed cache keeps per layer and per KV head.

A budget is either a kept fraction of the tokens seen so far (``keep``) or a fixed token
count (``tokens``). The public entry points also take the kvpress-style compression ratio
(``ratio`` = fraction removed, so ``ratio=0.75`` keeps a quarter); ``ratio=0`` compresses
nothing. Any of them may be a list with one value per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Budget:
    """Tokens kept per KV head of one layer: ``tokens`` fixed, or ``ceil(keep * seen)``."""

    keep: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.tokens is None):
            raise ValueError("Budget: give exactly one of keep (a fraction) or tokens (a count)")
        if self.keep is not None and not (0.0 < self.keep <= 1.0):
            raise ValueError(f"Budget.keep must be a kept fraction in (0, 1], got {self.keep}")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError(f"Budget.tokens must be a positive token count, got {self.tokens}")

    def target(self, seen: int) -> int:
        """Tokens to keep per head once ``seen`` tokens have been processed."""
        if self.tokens is not None:
            return self.tokens
        return max(1, math.ceil(self.keep * seen - 1e-9))

    def describe(self) -> str:
        return f"{self.tokens} tokens" if self.tokens is not None else f"keep {self.keep:g}"


def _one(value, kind: str, where: str) -> Budget | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {kind} must be a number, got {type(value).__name__}")
    if kind == "ratio":
        if not (0.0 <= value < 1.0):
            raise ValueError(f"{where}: ratio is the fraction of the cache removed, in [0, 1); got {value}")
        return None if value == 0 else Budget(keep=1.0 - float(value))
    if kind == "tokens":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: tokens must be a whole number of tokens, got {value}")
        if value < 1:
            raise ValueError(f"{where}: tokens must be a positive count, got {value}")
        return Budget(tokens=int(value))
    # budget: an int is a token count, a float a kept fraction
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{where}: an int budget is a token count and must be positive, got {value}")
        return Budget(tokens=value)
    if not (0.0 < value <= 1.0):
        raise ValueError(
            f"{where}: a float budget is the kept fraction in (0, 1], got {value}; an int is a token count"
        )
    return None if value == 1.0 else Budget(keep=float(value))


def resolve_budgets(
    num_layers: int,
    *,
    budget: float | int | Sequence | None = None,
    ratio: float | Sequence | None = None,
    tokens: int | Sequence | None = None,
) -> list[Budget | None]:
    """One ``Budget`` (or ``None`` = keep everything) per layer from exactly one of the three forms.

    Args:
        budget: kept fraction (float in (0, 1]) or kept tokens (int), or one per layer.
        ratio: fraction removed in [0, 1) (kvpress convention), or one per layer.
        tokens: kept tokens per head, or one per layer.
    """
    given = {k: v for k, v in {"budget": budget, "ratio": ratio, "tokens": tokens}.items() if v is not None}
    if len(given) > 1:
        raise ValueError(f"give one of budget, ratio or tokens, not {sorted(given)}")
    if not given:
        return [None] * num_layers
    kind, value = next(iter(given.items()))
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{kind}: a per-layer list needs {num_layers} values, got {len(value)}")
        return [_one(v, kind, f"{kind}[{i}]") for i, v in enumerate(value)]
    return [_one(value, kind, kind)] * num_layers
