"""Small helpers shared by the tests of ``probloss.functional`` (and a few others).

* :func:`cast` rounds float64 inputs to the dtype under test and returns the exact values
  that dtype holds, so every mpmath reference is evaluated at the input the implementation
  actually sees (input rounding is never counted as implementation error).
* :func:`as_float` rounds an mpmath reference to the output dtype, ``+-inf`` beyond its
  range, so an overflowing exact value is compared against the infinity it must give.
* :func:`assert_within` checks ``|got - expected| <= bound`` elementwise (NaN in ``got``
  fails) and reports the worst points by ``error / bound``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from mpmath import mpf

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_IDS = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
    torch.float64: "f64",
}


F32_F64 = (torch.float32, torch.float64)
# Relative bounds of values that are single closed-form evaluations (log_prob, moments).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-13}


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def signed(magnitudes: Sequence[float]) -> list[float]:
    """Each magnitude with both signs: ``[m0, -m0, m1, -m1, ...]``."""
    return [s * m for m in magnitudes for s in (1.0, -1.0)]


def relative_bound(expected: np.ndarray, rtol: float, dtype: torch.dtype) -> np.ndarray:
    """``rtol |expected|`` where ``expected`` is a normal number of ``dtype``, else ``tiny``."""
    tiny = torch.finfo(dtype).tiny
    return np.where(np.abs(expected) >= tiny, rtol * np.abs(expected), tiny)


def cast(values: Sequence[float], dtype: torch.dtype) -> list[float]:
    """``values`` rounded to ``dtype`` (round to nearest), as exact Python floats."""
    t = torch.tensor(list(values), dtype=torch.float64).to(dtype)
    return t.to(torch.float64).tolist()


def as_float(v: mpf, dtype: torch.dtype) -> float | None:
    """``v`` rounded to ``dtype`` (inf beyond its range), as a Python float; ``None`` in the
    band just above ``finfo.max`` where the rounding may go either way."""
    limit = torch.finfo(dtype).max
    if abs(v) > limit:
        return math.copysign(math.inf, v) if abs(v) > limit * (1 + torch.finfo(dtype).eps) else None
    return float(v)


def assert_within(
    got: Sequence[float] | np.ndarray,
    expected: Sequence[float] | np.ndarray,
    bound: Sequence[float] | np.ndarray,
    labels: Sequence[object],
    what: str,
) -> float:
    """Assert ``|got - expected| <= bound`` at every point; return the worst ``error/bound``.

    ``got`` must be finite wherever ``expected`` is (a NaN or a spurious inf fails).
    """
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), got.shape)
    with np.errstate(all="ignore"):
        err = np.abs(got - expected)
        err = np.where(got == expected, 0.0, err)  # equal infinities
        err = np.where(np.isnan(err), np.inf, err)
        ratio = np.where(err == 0.0, 0.0, err / bound)
    bad = np.flatnonzero(~(ratio <= 1.0))
    if bad.size:
        order = bad[np.argsort(-ratio[bad])]
        lines = [f"{what}: {bad.size} of {got.size} points outside the bound; worst first:"]
        for i in order[:8]:
            lines.append(
                f"  {labels[i]}: got={got[i]!r} expected={expected[i]!r} "
                f"err={err[i]:.3g} bound={bound[i]:.3g}"
            )
        raise AssertionError("\n".join(lines))
    return float(ratio.max()) if ratio.size else 0.0
