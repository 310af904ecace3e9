"""Tests of ``probloss.functional.mixture``: mixture log densities and NLLs (MDN losses).

Where the numbers come from
---------------------------
* scipy, float64 (moderate inputs): ``scipy.special.logsumexp`` of the log weights
  ``logits - logsumexp(logits)`` plus ``scipy.stats.norm.logpdf`` summed over the ``D``
  coordinates (diagonal mixture), ``scipy.stats.multivariate_normal.logpdf`` per component
  (bivariate mixture with covariance ``[[s1^2, rho s1 s2], [rho s1 s2, s2^2]]``, full
  covariance ``L L^T``).
* mpmath (far targets, saturated correlations): the tutorial *probability-space* formula
  ``log(sum_k pi_k prod_d N(x_d | mu_kd, s_kd))`` (``mpmath.npdf``) and, for the bivariate
  mixture, ``exp(-N / (2 (1 - rho^2))) / (2 pi s1 s2 sqrt(1 - rho^2))`` with
  ``N = z1^2 - 2 rho z1 z2 + z2^2``, evaluated with an unbounded exponent range at
  ``40 + 4|a|/ln 10`` digits (``1 - tanh(a)^2 ~ 4 e^{-2|a|}`` keeps 25+ digits). Inputs are
  the exact values *after* the cast to the dtype under test. Cached per process.
* Gradients of the references: the responsibilities ``r_k = pi_k p_k / p`` times the
  component derivatives (Bishop 1994 eqs. 34-39 for the diagonal normal,
  ``d/dx1 = -(z1 - rho z2) / ((1 - rho^2) s1)``, ``d/dlog s1 = -1 + z1 (z1 - rho z2) /
  (1 - rho^2)``, ``d/da = rho + z1 z2 - rho N / (1 - rho^2)`` for the bivariate one), and
  ``r - pi`` for the logits; these formulas are checked against ``mpmath.diff`` of the
  probability-space mixture in :func:`test_reference_gradients_match_mpmath_diff`.
* Mixture weights as ``probs``: ``scipy.special.logsumexp(lp, b=probs)`` in float64, and
  ``d/dw_k = exp(lp_k - that) - 1 / sum w`` (the derivative of ``log sum_k w_k p_k``).
* Closed forms where the answer is exact: responsibilities ``1/K`` at ties, the live
  component's ``z / sigma`` when the other is beyond the float range, sub-mixtures
  without a zero-weight component.

Bounds
------
A result is a log-sum-exp of terms ``log pi_k - Q_k/2 - sum log s + ...`` and each gradient a
responsibility-weighted sum of terms; the attainable error is a few ``eps`` times ``S``, the
sum of the magnitudes of those terms (``eps`` of the compute dtype; float32 for half
inputs). ``S`` is computed with the reference:

* value: ``|ref| + sum_k r_k T_k`` with ``T_k = |log pi_k| + |normaliser_k| + Q_k/2`` the
  magnitudes of component ``k``'s terms;
* d/dloc, d/dlog_scale, d/datanh_rho: ``R_k`` times the magnitudes of the terms of the
  component derivative (``|z|/s``, ``z^2 + 1``; for the bivariate one ``(alpha |p| + beta |m|)
  / s_i``, ``1 + |z_i| (alpha |p| + beta |m|)``, ``|tanh a| + e^{-2a} p^2/4 + e^{2a} m^2/4``
  with ``p, m = z1 +- z2``, ``alpha, beta = (1 + e^{-+2a})/4``), where
  ``R_k = r_k (1 + T_k + |ref|) + FLUSH/eps``: a responsibility is ``exp`` of an exponent of
  that size and inherits its absolute rounding, and responsibilities are flushed to 0 below
  ``FLUSH`` (documented in the module);
* d/dvalue: the sum over components of the d/dloc scales; d/dlogits: ``R_k + P_k`` with
  ``P_k = pi_k (1 + |l_k| + |logsumexp(l)|)``.

Against the references: ``|err| <= 32 eps S``. Fused against the plain path (the agreement
the fused kernels promise): ``|err| <= 1e-5 S`` in float32, ``1e-12 S`` in float64.
Measured worst (the seeded inputs of this file): against the references 1.1 eps S (float32)
and 6.4 eps S (float64); fused vs plain 1.6e-6 S (float32, 13 eps S) and, in float64,
7.9e-16 S for the diagonal mixture and 3.2e-14 S for the bivariate one (d/dloc at points
within 1e-3 scales of a correlation line with |a| up to 12, where the problem itself is
ill-conditioned: the rounding of ``z1 - z2`` is amplified by ``e^{|a|}``).
"""

from __future__ import annotations

import functools
import math

import mpmath
import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mpmath import mp

from probloss.functional.bivariate import bivariate_normal_log_prob
from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_nll,
    mixture_log_prob,
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_nll,
)
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.functional.cb_reference import to_float64

LOG_2PI = math.log(2.0 * math.pi)
INF = math.inf
AGREE_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}  # fused vs plain, times S
REF_EPS = 32  # against the references: 32 eps S
# Responsibilities below 2 exp(-86) (float32) / 2 exp(-707) (float64) times the largest are
# flushed to 0 and the others shifted by at most that (documented in
# probloss.functional.mixture): an absolute error, added to the responsibility scales in
# units of eps.
FLUSH = {torch.float32: 9e-38, torch.float64: 1.8e-307}


def _flush_eps(dtype: torch.dtype) -> float:
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    return FLUSH[compute] / torch.finfo(compute).eps


NORMAL_NAMES = ("value", "d_value", "d_logits", "d_loc", "d_log_scale")
BIVARIATE_NAMES = (*NORMAL_NAMES, "d_atanh_rho")


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(_compute(dtype)).eps


