"""The fuzz's own checks (:mod:`tests.fuzz.checks`) and its statements of where the math is
undefined (:class:`tests.fuzz.records.Undefined`): the NaN rule can fail, excuses only the
stated rows, and every statement is true.

References: synthetic records with known exact results (``e^x - e^x = 0``), and mpmath
(:mod:`mpmath` at 50 digits) for the limits along two paths that show a statement's limit
depends on the path.
"""

from __future__ import annotations

import math

import torch
from mpmath import mp

from . import checks
from .records import (
    Arg,
    Record,
    Undefined,
    _bivariate_corner,
    _diagonal_mixture_corner,
    _lowrank_corner,
    _tril_corner,
)

INF = math.inf


def _exp_minus_exp(x):
    """``e^x - e^x``: exactly 0 with gradient 0; ``inf - inf = NaN`` in every dtype at x = 1e3."""
    return torch.exp(x) - torch.exp(x)


def _record(undefined=()):
    return Record(
        "synthetic.exp_minus_exp",
        "synthetic.exp_minus_exp",
        _exp_minus_exp,
        (Arg("x"),),
        "same",
        undefined=undefined,
    )


def test_nan_is_flagged_where_the_float64_reference_is_nan_too():
    """e^1000 - e^1000 is NaN in float64 as well, but the exact value is 0: a failure."""
    rows = [torch.tensor([1.0, 1000.0], dtype=torch.float64)]
    for dtype in (torch.float32, torch.float64):
        failures = checks.check(_record(), dtype, rows)
        assert any("NaN value in 1 of 2 rows" in f for f in failures), failures
        assert any("NaN gradient d/dx in 1 of 2 rows" in f for f in failures), failures


def test_a_statement_excuses_only_its_rows_and_outputs():
    """Stated undefined gradients at x > 500: the NaN gradient there passes, the NaN value
    in the same row (``value=False``) and a NaN outside the stated rows still fail."""
    stated = Undefined("synthetic", lambda x: x > 500, grads=("x",))
    rows = [torch.tensor([1.0, 1000.0, 800.0], dtype=torch.float64)]
    failures = checks.check(_record((stated,)), torch.float64, rows)
    assert not any("NaN gradient" in f for f in failures), failures
    assert any("NaN value in 2 of 3 rows" in f for f in failures), failures

    narrow = Undefined("synthetic", lambda x: x > 900, grads=("x",))
    failures = checks.check(_record((narrow,)), torch.float64, rows)
    assert any("NaN gradient d/dx in 1 of 3 rows" in f for f in failures), failures

    ok = checks.acceptable_nan(_record((stated,)), rows)
    assert ok["value"].tolist() == [False, False, False]
    assert ok["d/dx"].tolist() == [False, True, True]


def _oracle_record(oracle, undefined=()):
    return Record(
        "synthetic.identity",
        "synthetic.identity",
        lambda x: x * 1.0,
        (Arg("x"),),
        "same",
        oracle=oracle,
        undefined=undefined,
    )


def test_mpmath_and_the_statements_must_agree():
    """mpmath NaN where nothing is stated, or a statement where mpmath has a value: both
    reported by the oracle check; NaN where stated is not judged."""
    nan = lambda x: [(mp.nan, mp.nan) for _ in x]  # noqa: E731
    exact = lambda x: [(mp.mpf(v), abs(mp.mpf(v))) for v in x]  # noqa: E731
    every_row = lambda x: torch.ones_like(x, dtype=torch.bool)  # noqa: E731
    everywhere = (Undefined("synthetic", every_row, value=True),)

    failures = checks.run_oracle(_oracle_record(nan), 2)
    assert failures and all("mpmath=undefined" in f for f in failures)
    failures = checks.run_oracle(_oracle_record(exact, everywhere), 2)
    assert failures and all("states it undefined" in f for f in failures)
    assert not checks.run_oracle(_oracle_record(nan, everywhere), 2)
    assert not checks.run_oracle(_oracle_record(exact), 2)


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_correlated_corner_rows():
    """Both coordinates infinite and sign(x1 x2 rho) > 0, nothing else."""
    value = _t([INF, INF], [INF, -INF], [-INF, -INF], [INF, 1.0], [INF, INF], [INF, -INF])
    rho = _t(1.0, 1.0, 2.0, 1.0, 0.0, -3.0)
    expected = [True, False, True, False, False, True]
    loc = torch.zeros(6, 2, dtype=torch.float64)
    got = _bivariate_corner(value, loc, loc, rho.unsqueeze(-1))
    assert got.tolist() == expected
    tril = torch.zeros(6, 2, 2, dtype=torch.float64)
    tril[:, 0, 0], tril[:, 1, 1], tril[:, 1, 0] = 1.0, 1.0, rho
    assert _tril_corner(value, loc, tril).tolist() == expected
    factor = torch.stack([-torch.ones(6, dtype=torch.float64), -rho], -1).unsqueeze(-1)
    assert _lowrank_corner(value, loc, factor, loc).tolist() == expected


