"""Loss modules: agreement with the functional core and with torch.nn.GaussianNLLLoss.

References: torch.nn.GaussianNLLLoss (float64) where its clamp is inactive (var >> eps);
scipy.stats.norm.logpdf for the full form. Bounds are stated per test.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from probloss.functional.bivariate import bivariate_normal_nll
from probloss.functional.normal import normal_nll
from probloss.nn import BivariateNormalNLLLoss, GaussianNLLLoss, NormalNLLLoss

REDUCTIONS = ("mean", "sum", "none")


def _data(shape, var_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    var = torch.rand(var_shape, generator=g, dtype=torch.float64) + 0.5
    return mu, y, var


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    ("shape", "var_shape"),
    [((4, 3), (4, 3)), ((4, 3), (4, 1)), ((4, 3), (4,)), ((2, 3, 5), (2, 3, 1))],
)
def test_gaussian_nll_matches_torch(shape, var_shape, reduction, full):
    """Where torch accepts the shapes, values agree within the documented soft-floor
    difference (ours uses var + eps, torch max(var, eps) = var here): per element
    0.5 (eps/var)(1 + r^2/var), since |log(1 + t)| <= t and r^2 (1/var - 1/(var + eps))
    <= r^2 eps / var^2, reduced like the loss, plus float64 rounding (1e-14 of the terms)."""
    mu, y, var = _data(shape, var_shape)
    ours = GaussianNLLLoss(full=full, reduction=reduction)(mu, y, var)
    theirs = torch.nn.GaussianNLLLoss(full=full, reduction=reduction)(mu, y, var)
    assert ours.shape == theirs.shape
    v = var if var.dim() != mu.dim() - 1 else var.unsqueeze(-1)
    r2 = (y - mu) ** 2 / v
    bound = 0.5 * (1e-6 / v) * (1 + r2) + 1e-14 * (v.log().abs() + r2 + 1)
    bound = {"none": bound, "sum": bound.sum(), "mean": bound.mean()}[reduction]
    assert ((ours - theirs).abs() <= bound).all()


def test_gaussian_nll_full_matches_scipy():
    """full=True, reduction='none', eps=0 is -log N(y; mu, var) (scipy, float64, 1e-14)."""
    mu, y, var = _data((6,), (6,))
    ours = GaussianNLLLoss(full=True, eps=0.0, reduction="none")(mu, y, var)
    expected = -scipy.stats.norm.logpdf(y.numpy(), mu.numpy(), var.sqrt().numpy())
    torch.testing.assert_close(ours, torch.from_numpy(expected), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("var_shape", "torch_accepts"),
    [
        ((2, 1, 4, 5), True),
        ((2, 3, 1, 1), False),
        ((1, 3, 1, 5), False),
        ((), False),
        ((3, 4, 5), False),
    ],
)
def test_gaussian_nll_broadcasts_var(var_shape, torch_accepts):
    """Any broadcastable var equals the explicitly expanded var (exactly); torch 2.13 only
    accepts one size-1 dimension or a missing trailing one, and raises on the others."""
    mu, y, var = _data((2, 3, 4, 5), var_shape)
    ours = GaussianNLLLoss(reduction="none")(mu, y, var)
    expanded = GaussianNLLLoss(reduction="none")(mu, y, var.expand(mu.shape).clone())
    assert torch.equal(ours, expanded)
    if torch_accepts:
        theirs = torch.nn.GaussianNLLLoss(reduction="none")(mu, y, var)
        torch.testing.assert_close(ours, theirs, rtol=4e-6, atol=4e-6)
    else:
        with pytest.raises(ValueError, match="incorrect size"):
            torch.nn.GaussianNLLLoss(reduction="none")(mu, y, var)


def test_gaussian_nll_soft_floor_gradient_is_exact():
    """Below eps our loss is that of var + eps, with its exact gradient
    d/dvar = 1/(2 v) - r^2/(2 v^2), v = var + eps (closed form, relative 1e-12). torch's
    clamp is straight-through: its value uses eps but its gradient is that of the clamped
    point, the same for every var < eps (here -4500), so the optimum under the floor is
    invisible to it."""
    eps = 1e-3
    mu = torch.tensor([0.0], dtype=torch.float64)
    y = torch.tensor([0.1], dtype=torch.float64)
    grads = []
    for v0 in (1e-5, 1e-4):
        var = torch.tensor([v0], dtype=torch.float64, requires_grad=True)
        GaussianNLLLoss(eps=eps)(mu, y, var).backward()
        v = v0 + eps
        assert var.grad.item() == pytest.approx(0.5 / v - 0.5 * 0.01 / v**2, rel=1e-12)
        var_t = torch.tensor([v0], dtype=torch.float64, requires_grad=True)
        torch.nn.GaussianNLLLoss(eps=eps)(mu, y, var_t).backward()
        grads.append(var_t.grad.item())
    assert grads[0] == grads[1] == pytest.approx(0.5 / eps - 0.5 * 0.01 / eps**2)


def test_gaussian_nll_negative_var_is_an_error_only_when_validating():
    mu, y, var = _data((3,), (3,))
    var[1] = -1.0
    with pytest.raises(ValueError, match=r"var of shape \(3,\) must be positive"):
        GaussianNLLLoss()(mu, y, var)
    GaussianNLLLoss(validate_args=False)(mu, y, var)  # no check, no error


def test_gaussian_nll_does_not_read_values_of_non_cpu_tensors():
    """Meta tensors have no values: any value check (a host sync on a GPU) would raise."""
    mu = torch.empty(4, 3, device="meta")
    out = GaussianNLLLoss()(mu, torch.empty(4, 3, device="meta"), torch.empty(4, 1, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


def test_gaussian_nll_keeps_torch_signature():
    """The drop-in keeps torch's options (full, eps, reduction) and forward(input, target,
    var), not the value-first order of the other losses."""
    import inspect

    ours = inspect.signature(GaussianNLLLoss)
    theirs = inspect.signature(torch.nn.GaussianNLLLoss)
    for name, p in theirs.parameters.items():
        assert ours.parameters[name].default == p.default, name
    assert list(inspect.signature(GaussianNLLLoss.forward).parameters)[1:] == [
        "input", "target", "var"
    ]  # fmt: skip


@pytest.mark.parametrize("form", ["log_scale", "log_var", "scale", "var"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normal_nll_loss_is_the_functional_call(form, reduction):
    """forward(target, loc, log_scale) with log_scale positional, the other forms by
    keyword: bitwise the functional call with the same arguments."""
    mu, y, var = _data((5, 2), (5, 2))
    param = {"log_scale": 0.5 * var.log(), "log_var": var.log(), "scale": var.sqrt(), "var": var}[
        form
    ]
    loss = NormalNLLLoss(beta=0.5, min_scale=1e-3, reduction=reduction)
    expected = normal_nll(y, mu, **{form: param}, beta=0.5, min_scale=1e-3, reduction=reduction)
    got = loss(y, mu, param) if form == "log_scale" else loss(y, mu, **{form: param})
    assert torch.equal(got, expected)
    assert f"reduction={reduction!r}" in repr(loss) and "beta=0.5" in repr(loss)


def test_normal_nll_loss_takes_exactly_one_form():
    mu, y, var = _data((3,), (3,))
    with pytest.raises(ValueError, match="log_scale"):
        NormalNLLLoss()(y, mu, var.log(), var=var)
    with pytest.raises(ValueError, match="log_scale"):
        NormalNLLLoss()(y, mu)


def test_normal_nll_loss_masks_nan_targets():
    mu, y, var = _data((4,), (4,))
    y[2] = math.nan
    loss = NormalNLLLoss(nan_policy="mask")(y, mu, 0.5 * var.log())
    keep = torch.tensor([True, True, False, True])
    expected = normal_nll(y[keep], mu[keep], 0.5 * var[keep].log())
    torch.testing.assert_close(loss, expected, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match="NaN"):
        NormalNLLLoss()(y, mu, 0.5 * var.log())


def test_normal_nll_loss_scale_form_option_is_gone():
    """The form is a keyword of forward now; the old option says so."""
    with pytest.raises(TypeError, match=r"scale_form was removed.*scale=, var= or log_var="):
        NormalNLLLoss(scale_form="var")
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        NormalNLLLoss(bogus=1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bivariate_nll_loss_is_the_functional_call(reduction):
    g = torch.Generator().manual_seed(1)
    loc, log_scale, y = (torch.randn(7, 2, generator=g) for _ in range(3))
    atanh_rho = torch.randn(7, generator=g)
    loss = BivariateNormalNLLLoss(reduction=reduction)
    expected = bivariate_normal_nll(y, loc, log_scale, atanh_rho, reduction=reduction)
    assert torch.equal(loss(y, loc, log_scale, atanh_rho), expected)
    rho = torch.tanh(atanh_rho)
    expected = bivariate_normal_nll(y, loc, log_scale, rho=rho, reduction=reduction)
    assert torch.equal(loss(y, loc, log_scale, rho=rho), expected)


# --------------------------------------------------------------------------------------
# Reduced losses refuse a parameter that enlarges the target's batch shape (issue 10)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("input_shape", "target_shape", "var_shape", "culprit"),
    [
        ((8,), (8, 1), (8,), "input"),  # torch averages an (8, 8) matrix here
        ((8, 1), (8,), (8, 1), "input"),
        ((8,), (8,), (8, 1), "var"),
        ((8, 3), (8, 3), (2, 8, 1), "var"),
    ],
)
def test_gaussian_nll_refuses_outer_product(input_shape, target_shape, var_shape, culprit,
                                            reduction):  # fmt: skip
    """A ValueError naming the argument and both shapes, never a silent (8, 8) mean."""
    mu, y, var = torch.zeros(input_shape), torch.ones(target_shape), torch.ones(var_shape)
    with pytest.raises(ValueError, match=rf"{culprit} of batch shape") as info:
        GaussianNLLLoss(reduction=reduction)(mu, y, var)
    assert str(tuple(var_shape if culprit == "var" else input_shape)) in str(info.value)
    # reduction="none" keeps torch's broadcasting
    full = torch.broadcast_shapes(input_shape, target_shape, var_shape)
    assert GaussianNLLLoss(reduction="none")(mu, y, var).shape == full


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("input_shape", "target_shape", "var_shape"),
    [
        ((8, 3), (8, 1), (8,)),  # torch's documented target with a size-1 dimension
        ((8, 3), (8, 1), (8, 1)),
        ((8, 3), (8, 3), (8,)),  # torch's var with one fewer dimension
        ((8, 3), (8, 3), (8, 1)),
    ],
)
def test_gaussian_nll_keeps_torch_broadcasts(input_shape, target_shape, var_shape, reduction):
    """The shapes torch.nn.GaussianNLLLoss accepts still work and agree with it within
    the soft-floor bound of test_gaussian_nll_matches_torch, at most
    0.5 (eps/var)(1 + r^2/var) <= 1e-6 (1 + 2 r^2) per element (var >= 0.5), with
    r^2 bounded by its maximum over the data, plus float64 rounding (1e-14 of terms
    below 100)."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(input_shape, generator=g, dtype=torch.float64)
    y = torch.randn(target_shape, generator=g, dtype=torch.float64)
    var = torch.rand(var_shape, generator=g, dtype=torch.float64) + 0.5
    ours = GaussianNLLLoss(reduction=reduction)(mu, y, var)
    theirs = torch.nn.GaussianNLLLoss(reduction=reduction)(mu, y, var)
    per_element = 1e-6 * (1 + 2 * ((mu - y) ** 2).max()) + 1e-14 * 100
    n = torch.broadcast_shapes(input_shape, target_shape)
    bound = per_element * (math.prod(n) if reduction == "sum" else 1)
    assert (ours - theirs).abs() <= bound


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_normal_nll_loss_refuses_outer_product(reduction):
    """loc of shape (8, 1) against targets (8,): through normal_nll's check (the module is
    one functional call)."""
    with pytest.raises(ValueError, match=r"loc of batch shape \(8, 1\)"):
        NormalNLLLoss(reduction=reduction)(torch.zeros(8), torch.zeros(8, 1), torch.zeros(8))
    with pytest.raises(ValueError, match=r"log_scale of batch shape \(8, 1\)"):
        NormalNLLLoss(reduction=reduction)(torch.zeros(8), torch.zeros(8), torch.zeros(8, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bivariate_nll_loss_refuses_outer_product(reduction):
    """The issue's example: atanh_rho = out[:, 4:5] of shape (64, 1) against targets
    (64, 2) would average a (64, 64) matrix."""
    out = torch.zeros(64, 5)
    with pytest.raises(ValueError, match=r"atanh_rho of batch shape \(64, 1\)"):
        BivariateNormalNLLLoss(reduction=reduction)(
            torch.zeros(64, 2), out[:, 0:2], out[:, 2:4], out[:, 4:5]
        )


@pytest.mark.parametrize(
    "make",
    [
        lambda r: (GaussianNLLLoss(reduction=r), (torch.zeros(0, 3),) * 2 + (torch.ones(0, 3),)),
        lambda r: (NormalNLLLoss(reduction=r), (torch.zeros(0),) * 3),
        lambda r: (
            BivariateNormalNLLLoss(reduction=r),
            (torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0)),
        ),
    ],
    ids=["gaussian", "normal", "bivariate"],
)
def test_empty_batch_reduces_like_torch(make):
    """An empty batch: "mean" is NaN (0 / 0, torch.nn.GaussianNLLLoss and torch.mean do the
    same), "sum" is 0, "none" is empty."""
    loss, args = make("mean")
    assert torch.isnan(loss(*args))
    assert torch.isnan(torch.nn.GaussianNLLLoss()(torch.zeros(0), torch.zeros(0), torch.ones(0)))
    loss, args = make("sum")
    assert loss(*args) == 0
    loss, args = make("none")
    assert loss(*args).numel() == 0
