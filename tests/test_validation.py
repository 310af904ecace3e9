"""Argument checks: clear messages naming argument and shape; value checks are opt-out."""

from __future__ import annotations

import pytest
import torch

from probloss._dtype import as_loss_tensors, loss_dtype
from probloss._validation import (
    broadcast_shapes,
    check_in_interval,
    check_not_nan,
    should_validate,
)


def test_should_validate_defaults_to_cpu_only():
    cpu = torch.zeros(2)
    meta = torch.zeros(2, device="meta")  # stands in for an accelerator tensor
    assert should_validate(None, cpu)
    assert not should_validate(None, cpu, meta)
    assert should_validate(True, meta)
    assert not should_validate(False, cpu)


def test_broadcast_shapes_names_every_argument():
    with pytest.raises(ValueError, match=r"value \(3,\), logits \(4,\)"):
        broadcast_shapes(value=torch.zeros(3), logits=torch.zeros(4))
    assert broadcast_shapes(a=torch.zeros(2, 1), b=torch.zeros(3)) == (2, 3)


def test_check_in_interval_messages():
    with pytest.raises(ValueError, match=r"value of shape \(3,\) must lie in \[0.0, 1.0\]"):
        check_in_interval(torch.tensor([0.5, 1.5, -0.1]), "value", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x of shape \(2,\) contains 1 NaN"):
        check_in_interval(torch.tensor([0.5, float("nan")]), "x", 0.0, 1.0)
    check_in_interval(torch.tensor([0.5, float("nan")]), "x", 0.0, 1.0, allow_nan=True)
    check_in_interval(torch.tensor([0.0, 1.0]), "x", 0.0, 1.0)
    with pytest.raises(ValueError, match="contains 2 NaN"):
        check_not_nan(torch.tensor([float("nan")] * 2), "y")


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


def test_integer_tensors_are_rejected_by_name():
    with pytest.raises(TypeError, match="logits must be a real floating-point tensor"):
        as_loss_tensors(logits=torch.zeros(2, dtype=torch.int64))
