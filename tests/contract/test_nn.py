"""One loop over every class of ``probloss.nn``: the module half of the API rule (docs/api.md,
rules 5 and 6), each class from its recipes in :mod:`tests.contract.nn_registry`.

Every class must:

* have a case (a class in ``probloss.nn.__all__`` without one fails), and every option of
  its ``__init__`` must have wrong values in ``BAD_VALUES`` and a non-default value in
  some case;
* refuse every wrong option value in ``__init__`` with a ValueError or TypeError whose
  message says ``"<option> must be"`` and what it allows, and an unknown keyword with a
  TypeError;
* show each non-default option in its ``repr`` as ``name=value``;
* survive a ``state_dict`` round trip: a fresh instance (another seed) that loads the
  state dict gives bitwise the same output;
* give a finite output with finite gradients on a small input.

Every head must return an instance of a probloss distribution class whose ``log_prob`` of a
matching value has the features' batch shape. No numbers are compared with a reference
here: the checks are exact (equal outputs, shapes, types, finiteness).
"""

from __future__ import annotations

import inspect
import io

import pytest
import torch
from torch.distributions import Distribution, Independent

import probloss.nn as N
from tests.contract.nn_registry import BAD_VALUES, BATCH, CASES, ModuleCase
from tests.contract.registry import public_signature

# option -> reason a non-default value need not show in the repr
NOT_IN_REPR = {"init_scale": "sets the initial bias only; a loaded state dict replaces it"}


def _options(cls: type) -> dict[str, inspect.Parameter]:
    """The named options of ``cls.__init__`` (a ``**removed`` catch-all is not one)."""
    params = public_signature(f"nn.{cls.__name__}").parameters.values()
    return {p.name: p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD}


def _non_default(value: object, param: inspect.Parameter) -> bool:
    """``value`` differs from the default (``False`` is not ``None``, ``1`` is not ``1.0``)."""
    default = param.default
    return type(value) is not type(default) or value != default


def _built(case: ModuleCase, seed: int) -> torch.nn.Module:
    """The case's module, initialised under ``seed``."""
    torch.manual_seed(seed)
    return case.build()


