"""Tests of ``probloss.functional.divergence.bivariate_normal_kl``.

Where the numbers come from
---------------------------
* mpmath (:func:`kl_ref`): the textbook form ``(tr(S_p^-1 S_q) - 2 + dmu^T S_p^-1 dmu +
  log det S_p - log det S_q) / 2`` with ``S = [[s1^2, rho s1 s2], [rho s1 s2, s2^2]]``,
  ``rho = tanh a``, ``S^-1`` written with ``cosh^2 a`` (``1 / (1 - tanh^2)``), at the inputs
  after the cast, at doubling precision until 25 digits agree
  (``cb_reference._converged``: the trace cancels like ``cosh^2 a``). None of the
  implementation's chain rule is used. Gradients: ``mpmath.diff`` of the same form at
  enough digits to absorb its cancellation (``60 + 4 |a|`` decimal digits).
* torch's ``MultivariateNormal`` KL in float64 at moderate parameters (Cholesky of a well
  conditioned 2 x 2, accurate to a few ulp: relative 1e-12).

Bounds
------
The KL is three non-negative terms (two ``normal_kl`` parts, 10 ulp each, and ``w^2 / 2``)
whose exponents are sums of log-scales and ``log cosh a``: each rounding there is an
absolute ``eps |exponent|``, so a relative ``eps |exponent|`` in an exponential. With ``E``
the largest magnitude among the log-scales and ``atanh_rho`` of both, the bound is
``32 (1 + E) eps`` relative to the KL, at points where no difference of the chain rule
cancels (``z_2 - rho_p z_1`` and the two parts of ``w`` are not small against their terms:
there the conditioning of the inputs themselves is the limit, as the fuzz oracle's scale
states). Measured worst: 0.04 / 0.005 of the bound (float32 / float64) at the named
points, 0.15 / 0.14 on the random draws. Gradients, float64: ``64 (1 + E) eps`` relative
to the largest gradient entry of the point plus 1 (the entries are sums of such terms;
measured 0.01 of it).
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from mpmath import mp
from torch.distributions import MultivariateNormal, kl_divergence

from probloss.functional import bivariate_normal_kl, normal_kl
from tests.functional import cb_reference as cb_ref
from tests.functional._checks import (
    F32_F64,
    FLOAT_DTYPES,
    HALF_DTYPES,
    assert_within,
    cast,
    dtype_id,
)


def kl_closed_form(mq1, mq2, lq1, lq2, aq, mp1, mp2, lp1, lp2, ap):
    """The textbook KL of two bivariate normals (mpmath numbers in, mpf out)."""
    sq1, sq2, sp1, sp2 = (mpmath.exp(v) for v in (lq1, lq2, lp1, lp2))
    rq, rp, cp2 = mpmath.tanh(aq), mpmath.tanh(ap), mpmath.cosh(ap) ** 2
    d1, d2 = mq1 - mp1, mq2 - mp2
    trace = cp2 * ((sq1 / sp1) ** 2 + (sq2 / sp2) ** 2 - 2 * rp * rq * sq1 * sq2 / (sp1 * sp2))
    maha = cp2 * ((d1 / sp1) ** 2 + (d2 / sp2) ** 2 - 2 * rp * d1 * d2 / (sp1 * sp2))
    # log det S = 2 log s1 + 2 log s2 - 2 log cosh a  (1 - tanh^2 = 1 / cosh^2)
    log_det_ratio = 2 * (lp1 + lp2 - lq1 - lq2) - 2 * mpmath.log(mpmath.cosh(ap))
    log_det_ratio += 2 * mpmath.log(mpmath.cosh(aq))
    return (trace - 2 + maha + log_det_ratio) / 2


def kl_ref(q: tuple[float, ...], p: tuple[float, ...]) -> float:
    """The exact KL at ``q = (mu1, mu2, log_scale1, log_scale2, atanh_rho)`` and ``p``,
    rounded to float64."""
    if q == p:
        return 0.0
    return cb_ref.to_float64(cb_ref._converged(kl_closed_form, *q, *p))


def kl_bound(q, p, exact: float, dtype: torch.dtype) -> float:
    """``32 (1 + E) eps`` relative (module docstring), at least ``tiny``."""
    size = 1 + max(abs(v) for v in (*q[2:], *p[2:]))
    return max(32 * size * torch.finfo(dtype).eps * exact, torch.finfo(dtype).tiny)


def parameters(rows, dtype, grad=True):
    """``(loc, log_scale, atanh_rho)`` leaves from rows ``(mu1, mu2, l1, l2, a)``."""
    rows = torch.tensor(rows, dtype=torch.float64).to(dtype)
    loc, ls, a = rows[:, :2], rows[:, 2:4], rows[:, 4]
    return [t.clone().requires_grad_(grad) for t in (loc, ls, a)]


# (mu1, mu2, log_scale1, log_scale2, atanh_rho): tiny scales, saturated correlations,
# scales far apart, opposite correlations, equal correlations with nearby scales
QP = [
    ((0.0, 0.0, -120.0, -120.0, 0.0), (0.0, 0.0, -119.0, -119.0, 0.0)),
    ((0.0, 0.0, -120.0, -119.5, 20.0), (1e-52, 0.0, -119.0, -119.0, 19.0)),
    ((0.0, 0.0, 0.0, 0.0, 20.0), (1.0, 1.0, 0.0, 0.0, 20.0)),
    ((1.0, -2.0, 0.5, -0.3, 0.7), (-1.0, 0.5, 0.1, 0.2, -0.4)),
    ((0.0, 0.0, 0.0, 0.0, 9.5), (0.0, 0.0, 0.0, 1e-3, 10.0)),
    ((3.0, 1.0, -60.0, 5.0, -3.0), (0.0, 0.0, 0.0, 0.0, 2.0)),
    ((0.0, 0.0, -100.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, -25.0)),
    ((0.0, 0.0, 1e-3, 1e-3, 15.0), (0.0, 0.0, 0.0, 0.0, 15.0)),
    ((1.0, 2.0, 0.0, 0.0, 0.0), (1.0, 2.0, 0.0, 0.0, 0.0)),
]


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_matches_mpmath_at_extremes_with_finite_gradients(dtype):
    """The named points and means of opposite signs beyond half the range (their
    difference overflows); 0 at ``q == p``; gradients finite at ``log_scale = -120`` and
    ``atanh_rho = 20`` (``tanh`` is 1 in float32). The equal-correlation row (``a = 15``,
    scales ``e^1e-3`` apart: KL = ``expm1mx(2e-3)``) is where rounding ``log_scale`` against
    ``log cosh a`` lost every digit before the difference was grouped."""
    big, wide = torch.finfo(dtype).max / 4, 80.0 if dtype == torch.float32 else 700.0
    rows = [*QP, ((big, -big, wide, wide, 0.5), (-big, big, wide, wide, -0.5))]
    q, p = parameters([q for q, _ in rows], dtype), parameters([p for _, p in rows], dtype)
    got = bivariate_normal_kl(*q, *p)
    assert got.dtype == dtype and got[-2].item() == 0.0
    for g in torch.autograd.grad(got.sum(), (*q, *p)):
        assert torch.isfinite(g).all()
    cast_rows = [(tuple(cast(a, dtype)), tuple(cast(b, dtype))) for a, b in rows]
    exact = [kl_ref(a, b) for a, b in cast_rows]
    bound = [kl_bound(a, b, e, dtype) for (a, b), e in zip(cast_rows, exact, strict=True)]
    assert_within(got.detach().double().numpy(), exact, bound, cast_rows, f"KL {dtype}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_matches_mpmath_on_random_parameters(dtype):
    """48 seeded draws: means of scale 3, log-scales of scale 5, ``atanh_rho`` of scale 4;
    an exact value beyond ``finfo.max`` must be inf."""
    g = torch.Generator().manual_seed(3)
    spread = torch.tensor([3.0, 3.0, 5.0, 5.0, 4.0], dtype=torch.float64)
    draws = torch.randn(48, 2, 5, dtype=torch.float64, generator=g) * spread
    pairs = [(tuple(cast(q, dtype)), tuple(cast(p, dtype))) for q, p in draws.tolist()]
    q = parameters([q for q, _ in pairs], dtype, grad=False)
    p = parameters([p for _, p in pairs], dtype, grad=False)
    got = bivariate_normal_kl(*q, *p).double().numpy()
    top = torch.finfo(dtype).max
    exact = [kl_ref(a, b) for a, b in pairs]
    exact = [e if e <= top else math.inf for e in exact]
    bound = [kl_bound(a, b, e, dtype) for (a, b), e in zip(pairs, exact, strict=True)]
    assert_within(got, exact, bound, pairs, f"KL random {dtype}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_every_dtype_follows_the_half_precision_policy(dtype):
    """float16 / bfloat16 in, float32 out: exactly the float32 KL of the same (exactly
    converted) inputs, also where float16 would overflow (KL ~ e^16 / 2 at ``log_scale_p =
    -8``, beyond 65504); gradients come back in the input dtype: the compute dtype's finite
    gradients rounded once."""
    rows_q = [(0.0, 1.0, 8.0, -3.0, 2.0), (1.0, -1.0, 0.0, 0.5, -6.0)]
    rows_p = [(0.5, 0.0, 0.0, 0.0, 1.0), (0.0, 0.0, -8.0, 0.25, 6.0)]
    q, p = parameters(rows_q, dtype), parameters(rows_p, dtype)
    got = bivariate_normal_kl(*q, *p)
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    assert got.dtype == compute
    upcast = [t.detach().to(compute).requires_grad_() for t in (*q, *p)]
    wide = bivariate_normal_kl(*upcast)
    assert torch.equal(got.detach(), wide.detach())
    assert torch.isfinite(got).all() and got[1] > 65504
    grads = torch.autograd.grad(got.sum(), (*q, *p))
    wide_grads = torch.autograd.grad(wide.sum(), upcast)
    for leaf, g, w in zip((*q, *p), grads, wide_grads, strict=True):
        # the compute dtype's gradient rounded once (e^16 = 8.9e6 in d/dloc_q is inf in float16)
        assert g.dtype == leaf.dtype and torch.equal(g, w.to(leaf.dtype))
        assert torch.isfinite(w).all()


def _gradient_ref(q, p):
    """``d KL / d(q, p)`` (10 entries) by ``mpmath.diff`` of the textbook form."""
    args = [mpmath.mpf(v) for v in (*q, *p)]
    with mp.workdps(60 + int(4 * max(abs(q[4]), abs(p[4])))):
        out = []
        for i in range(10):

            def along(x, i=i):
                moved = list(args)
                moved[i] = x
                return kl_closed_form(*moved)

            out.append(float(mpmath.diff(along, args[i])))
        return out


@pytest.mark.parametrize(
    ("q", "p"),
    [
        ((1.0, -2.0, 0.5, -0.3, 0.7), (-1.0, 0.5, 0.1, 0.2, -0.4)),
        ((0.0, 0.0, -20.0, -19.5, 12.0), (1e-9, 0.0, -19.0, -19.0, 11.0)),
        ((3.0, 1.0, -6.0, 5.0, -3.0), (0.0, 0.0, 0.0, 0.0, 2.0)),
        ((0.0, 0.0, 0.0, 0.0, 9.5), (0.0, 1.0, 0.0, 1e-3, 10.0)),
    ],
)
def test_gradients_match_mpmath_in_float64(q, p):
    """Every gradient entry against ``mpmath.diff`` (bound in the module docstring),
    including ``atanh_rho`` of 12 and scales of ``e^-20``."""
    qt = parameters([q], torch.float64)
    pt = parameters([p], torch.float64)
    grads = torch.autograd.grad(bivariate_normal_kl(*qt, *pt).sum(), (*qt, *pt))
    got = [float(v) for g in grads for v in g.reshape(-1)]  # (mu1, mu2, l1, l2, a) q, p
    exact = _gradient_ref(q, p)
    size = 1 + max(abs(v) for v in (*q[2:], *p[2:]))
    scale = 64 * size * torch.finfo(torch.float64).eps * (1 + max(abs(e) for e in exact))
    assert_within(got, exact, [scale] * 10, list(range(10)), f"gradients at {q}, {p}")


def _converged_gradient_ref(q, p):
    """``mpmath.diff`` of the textbook form at ``dps = 40 + (sum of the three largest
    |exponents|) + 2 log10(1 + max |mean|)`` (the trace cancels like ``cosh^2 a_p e^{2 d}``:
    0.87 digits per unit of the exponents involved; the Mahalanobis form like the squared
    means), checked against twice that precision to 20 digits."""
    exponents = sorted(abs(v) for v in (*q[2:], *p[2:]))
    means = max(abs(v) for v in (*q[:2], *p[:2]))
    dps = 40 + int(sum(exponents[-3:]) + 2 * math.log10(1 + means))
    args = [mpmath.mpf(v) for v in (*q, *p)]

    def at(digits):
        with mp.workdps(digits):
            out = []
            for i in range(10):

                def along(x, i=i):
                    moved = list(args)
                    moved[i] = x
                    return kl_closed_form(*moved)

                out.append(mpmath.diff(along, args[i]))
            return out

    low, high = at(dps), at(2 * dps)
    for a, b in zip(low, high, strict=True):
        assert abs(a - b) <= mpmath.mpf(10) ** -20 * (1 + abs(b)), (q, p)
    return [cb_ref.to_float64(v) for v in high]


# Beyond the old autograd limits: |log_scale|, |atanh_rho| > log(finfo.max) / 4 (22 in
# float32, 177 in float64) and standardised mean differences > finfo.max^(1/8) (6.4e4,
# 1.1e38), the KL still finite
EXTREME_QP = {
    torch.float32: [
        ((0.0, 0.0, -30.0, 25.0, 30.0), (1e-12, -1.0, -28.0, 24.0, 29.5)),
        ((1e6, -2e6, 0.0, 0.0, 0.5), (0.0, 0.0, 2.0, 1.0, -0.5)),
        ((0.0, 0.0, 40.0, -40.0, -35.0), (0.0, 0.0, 40.5, -39.0, -36.0)),
        ((3.0, 1e5, -1.0, 30.0, -40.0), (-2.0, 0.0, 0.0, 29.0, 25.0)),
    ],
    torch.float64: [
        ((0.0, 0.0, -200.0, 190.0, 250.0), (1e-86, -1.0, -199.0, 191.0, 249.0)),
        ((3e40, -1e40, 0.0, 0.0, 0.5), (0.0, 0.0, 5.0, 1.0, -0.5)),
        ((0.0, 0.0, 300.0, -300.0, -200.0), (0.0, 0.0, 300.5, -299.0, -201.0)),
    ],
}


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_gradients_match_mpmath_beyond_the_autograd_limits(dtype):
    """Every gradient entry against ``mpmath.diff`` at the extreme points above: within
    ``64 (1 + E) eps`` of ``1 + max |exact entry|`` (the float64 bound of the module
    docstring; float32 gradients are the float64 closed form rounded once, so the same
    bound holds with float32's eps; measured 0.003 of it), the sign-correct inf where the
    exact entry exceeds ``finfo.max``."""
    for q, p in EXTREME_QP[dtype]:
        q, p = tuple(cast(q, dtype)), tuple(cast(p, dtype))
        qt, pt = parameters([q], dtype), parameters([p], dtype)
        kl = bivariate_normal_kl(*qt, *pt)
        assert torch.isfinite(kl).all()
        grads = torch.autograd.grad(kl.sum(), (*qt, *pt))
        got = [float(v) for g in grads for v in g.reshape(-1)]
        exact = _converged_gradient_ref(q, p)
        top = torch.finfo(dtype).max
        exact = [e if abs(e) <= top else math.copysign(math.inf, e) for e in exact]
        size = 1 + max(abs(v) for v in (*q[2:], *p[2:]))
        finite = [abs(e) for e in exact if math.isfinite(e)]
        scale = 64 * size * torch.finfo(dtype).eps * (1 + max(finite))
        assert_within(got, exact, [scale] * 10, list(range(10)), f"gradients at {q}, {p}")


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_value_and_gradients_at_the_overflow_edge(dtype):
    """Log-scales and ``atanh_rho`` of ``0.9 finfo.max`` against the standard normal: the
    KL is ``-log_scale_q1 - 1/2`` (one coordinate's scale) or ``log cosh a_q = a_q - ln 2``
    (mpmath: both round to the input), not the inf of doubling them; the gradients are
    ``(-1, +1)`` in ``(log_scale_q1, log_scale_p1)`` and ``1`` in ``atanh_rho_q`` (the
    closed forms ``expm1(2 d1) - ...`` and ``rho_q - rho_p e^...``). Both scales that far
    out make the exact KL ``1.8 max``: inf."""
    edge = 0.9 * torch.finfo(dtype).max
    one_scale, correlation = (0.0, 0.0, -edge, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0, edge)
    q = parameters([one_scale, correlation, (0.0, 0.0, -edge, -edge, 0.0)], dtype)
    p = parameters([(0.0, 0.0, 0.0, 0.0, 0.0)] * 3, dtype)
    kl = bivariate_normal_kl(*q, *p)
    exact = [
        cb_ref.to_float64(mpmath.mpf(edge) - mpmath.mpf(0.5)),
        cb_ref.to_float64(mpmath.log(mpmath.cosh(mpmath.mpf(edge)))),
    ]
    assert kl[:2].tolist() == [float(torch.tensor(e, dtype=dtype)) for e in exact]
    assert kl[2].item() == math.inf
    grads = torch.autograd.grad(kl[:2].sum(), (*q, *p))
    assert grads[1][0].tolist() == [-1.0, 0.0] and grads[4][0].tolist() == [1.0, 0.0]
    assert grads[2][1].item() == 1.0


def test_gradgradcheck_float64():
    """The closed-form backward is differentiable again (plain torch and ``mul_exp``)."""
    g = torch.Generator().manual_seed(4)
    rows = (torch.randn(2, 2, 5, dtype=torch.float64, generator=g) * 0.7).tolist()
    q, p = parameters(rows[0], torch.float64), parameters(rows[1], torch.float64)
    assert torch.autograd.gradgradcheck(bivariate_normal_kl, (*q, *p))


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn(2, 3, 5, dtype=torch.float64, generator=g) * 0.7).tolist()
    q, p = parameters(rows[0], torch.float64), parameters(rows[1], torch.float64)
    assert torch.autograd.gradcheck(bivariate_normal_kl, (*q, *p))


def test_equals_torch_multivariate_normal_kl_on_moderate_inputs():
    """float64, 32 seeded pairs: torch's MVN-MVN KL to 1e-12 relative, value and gradients
    with respect to the means (torch's Cholesky route is accurate to a few ulp there)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 32, 5, dtype=torch.float64, generator=g) * torch.tensor(
        [1.0, 1.0, 0.5, 0.5, 1.0], dtype=torch.float64
    )
    q, p = parameters(rows[0].tolist(), torch.float64), parameters(rows[1].tolist(), torch.float64)

    def covariance(loc, ls, a):
        s1, s2, rho = ls[:, 0].exp(), ls[:, 1].exp(), torch.tanh(a)
        cov = torch.stack([s1 * s1, rho * s1 * s2, rho * s1 * s2, s2 * s2], -1)
        return MultivariateNormal(loc, covariance_matrix=cov.reshape(-1, 2, 2))

    ours = bivariate_normal_kl(*q, *p)
    theirs = kl_divergence(covariance(*q), covariance(*p))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    g_ours = torch.autograd.grad(ours.sum(), (q[0], p[0]))
    g_theirs = torch.autograd.grad(theirs.sum(), (q[0], p[0]))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", F32_F64, ids=dtype_id)
def test_zero_correlation_is_two_normal_kls(dtype):
    """``rho = 0`` on both sides: exactly the sum of the marginal ``normal_kl`` (the chain
    rule's conditional is then the second marginal), also at ``log_scale = -120``."""
    loc_q = torch.tensor([[0.0, 1.0], [2.0, -3.0]], dtype=dtype)
    ls_q = torch.tensor([[-120.0, 0.3], [5.0, -7.0]], dtype=dtype)
    loc_p = torch.tensor([[0.0, -1.0], [0.0, 0.0]], dtype=dtype)
    ls_p = torch.tensor([[-119.0, 0.0], [0.0, 2.0]], dtype=dtype)
    zero = torch.zeros(2, dtype=dtype)
    got = bivariate_normal_kl(loc_q, ls_q, zero, loc_p, ls_p, zero)
    assert torch.equal(got, normal_kl(loc_q, 2 * ls_q, loc_p, 2 * ls_p).sum(-1))


def test_omitted_p_is_the_standard_bivariate_normal():
    """``p`` left out (or partly): ``N(0, I)``, the same as passing zeros; against
    ``rho = tanh 0.5`` it is ``log cosh 0.5`` (mpmath)."""
    g = torch.Generator().manual_seed(2)
    loc, ls = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    a = torch.randn(4, generator=g)
    zeros = (torch.zeros(2), torch.zeros(2), torch.zeros(()))
    full = bivariate_normal_kl(loc, ls, a, *zeros)
    assert torch.equal(bivariate_normal_kl(loc, ls, a), full)
    assert torch.equal(bivariate_normal_kl(loc, ls, a, log_scale_p=torch.zeros(2)), full)
    half = bivariate_normal_kl(torch.zeros(2), torch.zeros(2), torch.tensor(0.5))
    exact = float(mpmath.log(mpmath.cosh(0.5)))
    assert abs(half.item() - exact) <= 8 * torch.finfo(torch.float32).eps * exact


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        ((torch.zeros(3), torch.zeros(2), torch.zeros(())), r"loc_q must have shape \(\*, 2\)"),
        (
            (torch.zeros(2), torch.zeros(2), torch.zeros(()), torch.zeros(2), torch.zeros(5, 1)),
            r"log_scale_p must have shape \(\*, 2\).*\(5, 1\)",
        ),
        (
            (torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3)),
            r"do not broadcast.*loc_q \(4, 2\).*atanh_rho_q \(3,\)",
        ),
    ],
    ids=["loc_q-event", "log_scale_p-event", "batch"],
)
def test_shape_errors_name_the_argument(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        bivariate_normal_kl(*args)
