"""Tests of ``probloss.functional._params`` (the residual kernels ``split_residual``,
``standardized_residual`` and ``sum_to_size_rescaled``; the scale-form resolver is tested
in ``tests/_core/test_params.py``).

Numbers: each test states its reference (exact halving, float64 sums formed independently).
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss.functional._params import (
    split_residual,
    standardized_residual,
    sum_to_size_rescaled,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_split_residual(dtype):
    """value - loc = r m exactly in the ordinary case (m = 1, r the rounded difference) and,
    where the difference overflows (max/1.5 - (-max/1.5)), r = value/2 - loc/2 (exact
    halving) and m = 2; the gradient of r m is (1, -1) in both cases."""
    top = torch.finfo(dtype).max / 1.5
    value = torch.tensor([3.0, top, -top], dtype=dtype, requires_grad=True)
    loc = torch.tensor([1.0, -top, top], dtype=dtype, requires_grad=True)
    r, m = split_residual(value, loc)
    assert torch.isfinite(r).all()
    assert m.tolist() == [1.0, 2.0, 2.0]
    assert r[0].item() == 2.0
    assert r[1].item() == torch.tensor(top, dtype=dtype).item()
    assert r[2].item() == -torch.tensor(top, dtype=dtype).item()
    (r * m).sum().backward()
    assert value.grad.tolist() == [1.0, 1.0, 1.0] and loc.grad.tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_standardized_residual_gradients_where_the_difference_overflows(dtype):
    """z = (value - loc) e^{-log_scale} with value - loc = max/1.5 - (-max/1.5) (split, m = 2)
    and an incoming gradient g = 0.6 max: d/dvalue = -d/dloc = g e^{-log_scale} = 0.6 max at
    log_scale = 0, exactly g (through r it was m g = 1.2 max = inf, found by the fuzz suite),
    although z itself (1.33 max) overflows; at log_scale = 0.5 (z finite) it is g e^{-0.5},
    within 8 (1 + |log_scale|) eps (mul_exp's roundings, the exponent rounded by eps
    |log_scale|). d/dlog_scale = -g z = -inf, exactly. On the mean z = 0 and d/dvalue =
    e^{1000} g: inf, not NaN."""
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    top = torch.finfo(compute).max / 1.5
    eps = torch.finfo(compute).eps
    value = torch.tensor([top, top, 1.0], dtype=compute).to(dtype).requires_grad_()
    loc = torch.tensor([-top, -top, 1.0], dtype=compute).to(dtype).requires_grad_()
    log_scale = torch.tensor([0.0, 0.5, -1000.0], dtype=dtype, requires_grad=True)
    g = torch.tensor([0.6 * torch.finfo(compute).max, 1e-3, 1.0], dtype=compute)
    z = standardized_residual(value.to(compute), loc.to(compute), log_scale.to(compute))
    assert z[0].item() == math.inf  # 1.33 max, exactly
    assert math.isfinite(z[1].item()) and z[2].item() == 0.0  # 0.81 max; 0 on the mean
    (z * g).sum().backward()
    expected = [g[0].item(), g[1].item() * math.exp(-0.5), math.inf]
    got = value.grad.to(torch.float64).tolist()
    half = torch.finfo(dtype).eps if dtype != compute else 0.0
    assert got[0] == pytest.approx(expected[0], rel=half, abs=0) and math.isfinite(got[0])
    assert got[1] == pytest.approx(expected[1], rel=8 * 1.5 * eps + half)
    assert got[2] == math.inf
    assert loc.grad.to(torch.float64).tolist() == [-v for v in got]
    assert log_scale.grad[0].item() == -math.inf


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_sum_to_size_rescaled_where_terms_of_opposite_signs_overflow(dtype):
    # Terms +-e^{u_i} with u just above log(finfo.max): each term is inf, the sums
    # e^{u1} - e^{u2} are representable. Exact sums from mpmath; bound: the final rounding
    # (1 ulp of the result, 2 for the 8-bit-mantissa bfloat16 with its float64 path rounded
    # twice) plus the float64 exponents' error 4 eps64 |S| times the largest term.
    from mpmath import mp, mpf

    big = math.log(torch.finfo(dtype).max)
    u = torch.tensor(
        [[big + 1.0, big + 1.0 - 1e-3], [big + 3.0, big + 2.0], [big + 1.0, -math.inf]],
        dtype=torch.float64,
    ).unsqueeze(0)  # (1, 3, 2): summed over dims 0 and 2 to (3, 1)
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, -1.0]], dtype=dtype).unsqueeze(0)
    terms = (sign.double() * u.exp()).to(dtype)
    assert not torch.isfinite(terms[0, :2]).all()  # the case: the plain sum is NaN there
    got = sum_to_size_rescaled(terms, torch.Size([3, 1]), sign, lambda wide: u.to(wide))
    mp.dps = 40
    finfo = torch.finfo(dtype)
    for i, (row_u, row_s) in enumerate(zip(u[0].tolist(), sign[0].tolist(), strict=True)):
        exact = sum(s * mp.exp(mpf(v)) for v, s in zip(row_u, row_s, strict=True) if v > -math.inf)
        if abs(exact) > finfo.max:
            assert got[i, 0] == math.copysign(math.inf, float(exact))  # the last row: inf
            continue
        ulps = 2 if dtype == torch.bfloat16 else 1
        s = max(row_u)
        bound = ulps * finfo.eps * abs(exact) + 4 * mpf(2.0) ** -52 * s * mp.exp(s)
        assert abs(got[i, 0].item() - exact) <= bound, (i, got[i, 0].item(), float(exact))


def test_sum_to_size_rescaled_keeps_the_plain_sum_where_it_is_finite():
    terms = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    never = lambda wide: pytest.fail("log_abs evaluated although every sum is finite")  # noqa: E731
    assert torch.equal(
        sum_to_size_rescaled(terms, torch.Size([2]), terms.sign(), never), terms.sum(0)
    )
    assert torch.equal(sum_to_size_rescaled(terms, terms.shape, terms.sign(), never), terms)


def test_standardized_residual_value_gradient_summed_over_overflowing_terms():
    """d/dvalue of z_1 - z_2, z_k = (x - mu) e^{-l_k} with l = (-89, -89.001) in float32: each
    term e^{-l_k} overflows, the sum -4.5e35 does not (NaN before). Bound: 2 eps32
    |exact| (the final rounding) plus 1e-12 times the terms (float64 exponents)."""
    from mpmath import mp, mpf

    value = torch.zeros(1, requires_grad=True)
    log_scale = torch.tensor([-89.0, -89.001])
    z = standardized_residual(value, torch.zeros(2), log_scale)
    (z * torch.tensor([1.0, -1.0])).sum().backward()
    with mp.workdps(50):
        terms = [mp.exp(-mpf(float(log_scale[0]))), -mp.exp(-mpf(float(log_scale[1])))]
        exact = sum(terms)
    eps = torch.finfo(torch.float32).eps
    bound = 2 * eps * abs(exact) + 1e-12 * sum(abs(t) for t in terms)
    assert abs(float(value.grad) - exact) <= bound, (value.grad, float(exact))
