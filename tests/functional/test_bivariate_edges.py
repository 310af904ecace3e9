"""Edge cases of ``probloss.functional.bivariate`` (issue 10): every gradient entry its own
exact value where partial products overflow, reduced losses that refuse to broadcast the
value, empty batches, huge and infinite inputs.

Where the numbers come from
---------------------------
mpmath at ``60 + 2|a| / ln 10`` significant digits (the quadratic form's terms reach
``e^{2|a|}`` times the result near the correlation line), evaluated at the inputs after the
cast to the dtype under test, from the textbook form (not the implementation's rotated or
log-scaled one): with ``z_i = (x_i - mu_i) e^{-l_i}``, ``C = cosh a``, ``S = sinh a``,
``Q = C^2 (z1^2 + z2^2) - 2 S C z1 z2``,

    d/dx1 = -(C^2 z1 - S C z2) e^{-l1},          d/dl1 = -1 + (C^2 z1^2 - S C z1 z2),
    d/da  = tanh a - (S C (z1^2 + z2^2) - cosh(2a) z1 z2),   d/dmu = -d/dx,

and symmetrically in the second coordinate.

Bounds
------
Each entry is a sum of terms of either sign; it is bounded relative to the sum ``T`` of the
magnitudes of its terms above (the first-order effect of relative perturbations of the
inputs). Where the closed forms overflow on the way, the entry is recomputed from logarithms
of the magnitudes (``_log_scaled_gradients``): the rounding of each exponent (``log|r_i| -
l_i``, ``2|a|``, sums of them) is an absolute error ``eps E`` in the exponent, ``E`` the sum of
the magnitudes of the exponents involved, hence a relative error ``eps E`` of the terms,
plus a few roundings per operation (under 16 in all). Bound: ``|err| <= 2 eps (E + 16) T``
(the factor 2 for libm's exp / log within 2 ulp), with ``E = |log|r1|| + |log|r2|| + |l1| +
|l2| + 4|a|``. Half-precision inputs compute in float32; their gradients are rounded once
more to the half dtype (``eps_half / 2`` relative, up to ``finfo(half).tiny`` absolute).
Where the exact entry exceeds the output dtype's ``finfo.max`` it must be that infinity.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mpmath import mp, mpf

from probloss.functional.bivariate import bivariate_normal_log_prob, bivariate_normal_nll
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id

ENTRIES = ("d/dx1", "d/dx2", "d/dmu1", "d/dmu2", "d/dl1", "d/dl2", "d/da")


def _exact(x1, x2, mu1, mu2, l1, l2, a):
    """(value, {entry: (exact, T)}) at the given (already rounded) inputs."""
    # 60 digits + 2|a| / ln 10 (the cancellation near the line), capped at 400: beyond that
    # the bound (relative to the sum of the terms' magnitudes) dwarfs 1e-60 anyway
    with mp.workdps(60 + int(min(abs(a) / 2.3 * 2, 340))):
        x1, x2, mu1, mu2, l1, l2, a = map(mpf, (x1, x2, mu1, mu2, l1, l2, a))
        e1, e2 = mp.exp(-l1), mp.exp(-l2)
        z1, z2 = (x1 - mu1) * e1, (x2 - mu2) * e2
        c, s = mp.cosh(a), mp.sinh(a)
        q = c * c * (z1 * z1 + z2 * z2) - 2 * s * c * z1 * z2
        value = -mp.log(2 * mp.pi) - l1 - l2 + mp.log(c) - q / 2
        dz1 = c * c * z1 - s * c * z2  # dQ/dz1 / 2
        dz2 = c * c * z2 - s * c * z1
        t1 = (c * c * abs(z1) + abs(s * c * z2)) * e1
        t2 = (c * c * abs(z2) + abs(s * c * z1)) * e2
        out = {
            "d/dx1": (-dz1 * e1, t1),
            "d/dx2": (-dz2 * e2, t2),
            "d/dmu1": (dz1 * e1, t1),
            "d/dmu2": (dz2 * e2, t2),
            "d/dl1": (-1 + dz1 * z1, 1 + c * c * z1 * z1 + abs(s * c * z1 * z2)),
            "d/dl2": (-1 + dz2 * z2, 1 + c * c * z2 * z2 + abs(s * c * z1 * z2)),
            "d/da": (
                mp.tanh(a) - (s * c * (z1 * z1 + z2 * z2) - mp.cosh(2 * a) * z1 * z2),
                1 + abs(s * c) * (z1 * z1 + z2 * z2) + mp.cosh(2 * a) * abs(z1 * z2),
            ),
        }
        return value, out


def _grid(dtype):
    """Inputs around the overflow of ``e^{-l}`` (l near -log(max)) and of products of the
    closed forms, scaled to the compute dtype's range ``L = log(finfo.max)``."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    big = math.log(torch.finfo(compute).max)
    x1s = [math.exp(-0.99 * big), 1.99 * math.exp(-0.77 * big), 3.46e-5, 1.0, math.exp(0.5 * big)]
    x2s = [2.0, -0.19 * math.exp(0.99 * big), 2.85 * math.exp(0.58 * big)]
    l1s = [-big, -big + 1.7, -big - 0.8, -1.13 * big, -0.74 * big]
    l2s = [0.0, -0.26 * big, -0.7 * big, -1.08 * big]
    as_ = [0.0, 0.3, -0.2 * big, 0.68 * big]
    rows = list(itertools.product(x1s, x2s, l1s, l2s, as_))
    t = torch.tensor(rows, dtype=torch.float64).to(dtype)
    return t[torch.isfinite(t).all(-1)]


