"""Checks of module options, run in ``__init__``: each error names the option and what it allows.

Options with a fixed set of values (``reduction``, ``component``) use
:func:`probloss._core.validation.check_choice`; :class:`ShowOptions` gives every module the
same ``repr``, one ``name=value`` per option.
"""

from __future__ import annotations

import math

from .._core.validation import check_choice


def check_flag(name: str, value: object, *, allow_none: bool = False) -> bool | None:
    """Raise ValueError unless ``value`` is ``True`` or ``False`` (or ``None`` if
    ``allow_none``): ``1``, ``0.0`` or a tensor compare equal to a bool but are not one."""
    check_choice(name, value, (None, True, False) if allow_none else (True, False))
    return value


def check_size(name: str, value: object, *, low: int = 1) -> int:
    """Raise ValueError unless ``value`` is an ``int >= low`` (``bool`` is not a size)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return value


def check_number(
    name: str, value: object, *, low: float = -math.inf, high: float = math.inf,
    strict: bool = False, allow_none: bool = False,
) -> float | None:  # fmt: skip
    """A finite real number in ``[low, high]`` (``(low, high]`` if ``strict``) as a float.

    ``None`` passes when ``allow_none``; anything else (a string, NaN, inf, a tensor with
    more than one element) raises ValueError naming the option and the allowed range.
    """
    if value is None and allow_none:
        return None
    bracket = "(" if strict else "["
    what = f"a finite number in {bracket}{low}, {high}]" + (" or None" if allow_none else "")
    try:
        if isinstance(value, (bool, str, bytes)):
            raise TypeError  # float() would accept True and "1"
        number = float(value)  # a Python number or a one-element tensor
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be {what}; got {value!r}") from None
    inside = (number > low if strict else number >= low) and number <= high
    if not (math.isfinite(number) and inside):
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return number


def check_init_scale(init_scale: object, min_scale: float) -> float:
    """``init_scale`` finite and above the floor: ``softplus(raw) + min_scale`` reaches it."""
    init_scale = check_number("init_scale", init_scale, low=0.0, strict=True)
    if not init_scale > min_scale:
        raise ValueError(
            f"init_scale ({init_scale}) must exceed min_scale ({min_scale}): the scale is "
            "softplus(raw) + min_scale > min_scale"
        )
    return init_scale


class ShowOptions:
    """``extra_repr`` as ``name=value!r`` for each attribute named in ``_shown``: one repr
    format for every module of probloss.nn (mixed in before ``nn.Module``)."""

    _shown: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self, name)!r}" for name in self._shown)
