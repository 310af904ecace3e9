"""Tests of ``probloss.audit.runner``: the judging rules, the tolerance, argument handling.

Where the numbers come from
---------------------------
The functions audited here have closed-form truths: ``x`` (identity), ``x * y`` (a
correctly rounded product), ``a + b + c``, ``1/x``, ``exp(x)``; the deliberately wrong
ones are wrong by a known amount (``x * (1 + 1e-3)``: relative error 1e-3, i.e. 4.5e12
float64 ``eps``; ``x * (1 + 2^-52)``: one ulp). The tolerance is ``8 eps`` (values) and
``32 eps`` (gradients) on the scale of the module docstring, so the first must fail and
the second pass in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probloss.audit.domains import KINDS, AuditUsageError, Domain
from probloss.audit.runner import (
    GRAD_FACTOR,
    VALUE_FACTOR,
    assert_stable,
    audit,
    audited_arguments,
)

SMALL = {"mixed_points": 200, "typical_points": 50}


def kinds(report) -> set[tuple[str, str]]:
    return {(f.kind, f.dtype) for f in report.failures}


def identity(x):
    return x


def off_by_1e3(x):
    return x * (1 + 1e-3)


def off_by_one_ulp(x):
    return x * (1 + 2.0**-52)


def log(x):
    return torch.log(x)


def test_factors_are_the_documented_ones():
    assert (VALUE_FACTOR, GRAD_FACTOR) == (8.0, 32.0)


def test_a_wrong_function_fails_against_a_reference_and_one_ulp_passes():
    report = audit(off_by_1e3, reference=identity, dtypes=["float64"])
    assert kinds(report) == {("value_error", "float64"), ("grad_error", "float64")}
    value = next(f for f in report.failures if f.kind == "value_error")
    x = value.example.inputs["x"]
    assert value.example.got == pytest.approx(x * 1.001, rel=1e-15)
    assert value.example.expected == x
    grad = next(f for f in report.failures if f.kind == "grad_error")
    assert grad.example.got == pytest.approx(1.001) and grad.example.expected == 1.0
    # the gradient 1.001 is wrong at every point (the tolerance is 32 eps there)
    assert grad.count == report.points["float64"]
    assert audit(off_by_one_ulp, reference=identity, dtypes=["float64"]).ok


def test_without_a_reference_float64_is_judged_on_nan_only():
    # the function is its own float64 reference: a 1e-3 error cannot be seen
    assert audit(off_by_1e3, dtypes=["float64"]).ok


def test_nan_is_always_a_failure_even_where_the_reference_is_nan():
    report = audit(log, {"x": "real"}, dtypes=["float32", "float64"], **SMALL)
    # the value is NaN below 0; the gradient 1/x is finite there
    assert kinds(report) == {("nonfinite_value", "float32"), ("nonfinite_value", "float64")}
    example = report.failures[0].example
    assert example.inputs["x"] < 0 and example.got != example.got  # NaN
    # the same function on its domain: log(0) = -inf is the exact value, unjudged
    report = audit(log, {"x": "nonnegative"}, **SMALL)
    assert report.ok and report.unjudged["float32"]["value"] >= 1


def test_overflow_beyond_the_range_is_correct_and_within_it_is_not():
    # exp(x) past log(max) is inf in every dtype: the true value is beyond the range
    assert audit(lambda x: torch.exp(x), {"x": "real[-1000,1000]"}, **SMALL).ok

    def square_over_abs(x):  # x^2 / (|x| + 1) ~ |x|: finite, but x^2 overflows first
        return x * x / (x.abs() + 1)

    report = audit(square_over_abs, dtypes=["float32"], **SMALL)
    bad = next(f for f in report.failures if f.kind == "nonfinite_value")
    assert abs(bad.example.inputs["x"]) > 1.8e19 and bad.example.got in (float("inf"), float("nan"))
    assert bad.example.expected == pytest.approx(abs(bad.example.inputs["x"]), rel=1e-6)


class _OverflowWithGradient(torch.autograd.Function):
    """Value ``x^2`` (overflows past ``sqrt(max)``); gradient ``2x``, or ``fill`` where the
    value overflowed (0 there mimics a -inf row's zero gradient; NaN is a real defect)."""

    @staticmethod
    def forward(ctx, x, fill):
        out = x * x
        ctx.save_for_backward(x, out)
        ctx.fill = fill
        return out

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        return torch.where(torch.isinf(out), ctx.fill, grad * 2 * x), None


def test_gradients_where_the_value_correctly_overflowed_are_judged_for_nan_only():
    def zero_there(x):
        return _OverflowWithGradient.apply(x, 0.0)

    def nan_there(x):
        return _OverflowWithGradient.apply(x, float("nan"))

    # float32: x = 1e36 gives x^2 = 1e72, beyond the range (inf, correct); its gradient 2e36
    # is a fine float32, but the loss is inf there: the wrong gradient 0 is not judged
    report = audit(zero_there, dtypes=["float32"], **SMALL)
    assert report.ok and report.unjudged["float32"]["grad"] >= 1
    report = audit(nan_there, dtypes=["float32"], **SMALL)
    assert ("nonfinite_grad", "float32") in kinds(report)


def test_a_pole_counts_as_unjudged_not_as_a_failure():
    report = audit(lambda x: 1 / x, **SMALL)
    assert report.ok
    for d in report.dtypes:  # 1/0 = inf and -1/0^2 = -inf in the reference too
        assert report.unjudged[d]["value"] >= 1 and report.unjudged[d]["grad"] >= 1
    assert "unjudged" in str(report)


def test_half_inputs_are_compared_in_the_output_dtype():
    def upcast_scale(x):  # float32 out for half in, like probloss's losses
        return x.float() * 1e5 if x.dtype in (torch.float16, torch.bfloat16) else x * 1e5

    report = audit(upcast_scale, {"x": "real[-1,1]"}, **SMALL)
    assert report.ok
    assert report.output_dtypes == {
        "float32": "float32",
        "float16": "float32",
        "bfloat16": "float32",
        "float64": "float64",
    }

    def half_scale(x):  # overflows float16 beyond |x| = 0.655: beyond its range, correct
        return x * 1e5

    report = audit(half_scale, {"x": "real[-1,1]"}, dtypes=["float16"], **SMALL)
    assert report.ok and report.output_dtypes["float16"] == "float16"


def test_the_condition_term_accepts_forced_cancellation_but_not_instability():
    # a + b + c loses all digits of a small sum of large terms, exactly as any summation
    # of the given inputs must: within eps (|a| + |b| + |c|)
    assert audit(lambda a, b, c: a + b + c, **SMALL).ok

    def x_via_y(x, y):  # (x + y) - y = x mathematically; it loses x against a large y
        return (x + y) - y

    report = audit(x_via_y, dtypes=["float32"], **SMALL)
    failure = next(f for f in report.failures if f.kind == "value_error")
    assert abs(failure.example.inputs["y"]) > 1e3 * abs(failure.example.inputs["x"])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind_x=st.sampled_from(KINDS), kind_y=st.sampled_from(KINDS))
