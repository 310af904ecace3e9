"""Tests of ``probloss._core.constants`` against 50-digit mpmath values.

Bound: each constant is the float64 nearest its exact value or one neighbour (a difference
of at most 1 ulp; ``0.5 * x`` is exact, so the halves inherit their parent's error).
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest

from probloss._core import constants


@pytest.mark.parametrize(
    ("name", "exact"),
    [
        ("LOG_2", lambda: mp.log(2)),
        ("LOG_PI", lambda: mp.log(mp.pi)),
        ("LOG_2PI", lambda: mp.log(2 * mp.pi)),
        ("HALF_LOG_2PI", lambda: mp.log(2 * mp.pi) / 2),
        ("HALF_LOG_PI", lambda: mp.log(mp.pi) / 2),
    ],
)
def test_constant_within_one_ulp(name, exact):
    with mp.workdps(50):
        value = float(exact())
    got = getattr(constants, name)
    assert isinstance(got, float)
    assert abs(got - value) <= math.ulp(value)


def test_half_log_2pi_is_bitwise_the_normal_term():
    """The normal log density and the mixtures' fused kernels must use the same double."""
    assert constants.HALF_LOG_2PI == 0.5 * math.log(2.0 * math.pi)
