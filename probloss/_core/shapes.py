"""Broadcasting of named arguments, with errors that name every argument and its shape.

Shape checks read no value, so they always run (unlike the value checks of
:mod:`.validation`).

Layouts are written as in the docstrings, ``"(*)"``, ``"(*, 2)"``, ``"(*, K, D)"``: ``*`` is
the batch shape, each further entry one trailing dimension; a digit is a fixed size
(checked), a letter a size shared with the other arguments (broadcast). The shorter layouts
of one call extend to the longest on the right (``(*, K)`` is read as ``(*, K, 1)`` next to
``(*, K, D)``), so that one broadcast checks ``*`` and every shared letter together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .dtype import as_float_tensor, compute_dtype, promoted_dtype

# the bivariate normal (functional and distribution): value and parameters
BIVARIATE_LAYOUTS = {
    "value": "(*, 2)",
    "loc": "(*, 2)",
    "log_scale": "(*, 2)",
    "atanh_rho": "(*)",
    "rho": "(*)",
}

# the parameters of the mixtures (functional and distributions): K components, D dimensions
MIXTURE_LAYOUTS = {
    "logits": "(*, K)",
    "loc": "(*, K, D)",
    "log_scale": "(*, K, D)",
    "atanh_rho": "(*, K)",
    "scale_tril": "(*, K, D, D)",
}


def broadcast_shapes(
    *, what: str = "shapes", note: str = "", **shapes: Tensor | Sequence[int]
) -> torch.Size:
    """The broadcast of the named shapes (a tensor stands for its shape).

    Raises:
        ValueError: ``"{what} do not broadcast: a (3,), b (4,){note}"``, listing every one.
    """
    sizes = {
        name: s.shape if isinstance(s, Tensor) else torch.Size(s) for name, s in shapes.items()
    }
    try:
        return torch.broadcast_shapes(*sizes.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(s)}" for name, s in sizes.items())
        raise ValueError(f"{what} do not broadcast: {listed}{note}") from None


def _entries(layout: str) -> list[str]:
    """``"(*, K, D)"`` -> ``["K", "D"]``: the trailing entries after ``*``."""
    return [e.strip() for e in layout.strip("()").split(",")[1:]]


def _check_layout(name: str, t: Tensor, layout: str) -> None:
    entries = _entries(layout)
    if t.dim() < len(entries):
        raise ValueError(f"{name} must have shape {layout}; got shape {tuple(t.shape)}")
    for i, entry in enumerate(entries):
        pos = i - len(entries)
        if entry.isdigit() and t.shape[pos] != int(entry):
            where = "the last dimension" if pos == -1 else f"dimension {pos}"
            raise ValueError(
                f"{name} must have shape {layout} (event size {entry} in {where}); "
                f"got shape {tuple(t.shape)}"
            )


def broadcast_layouts(layouts: Mapping[str, str], **tensors: Tensor) -> torch.Size:
    """The broadcast shape, in the longest layout, of tensors laid out as ``layouts[name]``.

    Each tensor must have at least its layout's trailing dimensions, of the fixed sizes it
    names; it is padded with unit dimensions on the right to the longest layout, and all
    are broadcast together.

    Raises:
        ValueError: a tensor with too few dimensions or a wrong fixed size (naming it, its
            layout and shape), or shapes that do not broadcast, e.g. ``shapes do not
            broadcast: value, loc must be (*, 2) and atanh_rho (*) with broadcastable (*);
            got value (5, 2), loc (4, 2), atanh_rho (5,)``.
    """
    for name, t in tensors.items():
        _check_layout(name, t, layouts[name])
    depth = {name: len(_entries(layouts[name])) for name in tensors}
    longest = max(depth.values())
    padded = [(*t.shape, *(1,) * (longest - depth[name])) for name, t in tensors.items()]
    try:
        return torch.broadcast_shapes(*padded)
    except RuntimeError:
        groups: dict[str, list[str]] = {}
        for name in tensors:
            groups.setdefault(layouts[name], []).append(name)
        parts = [f"{', '.join(names)} {layout}" for layout, names in groups.items()]
        expected = parts[0].replace(" (", " must be (", 1)
        if len(parts) > 1:
            expected = ", ".join([expected, *parts[1:-1]]) + f" and {parts[-1]}"
        shared = min((layouts[name] for name in tensors), key=lambda s: len(_entries(s)))
        shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
        raise ValueError(
            f"shapes do not broadcast: {expected} with broadcastable {shared}; got {shapes}"
        ) from None


def batch_shape(layouts: Mapping[str, str], **tensors: Tensor) -> torch.Size:
    """The broadcast batch shape ``(*)`` of tensors laid out as ``layouts[name]``
    (:func:`broadcast_layouts`, less the longest layout's trailing dimensions)."""
    full = broadcast_layouts(layouts, **tensors)
    trailing = max(len(_entries(layouts[name])) for name in tensors)
    return full[: len(full) - trailing]


def expand_to_layouts(layouts: Mapping[str, str], **tensors: Tensor) -> list[Tensor]:
    """The tensors expanded (views) to their layout within the common broadcast shape."""
    full = broadcast_layouts(layouts, **tensors)
    longest = max(len(_entries(layouts[name])) for name in tensors)
    out = []
    for name, t in tensors.items():
        drop = longest - len(_entries(layouts[name]))
        out.append(t.expand(full[: len(full) - drop]))
    return out


def mixture_parameters(event_size: int | None, **named: Tensor) -> tuple[list[Tensor], torch.dtype]:
    """Mixture parameters (:data:`MIXTURE_LAYOUTS`) checked, promoted and broadcast.

    ``event_size`` fixes ``D`` (2 for the bivariate mixtures), ``None`` leaves it free.

    Returns:
        The tensors expanded (views) to the common ``(*, K)`` / ``(*, K, D)`` in the compute
        dtype (float32 for half inputs, :mod:`.dtype`), and their promoted dtype, in which
        results are returned.

    Raises:
        TypeError: a tensor that is not floating point; ValueError: shapes, as in
            :func:`broadcast_layouts`.
    """
    tensors = {name: as_float_tensor(t, name) for name, t in named.items()}
    size = "D" if event_size is None else str(event_size)
    layouts = {name: MIXTURE_LAYOUTS[name].replace("D", size) for name in tensors}
    dtype = promoted_dtype(*tensors.values())
    compute = compute_dtype(dtype)
    return [t.to(compute) for t in expand_to_layouts(layouts, **tensors)], dtype
