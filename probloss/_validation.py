"""moved to probloss._core.validation; kept until the mixture package is moved."""

from ._core.shapes import broadcast_shapes  # noqa: F401
from ._core.validation import (  # noqa: F401
    check_in_interval,
    check_not_nan,
    check_positive,
    check_renamed_keywords,
    distribution_validate_args,
    should_validate,
    validate_sample,
)
