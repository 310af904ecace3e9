"""Tests of the mixture input checks (``probloss.functional.mixture._inputs``): shape and
option errors naming the argument, empty batches.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import pytest
import torch

from probloss.functional.mixture import (
    bivariate_normal_mixture_log_prob,
    bivariate_normal_mixture_nll,
    mixture_log_prob,
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_nll,
)

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
