r"""mpmath closed forms for the fuzz records: the check of the float64 reference itself.

Each oracle takes one row of a record's inputs (per argument, the row's elements as Python
floats, flattened) and returns, per element of the row's output (flattened), a pair
``(value, scale)``: the exact value from the textbook closed form at a working precision
that absorbs its cancellation, and the sum of the magnitudes of the terms the value is
made of (:math:`T`). The float64 path is expected within ``REL * T`` of the value (see
:data:`REL`). Special functions come from :mod:`tests.reference` (their own oracle, with
its precision rules); the log densities are written here:

* the bivariate quadratic form in the eigen-coordinates of the correlation,
  :math:`Q = \tfrac14 (z_1 + z_2)^2 (1 + e^{-2a}) + \tfrac14 (z_1 - z_2)^2 (1 + e^{2a})`
  (:math:`1 \pm \tanh a = 2 / (1 + e^{\mp 2a})`), and :math:`\log(1 - \rho^2) =
  -2 \log\cosh a`: a sum of non-negative terms, so no digits are lost at ``|a| = 1e38``;
* the continuous-Bernoulli inverse CDF as :math:`\log((1 - u) + u e^\eta) / \eta`, a sum of
  non-negative terms for every sign of :math:`\eta`;
* everything else as printed in the functions' docstrings.
"""

from __future__ import annotations

import math

import mpmath
from mpmath import mp

from tests import reference

# A gross-error bound, not an accuracy claim: 1e-10 is about 450 000 float64 ulps, far
# above the rounding error of any evaluation order (so no CPU or BLAS can trip it), and
# far below any error that changes whether a value is finite or representable in float32
# or narrower (it moves a value across an overflow threshold only within 1e-10 of it).
# Ulp-level accuracy is the business of each module's own tests.
REL = 1e-10
DPS = 60


def _half_log_2pi():
    return mp.log(2 * mp.pi) / 2


def _dps_for(*xs: float) -> int:
    """60 digits plus the decades of the largest and smallest magnitude among ``xs``."""
    extra = 0.0
    for x in xs:
        x = mp.mpf(x)  # mpf: a halved 5e-324 is 0.0 as a float, and log10(0) raises
        if x != 0 and mp.isfinite(x):
            extra = max(extra, abs(float(mp.log10(abs(x)))))
    return int(DPS + 2 * extra)


def _pair(v, t=None):
    return (v, abs(v) if t is None else t)


# ---------------------------------------------------------------- special functions


def special(name: str):
    """``tests/reference.py``'s closed form of ``probloss.special.<name>``, one input
    (its limits at ``+-inf`` included)."""
    fn = getattr(reference, name)
    return lambda x: [_pair(fn(v)) for v in x]


def special_grad(name: str):
    fn = getattr(reference, name + "_grad", None)
    if fn is None:
        return None
    return lambda x: [[fn(v) for v in x]]


def expm1mx(x):
    out = []
    for v in x:
        if math.isinf(v):  # e^x - 1 - x -> +inf at both ends
            out.append((mp.inf, mp.inf))
            continue
        with mp.workdps(_dps_for(v) + 40):  # e^x - 1 - x ~ x^2/2 cancels 2 log10(1/x) digits
            out.append(_pair(+(mp.expm1(v) - v)))
    return out


def mul_exp(x, t):
    out = []
    for a, b in zip(x, t, strict=True):
        if math.isinf(b) or math.isinf(a):
            out.append((mp.nan, mp.nan))
            continue
        with mp.workdps(DPS):
            out.append(_pair(+(mp.mpf(a) * mp.exp(b))))
    return out


def soft_floor(x, floor):
    out = []
    for a, m in zip(x, floor, strict=True):
        with mp.workdps(_dps_for(a, m)):
            sp = mp.log1p(mp.exp(mp.mpf(a) - m))
            out.append((+(m + sp), abs(mp.mpf(m)) + sp))
    return out


def safe_log_or_exp(x):
    """``log x`` for ``x > 0``, else ``exp x`` (the record's ``safe_where`` branches)."""
    out = []
    for v in x:
        with mp.workdps(DPS):
            out.append(_pair(+(mp.log(v) if v > 0 else mp.exp(v))))
    return out


def safe_log_or_exp_grad(x):
    with mp.workdps(DPS):
        return [[+(1 / mp.mpf(v)) if v > 0 else +mp.exp(v) for v in x]]


def scale_tril(raw, min_diag: float):
    """Row-by-row lower triangle of ``D = 2`` (3 entries) into the flattened 2x2 factor."""
    out = []
    with mp.workdps(DPS):
        diag = [min_diag + mp.log1p(mp.exp(raw[0])), min_diag + mp.log1p(mp.exp(raw[2]))]
        for v in (diag[0], mp.zero, mp.mpf(raw[1]), diag[1]):
            out.append(_pair(+v))
    return out


# ---------------------------------------------------------------- normal family


def _normal_terms(x, mu, s):
    """``(log p, T)`` of N(mu, e^s) at x."""
    z = (mp.mpf(x) - mu) * mp.exp(-mp.mpf(s))
    c = _half_log_2pi()
    return -z * z / 2 - s - c, z * z / 2 + abs(mp.mpf(s)) + c