def _value_and_grads(fn, inputs, **kwargs) -> list[np.ndarray]:
    """``[value, d/dinput_0, ...]`` of ``fn(*inputs).sum()`` as float64 arrays."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out.sum(), leaves)
    return [t.detach().double().numpy() for t in (out, *grads)]


def _check(got, expected, scale, bound, names, what) -> float:
    """``|got - expected| <= bound * scale`` for every output; returns the worst ratio."""
    worst = 0.0
    for name, g, e, s in zip(names, got, expected, scale, strict=True):
        g, e, s = np.broadcast_arrays(np.asarray(g), np.asarray(e), np.asarray(s))
        labels = [f"{name}{idx}" for idx in np.ndindex(g.shape)]
        ratio = assert_within(g.ravel(), e.ravel(), bound * s.ravel(), labels, f"{what} {name}")
        worst = max(worst, ratio * bound)
    return worst


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ======================================================================================
# References: scipy (float64) and mpmath
# ======================================================================================


def _normal_reference(x, logits, loc, log_scale, flush=0.0) -> tuple[list, list]:
    """scipy float64: ``([value, d_x, d_logits, d_loc, d_log_scale], [scales ...])``."""
    x, logits, loc, log_scale = (
        np.asarray(t, dtype=np.float64) for t in (x, logits, loc, log_scale)
    )
    log_w = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    scale = np.exp(log_scale)
    component = scipy.stats.norm.logpdf(x[..., None, :], loc, scale).sum(-1)
    joint = log_w + component
    value = scipy.special.logsumexp(joint, axis=-1)
    r = np.exp(joint - value[..., None])
    z = (x[..., None, :] - loc) / scale
    d_loc = r[..., None] * z / scale
    grads = [-d_loc.sum(-2), r - np.exp(log_w), d_loc, r[..., None] * (z * z - 1.0)]
    terms = np.abs(log_w) + (0.5 * z * z + np.abs(log_scale) + 0.5 * LOG_2PI).sum(-1)
    ra = r * (1 + terms + np.abs(value)[..., None]) + flush  # r, its exponent's rounding
    pa = _amplified_weights(logits)
    scales = [
        np.abs(value) + (r * terms).sum(-1),
        (ra[..., None] * np.abs(z) / scale).sum(-2),
        ra + pa,
        ra[..., None] * np.abs(z) / scale,
        ra[..., None] * (z * z + 1.0),
    ]
    return [value, *grads], scales


def _amplified_weights(logits: np.ndarray) -> np.ndarray:
    """``pi (1 + |logits| + |logsumexp(logits)|)``: pi with the rounding of its exponent."""
    lse = scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return np.exp(logits - lse) * (1 + np.abs(logits) + np.abs(lse))


def _bivariate_terms(z1, z2, log_scale, a, exp, tanh, cosh_log):
    """Component value pieces, textbook derivatives and magnitude scales (any number type)."""
    s1, s2 = exp(log_scale[0]), exp(log_scale[1])
    rho = tanh(a)
    one_minus = 1 - rho * rho
    n = z1 * z1 - 2 * rho * z1 * z2 + z2 * z2
    log_n = -LOG_2PI - log_scale[0] - log_scale[1] - 0.5 * cosh_log(one_minus) - n / (2 * one_minus)
    dx = (-(z1 - rho * z2) / (one_minus * s1), -(z2 - rho * z1) / (one_minus * s2))
    dl = (-1 + z1 * (z1 - rho * z2) / one_minus, -1 + z2 * (z2 - rho * z1) / one_minus)
    da = rho + z1 * z2 - rho * n / one_minus
    p, m = z1 + z2, z1 - z2
    alpha, beta = (1 + exp(-2 * a)) / 4, (1 + exp(2 * a)) / 4
    g = alpha * abs(p) + beta * abs(m)
    q_half = (alpha * p * p + beta * m * m) / 2
    size = LOG_2PI + abs(log_scale[0]) + abs(log_scale[1]) - 0.5 * cosh_log(one_minus) + q_half
    scales = (g / s1, g / s2, 1 + abs(z1) * g, 1 + abs(z2) * g)
    g_a = abs(rho) + exp(-2 * a) * p * p / 4 + exp(2 * a) * m * m / 4
    return log_n, dx, dl, da, size, scales, g_a


def _bivariate_reference(x, logits, loc, log_scale, a, flush=0.0) -> tuple[list, list]:
    """scipy float64 values (``multivariate_normal.logpdf``), textbook gradients."""
    x, logits, loc, log_scale, a = (
        np.asarray(t, dtype=np.float64) for t in (x, logits, loc, log_scale, a)
    )
    (n, k) = logits.shape
    log_w = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    component = np.empty((n, k))
    for i in range(n):
        for j in range(k):
            s1, s2 = np.exp(log_scale[i, j])
            rho = np.tanh(a[i, j])
            cov = [[s1 * s1, rho * s1 * s2], [rho * s1 * s2, s2 * s2]]
            component[i, j] = scipy.stats.multivariate_normal.logpdf(x[i], loc[i, j], cov)
    joint = log_w + component
    value = scipy.special.logsumexp(joint, axis=-1)
    r = np.exp(joint - value[..., None])
    z = (x[:, None, :] - loc) / np.exp(log_scale)
    _, dx, dl, da, size, sc, g_a = _bivariate_terms(
        z[..., 0], z[..., 1], np.moveaxis(log_scale, -1, 0), a, np.exp, np.tanh, np.log
    )
    d_loc = -r[..., None] * np.stack(dx, -1)
    grads = [-d_loc.sum(-2), r - np.exp(log_w), d_loc, r[..., None] * np.stack(dl, -1), r * da]
    terms = size + np.abs(log_w)
    ra = r * (1 + terms + np.abs(value)[..., None]) + flush  # r, its exponent's rounding
    scales = [
        np.abs(value) + (r * terms).sum(-1),
        (ra[..., None] * np.stack(sc[:2], -1)).sum(-2),
        ra + _amplified_weights(logits),
        ra[..., None] * np.stack(sc[:2], -1),
        ra[..., None] * np.stack(sc[2:], -1),
        ra * g_a,
    ]
    return [value, *grads], scales


@functools.cache
def normal_oracle(event: tuple, flush: float = 0.0) -> tuple[tuple, tuple]:
    """mpmath: ``(outputs, scales)`` of one event ``(x, logits, loc, log_scale)`` (tuples).

    The density is the tutorial product of pdfs, ``sum_k pi_k prod_d npdf``, in mpmath.
    """
    x, logits, loc, log_scale = event
    with mp.workdps(40):
        lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
        log_w = [v - lse for v in logits]
        dens = []
        for mu_k, ls_k in zip(loc, log_scale, strict=True):
            dens.append(
                mp.fprod(
                    mp.npdf(xd, m, mp.exp(lv)) for xd, m, lv in zip(x, mu_k, ls_k, strict=True)
                )
            )
        weights = [mp.exp(lw) for lw in log_w]
        total = mp.fsum(w * p for w, p in zip(weights, dens, strict=True))
        value = mp.log(total)
        r = [w * p / total for w, p in zip(weights, dens, strict=True)]
        z = [
            [(xd - m) / mp.exp(lv) for xd, m, lv in zip(x, mu_k, ls_k, strict=True)]
            for mu_k, ls_k in zip(loc, log_scale, strict=True)
        ]
        d_loc = [
            [rk * zd / mp.exp(lv) for zd, lv in zip(zk, ls_k, strict=True)]
            for rk, zk, ls_k in zip(r, z, log_scale, strict=True)
        ]
        d_ls = [[rk * (zd * zd - 1) for zd in zk] for rk, zk in zip(r, z, strict=True)]
        d_x = [-mp.fsum(row[d] for row in d_loc) for d in range(len(x))]
        terms = [
            abs(lw)
            + mp.fsum(zd * zd / 2 + abs(lv) + LOG_2PI / 2 for zd, lv in zip(zk, ls_k, strict=True))
            for lw, zk, ls_k in zip(log_w, z, log_scale, strict=True)
        ]
        outputs = (value, d_x, [rk - w for rk, w in zip(r, weights, strict=True)], d_loc, d_ls)
        ra = [rk * (1 + t + abs(value)) + flush for rk, t in zip(r, terms, strict=True)]
        pa = [w * (1 + abs(v) + abs(lse)) for w, v in zip(weights, logits, strict=True)]
        d_loc_scale = [
            [rak * abs(zd) / mp.exp(lv) for zd, lv in zip(zk, ls_k, strict=True)]
            for rak, zk, ls_k in zip(ra, z, log_scale, strict=True)
        ]
        scales = (
            abs(value) + mp.fsum(rk * t for rk, t in zip(r, terms, strict=True)),
            [mp.fsum(row[d] for row in d_loc_scale) for d in range(len(x))],
            [u + v for u, v in zip(ra, pa, strict=True)],
            d_loc_scale,
            [[rak * (zd * zd + 1) for zd in zk] for rak, zk in zip(ra, z, strict=True)],
        )
        return _to_float(outputs), _to_float(scales)


@functools.cache
def bivariate_oracle(event: tuple, flush: float = 0.0) -> tuple[tuple, tuple]:
    """mpmath: ``(outputs, scales)`` of one event ``(x, logits, loc, log_scale, a)``."""
    x, logits, loc, log_scale, a = event
    with mp.workdps(40 + int(4 * max(abs(v) for v in a) / math.log(10.0))):
        lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
        log_w = [v - lse for v in logits]
        comps = []
        for mu_k, ls_k, a_k in zip(loc, log_scale, a, strict=True):
            z1 = (x[0] - mu_k[0]) / mp.exp(ls_k[0])
            z2 = (x[1] - mu_k[1]) / mp.exp(ls_k[1])
            comps.append(_bivariate_terms(z1, z2, ls_k, mpmath.mpf(a_k), mp.exp, mp.tanh, mp.log))
        weights = [mp.exp(lw) for lw in log_w]
        dens = [mp.exp(c[0]) for c in comps]
        total = mp.fsum(w * p for w, p in zip(weights, dens, strict=True))
        value = mp.log(total)
        r = [w * p / total for w, p in zip(weights, dens, strict=True)]
        d_loc = [[-rk * c[1][0], -rk * c[1][1]] for rk, c in zip(r, comps, strict=True)]
        outputs = (
            value,
            [-mp.fsum(row[i] for row in d_loc) for i in range(2)],
            [rk - w for rk, w in zip(r, weights, strict=True)],
            d_loc,
            [[rk * c[2][0], rk * c[2][1]] for rk, c in zip(r, comps, strict=True)],
            [rk * c[3] for rk, c in zip(r, comps, strict=True)],
        )
        terms = [c[4] + abs(lw) for c, lw in zip(comps, log_w, strict=True)]
        ra = [rk * (1 + t + abs(value)) + flush for rk, t in zip(r, terms, strict=True)]
        pa = [w * (1 + abs(v) + abs(lse)) for w, v in zip(weights, logits, strict=True)]
        scales = (
            abs(value) + mp.fsum(rk * t for rk, t in zip(r, terms, strict=True)),
            [mp.fsum(rak * c[5][i] for rak, c in zip(ra, comps, strict=True)) for i in range(2)],
            [u + v for u, v in zip(ra, pa, strict=True)],
            [[rak * c[5][0], rak * c[5][1]] for rak, c in zip(ra, comps, strict=True)],
            [[rak * c[5][2], rak * c[5][3]] for rak, c in zip(ra, comps, strict=True)],
            [rak * c[6] for rak, c in zip(ra, comps, strict=True)],
        )
        return _to_float(outputs), _to_float(scales)


def _to_float(tree):
    if isinstance(tree, (list, tuple)):
        return tuple(_to_float(v) for v in tree)
    return to_float64(tree)


def _events(*tensors: torch.Tensor) -> list[tuple]:
    """Per-event nested tuples of exact float64 values (the oracle's cache keys)."""
    rows = [t.double().tolist() for t in tensors]

    def freeze(v):
        return tuple(freeze(u) for u in v) if isinstance(v, list) else float(v)

    return [tuple(freeze(r[i]) for r in rows) for i in range(len(rows[0]))]


def _oracle_arrays(oracle, events, flush=0.0) -> tuple[list, list]:
    results = [oracle(e, flush) for e in events]
    n = len(results[0][0])
    outs = [np.array([res[0][i] for res in results]) for i in range(n)]
    scales = [np.array([res[1][i] for res in results]) for i in range(n)]
    return outs, scales


# ======================================================================================
# Inputs
# ======================================================================================


def normal_inputs(n, k, d, dtype, seed, *, spread=1.0, log_scale_range=1.0, logit_scale=2.0):
    """Seeded ``(x, logits, loc, log_scale)``; ``x`` is ``spread`` scales off a component."""
    g = _seeded(seed)
    logits = logit_scale * torch.randn(n, k, generator=g, dtype=torch.float64)
    loc = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    log_scale = log_scale_range * (2 * torch.rand(n, k, d, generator=g, dtype=torch.float64) - 1)
    pick = torch.randint(k, (n,), generator=g)
    direction = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = loc[torch.arange(n), pick] + spread * direction * log_scale[torch.arange(n), pick].exp()
    return tuple(t.to(dtype) for t in (x, logits, loc, log_scale))


def bivariate_inputs(n, k, dtype, seed, *, spread=1.0, a_range=2.0):
    x, logits, loc, log_scale = normal_inputs(n, k, 2, torch.float64, seed, spread=spread)
    a = a_range * (2 * torch.rand(n, k, generator=_seeded(seed + 1), dtype=torch.float64) - 1)
    return tuple(t.to(dtype) for t in (x, logits, loc, log_scale, a))


def on_the_line(n, k, dtype, a_value, seed):
    """Bivariate events exactly on every component's correlation line (a > 0: z1 == z2) or
    anti-line (a < 0: z1 == -z2): equal log-scales and residuals in both coordinates, so
    ``Q`` stays finite although ``|a| = 50`` (``1 - tanh(a)^2 = 0`` in float32)."""
    g = _seeded(seed)
    sign = 1.0 if a_value > 0 else -1.0
    c = torch.randn(n, k, generator=g, dtype=torch.float64)
    ls = 3 * (2 * torch.rand(n, k, generator=g, dtype=torch.float64) - 1)
    t = torch.randn(n, 1, generator=g, dtype=torch.float64)
    x = torch.cat([t, sign * t], -1)
    loc = torch.stack([c, sign * c], -1)
    log_scale = torch.stack([ls, ls], -1)
    logits = 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    a = torch.full((n, k), a_value, dtype=torch.float64)
    return tuple(v.to(dtype) for v in (x, logits, loc, log_scale, a))


# ======================================================================================
# mixture_log_prob
# ======================================================================================


def test_mixture_log_prob_matches_scipy():
    """Random (unnormalised) logits and component log densities, float64, against
    ``scipy.special.logsumexp(logits - logsumexp(logits) + lp)``: ``|err| <= 32 eps S`` with
    ``S = |ref| + max_k |log pi_k + lp_k|``; gradients ``r`` and ``r - pi`` (scipy) within
    ``32 eps`` times ``r (1 + |joint| + |ref|)`` (+ the same for ``pi``): the rounding of
    an exponent of that size."""
    g = _seeded(0)
    lp = 30 * torch.randn(50, 7, generator=g, dtype=torch.float64)
    logits = 5 * torch.randn(50, 7, generator=g, dtype=torch.float64) + 3.0
    got, d_lp, d_logits = _value_and_grads(mixture_log_prob, (lp, logits))
    log_w = scipy.special.log_softmax(logits.numpy(), axis=-1)
    joint = log_w + lp.numpy()
    ref = scipy.special.logsumexp(joint, axis=-1)
    s = np.abs(ref) + np.abs(joint).max(-1)
    assert_within(got, ref, REF_EPS * 2.2e-16 * s, list(range(50)), "mixture_log_prob")
    # r = exp(joint - lse) and pi inherit the absolute rounding of their exponents
    r, pi = np.exp(joint - ref[:, None]), np.exp(log_w)
    scale_r = r * (1 + np.abs(joint) + np.abs(ref)[:, None])
    scale_pi = pi * (1 + np.abs(log_w) + np.abs(logits.numpy()))
    bound = REF_EPS * 2.2e-16
    assert_within(d_lp.ravel(), r.ravel(), (bound * scale_r).ravel(), range(350), "d/dlp")
    assert_within(
        d_logits.ravel(),
        (r - pi).ravel(),
        (bound * (scale_r + scale_pi)).ravel(),
        range(350),
        "d/dlogits",
    )


def test_mixture_log_prob_zero_weights_and_impossible_rows():
    """-inf logits, -inf component log densities and all--inf rows: exact expected values
    (hand-computed: log(1/2 e^-1 + 1/2 e^-3)) and gradients, never NaN."""
    logits = torch.tensor([[0.0, 0.0, -INF], [0.0, 0.0, -INF], [1.0, 2.0, 3.0]], requires_grad=True)
    lp = torch.tensor(
        [[-1.0, -3.0, 5.0], [-INF, -INF, 5.0], [-INF, -2.0, -INF]],
        dtype=torch.float64,
        requires_grad=True,
    )
    out = mixture_log_prob(lp, logits)
    assert out.dtype == torch.float64
    expected_0 = math.log(0.5 * math.exp(-1.0) + 0.5 * math.exp(-3.0))
    pi = torch.softmax(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), -1)
    torch.testing.assert_close(
        out.detach(),
        torch.tensor([expected_0, -INF, math.log(pi[1]) - 2.0], dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )
    out.sum().backward()
    r0 = 1.0 / (1.0 + math.exp(-2.0))
    expected_lp = [[r0, 1 - r0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    torch.testing.assert_close(lp.grad, torch.tensor(expected_lp, dtype=torch.float64))
    # row 1 (impossible, value -inf): gradient 0; row 2: r - pi with r = (0, 1, 0)
    expected_logits = [[r0 - 0.5, 0.5 - r0, 0.0], [0.0, 0.0, 0.0], [-pi[0], 1 - pi[1], -pi[2]]]
    torch.testing.assert_close(
        logits.grad, torch.tensor(expected_logits, dtype=torch.float32), rtol=1e-6, atol=1e-7
    )


def test_mixture_log_prob_gradcheck_and_gradgradcheck():
    """float64 finite-difference checks (torch defaults), also with a zero-weight component
    and an impossible component; the backward is differentiable again."""
    g = _seeded(1)
    lp = torch.randn(4, 3, generator=g, dtype=torch.float64)
    lp[1, 2] = -INF
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logits[2, 0] = -INF
    lp.requires_grad_(True)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(mixture_log_prob, (lp, logits))
    assert torch.autograd.gradgradcheck(mixture_log_prob, (lp, logits))


def test_mixture_log_prob_half_precision_and_broadcast():
    """float16 inputs are computed in float32 (reference: the float32 call on the same
    rounded values, identical); logits ``(K,)`` broadcast against ``(*, K)``."""
    lp = torch.tensor([[-1.0, -2.0], [300.0, -300.0]], dtype=torch.float16)
    logits = torch.tensor([0.5, -0.5], dtype=torch.float16)
    out = mixture_log_prob(lp, logits)
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, mixture_log_prob(lp.float(), logits.float()), rtol=0, atol=0)


# ======================================================================================
# Diagonal normal mixture: references
# ======================================================================================


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("d", [1, 2, 3, 6])
def test_normal_mixture_matches_scipy(d, fused):
    """float64, moderate inputs (targets within 3 scales, log_scale in [-1, 1]): value and
    every gradient against scipy / Bishop's formulas, ``|err| <= 32 eps S``."""
    inputs = normal_inputs(40, 4, d, torch.float64, seed=10 + d, spread=3.0)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    flush = _flush_eps(torch.float64)
    expected, scale = _normal_reference(*(t.numpy() for t in inputs), flush=flush)
    _check(got, expected, scale, REF_EPS * _eps(torch.float64), NORMAL_NAMES, f"D={d}")


FAR = [1e3, 1e4, 1e5, 1e6]  # residuals in scales of the nearest component


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_mixture_far_targets_match_mpmath(dtype, fused):
    """Targets 1e3..1e6 scales from every mean: the tutorial product of pdfs underflows to
    0 (its log -inf, its gradient NaN) in float32 *and* float64; ours is within 32 eps S
    of mpmath's evaluation of that same formula, in value and every gradient."""
    events = []
    for i, spread in enumerate(FAR):
        events.append(normal_inputs(3, 3, 2, dtype, seed=100 + i, spread=spread))
    x, logits, loc, log_scale = (torch.cat(parts) for parts in zip(*events, strict=True))
    got = _value_and_grads(normal_mixture_log_prob, (x, logits, loc, log_scale), fused=fused)
    events = _events(x, logits, loc, log_scale)
    expected, scale = _oracle_arrays(normal_oracle, events, _flush_eps(dtype))
    assert np.isfinite(got[0]).all() and (got[0] < -4e4).all()  # exp(-4e4) == 0 in float64
    _check(got, expected, scale, REF_EPS * _eps(dtype), NORMAL_NAMES, f"far {dtype}")

    # The tutorial form: log(sum(pi * prod(pdf))) underflows; its gradient is NaN.
    leaves = [t.clone().requires_grad_(True) for t in (logits, loc, log_scale)]
    pdf = torch.distributions.Normal(leaves[1], leaves[2].exp()).log_prob(x[:, None]).exp()
    naive = (torch.softmax(leaves[0], -1) * pdf.prod(-1)).sum(-1).log()
    assert (naive == -INF).all()
    naive.sum().backward()
    assert torch.isnan(leaves[1].grad).any()


def _flatten(tree) -> list:
    if isinstance(tree, tuple):
        return [v for part in tree for v in _flatten(part)]
    return [tree]


def _unflatten(values, like):
    it = iter(values)

    def build(part):
        return tuple(build(p) for p in part) if isinstance(part, tuple) else next(it)

    return build(like)


def _normal_density(x, logits, loc, log_scale):
    """The tutorial formula ``log(sum_k pi_k prod_d npdf)`` in mpmath (unrounded)."""
    lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
    dens = [
        mp.fprod(mp.npdf(xd, m, mp.exp(lv)) for xd, m, lv in zip(x, mu, ls, strict=True))
        for mu, ls in zip(loc, log_scale, strict=True)
    ]
    return mp.log(mp.fsum(mp.exp(lw - lse) * p for lw, p in zip(logits, dens, strict=True)))


def _bivariate_density(x, logits, loc, log_scale, a):
    """Graves' probability-space mixture ``log(sum_k pi_k N_k)`` in mpmath (unrounded)."""
    lse = mp.log(mp.fsum(mp.exp(v) for v in logits))
    total = mpmath.mpf(0)
    for lw, mu, ls, ak in zip(logits, loc, log_scale, a, strict=True):
        s1, s2, rho = mp.exp(ls[0]), mp.exp(ls[1]), mp.tanh(ak)
        z1, z2 = (x[0] - mu[0]) / s1, (x[1] - mu[1]) / s2
        n = z1 * z1 - 2 * rho * z1 * z2 + z2 * z2
        pdf = mp.exp(-n / (2 * (1 - rho * rho))) / (2 * mp.pi * s1 * s2 * mp.sqrt(1 - rho * rho))
        total += mp.exp(lw - lse) * pdf
    return mp.log(total)


def test_reference_gradients_match_mpmath_diff():
    """The analytic gradients of both oracles (responsibilities times component
    derivatives) against ``mpmath.diff`` of the probability-space mixture, at a moderate
    point with 30 digits: every partial derivative agrees to the float64 rounding of the
    oracle's result (1e-15 relative to max(1, |d|))."""
    x, logits, loc, log_scale, a = bivariate_inputs(1, 2, torch.float64, seed=7, spread=1.5)
    cases = [
        (normal_oracle, _normal_density, _events(x, logits, loc, log_scale)[0]),
        (bivariate_oracle, _bivariate_density, _events(x, logits, loc, log_scale, a)[0]),
    ]
    for oracle, density, event in cases:
        params = _flatten(event)
        analytic = _flatten(oracle(event)[0][1:])  # gradients, in the order of the inputs
        assert len(analytic) == len(params)
        with mp.workdps(30):
            for i, ref in enumerate(analytic):

                def f(t, i=i, params=params, density=density, event=event):
                    values = list(params)
                    values[i] = t
                    return density(*_unflatten(values, event))

                numeric = mp.diff(f, mpmath.mpf(params[i]))
                assert abs(numeric - ref) <= 1e-15 * max(1.0, abs(ref)), (density.__name__, i)


# ======================================================================================
# Fused kernel == plain autograd path
# ======================================================================================


def _agree(fn, inputs, names, what) -> float:
    """Fused against plain: value and every gradient within ``AGREE_RTOL * S``, with ``S``
    from the float64 reference of the same (rounded) inputs."""
    dtype = inputs[0].dtype
    fused = _value_and_grads(fn, inputs, fused=True)
    plain = _value_and_grads(fn, inputs, fused=False)
    if fn is normal_mixture_log_prob:
        _, scale = _normal_reference(*(t.double().numpy() for t in inputs), _flush_eps(dtype))
    else:  # mpmath: the float64 textbook form cancels near |rho| = 1
        _, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    return _check(fused, plain, scale, AGREE_RTOL[dtype], names, what)


NORMAL_CASES = {
    # name: keyword arguments of normal_inputs
    "random": {"spread": 2.0},
    "far": {"spread": 1e5},
    "scales_e20": {"log_scale_range": 20.0},
    "logits_1e4": {"logit_scale": 1e4},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", NORMAL_CASES)
@pytest.mark.parametrize("d", [1, 2, 6])
def test_normal_fused_equals_plain(d, case, dtype):
    """Value and all four gradients, random and extreme inputs (targets 1e5 scales away,
    log_scale in [-20, 20], logits ~ 1e4): ``|fused - plain| <= 1e-5 S`` (float32),
    ``1e-12 S`` (float64)."""
    inputs = normal_inputs(64, 4, d, dtype, seed=20 + d, **NORMAL_CASES[case])
    _agree(normal_mixture_log_prob, inputs, NORMAL_NAMES, f"{case} D={d}")


BIVARIATE_CASES = {
    "random": {"spread": 2.0, "a_range": 3.0},
    "far": {"spread": 1e5, "a_range": 3.0},
    "saturated": {"spread": 1e-3, "a_range": 12.0},  # tanh(a) == +-1 in float32 beyond 9
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", BIVARIATE_CASES)
def test_bivariate_fused_equals_plain(case, dtype):
    """Value and all five gradients: ``|fused - plain| <= 1e-5 S`` (float32), ``1e-12 S``
    (float64); the ``S`` of the bivariate gradients include ``e^{2|a|}`` terms."""
    inputs = bivariate_inputs(64, 4, dtype, seed=30, **BIVARIATE_CASES[case])
    _agree(bivariate_normal_mixture_log_prob, inputs, BIVARIATE_NAMES, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("a_value", [50.0, -50.0])
def test_bivariate_saturated_on_the_line_fused_equals_plain(a_value, dtype):
    """|atanh_rho| = 50 (``1 - rho^2`` is 0 in float32, 4e-43 in fact) with every target on
    its components' correlation lines: finite, and fused == plain within ``1e-5 S``."""
    inputs = on_the_line(16, 3, dtype, a_value, seed=40)
    fused = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    assert all(np.isfinite(t).all() for t in fused)
    _agree(bivariate_normal_mixture_log_prob, inputs, BIVARIATE_NAMES, f"a={a_value}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_bivariate_fused_gradients_when_one_coordinate_dwarfs_the_other(dtype):
    """K = 1 (the mixture is the bivariate density) at ``z2 = 2e8 z1`` (``2e17`` in
    float64): the fused backward's gradients equal the single density's, which
    ``test_bivariate.py`` checks against mpmath to ``64 eps`` relative here, within
    ``16 eps`` relative. (Through ``z1 +- z2`` the earlier fused backward rounded ``z1``
    away: d/dloc1 = -199976 for -199999 in float32.)"""
    big = 2e8 if dtype == torch.float32 else 2e17
    value = torch.tensor([[1.0, big]] * 3 + [[big, -1.0]] * 2, dtype=dtype)
    log_scale = torch.tensor([[0.0, 0.0]] * 3 + [[-1.0, 0.5]] * 2, dtype=dtype)
    atanh_rho = torch.tensor([1e-3, 0.3, -2.0, 1e-3, -0.3], dtype=dtype)
    loc = torch.zeros(5, 2, dtype=dtype)
    logits = torch.zeros(5, 1, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (loc, log_scale, atanh_rho)]
    bivariate_normal_mixture_log_prob(
        value, logits, leaves[0][:, None], leaves[1][:, None], leaves[2][:, None]
    ).sum().backward()
    single = [t.clone().requires_grad_() for t in (loc, log_scale, atanh_rho)]
    bivariate_normal_log_prob(value, *single).sum().backward()
    eps = torch.finfo(dtype).eps
    for name, got, ref in zip(("loc", "log_scale", "atanh_rho"), leaves, single, strict=True):
        expected = ref.grad.double().numpy().ravel()
        assert_within(
            got.grad.double().numpy().ravel(), expected, 16 * eps * np.abs(expected),
            list(range(expected.size)), name,
        )  # fmt: skip


SHAPES = [
    # value, logits, loc / log_scale, atanh_rho: batch broadcasting of every kind
    ((5, 2), (3,), (3, 2), (3,)),  # one unconditional mixture, many targets
    ((2,), (5, 3), (5, 3, 2), (5, 3)),  # one target, many mixtures
    ((4, 1, 2), (1, 5, 3), (5, 3, 2), (4, 5, 3)),  # mixed
]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_broadcast_batch_shapes_fused_equals_plain(shapes):
    """float64, both mixtures: output shape is the broadcast batch shape, gradients have
    the input shapes, and fused == plain to ``1e-12`` (relative to max(1, |plain|))."""
    v, lg, lc, a = shapes
    g = _seeded(50)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in (v, lg, lc, lc, a)]
    inputs[3] = 0.5 * inputs[3]  # log_scale
    batch = torch.broadcast_shapes(v[:-1], lg[:-1], lc[:-2], a[:-1])
    for fn, args in (
        (normal_mixture_log_prob, inputs[:4]),
        (bivariate_normal_mixture_log_prob, inputs),
    ):
        fused = _value_and_grads(fn, args, fused=True)
        plain = _value_and_grads(fn, args, fused=False)
        assert fused[0].shape == batch
        for got, ref, t in zip(fused, plain, [fused[0], *args], strict=True):
            assert got.shape == tuple(t.shape)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


# ======================================================================================
# Bivariate mixture: references
# ======================================================================================


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_bivariate_mixture_matches_scipy_and_mpmath(fused):
    """float64, |rho| <= tanh(3): value against ``scipy.stats.multivariate_normal.logpdf``
    per component, value and gradients against mpmath, ``|err| <= 32 eps S``; the scipy
    value within ``32 eps S cosh(a)^2`` (scipy factors a covariance of condition number up
    to ``cosh(a)^2 ~ 100``, and so does its own rounding)."""
    inputs = bivariate_inputs(24, 3, torch.float64, seed=60, spread=2.5, a_range=3.0)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    flush = _flush_eps(torch.float64)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), flush)
    bound = REF_EPS * _eps(torch.float64)
    _check(got, expected, scale, bound, BIVARIATE_NAMES, "mpmath")
    by_scipy, _ = _bivariate_reference(*(t.numpy() for t in inputs))
    condition = np.cosh(inputs[-1].numpy()).max(-1) ** 2
    assert_within(got[0], by_scipy[0], bound * scale[0] * condition, range(24), "scipy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_bivariate_mixture_extremes_match_mpmath(dtype):
    """Targets 1e3..1e6 scales away (|a| <= 3) and |a| = 50 on the correlation line, both
    paths' values and the fused gradients within ``32 eps S`` of mpmath's
    probability-space formula. (The plain path's gradient is covered where the bivariate
    module's own backward is finite: see ``test_bivariate_fused_equals_plain``.)"""
    parts = [
        bivariate_inputs(2, 3, dtype, seed=70 + i, spread=t, a_range=3.0) for i, t in enumerate(FAR)
    ]
    parts += [on_the_line(2, 3, dtype, a, seed=80) for a in (50.0, -50.0)]
    inputs = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    bound = REF_EPS * _eps(dtype)
    fused = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    _check(fused, expected, scale, bound, BIVARIATE_NAMES, f"fused {dtype}")
    plain = bivariate_normal_mixture_log_prob(*inputs, fused=False).double().numpy()
    _check([plain], expected[:1], scale[:1], bound, BIVARIATE_NAMES[:1], f"plain {dtype}")


def test_naive_bivariate_mixture_breaks_where_ours_is_exact():
    """The usual probability-space mixture (Graves eqs. 23-25 as written, then -log) in
    float32: ``-inf`` for a target 50 scales away, NaN once ``tanh(a)`` rounds to 1; ours
    matches mpmath (32 eps S) at both."""
    x = torch.tensor([[50.0, -50.0], [1.0, 1.0]])
    logits = torch.zeros(2, 2)
    loc = torch.zeros(2, 2, 2)
    log_scale = torch.zeros(2, 2, 2)
    a = torch.tensor([[0.5, -0.5], [12.0, 0.3]])
    sx, sy = log_scale.exp().unbind(-1)
    rho = torch.tanh(a)
    dx, dy = (x[:, None] - loc).unbind(-1)
    z = (dx / sx) ** 2 + (dy / sy) ** 2 - 2 * rho * dx * dy / (sx * sy)
    pdf = torch.exp(-z / (2 * (1 - rho**2))) / (2 * torch.pi * sx * sy * torch.sqrt(1 - rho**2))
    naive = torch.log((torch.softmax(logits, -1) * pdf).sum(-1))
    assert naive[0] == -INF and torch.isnan(naive[1])
    ours = bivariate_normal_mixture_log_prob(x, logits, loc, log_scale, a).double().numpy()
    expected, scale = _oracle_arrays(bivariate_oracle, _events(x, logits, loc, log_scale, a))
    assert_within(ours, expected[0], REF_EPS * _eps(torch.float32) * scale[0], [0, 1], "ours")


# ======================================================================================
# Full-covariance mixture
# ======================================================================================


def test_multivariate_mixture_matches_scipy_and_diagonal_case():
    """float64: against ``scipy.stats.multivariate_normal.logpdf`` with ``cov = L L^T`` per
    component (``|err| <= 32 eps S``, ``S = |ref| + max_k |log pi_k + log N_k|``); with
    diagonal ``L`` it equals ``normal_mixture_log_prob`` to 1e-13 relative."""
    g = _seeded(90)
    n, k, d = 12, 3, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64)
    loc = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    tril = torch.randn(n, k, d, d, generator=g, dtype=torch.float64).tril(-1)
    tril = tril + torch.diag_embed(torch.rand(n, k, d, generator=g, dtype=torch.float64) + 0.3)
    got = multivariate_normal_mixture_log_prob(x, logits, loc, tril).numpy()
    log_w = scipy.special.log_softmax(logits.numpy(), axis=-1)
    comp = np.array(
        [
            [
                scipy.stats.multivariate_normal.logpdf(x[i], loc[i, j], tril[i, j] @ tril[i, j].T)
                for j in range(k)
            ]
            for i in range(n)
        ]
    )
    ref = scipy.special.logsumexp(log_w + comp, axis=-1)
    s = np.abs(ref) + np.abs(log_w + comp).max(-1)
    assert_within(got, ref, REF_EPS * _eps(torch.float64) * s, range(n), "mvn mixture")
    log_scale = 0.3 * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    diag = multivariate_normal_mixture_log_prob(x, logits, loc, torch.diag_embed(log_scale.exp()))
    torch.testing.assert_close(
        diag, normal_mixture_log_prob(x, logits, loc, log_scale), rtol=1e-13, atol=0
    )


# ======================================================================================
# Zero weights, impossible components, all-impossible events (fused kernels)
# ======================================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_zero_weight_component_is_ignored(fused, dtype):
    """A ``-inf`` logit: the value equals the (K-1)-component mixture (1e-6 / 1e-14
    relative), every gradient is finite, the dropped component's are exactly 0."""
    x, logits, loc, log_scale, a = bivariate_inputs(8, 3, dtype, seed=100, spread=2.0)
    logits[:, 1] = -INF
    keep = [0, 2]
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args, fused=fused)
        sub = [args[0], *(t[:, keep] for t in args[1:])]
        np.testing.assert_allclose(out[0], fn(*sub, fused=fused).double().numpy(), rtol=rtol)
        assert all(np.isfinite(t).all() for t in out)
        for grad in out[2:]:
            assert (grad[:, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_impossible_components_and_events_fused(dtype):
    """Components whose log density is ``-inf`` (``z^2/2`` beyond the float range: a
    residual of 1 at scale ``e^-400`` float64 / ``e^-80`` float32, or ``Q`` overflowing at
    ``|a| = 50`` off the line): responsibility 0, finite gradients, theirs exactly 0; an
    event where *every* component is impossible has value ``-inf`` and gradient exactly 0
    (torch.logsumexp's is NaN). The logit of an impossible component gets ``r - pi = -pi``."""
    tiny = -400.0 if dtype == torch.float64 else -80.0
    x, logits, loc, log_scale, a = bivariate_inputs(3, 3, dtype, seed=110, spread=1.0)
    log_scale[:2, 1] = tiny  # component 1 impossible in events 0 and 1
    loc[:2, 1] = x[:2] + 1.0
    log_scale[2] = tiny  # event 2: every component impossible
    loc[2] = x[2] + 1.0
    a[0, 2] = 50.0  # event 0: component 2 off its line at a = 50 (finite in float64)
    loc[0, 2] = x[0] + torch.tensor([1.0, -1.0], dtype=dtype)
    log_scale[0, 2] = 0.0
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args)
        value, grads = out[0], out[1:]
        assert np.isfinite(value[:2]).all() and value[2] == -INF
        assert all(np.isfinite(gr).all() for gr in grads)
        for gr in grads:
            assert (gr[2] == 0).all()  # the impossible event
        for gr in grads[2:]:
            assert (gr[:2, 1] == 0).all()  # the impossible component's parameters
        pi = torch.softmax(logits[:2].double(), -1)[:, 1].numpy()
        np.testing.assert_allclose(grads[1][:2, 1], -pi, rtol=1e-6)  # its logit: r - pi
    # the finite events: the mixture without the impossible component, whose weights are
    # renormalised over the others, so add log(sum of their weights) (1e-6 relative)
    sub = (x[:2], logits[:2, ::2], loc[:2, ::2], log_scale[:2, ::2])
    kept = torch.logsumexp(logits[:2, ::2], -1) - torch.logsumexp(logits[:2], -1)
    np.testing.assert_allclose(
        normal_mixture_log_prob(x[:2], logits[:2], loc[:2], log_scale[:2]).double().numpy(),
        (normal_mixture_log_prob(*sub) + kept).double().numpy(),
        rtol=1e-6,
    )


# ======================================================================================
# Gradcheck, double backward, retain_graph
# ======================================================================================


def test_fused_gradcheck_and_double_backward():
    """float64 ``gradcheck`` of both fused Functions (hand-written backward, every input,
    including broadcast ones) and ``gradgradcheck`` (the double backward goes through the
    plain path, documented)."""
    g = _seeded(120)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64)
    loc = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    log_scale = 0.3 * torch.randn(4, 2, generator=g, dtype=torch.float64)  # broadcast
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    normal = [t.clone().requires_grad_(True) for t in (x, logits, loc, log_scale)]
    bivariate = [t.clone().requires_grad_(True) for t in (x, logits, loc, log_scale, a)]
    for fn, args in (
        (normal_mixture_log_prob, normal),
        (bivariate_normal_mixture_log_prob, bivariate),
    ):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    """The fused backward must not overwrite saved tensors: a second backward through a
    retained graph accumulates exactly twice the first gradients."""
    inputs = bivariate_inputs(16, 3, torch.float32, seed=130, spread=2.0)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    for fn, args in (
        (normal_mixture_log_prob, leaves[:4]),
        (bivariate_normal_mixture_log_prob, leaves),
    ):
        out = fn(*args).sum()
        first = torch.autograd.grad(out, args, retain_graph=True)
        second = torch.autograd.grad(out, args)
        for u, v in zip(first, second, strict=True):
            assert torch.equal(u, v)


# ======================================================================================
# Dtypes
# ======================================================================================


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dtype_policy_and_accuracy(dtype):
    """Every dtype: half inputs give float32 outputs (and gradients in the input dtype);
    values within ``32 eps S`` (eps of the compute dtype) of the float64 scipy reference at
    the rounded inputs, for both mixtures and both NLLs."""
    inputs = bivariate_inputs(16, 3, dtype, seed=140, spread=2.0)
    compute = _compute(dtype)
    exact = [t.double().numpy() for t in inputs]
    for fn, nll, args, reference in (
        (normal_mixture_log_prob, normal_mixture_nll, inputs[:4], _normal_reference),
        (
            bivariate_normal_mixture_log_prob,
            bivariate_normal_mixture_nll,
            inputs,
            _bivariate_reference,
        ),
    ):
        leaves = [t.clone().requires_grad_(True) for t in args]
        out = fn(*leaves)
        assert out.dtype == compute
        out.sum().backward()
        assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in leaves)
        expected, scale = reference(*exact[: len(args)])
        bound = REF_EPS * _eps(dtype) * scale[0]
        assert_within(out.double().detach().numpy(), expected[0], bound, range(16), str(dtype))
        loss = nll(*args, reduction="none")
        assert loss.dtype == compute
        torch.testing.assert_close(loss, -out.detach(), rtol=0, atol=0)


# ======================================================================================
# NLLs: reductions and NaN masking
# ======================================================================================

NLLS = [
    (normal_mixture_nll, normal_mixture_log_prob, 4),
    (bivariate_normal_mixture_nll, bivariate_normal_mixture_log_prob, 5),
]


@pytest.mark.parametrize(("nll", "log_prob", "n_args"), NLLS, ids=["normal", "bivariate"])
def test_reductions_average_over_events(nll, log_prob, n_args):
    """``"none"`` is ``-log_prob`` (bitwise), ``"sum"`` its sum and ``"mean"`` the sum over the
    number of events (12 for a (4, 3) batch, not 12 * D), to 1e-6 relative."""
    inputs = bivariate_inputs(12, 3, torch.float32, seed=150, spread=2.0)[:n_args]
    inputs = [t.reshape(4, 3, *t.shape[1:]) for t in inputs]
    ref = -log_prob(*inputs)
    assert torch.equal(nll(*inputs, reduction="none"), ref)
    torch.testing.assert_close(nll(*inputs, reduction="sum"), ref.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(nll(*inputs), ref.sum() / 12, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("nll", "log_prob", "n_args"), NLLS, ids=["normal", "bivariate"])
def test_nan_mask(nll, log_prob, n_args, reduction):
    """Events with a NaN in any coordinate: loss 0 under ``"none"``, excluded from ``"sum"``
    and from the count of ``"mean"``; the gradient of every parameter at those events is
    exactly 0 and elsewhere equals that of the NLL of the clean events alone (1e-6)."""
    inputs = list(bivariate_inputs(6, 3, torch.float32, seed=160, spread=2.0)[:n_args])
    inputs[0][1, 0] = math.nan
    inputs[0][4] = math.nan
    keep = [0, 2, 3, 5]
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    loss = nll(*leaves, reduction=reduction, nan_policy="mask")
    clean = [t[keep].clone().requires_grad_(True) for t in inputs]
    ref = nll(*clean, reduction=reduction)
    if reduction == "none":
        assert (loss[[1, 4]] == 0).all()
        torch.testing.assert_close(loss[keep], ref, rtol=1e-6, atol=0)
    else:
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    loss.sum().backward()
    ref.sum().backward()
    for leaf, c in zip(leaves[1:], clean[1:], strict=True):
        assert (leaf.grad[[1, 4]] == 0).all()
        torch.testing.assert_close(leaf.grad[keep], c.grad, rtol=1e-6, atol=1e-7)
    assert (leaves[0].grad[[1, 4]] == 0).all()


def test_nan_policies_raise_mask_all_and_propagate():
    """NaN in ``value``: ``"raise"`` (default) is a ValueError naming value and its shape;
    ``validate_args=False`` lets NaN propagate; ``"mask"`` over only masked events: mean NaN
    (like torch.mean of nothing), sum 0."""
    x, logits, loc, log_scale = normal_inputs(3, 2, 2, torch.float32, seed=170)
    x[1, 1] = math.nan
    with pytest.raises(ValueError, match=r"value of shape \(3, 2\) contains 1 NaN"):
        normal_mixture_nll(x, logits, loc, log_scale)
    with pytest.raises(ValueError, match=r"value of shape \(3, 2\)"):
        bivariate_normal_mixture_nll(x, logits, loc, log_scale, torch.zeros(3, 2))
    loss = normal_mixture_nll(x, logits, loc, log_scale, reduction="none", validate_args=False)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    all_nan = torch.full_like(x, math.nan)
    assert torch.isnan(normal_mixture_nll(all_nan, logits, loc, log_scale, nan_policy="mask"))
    masked_sum = normal_mixture_nll(
        all_nan, logits, loc, log_scale, nan_policy="mask", reduction="sum"
    )
    assert masked_sum == 0


# ======================================================================================
# Errors
# ======================================================================================

X2, LG3, LOC32, LS32, A3 = (torch.zeros(s) for s in ((4, 2), (4, 3), (4, 3, 2), (4, 3, 2), (4, 3)))
ERRORS = [
    (
        normal_mixture_log_prob,
        (X2, torch.zeros(4, 2), LOC32, LS32),
        r"loc must have shape \(\*, K, D\) = \(\*, 2, 2\).*logits \(4, 2\).*got \(4, 3, 2\)",
    ),
    (
        normal_mixture_log_prob,
        (torch.zeros(4, 3), LG3, LOC32, LS32),
        r"loc must have shape \(\*, K, D\) = \(\*, 3, 3\).*value \(4, 3\)",
    ),
    (
        normal_mixture_log_prob,
        (X2, LG3, LOC32, torch.zeros(4, 3, 1)),
        r"log_scale must have shape .*got \(4, 3, 1\)",
    ),
    (
        normal_mixture_log_prob,
        (X2, LG3, torch.zeros(5, 3, 2), LS32),
        r"batch shapes \(\*\) do not broadcast: value \(4,\), logits \(4,\), loc \(5,\)",
    ),
    (
        normal_mixture_log_prob,
        (X2, torch.zeros(4, 0), torch.zeros(4, 0, 2), torch.zeros(4, 0, 2)),
        r"logits must have shape \(\*, K\) \(K >= 1",
    ),
    (
        normal_mixture_log_prob,
        (torch.tensor(0.0), LG3, LOC32, LS32),
        r"value must have shape \(\*, D\)",
    ),
    (
        bivariate_normal_mixture_log_prob,
        (torch.zeros(4, 3), LG3, torch.zeros(4, 3, 3), torch.zeros(4, 3, 3), A3),
        r"value must have shape \(\*, 2\).*got \(4, 3\)",
    ),
    (
        bivariate_normal_mixture_log_prob,
        (X2, LG3, LOC32, LS32, torch.zeros(4, 2)),
        r"atanh_rho must have shape \(\*, K\) = \(\*, 3\).*got \(4, 2\)",
    ),
    (
        bivariate_normal_mixture_log_prob,
        (X2, LG3, LOC32, LS32, torch.zeros(5, 3)),
        r"do not broadcast.*atanh_rho \(5,\)",
    ),
    (
        mixture_log_prob,
        (torch.zeros(4, 3), torch.zeros(4, 2)),
        r"same K >= 1; got component_log_prob \(4, 3\) and logits \(4, 2\)",
    ),
    (
        multivariate_normal_mixture_log_prob,
        (X2, LG3, LOC32, torch.zeros(4, 3, 2)),
        r"scale_tril must have shape \(\*, K, D, D\) = \(\*, 3, 2, 2\).*got \(4, 3, 2\)",
    ),
]


@pytest.mark.parametrize(("fn", "args", "pattern"), ERRORS)
def test_shape_errors_name_argument_and_shapes(fn, args, pattern):
    """Each mismatch is a ValueError naming the argument, the expected and the given shape."""
    with pytest.raises(ValueError, match=pattern):
        fn(*args)


def test_option_errors():
    """Bad ``reduction`` / ``nan_policy`` are ValueErrors listing the valid choices."""
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
        normal_mixture_nll(X2, LG3, LOC32, LS32, reduction="avg")
    with pytest.raises(ValueError, match="nan_policy must be 'raise' or 'mask'"):
        bivariate_normal_mixture_nll(X2, LG3, LOC32, LS32, A3, nan_policy="omit")


# ======================================================================================
# Properties
# ======================================================================================


@settings(max_examples=40)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 5),
    d=st.integers(1, 5),
    shift=st.floats(-1e3, 1e3),
    spread=st.sampled_from([0.5, 3.0, 1e2, 1e4]),
)
def test_properties_float64(seed, k, d, shift, spread):
    """Laws, float64: fused == plain (1e-12 S); adding a constant to the logits, or
    permuting the components, changes nothing (1e-12 relative to max(1, |value|)); K = 1 is
    the product of normal densities (scipy, 32 eps S)."""
    inputs = normal_inputs(8, k, d, torch.float64, seed=seed, spread=spread)
    _agree(normal_mixture_log_prob, inputs, NORMAL_NAMES, "hypothesis")
    x, logits, loc, log_scale = inputs
    base = normal_mixture_log_prob(*inputs).numpy()
    perm = torch.randperm(k, generator=_seeded(seed))
    for variant in (
        normal_mixture_log_prob(x, logits + shift, loc, log_scale),
        normal_mixture_log_prob(x, logits[:, perm], loc[:, perm], log_scale[:, perm]),
    ):
        np.testing.assert_allclose(variant.numpy(), base, rtol=1e-12, atol=1e-12)
    single = normal_mixture_log_prob(x, logits[:, :1], loc[:, :1], log_scale[:, :1]).numpy()
    ref = scipy.stats.norm.logpdf(x.numpy(), loc[:, 0].numpy(), log_scale[:, 0].exp().numpy())
    scale = np.abs(ref).sum(-1) + np.abs(log_scale[:, 0].numpy()).sum(-1) + d * LOG_2PI
    assert_within(single, ref.sum(-1), REF_EPS * _eps(torch.float64) * scale, range(8), "K=1")