def _forward(case: ModuleCase, module: torch.nn.Module) -> tuple[torch.Tensor, list]:
    """The case's output (a head's ``log_prob`` of the value) and the tensors it depends
    on that can take a gradient: the module's parameters and the differentiable inputs."""
    inputs = case.inputs()
    if case.is_head:
        features, value = inputs
        out = module(features).log_prob(value)
    else:
        out = module(*inputs)
    tensors = list(module.parameters())
    for x in inputs:
        found = vars(x).values() if isinstance(x, Distribution) else [x]
        tensors += [t for t in found if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, tensors


case_param = pytest.mark.parametrize("case_id", sorted(CASES))
HEAD_CASES = sorted(k for k, c in CASES.items() if c.is_head)


def test_every_class_has_a_case():
    covered = {case.cls.__name__ for case in CASES.values()}
    missing = sorted(set(N.__all__) - covered)
    assert not missing, f"add a case in tests/contract/nn_registry.py: {missing}"


@pytest.mark.parametrize("name", sorted(N.__all__))
def test_every_option_has_bad_values_and_a_non_default_case(name):
    cls = getattr(N, name)
    cases = [c for c in CASES.values() if c.cls is cls]
    for option, param in _options(cls).items():
        assert option in BAD_VALUES, f"{name}: add wrong values of {option!r} to BAD_VALUES"
        given = [c.kwargs[option] for c in cases if option in c.kwargs]
        assert any(_non_default(v, param) for v in given), (
            f"{name}: no case sets {option!r} to a non-default value"
        )


BAD_PARAMS = [
    pytest.param(case_id, option, value, id=f"{case_id}-{option}={value!r}")
    for case_id in sorted(CASES)
    for option in _options(CASES[case_id].cls)
    for value in BAD_VALUES.get(option, ())
]


@pytest.mark.parametrize(("case_id", "option", "value"), BAD_PARAMS)
def test_bad_option_raises_in_init_naming_it(case_id, option, value):
    with pytest.raises((ValueError, TypeError)) as error:
        CASES[case_id].build(**{option: value})
    assert f"{option} must be" in str(error.value), str(error.value)  # names what it allows


BAD_COMBINATIONS = [
    pytest.param(case_id, bad, id=f"{case_id}-{sorted(bad.kwargs)}")
    for case_id in sorted(CASES)
    for bad in CASES[case_id].bad
]


@pytest.mark.parametrize(("case_id", "bad"), BAD_COMBINATIONS)
def test_bad_combination_raises_in_init(case_id, bad):
    with pytest.raises(bad.error, match=bad.match):
        CASES[case_id].build(**bad.kwargs)


@case_param
def test_unknown_keyword_is_a_type_error(case_id):
    with pytest.raises(TypeError, match="bogus_option"):
        CASES[case_id].build(bogus_option=1)


@case_param
def test_repr_shows_the_non_default_options(case_id):
    case = CASES[case_id]
    text = repr(case.build())
    assert text.startswith(case.cls.__name__ + "(")
    options = _options(case.cls)
    for option, value in case.kwargs.items():
        if option in NOT_IN_REPR or not _non_default(value, options[option]):
            continue
        assert f"{option}={value!r}" in text, (option, text)


def test_repr_exemptions_name_options():
    every = {o for name in N.__all__ for o in _options(getattr(N, name))}
    assert set(NOT_IN_REPR) <= every, "stale NOT_IN_REPR entry"


@case_param
def test_state_dict_round_trip(case_id):
    case = CASES[case_id]
    module = _built(case, 0)
    expected, _ = _forward(case, module)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = _built(case, 1)  # another initialisation, which the load must overwrite
    if any(True for _ in fresh.parameters()):
        assert not torch.equal(_forward(case, fresh)[0], expected)  # the load is what counts
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(_forward(case, fresh)[0], expected)


@case_param
def test_finite_output_and_gradients(case_id):
    case = CASES[case_id]
    out, tensors = _forward(case, _built(case, 0))
    assert tensors and torch.isfinite(out).all(), out
    grads = torch.autograd.grad(out.sum(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case_id", HEAD_CASES)
def test_head_returns_a_probloss_distribution(case_id):
    case = CASES[case_id]
    features, value = case.inputs()
    distribution = case.build()(features)
    assert type(distribution).__module__.startswith("probloss.distributions."), type(distribution)
    if isinstance(distribution, Independent):  # and what it wraps
        base = distribution.base_dist
        assert type(base).__module__.startswith("probloss.distributions."), type(base)
    assert distribution.batch_shape == BATCH
    assert distribution.event_shape == value.shape[-1:]
    assert distribution.log_prob(value).shape == BATCH


@case_param
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # torch's
def test_compiles_fullgraph_and_matches_eager(case_id):
    """Every module (a head with its ``log_prob``) compiles with no graph break, forward
    and backward. Same formulas in float32, up to summation order and inductor's fused
    code: a few ulps of terms of size ~10, bound ``1e-5`` relative and absolute."""
    case = CASES[case_id]
    module = _built(case, 0)
    if case.is_head:
        def run(f, v):
            return module(f).log_prob(v)
    else:
        run = module
    inputs = case.inputs()
    tensors = list(module.parameters())
    for x in inputs:
        found = vars(x).values() if isinstance(x, Distribution) else [x]
        tensors += [t for t in found if isinstance(t, torch.Tensor) and t.requires_grad]
    expected = run(*inputs)
    expected_grads = torch.autograd.grad(expected.sum(), tensors)
    torch._dynamo.reset()
    out = torch.compile(run, fullgraph=True)(*inputs)
    grads = torch.autograd.grad(out.sum(), tensors)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for g, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
