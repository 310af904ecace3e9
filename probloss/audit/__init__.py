"""Stability audit of any loss function, and a NaN guard for training loops.

* :func:`audit` / :func:`assert_stable` (and ``probloss audit FILE.py:FUNCTION``): run a
  function and its gradient over hard inputs in float16, bfloat16, float32 and float64 and
  report where the value or a gradient is non-finite or wrong against float64.
* :class:`NaNGuard`: catch the first non-finite loss, activation or gradient in a training
  loop and report which loss term, which batch rows, which module, forward or backward.
"""

from .domains import AuditUsageError, Domain
from .guard import NaNGuard, NonFiniteError, NonFiniteReport, NonFiniteWarning
from .report import AuditReport
from .runner import assert_stable, audit

__all__ = [
    "AuditReport",
    "AuditUsageError",
    "Domain",
    "NaNGuard",
    "NonFiniteError",
    "NonFiniteReport",
    "NonFiniteWarning",
    "assert_stable",
    "audit",
]