@pytest.mark.parametrize("family", ["normal", "bivariate"])
def test_plain_path_dead_component_has_zero_gradient(family):
    """Regression: a component whose log density overflows to -inf (here log_scale = -1e4 in
    float32, outside the fused domain, so the plain path runs) has responsibility 0 and
    must contribute an exactly zero gradient, not 0 * inf = NaN. The other component's
    density at its own mean is -log(2 pi) per 2 dims (closed form), weight 1/2."""
    value = torch.tensor([[1.0, 1.0]])
    logits = torch.zeros(1, 2)
    loc = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    log_scale = torch.tensor([[[-1e4, -1e4], [0.0, 0.0]]], requires_grad=True)
    if family == "normal":
        out = normal_mixture_log_prob(value, logits, loc, log_scale)
    else:
        atanh_rho = torch.zeros(1, 2, requires_grad=True)
        out = bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)
    assert out.item() == pytest.approx(-math.log(2 * math.pi) - math.log(2.0), rel=1e-6)
    out.sum().backward()
    assert torch.equal(loc.grad[0, 0], torch.zeros(2))
    assert torch.equal(log_scale.grad[0, 0], torch.zeros(2))
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


@pytest.mark.parametrize("family", ["normal", "bivariate"])
def test_nll_takes_the_plain_path_outside_the_fused_domain(family):
    """Regression: the NLLs called the fused kernel directly, bypassing the fallback, so a
    log_scale of -200 in float32 (a target on the component mean) gave NaN. The exact loss
    (closed form, relative 1e-6) is dominated by that component."""
    value = torch.zeros(1, 2)
    logits = torch.zeros(1, 2)
    loc = torch.zeros(1, 2, 2)
    log_scale = torch.tensor([[[-200.0, -200.0], [0.0, 0.0]]], requires_grad=True)
    if family == "normal":
        loss = normal_mixture_nll(value, logits, loc, log_scale)
    else:
        loss = bivariate_normal_mixture_nll(value, logits, loc, log_scale, torch.zeros(1, 2))
    # component 0 dominates: -log(1/2) + log(2 pi) - 400 (its density is e^400 / (2 pi))
    assert loss.item() == pytest.approx(math.log(2.0) + math.log(2 * math.pi) - 400.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(log_scale.grad).all()


# ======================================================================================
# Issue 10: components beyond the float range in the fused kernels
# ======================================================================================

# log_scale at which a residual of 1e6 standardises beyond the float range (1e6 e^80 =
# 5.5e40 > 3.4e38 in float32, 1e6 e^700 = 1.0e310 > 1.8e308 in float64), yet inside the
# fused kernels' exp(log_scale) check (|log_scale| < 86 / 707): the fused path runs.
TINY_LOG_SCALE = {torch.float32: -80.0, torch.float64: -700.0}


def _dead_normal_events(dtype):
    """Events whose component 0 is beyond the float range (its term is -inf exactly as
    rounded, its responsibility e^{-1.5e81} or less): the issue's reproduction, the other
    component order, and D = 2 with only one coordinate overflowing."""
    t = TINY_LOG_SCALE[dtype]
    x = torch.tensor([[1e6, 0.0], [1e6, 0.0], [1e6, 1.0]], dtype=dtype)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 0.5]], dtype=dtype)
    loc = torch.zeros(3, 2, 2, dtype=dtype)
    log_scale = torch.tensor(
        [[[t, 0.0], [5.0, 0.0]], [[t, 0.0], [5.0, 0.0]], [[t, t], [5.0, 1.0]]], dtype=dtype
    )
    return x, logits, loc, log_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_component_beyond_the_float_range(fused, dtype):
    """Issue 10: a residual of 1e6 at log_scale -80 (float32) / -700 (float64) gave the
    fused kernel a NaN gradient (``0 * inf``), inside its exp(log_scale) domain. Value and
    every gradient within 32 eps S of mpmath (the probability-space formula); the dead
    component's gradients exactly 0, its logit's ``r - pi = -pi``."""
    inputs = _dead_normal_events(dtype)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(normal_oracle, _events(*inputs), _flush_eps(dtype))
    _check(got, expected, scale, REF_EPS * _eps(dtype), NORMAL_NAMES, f"dead {dtype}")
    assert (got[3][:, 0] == 0).all() and (got[4][:, 0] == 0).all()


