"""Edge cases of ``probloss.functional.multivariate`` and ``probloss.functional.lowrank``
(issue 10): the low-rank log density at extreme inputs (value and gradient), huge and
infinite inputs, empty batches.

Where the numbers come from
---------------------------
mpmath, through the oracles of ``tests/functional/_multivariate_oracles.py`` (the covariance
``W W^T + diag(e^l)`` formed as a matrix at 80, 160, ... digits until 25 digits agree,
Gaussian elimination; nothing of the implementation reused), extended here by the gradient
``d/dx = -v``, ``d/dW = (v v^T - Sigma^{-1}) W``, ``d/dl_i = d_i (v_i^2 - Sigma^{-1}_ii) / 2``
with ``v = Sigma^{-1} (x - mu)``, and by the whitened sizes below. Inputs are the exact
values after the cast to the dtype under test.

Bounds
------
``eps`` is that of the dtype the computation runs in: float64 for float64 inputs
and for float32 inputs (computed in float64 and rounded once to float32; see
``_lowrank_work_dtype``). With ``r~ = d^{-1/2} (x - mu)``, ``W~ = d^{-1/2} W`` and
``y = W^T v`` (the minimiser of the ridge problem whose optimum is the Mahalanobis term):

* value: a backward-stable evaluation (every input entry perturbed by a relative ``k eps``)
  errs by the first-order term ``k eps (scale + cond)`` of the module doc of
  ``_multivariate_oracles.py`` plus the second-order term: the quadratic form changes by
  ``delta^T Sigma^{-1} delta <= ||d^{-1/2} delta||^2 <= (k eps)^2 ||r~||^2`` for a
  perturbation ``delta`` of the residual (and the same for the factor rotating a point
  along it), which no working-precision evaluation avoids for a point along a long
  factor. With ``k = 4``: ``4 eps (scale + cond) + (4 eps ||r~||)^2``, plus half an ulp of
  the float32 output.
* gradients, in whitened (dimensionless) coordinates ``d/dx_i sqrt(d_i)``,
  ``d/dW_ij sqrt(d_i)``, ``d/dl_i``: each is a product of two whitened quantities (the
  residual, ``y``, ``W~ K^{-1}``) of size at most ``G = 1 + ||r~|| + ||W~||_F (1 + ||y||)``,
  each with a backward error of at most ``k eps G``: error ``<= 2 k eps G^2`` with
  ``k = 8``, plus half an ulp of the float32 output.
"""

from __future__ import annotations

import functools
import itertools
import math

import mpmath
import numpy as np
import pytest
import torch

from probloss.functional import (
    lowrank_multivariate_normal_log_prob,
    multivariate_normal_log_prob,
    scale_tril_from_raw,
)
from tests.functional._checks import FLOAT_DTYPES, HALF_DTYPES, assert_within, dtype_id
from tests.functional._multivariate_oracles import (
    _converged,
    _key,
    _lowrank_solved,
    _lowrank_value,
    _scale,
)

F64 = torch.float64


def _lowrank_full(x, mu, w, log_diag):
    """``_lowrank_value``'s four numbers, then ``||r~||``, ``G`` and the gradient entries."""
    n, rank = len(w), len(w[0])
    log_p, half_maha, terms, cond = _lowrank_value(x, mu, w, log_diag)
    wm, d, _, r, v, inv, _ = _lowrank_solved(x, mu, w, log_diag)
    root = [mpmath.sqrt(t) for t in d]
    r_white = mpmath.sqrt(mpmath.fsum((r[i] / root[i]) ** 2 for i in range(n)))
    w_white = mpmath.sqrt(
        mpmath.fsum((wm[i][k] / root[i]) ** 2 for i in range(n) for k in range(rank))
    )
    y = [mpmath.fsum(wm[i][k] * v[i] for i in range(n)) for k in range(rank)]
    y_norm = mpmath.sqrt(mpmath.fsum(t * t for t in y))
    size = 1 + r_white + w_white * (1 + y_norm)
    grad_x = [-v[i] * root[i] for i in range(n)]
    grad_w = [
        mpmath.fsum((v[i] * v[j] - inv[i][j]) * wm[j][k] for j in range(n)) * root[i]
        for i in range(n)
        for k in range(rank)
    ]
    grad_l = [d[i] * (v[i] ** 2 - inv[i][i]) / 2 for i in range(n)]
    return (log_p, half_maha, terms, cond, r_white, size, *grad_x, *grad_w, *grad_l)


