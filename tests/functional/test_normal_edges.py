"""Edge cases of ``probloss.functional.normal`` (issue 10): beta-NLL at extreme scales, reduced
losses that refuse to broadcast the value, empty batches, and huge / infinite inputs.
Gradients where an intermediate overflows or underflows are in
``test_normal_gradient_edges.py``.

Where the numbers come from
---------------------------
mpmath at 50 significant digits, evaluated at the inputs *after* the cast to the dtype under
test (``x - mu`` formed exactly): the beta-NLL
``w (z^2/2 + log sigma + log(2 pi)/2)`` with ``w = e^{2 beta log sigma}`` detached, and its
derivatives ``d/dloc = -w (x - mu) / sigma^2`` and ``d/dlog_scale = w (1 - z^2)``.

Bounds
------
The loss is computed as ``y^2/2 + w (log sigma + c)`` with ``y = mul_exp(r, t)`` and
``t = -(1 - beta) log sigma``: ``r`` and ``t`` are rounded once (``t`` carries an absolute
error ``eps |log sigma|``, a relative error of ``y`` of the same size), ``mul_exp`` within
7 roundings (four quarter steps and ``exp``), ``w = exp(2 beta log sigma)`` within
``(2 |log sigma| + 2) eps`` and the sum of terms of either sign within one more rounding:
``|err| <= (2 |log sigma| + 16) eps M`` with ``M = w (z^2/2 + |log sigma| + c)``. We allow twice
that (libm's ``exp`` is within 2 ulp on every platform we know of, not 1). The gradients
obey the same bound relative to ``|d/dloc|`` itself and to ``w (1 + z^2)`` for
``d/dlog_scale``. Half-precision inputs are computed in float32 (float32 ``eps``); their
gradients are returned in the input dtype, one more rounding (``eps_half / 2`` of the
gradient, or up to ``finfo(half).tiny`` below the normal range; ``inf`` where it exceeds
``finfo(half).max``). Where the exact value exceeds
``finfo.max`` of the output dtype, the result must be that infinity (not NaN).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from mpmath import mp, mpf

from probloss.functional import (
    laplace_log_prob,
    normal_log_prob,
    normal_nll,
    student_t_log_prob,
)
from tests.functional._checks import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    as_float,
    assert_within,
    dtype_id,
)

LOG_SCALES = [-104.0, -88.0, -50.0, -20.0, 0.0, 20.0, 50.0, 88.0]
POINTS = [(-0.7686, 0.6543), (0.6543, 0.6543), (300.0, -2.0), (-6.0e4, 1.0), (1.0e-5, 0.0)]
BETAS = [0.25, 0.5, 1.0]


def _exact(x: float, mu: float, ls: float, beta: float) -> tuple[mpf, ...]:
    """(loss, d/dloc, d/dlog_scale, w, z^2, c) of the detached-weight beta-NLL, 50 digits."""
    with mp.workdps(50):
        r = mpf(x) - mpf(mu)
        sigma = mp.exp(mpf(ls))
        w = mp.exp(2 * beta * mpf(ls))
        z = r / sigma
        c = mp.log(2 * mp.pi) / 2
        return w * (z * z / 2 + ls + c), -w * r / sigma**2, w * (1 - z * z), w, z * z, c


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("beta", BETAS)
def test_beta_nll_extreme_scales_against_mpmath(dtype, beta):
    """Issue 10: beta-NLL at log_scale = -50 was inf (exact 5.2e21 at beta = 0.5) and NaN at
    -104; now value and both gradients match mpmath within the stated bound, and are the
    infinity of the right sign exactly where the true value overflows the dtype."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    eps = torch.finfo(compute).eps
    half_eps = torch.finfo(dtype).eps / 2 if dtype in HALF_DTYPES else 0.0
    tiny = torch.finfo(compute).tiny
    rows = [(x, mu, ls) for x, mu in POINTS for ls in LOG_SCALES]
    x = torch.tensor([r[0] for r in rows], dtype=dtype)
    mu = torch.tensor([r[1] for r in rows], dtype=dtype, requires_grad=True)
    ls = torch.tensor([r[2] for r in rows], dtype=dtype, requires_grad=True)
    loss = normal_nll(x, mu, log_scale=ls, beta=beta, reduction="none")
    assert loss.dtype == compute
    loss.sum().backward()
    got = {"value": loss.detach(), "d/dloc": mu.grad, "d/dlog_scale": ls.grad}
    expected = {k: [] for k in got}
    bounds = {k: [] for k in got}
    keep = {k: [] for k in got}
    labels = []
    for xi, mi, li in zip(x.tolist(), mu.tolist(), ls.tolist(), strict=True):
        value, d_loc, d_ls, w, z2, c = _exact(xi, mi, li, beta)
        k = 2 * (2 * abs(li) + 16) * eps
        scale = {
            "value": w * (z2 / 2 + abs(li) + c),
            "d/dloc": abs(d_loc),
            "d/dlog_scale": w * (1 + z2),
        }
        labels.append(f"x={xi:g} mu={mi:g} ls={li:g}")
        for name, exact in (("value", value), ("d/dloc", d_loc), ("d/dlog_scale", d_ls)):
            out_dtype = compute if name == "value" else dtype
            ref = as_float(exact, out_dtype)
            keep[name].append(ref is not None)
            expected[name].append(math.nan if ref is None else ref)
            # the half rounding of a gradient: eps/2 relative, or up to tiny(half) below it
            extra = half_eps * abs(float(exact)) + torch.finfo(dtype).tiny if name != "value" else 0
            bounds[name].append(float(k * scale[name]) + extra + tiny)
    for name in got:
        idx = [i for i, k in enumerate(keep[name]) if k]
        assert_within(
            got[name][idx].double().numpy(),
            [expected[name][i] for i in idx],
            [bounds[name][i] for i in idx],
            [labels[i] for i in idx],
            f"{dtype_id(dtype)} beta={beta} {name}",
        )