def normal_log_prob(value, loc, log_scale):
    out = []
    for x, mu, s in zip(value, loc, log_scale, strict=True):
        if math.isinf(x):
            out.append((mp.ninf, mp.inf))
            continue
        with mp.workdps(_dps_for(x, mu, s)):
            v, t = _normal_terms(x, mu, s)
            out.append((+v, +t))
    return out


def normal_log_prob_scale(value, loc, scale):
    return normal_log_prob(value, loc, [_log(s) for s in scale])


def normal_log_prob_var(value, loc, var):
    return normal_log_prob(value, loc, [_log(v) / 2 for v in var])


def normal_log_prob_log_var(value, loc, log_var):
    return normal_log_prob(value, loc, [mp.mpf(v) / 2 for v in log_var])


def _log(v):
    with mp.workdps(DPS):
        return +mp.log(v)


def normal_nll(value, loc, log_scale, beta=0.0, min_scale=None):
    out = []
    for x, mu, s in zip(value, loc, log_scale, strict=True):
        with mp.workdps(_dps_for(x, mu, s)):
            s = mp.mpf(s)
            if min_scale is not None:  # log(e^s + m)
                s = mp.log(mp.exp(s) + mp.mpf(min_scale))
            v, t = _normal_terms(x, mu, s)
            w = mp.exp(2 * beta * s)
            out.append((+(-v * w), +(t * w)))
    return out


def laplace_log_prob(value, loc, log_scale):
    out = []
    for x, mu, s in zip(value, loc, log_scale, strict=True):
        if math.isinf(x):
            out.append((mp.ninf, mp.inf))
            continue
        with mp.workdps(_dps_for(x, mu, s)):
            a = abs(mp.mpf(x) - mu) * mp.exp(-mp.mpf(s))
            out.append((+(-a - s - mp.log(2)), +(a + abs(mp.mpf(s)) + mp.log(2))))
    return out


def student_t_log_prob(value, df, loc, log_scale):
    out = []
    for x, nu, mu, s in zip(value, df, loc, log_scale, strict=True):
        if math.isinf(x):
            out.append((mp.ninf, mp.inf))
            continue
        # lgamma((nu+1)/2) - lgamma(nu/2) cancels two terms of size nu log nu
        with mp.workdps(_dps_for(x, mu, s, nu) + int(math.log10(1 + nu)) + 10):
            nu_ = mp.mpf(nu)
            z = (mp.mpf(x) - mu) * mp.exp(-mp.mpf(s))
            tail = (nu_ + 1) / 2 * mp.log1p(z * z / nu_)
            norm = mp.loggamma((nu_ + 1) / 2) - mp.loggamma(nu_ / 2) - mp.log(nu_ * mp.pi) / 2
            v = norm - s - tail
            out.append((+v, +(abs(norm) + abs(mp.mpf(s)) + tail + 1)))
    return out


def _inverse_correlation_form(u1, u2, a):
    """``u^T R^{-1} u`` for the correlation matrix ``R`` of ``rho = tanh a``, in its
    eigen-coordinates (module docstring): two non-negative terms."""
    return (u1 + u2) ** 2 * (1 + mp.exp(-2 * a)) / 4 + (u1 - u2) ** 2 * (1 + mp.exp(2 * a)) / 4


def _bivariate_terms(x1, x2, m1, m2, s1, s2, a):
    z1 = (mp.mpf(x1) - m1) * mp.exp(-mp.mpf(s1))
    z2 = (mp.mpf(x2) - m2) * mp.exp(-mp.mpf(s2))
    a = mp.mpf(a)
    q = _inverse_correlation_form(z1, z2, a)
    log_cosh = mp.log(mp.cosh(a))
    c = mp.log(2 * mp.pi)
    v = -c - s1 - s2 + log_cosh - q / 2
    return v, c + abs(mp.mpf(s1)) + abs(mp.mpf(s2)) + log_cosh + q / 2


def bivariate_normal_log_prob(value, loc, log_scale, atanh_rho):
    x1, x2 = value
    if math.isinf(x1) or math.isinf(x2):
        return [(mp.ninf, mp.inf)]
    with mp.workdps(_dps_for(*value, *loc, *log_scale, *atanh_rho)):
        v, t = _bivariate_terms(*value, *loc, *log_scale, *atanh_rho)
        return [(+v, +t)]


def bivariate_normal_nll(value, loc, log_scale, atanh_rho):
    return [(-v, t) for v, t in bivariate_normal_log_prob(value, loc, log_scale, atanh_rho)]