@functools.cache
def _ref(x, mu, w, log_diag):
    return _converged(_lowrank_full, x, mu, w, log_diag)


def _cases():
    """(value, W, log_diag) in float64: factors of norm 1e-10, 1, 1e10; diagonal e^-30, 1,
    e^30 and mixed; points along the factor, orthogonal to it (unscaled), and both."""
    base1 = torch.tensor([[2.0], [1.0], [-1.0]], dtype=F64)
    base2 = torch.tensor([[2.0, 0.5], [1.0, -1.0], [-1.0, 0.25], [0.5, 3.0]], dtype=F64)
    out = []
    for base, orth in ((base1, [1.0, -1.0, 1.0]), (base2, None)):
        dim, rank = base.shape
        if orth is None:  # a vector orthogonal to both columns, from the complete QR
            q, _ = torch.linalg.qr(base, mode="complete")
            orth = q[:, rank].tolist()
        orth_t = torch.tensor(orth, dtype=F64)
        coef = torch.tensor([1.0, -2.0][:rank], dtype=F64)
        diags = [
            torch.full((dim,), -30.0, dtype=F64),
            torch.zeros(dim, dtype=F64),
            torch.full((dim,), 30.0, dtype=F64),
            torch.tensor([-30.0, 30.0, 0.0, -12.0][:dim], dtype=F64),
        ]
        for norm, log_diag in itertools.product((1e-10, 1.0, 1e10), diags):
            w = norm * base
            along = w @ coef
            points = (along, norm * orth_t, along + norm * orth_t, 1e-3 * along)
            for value in points:
                out.append((value, w, log_diag))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_lowrank_extreme_inputs_value_and_gradient_against_mpmath(dtype):
    """Issue 10 (the README's test command failed on an AMD EPYC: the float32 QR solution one
    ulp high, then ``r - W y`` cancelling at 6.5e6). Over log_diag -30 .. 30, factor norms
    1e-10 .. 1e10, points along and orthogonal to the factor, value and every gradient
    entry are within the module's bounds, which do not depend on the machine's rounding."""
    eps = torch.finfo(F64).eps  # the working precision for float32 and float64 inputs
    out_half_ulp = torch.finfo(dtype).eps / 2 if dtype == torch.float32 else 0.0
    tiny = torch.finfo(dtype).tiny
    got_v, exp_v, bnd_v, got_g, exp_g, bnd_g, labels, glabels = ([] for _ in range(8))
    for value, w, log_diag in _cases():
        dim = w.shape[0]
        x = value.to(dtype).clone().requires_grad_()
        wt = w.to(dtype).clone().requires_grad_()
        ld = log_diag.to(dtype).clone().requires_grad_()
        loc = torch.zeros(dim, dtype=dtype)
        out = lowrank_multivariate_normal_log_prob(x, loc, wt, ld)
        out.backward()
        ref = _ref(_key(x), _key(loc), _key(wt), _key(ld))
        log_p, half_maha, terms, cond, r_white, size = ref[:6]
        grads = np.array(ref[6:])
        label = f"|W|={w.norm():.0e} ld={log_diag.tolist()} x={value.tolist()}"
        labels.append(label)
        got_v.append(out.item())
        exp_v.append(log_p)
        bound = 4 * eps * (_scale(half_maha, terms, dim) + cond) + (4 * eps * r_white) ** 2
        bnd_v.append(bound + out_half_ulp * abs(log_p) + tiny)
        root = (0.5 * ld.detach().double()).exp()
        mine = torch.cat(
            [x.grad.double() * root, (wt.grad.double() * root[:, None]).flatten(), ld.grad.double()]
        ).numpy()
        got_g.extend(mine.tolist())
        exp_g.extend(grads.tolist())
        bnd_g.extend((2 * 8 * eps * size**2 + out_half_ulp * np.abs(grads) + tiny).tolist())
        glabels.extend(f"{label} entry {i}" for i in range(len(grads)))
    worst = assert_within(got_v, exp_v, bnd_v, labels, f"lowrank value {dtype}")
    worst_g = assert_within(got_g, exp_g, bnd_g, glabels, f"lowrank gradient {dtype}")
    print(f"{dtype}: worst value error / bound {worst:.3g}, gradient {worst_g:.3g}")


