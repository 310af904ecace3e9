"""Constants of the log densities, as Python floats (rounded once from ``math``).

Every module takes them from here, so that the same term is bitwise the same everywhere
(a mixture's fused kernel and :func:`~probloss.functional.normal_log_prob` must agree to
the last bit).
"""

from __future__ import annotations

import math

LOG_2 = math.log(2.0)
LOG_PI = math.log(math.pi)
LOG_2PI = math.log(2.0 * math.pi)
HALF_LOG_2PI = 0.5 * LOG_2PI  # log(2 pi)/2, the normal's normalising term
HALF_LOG_PI = 0.5 * LOG_PI  # lgamma(1/2) = log sqrt(pi)