def bivariate_normal_kl(loc_q, log_scale_q, atanh_rho_q, loc_p, log_scale_p, atanh_rho_p):
    r"""The textbook :math:`\tfrac12(\operatorname{tr}\Sigma_p^{-1}\Sigma_q - 2 +
    \Delta\mu^\top\Sigma_p^{-1}\Delta\mu + \log\det\Sigma_p - \log\det\Sigma_q)`, each
    :math:`\Sigma_p^{-1}` form in p's standardised coordinates by
    :func:`_inverse_correlation_form`: :math:`\Sigma_q` there is :math:`D R_q D`, ``D =
    diag(e^{d_i})``, ``d_i = log sigma_qi - log sigma_pi``, and :math:`R_q = \tfrac{1 +
    \rho_q}2 (1, 1)(1, 1)^\top + \tfrac{1 - \rho_q}2 (1, -1)(1, -1)^\top` with
    :math:`(1 \pm \tanh a)/2 = 1/(1 + e^{\mp 2a})`, so the trace is two non-negative
    terms and nothing divides by ``1 - rho^2``. The rest cancels like ``expm1mx`` as
    ``q -> p``: twice the digits, plus those of the inputs' decades.

    ``T`` is the float64 path's conditioning (its chain rule, as the function's docstring
    prints it): ``E = 1 + sum |log_scale| + |a_q| + |a_p|`` bounds the exponents, whose
    absolute rounding is a relative one in each exponential, times the first normal KL,
    the second's ``expm1mx(d)/2 + |expm1(d)|`` (``d`` is rounded by ``eps E``), its mean
    part ``(z_2 - rho_p z_1)^2 cosh^2 a_p / 2`` with the terms ``|z_2|``, ``|rho_p z_1|`` of
    the difference, and ``(|w_1| + |w_2|)^2 / 2`` (the two parts of ``w`` may cancel).
    """
    xs = (*loc_q, *log_scale_q, *atanh_rho_q, *loc_p, *log_scale_p, *atanh_rho_p)
    with mp.workdps(2 * _dps_for(*xs) + 40):
        mq1, mq2, lq1, lq2, aq, mp1, mp2, lp1, lp2, ap = (mp.mpf(v) for v in xs)
        d1, d2 = lq1 - lp1, lq2 - lp2
        u, v = mp.exp(d1), mp.exp(d2)
        trace = _inverse_correlation_form(u, v, ap) / (1 + mp.exp(-2 * aq))
        trace += _inverse_correlation_form(u, -v, ap) / (1 + mp.exp(2 * aq))
        z1, z2 = (mq1 - mp1) * mp.exp(-lp1), (mq2 - mp2) * mp.exp(-lp2)
        lc_q, lc_p = mp.log(mp.cosh(aq)), mp.log(mp.cosh(ap))
        maha = _inverse_correlation_form(z1, z2, ap)
        value = (trace - 2 + maha - 2 * (d1 + d2) + 2 * (lc_q - lc_p)) / 2
        first = (mp.expm1(2 * d1) - 2 * d1 + z1 * z1) / 2
        d = 2 * d2 - 2 * (lc_q - lc_p)
        shift = mp.tanh(ap) * z1
        mean_part = ((abs(z2 - shift) + abs(z2) + abs(shift)) * mp.cosh(ap)) ** 2 / 2
        w1 = 2 * mp.tanh(aq) * mp.sinh((d2 - d1) / 2) * mp.exp((d1 + d2) / 2) * mp.cosh(ap)
        w2 = mp.sinh(aq - ap) * mp.exp(d1) / mp.cosh(aq)
        size = 1 + abs(lq1) + abs(lq2) + abs(lp1) + abs(lp2) + abs(aq) + abs(ap)
        terms = first + (mp.expm1(d) - d) / 2 + abs(mp.expm1(d)) + mean_part
        return [(+value, +(size * (terms + (abs(w1) + abs(w2)) ** 2 / 2)))]


# ---------------------------------------------------------------- mixtures


def _logsumexp_terms(terms):
    """``(logsumexp_k v_k, sum_k r_k T_k + |result|)`` of ``terms = [(v_k, T_k)]``."""
    vs = [v for v, _ in terms if v != mp.ninf]
    if not vs:
        return mp.ninf, mp.inf
    top = max(vs)
    # Terms more than ``cut`` below the top weigh less than 10^-(dps + 20) relative: left
    # out exactly as rounding would (and mpmath's exp of an astronomically large negative
    # number, e.g. -z^2 at z = 1e300, would compute ln 2 to that many bits).
    cut = (mp.dps + 20) * mp.log(10)
    live = [(v, t) for v, t in terms if v != mp.ninf and v - top > -cut]
    lse = top + mp.log(mp.fsum(mp.exp(v - top) for v, _ in live))
    scale = mp.fsum(mp.exp(v - lse) * t for v, t in live)
    return lse, scale + abs(lse)


def _log_softmax(logits):
    finite = [mp.mpf(lg) for lg in logits if lg != -math.inf]
    top = max(finite)
    lse = top + mp.log(mp.fsum(mp.exp(lg - top) for lg in finite))
    return [(mp.ninf if lg == -math.inf else mp.mpf(lg) - lse) for lg in logits], abs(lse)


def logsumexp(x):
    """``log sum_k e^{x_k}`` of one row; scale ``sum_k r_k |x_k| + |result| + 1``: the ``1``
    is the documented absolute accuracy (the shifted sum, at least 1, is rounded)."""
    with mp.workdps(_dps_for(*x)):
        v, t = _logsumexp_terms([(mp.mpf(v), abs(mp.mpf(v))) for v in x])
        return [(+v, t + 1)]


