"""Code written once for every op: validation, packed sequences, chunking helpers."""

from subquad.ops._common.validation import check_finite, check_finite_enabled, set_check_finite

__all__ = ["check_finite", "check_finite_enabled", "set_check_finite"]