def test_a_correctly_rounded_product_passes_for_any_seed(seed, kind_x, kind_y):
    # x * y is correctly rounded with exact gradients (y, x): no failure is possible
    report = audit(
        lambda x, y: x * y,
        {"x": kind_x, "y": kind_y},
        dtypes=["float32", "bfloat16"],
        seed=seed,
        max_pair_points=2000,
        **SMALL,
    )
    assert report.ok, str(report)


def test_the_naive_cb_mean_is_caught_by_the_error_check_in_float32():
    def naive(x):
        return torch.where(x.abs() < 0.1, 0.5 + x / 12, 1 / (1 - torch.exp(-x)) - 1 / x)

    # worst just above the cutoff, where 1 - exp(-x) cancels: measured 23-32 eps (value)
    # and 450-650 eps (gradient) over seeds 0-4; 16 and 200 leave room below
    eps = 2.0**-23
    report = audit(naive, {"x": "real[0.01,1]"}, dtypes=["float32"])
    assert {f.kind for f in report.failures} == {"value_error", "grad_error"}
    value = next(f for f in report.failures if f.kind == "value_error")
    assert 0.1 <= value.example.inputs["x"] < 0.2 and value.example.error > 16 * eps
    grad = next(f for f in report.failures if f.kind == "grad_error")
    assert 0.1 <= grad.example.inputs["x"] < 0.2 and grad.example.error > 200 * eps


