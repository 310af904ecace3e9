"""Tests of ``probloss.audit.domains``: domain strings, hard values per dtype, the grid.

Where the numbers come from
---------------------------
* ``tiny``, ``subnormal`` and ``eps`` are the IEEE 754 binary16 / binary32 / binary64
  constants (``2^-14, 2^-24, 2^-10``; ``2^-126, 2^-149, 2^-23``; ``2^-1022, 2^-1074,
  2^-52``) and bfloat16's (8 exponent bits as binary32, 7 fraction bits: ``2^-126,
  2^-133, 2^-7``), written as powers of two, not read from ``torch.finfo``.
* ``exp`` thresholds are checked with mpmath at 50 digits against the largest finite
  number ``(2 - 2^-p) 2^emax`` and the smallest subnormal; saturation of ``sigmoid`` and
  ``tanh`` with mpmath values rounded to the dtype (round to nearest, through torch).
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from probloss.audit.domains import (
    DTYPES,
    KINDS,
    AuditUsageError,
    Domain,
    build_points,
    special_values,
)

mpmath.mp.dps = 50

# (tiny, smallest subnormal, eps, largest finite) from the format definitions
IEEE = {
    torch.float16: (2.0**-14, 2.0**-24, 2.0**-10, (2 - 2.0**-10) * 2.0**15),
    torch.bfloat16: (2.0**-126, 2.0**-133, 2.0**-7, (2 - 2.0**-7) * 2.0**127),
    torch.float32: (2.0**-126, 2.0**-149, 2.0**-23, (2 - 2.0**-23) * 2.0**127),
    torch.float64: (2.0**-1022, 2.0**-1074, 2.0**-52, (2 - 2.0**-52) * 2.0**1023),
}
ALL_DTYPES = list(IEEE)
IDS = [str(d).removeprefix("torch.") for d in ALL_DTYPES]


def rounded(values, dtype) -> set[float]:
    return set(torch.as_tensor(values, dtype=torch.float64).to(dtype).double().tolist())


def round_mp(x, dtype) -> float:
    return torch.tensor(float(x), dtype=torch.float64).to(dtype).item()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=IDS)
def test_special_values_match_the_formats(dtype):
    tiny, sub, eps, big = IEEE[dtype]
    v = special_values(dtype)
    assert (v["tiny"], v["subnormal"], v["eps"]) == (tiny, sub, eps)
    # exp overflows just above exp_max, and one beyond it is past the largest finite number
    # log(max) rounded to float64 is off by <= 710 * 2^-53 relative: 8e-14 in exp
    assert abs(mpmath.exp(v["exp_max"]) / big - 1) < 1e-13
    assert mpmath.exp(v["exp_overflow"]) > 2 * mpmath.mpf(big)
    assert mpmath.exp(-v["exp_tiny"]) == pytest.approx(tiny, rel=1e-14)
    assert mpmath.exp(-v["exp_underflow"]) < mpmath.mpf(sub) / 2  # rounds to 0 in dtype
    # saturation: the exact sigmoid / tanh rounds to 1 in dtype; a unit below it does not
    for name, f in (("sigmoid_saturation", mpmath.sigmoid), ("tanh_saturation", mpmath.tanh)):
        x = v[name]
        assert round_mp(f(mpmath.mpf(x)), dtype) == 1.0, name
        assert round_mp(f(mpmath.mpf(x) - 2), dtype) < 1.0, name
    # powers of ten: sqrt_max squared fits, huge is within a factor 1000 of the top
    assert v["sqrt_max"] ** 2 < big and v["sqrt_max"] * 10 > math.sqrt(big)
    assert v["huge"] < big / 100 and v["huge"] * 1000 > big / 100


def test_tanh_saturation_in_float32_is_the_user_story():
    # tanh(10) == 1 exactly in float32 (docs/user_stories.md, user story 1)
    v = special_values(torch.float32)
    assert 9.01 < v["tanh_saturation"] - 1 < 9.02
    assert torch.tanh(torch.tensor(10.0)).item() == 1.0


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=IDS)
def test_real_grid_holds_the_documented_values(dtype):
    tiny, sub, eps, _ = IEEE[dtype]
    v = special_values(dtype)
    grid = Domain("real").hard_values(dtype)
    magnitudes = [1.0, tiny, sub, eps, math.sqrt(eps), v["sqrt_max"], v["huge"]]
    magnitudes += [v[k] for k in ("exp_max", "exp_overflow", "exp_tiny", "exp_underflow")]
    magnitudes += [v["sigmoid_saturation"], v["tanh_saturation"], 1e4]
    expected = rounded([0.0] + [s * m for m in magnitudes for s in (1, -1)], dtype)
    assert rounded(grid, dtype) == expected
    assert torch.isfinite(grid.to(dtype)).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=IDS)
def test_bounded_grids_of_the_other_kinds(dtype):
    tiny, sub, eps, _ = IEEE[dtype]
    positive = rounded(Domain("positive").hard_values(dtype), dtype)
    assert {tiny, sub, 1.0} <= positive and min(positive) == sub
    assert rounded(Domain("nonnegative").hard_values(dtype), dtype) == positive | {0.0}
    unit = rounded(Domain("unit").hard_values(dtype), dtype)
    assert {tiny, sub, 0.5, 1 - eps / 2, 1 - eps} <= unit
    corr = rounded(Domain("correlation").hard_values(dtype), dtype)
    assert {0.0, 1 - eps / 2, -(1 - eps / 2), tiny, -tiny} <= corr
    if dtype == torch.float64:
        assert 1.0 not in unit and 1.0 not in corr and -1.0 not in corr
    else:
        # tanh(10) and 1 - eps/8 are inside in float64 and round onto the boundary
        assert 1.0 in unit and {1.0, -1.0} <= corr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=IDS)
def test_grid_and_samples_lie_inside_in_float64(kind, dtype):
    d = Domain(kind)
    g = torch.Generator().manual_seed(1)
    for values in (d.hard_values(dtype), d.sample(2000, g, dtype)):
        assert values.dtype == torch.float64
        assert d.contains(values).all(), kind
        assert torch.isfinite(values.to(dtype)).all()


def test_typical_draws_follow_the_documented_ranges():
    g = torch.Generator().manual_seed(2)
    real = Domain("real").sample(20_000, g)
    assert real.abs().min() >= 1e-3 and real.abs().max() <= 10.0
    assert 0.45 < (real > 0).double().mean() < 0.55
    # log-uniform: a quarter of the magnitudes in each decade
    decade = ((real.abs().log10() >= -1) & (real.abs().log10() < 0)).double().mean()
    assert 0.23 < decade < 0.27
    logit = Domain("logit").sample(20_000, g)
    assert logit.abs().max() > 25.0 and logit.abs().max() <= 10**1.5
    unit = Domain("unit").sample(20_000, g)
    assert 0.0 < unit.min() and unit.max() < 1.0 and 0.48 < unit.mean() < 0.52


@settings(max_examples=40)
@given(
    kind=st.sampled_from(KINDS),
    a=st.floats(-1e6, 1e6),
    b=st.floats(-1e6, 1e6),
    dtype=st.sampled_from(ALL_DTYPES),
)
def test_bounded_domains_stay_inside(kind, a, b, dtype):
    lo_nat, hi_nat = {"unit": (0.0, 1.0), "correlation": (-1.0, 1.0)}.get(kind, (None, None))
    if kind in ("positive", "nonnegative"):
        lo_nat = 0.0
    low, high = sorted((a, b))
    if lo_nat is not None:
        low = max(low, lo_nat)
    if hi_nat is not None:
        high = min(high, hi_nat)
    if not low < high:
        return
    d = Domain(kind, low, high)
    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    if low > big or high < -big:
        with pytest.raises(AuditUsageError, match="holds no finite"):
            build_points([d, Domain("real")], dtype, g)
        return
    points = build_points([d, Domain("real")], dtype, g, max_pair_points=500, mixed_points=50)
    inside = d.contains(points[:, 0])
    assert inside.all()
    assert torch.isfinite(points.to(dtype)).all()
    # closed user bounds are in the grid (up to rounding) when representable
    hard = rounded(d.hard_values(dtype), dtype)
    for bound, natural in ((low, lo_nat), (high, hi_nat)):
        if bound != natural and abs(bound) <= big:
            assert rounded([bound], dtype) <= hard


def test_bounds_beyond_the_dtype_range_are_left_out():
    d = Domain.parse("real[-1e6,1e6]")
    assert -1e6 in d.hard_values(torch.float32).tolist()
    half = d.hard_values(torch.float16)
    assert torch.isfinite(half.to(torch.float16)).all() and -1e6 not in half.tolist()


def test_an_interval_holding_one_float64_number():
    d = Domain("positive", 0.0, 5e-324)  # (0, 2^-1074]: the midpoint rounds to 0
    g = torch.Generator().manual_seed(0)
    assert d.sample(100, g).tolist() == [5e-324] * 100
    assert d.hard_values(torch.float64).tolist() == [5e-324]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("real", Domain("real")),
        (" correlation ", Domain("correlation")),
        ("real[-100,100]", Domain("real", -100.0, 100.0)),
        ("positive[1e-3, 1e3]", Domain("positive", 1e-3, 1e3)),
        ("unit[0,0.5]", Domain("unit", 0.0, 0.5)),
        ("real[-inf,3]", Domain("real", -math.inf, 3.0)),
    ],
)
def test_parse(text, expected):
    assert Domain.parse(text) == expected
    assert Domain.parse(str(expected)) == expected


def test_interval_keeps_natural_ends_open():
    assert Domain.parse("unit[0,0.5]").interval() == (0.0, 0.5, False, True)
    assert Domain.parse("nonnegative").interval() == (0.0, math.inf, True, False)
    d = Domain.parse("unit[0,0.5]")
    assert d.contains(torch.tensor([0.0, 0.5, 0.25])).tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reals", "unknown domain kind 'reals'"),
        ("real[1,0]", "bad bounds [1, 0] for real"),
        ("unit[-1,1]", "bad bounds [-1, 1] for unit"),
        ("real[a,b]", "bounds must be numbers"),
        ("real[1]", "expected KIND or KIND[LOW,HIGH]"),
        ("real[nan,1]", "bad bounds"),
    ],
)
def test_bad_domain_strings(text, message):
    with pytest.raises(AuditUsageError, match=message.replace("[", r"\[")):
        Domain.parse(text)


def test_build_points_order_and_size():
    g = torch.Generator().manual_seed(0)
    domains = [Domain("real"), Domain("unit")]
    points = build_points(domains, torch.float32, g, mixed_points=100, typical_points=10)
    h0, h1 = (d.hard_values(torch.float32) for d in domains)
    # sweeps first: the hard values of argument 0, three times, then of argument 1
    assert torch.equal(points[: len(h0), 0], h0)
    assert torch.equal(points[len(h0) : 2 * len(h0), 0], h0)
    start = 3 * len(h0)
    assert torch.equal(points[start : start + len(h1), 1], h1)
    # then every pair of hard values, then mixed and typical draws
    pairs = points[3 * (len(h0) + len(h1)) :][: len(h0) * len(h1)]
    assert {(a, b) for a, b in pairs.tolist()} == {(a, b) for a in h0.tolist() for b in h1.tolist()}
    assert points.shape == (3 * (len(h0) + len(h1)) + len(h0) * len(h1) + 110, 2)


def test_pairs_are_capped_for_many_arguments():
    g = torch.Generator().manual_seed(0)
    domains = [Domain("real")] * 8
    points = build_points(domains, torch.float64, g, max_pair_points=5000)
    sweeps = 3 * 8 * len(Domain("real").hard_values(torch.float64))
    assert points.shape[0] <= sweeps + 5000 + 28 + 2500  # rounding per pair, mixed, typical
    assert points.shape[0] >= sweeps + 5000 - 28 + 2500


def test_dtype_names_cover_the_four_dtypes():
    assert set(DTYPES.values()) == set(ALL_DTYPES)
