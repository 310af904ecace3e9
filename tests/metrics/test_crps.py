"""``probloss.metrics.crps_*`` against the definition, integrated numerically.

References:

* the value: ``sigma * I(z)`` with ``I(z) = int (F0(t) - 1{t >= z})^2 dt`` integrated by
  mpmath (tanh-sinh, 30 digits) in standardised coordinates, ``F0`` the family's CDF
  written from its definition; ``z`` and ``sigma`` exact from the float inputs;
* the gradients: ``mpmath.diff`` of the textbook closed forms (``tests/fuzz/oracle.py``),
  at 60 digits plus the decades of the inputs;
* ``T``, the sum of the magnitudes of the closed form's terms, from the same oracle.

Bounds: the value within ``16 eps T`` (a handful of roundings, each at most an ulp of a term,
``erf`` and ``exp`` within 2 ulps), the gradients within ``64 eps`` times the sum of their
terms' magnitudes (``1`` for ``value`` / ``loc``, ``sigma (|s| + 2)`` for ``log_scale``),
with ``eps`` of the computing dtype (float32 for half inputs), plus one rounding of a
gradient to its input's dtype.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from mpmath import mp
from torch.autograd import gradcheck, gradgradcheck

from probloss.metrics import crps_laplace, crps_logistic, crps_normal
from tests.fuzz import oracle

FUNCTIONS = {"normal": crps_normal, "laplace": crps_laplace, "logistic": crps_logistic}
ORACLES = {
    "normal": oracle.crps_normal,
    "laplace": oracle.crps_laplace,
    "logistic": oracle.crps_logistic,
}

# standardised residuals from the mean to far targets, scales over twelve decades
ZS = [0.0, 0.3, -0.3, 1.0, -1.0, 2.5, -2.5, 10.0, -10.0, 1e3, -1e3, 1e6, -1e6]
SCALES = [1e-6, 1.0, 1e6]
LOCS = [0.0, 3.7]


def _cdf(family: str):
    if family == "normal":
        return mp.ncdf
    if family == "laplace":
        return lambda t: mp.exp(t) / 2 if t < 0 else 1 - mp.exp(-t) / 2
    return lambda t: 1 / (1 + mp.exp(-t))


def _integral(family: str, z) -> mpmath.mpf:
    """``int (F0(t) - 1{t >= z})^2 dt``, split where the integrand bends or jumps."""
    f0 = _cdf(family)
    cuts = sorted({mp.mpf(c) for c in (-100, -10, -1, 0, 1, 10, 100)} | {z})
    below = [-mp.inf, *(c for c in cuts if c < z), z]
    above = [z, *(c for c in cuts if c > z), mp.inf]
    with mp.workdps(30):
        left = mp.quad(lambda t: f0(t) ** 2, below)
        right = mp.quad(lambda t: (1 - f0(t)) ** 2, above)
    return left + right


def _inputs(z: float, scale: float, loc: float, dtype: torch.dtype):
    """``(value, loc, log_scale)`` of one point, rounded to ``dtype``."""
    log_scale = math.log(scale)
    value = loc + z * scale
    return tuple(torch.tensor([v], dtype=dtype) for v in (value, loc, log_scale))


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(torch.float32 if dtype.itemsize < 4 else dtype).eps


@pytest.mark.parametrize("family", FUNCTIONS)
def test_value_matches_the_integral_of_the_definition(family):
    """float64, targets 0 to 1e6 scales away, scales 1e-6 to 1e6: within ``16 eps T`` of
    ``sigma * I(z)`` integrated by mpmath; the oracle's closed form agrees with the integral
    to 1e-20 relative (so the fuzz suite's oracle is checked too)."""
    for z in ZS:
        for scale in SCALES:
            for loc in LOCS:
                value, mu, log_scale = _inputs(z, scale, loc, torch.float64)
                row = (float(value), float(mu), float(log_scale))
                with mp.workdps(60):
                    sigma = mp.exp(mp.mpf(row[2]))
                    z_exact = (mp.mpf(row[0]) - mp.mpf(row[1])) / sigma
                    want = sigma * _integral(family, z_exact)
                closed, t = ORACLES[family](*([v] for v in row))[0]
                assert abs(closed - want) <= 1e-20 * t, (family, row)
                got = float(FUNCTIONS[family](value, mu, log_scale))
                assert abs(got - float(want)) <= 16 * _eps(torch.float64) * float(t), (
                    family, row, got, float(want),
                )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("family", FUNCTIONS)
def test_every_dtype_within_its_bound(family, dtype):
    """Inputs rounded to ``dtype``: the score (float32 for half inputs, like every probloss
    loss) within ``16 eps T`` of the closed form at those inputs; the gradients within
    ``64 eps`` of their terms (module docstring) of ``mpmath.diff``."""
    fn = FUNCTIONS[family]
    for z in ZS:
        for scale in (1e-3, 1.0, 1e3) if dtype.itemsize < 4 else SCALES:
            inputs = _inputs(z, scale, LOCS[1], dtype)
            if not all(torch.isfinite(t).all() for t in inputs):
                continue  # the target is beyond the dtype's range
            value, mu, log_scale = (t.requires_grad_() for t in inputs)
            out = fn(value, mu, log_scale)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            grads = torch.autograd.grad(out.sum(), (value, mu, log_scale))
            row = [float(t) for t in (value, mu, log_scale)]
            want, t = ORACLES[family](*([v] for v in row))[0]
            eps = _eps(dtype)
            assert abs(float(out) - float(want)) <= 16 * eps * float(t), (row, float(out))
            exact = _exact_gradients(family, *row)
            with mp.workdps(30):
                sigma = float(mp.exp(mp.mpf(row[2])))
            bounds = (64 * eps, 64 * eps, 64 * eps * sigma * 3)
            names = ("value", "loc", "log_scale")
            for name, g, e, b in zip(names, grads, exact, bounds, strict=True):
                # a gradient has its input's dtype: half ones are rounded once more
                rounding = torch.finfo(dtype).eps * abs(e)
                assert abs(float(g) - e) <= b + rounding, (family, name, row, float(g), e)


def _exact_gradients(family: str, x: float, mu: float, s: float) -> list[float]:
    """``mpmath.diff`` of the textbook closed form by each argument."""

    def crps(x_, mu_, s_):
        sigma = mp.exp(s_)
        z = (x_ - mu_) / sigma
        if family == "normal":
            return sigma * (z * (2 * mp.ncdf(z) - 1) + 2 * mp.npdf(z) - 1 / mp.sqrt(mp.pi))
        if family == "laplace":
            return abs(x_ - mu_) + sigma * mp.exp(-abs(z)) - 3 * sigma / 4
        return sigma * (z + 2 * mp.log1p(mp.exp(-z)) - 1)

    with mp.workdps(oracle._dps_for(x, mu, s)):
        point = [mp.mpf(v) for v in (x, mu, s)]
        out = []
        for i in range(3):

            def along(v, i=i):
                args = list(point)
                args[i] = v
                return crps(*args)

            out.append(float(mp.diff(along, point[i])))
        return out


@pytest.mark.parametrize("family", FUNCTIONS)
def test_gradcheck_and_gradgradcheck(family):
    """Finite differences of the float64 score, first and second derivatives (the closed-form
    backward is differentiable), at moderate points off the kink at ``value = loc``."""
    g = torch.Generator().manual_seed(3)
    value = torch.randn(8, generator=g, dtype=torch.float64) * 3
    loc = torch.randn(8, generator=g, dtype=torch.float64)
    log_scale = torch.randn(8, generator=g, dtype=torch.float64) * 0.5
    args = tuple(t.requires_grad_() for t in (value, loc, log_scale))
    assert gradcheck(FUNCTIONS[family], args)
    assert gradgradcheck(FUNCTIONS[family], args)


@pytest.mark.parametrize("family", FUNCTIONS)
def test_extremes_are_finite_and_exact(family):
    """float32: a target 1e30 away at ``log_scale = -100`` (``z`` overflows) scores
    ``|r|``; on the location at ``log_scale = 88.5`` (``e^{log_scale}`` finite) and ``89``
    (it overflows) the score is ``s(0) sigma`` and finite; ``y - mu`` that overflows while
    the score does not (1.75e38 - (-1.75e38) at ``sigma = 5e38``) is finite; a target at
    infinity scores ``inf``. Gradients are finite wherever the score is."""
    fn = FUNCTIONS[family]
    value = torch.tensor([1e30, 0.0, 0.0, 1.75e38, float("inf")], requires_grad=True)
    loc = torch.tensor([0.0, 0.0, 0.0, -1.75e38, 0.0], requires_grad=True)
    log_scale = torch.tensor([-100.0, 88.5, 89.0, math.log(5e38), 0.0], requires_grad=True)
    out = fn(value, loc, log_scale)
    rows = [[float(t[i]) for t in (value, loc, log_scale)] for i in range(5)]
    for i, row in enumerate(rows[:4]):
        want, t = ORACLES[family](*([v] for v in row))[0]
        assert math.isfinite(float(out[i])) and abs(float(out[i]) - float(want)) <= 16 * _eps(
            torch.float32
        ) * float(t), (i, float(out[i]), float(want))
    assert out[4] == math.inf
    out[:4].sum().backward()
    for t in (value, loc, log_scale):
        assert torch.isfinite(t.grad).all(), t.grad


def test_scale_form_and_errors():
    """``scale=`` is the keyword alternative (the same score as its log); exactly one form
    is required, and a scale that is not positive is refused (naming it)."""
    y, mu = torch.tensor([0.5, -2.0]), torch.tensor(0.0)
    for fn in FUNCTIONS.values():
        torch.testing.assert_close(fn(y, mu, scale=torch.tensor(2.0)), fn(y, mu, math.log(2.0)))
        with pytest.raises(ValueError, match="exactly one"):
            fn(y, mu)
        with pytest.raises(ValueError, match="scale"):
            fn(y, mu, scale=torch.tensor(-1.0))
