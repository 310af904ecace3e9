"""The dtype policy: which dtype a computation runs in and which it returns.

* Log densities, divergences and losses (like torch autocast for losses): float16 and
  bfloat16 inputs are computed and returned in float32 (a KL of ``5e12`` is a fine float32
  and an overflow in float16). float32 and float64 stay as they are; mixed inputs follow
  torch type promotion first (:func:`loss_dtype`, :func:`loss_tensors`).
* Special functions, CDFs, samples and distribution parameters return their input dtype;
  half inputs are evaluated in float32 and rounded once at the end, so that every
  intermediate (``exp(12)`` overflows float16) stays in range and the result is within
  about one ulp of the half-precision dtype (:func:`compute_dtype`, :func:`upcast`,
  :func:`promote_float_tensors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (computed in float32)."""
    return dtype in HALF_DTYPES


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a computation on ``dtype`` runs in: float32 for half dtypes, else ``dtype``."""
    return torch.float32 if is_half(dtype) else dtype


def upcast(x: Tensor) -> Tensor:
    """``x`` in its compute dtype (a no-op for float32 and float64)."""
    return x.to(compute_dtype(x.dtype))


def promoted_dtype(*tensors: Tensor) -> torch.dtype:
    """torch's type promotion of the tensors' dtypes (half stays half)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def as_float_tensor(x: Tensor | float, name: str) -> Tensor:
    """Return ``x`` as a floating tensor; Python numbers get the default dtype.

    Raises:
        TypeError: if ``x`` is an integer, boolean or complex tensor (naming ``name``).
    """
    if not isinstance(x, Tensor):
        return torch.as_tensor(x, dtype=torch.get_default_dtype())
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")
    return x


def loss_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype a log density or loss of these tensors is computed and returned in."""
    return compute_dtype(promoted_dtype(*tensors))


def loss_tensors(**named: Tensor | float | None) -> dict[str, Tensor]:
    """The given (not None) inputs as tensors of their common loss dtype and device.

    Tensors decide the dtype (:func:`loss_dtype`); Python numbers are then converted
    straight to it, so that a float64 computation sees the float64 value of ``0.1`` rather
    than its float32 rounding. With no tensor at all, the default dtype is used.

    Raises:
        TypeError: if a tensor is not floating point (naming it).
    """
    given = {name: v for name, v in named.items() if v is not None}
    tensors = {name: as_float_tensor(v, name) for name, v in given.items() if isinstance(v, Tensor)}
    if tensors:
        dtype = loss_dtype(*tensors.values())
        device = next(iter(tensors.values())).device
    else:
        dtype, device = compute_dtype(torch.get_default_dtype()), None
    return {
        name: tensors[name].to(dtype)
        if name in tensors
        else torch.as_tensor(v, dtype=dtype, device=device)
        for name, v in given.items()
    }


def as_loss_tensors(**named: Tensor | float) -> list[Tensor]:
    """:func:`loss_tensors` as a list, in argument order (every argument given)."""
    return list(loss_tensors(**named).values())


def promote_float_tensors(**named: Tensor | float) -> list[Tensor]:
    """Named inputs as floating tensors of their promoted dtype, half staying half.

    For functions that return their input dtype (CDFs, samples, distribution parameters),
    unlike :func:`loss_tensors`, which moves half precision to float32.
    """
    converted = [as_float_tensor(t, name) for name, t in named.items()]
    dtype = promoted_dtype(*converted)
    return [t.to(dtype) for t in converted]