def test_normal_component_beyond_the_float_range_issue_reproduction():
    """The issue's exact call (float32): d/dloc = [0, 45.4] (the live component's
    ``z / sigma = 1e6 e^{-10}``, closed form, 4 eps relative), not NaN."""
    lc = torch.zeros(2, 1, requires_grad=True)
    sc = torch.tensor([[-80.0], [5.0]], requires_grad=True)
    normal_mixture_log_prob(torch.tensor([1e6]), torch.zeros(2), lc, sc).backward()
    assert lc.grad[0, 0] == 0
    expected = 1e6 * math.exp(-10.0)
    assert abs(lc.grad[1, 0].item() - expected) <= 4 * _eps(torch.float32) * expected


def _log_space_oracle(event: tuple) -> tuple:
    """mpmath in log space, at 1000 digits (terms of any size keep their O(1) differences):
    ``(value, d_value, d_logits, d_loc, d_log_scale)`` of one diagonal-mixture event.

    ``normal_oracle`` (40 digits of the probability-space formula) cannot resolve two
    terms of size 1e70 that differ by 1e55. Responsibilities ``e^{T_k - max T}`` below
    ``e^{-10^4}`` are 0 (beyond any float's resolution)."""
    x, logits, loc, log_scale = event
    with mp.workdps(1000):
        lse = mp.log(mp.fsum(mp.exp(mpmath.mpf(v)) for v in logits))
        log_w = [mpmath.mpf(v) - lse for v in logits]
        z = [
            [
                (mpmath.mpf(xd) - m) * mp.exp(-mpmath.mpf(s))
                for xd, m, s in zip(x, mu, ls, strict=True)
            ]
            for mu, ls in zip(loc, log_scale, strict=True)
        ]
        terms = [
            lw - mp.fsum(zd * zd / 2 + s + LOG_2PI / 2 for zd, s in zip(zk, ls, strict=True))
            for lw, zk, ls in zip(log_w, z, log_scale, strict=True)
        ]
        top = max(terms)
        e = [mp.exp(t - top) if t - top > -1e4 else mpmath.mpf(0) for t in terms]
        total = mp.fsum(e)
        r = [v / total for v in e]
        d_loc = [
            [rk * zd * mp.exp(-mpmath.mpf(s)) for zd, s in zip(zk, ls, strict=True)]
            for rk, zk, ls in zip(r, z, log_scale, strict=True)
        ]
        outputs = (
            top + mp.log(total),
            [-mp.fsum(row[d] for row in d_loc) for d in range(len(x))],
            [rk - mp.exp(lw) for rk, lw in zip(r, log_w, strict=True)],
            d_loc,
            [[rk * (zd * zd - 1) for zd in zk] for rk, zk in zip(r, z, strict=True)],
        )
        return _to_float(outputs)


