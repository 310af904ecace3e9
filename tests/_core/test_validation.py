"""Tests of ``probloss._core.validation``: messages name the argument and its shape; value
checks run on CPU tensors by default, never while tracing, and never on empty tensors."""

from __future__ import annotations

import pytest
import torch

from probloss._core.validation import (
    check_in_interval,
    check_not_nan,
    check_renamed_keywords,
    distribution_validate_args,
    should_validate,
    validate_sample,
)
from probloss.distributions import (
    BivariateNormal,
    BivariateNormalMixture,
    ContinuousBernoulli,
    MultivariateNormalMixture,
    Normal,
    NormalMixture,
)


def test_should_validate_defaults_to_cpu_only():
    cpu = torch.zeros(2)
    meta = torch.zeros(2, device="meta")  # stands in for an accelerator tensor
    assert should_validate(None, cpu)
    assert not should_validate(None, cpu, meta)
    assert should_validate(True, meta)
    assert not should_validate(False, cpu)


def test_check_in_interval_messages():
    with pytest.raises(ValueError, match=r"value of shape \(3,\) must lie in \[0.0, 1.0\]"):
        check_in_interval(torch.tensor([0.5, 1.5, -0.1]), "value", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x of shape \(2,\) contains 1 NaN"):
        check_in_interval(torch.tensor([0.5, float("nan")]), "x", 0.0, 1.0)
    check_in_interval(torch.tensor([0.5, float("nan")]), "x", 0.0, 1.0, allow_nan=True)
    check_in_interval(torch.tensor([0.0, 1.0]), "x", 0.0, 1.0)
    with pytest.raises(ValueError, match="contains 2 NaN"):
        check_not_nan(torch.tensor([float("nan")] * 2), "y")


def test_check_renamed_keywords():
    check_renamed_keywords("f", {}, {"min_diag": "min_scale"})  # nothing unexpected
    with pytest.raises(TypeError, match=r"^f\(\): min_diag was renamed min_scale$"):
        check_renamed_keywords("f", {"min_diag": 1.0}, {"min_diag": "min_scale"})
    with pytest.raises(TypeError, match=r"^f\(\) got an unexpected keyword argument 'bogus'$"):
        check_renamed_keywords("f", {"bogus": 1.0}, {"min_diag": "min_scale"})


def _meta(*shape):
    return torch.zeros(shape, device="meta")


@pytest.mark.parametrize(
    "build",
    [
        lambda: Normal(_meta(3), _meta(3)),
        lambda: BivariateNormal(_meta(3, 2), _meta(3, 2), _meta(3)),
        lambda: ContinuousBernoulli(logits=_meta(3)),
        lambda: NormalMixture(_meta(3, 4), _meta(3, 4, 2), _meta(3, 4, 2)),
        lambda: BivariateNormalMixture(_meta(3, 4), _meta(3, 4, 2), _meta(3, 4, 2), _meta(3, 4)),
        lambda: MultivariateNormalMixture(_meta(3, 4), _meta(3, 4, 2), _meta(3, 4, 2, 2)),
    ],
    ids=[
        "Normal",
        "BivariateNormal",
        "ContinuousBernoulli",
        "NormalMixture",
        "BivariateNormalMixture",
        "MultivariateNormalMixture",
    ],
)
def test_distributions_do_not_read_non_cpu_values_by_default(build):
    """Meta tensors have no values: torch's default validation would read them (a host sync
    on a GPU) and raise; ours validates CPU tensors only unless asked."""
    d = build()
    assert d.batch_shape == (3,)
    if not isinstance(d, ContinuousBernoulli):  # its kernels pass a CPU scalar tensor
        assert d.log_prob(torch.zeros(3, *d.event_shape, device="meta")).shape == (3,)


def test_distributions_validate_cpu_values_and_keep_torch_switch():
    with pytest.raises(ValueError):
        Normal(torch.tensor([float("nan")]), log_scale=torch.zeros(1))
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        Normal(torch.tensor([float("nan")]), log_scale=torch.zeros(1))  # global switch respected
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def test_distribution_validation_skips_empty_tensors():
    """An empty parameter has no value to check (and torch's independent constraint cannot
    reshape 0 elements): validation is off for it whatever the choice, on for the rest."""
    empty, full = torch.zeros(0, 2), torch.zeros(3, 2)
    assert not distribution_validate_args(True, empty)
    assert not distribution_validate_args(None, full, empty)
    assert distribution_validate_args(True, full)
    d = BivariateNormal(full, full, torch.zeros(3), validate_args=True)
    validate_sample(d, torch.zeros(0, 3, 2))  # nothing to check, no error
    with pytest.raises(ValueError, match="value"):
        validate_sample(d, torch.zeros(3, 3))  # a non-empty value is still checked


def test_no_value_checks_while_compiling():
    """Under torch.compile the default (validate_args=None) checks nothing, even for CPU
    tensors: a host read cannot be traced (fullgraph=True raises on one). Constructing
    each distribution and a mixture head's output (taking the mode, which involves no
    special function) compiles to one graph."""
    seen = []

    def f(x):
        seen.append(should_validate(None, x))
        d = BivariateNormalMixture(
            x, x.unsqueeze(-1).expand(3, 4, 2), x.unsqueeze(-1).expand(3, 4, 2), x
        )
        e = MultivariateNormalMixture(
            x, x.unsqueeze(-1).expand(3, 4, 2), torch.eye(2).expand(3, 4, 2, 2)
        )
        return d.mode, d.logits, e.mode, e.scale_tril

    # torch's dynamo turns torch.distributions' global validation off on first use; the
    # other tests rely on torch's default, so it is restored afterwards
    previous = torch.distributions.Distribution._validate_args
    try:
        _compile_heads_and_mixtures(f, seen)
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def _compile_heads_and_mixtures(f, seen):
    from probloss.nn import MixtureDensityHead

    out = torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(3, 4))
    assert seen == [False] and all(
        torch.equal(a, b) for a, b in zip(out, f(torch.zeros(3, 4)), strict=True)
    )
    for component in ("normal", "bivariate", "full"):
        head = MixtureDensityHead(6, 2, 4, component=component)
        g = lambda x, head=head: (head(x).mode, head(x).logits)  # noqa: E731
        compiled = torch.compile(g, backend="eager", fullgraph=True)(torch.ones(5, 6))
        assert all(torch.equal(a, b) for a, b in zip(compiled, g(torch.ones(5, 6)), strict=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda loc: Normal(loc, torch.ones(3)),
        lambda loc: NormalMixture(
            torch.zeros(3, 2), loc[:, None, None].expand(3, 2, 1), torch.zeros(3, 2, 1)
        ),
    ],
    ids=["Normal", "NormalMixture"],
)
def test_parameter_check_matches_torch(make):
    """``set_validation``'s fast path (a NaN-free sum) changes nothing but speed: a NaN
    parameter raises torch's ValueError, infinities (valid for ``real``) pass, also where
    ``inf`` and ``-inf`` make the sum NaN (torch's check then decides), and with torch's
    switch off nothing is checked."""
    nan = torch.tensor([0.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"parameter loc .* to satisfy the constraint"):
        make(nan)
    make(torch.tensor([0.0, float("inf"), 1.0]))
    make(torch.tensor([float("-inf"), float("inf"), 1.0]))
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        make(nan)
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)