def mixture_log_prob(component_log_prob, logits):
    with mp.workdps(_dps_for(*component_log_prob, *[lg for lg in logits if math.isfinite(lg)])):
        lp, lse = _log_softmax(logits)
        terms = []
        for w, c, lg in zip(lp, component_log_prob, logits, strict=True):
            if w == mp.ninf or c == -math.inf:
                terms.append((mp.ninf, mp.zero))
            else:
                terms.append((w + c, abs(mp.mpf(lg)) + lse + abs(mp.mpf(c))))
        v, t = _logsumexp_terms(terms)
        return [(+v, +t)]


def mixture_log_prob_probs(component_log_prob, probs):
    """The probs form: ``w / sum(w)`` is ``softmax(log w)``, so the logits are ``log w``."""
    with mp.workdps(60):
        logits = [mp.log(mp.mpf(w)) if w > 0 else -math.inf for w in probs]
    [(value, scale)] = mixture_log_prob(component_log_prob, logits)
    # log p = c + log D - log sum w: the two logs of sums of order 1 (D in [1, K]) are each
    # rounded to an ulp of 1, whatever the size of their difference
    return [(value, scale + 2)]


def normal_mixture_log_prob(value, logits, loc, log_scale):
    d = len(value)
    if any(math.isinf(x) for x in value):
        return [(mp.ninf, mp.inf)]
    with mp.workdps(
        _dps_for(*value, *loc, *log_scale, *[lg for lg in logits if math.isfinite(lg)])
    ):
        lp, lse = _log_softmax(logits)
        terms = []
        for k, (w, lg) in enumerate(zip(lp, logits, strict=True)):
            if w == mp.ninf:
                terms.append((mp.ninf, mp.zero))
                continue
            v, t = w, abs(mp.mpf(lg)) + lse
            for j in range(d):
                vj, tj = _normal_terms(value[j], loc[k * d + j], log_scale[k * d + j])
                v, t = v + vj, t + tj
            terms.append((v, t))
        v, t = _logsumexp_terms(terms)
        return [(+v, +t)]


def normal_mixture_nll(value, logits, loc, log_scale):
    return [(-v, t) for v, t in normal_mixture_log_prob(value, logits, loc, log_scale)]


def bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho):
    if any(math.isinf(x) for x in value):
        return [(mp.ninf, mp.inf)]
    with mp.workdps(
        _dps_for(*value, *loc, *log_scale, *atanh_rho, *[lg for lg in logits if math.isfinite(lg)])
    ):
        lp, lse = _log_softmax(logits)
        terms = []
        for k, (w, lg) in enumerate(zip(lp, logits, strict=True)):
            if w == mp.ninf:
                terms.append((mp.ninf, mp.zero))
                continue
            v, t = _bivariate_terms(
                *value, *loc[2 * k : 2 * k + 2], *log_scale[2 * k : 2 * k + 2], atanh_rho[k]
            )
            terms.append((w + v, t + abs(mp.mpf(lg)) + lse))
        v, t = _logsumexp_terms(terms)
        return [(+v, +t)]


def bivariate_normal_mixture_nll(value, logits, loc, log_scale, atanh_rho):
    pairs = bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)
    return [(-v, t) for v, t in pairs]


def stroke_log_prob(value, logits, loc, log_scale, atanh_rho, pen_logits, pen_state=0):
    """:class:`~probloss.distributions.StrokeMixture` at offsets ``value`` and the one-hot
    ``pen_state``: the offsets' mixture (:func:`bivariate_normal_mixture_log_prob`) plus
    ``log_softmax(pen_logits)`` at that state; ``T`` adds the pen term's ``|q_j| + |lse q|``."""
    [(offsets, scale)] = bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)
    with mp.workdps(max(mp.dps, _dps_for(*pen_logits))):
        log_pen, lse = _log_softmax(pen_logits)
        pen_scale = abs(mp.mpf(pen_logits[pen_state])) + lse
        return [(+(offsets + log_pen[pen_state]), +(scale + pen_scale))]


def _pen_probabilities(pen_logits):
    with mp.workdps(_dps_for(*pen_logits)):
        return [+p for p in _weights(pen_logits)]


def stroke_mean(logits, loc, log_scale, atanh_rho, pen_logits):
    """The offsets' mixture mean, then ``softmax(pen_logits)`` (each relative: ``T = pi``)."""
    return mixture_mean(logits, loc) + [_pair(p) for p in _pen_probabilities(pen_logits)]


def stroke_variance(logits, loc, log_scale, atanh_rho, pen_logits):
    """The offsets' mixture variances, then ``pi (1 - pi)`` with its terms' scale
    ``pi (1 + pi)`` (``1 - pi`` is formed from ``1`` and ``pi``)."""
    pen = [(p * (1 - p), p * (1 + p)) for p in _pen_probabilities(pen_logits)]
    return mixture_variance(logits, loc, log_scale) + pen


def _weights(logits):
    lp, _ = _log_softmax(logits)
    return [mp.zero if w == mp.ninf else mp.exp(w) for w in lp]


def mixture_mean(logits, loc):
    """``sum_k pi_k mu_kd`` per coordinate ``d``; ``T = sum_k pi_k |mu_kd|``."""
    k = len(logits)
    d = len(loc) // k
    with mp.workdps(DPS):
        pi = _weights(logits)
        out = []
        for j in range(d):
            mus = [mp.mpf(loc[i * d + j]) for i in range(k)]
            out.append(
                (
                    +mp.fsum(p * m for p, m in zip(pi, mus, strict=True)),
                    +mp.fsum(p * abs(m) for p, m in zip(pi, mus, strict=True)),
                )
            )
        return out


