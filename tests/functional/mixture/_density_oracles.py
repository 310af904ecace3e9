"""References, oracles and inputs of the mixture log density tests (``test_general.py``,
``test_diagonal.py``, ``test_bivariate.py``, ``test_multivariate.py``, ``test_fused.py``,
``test_nll.py``, ``test_inputs.py``).

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
import scipy.special
import scipy.stats
import torch
from mpmath import mp

from probloss.functional.mixture import (
    normal_mixture_log_prob,
)
from tests.functional._checks import HALF_DTYPES, assert_within
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


FAR = [1e3, 1e4, 1e5, 1e6]  # residuals in scales of the nearest component


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


# log_scale at which a residual of 1e6 standardises beyond the float range (1e6 e^80 =
# 5.5e40 > 3.4e38 in float32, 1e6 e^700 = 1.0e310 > 1.8e308 in float64), yet inside the
# fused kernels' exp(log_scale) check (|log_scale| < 86 / 707): the fused path runs.
TINY_LOG_SCALE = {torch.float32: -80.0, torch.float64: -700.0}


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
