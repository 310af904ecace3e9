"""Tests of ``probloss._core.params`` (``log_scale_from``) and ``check_positive``
(``probloss._core.validation``).

Numbers: expected log-scales are ``math.log`` / exact halving in float64 (``math.log`` is
within 1 ulp; the results are compared to 2 ulp, ``rtol=4.5e-16``), derivatives the closed
forms ``d log(s)/ds = 1/s``, ``d log(v)/2 / dv = 1/(2v)``, ``d (lv/2) / dlv = 1/2``.
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss._core.params import log_scale_from
from probloss._core.validation import check_positive

SCALES = [1e-300, 1e-30, 0.5, 1.0, 2.0, 3.7, 1e30, 1e300]
ULP2 = 2 * torch.finfo(torch.float64).eps


def _close(got: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        got, torch.tensor(expected, dtype=torch.float64), rtol=ULP2, atol=0.0
    )


def test_each_form():
    s = torch.tensor(SCALES, dtype=torch.float64)
    log_s = [math.log(v) for v in SCALES]
    _close(log_scale_from(scale=s), log_s)
    ls = torch.tensor(log_s, dtype=torch.float64)
    assert torch.equal(log_scale_from(log_scale=ls), ls)
    assert torch.equal(log_scale_from(log_var=2 * ls), ls)  # halving is exact
    var = torch.tensor([1e-300, 0.25, 1.0, 4.0, 1e300], dtype=torch.float64)
    _close(log_scale_from(var=var), [0.5 * math.log(v) for v in var.tolist()])


def test_gradients():
    for form, value, expected in (
        ("scale", 4.0, 1 / 4.0),
        ("var", 4.0, 1 / 8.0),
        ("log_var", 3.0, 0.5),
        ("log_scale", -3.0, 1.0),
    ):
        p = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(log_scale_from(**{form: p}), p)
        assert g.item() == expected, form


@pytest.mark.parametrize(
    "forms",
    [(), ("scale", "log_scale"), ("var", "log_var"), ("scale", "log_scale", "var", "log_var")],
    ids=str,
)
def test_exactly_one_form(forms):
    got = ", ".join(forms) or "none"
    kwargs = {name: torch.ones(2) for name in forms}
    with pytest.raises(
        ValueError, match=f"pass exactly one of scale, log_scale, var, log_var; got {got}$"
    ):
        log_scale_from(**kwargs)


@pytest.mark.parametrize("form", ["scale", "var"])
@pytest.mark.parametrize("bad", [0.0, -2.5, math.nan, -math.inf])
def test_positivity_check_names_argument_and_shape(form, bad):
    value = torch.tensor([[1.0, 2.0], [bad, 3.0]])
    pattern = rf"{form} of shape \(2, 2\) must be positive; got 1 value\(s\) <= 0 or NaN"
    with pytest.raises(ValueError, match=pattern):
        log_scale_from(**{form: value})
    with pytest.raises(ValueError, match=pattern):
        log_scale_from(**{form: value}, validate_args=True)


def test_log_forms_are_never_checked():
    """Any real log_scale / log_var is valid (negative, huge): no error, no host sync needed."""
    v = torch.tensor([-1e4, -1.0, 0.0, 50.0])
    assert torch.equal(log_scale_from(log_scale=v, validate_args=True), v)
    assert torch.equal(log_scale_from(log_var=v, validate_args=True), v / 2)


def test_validate_args_false_skips_the_check():
    """validate_args=False: no error (and no host sync); the invalid elements come out as
    log of a non-positive number (NaN or -inf), the valid ones unchanged."""
    s = torch.tensor([-1.0, 0.0, 4.0])
    out = log_scale_from(scale=s, validate_args=False)
    assert torch.isnan(out[0]) and out[1] == -math.inf and out[2] == math.log(4.0)
    out = log_scale_from(var=s, validate_args=False)
    assert torch.isnan(out[0]) and out[1] == -math.inf


def test_default_skips_the_check_off_cpu():
    """validate_args=None checks CPU tensors only: a meta tensor (standing in for an
    accelerator) is not read, so a bad value cannot be seen and nothing syncs."""
    meta = torch.full((3,), -1.0, device="meta")
    out = log_scale_from(scale=meta)
    assert out.device.type == "meta" and out.shape == (3,)


def test_numbers_and_dtypes():
    out = log_scale_from(scale=2.0)
    assert out.dtype == torch.get_default_dtype() and out.item() == pytest.approx(math.log(2))
    assert log_scale_from(var=torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(TypeError, match="scale must be a real floating-point tensor"):
        log_scale_from(scale=torch.tensor([1, 2]))


def test_check_positive_directly():
    check_positive(torch.tensor([1e-45, 3.0]), "x")  # smallest float32 subnormal is > 0
    check_positive(torch.zeros(0), "x")  # empty: nothing to reject
    with pytest.raises(ValueError, match=r"df of shape \(3,\) .* got 2 value\(s\) .* -4"):
        check_positive(torch.tensor([-4.0, 1.0, 0.0]), "df")
