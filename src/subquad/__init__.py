"""subquad: sub-quadratic token mixers for PyTorch, CPU first, with exact references."""

from subquad import ops
from subquad.ops._common.validation import check_finite, set_check_finite

__version__ = "0.1.0"

__all__ = ["__version__", "check_finite", "ops", "set_check_finite"]
