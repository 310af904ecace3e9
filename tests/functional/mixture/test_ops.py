"""The mixture kernels as operators: opcheck, ``torch.func`` and ``torch.compile``.

The fused kernels run only where their inputs are host-readable (eager, CPU, no transform);
under ``vmap`` / ``grad`` / compile the plain path runs. ``mixture_log_prob`` from
``probs`` and the second moments run their kernels everywhere.

Tolerance of transformed-vs-eager comparisons: the same formulas on the same float64
numbers, differing only in the order of sums and inductor's fused elementwise code: a few
ulps per operation times a modest condition number, well inside ``rtol = 1e-9``
(4.5e6 ulps), as in ``tests/test_transforms.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from probloss.functional import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_log_prob,
    mixture_log_prob,
    normal_mixture_log_prob,
    normal_mixture_variance,
)
from probloss.functional.mixture import _second_moments as sm
from probloss.functional.mixture.bivariate import (
    _bivariate_mixture_fused,
    _bivariate_mixture_fused_backward,
)
from probloss.functional.mixture.diagonal import (
    _normal_mixture_fused,
    _normal_mixture_fused_backward,
)
from probloss.functional.mixture.general import _probs_mixture_value

RTOL, ATOL = 1e-9, 1e-300
N, K = 4, 3
F64 = torch.float64


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _diagonal_inputs():
    value, logits = _randn(N, 2, seed=0), _randn(N, K, seed=1)
    return value, logits, _randn(N, K, 2, seed=2), _randn(N, K, 2, seed=3)


def _bivariate_inputs():
    return (*_diagonal_inputs(), _randn(N, K, seed=4))


def test_fused_operators_pass_opcheck():
    diag = _diagonal_inputs()
    lse, z, resp, weights = _normal_mixture_fused(*diag)
    torch.library.opcheck(_normal_mixture_fused.op, diag)
    for needed in ((True, True, True, True), (False, True, False, False)):
        args = (torch.ones(N, dtype=F64), *diag, z, resp, weights, lse, *needed)
        torch.library.opcheck(_normal_mixture_fused_backward.op, args)
    biv = _bivariate_inputs()
    _, z, resp, weights, lse = _bivariate_mixture_fused(*biv)
    torch.library.opcheck(_bivariate_mixture_fused.op, biv)
    for needed in ((True, True, True, True, True), (False, True, False, False, False)):
        args = (torch.ones(N, dtype=F64), *biv, z, resp, weights, lse, *needed)
        torch.library.opcheck(_bivariate_mixture_fused_backward.op, args)


def test_moment_and_probs_operators_pass_opcheck():
    _, logits, loc, log_scale, atanh_rho = _bivariate_inputs()
    torch.library.opcheck(sm._diagonal_moments.op, (logits, loc, log_scale))
    torch.library.opcheck(sm._bivariate_moments.op, (logits, loc, log_scale, atanh_rho))
    probs = torch.tensor([0.5, 0.0, 0.5], dtype=F64).expand(N, K)
    torch.library.opcheck(_probs_mixture_value.op, (_randn(N, K, seed=5), probs))


def _probs_fn(lp, probs):
    return mixture_log_prob(lp, probs=probs, validate_args=False)


def _moments_fn(logits, loc, log_scale, atanh_rho):
    var = normal_mixture_variance(logits, loc, log_scale).sum(-1)
    cov = bivariate_normal_mixture_covariance(logits, loc, log_scale, atanh_rho)
    return var + cov.sum((-2, -1))


def _densities_fn(value, logits, loc, log_scale, atanh_rho):
    diag = normal_mixture_log_prob(value, logits, loc, log_scale)
    return diag + bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)


def _cases(densities: bool = False):
    """The densities' plain path (taken under transforms) runs the component kernels of
    ``normal_log_prob`` / ``bivariate_normal_log_prob``: under ``vmap`` they are tested
    by ``tests/test_transforms.py``; here under compile only."""
    probs = torch.tensor([[0.5, 0.0, 0.5]], dtype=F64).expand(N, K).clone()
    cases = [
        pytest.param(_probs_fn, (_randn(N, K, seed=5), probs), id="probs"),
        pytest.param(_moments_fn, _bivariate_inputs()[1:], id="moments"),
    ]
    if densities:
        cases.append(pytest.param(_densities_fn, _bivariate_inputs(), id="densities"))
    return cases


def _eager(fn, inputs):
    xs = [t.clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    return out.detach(), torch.autograd.grad(out.sum(), xs)


@pytest.mark.parametrize(("fn", "inputs"), _cases())
def test_vmap_and_per_row_grad_match_eager(fn, inputs):
    out, grads = _eager(fn, inputs)

    def row(*xs):
        return fn(*(x.unsqueeze(0) for x in xs)).squeeze(0)

    torch.testing.assert_close(vmap(row)(*inputs), out, rtol=RTOL, atol=ATOL)
    argnums = tuple(range(len(inputs)))
    per_row = vmap(grad(lambda *xs: row(*xs).sum(), argnums=argnums))(*inputs)
    for got, want in zip(per_row, grads, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("fn", "inputs"), _cases(densities=True))
def test_compiles_fullgraph_and_matches_eager(fn, inputs):
    torch._dynamo.reset()
    out, grads = _eager(fn, inputs)
    xs = [t.clone().requires_grad_() for t in inputs]
    got = torch.compile(fn, fullgraph=True, dynamic=False)(*xs)
    torch.testing.assert_close(got.detach(), out, rtol=RTOL, atol=ATOL)
    for g, want in zip(torch.autograd.grad(got.sum(), xs), grads, strict=True):
        torch.testing.assert_close(g, want, rtol=RTOL, atol=ATOL)


def test_fused_kernels_run_in_eager_only():
    value, logits, loc, log_scale, atanh_rho = (t.requires_grad_() for t in _bivariate_inputs())
    diag = normal_mixture_log_prob(value, logits, loc, log_scale)
    biv = bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)
    assert type(diag.grad_fn).__name__ == "_NormalMixtureBackward"
    assert type(biv.grad_fn).__name__ == "_BivariateMixtureBackward"
