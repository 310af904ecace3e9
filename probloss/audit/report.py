"""The audit report: failures grouped by kind and dtype, as a table and as JSON.

Failure kinds, in the order the table lists them:

* ``exception``: the function raised on the grid of a dtype (message kept; nothing else
  is judged for that dtype);
* ``nonfinite_value``: the value is NaN, or infinite where the reference is finite and
  within the output dtype's range;
* ``nonfinite_grad``: the same for the gradient with respect to any argument;
* ``value_error``: ``|value - reference|`` above the tolerance;
* ``grad_error``: a gradient's error above its tolerance.

The JSON form (:meth:`AuditReport.to_dict`) has the keys ``ok``, ``function``,
``reference``, ``arguments``, ``domains``, ``dtypes``, ``output_dtypes``, ``points``,
``unjudged`` (per dtype, ``{"value": n, "grad": m}``), ``tolerance`` and ``failures``
(each with ``kind``, ``dtype``, ``count``, ``by_argument``, ``message`` and ``example``:
``inputs``, ``argument``, ``got``, ``expected``, ``error``, ``tolerance``). It is strict
JSON: non-finite numbers are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch

from .domains import DTYPES

FAILURE_KINDS = ("exception", "nonfinite_value", "nonfinite_grad", "value_error", "grad_error")
_HEADERS = {
    "exception": "raised",
    "nonfinite_value": "bad value",
    "nonfinite_grad": "bad grad",
    "value_error": "value err",
    "grad_error": "grad err",
}


def format_number(x: float, dtype: str = "float64") -> str:
    """``x`` (a number of ``dtype``) with the fewest digits that round back to it in ``dtype``.

    Example:
        >>> format_number(0.9999999403953552, "float32"), format_number(0.1, "float64")
        ('0.99999994', '0.1')
    """
    if not math.isfinite(x):
        return str(x)
    target = torch.tensor(x, dtype=torch.float64).to(DTYPES[dtype])
    for digits in range(1, 18):
        text = f"{x:.{digits}g}"
        if torch.tensor(float(text), dtype=torch.float64).to(DTYPES[dtype]) == target:
            return text
    return repr(x)


def _json_number(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


@dataclass(frozen=True)
class Example:
    """One failing point: the inputs the function saw (in its dtype, as floats) and numbers.

    ``argument`` names the gradient's argument (gradient kinds), ``got`` / ``expected`` are
    the value or gradient and the reference's, ``error`` and ``tolerance`` the absolute
    error and its bound (``None`` for non-finite kinds).
    """

    inputs: dict[str, float]
    got: float
    expected: float
    argument: str | None = None
    error: float | None = None
    tolerance: float | None = None

    def to_dict(self) -> dict:
        return {
            "inputs": {k: _json_number(v) for k, v in self.inputs.items()},
            "argument": self.argument,
            "got": _json_number(self.got),
            "expected": _json_number(self.expected),
            "error": _json_number(self.error),
            "tolerance": _json_number(self.tolerance),
        }


@dataclass(frozen=True)
class Failure:
    """All points of one dtype that fail in one way: their count and the worst example.

    The worst example is the one with the largest ``error / tolerance`` for the error
    kinds, and for the non-finite kinds the first point in grid order (fewest hard
    coordinates), a NaN before an infinity. ``by_argument`` counts gradient failures per
    argument; ``message`` is the exception of the ``exception`` kind.
    """

    kind: str
    dtype: str
    count: int
    example: Example | None = None
    by_argument: dict[str, int] = field(default_factory=dict)
    message: str | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "count": self.count,
            "by_argument": dict(self.by_argument),
            "message": self.message,
            "example": None if self.example is None else self.example.to_dict(),
        }

    def describe(self) -> str:
        """One line: what failed, how often, and the worst example."""
        head = f"{self.dtype:<9} {self.kind:<16} {self.count:>6} pts"
        if self.example is None:
            return f"{head}  {self.message}"
        ex = self.example
        inputs = ", ".join(f"{k}={format_number(v, self.dtype)}" for k, v in ex.inputs.items())
        what = "value" if ex.argument is None else f"d/d{ex.argument}"
        line = f"{head}  at ({inputs}): {what} = {ex.got:.7g}, reference {ex.expected:.7g}"
        if ex.error is not None and ex.tolerance is not None:
            line += f" (error {ex.error:.3g} > tolerance {ex.tolerance:.3g})"
        return line


@dataclass
class AuditReport:
    """The outcome of :func:`~probloss.audit.runner.audit`: ``ok``, ``failures``, the table.

    ``str(report)`` is the readable table, :meth:`to_dict` / :meth:`to_json` the same as
    data. ``points`` and ``unjudged`` are per dtype: the number of points evaluated, and
    how many were not judged on error because the reference value (``"value"``) or a
    reference gradient (``"grad"``) is non-finite there.
    """

    function: str
    reference: str
    arguments: tuple[str, ...]
    domains: dict[str, str]
    dtypes: tuple[str, ...]
    output_dtypes: dict[str, str]
    points: dict[str, int]
    unjudged: dict[str, dict[str, int]]
    tolerance: dict[str, float | str]
    failures: list[Failure]

    @property
    def ok(self) -> bool:
        """True when no point failed in any way."""
        return not self.failures

    def to_dict(self) -> dict:
        """The report as plain data (the documented JSON keys)."""
        return {
            "ok": self.ok,
            "function": self.function,
            "reference": self.reference,
            "arguments": list(self.arguments),
            "domains": dict(self.domains),
            "dtypes": list(self.dtypes),
            "output_dtypes": dict(self.output_dtypes),
            "points": dict(self.points),
            "unjudged": {k: dict(v) for k, v in self.unjudged.items()},
            "tolerance": dict(self.tolerance),
            "failures": [f.to_dict() for f in self.failures],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as strict JSON."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def count(self, kind: str, dtype: str) -> int:
        """Number of failing points of ``kind`` in ``dtype`` (0 if none)."""
        return sum(f.count for f in self.failures if f.kind == kind and f.dtype == dtype)

    def __str__(self) -> str:
        signature = ", ".join(f"{a}: {self.domains[a]}" for a in self.arguments)
        lines = [
            f"probloss audit of {self.function}({signature})",
            f"reference: {self.reference}; tolerance: {self.tolerance['rule']}",
            "",
            f"{'dtype':<9} {'out':<8} {'points':>7} {'unjudged':>9} "
            + " ".join(f"{_HEADERS[k]:>10}" for k in FAILURE_KINDS),
        ]
        for d in self.dtypes:
            unjudged = self.unjudged.get(d, {})
            judged_out = f"{unjudged.get('value', 0)}/{unjudged.get('grad', 0)}"
            lines.append(
                f"{d:<9} {self.output_dtypes.get(d, '-'):<8} {self.points.get(d, 0):>7} "
                f"{judged_out:>9} " + " ".join(f"{self.count(k, d):>10}" for k in FAILURE_KINDS)
            )
        lines.append("(unjudged: points whose reference value / some gradient is not finite)")
        lines.append("")
        if self.ok:
            lines.append("OK: no non-finite value or gradient, no error above tolerance.")
            return "\n".join(lines)
        lines.append("failures (worst example of each):")
        lines += [f"  {f.describe()}" for f in self.failures]
        lines.append("")
        lines.append(f"FAILED: {len(self.failures)} failure group(s).")
        return "\n".join(lines)
