"""moved to probloss._core.dtype; kept until the mixture package is moved."""

from .._core.dtype import as_float_tensor, compute_dtype, upcast  # noqa: F401