def _mixture_second_moments(logits, loc, log_scale, atanh_rho=None):
    """Covariance entries ``(d, e)`` (law of total covariance) with their term scales."""
    k = len(logits)
    d = len(loc) // k
    pi = _weights(logits)
    mu = [[mp.mpf(loc[i * d + j]) for j in range(d)] for i in range(k)]
    sig = [[mp.exp(mp.mpf(log_scale[i * d + j])) for j in range(d)] for i in range(k)]
    mean = [mp.fsum(pi[i] * mu[i][j] for i in range(k)) for j in range(d)]
    spread = [mp.fsum(pi[i] * abs(mu[i][j]) for i in range(k)) for j in range(d)]
    entries = {}
    for a in range(d):
        for b in range(d) if atanh_rho is not None else (a,):
            v = mp.zero
            t = mp.zero
            for i in range(k):
                if pi[i] == 0:
                    continue
                if a == b:
                    cov = sig[i][a] ** 2
                else:
                    cov = mp.tanh(atanh_rho[i]) * sig[i][a] * sig[i][b]
                da, db = mu[i][a] - mean[a], mu[i][b] - mean[b]
                v += pi[i] * (cov + da * db)
                # the mean's own error (relative to the spread) enters each residual
                t += pi[i] * (abs(cov) + (abs(da) + spread[a]) * (abs(db) + spread[b]))
            entries[a, b] = (+v, +t)
    return entries, d


# Most digits an oracle spends resolving a cancellation (a few seconds of mpmath per row).
MAX_DPS = 40_000


def _resolved(compute):
    """``compute()`` (a list of ``(value, T)``) at a precision that resolves every value.

    A value is taken once two evaluations, at ``p`` and ``2 p`` digits, agree to 20 digits
    (terms of size ``e^65504`` that cancel, e.g. covariances of both signs, leave rounding
    noise at 60 digits that the next evaluation does not repeat); else ``p`` doubles. Where
    that would exceed :data:`MAX_DPS` the entry is ``(None, T)``: not resolved, and not
    judged by :func:`tests.fuzz.checks.run_oracle`.
    """
    dps = DPS
    with mp.workdps(dps):
        low = compute()
    while True:
        with mp.workdps(2 * dps):
            high = compute()
            agree = [
                (a == b) or (abs(a - b) <= abs(b) * mp.mpf(10) ** -20)
                for (a, _), (b, _) in zip(low, high, strict=True)
            ]
        if all(agree):
            return high
        if 4 * dps > MAX_DPS:
            return [pair if ok else (None, pair[1]) for pair, ok in zip(high, agree, strict=True)]
        dps, low = 2 * dps, high


def mixture_variance(logits, loc, log_scale):
    def compute():
        entries, d = _mixture_second_moments(logits, loc, log_scale)
        return [entries[j, j] for j in range(d)]

    return _resolved(compute)


def multivariate_mixture_variance(logits, loc, scale_tril):
    """As :func:`mixture_variance` with ``sigma_kd^2 = sum_j L_kdj^2`` (a row norm of L_k)."""
    k = len(logits)
    d = len(loc) // k

    def compute():
        log_sd = []
        for i in range(k):
            for r in range(d):
                row = scale_tril[(i * d + r) * d : (i * d + r + 1) * d]
                log_sd.append(mp.log(mp.fsum(mp.mpf(v) ** 2 for v in row)) / 2)
        entries, _ = _mixture_second_moments(logits, loc, log_sd)
        return [entries[j, j] for j in range(d)]

    return _resolved(compute)


def bivariate_mixture_covariance(logits, loc, log_scale, atanh_rho):
    def compute():
        entries, _ = _mixture_second_moments(logits, loc, log_scale, atanh_rho)
        return [entries[0, 0], entries[0, 1], entries[1, 0], entries[1, 1]]

    return _resolved(compute)


def bivariate_mixture_variance(logits, loc, log_scale, atanh_rho):
    return mixture_variance(logits, loc, log_scale)


# ---------------------------------------------------------------- multivariate


def multivariate_normal_log_prob(value, loc, scale_tril):
    """``-D/2 log 2 pi - sum log L_ii - |L^{-1}(x - mu)|^2 / 2`` by forward substitution.

    A triangular solve of an ill-conditioned factor has no forward-error bound in the
    inputs' terms, so the scale returned is ``inf``: this oracle checks finiteness only
    (a float64 value that is NaN or inf where the exact one is finite, or the reverse).
    """
    if any(math.isinf(x) for x in value):
        return [(mp.ninf, mp.inf)]
    with mp.workdps(_dps_for(*value, *loc, *scale_tril) + 40):
        return [(+_mvn(value, loc, scale_tril), mp.inf)]


