"""``validate_args`` means the same checks in every log density and loss of the functional
core and the VAE likelihoods: with ``True`` a NaN in the value and a constrained parameter
out of range raise a ValueError naming the argument; with ``False`` nothing is read on the
host and the bad entry just propagates (NaN, or a non-finite result).

One record per family: how to call it with a NaN value and with a bad constrained
parameter. No numerical reference is needed: the checks are exact predicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from probloss import functional as F
from probloss import vae

NAN = math.nan


@dataclass(frozen=True)
class Record:
    name: str
    call: Callable[..., torch.Tensor]  # call(bad_value: bool, bad_param: bool, validate_args)
    value_name: str  # how the error names the data
    param_name: str | None  # the constrained parameter checked, if the family has one
    param_match: str = "must be positive"


def _v(bad: bool, shape=(3,), good=0.5) -> torch.Tensor:
    v = torch.full(shape, good)
    if bad:
        v.view(-1)[1] = NAN
    return v


def _pos(bad: bool, shape=(3,)) -> torch.Tensor:
    s = torch.ones(shape)
    if bad:
        s.view(-1)[1] = -1.0
    return s


def _tril(bad: bool) -> torch.Tensor:
    t = torch.eye(2).expand(3, 2, 2).clone()
    if bad:
        t[1, 1, 1] = -1.0
    return t


RECORDS = [
    Record(
        "normal_log_prob",
        lambda bv, bp, va: F.normal_log_prob(_v(bv), 0.0, scale=_pos(bp), validate_args=va),
        "value",
        "scale",
    ),
    Record(
        "normal_log_prob[var]",
        lambda bv, bp, va: F.normal_log_prob(_v(bv), 0.0, var=_pos(bp), validate_args=va),
        "value",
        "var",
    ),
    Record(
        "normal_nll",
        lambda bv, bp, va: F.normal_nll(
            _v(bv), 0.0, scale=_pos(bp), reduction="none", validate_args=va
        ),
        "value",
        "scale",
    ),
    Record(
        "laplace_log_prob",
        lambda bv, bp, va: F.laplace_log_prob(_v(bv), 0.0, scale=_pos(bp), validate_args=va),
        "value",
        "scale",
    ),
    Record(
        "student_t_log_prob[scale]",
        lambda bv, bp, va: F.student_t_log_prob(_v(bv), 3.0, 0.0, scale=_pos(bp), validate_args=va),
        "value",
        "scale",
    ),
    Record(
        "student_t_log_prob[df]",
        lambda bv, bp, va: F.student_t_log_prob(_v(bv), _pos(bp), 0.0, 0.0, validate_args=va),
        "value",
        "df",
    ),
    Record(
        "bivariate_normal_log_prob",
        lambda bv, bp, va: F.bivariate_normal_log_prob(
            _v(bv, (3, 2)),
            torch.zeros(2),
            torch.zeros(2),
            rho=torch.tensor([0.1, 1.5 if bp else 0.2, 0.3]),
            validate_args=va,
        ),
        "value",
        "rho",
        r"must lie in \(-1, 1\)",
    ),
    Record(
        "multivariate_normal_log_prob",
        lambda bv, bp, va: F.multivariate_normal_log_prob(
            _v(bv, (3, 2)), torch.zeros(2), _tril(bp), validate_args=va
        ),
        "value",
        "scale_tril",
        "must have a positive diagonal",
    ),
    Record(
        "lowrank_multivariate_normal_log_prob",
        lambda bv, bp, va: F.lowrank_multivariate_normal_log_prob(
            _v(bv, (3, 2)), torch.zeros(2), torch.ones(2, 1), torch.zeros(2), validate_args=va
        ),
        "value",
        None,  # every parameter is unconstrained
    ),
    Record(
        "continuous_bernoulli_log_prob",
        lambda bv, bp, va: F.continuous_bernoulli_log_prob(_v(bv), 0.3, validate_args=va),
        "value",
        None,  # logits are unconstrained
    ),
    Record(
        "vae.gaussian_log_likelihood",
        lambda bv, bp, va: vae.gaussian_log_likelihood(
            _v(bv, (2, 3)), 0.0, scale=_pos(bp, (2, 3)), validate_args=va
        ),
        "x",
        "scale",
    ),
    Record(
        "vae.laplace_log_likelihood",
        lambda bv, bp, va: vae.laplace_log_likelihood(
            _v(bv, (2, 3)), 0.0, scale=_pos(bp, (2, 3)), validate_args=va
        ),
        "x",
        "scale",
    ),
]
IDS = [r.name for r in RECORDS]
WITH_PARAM = [r for r in RECORDS if r.param_name is not None]


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_nan_value_raises_naming_it_when_validating(record):
    assert torch.isfinite(record.call(False, False, True)).all()  # the good call passes
    with pytest.raises(ValueError, match=rf"^{record.value_name} of shape .* contains 1 NaN"):
        record.call(True, False, True)


@pytest.mark.parametrize("record", WITH_PARAM, ids=[r.name for r in WITH_PARAM])
def test_bad_constrained_parameter_raises_naming_it_when_validating(record):
    with pytest.raises(ValueError, match=rf"^{record.param_name} of shape .*{record.param_match}"):
        record.call(False, True, True)


@pytest.mark.parametrize("record", RECORDS, ids=IDS)
def test_nothing_is_checked_without_validation(record):
    """validate_args=False: no error; the NaN value gives a NaN result at its event only."""
    out = record.call(True, False, False)
    flat = out.reshape(-1)
    assert torch.isnan(flat).any() and not torch.isnan(flat).all()
    if record.param_name is not None:
        out = record.call(False, True, False)  # no ValueError
        assert not torch.isfinite(out).all()
