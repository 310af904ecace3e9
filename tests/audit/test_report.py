"""Tests of ``probloss.audit.report``: the table, the JSON form, number formatting.

The reports come from auditing small functions whose failures are known exactly (``log``
is NaN below 0; ``1/(1 - exp(-x)) - 1/x`` is NaN at 0), so the expected contents are
facts about those functions, not numbers copied from a run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from probloss.audit.report import FAILURE_KINDS, AuditReport, Example, Failure, format_number
from probloss.audit.runner import audit

SMALL = {"mixed_points": 200, "typical_points": 50}
TOP_KEYS = {
    "ok",
    "function",
    "reference",
    "arguments",
    "domains",
    "dtypes",
    "output_dtypes",
    "points",
    "unjudged",
    "tolerance",
    "failures",
}
FAILURE_KEYS = {"kind", "dtype", "count", "by_argument", "message", "example"}
EXAMPLE_KEYS = {"inputs", "argument", "got", "expected", "error", "tolerance"}


def naive_cb_mean(x):
    return 1 / (1 - torch.exp(-x)) - 1 / x


def log_ratio(x, y):
    return torch.log(x / y)


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_has_the_documented_keys_and_is_strict():
    report = audit(naive_cb_mean, dtypes=["float32", "float64"], **SMALL)
    data = strict_loads(report.to_json())
    assert set(data) == TOP_KEYS
    assert data["ok"] is False and data["arguments"] == ["x"] and data["domains"] == {"x": "real"}
    assert data["dtypes"] == ["float32", "float64"]
    assert set(data["unjudged"]["float32"]) == {"value", "grad"}
    assert {"value_factor", "grad_factor", "rule", "second_derivatives"} <= set(data["tolerance"])
    for failure in data["failures"]:
        assert set(failure) == FAILURE_KEYS and failure["kind"] in FAILURE_KINDS
        assert set(failure["example"]) == EXAMPLE_KEYS
    # NaN is written as a string: 1/(1 - e^0) - 1/0 = inf - inf at x = 0
    value = next(f for f in data["failures"] if f["kind"] == "nonfinite_value")
    assert value["example"]["inputs"] == {"x": 0.0} and value["example"]["got"] == "nan"
    assert data == report.to_dict() | {"failures": data["failures"]}


def test_gradient_failures_are_counted_per_argument():
    report = audit(log_ratio, {"x": "real", "y": "positive"}, dtypes=["float32"], **SMALL)
    grad = next(f for f in report.failures if f.kind == "nonfinite_grad")
    # x / y overflows for large x and tiny y: log(inf) = inf, and autograd multiplies
    # d log / d(x/y) = 0 by 1/y = inf (NaN in d/dx) and by -x/y^2 = -inf (NaN in d/dy)
    assert set(grad.by_argument) == {"x", "y"}
    assert grad.count >= max(grad.by_argument.values())
    assert grad.example.argument in grad.by_argument


def test_table_lists_every_dtype_and_each_failure():
    report = audit(naive_cb_mean, dtypes=["float32", "float16"], **SMALL)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "probloss audit of naive_cb_mean(x: real)"
    header = next(line for line in lines if line.startswith("dtype"))
    assert header.split()[:4] == ["dtype", "out", "points", "unjudged"]
    for dtype in ("float32", "float16"):
        row = next(line for line in lines if line.startswith(dtype))
        counts = [int(c) for c in row.split()[4:]]
        assert counts == [report.count(k, dtype) for k in FAILURE_KINDS]
    for failure in report.failures:
        assert failure.describe() in text
    assert lines[-1] == f"FAILED: {len(report.failures)} failure group(s)."


def test_table_of_a_passing_audit():
    report = audit(lambda x: x * 2, **SMALL)
    assert str(report).splitlines()[-1].startswith("OK: no non-finite value or gradient")
    assert report.to_dict()["failures"] == []


def test_describe_names_the_argument_and_the_error():
    example = Example({"x": 0.5, "y": -2.0}, 1.5, 1.0, argument="y", error=0.5, tolerance=1e-6)
    failure = Failure("grad_error", "float32", 3, example, {"y": 3})
    line = failure.describe()
    assert "grad_error" in line and "3 pts" in line and "x=0.5, y=-2" in line
    assert "d/dy = 1.5, reference 1" in line and "(error 0.5 > tolerance 1e-06)" in line
    raised = Failure("exception", "float64", 10, message="raised ValueError: no")
    assert raised.describe().endswith("raised ValueError: no")
    assert raised.to_dict()["example"] is None


def test_count_adds_over_matching_failures():
    report = AuditReport(
        function="f",
        reference="itself in float64",
        arguments=("x",),
        domains={"x": "real"},
        dtypes=("float32",),
        output_dtypes={"float32": "float32"},
        points={"float32": 10},
        unjudged={"float32": {"value": 0, "grad": 0}},
        tolerance={"rule": "r"},
        failures=[Failure("value_error", "float32", 4), Failure("grad_error", "float32", 2)],
    )
    assert report.count("value_error", "float32") == 4 and report.count("value_error", "f") == 0
    assert not report.ok


@pytest.mark.parametrize(
    ("value", "dtype", "text"),
    [
        (0.1, "float64", "0.1"),
        (float(torch.tensor(0.1, dtype=torch.float32)), "float32", "0.1"),
        (1 - 2.0**-24, "float32", "0.99999994"),
        (float(torch.tensor(0.1, dtype=torch.float16)), "float16", "0.1"),
        (float(torch.tensor(0.1, dtype=torch.bfloat16)), "bfloat16", "0.1"),
        (2.0**-149, "float32", "1e-45"),
        (float("inf"), "float32", "inf"),
    ],
)
def test_format_number(value, dtype, text):
    assert format_number(value, dtype) == text


@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_format_number_round_trips_in_float32(x):
    text = format_number(x, "float32")
    assert torch.tensor(float(text)).item() == x or (x == 0 and float(text) == 0)
    significant = text.split("e")[0].replace("-", "").replace(".", "").lstrip("0")
    assert len(significant) <= 9  # float32 needs at most 9 significant digits


def test_example_json_writes_non_finite_numbers_as_strings():
    ex = Example({"x": -math.inf}, math.nan, math.inf).to_dict()
    assert ex["inputs"] == {"x": "-inf"} and (ex["got"], ex["expected"]) == ("nan", "inf")