def test_lowrank_issue_example_float32():
    """The issue's example: 25.8473 (mpmath), was 25.0973 on an AMD EPYC; now within half an
    ulp of float32 plus the float64 bound (negligible here: 4 eps64 (scale + cond) ~ 3e-14)."""
    w = torch.tensor([[2.0], [1.0], [-1.0]])
    x, loc, ld = torch.tensor([2.0, 1.0, -1.0]), torch.zeros(3), torch.full((3,), -30.0)
    got = lowrank_multivariate_normal_log_prob(x, loc, w, ld).item()
    ref = _ref(_key(x), _key(loc), _key(w), _key(ld))
    assert abs(got - ref[0]) <= 2**-24 * abs(ref[0]) + 1e-12


# --------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(dtype):
    """0 events in, 0 values out (float32 for half inputs), empty gradients: dense and
    low-rank log densities and scale_tril_from_raw."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    x = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    loc = torch.zeros(3, dtype=dtype)
    raw = torch.zeros(0, 6, dtype=dtype, requires_grad=True)
    tril = scale_tril_from_raw(raw, 3)
    assert tril.shape == (0, 3, 3) and tril.dtype == compute
    out = multivariate_normal_log_prob(x, loc, tril)
    assert out.shape == (0,) and out.dtype == compute
    out.sum().backward()
    assert x.grad.shape == (0, 3) and raw.grad.shape == (0, 6)
    w = torch.ones(0, 3, 2, dtype=dtype, requires_grad=True)
    ld = torch.zeros(0, 3, dtype=dtype, requires_grad=True)
    out = lowrank_multivariate_normal_log_prob(torch.zeros(0, 3, dtype=dtype), loc, w, ld)
    assert out.shape == (0,) and out.dtype == compute
    out.sum().backward()
    assert w.grad.shape == (0, 3, 2) and ld.grad.shape == (0, 3)
    assert math.isnan(out.mean().item()) and out.sum().item() == 0


# --------------------------------------------------------------------------------------
# Huge and infinite inputs
# --------------------------------------------------------------------------------------

HUGE = sorted({s * m for m in (0.0, 1.0, 1e16, 1e20, 1e30, 3e38) for s in (1.0, -1.0)})
WITH_INF = [*HUGE, math.inf, -math.inf]


def _rows(dtype, *columns):
    rows = torch.tensor(list(itertools.product(*columns)), dtype=F64).to(dtype)
    same_inf = torch.isinf(rows[:, 0]) & (rows[:, 0] == rows[:, 1])  # inf - inf: undefined
    rows = rows[~same_inf & torch.isfinite(rows[:, 2:]).all(-1)]
    return [rows[:, i].clone().requires_grad_() for i in range(rows.shape[1])]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_huge_and_infinite_observations_give_no_nan(dtype, kind):
    """Issue 10: value x1 and mean mu1 in {0, +-1, +-1e16, +-1e20, +-1e30, +-3e38, +-inf}
    (not both the same infinity), an off-diagonal factor entry / factor row entry of those
    finite magnitudes: no NaN in value or gradient (was NaN where x1 - mu1 overflows or is
    infinite: 48 dense and 506 low-rank rows in float32); an infinite observation or mean
    gives -inf."""
    x1, m1, c = _rows(dtype, WITH_INF, WITH_INF, HUGE)
    zero, one = torch.zeros_like(x1), torch.ones_like(x1)
    value, loc = torch.stack([x1, zero], -1), torch.stack([m1, zero], -1)
    if kind == "dense":
        factor = torch.stack([torch.stack([one, zero], -1), torch.stack([c, one], -1)], -2)
        out = multivariate_normal_log_prob(value, loc, factor)
    else:
        w = torch.stack([c, one], -1)[..., None]
        out = lowrank_multivariate_normal_log_prob(value, loc, w, torch.zeros(2, dtype=dtype))
    out.sum().backward()
    assert not torch.isnan(out).any()
    for leaf in (x1, m1, c):
        assert not torch.isnan(leaf.grad).any()
    infinite = torch.isinf(x1.detach()) | torch.isinf(m1.detach())
    assert (out[infinite] == -math.inf).all()


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_overflowing_residual_against_mpmath(kind):
    """x - mu = 3e38 - (-3e38) overflows float32 while z does not (scale 1e20, z = 6e18, log p
    = -1.8e37): within 4 eps scale of mpmath (``x - mu`` halved exactly, the factor 2 applied
    after the solve)."""
    value, loc = torch.tensor([3e38, 1.0]), torch.tensor([-3e38, 0.0])
    if kind == "dense":
        factor = torch.tensor([[1e20, 0.0], [0.0, 1.0]])
        got = multivariate_normal_log_prob(value, loc, factor)
    else:
        factor = torch.tensor([[1e20], [0.0]])
        got = lowrank_multivariate_normal_log_prob(value, loc, factor, torch.zeros(2))
    with mpmath.workdps(40):
        r = mpmath.mpf(value[0].item()) - mpmath.mpf(loc[0].item())
        s2 = mpmath.mpf(factor[0, 0].item()) ** 2 + (0 if kind == "dense" else 1)
        exact = -(r * r / s2) / 2 - mpmath.log(s2) / 2 - 0.5 - mpmath.log(2 * mpmath.pi)
    eps = torch.finfo(torch.float32).eps
    assert math.isfinite(got.item())
    assert abs(got.item() - float(exact)) <= 4 * eps * abs(float(exact))


def test_dense_solve_overflowing_float32_gives_infinities_not_nan():
    """Found by the fuzz suite: z1 = 7.5e15 / 6.4e-28 = 1.2e43 overflows a float32 solve, and
    the next step's 0 * inf made value and gradients NaN. mpmath: log p = -6.8e85 and
    gradients (-1.8e70, -8.2e73) in value, all beyond float32: -inf and (-inf, -inf), the
    float64 solve rounded once to float32 (no NaN)."""
    value = torch.tensor([7529455627010048.0, 0.0], requires_grad=True)
    loc = torch.tensor([-9.6875, -0.045166015625])
    factor = torch.tensor([[6.437104986603456e-28, 0.0], [0.0, 2.350988701644575e-38]])
    out = multivariate_normal_log_prob(value, loc, factor)
    out.backward()
    assert out.item() == -math.inf
    assert value.grad.tolist() == [-math.inf, -math.inf]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_lowrank_vanishing_diagonal_with_zero_factor_row(dtype):
    """A coordinate of variance e^{-1e16} outside the factor's span (zero row of W): at its
    mean it contributes -log_diag/2 - log(2 pi)/2 = 5e15 - 0.92 exactly (independent
    coordinates), elsewhere the density is 0 (-inf); was NaN (0 * inf whitening)."""
    w = torch.tensor([[0.0], [1.0]], dtype=dtype)
    ld = torch.tensor([-1e16, 0.0], dtype=dtype)
    at_mean = lowrank_multivariate_normal_log_prob(
        torch.tensor([0.0, 0.5], dtype=dtype), torch.zeros(2, dtype=dtype), w, ld
    )
    other = 0.5 * 0.25 / 2 + 0.5 * math.log(2.0) + 0.5 * math.log(2 * math.pi)  # N(0.5; 0, 2)
    exact = 5e15 - 0.5 * math.log(2 * math.pi) - other
    assert abs(at_mean.item() - exact) <= 2 * torch.finfo(dtype).eps * 5e15
    away = lowrank_multivariate_normal_log_prob(
        torch.tensor([1e-30, 0.5], dtype=dtype), torch.zeros(2, dtype=dtype), w, ld
    )
    assert away.item() == -math.inf


def _vanishing_cases():
    """(value, W, log_diag) in float64 with diagonal entries whose ``e^{-l/2}`` overflows
    (``l = -2000, -1e10, -1e30``) next to nonzero factor rows, at most ``R`` of them (the
    covariance stays regular in the dtype), the others ``e^{-1}, 1, e^{3}``; points at the
    mean, along the factor, and off it."""
    out = []
    w1 = torch.tensor([[1.0], [2.0]], dtype=F64)
    w2 = torch.tensor([[2.0, 0.5], [1.0, -1.0], [-1.0, 0.25]], dtype=F64)
    for tiny_l, other in itertools.product((-2000.0, -1e10, -1e30), (-1.0, 0.0, 3.0)):
        for value in ([0.0, 0.0], [1.0, 2.0], [0.5, -0.25]):
            out.append(
                (torch.tensor(value, dtype=F64), w1, torch.tensor([tiny_l, other], dtype=F64))
            )
        lds = ([tiny_l, other, other], [tiny_l, tiny_l, other])
        for ld, value in itertools.product(lds, ([0.0, 0.0, 0.0], [2.5, 0.0, -0.75], [1.0, 1, 1])):
            out.append((torch.tensor(value, dtype=F64), w2, torch.tensor(ld, dtype=F64)))
    return out


def _plain_gradients(x, mu, w, log_diag):
    """(log p, d/dx, d/dW row by row, d/dl) in mpmath, not whitened: with v = Sigma^{-1} r,
    d/dx = -v, d/dW = (v v^T - Sigma^{-1}) W, d/dl_i = d_i (v_i^2 - Sigma^{-1}_ii) / 2."""
    n, rank = len(w), len(w[0])
    wm, d, _, r, v, inv, det = _lowrank_solved(x, mu, w, log_diag)
    maha = mpmath.fsum(r[i] * v[i] for i in range(n))
    log_p = -(maha + mpmath.log(det) + n * mpmath.log(2 * mpmath.pi)) / 2
    grad_w = [
        mpmath.fsum((v[i] * v[j] - inv[i][j]) * wm[j][k] for j in range(n))
        for i in range(n)
        for k in range(rank)
    ]
    grad_l = [d[i] * (v[i] ** 2 - inv[i][i]) / 2 for i in range(n)]
    return (log_p, *(-t for t in v), *grad_w, *grad_l)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_lowrank_vanishing_diagonal_under_a_factor_row_against_mpmath(dtype):
    """Issue 10: a diagonal entry e^l with e^{-l/2} beyond the dtype (l < -1419 in float64)
    under a nonzero factor row gave NaN in value and every gradient, although W W^T carries
    the coordinate: float64 lowrank_multivariate_normal_log_prob(0, 0, [[0], [1]], [0,
    -1e10]) is -log(2 pi) = -1.8379 (mpmath). Now each coordinate is scaled by its own size
    (module _lowrank_scaled). Reference: the module's mpmath oracle (the covariance formed
    at increasing precision). Bound: the scaled evaluation is backward stable in V, E^{1/2}
    and S^{-1} r (entries at most 1 and |S^{-1} r|), so the value errs by at most k eps
    kappa(M) (||y||^2 + sum |c_i| + sum |log C_ii| + D) and a gradient entry by k eps kappa(M)
    times the product of the sizes it is bilinear in, (1 + ||r||)^2 (1 + ||W||)^2 here, with
    k = 16 (Householder QR, one triangular solve, a sum: a few roundings per entry for D
    <= 3) and kappa(M) <= 100 for these cases; |l| enters only as the exact sum of c_i.
    Float32 inputs are computed in float64 and rounded once (half an ulp more)."""
    eps = torch.finfo(F64).eps
    out_half_ulp = torch.finfo(dtype).eps / 2 if dtype == torch.float32 else 0.0
    for value, w, log_diag in _vanishing_cases():
        x = value.to(dtype).clone().requires_grad_()
        wt = w.to(dtype).clone().requires_grad_()
        ld = log_diag.to(dtype).clone().requires_grad_()
        loc = torch.zeros_like(x)
        out = lowrank_multivariate_normal_log_prob(x, loc, wt, ld)
        out.backward()
        log_p, *grads = _converged(_plain_gradients, _key(x), _key(loc), _key(wt), _key(ld))
        label = f"W={w.tolist()} ld={log_diag.tolist()} x={value.tolist()}"
        r_norm, w_norm = float(value.norm()), float(w.norm())
        size = float(log_p) + 2 * sum(abs(v) for v in log_diag.tolist()) + 10.0
        bound = 16 * eps * 100 * (abs(size) + (1 + r_norm) ** 2) + out_half_ulp * abs(log_p)
        assert abs(out.item() - log_p) <= bound, f"{label}: {out.item()} vs {log_p}"
        got = torch.cat([x.grad.flatten(), wt.grad.flatten(), ld.grad.flatten()]).double()
        exact = np.array(grads, dtype=np.float64)
        g_bound = 16 * eps * 100 * (1 + r_norm) ** 2 * (1 + w_norm) ** 2
        g_bound = g_bound + out_half_ulp * np.abs(exact)
        assert np.all(np.abs(got.numpy() - exact) <= g_bound), (
            f"{label}: {got.tolist()} vs {exact.tolist()}"
        )


def test_lowrank_issue_examples_vanishing_diagonal():
    """The issue's rows (float64): Sigma = diag(1, e^{-1e10}) + [[0, 0], [0, 1]] at 0 gives
    -log(2 pi) (to 2 eps); a zero factor row with log_diag -1e10 and x_1 != mu_1 gives -inf
    with a gradient free of NaN (d/dlog_diag was NaN; 0 now, like an infinite input)."""
    z = torch.zeros(2, dtype=F64)
    ld = torch.tensor([0.0, -1e10], dtype=F64, requires_grad=True)
    out = lowrank_multivariate_normal_log_prob(z, z, torch.tensor([[0.0], [1.0]], dtype=F64), ld)
    assert abs(out.item() + math.log(2 * math.pi)) <= 2 * torch.finfo(F64).eps * 2
    out.backward()
    assert ld.grad.tolist() == [-0.5, 0.0]  # d_1 (v_1^2 - Sigma^{-1}_11) / 2 = -1/2; d_2 = 0
    ld = torch.tensor([-1e10, 0.0], dtype=F64, requires_grad=True)
    x = torch.tensor([1.0, 0.0], dtype=F64)
    out = lowrank_multivariate_normal_log_prob(x, z, torch.zeros(2, 1, dtype=F64), ld)
    out.backward()
    assert out.item() == -math.inf and not torch.isnan(ld.grad).any()


def test_lowrank_more_vanishing_coordinates_than_the_rank_give_the_limit():
    """Two coordinates of variance e^{-1e10} under one factor column: the covariance is
    singular to float64 and the density depends on those variances beyond its range. The
    documented result is the limit d -> 0: +inf exactly at the mean, -inf off it (mpmath:
    at the mean -log det / 2 - log 2 pi = +5e9 - ..., beyond every finite answer the dtype
    could justify; off the factor's line (x = (1, 0)) -1e4342944815); never NaN."""
    w = torch.tensor([[1.0], [2.0]], dtype=F64)
    ld = torch.full((2,), -1e10, dtype=F64, requires_grad=True)
    z = torch.zeros(2, dtype=F64)
    assert lowrank_multivariate_normal_log_prob(z, z, w, ld).item() == math.inf
    off = lowrank_multivariate_normal_log_prob(torch.tensor([1.0, 0.0], dtype=F64), z, w, ld)
    assert off.item() == -math.inf
    off.backward()
    assert not torch.isnan(ld.grad).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize(
    "value, w, log_diag",
    [
        ([3.0, -1.0], [[1.0], [0.5]], [-400.0, 0.0]),  # whitened factor e^{200} = 7e86
        ([65504.02, 1.0], [[-708.5], [0.0]], [-858.0, 0.0]),  # the fuzz row: 708.5 e^{429}
        ([-1.0, 2.0], [[3.0, 0.0], [1.0, 2.0]], [-400.0, -380.0]),
    ],
)
def test_lowrank_large_whitened_factor_gradients_against_mpmath(dtype, value, w, log_diag):
    """Issue 10 (fuzz): a whitened factor e^{-l/2} W beyond finfo.max^(1/4) (1e77 in float64)
    but finite gave a right value and NaN gradients: the QR's backward multiplies such
    entries pairwise with a third (e.g. W = -708.5 over l = -858: 1e189, d/dx NaN where the
    exact is -0.13). Such events are computed with each coordinate scaled by its own size
    (module _lowrank_scaled). Reference and bound as in
    test_lowrank_vanishing_diagonal_under_a_factor_row_against_mpmath (the same backward
    stable scaled evaluation; kappa(M) <= 100 for these cases)."""
    eps = torch.finfo(F64).eps
    out_half_ulp = torch.finfo(dtype).eps / 2 if dtype == torch.float32 else 0.0
    x = torch.tensor(value, dtype=dtype, requires_grad=True)
    wt = torch.tensor(w, dtype=dtype, requires_grad=True)
    ld = torch.tensor(log_diag, dtype=dtype, requires_grad=True)
    loc = torch.zeros_like(x)
    out = lowrank_multivariate_normal_log_prob(x, loc, wt, ld)
    out.backward()
    log_p, *grads = _converged(_plain_gradients, _key(x), _key(loc), _key(wt), _key(ld))
    r_norm, w_norm = float(x.detach().double().norm()), float(wt.detach().double().norm())
    size = float(log_p) + 2 * sum(abs(v) for v in log_diag) + 10.0
    bound = 16 * eps * 100 * (abs(size) + (1 + r_norm) ** 2) + out_half_ulp * abs(log_p)
    assert abs(out.item() - log_p) <= bound, (out.item(), log_p)
    got = torch.cat([x.grad.flatten(), wt.grad.flatten(), ld.grad.flatten()]).double()
    exact = np.array(grads, dtype=np.float64)
    g_bound = 16 * eps * 100 * (1 + r_norm) ** 2 * (1 + w_norm) ** 2
    g_bound = g_bound + out_half_ulp * np.abs(exact)
    assert np.all(np.abs(got.numpy() - exact) <= g_bound), (got.tolist(), exact.tolist())


def test_lowrank_quadratic_form_beyond_the_dtype_gives_no_nan():
    """A quadratic form beyond float64 in the scaled path (two vanishing variances under one
    factor column, a point off its line: the fuzz's float16 row 139) is -inf with gradients
    free of NaN: such events are solved again from a zero residual (their quadratic's
    gradient is beyond the range; d/dlog_diag keeps the log-determinant's)."""
    x = torch.tensor([0.0, 0.0], dtype=F64, requires_grad=True)
    mu = torch.tensor([0.34423828125, -0.0213775634765625], dtype=F64)
    w = torch.tensor([[0.037322998046875], [65504.0]], dtype=F64, requires_grad=True)
    ld = torch.tensor([-65504.0, -709.5], dtype=F64, requires_grad=True)
    out = lowrank_multivariate_normal_log_prob(x, mu, w, ld)
    out.backward()
    assert out.item() == -math.inf
    for g in (x.grad, w.grad, ld.grad):
        assert not torch.isnan(g).any(), g


def test_dense_solve_overflowing_float64_keeps_mixture_gradients():
    """Issue 10 (fuzz): a float64 factor with a subnormal diagonal entry makes L^{-1}(x - mu)
    overflow: the log density -inf is right, but the solve's backward formed 0 * inf = NaN in
    d/dvalue and d/dloc even with a zero incoming gradient, so a mixture with one such
    component had NaN gradients everywhere (134 of 2000 fuzz rows). Such events are solved
    again from a zero residual: in the mixture the component's responsibility e^{-inf} = 0
    makes 0 the exact gradient, and the others are those of the one-component density."""
    from probloss.functional import multivariate_normal_mixture_log_prob

    x = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    logits = torch.zeros(2, dtype=F64, requires_grad=True)
    loc = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    tril = torch.stack([torch.eye(2, dtype=F64), torch.eye(2, dtype=F64)])
    tril[1, 0, 0] = 5e-324
    tril.requires_grad_()
    out = multivariate_normal_mixture_log_prob(x, logits, loc, tril)
    out.backward()
    # component 0 alone (responsibility 1): N(0, I) at x, plus log w_0 = log(1/2)
    ref = -math.log(2 * math.pi) - 0.5 * 1.25 + math.log(0.5)
    assert abs(out.item() - ref) <= 4 * torch.finfo(F64).eps * 3
    assert x.grad.tolist() == [-0.5, 1.0]
    assert loc.grad.tolist() == [[0.5, -1.0], [0.0, 0.0]]
    assert logits.grad.tolist() == [0.5, -0.5]
    assert not torch.isnan(tril.grad).any()
    single = multivariate_normal_log_prob(x.detach(), loc[1].detach(), tril[1].detach())
    assert single.item() == -math.inf


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_dense_squared_norm_at_the_largest_float(dtype):
    """||z||^2 / 2 with an entry at finfo.max: the power of two that scales it was
    2^round(log2 max) = 2^1024 = inf in float64 (log2 rounds up to 1024), and z / inf * inf
    gave NaN for the value -inf (the fuzz: loc = 1.8e308). Now from frexp's exponent."""
    top = torch.finfo(dtype).max
    x = torch.tensor([0.0, top], dtype=dtype)
    out = multivariate_normal_log_prob(x, torch.zeros(2, dtype=dtype), torch.eye(2, dtype=dtype))
    try:  # -max^2 / 2 - log 2 pi, in the output dtype (float32 for half inputs)
        exact = -0.5 * top * top - math.log(2 * math.pi)
    except OverflowError:
        exact = -math.inf
    if abs(exact) > torch.finfo(out.dtype).max:
        assert out.item() == -math.inf
    else:  # a few roundings of the float32 computation
        assert abs(out.item() - exact) <= 4 * torch.finfo(out.dtype).eps * abs(exact)