# Fuzz rows (PROBLOSS_FUZZ_DRAWS=100000) where two leading terms lie within an ulp or so of
# each other: the fused kernel added z^2/2 into the log weight in one addcmul and divided
# by exp(log_scale) (exp(3.4e-8) rounds to 1 in float32, exp(-3.4e-8) does not), the plain
# path rounds z * exp(-log_scale), each coordinate's density, their sum, then adds the
# weight; the fused kernel tied components (responsibilities 0.5 / 0.5 or 1/3 each) that
# the plain path and mpmath separate (1 / 0).
_TIED_ROWS = [
    (  # float64 row 8430: equal densities, log weights 0 and -1.5e23 (half an ulp of T)
        torch.float64,
        [-6.825934953482149e19, 7.600340289596796],
        [1.5363748025226746e23, -4513297.679068608, -INF],
        [
            [-5e-324, 797.2375579715405],
            [6.852649782438854e-11, 461.3921032348621],
            [162.4299896995448, 4.926998426778105e-25],
        ],
        [
            [1.0770518587007111e-35, -5.50424010628158e-34],
            [3.284922686172289e-25, 0.003939771549901374],
            [1.0, 90.34656469027257],
        ],
    ),
    (  # float64 row 32422: log_scale 8.6e-17 (exp rounds to 1, exp(-s) to 1 - 2^-53)
        torch.float64,
        [-2.0801991620529427e-12, 2.5021032816558262e35],
        [-16.635532333438686, 0.03367955791181777, -2.572416761943155e-23],
        [
            [0.0030686947480622717, -2.6908890615241416e34],
            [4.941253761095656e-38, 88.71892521235186],
            [-0.002786121586932873, -13.782422165846185],
        ],
        [
            [0.004120917899178534, 1.7115610761247825e-29],
            [16.635532333438686, 8.59797054387884e-17],
            [202.1052657625261, 8.144018485851042e-33],
        ],
    ),
    (  # float32 row 32947: log_scale 3.4e-8
        torch.float32,
        [-1.5459589958190918, -8.156642829297254e16],
        [-7.730853860585768e-33, 2.151896924196145e-37, 0.0010479174088686705],
        [
            [-0.007985132746398449, 20.949983596801758],
            [-7.624619007110596, 123.12487030029297],
            [-1.2674539107138116e-07, -16.63553237915039],
        ],
        [
            [15.994690895080566, 3.436941753420797e-08],
            [0.029169045388698578, 1.5771336459025065e-09],
            [0.9180141091346741, -2.4978827001561513e-33],
        ],
    ),
    (  # float32 row 37284: the third component leads by 9.8e15 at |T| = 8.3e22
        torch.float32,
        [406497263616.0, -14.934499740600586],
        [-0.0, -3.4231564102633623e-34, 255.93748474121094],
        [
            [-1.1920928955078125e-07, 1.401298464324817e-45],
            [-0.006398669444024563, 5.088750369824047e18],
            [0.005852515809237957, 1.9322880875723603e-16],
        ],
        [
            [2.50592706307895e-11, 17.104766845703125],
            [-1.3983457798768496e-26, 48.655147552490234],
            [5.960464477539063e-08, -0.15814313292503357],
        ],
    ),
]