def _mvn(value, loc, scale_tril):
    """The closed form at the current precision; ``scale_tril`` flattened ``D x D``."""
    d = len(value)
    el = [[mp.mpf(scale_tril[i * d + j]) for j in range(d)] for i in range(d)]
    r = [mp.mpf(value[i]) - loc[i] for i in range(d)]
    z = []
    for i in range(d):
        z.append((r[i] - mp.fsum(el[i][j] * z[j] for j in range(i))) / el[i][i])
    v = -d * _half_log_2pi() - mp.fsum(mp.log(el[i][i]) for i in range(d))
    return v - mp.fsum(zi * zi for zi in z) / 2


def lowrank_multivariate_normal_log_prob(value, loc, cov_factor, log_diag):
    """Dense ``W W^T + diag(e^l)`` and its Cholesky factor at high precision.

    Finiteness only (scale ``inf``), for the reason given in
    :func:`multivariate_normal_log_prob`.
    """
    d = len(value)
    r = len(cov_factor) // d
    if any(math.isinf(x) for x in value):
        return [(mp.ninf, mp.inf)]
    dps = _dps_for(*value, *loc, *cov_factor, *log_diag) * 2 + 40
    while dps <= 40000:
        with mp.workdps(dps):
            w = mpmath.matrix([[cov_factor[i * r + j] for j in range(r)] for i in range(d)])
            cov = w * w.T + mpmath.diag([mp.exp(mp.mpf(x)) for x in log_diag])
            try:
                el = mpmath.cholesky(cov)
            except ValueError:  # W W^T swamps diag(e^l) at this precision: more digits
                dps *= 4
                continue
            flat = [el[i, j] for i in range(d) for j in range(d)]
            return [(+_mvn(value, loc, flat), mp.inf)]
    # e.g. e^l = e^{-8e22} under W = 1.8e308 needs ~1e22 digits: not judged
    return [(None, mp.inf)]


def multivariate_normal_mixture_log_prob(value, logits, loc, scale_tril):
    k = len(logits)
    d = len(value)
    with mp.workdps(_dps_for(*value, *loc, *scale_tril) + 40):
        lp, _ = _log_softmax(logits)
        terms = []
        for i in range(k):
            if lp[i] == mp.ninf:
                terms.append((mp.ninf, mp.zero))
                continue
            if any(math.isinf(x) for x in value):
                v = mp.ninf
            else:
                v = _mvn(value, loc[i * d : (i + 1) * d], scale_tril[i * d * d : (i + 1) * d * d])
            terms.append((lp[i] + v, mp.zero))
        v, _ = _logsumexp_terms(terms)
        return [(+v, mp.inf)]


# ---------------------------------------------------------------- Bernoulli family


def _log_sigmoid(x):
    return -mp.log1p(mp.exp(-mp.mpf(x)))


def bernoulli_kl(logits_q, logits_p):
    out = []
    for q, p in zip(logits_q, logits_p, strict=True):
        with mp.workdps(2 * _dps_for(q, p) + 40):  # KL ~ (q - p)^2 near q == p
            a = mp.exp(_log_sigmoid(q)) * (_log_sigmoid(q) - _log_sigmoid(p))
            b = mp.exp(_log_sigmoid(-q)) * (_log_sigmoid(-q) - _log_sigmoid(-p))
            out.append((+(a + b), +(abs(a) + abs(b))))
    return out


def continuous_bernoulli_log_prob(value, logits):
    out = []
    for x, eta in zip(value, logits, strict=True):
        a = reference.cb_log_partition(eta)
        with mp.workdps(_dps_for(x, eta)):
            out.append((+(mp.mpf(x) * eta - a), +(abs(mp.mpf(x) * eta) + abs(a))))
    return out


def continuous_bernoulli_cdf(value, logits):
    out = []
    for x, eta in zip(value, logits, strict=True):
        if x <= 0:
            out.append((mp.zero, mp.zero))
        elif x >= 1:
            out.append((mp.one, mp.one))
        elif eta == 0:
            out.append(_pair(mp.mpf(x)))
        else:
            with mp.workdps(_dps_for(x, eta)):
                out.append(_pair(+(mp.expm1(mp.mpf(x) * eta) / mp.expm1(eta))))
    return out


def continuous_bernoulli_icdf(quantile, logits):
    out = []
    for u, eta in zip(quantile, logits, strict=True):
        if eta == 0:
            out.append(_pair(mp.mpf(u)))
            continue
        with mp.workdps(_dps_for(u, eta, 1 - u) + 20):
            u_ = mp.mpf(u)
            out.append(_pair(+(mp.log((1 - u_) + u_ * mp.exp(eta)) / eta)))
    return out


def continuous_bernoulli_kl(logits_q, logits_p):
    out = []
    for q, p in zip(logits_q, logits_p, strict=True):
        cq = reference.cb(q)
        ap = reference.cb_log_partition(p)
        with mp.workdps(_dps_for(q, p) + 40):
            a = cq.mean * (mp.mpf(q) - p)
            out.append((+(a - cq.log_partition + ap), +(abs(a) + abs(cq.log_partition) + abs(ap))))
    return out


def cb_quantity(field: str):
    def oracle(logits):
        return [_pair(getattr(reference.cb(eta), field)) for eta in logits]

    return oracle


# ---------------------------------------------------------------- distributions


