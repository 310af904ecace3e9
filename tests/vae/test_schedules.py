"""Tests of ``probloss.vae.schedules``.

Where the numbers come from
---------------------------
Linear ramps are checked against exact hand arithmetic (the fractions are written out
beside each value). Logistic, cosine and exponential values come from mpmath at 30 digits,
evaluated from the defining formula in the form the paper writes it (not the rearranged
form the implementation uses): ``end / (1 + exp(-k (t - t0)))`` (Bowman et al. 2015),
``(logistic(12u - 6) - logistic(-6)) / (logistic(6) - logistic(-6))`` and
``(1 - cos(pi u)) / 2`` (Fu et al. 2019 ramps), ``end - (end - start) * decay**t``
(sketch-rnn). Schedules return Python floats, so the bound is a few float64 ulps:
``4e-16`` relative for the closed forms (one or two rounded operations each).
"""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probloss.vae.schedules import (
    Constant,
    CyclicalAnnealing,
    ExponentialApproach,
    LinearWarmup,
    Schedule,
    SigmoidAnnealing,
)

mp.mp.dps = 30
REL = 4e-16
# The interpolation start (1 - f) + end f carries at most 2 eps max(start, end) of rounding
# (1 - f, two products and a sum, each within eps/2 of non-negative terms), so a value may
# leave [min, max] by that much and two consecutive values may step back by twice that.
EPS = float(np.finfo(np.float64).eps)
LERP_SLACK = 2 * EPS
# Below the normal range a rounding errs by up to half the subnormal spacing ulp(0) in
# absolute terms instead (hypothesis: start == end == 5e-324 stepped back by one ulp(0)):
# four roundings give at most 2 ulp(0) per value, twice that between two values.
LERP_FLOOR = 2 * math.ulp(0.0)


def lerp_slack(scale: float) -> float:
    """How far an interpolated value may leave ``[min, max]``; ``scale = max(start, end)``."""
    return LERP_SLACK * scale + LERP_FLOOR


def close(got: float, expected: float | mp.mpf, rel: float = REL) -> bool:
    expected = float(expected)
    return abs(got - expected) <= rel * abs(expected) + 1e-300


def mp_logistic(x) -> mp.mpf:
    return 1 / (1 + mp.exp(-mp.mpf(x)))


# ======================================================================================
# Values at known steps
# ======================================================================================


def test_constant():
    assert [Constant(4.0)(t) for t in (0, 1, 10**12)] == [4.0, 4.0, 4.0]
    assert Constant()(5) == 1.0
    assert isinstance(Constant(2)(0), float)


