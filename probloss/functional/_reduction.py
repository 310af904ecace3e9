"""moved to probloss._core.reduction; kept until the mixture package is moved."""

from .._core.reduction import (  # noqa: F401
    NAN_POLICIES,
    REDUCTIONS,
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)