@pytest.mark.parametrize("row", range(len(_TIED_ROWS)))
def test_fused_terms_round_as_the_plain_path(row):
    """Issue 10 (fuzz, fused != plain in d/dlog_scale): the fused kernel forms the joint
    terms with the plain path's operations in the plain path's order, so its value is
    bitwise the plain one and its gradients agree to the rounding of the backward's
    factors (16 eps (|g| + 1): a handful of roundings of each product). At these rows that
    rounding separates the leading terms as mpmath does (log space, 1000 digits), so every
    gradient is also the exact one within 16 eps (|g| + 1) (responsibilities 0 or 1 up to
    e^{-1e15}, the rest products of a few rounded factors); before, the fused kernel tied
    them (r = 0.5 / 0.5: d/dlog_scale off by 3e70 in float64)."""
    dtype, *event = _TIED_ROWS[row]
    inputs = [torch.tensor([v], dtype=dtype) for v in event]
    fused = _value_and_grads(normal_mixture_log_prob, inputs, fused=True)
    plain = _value_and_grads(normal_mixture_log_prob, inputs, fused=False)
    assert fused[0] == plain[0]
    bound = 16 * _eps(dtype)
    for name, f, p in zip(NORMAL_NAMES[1:], fused[1:], plain[1:], strict=True):
        assert_within(f.ravel(), p.ravel(), bound * (np.abs(p.ravel()) + 1), range(p.size), name)
    expected = _log_space_oracle(_events(*inputs)[0])
    for name, f, e in zip(NORMAL_NAMES[1:], fused[1:], expected[1:], strict=True):
        e = np.asarray(e)
        assert_within(f.ravel(), e.ravel(), bound * (np.abs(e.ravel()) + 1), range(e.size), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_residual_that_overflows_at_a_wide_scale(fused, dtype):
    """Issue 10 (fuzz, fused value -inf where the plain one is -345.9): ``value - loc`` of
    huge numbers of opposite signs overflows (``1.35e36 + 3.4e38`` in float32) while ``z``
    at a wide scale is moderate (``log_scale = 85.8``: ``z = 19``). The fused kernels made
    the component's term ``-inf``; it is recomputed from the halves (as ``split_residual``
    does). Value and gradients against mpmath: the normal mixture in log space (bound
    below), the bivariate one (float32) within 32 eps S."""
    big = torch.finfo(dtype).max
    wide = 85.78 if dtype == torch.float32 else 705.0
    x = torch.tensor(
        [[1.3468900131415708e36 if dtype == torch.float32 else 1e306, 0.0015]], dtype=dtype
    )
    logits = torch.tensor([[0.0, 0.5]], dtype=dtype)
    loc = torch.tensor([[[-100.0, 0.0], [-big, 1e-30]]], dtype=dtype)
    log_scale = torch.tensor([[[-30.0, 0.0], [wide, 0.0]]], dtype=dtype)
    inputs = (x, logits, loc, log_scale)
    got = _value_and_grads(normal_mixture_log_prob, inputs, fused=fused)
    expected = _log_space_oracle(_events(*inputs)[0])
    assert np.isfinite(got[0]).all()
    # the terms (|T| <= 1 + |value| here: component 0 is beyond the float range) carry an
    # absolute rounding error of a few eps |T|; each output is a few rounded factors times
    # responsibilities shifted by that: 32 eps (|e| + 1)(1 + |value|)
    size = 1.0 + abs(float(expected[0]))
    for name, g, e in zip(NORMAL_NAMES, got, expected, strict=True):
        e = np.asarray(e, dtype=np.float64).ravel()
        bound = REF_EPS * _eps(dtype) * (np.abs(e) + 1) * size
        assert_within(g.ravel(), e, bound, range(e.size), f"overflow {dtype} {name}")
    if dtype == torch.float64:  # bivariate_oracle's 40 digits do not reach 1.8e308 e^-705
        return
    a = torch.tensor([[0.0, 0.3]], dtype=dtype)
    inputs = (*inputs, a)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    assert np.isfinite(got[0]).all()
    _check(got, expected, scale, REF_EPS * _eps(dtype), BIVARIATE_NAMES, f"overflow {dtype}")


def _dead_bivariate_events(dtype):
    """Bivariate events with a component beyond the float range: the issue's reproduction
    (z1 = z2 = inf, whose ``z1 - z2`` was NaN in the value), correlated variants, and a
    *finite* z whose ``z1 - z2`` overflows (3e38 and -3e38 at unit scale in float32; 1.7e308
    in float64), which gave NaN gradients through ``(z1 - z2) * s`` with ``s = 0`` at a = 0."""
    t = TINY_LOG_SCALE[dtype]
    big = 3e38 if dtype == torch.float32 else 1.7e308
    x = torch.tensor([[1e6, 1e6], [1e6, -1e6], [big, -big], [big, -big], [-big, -big]], dtype=dtype)
    logits = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=dtype)
    loc = torch.zeros(5, 2, 2, dtype=dtype)
    wide = 85.0 if dtype == torch.float32 else 700.0  # the live component: |z| moderate
    log_scale = torch.tensor(
        [[[t, t], [5.0, 5.0]], [[t, t], [5.0, 6.0]]] + [[[0.0, 0.0], [wide, wide]]] * 3,
        dtype=dtype,
    )
    a = torch.tensor([[0.0, 0.0], [0.7, -0.3], [0.0, 0.2], [1.0, 0.0], [-1.0, 0.0]], dtype=dtype)
    return x, logits, loc, log_scale, a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_bivariate_component_beyond_the_float_range(fused, dtype):
    """Issue 10: the fused bivariate value was NaN (fused=False: -4.54e7) and gradients NaN
    where a component's quadratic form is beyond the float range. Value and all gradients
    within 32 eps S of mpmath; the dead component's parameter gradients exactly 0."""
    inputs = _dead_bivariate_events(dtype)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs, fused=fused)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(dtype))
    _check(got, expected, scale, REF_EPS * _eps(dtype), BIVARIATE_NAMES, f"dead {dtype}")
    for grad in got[3:]:
        assert (grad[:, 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_zero_weight_component_beyond_the_float_range(fused, dtype):
    """Issue 10: a zero-weight (-inf logit) component whose residual overflows: the value
    equals the mixture without it (1e-6 / 1e-14 relative: the same sum of the same
    terms), every gradient is finite and the dropped component's are exactly 0."""
    t = TINY_LOG_SCALE[dtype]
    x = torch.tensor([[1e6, 1e6], [0.5, -1e6]], dtype=dtype)
    logits = torch.tensor([[0.0, -INF, 1.0], [-INF, 0.0, 1.0]], dtype=dtype)
    loc = torch.zeros(2, 3, 2, dtype=dtype)
    log_scale = torch.tensor(
        [[[5.0, 5.0], [t, t], [6.0, 7.0]], [[t, t], [6.0, 5.0], [7.0, 6.0]]], dtype=dtype
    )
    a = torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.3, 0.4]], dtype=dtype)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    dead = torch.tensor([[False, True, False], [True, False, False]])
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args, fused=fused)
        assert all(np.isfinite(g).all() for g in out)
        for row in range(2):
            keep = ~dead[row]
            sub = [args[0][row], *(t_[row][keep] for t_ in args[1:])]
            ref = fn(*sub, fused=fused).double().item()
            assert out[0][row] == pytest.approx(ref, rel=rtol)
            for grad in out[2:]:
                assert (grad[row][dead[row].numpy()] == 0).all()


