"""The one resolver of the scale forms: exactly one form, a clear error otherwise.

``log_scale`` and ``log_var`` are the stable, unconstrained forms; ``scale`` and ``var``
are the constrained alternatives (keyword-only in every public signature).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dtype import as_float_tensor
from .validation import check_positive, should_validate


def single_form(forms: dict[str, object]) -> tuple[str, object]:
    """``(name, value)`` of the one form given (not None) among ``forms``.

    ``forms`` maps a family's form names, in the order its error lists them, to the
    arguments (e.g. ``{"log_scale": ..., "scale": ...}`` for the Laplace).

    Raises:
        ValueError: ``"pass exactly one of log_scale, scale; got none"`` (or the forms given).
    """
    given = [(name, value) for name, value in forms.items() if value is not None]
    if len(given) != 1:
        got = ", ".join(name for name, _ in given) or "none"
        raise ValueError(f"pass exactly one of {', '.join(forms)}; got {got}")
    return given[0]


def log_scale_from(
    *,
    scale: Tensor | float | None = None,
    log_scale: Tensor | float | None = None,
    var: Tensor | float | None = None,
    log_var: Tensor | float | None = None,
    validate_args: bool | None = None,
) -> Tensor:
    """``log(scale)`` from exactly one of ``scale``, ``log_scale``, ``var``, ``log_var``.

    ``log_scale`` and ``log_var`` are the stable, unconstrained forms (``log_var / 2``
    costs nothing and cannot fail); ``scale`` and ``var`` must be positive and are checked
    when validating (``validate_args=None``: CPU tensors only).

    Raises:
        ValueError: if not exactly one form is given, or a given ``scale``/``var`` is not
            positive.
    """
    forms = {"scale": scale, "log_scale": log_scale, "var": var, "log_var": log_var}
    name, value = single_form(forms)
    value = as_float_tensor(value, name)
    if name in ("scale", "var") and should_validate(validate_args, value):
        check_positive(value, name)
    if name == "scale":
        return torch.log(value)
    if name == "var":
        return 0.5 * torch.log(value)  # log sigma = log(var) / 2
    if name == "log_var":
        return 0.5 * value
    return value
