"""One recipe per module case of ``probloss.nn`` for the contract test (``test_nn.py``).

A :class:`ModuleCase` builds one module from keyword options and runs it on a small
seeded input. Heads give ``(features, value)`` (the contract evaluates
``head(features).log_prob(value)``); losses give the tensors of their ``forward`` call.
Each class of ``probloss.nn.__all__`` needs at least one case, and across its cases every
option of its ``__init__`` must take a non-default value somewhere (so that the repr and
state-dict checks see it). ``BAD_VALUES`` lists wrong values per option name; options that
are only wrong together (``init_scale <= min_scale``) are a case's ``bad`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import probloss.distributions as D
import probloss.nn as N

# option name -> values that every module taking the option must refuse in __init__
BAD_VALUES: dict[str, tuple] = {
    "reduction": ("bogus", "MEAN", None),
    "nan_policy": ("bogus", None),
    "validate_args": ("yes", 1, 0.0, torch.tensor(True)),  # 1 == True, but not a bool
    "full": ("yes", 1, None),
    "component": ("diagonal", None),
    "in_features": (0, -1, 2.5, True, "8"),
    "out_features": (0, 2.5, True),
    "num_components": (0, -2, 3.0),
    "pen_states": (-1, 2.5, True),
    "beta": (-0.1, 1.5, math.nan, "0"),
    "min_scale": (-1.0, math.nan, math.inf, "0.1"),
    "eps": (-1e-6, math.nan, math.inf),
    "init_scale": (0.0, -1.0, math.nan, math.inf, "1"),
}


@dataclass(frozen=True)
class Bad:
    """Options refused together: ``kwargs`` raise, with a message matching ``match`` (a
    regex that names the option)."""

    kwargs: dict
    match: str
    error: type[Exception] = ValueError


@dataclass(frozen=True)
class ModuleCase:
    cls: type[torch.nn.Module]
    kwargs: dict  # every option passed (sizes included); non-default ones must show in repr
    inputs: Callable[[], tuple]  # seeded forward inputs (a head's: features, value)
    bad: tuple[Bad, ...] = field(default=())

    @property
    def is_head(self) -> bool:
        return self.cls.__name__.endswith("Head")

    def build(self, **override: object) -> torch.nn.Module:
        return self.cls(**{**self.kwargs, **override})


def _seeded(make: Callable[[], tuple]) -> Callable[[], tuple]:
    """``make`` run under seed 0 (the global generator restored after): the same inputs on
    every call."""

    def inputs() -> tuple:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            return make()
        finally:
            torch.random.set_rng_state(generator_state)

    return inputs


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).requires_grad_()


IN = 6
BATCH = (2, 3)  # two batch dimensions: log_prob must keep both


def _points(pen_states: int) -> torch.Tensor:
    """Offsets ``(*BATCH, 2)`` and a one-hot pen state ``(*BATCH, P)``: a value in a
    StrokeMixture's support."""
    pen = torch.nn.functional.one_hot(torch.randint(pen_states, BATCH), pen_states)
    return torch.cat((torch.randn(*BATCH, 2), pen.float()), -1)


def _head_inputs(dim: int) -> Callable[[], tuple]:
    """Features ``(*BATCH, IN)`` and a value ``(*BATCH, dim)`` in the heads' float32."""
    return _seeded(lambda: (torch.randn(*BATCH, IN), torch.randn(*BATCH, dim)))


def _init_above_floor(floor: float) -> Bad:
    return Bad({"init_scale": floor, "min_scale": floor}, r"init_scale .* must exceed min_scale")


def _mixture(**kwargs: object) -> dict:
    return {"in_features": IN, "num_components": 4, "init_scale": 0.5, **kwargs}


CASES: dict[str, ModuleCase] = {
    "NormalNLLLoss": ModuleCase(
        N.NormalNLLLoss,
        dict(beta=0.5, min_scale=0.001, reduction="sum", nan_policy="mask", validate_args=True),
        _seeded(lambda: (torch.randn(4, 3).double(), _leaf(4, 3), _leaf(4, 3))),
        bad=(
            Bad({"min_scale": 0.0}, r"min_scale must be .* \(0.0, inf\] or None"),
            Bad({"scale_form": "var"}, "scale_form was removed", TypeError),
        ),
    ),
    "GaussianNLLLoss": ModuleCase(
        N.GaussianNLLLoss,
        {"full": True, "eps": 0.001, "reduction": "none", "validate_args": False},
        _seeded(lambda: (_leaf(4, 3), torch.randn(4, 3).double(), _leaf(4, 1).exp())),
    ),
    "BivariateNormalNLLLoss": ModuleCase(
        N.BivariateNormalNLLLoss,
        {"reduction": "none", "nan_policy": "mask", "validate_args": True},
        _seeded(lambda: (torch.randn(4, 2).double(), _leaf(4, 2), _leaf(4, 2), _leaf(4))),
    ),
    "MixtureNLLLoss": ModuleCase(
        N.MixtureNLLLoss,
        {"reduction": "sum", "nan_policy": "mask"},
        _seeded(
            lambda: (
                torch.randn(4, 3).double(),
                D.NormalMixture(_leaf(4, 2), _leaf(4, 2, 3), _leaf(4, 2, 3)),
            )
        ),
    ),
    "NormalHead": ModuleCase(
        N.NormalHead,
        {"in_features": IN, "out_features": 3, "init_scale": 0.5, "min_scale": 0.001},
        _head_inputs(3),
        bad=(_init_above_floor(0.001),),
    ),
    "BivariateNormalHead": ModuleCase(
        N.BivariateNormalHead,
        {"in_features": IN, "init_scale": 0.5, "min_scale": 0.001},
        _head_inputs(2),
        bad=(_init_above_floor(0.001),),
    ),
    "MixtureDensityHead[normal]": ModuleCase(
        N.MixtureDensityHead,
        _mixture(out_features=3, min_scale=0.001),
        _head_inputs(3),
        bad=(
            _init_above_floor(0.5),
            Bad({"pen_states": 3}, r"pen_states must be 0 .*component='bivariate'"),
            Bad({"min_diag": 0.1}, "min_diag was renamed min_scale", TypeError),
        ),
    ),
    "MixtureDensityHead[bivariate]": ModuleCase(
        N.MixtureDensityHead,
        _mixture(out_features=2, component="bivariate"),
        _head_inputs(2),
        bad=(Bad({"out_features": 3}, r"needs out_features == 2"),),
    ),
    "MixtureDensityHead[bivariate, pen_states]": ModuleCase(
        N.MixtureDensityHead,
        _mixture(out_features=2, component="bivariate", pen_states=3),
        _seeded(lambda: (torch.randn(*BATCH, IN), _points(3))),
        bad=(Bad({"pen_states": 1}, r"pen_states must be 0 \(none\) or an int >= 2"),),
    ),
    "MixtureDensityHead[full]": ModuleCase(
        N.MixtureDensityHead,
        _mixture(out_features=3, component="full", min_scale=0.01),
        _head_inputs(3),
        bad=(
            Bad({"min_scale": 0.0}, r"min_scale must be .* \(0.0, inf\]"),  # L_ii needs a floor
            _init_above_floor(0.5),
        ),
    ),
}