def normal_cdf(value, loc, log_scale):
    out = []
    for x, mu, s in zip(value, loc, log_scale, strict=True):
        with mp.workdps(_dps_for(x, mu, s)):
            if math.isinf(x):
                out.append(_pair(mp.one if x > 0 else mp.zero))
                continue
            z = (mp.mpf(x) - mu) * mp.exp(-mp.mpf(s))
            if abs(z) > 1e10:  # erfc(1e10) < 1e-(4e19): 0 or 1 in every float format
                out.append(_pair(mp.one if z > 0 else mp.zero))
                continue
            out.append(_pair(+(mp.erfc(-z / mp.sqrt(2)) / 2)))
    return out


def normal_icdf(quantile, loc, log_scale):
    out = []
    for p, mu, s in zip(quantile, loc, log_scale, strict=True):
        if p in (0.0, 1.0):
            out.append((mp.ninf if p == 0 else mp.inf, mp.inf))
            continue
        with mp.workdps(_dps_for(p, 1 - p, mu, s) + 20):
            z = -mp.sqrt(2) * mp.erfinv(1 - 2 * mp.mpf(p))  # erfinv(1 - 2p) needs 1 - 2p exactly
            sig = mp.exp(mp.mpf(s))
            out.append((+(mu + sig * z), +(abs(mp.mpf(mu)) + sig * abs(z))))
    return out


def normal_variance(loc, log_scale):
    with mp.workdps(DPS):
        return [_pair(+mp.exp(2 * mp.mpf(s))) for s in log_scale]


def normal_entropy(loc, log_scale):
    with mp.workdps(DPS):
        out = []
        for s in log_scale:
            c = (1 + mp.log(2 * mp.pi)) / 2
            out.append((+(c + s), +(c + abs(mp.mpf(s)))))
        return out


def identity_loc(*args):
    """The mean / mode of a (bivariate) normal: its loc (the first argument), exactly."""
    return [_pair(mp.mpf(v)) for v in args[0]]


def bivariate_variance(loc, log_scale, atanh_rho):
    with mp.workdps(DPS):
        return [_pair(+mp.exp(2 * mp.mpf(s))) for s in log_scale]


def bivariate_covariance(loc, log_scale, atanh_rho):
    with mp.workdps(DPS):
        s1, s2 = (mp.mpf(s) for s in log_scale)
        c = mp.tanh(atanh_rho[0]) * mp.exp(s1 + s2)
        return [_pair(+mp.exp(2 * s1)), _pair(+c), _pair(+c), _pair(+mp.exp(2 * s2))]


def bivariate_entropy(loc, log_scale, atanh_rho):
    with mp.workdps(_dps_for(*atanh_rho)):
        s1, s2 = (mp.mpf(s) for s in log_scale)
        c = 1 + mp.log(2 * mp.pi)
        lc = mp.log(mp.cosh(atanh_rho[0]))
        return [(+(c + s1 + s2 - lc), +(c + abs(s1) + abs(s2) + lc))]


def bivariate_log_scale_grad(value, loc, log_scale, atanh_rho, sign=1):
    """Exact ``d/dlog_scale`` of the bivariate log density (``sign=-1``: of the NLL), as
    mpmath numbers (unbounded exponent, so far beyond float64's range), for the disputed
    rows of :func:`tests.fuzz.checks.check`. With ``z_i = (x_i - mu_i) e^{-l_i}``,
    ``rho = tanh a`` and ``log p = -log 2 pi - l_1 - l_2 + log cosh a - Q / 2``,
    ``Q = cosh^2 a (z_1^2 - 2 rho z_1 z_2 + z_2^2)``:

    .. math:: \\partial_{l_i} \\log p = -1 + \\cosh^2 a\\,(z_i^2 - \\rho z_1 z_2).
    """
    with mp.workdps(60):
        a = mp.mpf(atanh_rho[0])
        z = [(mp.mpf(value[i]) - mp.mpf(loc[i])) * mp.exp(-mp.mpf(log_scale[i])) for i in (0, 1)]
        c2, rho = mp.cosh(a) ** 2, mp.tanh(a)
        return {"log_scale": [sign * (-1 + c2 * (z[i] ** 2 - rho * z[0] * z[1])) for i in (0, 1)]}


def bivariate_nll_log_scale_grad(*row):
    return bivariate_log_scale_grad(*row, sign=-1)


# ---------------------------------------------------------------- scoring rules


# beyond this |z| every e^{-|z|} or e^{-z^2/2} term is below e^{-10^6}, far below any
# float's resolution of the score's other terms (and mpmath cannot exponentiate e^{10^38})
_CRPS_FAR = 1e6


def _crps_rows(value, loc, log_scale, score):
    """``[(CRPS, T)]`` per element: ``score(r, sigma, z)`` gives the textbook closed form and
    the sum of its terms' magnitudes, at a precision that absorbs ``|log sigma|``; beyond
    ``|z| = _CRPS_FAR`` the exponentially small terms are dropped."""
    out = []
    for x, mu, s in zip(value, loc, log_scale, strict=True):
        if math.isinf(x) or math.isinf(mu):
            out.append((mp.inf, mp.inf))  # a target infinitely far away: CRPS = inf
            continue
        with mp.workdps(_dps_for(x, mu, s)):
            sigma = mp.exp(mp.mpf(s))
            r = mp.mpf(x) - mp.mpf(mu)
            v, t = score(r, sigma, r / sigma)
            out.append((+v, +t))
    return out