def test_fused_dispatch_takes_the_plain_path_while_compiling(monkeypatch):
    """The fused kernels' domain check reads a reduction on the host; while tracing
    (``torch.compiler.is_compiling()``) it must not, and the plain path runs: the result's
    graph is the plain path's (``_LogSumExp`` at the top), its value that of
    ``fused=False`` exactly (the same operations)."""
    inputs = bivariate_inputs(4, 3, torch.float32, seed=200, spread=2.0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for fn, args in (
        (normal_mixture_log_prob, inputs[:4]),
        (bivariate_normal_mixture_log_prob, inputs),
    ):
        leaves = [t.clone().requires_grad_(True) for t in args]
        out = fn(*leaves)
        assert type(out.grad_fn).__name__ == "_LogSumExpBackward"
        assert torch.equal(out, fn(*args, fused=False))


# ======================================================================================
# Issue 10: responsibilities at ties of huge terms
# ======================================================================================

# (dtype, magnitude): terms whose ulp exceeds log K, so that logsumexp rounds back to the
# term itself (float32 ulp at 1e8 is 8, float64 ulp at 1e17 is 16; bfloat16 is computed
# in float32, and -1e8 is close to a bfloat16 value, rounded on input)
TIES = [(torch.float32, -1e8), (torch.bfloat16, -1e8), (torch.float64, -1e17)]


@pytest.mark.parametrize(("dtype", "magnitude"), TIES, ids=lambda v: str(v))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_mixture_log_prob_ties_of_huge_terms_give_responsibilities_one_over_k(k, dtype, magnitude):
    """Issue 10: ``mixture_log_prob([[-1e8, -1e8]], zeros)`` back-propagated ``[[1, 1]]``
    (``exp(x - lse)`` with ``lse`` rounded back to ``-1e8``); exact: equal components of
    equal weight have responsibility ``1/K`` each (closed form) and logit gradient
    ``r - pi = 0``. Bound: 2 eps of the compute dtype (``1/K`` and the division each round
    once) plus half an ulp of the input dtype (the gradient is returned in it); the logit
    gradient within twice that (a difference of two such numbers)."""
    lp = torch.full((1, k), magnitude, dtype=dtype, requires_grad=True)
    logits = torch.zeros(1, k, dtype=dtype, requires_grad=True)
    mixture_log_prob(lp, logits).sum().backward()
    bound = 2 * _eps(dtype) + torch.finfo(dtype).eps / 2
    assert (lp.grad.double() - 1.0 / k).abs().max() <= bound
    assert logits.grad.double().abs().max() <= 2 * bound


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_normal_mixture_ties_of_far_components(fused):
    """The same class through a Gaussian mixture (the plain path is ``mixture_log_prob``):
    two components at +-1 of the mean, the target 1e4 scales away on the axis midway in
    float32, log densities ``-5e7`` each, equal: responsibilities 1/2, logit gradients 0,
    loc gradients ``r z / sigma`` equal (closed form, 4 eps relative)."""
    x = torch.tensor([[0.0, 1e4]])
    logits = torch.zeros(1, 2, requires_grad=True)
    loc = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    log_scale = torch.zeros(1, 2, 2)
    normal_mixture_log_prob(x, logits, loc, log_scale, fused=fused).sum().backward()
    eps = _eps(torch.float32)
    assert logits.grad.abs().max() <= 4 * eps
    expected = torch.tensor([[[0.5, 0.5e4], [-0.5, 0.5e4]]])
    assert ((loc.grad - expected).abs() <= 4 * eps * expected.abs()).all()


# ======================================================================================
# Issue 10: mixture weights as probabilities
# ======================================================================================


def _probs_reference(lp: np.ndarray, probs: np.ndarray, flush: float) -> tuple[np.ndarray, ...]:
    """float64 numpy/scipy: ``log sum_k w_k e^{lp_k} - log sum w``, ``r_k`` and
    ``d/dw_k = e^{lp_k - log sum_j w_j e^{lp_j}} - 1 / sum w``, with scales (the rounding
    of each exponent: ``r (1 + |lp| + |lse|)``; ``1/S`` for the normalisation; ``flush``
    (in units of eps) times ``w_k / D`` for the documented flush of ``e^{lp_k - c}``, the
    shift ``c`` the largest ``lp`` of positive weight, ``D = sum_j w_j e^{lp_j - c}``)."""
    lse = scipy.special.logsumexp(lp, b=probs, axis=-1)
    total = probs.sum(-1)
    value = lse - np.log(total)
    with np.errstate(divide="ignore"):
        r = probs * np.exp(lp - lse[..., None])
    ratio = np.exp(lp - lse[..., None])
    d_probs = ratio - 1.0 / total[..., None]
    s_value = np.abs(value) + np.abs(lse) + np.abs(np.log(total))
    c = np.where(probs > 0, lp, -np.inf).max(-1, keepdims=True)
    d = (probs * np.exp(np.where(probs > 0, lp, c) - c)).sum(-1, keepdims=True)
    s_r = r * (1 + np.abs(lp) + np.abs(lse)[..., None]) + flush * probs / d
    s_probs = ratio * (1 + np.abs(lp) + np.abs(lse)[..., None]) + 1.0 / total[..., None]
    return value, r, d_probs, s_value, s_r, s_probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_mixture_log_prob_from_probs_with_exact_zeros(dtype):
    """Issue 10 / numpyro 1870: weights with exact zeros. ``log(probs)`` as logits gives a
    NaN gradient at each zero weight; ``probs=`` gives the value and the gradients
    ``r`` (component log densities) and ``p_k / sum_j w_j p_j - 1 / sum w`` (probs, finite
    at ``w_k = 0``) within 32 eps S of float64 scipy (``logsumexp(lp, b=probs)``)."""
    g = _seeded(210)
    lp = (20 * torch.randn(30, 4, generator=g, dtype=torch.float64)).to(dtype)
    probs = torch.rand(30, 4, generator=g, dtype=torch.float64).to(dtype)
    probs[::3, 1] = 0.0
    probs[1::3, 3] = 0.0
    probs[2::5, :3] = 0.0  # one component left
    probs[2::5, 3] = 0.5
    leaves = [lp.clone().requires_grad_(True), probs.clone().requires_grad_(True)]
    out = mixture_log_prob(leaves[0], probs=leaves[1])
    out.sum().backward()
    value, r, d_probs, s_value, s_r, s_probs = _probs_reference(
        lp.double().numpy(), probs.double().numpy(), _flush_eps(dtype)
    )
    bound = REF_EPS * _eps(dtype)
    labels = list(np.ndindex(30, 4))
    assert_within(out.detach().double().numpy(), value, bound * s_value, range(30), "value")
    assert_within(leaves[0].grad.double().numpy().ravel(), r.ravel(), (bound * s_r).ravel(),
                  labels, "d/dlp")  # fmt: skip
    assert_within(leaves[1].grad.double().numpy().ravel(), d_probs.ravel(),
                  (bound * s_probs).ravel(), labels, "d/dprobs")  # fmt: skip
    # the naive form: log(probs) as logits has a NaN gradient at the zeros
    naive = probs.clone().requires_grad_(True)
    mixture_log_prob(lp, torch.log(naive)).sum().backward()
    assert torch.isnan(naive.grad).any()


def test_mixture_log_prob_probs_agree_with_logits_and_ties():
    """With positive probs the value equals that from ``logits = log(probs)`` (float64,
    1e-14 relative to max(1, |value|): the same terms); a tie of huge terms (float32,
    ``-1e8``) with probs ``(1/4, 1/4)``: responsibilities 1/2 and d/dprobs
    ``1/(1/2) - 1/(1/2) = 0`` exactly (closed form), which a shift by the rounded
    ``log p`` would miss by 1."""
    g = _seeded(211)
    lp = 5 * torch.randn(10, 3, generator=g, dtype=torch.float64)
    probs = torch.rand(10, 3, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(
        mixture_log_prob(lp, probs=probs), mixture_log_prob(lp, torch.log(probs)),
        rtol=1e-14, atol=1e-14,
    )  # fmt: skip
    lp = torch.full((1, 2), -1e8, requires_grad=True)
    probs = torch.full((1, 2), 0.25, requires_grad=True)
    mixture_log_prob(lp, probs=probs).sum().backward()
    assert torch.equal(lp.grad, torch.full((1, 2), 0.5))
    assert torch.equal(probs.grad, torch.zeros(1, 2))


def test_mixture_log_prob_probs_edge_rows_gradcheck_and_half():
    """An impossible row (every weighted term -inf) has value -inf and gradient exactly 0;
    the probs form passes float64 gradcheck and gradgradcheck at positive probs (finite
    differences at 0 would leave the domain); half-precision probs are computed in float32
    (identical to the float32 call)."""
    lp = torch.tensor([[-INF, 0.0, -INF], [-1.0, -2.0, 3.0]], dtype=torch.float64,
                      requires_grad=True)  # fmt: skip
    probs = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.3, 0.0]], dtype=torch.float64,
                         requires_grad=True)  # fmt: skip
    out = mixture_log_prob(lp, probs=probs)
    assert out[0] == -INF and torch.isfinite(out[1])
    out.sum().backward()
    assert (lp.grad[0] == 0).all() and (probs.grad[0] == 0).all()
    assert torch.isfinite(probs.grad).all()
    g = _seeded(212)
    lp = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    probs = (torch.rand(3, 4, generator=g, dtype=torch.float64) + 0.1).requires_grad_(True)

    def fn(lp, probs):
        return mixture_log_prob(lp, probs=probs)

    assert torch.autograd.gradcheck(fn, (lp, probs))
    assert torch.autograd.gradgradcheck(fn, (lp, probs))
    half = torch.tensor([[0.25, 0.75]], dtype=torch.float16)
    lp16 = torch.tensor([[-1.0, 2.0]], dtype=torch.float16)
    out = mixture_log_prob(lp16, probs=half)
    assert out.dtype == torch.float32
    assert torch.equal(out, mixture_log_prob(lp16.float(), probs=half.float()))


def test_mixture_log_prob_weight_form_errors():
    """Exactly one of logits / probs (a ValueError naming both); probs negative, NaN,
    infinite or all 0 in a row are ValueErrors naming probs and its shape (CPU,
    ``validate_args=None``); ``validate_args=False`` skips the check."""
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"exactly one of logits, probs.*got neither"):
        mixture_log_prob(lp)
    with pytest.raises(ValueError, match=r"exactly one of logits, probs.*got both"):
        mixture_log_prob(lp, torch.zeros(3), probs=torch.ones(3))
    for bad, pattern in (
        (torch.tensor([0.5, -0.1, 0.6]), r"probs of shape \(3,\) must lie in"),
        (torch.tensor([0.5, math.nan, 0.6]), r"probs of shape \(3,\) contains 1 NaN"),
        (torch.tensor([0.5, INF, 0.6]), r"probs of shape \(3,\) must lie in"),
        (torch.zeros(2, 3), r"probs of shape \(2, 3\) must have a positive sum.*1|2 row"),
    ):
        with pytest.raises(ValueError, match=pattern):
            mixture_log_prob(lp, probs=bad)
    out = mixture_log_prob(lp, probs=torch.zeros(3), validate_args=False)
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match=r"component_log_prob \(\*, K\) and probs \(\*, K\)"):
        mixture_log_prob(lp, probs=torch.ones(2))


# ======================================================================================
# Issue 10: reduced losses refuse to broadcast the targets; empty batches
# ======================================================================================


def test_reduced_nll_refuses_a_parameter_that_enlarges_the_value_batch():
    """Issue 10: ``logits`` of batch shape ``(8, 1)`` (the ``out[:, 4:5]``-style slip)
    against ``value (8, D)`` made an (8, 8) matrix of every target against every mixture,
    averaged silently. Reduced: a ValueError naming the argument and both shapes, for each
    parameter of both NLLs; ``reduction="none"`` broadcasts as before; a shared mixture
    (batch shape ``()``) is fine."""
    x, logits, loc, log_scale, a = bivariate_inputs(8, 3, torch.float32, seed=220)
    normal = {"logits": logits, "loc": loc, "log_scale": log_scale}
    bivariate = {**normal, "atanh_rho": a}
    for nll, params in ((normal_mixture_nll, normal), (bivariate_normal_mixture_nll, bivariate)):
        for name in params:
            wide = dict(params)
            trailing = 1 if name in ("logits", "atanh_rho") else 2
            wide[name] = params[name].unsqueeze(-1 - trailing)  # batch (8,) -> (8, 1)
            for reduction in ("mean", "sum"):
                with pytest.raises(
                    ValueError,
                    match=rf"{name} of batch shape \(8, 1\) would broadcast the value's batch "
                    rf"shape \(8,\).* to \(8, 8\)",
                ):
                    nll(x, *wide.values(), reduction=reduction)
            assert nll(x, *wide.values(), reduction="none").shape == (8, 8)
        shared = {n: t[0] for n, t in params.items()}  # one mixture for every target
        assert nll(x, *shared.values()).shape == ()


