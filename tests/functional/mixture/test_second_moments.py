"""Second moments and their gradients beyond the float range
(``probloss.functional.mixture._second_moments``) against mpmath, the oracle of
``_moment_oracles.py`` (its module docstring states the bounds).
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss.functional.mixture import (
    bivariate_normal_mixture_covariance,
    normal_mixture_variance,
)
from tests.functional._checks import dtype_id
from tests.functional.mixture._moment_oracles import (
    INF,
    _assert_matches_mp,
)


def test_off_diagonal_covariance_when_terms_of_both_signs_overflow():
    """Found by the fuzz suite: ``rho s1 s2`` terms of both signs beyond the range made the
    off-diagonal covariance ``inf - inf = NaN``; the larger side decides. float64 (the
    fuzz draw): ``-inf`` (``e^{4.6e23}`` against ``e^{1.7e21}``, mpmath's sign). float32,
    two components on opposite correlation lines (``tanh(+-50) = +-1``), equal weights and
    means:
    ``c12 = (e^{90} - e^{89.5}) / 2 = 2.4e38``, finite although both terms overflow
    (float64 by hand), within ``4 eps (1 + 90)`` times the sum of the terms' magnitudes
    (the rounding of exponents near 90 carried into ``exp``, then the cancellation); and
    ``-inf`` where the negative side is larger by a factor ``e^2``."""
    d = torch.float64
    logits = torch.tensor([4.397136189858803e-23, -0.1808082195878351, 0.2013262300830547], dtype=d)
    loc = torch.tensor([[1.121276415412279e-33, 0.0078125], [0.04946745144030881,
                        -6.644103407655575e37], [-3.8470488045293366e24, 3.119162312519754]],
                       dtype=d)  # fmt: skip
    log_scale = torch.tensor([[1.7289285583694065e21, 1.7517854629505151e-12],
                              [1.2973730293626422e21, -2.5583274342565433e35],
                              [7.532210401440694e-35, 4.565382213568796e23]], dtype=d)  # fmt: skip
    a = torch.tensor([709.3964185322641, -21.382982419666668, -143.96314289500094], dtype=d)
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, a)
    assert cov[0, 1] == -INF and cov[1, 0] == -INF
    log_scale = torch.tensor([[45.0, 45.0], [45.0, 44.5]])
    cov = bivariate_normal_mixture_covariance(
        torch.zeros(2), torch.zeros(2, 2), log_scale, torch.tensor([50.0, -50.0])
    )
    terms = 0.5 * math.exp(90.0), 0.5 * math.exp(89.5)
    expected = terms[0] - terms[1]
    eps = torch.finfo(torch.float32).eps
    assert abs(cov[0, 1].item() - expected) <= 4 * eps * 91 * sum(terms)
    cov = bivariate_normal_mixture_covariance(
        torch.zeros(2), torch.zeros(2, 2), torch.tensor([[50.0, 50.0], [51.0, 51.0]]),
        torch.tensor([50.0, -50.0]),
    )  # fmt: skip
    assert cov[0, 1] == -INF and cov[0, 0] == INF


def _mp_second_moments(logits, loc, log_scale, atanh_rho=None, scale_tril=None):
    """Entries ``C_p`` and gradients with term-size scales, from the closed forms.

    Pairs: the diagonal (``atanh_rho`` None) or (0,0), (0,1), (1,1). Returns
    ``{"value": [(x, T)], "logits": [...], "loc": [...], "log_scale": [...],
    "atanh_rho": [...], "scale_tril": [...]}`` for the gradient of ``sum_p C_p``.
    """
    from mpmath import mp, mpf

    with mp.workdps(60):
        lg = [mpf(float(v)) for v in logits]
        top = max(lg)
        w = [mp.exp(v - top) for v in lg]
        pi = [v / mp.fsum(w) for v in w]
        K = len(pi)
        mu = [[mpf(float(v)) for v in row] for row in loc]
        D = len(mu[0])
        if scale_tril is not None:
            L = [[[mpf(float(v)) for v in row] for row in comp] for comp in scale_tril]
            var = [[mp.fsum(x * x for x in L[k][i]) for i in range(D)] for k in range(K)]
            s = [[mp.sqrt(v) for v in row] for row in var]
        else:
            s = [[mp.exp(mpf(float(v))) for v in row] for row in log_scale]
        rho = None if atanh_rho is None else [mp.tanh(mpf(float(v))) for v in atanh_rho]
        sech = None if atanh_rho is None else [1 / mp.cosh(mpf(float(v))) for v in atanh_rho]
        pairs = [(0, 0), (0, 1), (1, 1)] if rho is not None else [(i, i) for i in range(D)]
        m = [mp.fsum(pi[k] * mu[k][i] for k in range(K)) for i in range(D)]
        d = [[mu[k][i] - m[i] for i in range(D)] for k in range(K)]

        def sig(k, i, j):
            return s[k][i] ** 2 if i == j else rho[k] * s[k][i] * s[k][j]

        Q = [[sig(k, i, j) + d[k][i] * d[k][j] for (i, j) in pairs] for k in range(K)]
        C = [mp.fsum(pi[k] * Q[k][p] for k in range(K)) for p in range(len(pairs))]
        size = [mp.fsum(pi[k] * abs(Q[k][p]) for k in range(K)) for p in range(len(pairs))]
        out = {"value": [(C[p], size[p]) for p in range(len(pairs))]}
        out["logits"] = [
            (
                mp.fsum(pi[k] * (Q[k][p] - C[p]) for p in range(len(pairs))),
                mp.fsum(pi[k] * (abs(Q[k][p]) + size[p]) for p in range(len(pairs))),
            )
            for k in range(K)
        ]
        gl, gs = [], []
        for k in range(K):
            for a in range(D):
                terms = [pi[k] * ((i == a) * d[k][j] + (j == a) * d[k][i]) for (i, j) in pairs]
                gl.append((mp.fsum(terms), mp.fsum(abs(t) for t in terms)))
                terms = [pi[k] * sig(k, i, j) * ((i == a) + (j == a)) for (i, j) in pairs]
                gs.append((mp.fsum(terms), mp.fsum(abs(t) for t in terms)))
        out["loc"], out["log_scale"] = gl, gs
        if rho is not None:
            out["atanh_rho"] = []
            for k in range(K):
                t = pi[k] * sech[k] ** 2 * s[k][0] * s[k][1]  # not 1 - rho^2: 0 at a = 400
                out["atanh_rho"].append((t, abs(t)))
        if scale_tril is not None:
            out["scale_tril"] = [
                (2 * pi[k] * L[k][i][j], abs(2 * pi[k] * L[k][i][j]))
                for k in range(K)
                for i in range(D)
                for j in range(D)
            ]
        return out


def _grads(fn, dtype, *args):
    xs = [torch.tensor(a, dtype=dtype, requires_grad=True) for a in args]
    y = fn(*xs)
    y.sum().backward()
    return y, [x.grad for x in xs]


def test_variance_logit_gradient_with_overflowing_pieces_float32():
    """Issue 10 (fuzz, row 206 in kind): pi_0 (mu_0 - m)^2 = e^{-77} 1e74 = 3.6e40 > max,
    so Var_0 = +inf; d Var_0 / d l_1 = pi_1 (q_1 - Var) = -e^{-177} 3.6e40 = -4.5e-37 is
    finite (autograd formed pi_1 q_1 - pi_1 Var = 0 - inf: -inf), d/dl_0 = +inf and
    d/dl_2 = -inf with mpmath's signs (were NaN)."""
    logits = [0.0, -100.0, 77.0]
    loc = [[-1e37, 0.0], [0.0, 0.0], [0.0, 0.0]]
    log_scale = [[0.0, 0.0]] * 3
    v, (gl, gm, gs) = _grads(normal_mixture_variance, torch.float32, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], torch.float32, "value")
    _assert_matches_mp(gl, ref["logits"], torch.float32, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], torch.float32, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], torch.float32, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_variance_logit_gradient_at_an_overflowing_scale(dtype):
    """Issue 10: ``log_scale[1, 0] = 1e10`` (100 in float32): Var_0 = e^{2e10}/3 = inf and
    d/dlogits = pi_k (q_k - Var) = (-inf, +inf, -inf) exactly (float64 gave
    ``[-inf, nan, -inf]``); the other gradients as mpmath's."""
    big = 1e10 if dtype == torch.float64 else 100.0
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale = [[0.0, 0.0], [big, 0.0], [0.0, 0.0]]
    v, (gl, gm, gs) = _grads(normal_mixture_variance, dtype, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], dtype, "value")
    _assert_matches_mp(gl, ref["logits"], dtype, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], dtype, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_variance_logit_gradient_with_overflow_in_two_coordinates(dtype):
    """The gradient sums over coordinates terms that are +inf in one and -inf in another:
    d/dl_k = sum_d pi_k (q_kd - Var_d) with component 1 huge in d = 0 and component 2 in
    d = 1 (e^{2 * 1e4} against e^{2 * 1.1e4}): the larger side decides, mpmath's sign."""
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale = [[0.0, 0.0], [1e4, 0.0], [0.0, 1.1e4]]
    v, (gl, _, _) = _grads(normal_mixture_variance, dtype, logits, loc, log_scale)
    ref = _mp_second_moments(logits, loc, log_scale)
    _assert_matches_mp(v, ref["value"], dtype, "value")
    _assert_matches_mp(gl, ref["logits"], dtype, "d/dlogits")


