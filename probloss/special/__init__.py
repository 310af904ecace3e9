"""Stable special functions: exact in every floating dtype, finite gradients everywhere.

Every function is elementwise and broadcasts like torch, except :func:`logsumexp`, which
reduces one dimension; each returns its input dtype, float16 and bfloat16 inputs
evaluated in float32 and rounded once (no intermediate overflow).
"""

from .continuous_bernoulli import cb_entropy, cb_log_partition, cb_mean, cb_variance
from .exp import expm1mx, mul_exp
from .floor import log_softplus, soft_floor, softplus
from .log_exp import log1mexp, log_cosh, softplus_inverse
from .logsumexp import logsumexp
from .where import safe_where

__all__ = [
    "cb_entropy",
    "cb_log_partition",
    "cb_mean",
    "cb_variance",
    "expm1mx",
    "log1mexp",
    "log_cosh",
    "log_softplus",
    "logsumexp",
    "mul_exp",
    "safe_where",
    "soft_floor",
    "softplus",
    "softplus_inverse",
]