def test_beta_nll_issue_reproduction():
    """The issue's numbers: 5.2486e21 at log_scale = -50 (mpmath), +inf (not NaN) at -104 in
    float32 where the exact 1.49e45 overflows; gradients finite at -50."""
    x, mu = torch.tensor([-0.7686]), torch.tensor([0.6543], requires_grad=True)
    ls = torch.tensor([-50.0], requires_grad=True)
    out = normal_nll(x, mu, log_scale=ls, beta=0.5, reduction="none")
    value = _exact(x.item(), mu.item(), -50.0, 0.5)[0]
    assert abs(out.item() - float(value)) <= 2 * (2 * 50 + 16) * 2**-23 * float(value)
    out.sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(ls.grad).all()
    out = normal_nll(x, mu.detach(), log_scale=torch.tensor([-104.0]), beta=0.5, reduction="none")
    assert out.item() == math.inf


# --------------------------------------------------------------------------------------
# Reduced losses refuse a parameter that enlarges the value's batch shape
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["scale", "log_scale", "var", "log_var"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_nll_refuses_a_parameter_that_broadcasts_the_value(form, reduction):
    """Issue 10: normal_nll(value (8,), loc (8, 1)) averaged an (8, 8) matrix; now a ValueError
    naming the argument and both shapes. The scale forms and min_scale are checked too; a
    parameter broadcasting *up to* the value's shape stays allowed, 'none' broadcasts."""
    value = torch.randn(8)
    ones = torch.ones(8)
    with pytest.raises(ValueError, match=r"loc of batch shape \(8, 1\).*\(8,\).*\(8, 8\)"):
        normal_nll(value, torch.zeros(8, 1), reduction=reduction, **{form: ones})
    with pytest.raises(ValueError, match=rf"{form} of batch shape \(8, 1\).*\(8,\)"):
        normal_nll(value, torch.zeros(8), reduction=reduction, **{form: torch.ones(8, 1)})
    with pytest.raises(ValueError, match=r"min_scale of batch shape \(8, 1\)"):
        normal_nll(
            value, torch.zeros(8), reduction=reduction, min_scale=torch.ones(8, 1), **{form: ones}
        )
    # allowed: a shared parameter of shape () or (1,), and unreduced broadcasting
    normal_nll(value, torch.zeros(1), reduction=reduction, **{form: torch.ones(())})
    assert normal_nll(value, torch.zeros(8, 1), reduction="none", **{form: ones}).shape == (8, 8)


# --------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_empty_batch(dtype):
    """0 events in, 0 values out (float32 for half inputs); like torch, the 'sum' of an empty
    batch is 0 and its 'mean' NaN; backward runs and gives empty gradients."""
    compute = torch.float32 if dtype in HALF_DTYPES else dtype
    x = torch.zeros(0, dtype=dtype)
    mu = torch.zeros(0, dtype=dtype, requires_grad=True)
    ls = torch.zeros(0, dtype=dtype, requires_grad=True)
    for out in (
        normal_log_prob(x, mu, log_scale=ls),
        normal_nll(x, mu, log_scale=ls, reduction="none"),
        normal_nll(x, mu, log_scale=ls, beta=0.5, min_scale=0.1, reduction="none"),
        laplace_log_prob(x, mu, ls),
        student_t_log_prob(x, torch.ones(0, dtype=dtype), mu, ls),
    ):
        assert out.shape == (0,) and out.dtype == compute
        out.sum().backward()
        assert mu.grad.shape == (0,) and ls.grad.shape == (0,)
    for kwargs in ({}, {"beta": 0.5}, {"nan_policy": "mask"}):
        total = normal_nll(x, mu, log_scale=ls, reduction="sum", **kwargs)
        mean = normal_nll(x, mu, log_scale=ls, reduction="mean", **kwargs)
        assert total.item() == 0.0 and math.isnan(mean.item())


# --------------------------------------------------------------------------------------
# Huge inputs: magnitudes 1e16 .. 3e38 of either sign, and 0
# --------------------------------------------------------------------------------------

HUGE = sorted({s * m for m in (0.0, 1.0, 1e16, 1e20, 1e30, 3e38) for s in (1.0, -1.0)})


def _grid(dtype, *columns):
    """Every combination of the columns, cast to ``dtype``, rows with a non-finite cast
    (3e38 in float16) dropped; one leaf tensor per column."""
    rows = torch.tensor(list(itertools.product(*columns)), dtype=torch.float64).to(dtype)
    rows = rows[torch.isfinite(rows).all(-1)]
    return [rows[:, i].clone().requires_grad_() for i in range(rows.shape[1])]


POSITIVE = [m for m in HUGE if m > 0]
CASES = {
    "normal_log_prob log_scale": (lambda x, m, s: normal_log_prob(x, m, log_scale=s), HUGE),
    "normal_log_prob log_var": (lambda x, m, s: normal_log_prob(x, m, log_var=s), HUGE),
    "normal_log_prob scale": (lambda x, m, s: normal_log_prob(x, m, scale=s), POSITIVE),
    "normal_nll beta": (
        lambda x, m, s: normal_nll(x, m, log_scale=s, beta=0.5, reduction="none"),
        HUGE,
    ),
    "normal_nll beta scale": (
        lambda x, m, s: normal_nll(x, m, scale=s, beta=1.0, reduction="none"),
        POSITIVE,
    ),
    "normal_nll min_scale": (
        lambda x, m, s: normal_nll(x, m, log_scale=s, min_scale=1e-3, reduction="none"),
        HUGE,
    ),
    "laplace": (lambda x, m, s: laplace_log_prob(x, m, s), HUGE),
    "student_t": (lambda x, m, s: student_t_log_prob(x, 3.0, m, s), HUGE),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("name", list(CASES))
def test_huge_inputs_give_no_nan(dtype, name):
    """Issue 10: NaN instead of +-inf or a finite value at inputs from about 1e16 to 3e38.
    Every combination of value, loc and log-scale in {0, +-1, +-1e16, +-1e20, +-1e30,
    +-3e38}: value and every gradient free of NaN (the values are checked against mpmath
    in test_huge_residual_values_against_mpmath)."""
    fn, scales = CASES[name]
    leaves = _grid(dtype, HUGE, HUGE, scales)
    out = fn(*leaves)
    out.sum().backward()
    assert not torch.isnan(out).any()
    for leaf in leaves:
        assert not torch.isnan(leaf.grad).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_huge_residual_values_against_mpmath(dtype):
    """value - loc overflows (3e38 - (-3e38) in float32) while z = (x - mu)/sigma does not:
    normal, Laplace, Student-t (df 3) and the beta-NLL are finite and within 8 eps of
    mpmath relative to the size of their terms (a few roundings: the halves r/2 are exact,
    the factor 2 is applied last; ``log_scale`` rounded by eps |log_scale| in the exponent)."""
    eps = torch.finfo(dtype).eps
    big = torch.finfo(dtype).max / 1.2
    x, mu = torch.tensor([big, -big], dtype=dtype), torch.tensor([-big, big], dtype=dtype)
    # z = 2 big e^{-ls} with z^2/2 finite: 1e17 and 5e12 (float32), 1e152 and 6e132 (float64)
    ls = torch.tensor([50.0, 60.0] if dtype == torch.float32 else [360.0, 400.0], dtype=dtype)
    with mp.workdps(50):
        r = [mpf(a) - mpf(b) for a, b in zip(x.tolist(), mu.tolist(), strict=True)]
        z = [ri / mp.exp(mpf(li)) for ri, li in zip(r, ls.tolist(), strict=True)]
        c = mp.log(2 * mp.pi) / 2
        refs = {
            "normal": [-(zi**2) / 2 - li - c for zi, li in zip(z, ls.tolist(), strict=True)],
            "laplace": [-abs(zi) - li - mp.log(2) for zi, li in zip(z, ls.tolist(), strict=True)],
            "student": [
                mp.loggamma(2)
                - mp.loggamma(1.5)
                - mp.log(3 * mp.pi) / 2
                - li
                - 2 * mp.log1p(zi**2 / 3)
                for zi, li in zip(z, ls.tolist(), strict=True)
            ],
        }
        sizes = [
            zi**2 / 2 + abs(li) + 2 * mp.log1p(zi**2 / 3) + 3
            for zi, li in zip(z, ls.tolist(), strict=True)
        ]
    got = {
        "normal": normal_log_prob(x, mu, log_scale=ls),
        "laplace": laplace_log_prob(x, mu, ls),
        "student": student_t_log_prob(x, 3.0, mu, ls),
    }
    for name, values in got.items():
        for g, e, size, li in zip(values.tolist(), refs[name], sizes, ls.tolist(), strict=True):
            assert math.isfinite(g), name
            assert abs(g - float(e)) <= 8 * (1 + 2 * abs(li)) * eps * float(size), (name, g, e)


def test_beta_one_gives_the_gradient_of_the_squared_error():
    """The docstring's claim: beta = 1 makes the loc-gradient that of the squared error
    (x - mu)^2 / 2 whatever the predicted scale: w z / sigma = sigma^2 (x - mu) / sigma^2.
    Reference: -(x - mu) / N in float64; bound 4 eps of it (r, the product with the incoming
    gradient 1/N, and e^0 = 1: a few roundings)."""
    gen = torch.Generator().manual_seed(3)
    x = 3 * torch.randn(50, generator=gen, dtype=torch.float64)
    mu = torch.randn(50, generator=gen, dtype=torch.float64, requires_grad=True)
    ls = 4 * torch.randn(50, generator=gen, dtype=torch.float64)
    normal_nll(x, mu, log_scale=ls, beta=1.0).backward()
    expected = -(x - mu.detach()) / 50
    eps = torch.finfo(torch.float64).eps
    assert ((mu.grad - expected).abs() <= 4 * eps * expected.abs()).all()


def test_beta_nll_gradient_where_the_weight_overflows():
    """Found by the fuzz suite (float32, beta = 0.5): log_scale = 88.72283935546875 (just
    above log(finfo.max)) makes w = e^{2 beta log sigma} = inf, while w (1 - z^2) = 2.65e36
    (mpmath; residual 3.3895e38 + 1.4994e15): d/dlog_scale was inf. Now formed as
    e^{2 beta log sigma} (1 - |z|)(1 + |z|) in one exponent; bound as in
    test_beta_nll_extreme_scales_against_mpmath relative to w (1 + z^2)."""
    eps = torch.finfo(torch.float32).eps
    x, mu = torch.tensor(3.3895313892515355e38), torch.tensor(-1499420327673856.0)
    ls = torch.tensor(88.72283935546875, requires_grad=True)
    normal_nll(x, mu, log_scale=ls, beta=0.5, reduction="sum").backward()
    _, _, d_ls, w, z2, _ = _exact(x.item(), mu.item(), ls.item(), 0.5)
    bound = 2 * (2 * ls.item() + 16) * eps * float(w * (1 + z2))
    assert abs(ls.grad.item() - float(d_ls)) <= bound