def crps_normal(value, loc, log_scale):
    r"""``sigma (z (2 Phi(z) - 1) + 2 phi(z) - 1 / sqrt(pi))`` (Gneiting et al. 2005)."""

    def score(r, sigma, z):
        c = 1 / mp.sqrt(mp.pi)
        if abs(z) > _CRPS_FAR:
            erf_part, phi2 = mp.sign(z), mp.mpf(0)
        else:
            erf_part, phi2 = 2 * mp.ncdf(z) - 1, 2 * mp.npdf(z)
        return sigma * (z * erf_part + phi2 - c), sigma * (abs(z * erf_part) + phi2 + c)

    return _crps_rows(value, loc, log_scale, score)


def crps_laplace(value, loc, log_scale):
    r"""``|r| + b e^{-|r|/b} - 3 b / 4`` (scoringrules' ``crps_laplace``)."""

    def score(r, b, z):
        e = mp.mpf(0) if abs(z) > _CRPS_FAR else mp.exp(-abs(z))
        return abs(r) + b * e - 3 * b / 4, abs(r) + b * e + 3 * b / 4

    return _crps_rows(value, loc, log_scale, score)


def crps_logistic(value, loc, log_scale):
    r"""``s (z - 2 log F(z) - 1)``, ``F`` the logistic CDF (scoringrules' ``crps_logistic``)."""

    def score(r, s, z):
        if abs(z) > _CRPS_FAR:
            log_f = mp.mpf(0) if z > 0 else z  # log F(z) -> 0 / -> z (error e^{-|z|})
        else:
            log_f = -mp.log1p(mp.exp(-z))  # log of 1 / (1 + e^{-z})
        return s * (z - 2 * log_f - 1), s * (abs(z) + 2 * abs(log_f) + 1)

    return _crps_rows(value, loc, log_scale, score)


def _expected_abs(d, sigma):
    """``E|X|``, ``X ~ N(d, sigma^2)``: ``sigma 2 phi(d / sigma) + d (2 Phi(d / sigma) - 1)``
    (both terms of one sign: the sum of magnitudes is the value)."""
    m = d / sigma
    if abs(m) > _CRPS_FAR:
        return abs(d)  # the phi term and 1 - |erf| are below e^{-10^11} of it
    return sigma * 2 * mp.npdf(m) + d * (2 * mp.ncdf(m) - 1)


def crps_normal_mixture(value, logits, loc, log_scale):
    r"""Grimit et al. (2006): per coordinate ``sum_k w_k A(y - mu_k, sigma_k) - 1/2
    sum_kl w_k w_l A(mu_k - mu_l, sqrt(sigma_k^2 + sigma_l^2))``, summed over coordinates;
    ``T`` the sum of the two (non-negative) parts."""
    d = len(value)
    if any(math.isinf(x) for x in value):
        return [(mp.inf, mp.inf)]
    with mp.workdps(
        _dps_for(*value, *loc, *log_scale, *[lg for lg in logits if math.isfinite(lg)])
    ):
        w = [mp.exp(v) for v in _log_softmax(logits)[0]]
        k = len(w)
        total, scale = mp.zero, mp.zero
        for j in range(d):
            mus = [mp.mpf(loc[i * d + j]) for i in range(k)]
            sigmas = [mp.exp(mp.mpf(log_scale[i * d + j])) for i in range(k)]
            # CRPS >= w_k^2 CRPS(N_k) >= w_k^2 sigma_k (sqrt 2 - 1) / sqrt(pi) (F >= w_k F_k
            # left of y, 1 - F >= w_k (1 - F_k) right of it): beyond every float's range
            # there, where the closed form's terms (w sigma) cancel past any precision
            floor = max(wi**2 * si for wi, si in zip(w, sigmas, strict=True)) * 0.2337
            if floor > mp.mpf("1e310"):  # (a float 1e310 is inf)
                return [(mp.inf, mp.inf)]
            first = mp.fsum(w[i] * _expected_abs(value[j] - mus[i], sigmas[i]) for i in range(k))
            spread = mp.fsum(
                w[i]
                * w[m]
                * _expected_abs(mus[i] - mus[m], mp.sqrt(sigmas[i] ** 2 + sigmas[m] ** 2))
                for i in range(k)
                for m in range(k)
            )
            total += first - spread / 2
            scale += first + spread / 2
        return [(+total, +scale)]


def crps_ensemble(value, samples):
    r"""The fair ensemble CRPS by its pairwise definition (scoringrules' ``"fair"``):
    ``mean|x_i - y| - sum_ij |x_i - x_j| / (2 M (M - 1))``; ``T`` the sum of the two parts."""
    (y,) = value
    if math.isinf(y):
        return [(mp.inf, mp.inf)]
    with mp.workdps(_dps_for(y, *samples)):
        m = len(samples)
        xs = [mp.mpf(x) for x in samples]
        near = mp.fsum(abs(x - y) for x in xs) / m
        spread = mp.fsum(abs(a - b) for a in xs for b in xs) / (2 * m * (m - 1))
        return [(+(near - spread), +(near + spread))]
