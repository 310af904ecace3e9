"""mpmath oracles for the continuous Bernoulli and the Bernoulli / continuous-Bernoulli KL.

Every function takes Python floats (the exact values of the inputs *after* they were cast
to the dtype under test) and returns an ``mpmath.mpf`` from the textbook closed form:

* ``log_prob(x, eta) = eta x - log((e^eta - 1) / eta)``
* ``cdf(x, eta) = expm1(eta x) / expm1(eta)``, ``icdf(u, eta) = log1p(u expm1(eta)) / eta``
* ``A(eta) = log(expm1(eta) / eta)``, ``mean = 1/(1 - e^-eta) - 1/eta``,
  ``var = 1/eta^2 - 1/(4 sinh^2(eta/2))``, ``entropy = A - eta mean``
* Bernoulli KL: ``softplus(lp) - softplus(lq) - sigmoid(lq) (lp - lq)``
* continuous-Bernoulli KL: ``A(p) - A(q) - mean(q) (p - q)``

None of the implementation's series, reflections, quadrature or branch switches is reused.
These closed forms cancel badly (near eta = 0, near lq = lp, for large logits of one sign),
so each is evaluated by :func:`_converged`: at 30 significant digits, then at twice as
many, and so on, until two successive nonzero evaluations agree to 25 significant digits
(an exact 0 is what total cancellation produces at too low a precision, so it never counts
as converged; the callers return genuine zeros, e.g. at equal arguments, directly). The
returned value is therefore correct to ~25 digits regardless of the cancellation, far
beyond float64 (16 digits). At eta = 0 (0/0 in the closed forms) the analytic limit is
returned. Results are cached: every grid point costs one mpmath evaluation per process.
"""

from __future__ import annotations

import functools
import math

import mpmath
from mpmath import mp
from mpmath.libmp import round_nearest, to_float

_START_DPS = 30
_MAX_DPS = 40000
_AGREE = mpmath.mpf(10) ** -25


def _converged(fn, *args: float) -> mpmath.mpf:
    """``fn(*mpf_args)`` at doubling precision until two evaluations agree to 25 digits."""
    if not all(math.isfinite(a) for a in args):
        raise ValueError(f"{fn.__name__}{args}: the oracle takes finite inputs only")
    dps = _START_DPS
    with mp.workdps(dps):
        prev = fn(*(mpmath.mpf(a) for a in args))
    while dps < _MAX_DPS:
        dps *= 2
        with mp.workdps(dps):
            cur = fn(*(mpmath.mpf(a) for a in args))
            # An exact 0 is what total cancellation gives at too low a precision; genuine
            # zeros (equal arguments, cdf at 0 or 1, ...) are special-cased by the callers.
            if cur != 0 and abs(cur - prev) <= _AGREE * abs(cur):
                return +cur
        prev = cur
    raise RuntimeError(f"{fn.__name__}{args} did not converge by {_MAX_DPS} digits")


def to_float64(v: mpmath.mpf) -> float:
    """Round an mpf to the nearest float64 (+-inf on overflow, subnormal/0 on underflow)."""
    return to_float(mpmath.mpf(v)._mpf_, rnd=round_nearest)


# --------------------------------------------------------------------------------------
# Closed forms (mpf in, mpf out; called inside _converged's working precision)
# --------------------------------------------------------------------------------------


def _softplus(x):
    return mp.log1p(mp.exp(x))


def _sigmoid(x):
    return 1 / (1 + mp.exp(-x))


def _log_partition(eta):
    return mp.log(mp.expm1(eta) / eta)


def _mean(eta):
    return 1 / (-mp.expm1(-eta)) - 1 / eta


def _variance(eta):
    return 1 / eta**2 - 1 / (4 * mp.sinh(eta / 2) ** 2)


def _entropy(eta):
    return _log_partition(eta) - eta * _mean(eta)


def _log_prob(x, eta):
    return eta * x - _log_partition(eta)


def _cdf(x, eta):
    return mp.expm1(eta * x) / mp.expm1(eta)


def _icdf(u, eta):
    return mp.log1p(u * mp.expm1(eta)) / eta


def _log_prob_grad(x, eta):
    return x - _mean(eta)


def _cdf_grad(x, eta):
    # d/deta expm1(eta x) / expm1(eta)
    em1 = mp.expm1(eta)
    return (x * mp.exp(eta * x) * em1 - mp.expm1(eta * x) * mp.exp(eta)) / em1**2


def _icdf_grad(u, eta):
    # d/deta log1p(u expm1(eta)) / eta
    g = _icdf(u, eta)
    return u * mp.exp(eta) / (1 + u * mp.expm1(eta)) / eta - g / eta


def _bernoulli_kl(lq, lp):
    return _softplus(lp) - _softplus(lq) - _sigmoid(lq) * (lp - lq)


def _bernoulli_kl_dlq(lq, lp):
    # d/dlq [-softplus(lq) - sigmoid(lq)(lp - lq)] = -sigmoid'(lq)(lp - lq), with
    # sigmoid' = sigmoid(x) sigmoid(-x) = 1 / ((1 + e^-x)(1 + e^x)) (no 1 - sigmoid to lose)
    return -(lp - lq) / ((1 + mp.exp(-lq)) * (1 + mp.exp(lq)))


