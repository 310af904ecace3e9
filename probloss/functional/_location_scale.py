"""Inputs of a location-scale log density, converted and checked once for every family.

:func:`~probloss.functional.normal_log_prob`, :func:`~probloss.functional.normal_nll`,
:func:`~probloss.functional.laplace_log_prob` and
:func:`~probloss.functional.student_t_log_prob` take ``value`` first, the location, then
``log_scale`` positionally (the unconstrained form) and the other scale forms by keyword.
This module applies the rule they share: exactly one scale form (a ValueError naming the
family's forms), shapes that broadcast (always), and, when validating, ``value`` free of
NaN and a constrained form (``scale``, ``var``) positive, through the one resolver
:func:`log_scale_from`.
"""

from __future__ import annotations

from torch import Tensor

from .._core.dtype import loss_tensors
from .._core.params import log_scale_from, single_form
from .._core.shapes import broadcast_shapes
from .._core.validation import check_not_nan, should_validate


def location_scale_inputs(
    value: Tensor | float,
    loc: Tensor | float,
    forms: dict[str, Tensor | float | None],
    validate_args: bool | None,
    *,
    check_value: bool = True,
    **extra: Tensor | float | None,
) -> tuple[dict[str, Tensor], str, Tensor, Tensor]:
    """``(tensors, name, param, log_scale)`` for one location-scale call.

    ``forms`` maps the family's scale-form names (in the order its error lists them) to the
    arguments; exactly one must be given. ``extra`` (``df``, ``min_scale``; ``None`` left
    out) is converted with the rest and must broadcast too. ``tensors`` holds every given
    input in the loss dtype (:func:`~probloss._core.dtype.loss_tensors`), ``name`` / ``param``
    the scale form given and ``log_scale`` its ``log sigma`` (:func:`log_scale_from`).
    ``check_value=False`` leaves NaN in ``value`` alone (a NaN-masking loss).

    Raises:
        ValueError: not exactly one form, shapes that do not broadcast (naming each), or,
            when validating, NaN in ``value`` or a ``scale`` / ``var`` that is not positive.
    """
    name, given = single_form(forms)
    tensors = loss_tensors(value=value, loc=loc, **{name: given}, **extra)
    broadcast_shapes(**tensors)
    if check_value and should_validate(validate_args, tensors["value"]):
        check_not_nan(tensors["value"], "value")
    param = tensors[name]
    # the resolver checks a scale / var is positive (when validating) and gives log sigma
    log_scale = log_scale_from(**{name: param}, validate_args=validate_args)
    return tensors, name, param, log_scale
