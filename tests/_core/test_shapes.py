"""Tests of ``probloss._core.shapes``: broadcasting with errors that name every argument.

Shapes are checked against ``torch.broadcast_shapes`` (exact); messages against the text
each function documents.
"""

from __future__ import annotations

import pytest
import torch

from probloss._core.shapes import (
    BIVARIATE_LAYOUTS,
    MIXTURE_LAYOUTS,
    batch_shape,
    broadcast_layouts,
    broadcast_shapes,
    expand_to_layouts,
    mixture_parameters,
)


def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def test_broadcast_shapes_names_every_argument():
    with pytest.raises(ValueError, match=r"^shapes do not broadcast: value \(3,\), logits \(4,\)$"):
        broadcast_shapes(value=_z(3), logits=_z(4))
    assert broadcast_shapes(a=_z(2, 1), b=_z(3)) == (2, 3)


def test_broadcast_shapes_of_sizes_with_what_and_note():
    assert broadcast_shapes(what="batch shapes", a=(4, 1), b=torch.Size([5])) == (4, 5)
    with pytest.raises(
        ValueError, match=r"^batch shapes \(\*\) do not broadcast: a \(4,\), b \(5,\) \(x\)$"
    ):
        broadcast_shapes(what="batch shapes (*)", note=" (x)", a=(4,), b=(5,))


def test_batch_shape_of_the_bivariate_layouts():
    """(*, 2) tensors and a (*) correlation: the batch shapes broadcast (7, 1) x (3,)."""
    got = batch_shape(BIVARIATE_LAYOUTS, value=_z(7, 1, 2), loc=_z(3, 2), atanh_rho=_z(3))
    assert got == torch.broadcast_shapes((7, 1), (3,), (3,))
    assert batch_shape(BIVARIATE_LAYOUTS, loc=_z(2), log_scale=_z(2), rho=_z()) == ()


def test_batch_shape_errors_name_layouts_and_shapes():
    with pytest.raises(
        ValueError,
        match=r"^shapes do not broadcast: value, loc, log_scale must be \(\*, 2\) and atanh_rho "
        r"\(\*\) with broadcastable \(\*\); got value \(5, 2\), loc \(4, 2\), log_scale \(5, 2\), "
        r"atanh_rho \(5,\)$",
    ):
        batch_shape(
            BIVARIATE_LAYOUTS, value=_z(5, 2), loc=_z(4, 2), log_scale=_z(5, 2), atanh_rho=_z(5)
        )
    with pytest.raises(
        ValueError,
        match=r"^loc must have shape \(\*, 2\) \(event size 2 in the last dimension\); "
        r"got shape \(5, 3\)$",
    ):
        batch_shape(BIVARIATE_LAYOUTS, loc=_z(5, 3), atanh_rho=_z(5))
    with pytest.raises(ValueError, match=r"^value must have shape \(\*, 2\).*got shape \(\)$"):
        batch_shape(BIVARIATE_LAYOUTS, value=_z(), atanh_rho=_z())


def test_layouts_broadcast_shared_letters():
    """(*, K) is read as (*, K, 1) beside (*, K, D): K broadcasts with the batch."""
    layouts = {"logits": "(*, K)", "loc": "(*, K, D)", "scale_tril": "(*, K, D, D)"}
    full = broadcast_layouts(layouts, logits=_z(5, 1, 4), loc=_z(3, 1, 2), scale_tril=_z(4, 2, 2))
    assert full == (5, 3, 4, 2, 2)
    logits, loc, tril = expand_to_layouts(
        layouts, logits=_z(5, 1, 4), loc=_z(3, 1, 2), scale_tril=_z(4, 2, 2)
    )
    assert (logits.shape, loc.shape, tril.shape) == ((5, 3, 4), (5, 3, 4, 2), (5, 3, 4, 2, 2))
    with pytest.raises(
        ValueError,
        match=r"^shapes do not broadcast: logits must be \(\*, K\) and loc \(\*, K, D\)"
        r" with broadcastable \(\*, K\); got logits \(3,\), loc \(4, 2\)$",
    ):
        broadcast_layouts(layouts, logits=_z(3), loc=_z(4, 2))
    with pytest.raises(
        ValueError, match=r"^scale_tril must have shape \(\*, K, D, D\); got shape \(2, 2\)$"
    ):
        broadcast_layouts(MIXTURE_LAYOUTS, scale_tril=_z(2, 2))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_mixture_parameters_promote_compute_and_expand(half):
    """Returned in the compute dtype (float32 for half), with the promoted dtype."""
    (logits, loc, log_scale), dtype = mixture_parameters(
        None,
        logits=_z(5, 1, 4, dtype=half),
        loc=_z(3, 4, 2, dtype=half),
        log_scale=_z(4, 2, dtype=half),
    )
    assert dtype == half and logits.dtype == loc.dtype == torch.float32
    assert logits.shape == (5, 3, 4) and loc.shape == log_scale.shape == (5, 3, 4, 2)
    (_, _, _, rho), dtype = mixture_parameters(
        2, logits=_z(4), loc=_z(4, 2), log_scale=_z(4, 2), atanh_rho=_z(4, dtype=torch.float64)
    )
    assert dtype == torch.float64 and rho.shape == (4,)
    with pytest.raises(ValueError, match=r"^loc must have shape \(\*, K, 2\) \(event size 2"):
        mixture_parameters(2, logits=_z(3), loc=_z(3, 3))
    with pytest.raises(TypeError, match="logits must be a real floating-point tensor"):
        mixture_parameters(None, logits=torch.zeros(3, dtype=torch.int64), loc=_z(3, 1))