def _bernoulli_kl_dlp(lq, lp):
    return _sigmoid(lp) - _sigmoid(lq)


def _cb_kl(q, p):
    return _log_partition(p) - _log_partition(q) - _mean(q) * (p - q)


def _cb_kl_dq(q, p):
    return -_variance(q) * (p - q)


def _cb_kl_dp(q, p):
    return _mean(p) - _mean(q)


# --------------------------------------------------------------------------------------
# Public oracles (float in, mpf out), cached
# --------------------------------------------------------------------------------------

_HALF = mpmath.mpf(1) / 2
with mp.workdps(100):
    _TWELFTH = mpmath.mpf(1) / 12


@functools.cache
def log_partition(eta: float) -> mpmath.mpf:
    return mpmath.mpf(0) if eta == 0.0 else _converged(_log_partition, eta)


@functools.cache
def mean(eta: float) -> mpmath.mpf:
    return _HALF if eta == 0.0 else _converged(_mean, eta)


@functools.cache
def variance(eta: float) -> mpmath.mpf:
    return _TWELFTH if eta == 0.0 else _converged(_variance, eta)


@functools.cache
def entropy(eta: float) -> mpmath.mpf:
    return mpmath.mpf(0) if eta == 0.0 else _converged(_entropy, eta)


@functools.cache
def log_prob(x: float, eta: float) -> mpmath.mpf:
    """``eta x - A(eta)``; at eta = 0 the uniform density, log 1 = 0."""
    return mpmath.mpf(0) if eta == 0.0 else _converged(_log_prob, x, eta)


@functools.cache
def log_prob_grad(x: float, eta: float) -> mpmath.mpf:
    """``d log_prob / d eta = x - mean(eta)`` (``x - 1/2`` at eta = 0)."""
    if eta == 0.0:
        return mpmath.mpf(x) - _HALF
    return _converged(_log_prob_grad, x, eta)


@functools.cache
def cdf(x: float, eta: float) -> mpmath.mpf:
    if eta == 0.0 or x in (0.0, 1.0):
        return mpmath.mpf(x)  # uniform at eta = 0; F(0) = 0 and F(1) = 1 for every eta
    return _converged(_cdf, x, eta)


@functools.cache
def cdf_grad(x: float, eta: float) -> mpmath.mpf:
    """``d cdf / d eta`` (quotient rule on the closed form); ``x (x - 1) / 2`` at eta = 0."""
    if eta == 0.0:
        return mpmath.mpf(x) * (mpmath.mpf(x) - 1) / 2
    if x in (0.0, 1.0):
        return mpmath.mpf(0)  # cdf(0) = 0 and cdf(1) = 1 for every eta
    return _converged(_cdf_grad, x, eta)


@functools.cache
def icdf(u: float, eta: float) -> mpmath.mpf:
    if eta == 0.0 or u in (0.0, 1.0):
        return mpmath.mpf(u)
    return _converged(_icdf, u, eta)


@functools.cache
def icdf_grad(u: float, eta: float) -> mpmath.mpf:
    """``d icdf / d eta`` (closed-form derivative); ``-u (u - 1) / 2`` at eta = 0."""
    if eta == 0.0:
        return -mpmath.mpf(u) * (mpmath.mpf(u) - 1) / 2
    if u in (0.0, 1.0):
        return mpmath.mpf(0)  # icdf(0) = 0 and icdf(1) = 1 for every eta
    return _converged(_icdf_grad, u, eta)


@functools.cache
def bernoulli_kl(lq: float, lp: float) -> mpmath.mpf:
    return mpmath.mpf(0) if lq == lp else _converged(_bernoulli_kl, lq, lp)


@functools.cache
def bernoulli_kl_grad(lq: float, lp: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """``(dKL/dlq, dKL/dlp)``."""
    if lq == lp:
        return mpmath.mpf(0), mpmath.mpf(0)
    return _converged(_bernoulli_kl_dlq, lq, lp), _converged(_bernoulli_kl_dlp, lq, lp)


@functools.cache
def cb_kl(q: float, p: float) -> mpmath.mpf:
    """``KL(CB(q) || CB(p))``; the eta = 0 limits of A and mean are substituted."""
    if q == p:
        return mpmath.mpf(0)
    if q == 0.0:
        return _converged(lambda _q, pp: _log_partition(pp) - pp / 2, q, p)
    if p == 0.0:
        return _converged(lambda qq, _p: -_log_partition(qq) + _mean(qq) * qq, q, p)
    return _converged(_cb_kl, q, p)


@functools.cache
def cb_kl_grad(q: float, p: float) -> tuple[mpmath.mpf, mpmath.mpf]:
    """``(dKL/dq, dKL/dp) = (-var(q) (p - q), mean(p) - mean(q))``."""
    if q == p:
        return mpmath.mpf(0), mpmath.mpf(0)
    with mp.workdps(60):
        dq = -variance(q) * (mpmath.mpf(p) - mpmath.mpf(q))  # variance(q) has ~25 digits
    if q == 0.0:
        dp = _converged(lambda _q, pp: _mean(pp) - _HALF, q, p)
    elif p == 0.0:
        dp = _converged(lambda qq, _p: _HALF - _mean(qq), q, p)
    else:
        dp = _converged(_cb_kl_dp, q, p)
    return dq, dp