def _limit(v, dtype):
    """``v`` as a float of ``dtype``'s range: inf beyond it, None in the rounding gap."""
    top = torch.finfo(dtype).max
    if abs(v) <= top:
        return float(v)
    if abs(v) > top * (1 + torch.finfo(dtype).eps):
        return math.copysign(math.inf, v)
    return None


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_each_gradient_entry_is_its_own_value_against_mpmath(dtype):
    """Issue 10: one overflowing partial product (a coordinate's log_scale near -88.7 in
    float32, -709.8 in float64) turned all seven gradient entries into NaN. Now each entry is
    within the bound of its mpmath value: finite where it is representable, the right
    infinity where it is not; and the value likewise."""
    _check_against_mpmath(dtype, _grid(dtype))


def _check_against_mpmath(dtype, rows, cancelled=False):
    """Value and the seven gradient entries at ``rows`` (x1, x2, l1, l2, a; mu = 0) within
    the module's bound of their mpmath values (infinities where the exact value is beyond
    the dtype). ``cancelled``: the exponents are counted after the cancellation of ``|a|``
    against ``l_i`` (``E = |log|r1|| + |log|r2|| + ||a| - l1| + ||a| - l2| + |l1 - l2|``),
    the accuracy of forms that take ``|a| - l_i`` first."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    tiny = torch.finfo(compute).tiny
    x = rows[:, 0:2].clone().requires_grad_()
    mu = torch.zeros_like(x, requires_grad=True)
    ls = rows[:, 2:4].clone().requires_grad_()
    a = rows[:, 4].clone().requires_grad_()
    out = bivariate_normal_log_prob(x, mu, ls, a)
    out.sum().backward()
    got = {
        "value": out.detach(),
        "d/dx1": x.grad[:, 0],
        "d/dx2": x.grad[:, 1],
        "d/dmu1": mu.grad[:, 0],
        "d/dmu2": mu.grad[:, 1],
        "d/dl1": ls.grad[:, 0],
        "d/dl2": ls.grad[:, 1],
        "d/da": a.grad,
    }
    expected = {k: [] for k in got}
    bounds = {k: [] for k in got}
    labels = []
    for row in rows.double().tolist():
        x1, x2, l1, l2, ai = row
        value, entries = _exact(x1, x2, 0.0, 0.0, l1, l2, ai)
        logs = [abs(math.log(abs(v))) if v else 0.0 for v in (x1, x2)]
        e_sum = sum(logs) + abs(l1) + abs(l2) + 4 * abs(ai)
        if cancelled:
            e_sum = sum(logs) + abs(abs(ai) - l1) + abs(abs(ai) - l2) + abs(l1 - l2)
        k = 2 * eps * (e_sum + 16)
        labels.append(f"x=({x1:.3g}, {x2:.3g}) l=({l1:.4g}, {l2:.4g}) a={ai:.3g}")
        with mp.workdps(30):
            z1, z2 = mpf(x1) * mp.exp(-l1), mpf(x2) * mp.exp(-l2)
            c, s = mp.cosh(ai), mp.sinh(ai)
            size = 2 + abs(l1) + abs(l2) + abs(mp.log(c)) + c * c * (z1 * z1 + z2 * z2)
            size += abs(2 * s * c * z1 * z2)
        ref = _limit(value, compute)
        expected["value"].append(math.nan if ref is None else ref)
        bounds["value"].append(float(k * size) + tiny)
        for name in ENTRIES:
            exact, terms = entries[name]
            ref = _limit(exact, dtype)
            expected[name].append(math.nan if ref is None else ref)
            half = 0.0
            if dtype in HALF_DTYPES:
                half = torch.finfo(dtype).eps / 2 * abs(float(exact)) + torch.finfo(dtype).tiny
            bounds[name].append(float(k * terms) + half + tiny)
    for name in got:
        keep = [i for i, v in enumerate(expected[name]) if not math.isnan(v)]
        assert_within(
            got[name][keep].double().numpy(),
            [expected[name][i] for i in keep],
            [bounds[name][i] for i in keep],
            [labels[i] for i in keep],
            f"{dtype_id(dtype)} {name}",
        )


def test_issue_example_finite_entries_stay_finite():
    """A point whose second coordinate overflows z (|z2| > finfo.max) at atanh_rho = 0: the
    first coordinate's log_scale derivative is z1^2 - 1 = 1.4e16 (mpmath), finite, and no
    entry is NaN (all seven were)."""
    x = torch.tensor([1.9878243298958845e-30, -6.393187907552638e37], requires_grad=True)
    ls = torch.tensor([-87.01373291015625, -62.070556640625], requires_grad=True)
    a = torch.tensor(0.0, requires_grad=True)
    bivariate_normal_log_prob(x, torch.zeros(2), ls, a).backward()
    z1 = mpf(x[0].item()) * mp.exp(-mpf(ls[0].item()))
    assert not torch.isnan(torch.cat([x.grad, ls.grad, a.grad[None]])).any()
    assert abs(float(ls.grad[0]) - float(z1 * z1 - 1)) <= 1e-5 * float(z1 * z1)
    assert x.grad[0] == -math.inf and x.grad[1] == math.inf and ls.grad[1] == math.inf


def _underflow_grid(dtype):
    """Points whose standardised residuals underflow (``|z_i| < finfo.tiny``, or to 0) while
    ``e^{|a|}`` brings the quadratic form back into range, or beyond it: ``log_scale`` from
    ``1.25 L`` to ``3 L`` and ``1e4`` (``L = log(finfo.max)`` of the compute dtype), ``|a|``
    a few units above ``log_scale`` (Q finite), far above it (Q overflows: -inf) and at
    ``1e38``; both signs of ``a``; a residual on an axis, two of either sign, both
    underflowing."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    big = math.log(torch.finfo(compute).max)
    rows = []
    xs = [(1.0, 0.0), (1.0, 1.5), (-3.0, 2e-3), (1e-3, -1.0), (0.0, 0.0)]
    for (x1, x2), l1, dl, da, sign in itertools.product(
        xs, [1.25 * big, 3.0 * big, 1e4], [0.0, 0.3], [3.0, 5.0, 40.0], [1.0, -1.0]
    ):
        rows.append((x1, x2, l1, l1 + dl, sign * (l1 + da)))
    for (x1, x2), sign in itertools.product(xs, [1.0, -1.0]):
        rows.append((x1, x2, 1.25 * big, 1.25 * big, sign * 1e38))
        rows.append((x1, x2, 1e30, -1e30, sign * 1e38))
    t = torch.tensor(rows, dtype=torch.float64).to(dtype)
    return t[torch.isfinite(t).all(-1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_underflowing_residuals_at_saturated_correlation_against_mpmath(dtype):
    """Issue 10 (worst kind: a wrong finite value): z_i = (x_i - mu_i) e^{-l_i} underflowed to
    0 before e^{|a|} multiplied it. bivariate_normal_nll((1, 0), 0, (110, 110), 120) was
    102.53 in float32 where mpmath gives 6.0646e7 (float64 at l = 800, a = 810: 792.53),
    and a log density of +3.75e32 where the exact one is -inf. Value and all seven gradient
    entries within the module's bound of mpmath on :func:`_underflow_grid`."""
    _check_against_mpmath(dtype, _underflow_grid(dtype))


@pytest.mark.parametrize(
    ("dtype", "ls", "a"), [(torch.float32, 110.0, 120.0), (torch.float64, 800.0, 810.0)]
)
def test_issue_example_underflowing_residual(dtype, ls, a):
    """The issue's two rows: NLL 6.0646e7 (mpmath 6.06457...e7, bound 2 eps (E + 16) times
    the size of the terms, E = 2 l + 4 a)."""
    got = bivariate_normal_nll(
        torch.tensor([1.0, 0.0], dtype=dtype),
        torch.zeros(2, dtype=dtype),
        torch.tensor([ls, ls], dtype=dtype),
        torch.tensor(a, dtype=dtype),
        reduction="none",
    )
    value, _ = _exact(1.0, 0.0, 0.0, 0.0, ls, ls, a)
    eps = torch.finfo(dtype).eps
    bound = 2 * eps * (2 * ls + 4 * a + 16) * (abs(float(value)) + 2 * ls + a)
    assert abs(float(got) + float(value)) <= bound


# --------------------------------------------------------------------------------------
# Reduced losses refuse a parameter that enlarges the value's batch shape
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_nll_refuses_a_parameter_that_broadcasts_the_value(reduction):
    """Issue 10: bivariate_normal_nll(t, out[:, 0:2], out[:, 2:4], out[:, 4:5]) with t of
    shape (64, 2) averaged a (64, 64) matrix; now a ValueError naming atanh_rho and both
    shapes. The same for loc, log_scale and rho; 'none' keeps torch's broadcasting."""
    t, out = torch.randn(64, 2), torch.randn(64, 5)
    with pytest.raises(
        ValueError, match=r"atanh_rho of batch shape \(64, 1\).*\(64,\).*\(64, 64\)"
    ):
        bivariate_normal_nll(t, out[:, 0:2], out[:, 2:4], out[:, 4:5], reduction=reduction)
    with pytest.raises(ValueError, match=r"rho of batch shape \(64, 1\)"):
        bivariate_normal_nll(
            t, out[:, 0:2], out[:, 2:4], rho=out[:, 4:5].tanh(), reduction=reduction
        )
    with pytest.raises(ValueError, match=r"loc of batch shape \(64, 1\)"):
        bivariate_normal_nll(t, out[:, None, 0:2], out[:, 2:4], out[:, 4], reduction=reduction)
    with pytest.raises(ValueError, match=r"log_scale of batch shape \(64, 1\)"):
        bivariate_normal_nll(t, out[:, 0:2], out[:, None, 2:4], out[:, 4], reduction=reduction)
    bivariate_normal_nll(t, out[:, 0:2], out[:, 2:4], out[:, 4], reduction=reduction)
    bivariate_normal_nll(t, torch.zeros(2), torch.zeros(2), torch.tensor(0.0), reduction=reduction)
    none = bivariate_normal_nll(t, out[:, 0:2], out[:, 2:4], out[:, 4:5], reduction="none")
    assert none.shape == (64, 64)


# --------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(dtype):
    """0 events in, 0 values out (float32 for half inputs), empty gradients; like torch, the
    'sum' of an empty batch is 0 and its 'mean' NaN."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    x = torch.zeros(0, 2, dtype=dtype)
    mu = torch.zeros(0, 2, dtype=dtype, requires_grad=True)
    ls = torch.zeros(0, 2, dtype=dtype, requires_grad=True)
    a = torch.zeros(0, dtype=dtype, requires_grad=True)
    out = bivariate_normal_log_prob(x, mu, ls, a)
    assert out.shape == (0,) and out.dtype == compute
    out.sum().backward()
    assert mu.grad.shape == (0, 2) and ls.grad.shape == (0, 2) and a.grad.shape == (0,)
    for policy in ("raise", "mask"):
        assert bivariate_normal_nll(x, mu, ls, a, reduction="sum", nan_policy=policy).item() == 0
        assert math.isnan(bivariate_normal_nll(x, mu, ls, a, nan_policy=policy).item())
        assert bivariate_normal_nll(x, mu, ls, a, reduction="none").shape == (0,)


# --------------------------------------------------------------------------------------
# Huge inputs: magnitudes 1e16 .. 3e38 of either sign, and 0
# --------------------------------------------------------------------------------------

HUGE = sorted({s * m for m in (0.0, 1.0, 1e16, 1e20, 1e30, 3e38) for s in (1.0, -1.0)})


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_huge_inputs_give_no_nan(dtype):
    """Issue 10: NaN instead of +-inf or a finite value at inputs from 1e16 to 3e38. Every
    combination of x1, mu1, log_scale1 and atanh_rho in {0, +-1, +-1e16, +-1e20, +-1e30,
    +-3e38} (x2 in {0, 1, -1e20}, mu2 = log_scale2 = 0): value and all seven gradient
    entries free of NaN (was: 704 NaN rows in float32, e.g. x1 = -3e38, mu1 = -1e30,
    log_scale1 = -3e38, atanh_rho = 3e38, where log cosh(a) - log_scale overflows next to
    an infinite Q). The values the entries take are checked against mpmath in
    test_each_gradient_entry_is_its_own_value_against_mpmath."""
    rows = torch.tensor(
        list(itertools.product(HUGE, [0.0, 1.0, -1e20], HUGE, HUGE, HUGE)), dtype=torch.float64
    ).to(dtype)
    rows = rows[torch.isfinite(rows).all(-1)]
    zero = torch.zeros(len(rows), dtype=dtype)
    x = rows[:, 0:2].clone().requires_grad_()
    mu = torch.stack([rows[:, 2], zero], -1).requires_grad_()
    ls = torch.stack([rows[:, 3], zero], -1).requires_grad_()
    a = rows[:, 4].clone().requires_grad_()
    out = bivariate_normal_log_prob(x, mu, ls, a)
    out.sum().backward()
    assert not torch.isnan(out).any()
    for leaf in (x, mu, ls, a):
        assert not torch.isnan(leaf.grad).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
def test_fallback_exponents_are_not_clamped_into_overflow(dtype):
    """A coordinate with log_scale = 1e25 has z1 = r1 e^{-1e25}: every term of d/dlog_scale1
    but the -1 carries e^{-1e25 + 2|a| + ...} with |a| = 6.4e11, i.e. 0, so the exact entry is
    -1 (mpmath: -1 + O(e^{-1e25})). The log-scaled fallback (entered because the other
    coordinate's derivative overflows) once clamped exponents at 1e4 and gave +inf."""
    x = torch.tensor([3.24e-12, 0.3418], dtype=dtype, requires_grad=True)
    loc = torch.tensor([-0.0078125, -0.000618], dtype=dtype)
    ls = torch.tensor([1.02e25, -93.0], dtype=dtype, requires_grad=True)
    a = torch.tensor(-6.44e11, dtype=dtype, requires_grad=True)
    bivariate_normal_log_prob(x, loc, ls, a).backward()
    assert ls.grad[0].item() == -1.0
    assert ls.grad[1].item() == math.inf  # z2^2 cosh^2(a): beyond every dtype


def _cancelling_grid(dtype):
    """``l1 = l2 = L`` and ``a = +-L`` with ``L`` from ``1e3`` to ``0.9 finfo.max`` of the input
    dtype: ``z_i`` underflows (or is 0) while ``z_i e^{|a|} = x_i``, off the correlation line
    (``x1 != +-x2``, where mpmath would need ``2 L / ln 10`` digits)."""
    top = torch.finfo(dtype).max
    rows = []
    xs = [(1.0, 1.5), (-3.0, 2e-3), (1e-3, -1.0), (-2.47e13, -2.3e25), (1.0, 0.0)]
    for (x1, x2), big, sign in itertools.product(xs, [1e3, 1e30, 0.9 * top], [1.0, -1.0]):
        rows.append((x1, x2, big, big, sign * big))
    t = torch.tensor(rows, dtype=torch.float64).to(dtype)
    return t[torch.isfinite(t).all(-1)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_scale_cancelled_by_the_correlation_against_mpmath(dtype):
    """Found by the fuzz suite (bfloat16 bivariate_normal_nll, issue 10): at l1 = l2 = -a =
    3.39e38, x - mu = (-2.47e13, -2.3e25) the exact NLL is 6.68e49 (mpmath); float64 gave
    3.39e38 and gradients d/dx = 0.5 (exact 5.78e24): the log-scaled forms formed the
    exponent of n e^b as (log|r| - l) + b, whose rounding (eps l = 7.5e22) erased log|r| =
    58, and compared the two coordinates through exponents of that size (x = (1, 1.5): n =
    0). Now b - l_i is taken first and the coordinates compared through log|r1| - log|r2| -
    (l1 - l2). Value and all seven gradient entries within the module's bound, with the
    exponents counted after that cancellation."""
    _check_against_mpmath(dtype, _cancelling_grid(dtype), cancelled=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_log_scale_sum_overflows_where_the_density_does_not(dtype):
    """Found by the fuzz suite: l1 = l2 = |a| = 0.9 finfo.max on the correlation line (x1 =
    sign(a) x2: Q = 0 up to e^{-2 l}): -log 2 pi - l1 - l2 + log cosh a = -(l + log 4 pi),
    finite, but l1 + l2 overflowed before log cosh a = l - log 2 was added (-inf). Closed
    form (Q/2 = (1 + e^{-2b})/8 (z1 + z2')^2 with z e^{-l} = 0 in every float): value -(l +
    log 4 pi) within 4 eps of l (the halves rounded, log cosh a within 2 eps), d/dx = d/dmu
    = 0 (below finfo.tiny), d/dl_i = -1 and d/da = tanh a = sign(a), each within 4 eps."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    big = float(torch.tensor(0.9 * torch.finfo(dtype).max, dtype=torch.float64).to(dtype))
    for sign, x in itertools.product((1.0, -1.0), (1.0, 2.5e3)):
        xt = torch.tensor([x, sign * x], dtype=dtype, requires_grad=True)
        mu = torch.zeros(2, dtype=dtype, requires_grad=True)
        ls = torch.tensor([big, big], dtype=dtype, requires_grad=True)
        a = torch.tensor(sign * big, dtype=dtype, requires_grad=True)
        out = bivariate_normal_log_prob(xt, mu, ls, a)
        out.backward()
        label = f"x={x} sign={sign}"
        assert abs(out.item() + (big + math.log(4 * math.pi))) <= 4 * eps * big, label
        assert (xt.grad.abs() <= torch.finfo(compute).tiny).all(), label
        assert (mu.grad.abs() <= torch.finfo(compute).tiny).all(), label
        assert ((ls.grad.double() + 1.0).abs() <= 4 * eps).all(), label
        assert abs(a.grad.item() - sign) <= 4 * eps, label
