"""High-precision mpmath oracle for the functions in ``probloss.special``.

Every function here takes a Python ``float`` (the exact value of an input
after it has been cast to the dtype under test) and returns an ``mpmath.mpf``
computed from the textbook closed form at a working precision chosen large
enough to absorb the cancellation of that closed form at that input.  No
series expansion, asymptotic formula or branch switch of the implementation
under test is reused here: the only source of truth is the closed form
evaluated with many more digits than any float format has.

Precision rules (decimal digits):

* a base of ``_BASE_DPS`` = 40 digits, i.e. about 23 digits more than float64
  carries, so rounding the result to float64 is the only error that matters;
* plus ``k * max(0, -log10|x|)`` digits for closed forms that cancel like
  ``1/x**k`` at tiny ``x`` (e.g. ``cb_variance_grad`` subtracts two terms of
  size ``2/x**3`` to get ``-x/120``, which loses about ``4 log10(1/x)``
  digits);
* plus ``log10|x|`` digits where a large term cancels at large ``|x|``
  (``cb_entropy`` subtracts two terms of size ``x`` to get ``1 - log x``);
* plus ``x / ln 10`` digits where ``1 - exp(-x)`` must keep ``exp(-x)``
  (``log1mexp`` at large ``x``).

``tests/special/test_reference.py`` checks these rules by re-evaluating
every function at a much higher precision and comparing, and checks the
oracle against independent series/asymptotic expansions.

At the points where the closed form is 0/0 (eta == 0 for the continuous
Bernoulli functions) the analytic limit is returned.  Where the function is
undefined (log1mexp at x < 0) NaN is returned; where the exact value is
infinite, ``+-inf`` is returned.

At ``x = +-inf`` every function returns its limit there (:data:`LIMITS`, each
entry derived from the closed form in the comment next to it); the closed forms
are not evaluated at infinity (they read ``inf - inf`` or ``0/0`` there, and
the precision rules take ``log10|x|``).  ``tests/special/test_reference.py``
checks every limit against the closed form at ``|x| = 1e300``.

Use :func:`to_float64` to round a result to the nearest float64 (overflow to
``+-inf``, gradual underflow to subnormals/0).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import mpmath
from mpmath import mp
from mpmath.libmp import round_nearest, to_float

__all__ = [
    "CB",
    "LIMITS",
    "cb",
    "cb_entropy",
    "cb_entropy_grad",
    "cb_log_partition",
    "cb_mean",
    "cb_variance",
    "cb_variance_grad",
    "log1mexp",
    "log1mexp_grad",
    "log_cosh",
    "log_cosh_grad",
    "log_softplus",
    "log_softplus_grad",
    "softplus",
    "softplus_grad",
    "softplus_inverse",
    "softplus_inverse_grad",
    "to_float64",
]

_BASE_DPS = 40


def _decades_below_one(x: float) -> float:
    """``max(0, -log10|x|)``; 0 for x == 0 (callers handle 0 separately)."""
    if x == 0.0:
        return 0.0
    return max(0.0, -math.log10(abs(x)))


def _decades_above_one(x: float) -> float:
    if x == 0.0:
        return 0.0
    return max(0.0, math.log10(abs(x)))


# (limit at -inf, limit at +inf) of each oracle, from its closed form (A = cb_log_partition).
_INF, _NINF, _NAN = math.inf, -math.inf, math.nan
LIMITS: dict[str, tuple[float, float]] = {
    "log1mexp": (_NAN, 0.0),  # log(1 - e^-x) ~ -e^-x; x < 0 is outside the domain
    "log1mexp_grad": (_NAN, 0.0),  # 1 / expm1(x) ~ e^-x
    "softplus_inverse": (_NAN, _INF),  # log(expm1(y)) ~ y; y < 0 is outside the domain
    "softplus_inverse_grad": (_NAN, 1.0),  # 1 / (1 - e^-y)
    "softplus": (0.0, _INF),  # log1p(e^x): ~e^x at -inf, ~x at +inf
    "softplus_grad": (0.0, 1.0),  # sigmoid(x)
    "log_softplus": (_NINF, _INF),  # ~x at -inf, ~log x at +inf
    "log_softplus_grad": (1.0, 0.0),  # sigmoid / softplus: ~e^x / e^x at -inf, ~1/x at +inf
    "log_cosh": (_INF, _INF),  # ~|x| - log 2
    "log_cosh_grad": (-1.0, 1.0),  # tanh(x)
    "cb_log_partition": (_NINF, _INF),  # log(expm1(e) / e): ~-log|e| at -inf, ~e at +inf
    "cb_mean": (0.0, 1.0),  # 1/(1 - e^-e) - 1/e: ~-1/e at -inf, ~1 - 1/e at +inf
    "cb_variance": (0.0, 0.0),  # 1/e^2 - 1/(4 sinh(e/2)^2) ~ 1/e^2
    "cb_variance_grad": (0.0, 0.0),  # the third derivative ~ -2/e^3
    "cb_entropy": (_NINF, _NINF),  # A - e A' ~ 1 - log|e|
    "cb_entropy_grad": (0.0, 0.0),  # -e A'' ~ -1/e
}


def _limit(name: str, x: float) -> mpmath.mpf:
    """The limit of oracle ``name`` at ``x = +-inf`` (:data:`LIMITS`)."""
    return mpmath.mpf(LIMITS[name][x > 0])


def _dps(x: float, tiny_factor: float = 0.0, large: float = 0.0, extra: float = 0.0) -> int:
    return int(
        _BASE_DPS + tiny_factor * _decades_below_one(x) + large * _decades_above_one(x) + extra
    )


def to_float64(v) -> float:
    """Round an mpf to the nearest float64 (ties to even), +-inf on overflow."""
    v = mpmath.mpf(v)
    return to_float(v._mpf_, rnd=round_nearest)


# --------------------------------------------------------------------------
# log1mexp(x) = log(1 - exp(-x)),  x >= 0
# --------------------------------------------------------------------------


@functools.cache
def log1mexp(x: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(x) or x < 0.0:
        return mp.nan
    if math.isinf(x):
        return _limit("log1mexp", x)
    if x == 0.0:
        return mp.ninf
    # 1 - exp(-x) has to keep exp(-x) relative to 1: x/ln10 extra digits.
    # For x >= 760 the exact value (about -exp(-x) > -1e-330) rounds to -0.0
    # in every float format; no extra digits are spent there and the oracle
    # returns 0 (the tests compare such values with an absolute bound).
    extra = x / math.log(10.0) if x < 760.0 else 0.0
    with mp.workdps(_dps(x, extra=extra) + _boost):
        return +mp.log(-mp.expm1(-mp.mpf(x)))


@functools.cache
def log1mexp_grad(x: float, _boost: int = 0) -> mpmath.mpf:
    """d/dx log1mexp(x) = 1 / expm1(x); +inf at x == 0."""
    if math.isnan(x) or x < 0.0:
        return mp.nan
    if math.isinf(x):
        return _limit("log1mexp_grad", x)
    if x == 0.0:
        return mp.inf
    with mp.workdps(_dps(x) + _boost):
        return +(1 / mp.expm1(mp.mpf(x)))


# --------------------------------------------------------------------------
# softplus_inverse(y) = log(expm1(y)),  y > 0
# --------------------------------------------------------------------------


@functools.cache
def softplus_inverse(y: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(y) or y < 0.0:
        return mp.nan
    if math.isinf(y):
        return _limit("softplus_inverse", y)
    if y == 0.0:
        return mp.ninf
    # Near the root y = ln 2 the result is about 2 (y - ln 2); a float input
    # is never closer than ~1e-17 * 2**-k to ln 2 for any dtype here, so 40
    # extra digits keep the relative error of the root region negligible.
    with mp.workdps(_dps(y, extra=40) + _boost):
        return +mp.log(mp.expm1(mp.mpf(y)))


@functools.cache
def softplus_inverse_grad(y: float, _boost: int = 0) -> mpmath.mpf:
    """d/dy log(expm1(y)) = 1 / (1 - exp(-y)) = 1 / -expm1(-y); +inf at 0."""
    if math.isnan(y) or y < 0.0:
        return mp.nan
    if math.isinf(y):
        return _limit("softplus_inverse_grad", y)
    if y == 0.0:
        return mp.inf
    with mp.workdps(_dps(y) + _boost):
        return +(1 / -mp.expm1(-mp.mpf(y)))


# --------------------------------------------------------------------------
# softplus(x) = log1p(exp(x)) and log_softplus(x) = log(softplus(x))
# --------------------------------------------------------------------------


@functools.cache
def softplus(x: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("softplus", x)
    # mpmath's exponent range is unbounded, so exp(-1e30) and log1p of it are exact.
    with mp.workdps(_dps(x) + _boost):
        return +mp.log1p(mp.exp(mp.mpf(x)))


@functools.cache
def softplus_grad(x: float, _boost: int = 0) -> mpmath.mpf:
    """sigmoid(x)."""
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("softplus_grad", x)
    with mp.workdps(_dps(x) + _boost):
        return +(1 / (1 + mp.exp(-mp.mpf(x))))


@functools.cache
def log_softplus(x: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("log_softplus", x)
    with mp.workdps(_dps(x) + _boost):
        return +mp.log(mp.log1p(mp.exp(mp.mpf(x))))


@functools.cache
def log_softplus_grad(x: float, _boost: int = 0) -> mpmath.mpf:
    """sigmoid(x) / softplus(x)."""
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("log_softplus_grad", x)
    with mp.workdps(_dps(x) + _boost):
        t = mp.mpf(x)
        return +(1 / (1 + mp.exp(-t)) / mp.log1p(mp.exp(t)))


# --------------------------------------------------------------------------
# log_cosh(x) = log(cosh(x))
# --------------------------------------------------------------------------


@functools.cache
def log_cosh(x: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("log_cosh", x)
    if x == 0.0:
        return mp.zero
    # cosh(x) = 1 + x**2/2 + ...: the log of it keeps x**2/2 only with
    # 2*log10(1/x) extra digits.
    with mp.workdps(_dps(x, tiny_factor=2) + _boost):
        return +mp.log(mp.cosh(mp.mpf(x)))


@functools.cache
def log_cosh_grad(x: float, _boost: int = 0) -> mpmath.mpf:
    if math.isnan(x):
        return mp.nan
    if math.isinf(x):
        return _limit("log_cosh_grad", x)
    with mp.workdps(_dps(x) + _boost):
        return +mp.tanh(mp.mpf(x))


# --------------------------------------------------------------------------
# Continuous Bernoulli in its natural parameter eta.
#   A(eta)   = log(expm1(eta) / eta)                       (log-partition)
#   A'(eta)  = 1/(1 - exp(-eta)) - 1/eta                   (mean)
#   A''(eta) = 1/eta**2 - 1/(4 sinh(eta/2)**2)             (variance)
#   A'''     = -2/eta**3 + cosh(eta/2) / (4 sinh(eta/2)**3)
#   H(eta)   = A(eta) - eta A'(eta)                        (entropy)
#   H'(eta)  = -eta A''(eta)
# --------------------------------------------------------------------------


class CB(NamedTuple):
    log_partition: mpmath.mpf
    mean: mpmath.mpf
    variance: mpmath.mpf
    variance_grad: mpmath.mpf
    entropy: mpmath.mpf
    entropy_grad: mpmath.mpf


with mp.workdps(200):  # 1/12 is not a dyadic rational: keep 200 digits of it
    _CB_AT_ZERO = CB(
        log_partition=mp.zero,
        mean=mpmath.mpf(1) / 2,
        variance=mpmath.mpf(1) / 12,
        variance_grad=mp.zero,
        entropy=mp.zero,
        entropy_grad=mp.zero,
    )


@functools.cache
def cb(eta: float, _boost: int = 0) -> CB:
    """All continuous-Bernoulli quantities at ``eta`` from their closed forms."""
    if math.isnan(eta):
        return CB(*([mp.nan] * 6))
    if math.isinf(eta):
        return CB(*(_limit(f"cb_{f}", eta) for f in CB._fields))
    if eta == 0.0:
        return _CB_AT_ZERO
    # A''' cancels two terms of size 2/eta**3 down to -eta/120: 4 digits per
    # decade below 1; H cancels two terms of size eta at large eta: 1 digit
    # per decade above 1.
    with mp.workdps(_dps(eta, tiny_factor=4, large=1) + _boost):
        e = mp.mpf(eta)
        log_partition = mp.log(mp.expm1(e) / e)
        mean = 1 / (-mp.expm1(-e)) - 1 / e
        s = mp.sinh(e / 2)
        c = mp.cosh(e / 2)
        variance = 1 / e**2 - 1 / (4 * s**2)
        variance_grad = -2 / e**3 + c / (4 * s**3)
        entropy = log_partition - e * mean
        entropy_grad = -e * variance
        return CB(log_partition, mean, variance, variance_grad, entropy, entropy_grad)


def cb_log_partition(eta: float) -> mpmath.mpf:
    return cb(eta).log_partition


def cb_mean(eta: float) -> mpmath.mpf:
    return cb(eta).mean


def cb_variance(eta: float) -> mpmath.mpf:
    return cb(eta).variance


def cb_variance_grad(eta: float) -> mpmath.mpf:
    return cb(eta).variance_grad


def cb_entropy(eta: float) -> mpmath.mpf:
    return cb(eta).entropy


def cb_entropy_grad(eta: float) -> mpmath.mpf:
    return cb(eta).entropy_grad
