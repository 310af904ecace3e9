"""Dtype policy shared by the special functions.

Special functions return their input dtype. float16 and bfloat16 inputs are evaluated in
float32 and rounded once at the end: every intermediate (``exp(12)`` overflows float16) then
stays in range, and the result is within about one ulp of the half-precision dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def as_float_tensor(x: Tensor | float, name: str) -> Tensor:
    """Return ``x`` as a floating tensor; Python numbers get the default dtype.

    Raises:
        TypeError: if ``x`` is an integer, boolean or complex tensor.
    """
    if not isinstance(x, Tensor):
        return torch.as_tensor(x, dtype=torch.get_default_dtype())
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a special function is evaluated in: float32 for half dtypes, else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def upcast(x: Tensor) -> Tensor:
    """``x`` in its compute dtype (a no-op for float32 and float64)."""
    return x.to(compute_dtype(x.dtype))