def test_correlated_corner_is_path_dependent():
    """mpmath: d/dx1 log N((x1, x2); 0, [[1, rho], [rho, 1]]) = -(x1 - rho x2) / (1 - rho^2)
    along x = t (1, c), t = 1e30: rho = 1/2 gives +inf-bound values for c = 3 and -inf-bound
    ones for c = 1 (no limit at (inf, inf)); at (inf, -inf) both paths agree in sign."""
    with mp.workdps(50):
        rho, t = mp.mpf(1) / 2, mp.mpf(10) ** 30

        def d1(x1, x2):
            return -(x1 - rho * x2) / (1 - rho**2)

        assert d1(t, 3 * t) > 1e29 and d1(t, t) < -1e29
        assert d1(t, -3 * t) < -1e29 and d1(t, -t) < -1e29


def _mixture(value, log_scale, logits=(0.0, 0.0)):
    n = len(value)
    return (
        _t(*value),
        torch.tensor([logits] * n, dtype=torch.float64),
        torch.zeros(n, 2, 2, dtype=torch.float64),
        torch.tensor(log_scale, dtype=torch.float64),
    )


def test_diagonal_mixture_corner_rows():
    """Undefined only with two infinite coordinates and no live component strictly widest
    in both; a component of weight 0 (logit -inf) does not count."""
    crossing = [[1.0, 0.0], [0.0, 1.0]]  # component 0 wider in x1, component 1 in x2
    nested = [[1.0, 1.0], [0.0, 0.0]]  # component 0 wider in both
    tied = [[1.0, 1.0], [1.0, 0.0]]
    cases = [
        (([INF, -INF],), [crossing], (0.0, 0.0), True),
        (([INF, -INF],), [nested], (0.0, 0.0), False),
        (([INF, -INF],), [tied], (0.0, 0.0), True),
        (([INF, 2.0],), [crossing], (0.0, 0.0), False),
        (([INF, INF],), [crossing], (0.0, -INF), False),
    ]
    for value, log_scale, logits, expected in cases:
        args = _mixture(list(value), log_scale, logits)
        assert _diagonal_mixture_corner(*args).tolist() == [expected], (value, log_scale)


def test_diagonal_mixture_corner_is_path_dependent():
    """mpmath: with crossing widths (sigma_0 = (e, 1), sigma_1 = (1, e)) the responsibility of
    component 0 along x = t (1, c), t = 1e3, is ~1 for c = 1/10 and ~0 for c = 10."""
    with mp.workdps(50):
        t = mp.mpf(1000)

        def r0(c):
            x1, x2 = t, c * t
            l0 = -((x1 / mp.e) ** 2) / 2 - x2**2 / 2
            l1 = -(x1**2) / 2 - (x2 / mp.e) ** 2 / 2
            return 1 / (1 + mp.exp(l1 - l0))

        assert r0(mp.mpf(1) / 10) > 1 - mp.mpf(10) ** -40
        assert r0(mp.mpf(10)) < mp.mpf(10) ** -40


def test_disputed_inf_gradient_decided_by_mpmath():
    """An inf gradient where the float64 reference is finite is disputed and decided by the
    record's mpmath gradient oracle (exact closed form, tests/fuzz/oracle.py): bf16 row
    1985 of the bivariate log density, where float64 rounds z = r e^{-l} to 0 and reports
    d/dlog_scale[0] = -1 while the exact value is -8.5e38471411927 (overflow confirmed), is
    accepted; the same row with the sign flipped, and a row whose exact gradient is -1, are
    refuted."""
    from .checks import check, confirmed_overflow, make_inputs
    from .records import BY_NAME

    r = BY_NAME["functional.bivariate_normal_log_prob"]
    rows = [t[1985:1986] for t in make_inputs(r, torch.bfloat16, 2000)]
    assert rows[0][0, 0].abs() > 1e19  # the drawn row of the report (value -1.84e19)
    assert check(r, torch.bfloat16, rows) == []  # confirmed by mpmath
    bad = torch.tensor([[True, False]])
    minus = torch.tensor([[-math.inf, 0.0]], dtype=torch.bfloat16)
    assert confirmed_overflow(r, "log_scale", rows, minus, bad).tolist() == [[True, False]]
    assert not confirmed_overflow(r, "log_scale", rows, -minus, bad).any()  # wrong sign
    zero = [torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 1)]
    assert not confirmed_overflow(r, "log_scale", zero, minus, bad).any()  # exact -1