def test_audited_arguments_and_defaults():
    def f(x, rho, scale=2.0, *args, flag=False, **kwargs):
        return x * scale

    assert list(audited_arguments(f)) == ["x", "rho"]
    chosen = audited_arguments(f, {"rho": "correlation", "scale": "positive"})
    assert chosen == {
        "x": Domain("real"),
        "rho": Domain("correlation"),
        "scale": Domain("positive"),
    }
    with pytest.raises(
        AuditUsageError, match=r"'sigma', not a parameter of .*\(x, rho, scale, flag\)"
    ):
        audited_arguments(f, {"sigma": "positive"})
    # defaults keep their value when not named: x * 2
    report = audit(lambda x, scale=2.0: x * scale, reference=lambda x: 2 * x, **SMALL)
    assert report.ok and report.arguments == ("x",)


def test_positional_only_and_keyword_only_arguments_are_passed_right():
    def f(a, /, b=3.0, *, c):
        return a - c

    report = audit(f, reference=lambda a, c: a - c, dtypes=["float64"], **SMALL)
    assert report.ok and report.arguments == ("a", "c")


def test_a_reduced_function_is_a_usage_error():
    with pytest.raises(AuditUsageError, match=r"must be elementwise \(unreduced\).*shape \(\)"):
        audit(lambda x: x.sum())
    with pytest.raises(AuditUsageError, match=r"dtype torch\.bool"):
        audit(lambda x: x > 0)


def test_exceptions_on_typical_inputs_are_usage_errors_and_on_the_grid_failures():
    def always(x):
        raise TypeError("bad call")

    with pytest.raises(AuditUsageError, match="fn raised on typical float64 inputs: TypeError"):
        audit(always)

    def refuses_huge(x):
        if bool((x.abs() > 1e30).any()):
            raise ValueError("x too large")
        return x

    report = audit(refuses_huge, dtypes=["float16", "float32"], **SMALL)
    assert kinds(report) == {("exception", "float32")}  # float16 holds no value above 1e30
    assert report.failures[0].message == "raised ValueError: x too large"
    assert "raised ValueError: x too large" in str(report)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtypes": ["float8"]}, "unknown dtype 'float8'"),
        ({"dtypes": []}, "no dtype to audit"),
        ({"domains": {"x": "reals"}}, "unknown domain kind"),
        ({"reference": lambda y: y}, r"the reference <lambda> must take .* \(x\) by name"),
    ],
)
def test_usage_errors(kwargs, message):
    with pytest.raises(AuditUsageError, match=message):
        audit(identity, **kwargs)


def test_dtypes_accept_torch_dtypes_and_keep_order():
    report = audit(identity, dtypes=[torch.float64, "float16"], **SMALL)
    assert report.dtypes == ("float64", "float16")


def test_the_report_is_deterministic_for_a_seed():
    def naive(x):
        return 1 / (1 - torch.exp(-x)) - 1 / x

    first, second = (audit(naive, dtypes=["float32"], seed=3) for _ in range(2))
    assert first.to_dict() == second.to_dict()


def test_assert_stable():
    assert assert_stable(identity, **SMALL).ok
    with pytest.raises(AssertionError, match="nonfinite_value") as info:
        assert_stable(log, dtypes=["float32"], **SMALL)
    assert "probloss audit of log(x: real)" in str(info.value)


def test_builtins_without_a_signature_are_a_usage_error():
    with pytest.raises(AuditUsageError, match=r"cannot read the signature .* wrap it in a def"):
        audit(torch.log)
