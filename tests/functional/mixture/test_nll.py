"""Tests of the mixture NLLs: reductions over events, NaN masking, refused broadcasting,
the dtype policy.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import math

import pytest
import torch

from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_nll,
    normal_mixture_log_prob,
    normal_mixture_nll,
)
from tests.functional._checks import FLOAT_DTYPES, assert_within, dtype_id
from tests.functional.mixture._density_oracles import (
    REF_EPS,
    _bivariate_reference,
    _compute,
    _eps,
    _normal_reference,
    bivariate_inputs,
    normal_inputs,
)


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