def test_covariance_gradients_at_an_overflowing_scale_float32():
    """Issue 10: ``bivariate_normal_mixture_covariance`` with ``log_scale[1, 0] = 100``:
    d/dlogits was NaN x3; exact (float64 reference [-8e85, 1.6e86, -8e85]) is
    (-inf, +inf, -inf) in float32. Every gradient against mpmath."""
    logits, loc = [0.0, 0.0, 0.0], [[0.0, 0.0]] * 3
    log_scale, a = [[0.0, 0.0], [100.0, 0.0], [0.0, 0.0]], [0.3, -0.5, 0.0]
    c, (gl, gm, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        torch.float32, logits, loc, log_scale, a,
    )  # fmt: skip
    ref = _mp_second_moments(logits, loc, log_scale, a)
    _assert_matches_mp(c, ref["value"], torch.float32, "value")
    _assert_matches_mp(gl, ref["logits"], torch.float32, "d/dlogits")
    _assert_matches_mp(gm, ref["loc"], torch.float32, "d/dloc")
    _assert_matches_mp(gs, ref["log_scale"], torch.float32, "d/dlog_scale")
    _assert_matches_mp(ga, ref["atanh_rho"], torch.float32, "d/datanh_rho")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_covariance_correlation_gradient_where_sigma_product_overflows(dtype):
    """``rho s1 s2`` at ``atanh_rho = 60``, ``log_scale = 60`` (float32; 400 in float64):
    ``s1 s2 = e^{120}`` overflows, d/da = sech^2(a) s1 s2 = 4 e^{-120} e^{120} (about 4)
    is finite; through autograd it was ``inf * (1 - tanh^2) = inf * 0 = NaN``."""
    big = 60.0 if dtype == torch.float32 else 400.0
    args = ([0.0], [[0.0, 0.0]], [[big, big]], [big])
    c, (_, _, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        dtype, *args,
    )  # fmt: skip
    ref = _mp_second_moments(*args)
    _assert_matches_mp(c, ref["value"], dtype, "value")
    # e^{2 big - 2 log cosh(big)}: logarithms of total size 4 big cancel to 2 log 2
    _assert_matches_mp(ga, ref["atanh_rho"], dtype, "d/datanh_rho", exponents=4 * big)
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_covariance_sign_decided_by_the_low_part_of_an_exponent_sum(dtype):
    """Found by the fuzz suite (float64 path, bfloat16 draw): ``c12`` has the terms
    ``pi_2 rho_2 e^{1.7e21 + 3.39e38}`` (positive) and ``pi_3 rho_3 e^{3.39e38 + 5.5}``
    (negative); in float64 both exponent sums round to ``3.3895313892515355e38`` (ulp
    ``3.8e22``), so the log-space sum read a tie, an exact cancellation, and returned 0;
    exact (mpmath) ``+e^{3.3895e38 + 1.7e21}``, ``+inf`` (the positive side is larger by
    ``e^{1.7e21}``). The exponent sums are now double-floats, exact here. Against
    :func:`_mp_second_moments` (bound of the module, above); float32 inputs run in float64,
    the same tie. (d/dlogits is not checked: for ``k = 2`` it is ``pi_2 pi_1 e^{6.8e38}``
    from ``(1 - pi_2) - pi_3 = pi_1 = 5e-19``, below float64's resolution of the terms.)"""
    logits = [-36.75, 0.048828125, 5.3125]
    loc = [[0.049072265625, -3.147125244140625e-05], [-0.00372314453125, 9.6875],
           [-4.738711601752347e-38, 88.5]]  # fmt: skip
    log_scale = [[-14.25, 4.338734978715565e-30], [1.7155471988549883e21, 3.3895313892515355e38],
                 [3.3895313892515355e38, 5.53125]]  # fmt: skip
    a = [-8.623852854459215e20, 4.15625, -84.5]
    c, (_, _, gs, ga) = _grads(
        lambda *x: bivariate_normal_mixture_covariance(*x)[..., [0, 0, 1], [0, 1, 1]],
        dtype, logits, loc, log_scale, a,
    )  # fmt: skip
    ref = _mp_second_moments(logits, loc, log_scale, a)
    assert c[1] == INF
    _assert_matches_mp(c, ref["value"], dtype, "value")
    _assert_matches_mp(gs, ref["log_scale"], dtype, "d/dlog_scale")
    _assert_matches_mp(ga, ref["atanh_rho"], dtype, "d/datanh_rho")
