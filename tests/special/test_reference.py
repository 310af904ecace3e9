"""Self-tests of the mpmath oracle in ``tests/reference.py``.

These do not touch the implementation.  They guard the reference against
the two ways it could be wrong: too little working precision for the
cancellation of a closed form (checked by re-evaluating with many more
digits), and a wrong closed form (checked against independent series and
asymptotic expansions, and against the exact symmetry identities).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from mpmath import mp

from tests import reference as ref
from tests.special._helpers import SPECS, grid

ORACLES = {
    "log1mexp": ref.log1mexp,
    "log1mexp_grad": ref.log1mexp_grad,
    "softplus_inverse": ref.softplus_inverse,
    "softplus_inverse_grad": ref.softplus_inverse_grad,
    "log_cosh": ref.log_cosh,
    "log_cosh_grad": ref.log_cosh_grad,
    **{
        f"cb.{field}": (lambda f: lambda x, _boost=0: getattr(ref.cb(x, _boost), f))(field)
        for field in ref.CB._fields
    },
}
NONNEG = {"log1mexp", "log1mexp_grad", "softplus_inverse", "softplus_inverse_grad"}


def _sample_points(nonneg: bool) -> list[float]:
    """Float64 grid points: every extreme one with 1e-120 <= |x| <= 1e120
    (the precision rules are linear in log10|x|, so a rule that is short
    by even 1 digit per decade fails well inside this range), every 4th one
    beyond, and every 25th point of the dense part."""
    x = grid("nonneg" if nonneg else "real", torch.float64)
    a = np.abs(x)
    extreme = x[((a < 1e-3) | (a > 1e3)) & (a >= 1e-120) & (a <= 1e120)]
    far = x[(a < 1e-120) | (a > 1e120)][::4]
    dense = x[(a >= 1e-3) & (a <= 1e3)][::25]
    return sorted({*extreme.tolist(), *far.tolist(), *dense.tolist()})


def _generous_boost(x: float) -> int:
    """Many more digits than any rule in reference.py asks for at x."""
    if x == 0.0 or math.isnan(x):
        return 60
    d = math.log10(abs(x))
    extra = abs(x) / math.log(10.0) if abs(x) < 760.0 else 0.0
    return int(60 + 6 * max(0.0, -d) + 2 * max(0.0, d) + extra)


@pytest.mark.parametrize("oracle", sorted(ORACLES))
def test_oracle_precision_is_sufficient(oracle):
    """Value at the chosen precision == value at far higher precision, to
    1e-30 relative (or 1e-340 absolute for values far below float64's range)."""
    f = ORACLES[oracle]
    bad = []
    for x in _sample_points(oracle in NONNEG):
        a = f(x)
        b = f(x, _boost=_generous_boost(x))
        if mpmath.isnan(a) or mpmath.isinf(a):
            ok = (mpmath.isnan(a) and mpmath.isnan(b)) or a == b
        else:
            ok = abs(a - b) <= mpmath.mpf("1e-30") * abs(b) + mpmath.mpf("1e-340")
        if not ok:
            bad.append((x, mpmath.nstr(a, 25), mpmath.nstr(b, 25)))
    assert not bad, f"{oracle}: precision too low at {bad[:5]}"


def _close(a, b, rtol):
    return abs(a - b) <= rtol * abs(b)


def _expansions() -> list[tuple[str, float, mpmath.mpf, float]]:
    """(oracle, x, independent expansion, relative tolerance).  The
    truncation error of each expansion at x is far below the tolerance."""
    out = []
    one = mpmath.mpf(1)
    for e in (1e-8, -1e-8, 1e-30, -1e-30, 1e-200, -1e-200):
        E = mpmath.mpf(e)
        out += [
            ("cb.log_partition", e, E / 2 + E**2 / 24 - E**4 / 2880, 1e-25),
            ("cb.mean", e, one / 2 + E / 12 - E**3 / 720, 1e-25),
            ("cb.variance", e, one / 12 - E**2 / 240 + E**4 / 6048, 1e-25),
            ("cb.variance_grad", e, -E / 120 + E**3 / 1512, 1e-25),
            ("cb.entropy", e, -(E**2) / 24 + E**4 / 960, 1e-25),
            ("cb.entropy_grad", e, -E / 12 + E**3 / 240, 1e-25),
            ("log_cosh", e, E**2 / 2 - E**4 / 12, 1e-25),
            ("log_cosh_grad", e, E - E**3 / 3, 1e-25),
        ]
        if e > 0:
            out += [
                ("log1mexp", e, mp.log(E) - E / 2 + E**2 / 24, 1e-25),
                ("log1mexp_grad", e, 1 / E - one / 2 + E / 12, 1e-25),
                ("softplus_inverse", e, mp.log(E) + E / 2 + E**2 / 24, 1e-25),
                ("softplus_inverse_grad", e, 1 / E + one / 2 + E / 12, 1e-25),
            ]
    for e in (120.0, 1e5, 1e300):
        E = mpmath.mpf(e)
        # exp(-120) ~ 8e-53: the neglected terms are relatively below 1e-45.
        out += [
            ("cb.log_partition", e, E - mp.log(E), 1e-40),
            ("cb.log_partition", -e, -mp.log(E), 1e-40),
            ("cb.mean", e, 1 - 1 / E, 1e-40),
            ("cb.mean", -e, 1 / E, 1e-40),
            ("cb.variance", e, 1 / E**2, 1e-40),
            ("cb.variance", -e, 1 / E**2, 1e-40),
            ("cb.variance_grad", e, -2 / E**3, 1e-40),
            ("cb.variance_grad", -e, 2 / E**3, 1e-40),
            ("cb.entropy", e, 1 - mp.log(E), 1e-40),
            ("cb.entropy", -e, 1 - mp.log(E), 1e-40),
            ("cb.entropy_grad", e, -1 / E, 1e-40),
            ("log_cosh", e, E - mp.log(2), 1e-40),
            ("log_cosh", -e, E - mp.log(2), 1e-40),
            ("log_cosh_grad", -e, -one, 1e-40),
            ("log1mexp_grad", e, mp.exp(-E) + mp.exp(-2 * E), 1e-40),
            ("softplus_inverse", e, E - mp.exp(-E), 1e-40),
            ("softplus_inverse_grad", e, 1 + mp.exp(-E), 1e-40),
        ]
    # log1mexp(x) = -e^-x - e^-2x/2 - ...; only where e^-x is within float64's
    # range (the oracle deliberately stops resolving e^-x beyond x = 760).
    for e in (120.0, 700.0):
        E = mpmath.mpf(e)
        out.append(("log1mexp", e, -mp.exp(-E) - mp.exp(-2 * E) / 2, 1e-40))
    # softplus_inverse at the float64 neighbours of its root ln 2:
    # log(2 e^d - 1) = 2d - d^2 + d^3 + O(d^4), d = y - ln 2 (exact offset).
    y0 = math.log(2.0)
    for k in (-3, -1, 0, 1, 2):
        y = y0 + k * 2.0**-53  # exact: ln 2 has ulp 2**-53 in float64
        D = mpmath.mpf(y) - mp.log(2)
        out.append(("softplus_inverse", y, 2 * D - D**2 + D**3, 1e-25))
    return out


with mp.workdps(80):
    _EXPANSIONS = _expansions()


@pytest.mark.parametrize(("oracle", "x", "expansion", "rtol"), _EXPANSIONS)
def test_oracle_matches_expansion(oracle, x, expansion, rtol):
    with mp.workdps(80):
        got = ORACLES[oracle](x)
        assert _close(got, expansion, rtol), (oracle, x, mpmath.nstr(got, 30))


def test_oracle_limits_at_zero():
    c = ref.cb(0.0)
    assert c.log_partition == 0 and c.entropy == 0 and c.entropy_grad == 0
    assert c.mean == mpmath.mpf(1) / 2
    assert c.variance_grad == 0
    with mp.workdps(200):
        assert _close(c.variance, mpmath.mpf(1) / 12, 1e-190)
        # the limits agree with the closed forms just off zero
        near = ref.cb(1e-60)
        assert _close(near.variance, c.variance, 1e-110)
        assert _close(near.mean, c.mean, 1e-55)
    assert mpmath.isinf(ref.log1mexp(0.0)) and ref.log1mexp(0.0) < 0
    assert mpmath.isnan(ref.log1mexp(-1.0))


def test_oracle_symmetry_identities():
    """A(-e) = A(e) - e, A'(-e) = 1 - A'(e), A'' even, A''' odd, H even,
    log_cosh even: exact identities, checked on the oracle to 1e-30."""
    bad = []
    for e in _sample_points(nonneg=False):
        if e <= 0:
            continue
        p, m = ref.cb(e), ref.cb(-e)
        with mp.workdps(80):
            pairs = [
                (m.log_partition, p.log_partition - e),
                (m.mean, 1 - p.mean),
                (m.variance, p.variance),
                (m.variance_grad, -p.variance_grad),
                (m.entropy, p.entropy),
                (m.entropy_grad, -p.entropy_grad),
                (ref.log_cosh(-e), ref.log_cosh(e)),
            ]
            for i, (a, b) in enumerate(pairs):
                if not abs(a - b) <= mpmath.mpf("1e-30") * abs(b) + mpmath.mpf("1e-340"):
                    bad.append((e, i, mpmath.nstr(a, 20), mpmath.nstr(b, 20)))
    assert not bad, bad[:5]


def test_to_float64_rounds_to_nearest():
    assert ref.to_float64(mpmath.mpf(1) / 3) == 1 / 3
    assert ref.to_float64(mpmath.mpf("1e400")) == math.inf
    assert ref.to_float64(mpmath.mpf("-1e400")) == -math.inf
    assert ref.to_float64(mpmath.mpf("1e-400")) == 0.0
    assert ref.to_float64(mpmath.mpf(2) ** -1074) == 5e-324
    # just below 1: nearest, not truncated
    assert ref.to_float64(1 - mpmath.mpf(2) ** -80) == 1.0
    assert SPECS  # the table the tests use is populated


def _cb_field(field: str):
    return lambda x: getattr(ref.cb(x), field)


_ALL_ORACLES = {
    **{n: getattr(ref, n) for n in ref.LIMITS if not n.startswith("cb_")},
    **{f"cb_{f}": _cb_field(f) for f in ref.CB._fields},
}


@pytest.mark.parametrize("name", sorted(ref.LIMITS))
@pytest.mark.parametrize("side", [-1.0, 1.0], ids=["-inf", "+inf"])
def test_oracle_limits_at_infinity(name, side):
    """Every oracle returns its limit at +-inf (it raised OverflowError there before), and
    the table entry is the limit of the closed form: at |x| = 1e300 the closed form is
    within 1e-290 of a finite limit (every finite limit is approached like 1/|x| or
    faster: the comments of ``LIMITS``), or beyond 1e2 with the sign of an infinite one
    (|x|, log|x| and e^x at 1e300 all exceed 690). Outside the domain both are NaN."""
    f = _ALL_ORACLES[name]
    limit = f(side * math.inf)
    assert limit == mpmath.mpf(ref.LIMITS[name][side > 0]) or (
        mpmath.isnan(limit) and math.isnan(ref.LIMITS[name][side > 0])
    )
    far = f(side * 1e300)
    if mpmath.isnan(limit):
        assert mpmath.isnan(far)
    elif mpmath.isinf(limit):
        assert far * mpmath.sign(limit) > 100
    else:
        assert abs(far - limit) <= mpmath.mpf("1e-290")
    assert ref.to_float64(limit) == ref.LIMITS[name][side > 0] or mpmath.isnan(limit)
