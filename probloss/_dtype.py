"""moved to probloss._core.dtype; kept until the mixture package is moved."""

from ._core.dtype import (  # noqa: F401
    as_float_tensor,
    as_loss_tensors,
    compute_dtype,
    loss_dtype,
    loss_tensors,
    promote_float_tensors,
    upcast,
)