def test_linear_warmup_values():
    """start 0.2, end 1.0, 4 steps after a delay of 3: 0.2 for t <= 3, then
    0.2 + 0.8 (t - 3) / 4 = 0.4, 0.6, 0.8 at t = 4, 5, 6, and 1.0 from t = 7 on."""
    warmup = LinearWarmup(steps=4, start=0.2, end=1.0, delay=3)
    expected = [0.2, 0.2, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    got = [warmup(t) for t in range(9)]
    assert all(close(g, e) for g, e in zip(got, expected, strict=True)), got
    assert got[0] == 0.2 and got[7] == 1.0 and warmup(10**9) == 1.0  # ends exact
    # defaults: 0 -> 1 over 10 steps, t / 10
    assert [LinearWarmup(10)(t) for t in (0, 5, 10)] == [0.0, 0.5, 1.0]


def test_linear_warmup_decreasing():
    """start 1.0 -> end 0.5 over 2 steps: 1.0, 0.75 (= 1 - 0.5 / 2), 0.5."""
    assert [LinearWarmup(2, start=1.0, end=0.5)(t) for t in range(4)] == [1.0, 0.75, 0.5, 0.5]


def test_sigmoid_values():
    """end 2, k = 0.5, t0 = 10: t = 0 -> 2 / (1 + e^5) = 0.01338570184856971,
    t = 10 -> 1 exactly, t = 20 -> 2 / (1 + e^-5) = 1.986614298151430 (mpmath)."""
    anneal = SigmoidAnnealing(midpoint=10, steepness=0.5, end=2.0)
    assert anneal(10) == 1.0
    for t in (0, 3, 20, 31):
        assert close(anneal(t), 2 * mp_logistic(0.5 * (t - 10))), t
    assert close(anneal(0), 0.01338570184856971, 1e-15)
    assert close(anneal(20), 1.986614298151430, 1e-15)


def test_sigmoid_extreme_steps_do_not_overflow():
    """k (t - t0) = -1e6 and +1e9: math.exp of the raw argument would raise
    OverflowError; the values are the limits 0 and end."""
    anneal = SigmoidAnnealing(midpoint=10_000, steepness=100.0, end=3.0)
    assert anneal(0) == 0.0
    assert anneal(10**7) == 3.0


def test_cyclical_linear_values():
    """period 10, ratio 0.5: tau = (t mod 10) / 10, beta = tau / 0.5 for tau < 0.5:
    t = 0..4 -> 0, 0.2, 0.4, 0.6, 0.8; t = 5..9 -> 1; t = 10 -> 0 again; t = 13 -> 0.6.
    With cycles=2 it stays at 1 from t = 20 on."""
    cyc = CyclicalAnnealing(period=10, ratio=0.5, cycles=2)
    expected = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    got = [cyc(t) for t in range(10)]
    assert all(close(g, e) for g, e in zip(got, expected, strict=True)), got
    assert cyc(10) == 0.0 and close(cyc(13), 0.6)
    assert [cyc(t) for t in (19, 20, 21, 25, 10**6)] == [1.0] * 5
    assert CyclicalAnnealing(period=10)(21) == 0.2  # no cycles limit: the third cycle ramps


def test_cyclical_start_end_and_ratio_one():
    """start 0.5, end 2, ratio 1, period 4: 0.5 + 1.5 (t mod 4) / 4 = 0.5, 0.875, 1.25, 1.625."""
    cyc = CyclicalAnnealing(period=4, ratio=1.0, start=0.5, end=2.0)
    assert [cyc(t) for t in range(5)] == [0.5, 0.875, 1.25, 1.625, 0.5]


@pytest.mark.parametrize("shape", ["sigmoid", "cosine"])
def test_cyclical_ramp_shapes(shape):
    """Ramps at u = t / (ratio * period) for period 40, ratio 0.5 (u = t / 20), against the
    paper-form formulas in mpmath; exactly 0 at u = 0, 1/2 at u = 1/2, 1 from u = 1."""

    def ramp(u):
        if shape == "cosine":
            return (1 - mp.cos(mp.pi * u)) / 2
        lo, hi = mp_logistic(-6), mp_logistic(6)
        return (mp_logistic(12 * u - 6) - lo) / (hi - lo)

    cyc = CyclicalAnnealing(period=40, ratio=0.5, start=0.0, end=1.0, shape=shape)
    assert cyc(0) == 0.0 and cyc(20) == 1.0
    assert close(cyc(10), 0.5)
    for t in range(1, 20):
        assert close(cyc(t), ramp(mp.mpf(t) / 20), 8e-16), t
    # u = 1/4: cosine (1 - cos(pi/4)) / 2 = 0.1464466094067262, sigmoid 0.04517665973091213
    quarter = {"cosine": 0.1464466094067262, "sigmoid": 0.04517665973091213}[shape]
    assert close(cyc(5), quarter, 1e-15)


def test_exponential_values():
    """start 0.01, decay 0.99995, end 1: t = 0 -> 0.01 exactly;
    t = 1 -> 1 - 0.99 * 0.99995 = 0.0100495; t = 13863 (ln 2 / -ln 0.99995 steps) ->
    0.505009973539497 (mpmath; the gap 0.99 has halved)."""
    approach = ExponentialApproach()
    assert approach(0) == 0.01
    assert close(approach(1), 0.0100495, 1e-15)
    assert close(approach(13863), 0.505009973539497, 1e-14)
    for t in (2, 100, 10**4, 10**5):
        exact = 1 - (1 - mp.mpf(0.01)) * mp.mpf(0.99995) ** t
        assert close(approach(t), exact, 1e-15), t
    assert approach(10**8) == 1.0
    assert ExponentialApproach(start=2.0, decay=0.5, end=0.0)(3) == 0.25  # 2 * 0.5^3


# ======================================================================================
# Laws
# ======================================================================================

weights = st.floats(0.0, 10.0)
steps = st.integers(0, 10**6)


@settings(max_examples=200)
@given(
    st.integers(1, 1000),
    st.floats(0.01, 1.0),
    weights,
    weights,
    st.sampled_from(["linear", "sigmoid", "cosine"]),
    st.one_of(st.none(), st.integers(1, 5)),
    steps,
)
def test_cyclical_is_periodic(period, ratio, start, end, shape, cycles, t):
    """beta(t + P) == beta(t) exactly (integer modulus) while both lie in the cycles."""
    cyc = CyclicalAnnealing(period, ratio, start, end, shape, cycles)
    if cycles is not None:
        t = t % ((cycles - 1) * period) if cycles > 1 else 0
        if cycles == 1:
            assert cyc(period + t) == end
            return
    assert cyc(t + period) == cyc(t)


@settings(max_examples=100)
@given(
    st.integers(1, 200),
    st.floats(0.05, 1.0),
    weights,
    weights,
    st.sampled_from(["linear", "sigmoid", "cosine"]),
)
def test_cyclical_monotone_within_a_cycle(period, ratio, start, end, shape):
    """Within each cycle the weight moves monotonically from start towards end."""
    cyc = CyclicalAnnealing(period, ratio, start, end, shape)
    values = np.array([cyc(t) for t in range(period + 1)])
    diffs = np.diff(values[:period]) * (1.0 if end >= start else -1.0)
    assert (diffs >= -2 * lerp_slack(max(start, end))).all()
    assert values[period] == values[0]


def _bounded(schedule: Schedule, low: float, high: float, t: int) -> bool:
    value = schedule(t)
    slack = lerp_slack(max(abs(low), abs(high)))
    return low - slack <= value <= high + slack


@settings(max_examples=200)
@given(st.integers(1, 10**4), weights, weights, st.integers(0, 100), steps, steps)
def test_linear_warmup_monotone_and_bounded(n, start, end, delay, t1, t2):
    warmup = LinearWarmup(n, start, end, delay)
    lo, hi = sorted((t1, t2))
    sign = 1.0 if end >= start else -1.0
    assert sign * (warmup(hi) - warmup(lo)) >= -2 * lerp_slack(max(start, end))
    assert _bounded(warmup, min(start, end), max(start, end), t1)


@settings(max_examples=200)
@given(st.floats(0.0, 1e5), st.floats(1e-4, 10.0), weights, steps, steps)
def test_sigmoid_monotone_bounded_and_symmetric(midpoint, k, end, t1, t2):
    """Non-decreasing in t, within [0, end], and beta(t0 + x) + beta(t0 - x) = end (the
    logistic's symmetry), checked at integer t0 = 1000 within rounding."""
    anneal = SigmoidAnnealing(midpoint, k, end)
    lo, hi = sorted((t1, t2))
    assert anneal(lo) <= anneal(hi)
    assert _bounded(anneal, 0.0, end, t1)
    sym = SigmoidAnnealing(1000, k, end)
    x = t1 % 1000
    assert math.isclose(sym(1000 + x) + sym(1000 - x), end, rel_tol=1e-15, abs_tol=1e-300)


@settings(max_examples=200)
@given(weights, st.floats(1e-3, 1.0 - 1e-9), weights, steps, steps)
def test_exponential_monotone_and_bounded(start, decay, end, t1, t2):
    approach = ExponentialApproach(start, decay, end)
    lo, hi = sorted((t1, t2))
    sign = 1.0 if end >= start else -1.0
    assert sign * (approach(hi) - approach(lo)) >= -4e-16 * max(start, end)
    assert _bounded(approach, min(start, end), max(start, end), t1)


# ======================================================================================
# Arguments
# ======================================================================================


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Constant(-1.0), "beta"),
        (lambda: Constant(math.inf), "beta"),
        (lambda: LinearWarmup(0), "steps"),
        (lambda: LinearWarmup(10, start=-0.1), "start"),
        (lambda: LinearWarmup(10, end=math.nan), "end"),
        (lambda: LinearWarmup(10, delay=-1), "delay"),
        (lambda: SigmoidAnnealing(math.inf, 1.0), "midpoint"),
        (lambda: SigmoidAnnealing(10, 0.0), "steepness"),
        (lambda: SigmoidAnnealing(10, 1.0, end=-2.0), "end"),
        (lambda: CyclicalAnnealing(0), "period"),
        (lambda: CyclicalAnnealing(10, ratio=0.0), "ratio"),
        (lambda: CyclicalAnnealing(10, ratio=1.5), "ratio"),
        (lambda: CyclicalAnnealing(10, start=-1.0), "start"),
        (lambda: CyclicalAnnealing(10, shape="step"), "shape"),
        (lambda: CyclicalAnnealing(10, cycles=0), "cycles"),
        (lambda: ExponentialApproach(decay=1.0), "decay"),
        (lambda: ExponentialApproach(decay=0.0), "decay"),
        (lambda: ExponentialApproach(start=-0.01), "start"),
        (lambda: ExponentialApproach(end=math.inf), "end"),
    ],
)
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: LinearWarmup(10.0), "steps"),
        (lambda: LinearWarmup(True), "steps"),
        (lambda: CyclicalAnnealing(10, cycles=2.5), "cycles"),
        (lambda: Constant("1"), "beta"),
    ],
)
def test_bad_argument_types_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_step_must_be_a_non_negative_integer():
    schedule = LinearWarmup(10)
    with pytest.raises(ValueError, match="step"):
        schedule(-1)
    for bad in (1.5, True, "3", torch.tensor(2.0)):
        with pytest.raises(TypeError, match="step"):
            schedule(bad)
    # integer-like objects are accepted: numpy ints and 0-d integer tensors
    assert schedule(np.int64(5)) == schedule(torch.tensor(5)) == schedule(5) == 0.5


def test_schedules_are_frozen():
    schedule = LinearWarmup(10)
    with pytest.raises(AttributeError):
        schedule.steps = 5
    assert schedule == LinearWarmup(10) and hash(schedule) == hash(LinearWarmup(10))