EMPTY_CASES = [
    # (batch of value, batch of the parameters): empty targets against empty or shared
    ((0,), (0,)),
    ((0,), ()),
    ((2, 0), (1, 0)),
]


@pytest.mark.parametrize(("value_batch", "param_batch"), EMPTY_CASES, ids=str)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_empty_batch(value_batch, param_batch, fused):
    """Issue 10: a batch of no events gives an empty result of the broadcast batch shape
    and empty gradients of the inputs' shapes, in every function of the module; the
    reduced NLLs do what torch does with nothing: mean NaN, sum 0."""
    k = 3
    x = torch.zeros(*value_batch, 2, requires_grad=True)
    params = {
        "logits": torch.zeros(*param_batch, k),
        "loc": torch.zeros(*param_batch, k, 2),
        "log_scale": torch.zeros(*param_batch, k, 2),
        "atanh_rho": torch.zeros(*param_batch, k),
    }
    params = {n: t.requires_grad_(True) for n, t in params.items()}
    batch = torch.broadcast_shapes(value_batch, param_batch)
    lg, lc, ls, a = params.values()
    tril = torch.eye(2).expand(*param_batch, k, 2, 2).clone().requires_grad_(True)
    outputs = [
        normal_mixture_log_prob(x, lg, lc, ls, fused=fused),
        bivariate_normal_mixture_log_prob(x, lg, lc, ls, a, fused=fused),
        multivariate_normal_mixture_log_prob(x, lg, lc, tril),
        mixture_log_prob(torch.zeros(*batch, k), lg),
        mixture_log_prob(torch.zeros(*batch, k), probs=torch.ones(*param_batch, k) + lg),
        normal_mixture_nll(x, lg, lc, ls, reduction="none"),
        bivariate_normal_mixture_nll(x, lg, lc, ls, a, reduction="none", nan_policy="mask"),
    ]
    for out in outputs:
        assert out.shape == batch
        out.sum().backward()
    for t in (x, *params.values(), tril):
        assert t.grad.shape == t.shape
    if batch == value_batch:  # the reduced losses (a shared mixture or matching batches)
        for nll, args in ((normal_mixture_nll, (lg, lc, ls)),
                          (bivariate_normal_mixture_nll, (lg, lc, ls, a))):  # fmt: skip
            assert torch.isnan(nll(x, *args))
            assert nll(x, *args, reduction="sum") == 0


# ======================================================================================
# Docstring claims (issue 10 audit)
# ======================================================================================


@pytest.mark.parametrize(
    ("dtype", "inside", "beyond"),
    [(torch.float32, 14.2, 14.6), (torch.float64, 38.4, 38.8)],
    ids=["f32", "f64"],
)
def test_tutorial_form_underflows_beyond_14_4_and_38_6_scales(dtype, inside, beyond):
    """The module's claim: with D = 1 and unit scales the tutorial ``log(sum pi pdf)`` is
    ``-inf`` (NaN gradient) from 14.4 scales in float32, 38.6 in float64 (``e^{-z^2/2} /
    sqrt(2 pi)`` below the smallest subnormal, by hand: ``e^{-107.5} = 2e-47 < 1.4e-45``,
    ``e^{-753.6} < 4.9e-324``), finite just inside; ours is the closed form
    ``-z^2/2 - log(2 pi)/2`` (one component's term, both components equal) within
    32 eps S at both."""
    for z, naive_finite in ((inside, True), (beyond, False)):
        x = torch.tensor([[z]], dtype=dtype)
        logits = torch.zeros(1, 2, dtype=dtype)
        loc = torch.zeros(1, 2, 1, dtype=dtype, requires_grad=True)
        log_scale = torch.zeros(1, 2, 1, dtype=dtype)
        pdf = torch.distributions.Normal(loc, log_scale.exp()).log_prob(x[:, None]).exp()
        naive = (torch.softmax(logits, -1) * pdf.prod(-1)).sum(-1).log()
        assert bool(torch.isfinite(naive).all()) == naive_finite
        if not naive_finite:
            naive.sum().backward()
            assert torch.isnan(loc.grad).all()
        ours = normal_mixture_log_prob(x, logits, loc.detach(), log_scale).item()
        zf = float(x)
        expected = -0.5 * zf * zf - 0.5 * LOG_2PI
        assert abs(ours - expected) <= REF_EPS * _eps(dtype) * (abs(expected) + LOG_2PI)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_responsibilities_flushed_below_the_documented_threshold(dtype):
    """The module's claim: responsibilities below ``2 exp(floor(log tiny) + 2)`` (9e-38 /
    1.8e-307) times the largest are exactly 0, the others within that of the exact
    ``r = e^{-d} / (1 + e^{-d})`` (closed form, float64 math; plus 4 eps relative of the
    rounding of ``exp``), in ``mixture_log_prob`` (the plain path) and in the fused normal
    kernel (through ``d/dloc = r z / sigma`` of a component ``z`` scales off)."""
    floor = math.floor(math.log(torch.finfo(dtype).tiny)) + 2.0
    flush = 2.0 * math.exp(floor)
    eps = torch.finfo(dtype).eps
    for gap in (-floor + 2.0, -floor - 4.0):  # flushed; kept
        r = math.exp(-gap) / (1.0 + math.exp(-gap))
        lp = torch.tensor([[0.0, -gap]], dtype=dtype, requires_grad=True)
        mixture_log_prob(lp, torch.zeros(1, 2, dtype=dtype)).sum().backward()
        z = math.sqrt(2.0 * gap)
        x = torch.zeros(1, 1, dtype=dtype)
        loc = torch.tensor([[[0.0], [-z]]], dtype=dtype, requires_grad=True)
        normal_mixture_log_prob(x, torch.zeros(1, 2, dtype=dtype), loc, torch.zeros(1, 2, 1,
                                dtype=dtype)).sum().backward()  # fmt: skip
        zd = float(x[0, 0] - loc.detach()[0, 1, 0])
        r_fused = math.exp(-0.5 * zd * zd) / (1.0 + math.exp(-0.5 * zd * zd))
        if gap > -floor:
            assert lp.grad[0, 1] == 0 and loc.grad[0, 1, 0] == 0
        else:
            assert abs(lp.grad[0, 1].item() - r) <= flush + 4 * eps * r
            got = loc.grad[0, 1, 0].item() / zd
            assert abs(got - r_fused) <= flush + REF_EPS * eps * r_fused * (1 + gap)


def test_undefined_mixture_weights_give_nan():
    """The documented NaN: a row of logits that is all ``-inf`` (no mixture) or has a
    ``+inf``; and torch.logsumexp's NaN gradient at an all ``-inf`` row, which ours (the
    documented contrast) replaces by 0."""
    lp = torch.zeros(2, 2)
    out = mixture_log_prob(lp, torch.tensor([[-INF, -INF], [INF, 0.0]]))
    assert torch.isnan(out).all()
    x = torch.full((1, 2), -INF, requires_grad=True)
    torch.logsumexp(x, -1).sum().backward()
    assert torch.isnan(x.grad).all()
    y = torch.full((1, 2), -INF, requires_grad=True)
    mixture_log_prob(y, torch.zeros(2)).sum().backward()
    assert torch.equal(y.grad, torch.zeros(1, 2))


def test_bivariate_fused_backward_with_saturated_correlation_and_wide_scales():
    """Found by the fuzz suite (float32): at ``|atanh_rho| = 64`` the fused backward formed
    ``A = w dQ/dz`` with a factor ``e^{2|a|}`` before dividing by a scale of ``e^{65.7}``,
    and a finite ``d/dloc`` of ``1.5e17`` came out ``inf`` (``fused != plain``). Such
    correlations now take the plain path (``|a| < 42.3``, documented); value and every
    gradient within 32 eps S of mpmath, finite."""
    x = torch.tensor([[744.4400634765625, -8.69769993562495e-21]])
    logits = torch.tensor([[7.624619007110596, 0.8743064999580383]])
    loc = torch.tensor([[[-5.5665054079977244e-39, 1.7075087394041828e30],
                         [-1.7395646572113037, 0.011541472747921944]]])  # fmt: skip
    log_scale = torch.tensor([[[-26.581716537475586, -46.714019775390625],
                               [28.390316009521484, 65.70220184326172]]])  # fmt: skip
    a = torch.tensor([[30.442798614501953, -64.19364166259766]])
    inputs = (x, logits, loc, log_scale, a)
    got = _value_and_grads(bivariate_normal_mixture_log_prob, inputs)
    assert all(np.isfinite(g).all() for g in got)
    expected, scale = _oracle_arrays(bivariate_oracle, _events(*inputs), _flush_eps(torch.float32))
    _check(got, expected, scale, REF_EPS * _eps(torch.float32), BIVARIATE_NAMES, "wide")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_plain_path_without_host_reads_equals_the_cpu_path_at_dead_components(monkeypatch, dtype):
    """The plain path's dead-component pass has a CPU shortcut (one host read) and a
    branch-free form for accelerators and tracing; forced into the latter
    (``is_compiling`` patched), values and gradients at components beyond the float range
    and at a target of ``inf`` equal the CPU path's exactly (the same second evaluation)."""
    events = _dead_bivariate_events(dtype)
    x = torch.cat([events[0], torch.tensor([[INF, 0.0]], dtype=dtype)])
    inputs = (x, *(torch.cat([t, t[:1]]) for t in events[1:]))
    for fn, args in (
        (normal_mixture_log_prob, inputs[:4]),
        (bivariate_normal_mixture_log_prob, inputs),
    ):
        cpu = _value_and_grads(fn, args, fused=False)
        with monkeypatch.context() as patch:
            patch.setattr(torch.compiler, "is_compiling", lambda: True)
            traced = _value_and_grads(fn, args, fused=False)
        for u, v in zip(cpu, traced, strict=True):
            np.testing.assert_array_equal(u, v)
        assert all(np.isfinite(g).all() for g in cpu[1:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("family", ["normal", "bivariate"])
def test_value_gradient_where_component_gradients_overflow_with_opposite_signs(family, fused):
    """float32, two components at loc ``-+z sigma`` around the value 0 (``z`` = 40 or 50,
    ``log_scale = -86``, inside the fused domain; bivariate with ``atanh_rho = 0.3``) and
    weights 0.55 / 0.45: each ``d/dloc_k`` is about ``+-4e38`` (inf), their sum ``d/dvalue =
    -sum_k d/dloc_k`` is 8e37. It was NaN (``inf - inf``) in both paths. A third component
    at loc 1.5e-18 (``z = 3.4e19``) is dead (its ``Q/2`` overflows), so the plain path takes
    its re-evaluation branch, the one every non-CPU device takes. Against the mpmath oracle
    with the file's bound ``32 eps S``, which is below ``|ref|`` here, so 0 or NaN fail."""
    dt = torch.float32
    logits = torch.tensor([[math.log(1.1), math.log(0.9), 0.0]], dtype=dt)
    sigma = math.exp(-86.0)
    if family == "normal":
        value = torch.zeros(1, 1, dtype=dt)
        loc = torch.tensor([[[-40 * sigma], [40 * sigma], [1.5e-18]]], dtype=dt)
        inputs = (value, logits, loc, torch.full((1, 3, 1), -86.0))
        oracle, names, fn = normal_oracle, NORMAL_NAMES, normal_mixture_log_prob
    else:
        value = torch.zeros(1, 2, dtype=dt)
        loc = torch.tensor([[[-50 * sigma] * 2, [50 * sigma] * 2, [1.5e-18] * 2]], dtype=dt)
        rho = torch.full((1, 3), 0.3, dtype=dt)
        inputs = (value, logits, loc, torch.full((1, 3, 2), -86.0), rho)
        oracle, names, fn = bivariate_oracle, BIVARIATE_NAMES, bivariate_normal_mixture_log_prob
    got = _value_and_grads(fn, inputs, fused=fused)
    expected, scale = _oracle_arrays(oracle, _events(*inputs), _flush_eps(dt))
    assert (np.abs(expected[3][:, :2]) > torch.finfo(dt).max).all()  # the case: d/dloc overflow
    assert (REF_EPS * _eps(dt) * scale[1] < np.abs(expected[1])).all()  # the bound can fail
    _check(got[1:2], expected[1:2], scale[1:2], REF_EPS * _eps(dt), names[1:2], family)
