"""Tests of ``probloss._core.dtype``: the half-precision policy.

Rules under test (exact, no tolerance): losses of float16 / bfloat16 inputs are computed and
returned in float32, float32 / float64 stay, mixed inputs follow torch promotion first;
functions returning their input dtype keep half precision; Python numbers take the tensors'
dtype (the float64 value of 0.1, not its float32 rounding).
"""

from __future__ import annotations

import pytest
import torch

from probloss._core.dtype import (
    as_float_tensor,
    as_loss_tensors,
    compute_dtype,
    is_half,
    loss_dtype,
    loss_tensors,
    promote_float_tensors,
    promoted_dtype,
    upcast,
)


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_compute_dtype_and_upcast(dtype, compute):
    assert is_half(dtype) == (dtype in (torch.float16, torch.bfloat16))
    assert compute_dtype(dtype) == compute
    x = torch.tensor([1.5, -2.25], dtype=dtype)  # exact in every dtype
    up = upcast(x)
    assert up.dtype == compute and up.tolist() == [1.5, -2.25]
    if not is_half(dtype):
        assert up is x  # a no-op, no copy


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ((torch.float16,), torch.float32),
        ((torch.bfloat16, torch.float16), torch.float32),
        ((torch.float32,), torch.float32),
        ((torch.float16, torch.float64), torch.float64),
    ],
)
def test_loss_dtype_policy(dtypes, expected):
    tensors = [torch.zeros(1, dtype=d) for d in dtypes]
    assert loss_dtype(*tensors) == expected
    assert all(
        t.dtype == expected for t in as_loss_tensors(**{f"t{i}": t for i, t in enumerate(tensors)})
    )


def test_promoted_dtype_keeps_half():
    half = torch.zeros(1, dtype=torch.float16)
    assert promoted_dtype(half) == torch.float16
    assert promoted_dtype(half, torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    assert promoted_dtype(half, torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_integer_tensors_are_rejected_by_name():
    with pytest.raises(TypeError, match="logits must be a real floating-point tensor"):
        as_loss_tensors(logits=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x must be a real floating-point tensor, got dtype"):
        as_float_tensor(torch.zeros(2, dtype=torch.bool), "x")
    assert as_float_tensor(0.5, "x").dtype == torch.get_default_dtype()


def test_loss_tensors_convert_numbers_to_the_tensors_dtype():
    """loss_tensors' documented rules: tensors decide the dtype (half -> float32), Python
    numbers are converted straight to it (the float64 value of 0.1, not its float32
    rounding), None is dropped, and with no tensor the default dtype is used;
    promote_float_tensors keeps half precision."""
    out = loss_tensors(x=torch.zeros(2, dtype=torch.float64), c=0.1, skip=None)
    assert set(out) == {"x", "c"} and out["c"].dtype == torch.float64 and out["c"].item() == 0.1
    half = loss_tensors(x=torch.zeros(2, dtype=torch.bfloat16), c=0.1)
    assert half["x"].dtype == half["c"].dtype == torch.float32
    assert loss_tensors(c=0.5)["c"].dtype == torch.get_default_dtype()
    a, b = promote_float_tensors(
        a=torch.zeros(1, dtype=torch.float16), b=torch.zeros(1, dtype=torch.float16)
    )
    assert a.dtype == b.dtype == torch.float16
    a, b = promote_float_tensors(a=torch.zeros(1, dtype=torch.float16), b=torch.zeros(1))
    assert a.dtype == b.dtype == torch.float32
