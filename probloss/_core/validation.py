"""When value checks run, and the checks: each names the argument and its shape.

Shape checks are free and always run (:mod:`.shapes`). Checks on *values* (range, NaN)
read the tensor on the host, which on an accelerator forces a synchronisation; like
``torch.distributions``' ``validate_args`` they are controlled per call:
``validate_args=None`` (the default) checks values of CPU tensors only, never while
``torch.compile`` / ``torch.export`` trace and never inside a ``torch.func`` transform
(:func:`~probloss._core.ops.host_readable`); ``True`` always checks, ``False`` never does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from .ops import has_values, host_readable


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``: the one check of every option
    that takes a fixed set of values (``reduction``, ``nan_policy``, a module's ``component``).

    The type must match too: ``1`` is not ``True`` and ``0.0`` not ``False`` (``==`` alone
    would let them through)."""
    if not any(type(value) is type(a) and value == a for a in allowed):
        quoted = [repr(a) for a in allowed]
        one_of = " or ".join([", ".join(quoted[:-1]), quoted[-1]]) if len(quoted) > 1 else quoted[0]
        raise ValueError(f"{name} must be {one_of}, got {value!r}")


def should_validate(validate_args: bool | None, *tensors: Tensor) -> bool:
    """Whether value checks run: the explicit choice, else only where the values can be read
    on the host for free (:func:`~probloss._core.ops.host_readable`: CPU tensors, no graph
    being traced, no ``torch.func`` transform; a compiled step checks nothing unless asked,
    like a GPU step)."""
    if validate_args is not None:
        return validate_args
    return host_readable(*tensors)


def distribution_validate_args(validate_args: bool | None, *tensors: Tensor) -> bool:
    """``validate_args`` for a probloss Distribution: the explicit choice, else torch's
    global default (``Distribution.set_default_validate_args``) but only for CPU tensors.

    torch validates parameters and samples by default, which reads them on the host and so
    waits for a GPU at every step; probloss keeps torch's switch and skips the read there
    (and while ``torch.compile`` traces, see :func:`should_validate`).
    An empty parameter (a batch of 0 elements) is never checked, whatever the choice:
    it holds no value to check, and torch's ``constraints.independent`` cannot even
    reshape it (``cannot reshape tensor of 0 elements``). ``numel`` is a shape property,
    so this reads no value.
    """
    if any(t.numel() == 0 for t in tensors):
        return False
    if validate_args is not None:
        return validate_args
    from torch.distributions import Distribution

    return bool(Distribution._validate_args) and should_validate(None, *tensors)


def validate_sample(distribution, value: Tensor) -> None:
    """``distribution._validate_sample(value)`` if it validates, unless ``value`` is empty
    or has no values to read (``torch.compile`` / ``torch.export`` tracing, a ``torch.func``
    transform: like torch's own checks under tracing, the check is skipped there).

    An empty value (``sample_shape`` with a 0, or an empty batch) has no element to check,
    and torch's check of a vector support fails on it with "cannot reshape tensor of 0
    elements"; the log density then returns its empty result.
    """
    if distribution._validate_args and value.numel() > 0 and has_values(value):
        distribution._validate_sample(value)


def check_not_nan(value: Tensor, name: str) -> None:
    """Raise ValueError if ``value`` contains NaN (infinities are left to the caller)."""
    nan = torch.isnan(value)
    if nan.any():
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} contains {int(nan.sum())} NaN value(s)"
        )


def check_positive(value: Tensor, name: str) -> None:
    """Raise ValueError naming ``name`` and its shape unless every element is > 0."""
    bad = ~(value > 0)  # also catches NaN
    if bad.any():
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} must be positive; got "
            f"{int(bad.sum())} value(s) <= 0 or NaN (smallest {value.min().item():.6g})"
        )


def check_in_interval(
    value: Tensor, name: str, low: float, high: float, *, allow_nan: bool = False
) -> None:
    """Raise ValueError unless every element of ``value`` lies in ``[low, high]``.

    NaN is an error too (:func:`check_not_nan`) unless ``allow_nan``.
    """
    if not allow_nan:
        check_not_nan(value, name)
    finite = value[~torch.isnan(value)]
    if finite.numel() and ((finite < low).any() or (finite > high).any()):
        raise ValueError(
            f"{name} of shape {tuple(value.shape)} must lie in [{low}, {high}]; "
            f"got values from {finite.min().item():.6g} to {finite.max().item():.6g}"
        )


def check_renamed_keywords(
    function: str, given: dict[str, object], renames: dict[str, str]
) -> None:
    """Raise TypeError for a keyword of ``function`` that was renamed, saying the new name.

    ``given`` holds the otherwise unexpected keywords (a ``**kwargs`` catch-all) and
    ``renames`` maps each old name to its replacement, with any change of units, e.g.
    ``{"min_diag": "min_scale"}``; any other unexpected keyword raises Python's usual
    "unexpected keyword argument" TypeError.
    """
    for old in given:
        if old in renames:
            raise TypeError(f"{function}(): {old} was renamed {renames[old]}")
        raise TypeError(f"{function}() got an unexpected keyword argument {old!r}")


def _excludes_only_nan(constraint: constraints.Constraint) -> bool:
    """``real``, or ``real`` with dimensions reinterpreted as event dimensions."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint is constraints.real


def set_validation(distribution, validate_args: bool) -> None:
    """Set ``distribution._validate_args`` and, when True, check its parameters as torch's
    ``Distribution.__init__`` does (same constraints, same ValueError); call it after
    ``super().__init__(..., validate_args=False)``.

    The difference is speed: a ``real`` parameter (or ``independent(real, n)``: NaN is its
    only invalid value) is first summed, since a NaN anywhere makes the sum NaN: one float
    reduction instead of torch's ``value == value`` mask and its ``all``, 6-8x slower on CPU
    (0.8 ms of a mixture head's 10 ms step at B = 4096). Only a NaN sum (a NaN, or
    infinities of both signs) runs torch's check.
    """
    distribution._validate_args = validate_args
    if not validate_args:
        return
    for name, constraint in distribution.arg_constraints.items():
        if constraints.is_dependent(constraint):
            continue  # derived from the others (torch skips it too)
        if name not in distribution.__dict__ and isinstance(
            getattr(type(distribution), name, None), lazy_property
        ):
            continue  # not given: computed from another form (torch skips it too)
        value = getattr(distribution, name)
        if _excludes_only_nan(constraint) and not bool(torch.isnan(value.sum())):
            continue
        if not bool(constraint.check(value).all()):
            raise ValueError(
                f"Expected parameter {name} ({type(value).__name__} of shape "
                f"{tuple(value.shape)}) of distribution {distribution!r} to satisfy the "
                f"constraint {constraint!r}, but found invalid values:\n{value}"
            )
