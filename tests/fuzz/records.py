r"""One fuzz record per public function and distribution method (like JAX's ``op_record``).

A :class:`Record` names what it covers (``target``: ``special.softplus``,
``functional.normal_log_prob``, ``distributions.Normal.cdf``), how to call it on a batch
of ``N`` independent rows (``fn(*tensors)``, every tensor's first dimension ``N``), the
domain of each argument (:class:`Arg`, kinds in :mod:`tests.fuzz.draws`), which arguments
get gradients, the output dtype policy and the mpmath oracle of its float64 path.

Output dtype policy (docs/numerics.md, half precision):

* ``"same"``: the input dtype (special functions; quantities in the data's units:
  means, variances, CDFs, quantiles, modes, samples);
* ``"promote"``: float32 for float16 / bfloat16 inputs, else the input dtype (log
  densities, KLs, losses, entropies; and ``scale_tril_from_raw``, which documents it).

Not fuzzed as valid inputs (each record's domains leave them out): probabilities outside
``[0, 1]``, non-positive scales / variances / ``df`` / triangular diagonals, ``+-inf``
parameters (only values and special-function inputs take ``inf``), rows of mixture logits
that are all ``-inf``. ``MixtureDensityHead(component="full")`` returns a
:class:`~probloss.distributions.MultivariateNormalMixture`, which has records like every
class in ``probloss.distributions.__all__``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import probloss.distributions as D
import probloss.functional as F
import probloss.metrics as M
import probloss.special as S
from probloss.functional.multivariate import default_min_diag

from . import oracle as O

K = 3  # mixture components
DIM = 2  # event size of the diagonal mixtures and the multivariate normals


@dataclass(frozen=True)
class Arg:
    """One argument: its domain kind, its per-row shape, gradient and ``inf``."""

    name: str
    domain: str = "real"
    shape: tuple[int, ...] = ()
    grad: bool = True
    inf: bool = False


@dataclass(frozen=True)
class Undefined:
    """Rows where a record's result is mathematically undefined, and why.

    ``where(*inputs)`` takes the float64 inputs of a batch (as :class:`Record.fn` does)
    and returns a ``(N,)`` boolean mask; there a NaN is acceptable in the gradients with
    respect to ``grads`` (``None``: every argument), and in the value only if ``value``.
    Everywhere else a NaN is a failure (:func:`tests.fuzz.checks.acceptable_nan`).
    """

    reason: str
    where: Callable[..., torch.Tensor]
    grads: tuple[str, ...] | None = None
    value: bool = False


@dataclass(frozen=True)
class Record:
    name: str  # unique id, e.g. "functional.normal_nll[beta=0.5]"
    target: str  # the public name it covers, e.g. "functional.normal_nll"
    fn: Callable
    args: tuple[Arg, ...]
    policy: str  # "same" or "promote"
    oracle: Callable | None = None  # rows -> [(value, scale)] of the float64 path
    grad_oracle: Callable | None = None  # rows -> per grad arg, [exact gradient]
    random: bool = False  # a sampler: no float64 reference of the value
    fused: Callable | None = None  # fn(*tensors, fused=bool) for the fused = plain check
    fused_args: tuple[str, ...] = field(default=())  # arguments the fused domain bounds
    undefined: tuple[Undefined, ...] = ()  # where the math is undefined (NaN acceptable)
    # rows -> {grad arg: [exact gradient, mpmath]}: decides the disputed rows (an inf
    # gradient where the float64 reference is finite; tests.fuzz.checks.check)
    dispute_oracle: Callable | None = None

    def __repr__(self) -> str:
        return self.name


def _v(name="value", **kw):
    """A value: ``inf`` is meaningful (its log density is ``-inf``)."""
    return Arg(name, inf=True, **kw)


def _special(name: str, *, inf: bool = True, domain: str = "real") -> Record:
    return Record(
        name=f"special.{name}",
        target=f"special.{name}",
        fn=getattr(S, name),
        args=(Arg("x", domain, inf=inf),),
        policy="same",
        oracle=O.special(name),
        grad_oracle=O.special_grad(name),
    )


def _sample_generator():
    return torch.Generator().manual_seed(1234)


SPECIAL = [
    _special("cb_entropy"),
    _special("cb_log_partition"),
    _special("cb_mean"),
    _special("cb_variance"),
    Record(
        "special.expm1mx",
        "special.expm1mx",
        S.expm1mx,
        (Arg("x", inf=True),),
        "same",
        oracle=O.expm1mx,
    ),
    _special("log1mexp", domain="positive"),
    _special("log_cosh"),
    _special("log_softplus"),
    Record(
        "special.logsumexp",
        "special.logsumexp",
        S.logsumexp,
        (Arg("x", shape=(K,)),),
        "same",
        oracle=O.logsumexp,  # gradients: tests/special/test_logsumexp.py (its flush bound)
    ),
    Record(
        "special.mul_exp",
        "special.mul_exp",
        S.mul_exp,
        (Arg("x"), Arg("t")),
        "same",
        oracle=O.mul_exp,
    ),
    Record(
        "special.safe_where[log|exp]",
        "special.safe_where",
        lambda x: S.safe_where(x > 0, x, torch.log, torch.exp, safe_true=1.0, safe_false=0.0),
        (Arg("x"),),
        "same",
        oracle=O.safe_log_or_exp,
        grad_oracle=O.safe_log_or_exp_grad,
    ),
    Record(
        "special.soft_floor",
        "special.soft_floor",
        S.soft_floor,
        (Arg("x", inf=True), Arg("floor")),
        "same",
        oracle=O.soft_floor,
    ),
    _special("softplus"),
    _special("softplus_inverse", domain="positive"),
]

_V, _LOC, _LS = _v(), Arg("loc"), Arg("log_scale")
_MIX = (
    Arg("logits", "mixture_logits", (K,)),
    Arg("loc", shape=(K, DIM)),
    Arg("log_scale", shape=(K, DIM)),
)
_BIMIX = (
    Arg("logits", "mixture_logits", (K,)),
    Arg("loc", shape=(K, 2)),
    Arg("log_scale", shape=(K, 2)),
    Arg("atanh_rho", shape=(K,)),
)
_BI_PARAMS = (("loc", (2,)), ("log_scale", (2,)), ("atanh_rho", (1,)))
_BI = tuple(Arg(name, shape=shape) for name, shape in _BI_PARAMS)


# StrokeMixture: the bivariate mixture's records plus pen logits, against the mpmath
# offsets mixture plus log_softmax of the pen logits at the pen-down state (oracle.stroke_*;
# the bound REL * T of tests/fuzz/oracle.py). The mode (an argmax, ties by index) has none,
# like BivariateNormalMixture.mode.
_STROKE = (*_BIMIX, Arg("pen_logits", shape=(3,)))


def _stroke(*p):
    return D.StrokeMixture(*p)


def _pen_down(offsets):
    pen = torch.zeros(*offsets.shape[:-1], 3, dtype=offsets.dtype, device=offsets.device)
    pen[..., 0] = 1
    return torch.cat([offsets, pen], -1)


def _bivariate(fn):
    """Bivariate functions take ``atanh_rho`` of shape ``(N,)``; the row shape is ``(1,)``."""
    return lambda value, loc, log_scale, a: fn(value, loc, log_scale, a.squeeze(-1))


# ---------------------------------------------------------------- undefined limits
#
# With finite valid inputs every result is a real number (exact arithmetic does not
# overflow), so NaN is never acceptable there. At an infinite value the result is the limit
# x -> +-inf. In one coordinate that limit always exists: every quantity is a sum of
# exponentials of polynomials in x (times polynomials), whose limit exists in [-inf, inf].
# In two coordinates it is a double limit, which exists only where it does not depend on
# the path; the statements below say where it does not.


def _correlated_corner(value: torch.Tensor, rho_sign: torch.Tensor) -> torch.Tensor:
    """Both coordinates infinite and ``sign(x1 x2 rho) > 0``."""
    both = value.isinf().all(-1)
    return both & (value[:, 0].sign() * value[:, 1].sign() * rho_sign > 0)


_CORRELATED = (
    "x1, x2 both infinite with sign(x1 x2 rho) > 0: d/dx1 = -(z1 - rho z2) / (sigma1 (1 - "
    "rho^2)) is inf - inf and its limit along z2 = t z1 is -(1 - rho t) inf, of either sign "
    "as t varies; every gradient carries z1 - rho z2 or z2 - rho z1 (d/dlog_scale1 = "
    "z1 (z1 - rho z2) / (1 - rho^2) - 1, d/datanh_rho and the factor's gradients alike). "
    "With sign(x1 x2 rho) <= 0 both differences have a definite sign; the value is -inf "
    "along every path (the quadratic form is positive definite)"
)


def _bivariate_corner(value, loc, log_scale, atanh_rho):
    return _correlated_corner(value, atanh_rho[:, 0].sign())


def _tril_corner(value, loc, scale_tril):
    # Sigma_12 = L_11 L_21 with L_11 > 0: rho has the sign of L_21.
    return _correlated_corner(value, scale_tril[:, 1, 0].sign())


def _lowrank_corner(value, loc, cov_factor, log_diag):
    # Sigma_12 = W_1 W_2 (rank 1; the diagonal adds nothing off the diagonal).
    return _correlated_corner(value, cov_factor[:, 0, 0].sign() * cov_factor[:, 1, 0].sign())


def _diagonal_mixture_corner(value, logits, loc, log_scale):
    """>= 2 infinite coordinates and no live component strictly widest in each of them."""
    inf = value.isinf()  # (N, D)
    live = logits > -torch.inf  # (N, K)
    n, k = live.shape
    dominant = torch.zeros(n, dtype=torch.bool)
    for a in range(k):
        wins = live[:, a].clone()
        for b in range(k):
            if b != a:
                wider = (log_scale[:, a] > log_scale[:, b]) | ~inf  # (N, D)
                wins &= ~live[:, b] | wider.all(-1)
        dominant |= wins
    return (inf.sum(-1) >= 2) & ~dominant


_DIAGONAL_MIXTURE = (
    "two infinite coordinates and no live component with the strictly largest sigma in "
    "both: along x = t c (t -> inf) the component with the smallest sum_d c_d^2 / "
    "sigma_kd^2 takes all the weight, and that component changes with c, so the "
    "responsibilities (a factor of d/dlogits, d/dloc, d/dlog_scale) have no limit. "
    "d/dvalue_d = -sum_k r_k (x_d - mu_kd) / sigma_kd^2 is -sign(x_d) inf on every path "
    "(each term has that sign, and some r_k >= 1/K); the value is -inf"
)

_CORRELATED_MIXTURE = (
    "two infinite coordinates: the winning component along x = t c is the one with the "
    "smallest c^T Sigma_k^-1 c, which changes with c unless one component's form is the "
    "smallest on the whole quadrant (a copositivity test this suite does not make), and "
    "each component's own gradient is path-dependent as in the single correlated case. A "
    "deliberate over-approximation (about 1 row in 1000: each coordinate is inf with "
    "probability 1/32): every gradient of such a row is accepted as undefined, the value "
    "(-inf on every path) is not"
)


def _two_infinite(value, *params):
    return value.isinf().sum(-1) >= 2


_UNDEF_BIVARIATE = (Undefined(_CORRELATED, _bivariate_corner),)
_UNDEF_DIAGONAL_MIXTURE = (
    Undefined(_DIAGONAL_MIXTURE, _diagonal_mixture_corner, grads=("logits", "loc", "log_scale")),
)
_UNDEF_CORRELATED_MIXTURE = (Undefined(_CORRELATED_MIXTURE, _two_infinite),)


def _nll(fn, **kw):
    return lambda *a: fn(*a, reduction="none", **kw)


FUNCTIONAL = [
    Record(
        "functional.bernoulli_kl",
        "functional.bernoulli_kl",
        F.bernoulli_kl,
        (Arg("logits_q"), Arg("logits_p")),
        "promote",
        oracle=O.bernoulli_kl,
    ),
    Record(
        "functional.bivariate_normal_kl",
        "functional.bivariate_normal_kl",
        lambda mq, lq, aq, mp_, lp, ap: F.bivariate_normal_kl(
            mq, lq, aq.squeeze(-1), mp_, lp, ap.squeeze(-1)
        ),
        tuple(Arg(f"{name}_{side}", shape=shape) for side in "qp" for name, shape in _BI_PARAMS),
        "promote",
        oracle=O.bivariate_normal_kl,
    ),
    Record(
        "functional.bivariate_normal_log_prob",
        "functional.bivariate_normal_log_prob",
        _bivariate(F.bivariate_normal_log_prob),
        (_v(shape=(2,)), *_BI),
        "promote",
        oracle=O.bivariate_normal_log_prob,
        undefined=_UNDEF_BIVARIATE,
        dispute_oracle=O.bivariate_log_scale_grad,
    ),
    Record(
        "functional.bivariate_normal_mixture_covariance",
        "functional.bivariate_normal_mixture_covariance",
        F.bivariate_normal_mixture_covariance,
        _BIMIX,
        "same",
        oracle=O.bivariate_mixture_covariance,
    ),
    Record(
        "functional.bivariate_normal_mixture_log_prob",
        "functional.bivariate_normal_mixture_log_prob",
        F.bivariate_normal_mixture_log_prob,
        (_v(shape=(2,)), *_BIMIX),
        "promote",
        oracle=O.bivariate_normal_mixture_log_prob,
        fused=F.bivariate_normal_mixture_log_prob,
        fused_args=("log_scale", "atanh_rho"),
        undefined=_UNDEF_CORRELATED_MIXTURE,
    ),
    Record(
        "functional.bivariate_normal_mixture_mean",
        "functional.bivariate_normal_mixture_mean",
        F.bivariate_normal_mixture_mean,
        _BIMIX[:2],
        "same",
        oracle=O.mixture_mean,
    ),
    Record(
        "functional.bivariate_normal_mixture_mode",
        "functional.bivariate_normal_mixture_mode",
        F.bivariate_normal_mixture_mode,
        _BIMIX[:2],
        "same",
    ),
    Record(
        "functional.bivariate_normal_mixture_nll",
        "functional.bivariate_normal_mixture_nll",
        _nll(F.bivariate_normal_mixture_nll),
        (_v(shape=(2,)), *_BIMIX),
        "promote",
        oracle=O.bivariate_normal_mixture_nll,
        undefined=_UNDEF_CORRELATED_MIXTURE,
    ),
    Record(
        "functional.bivariate_normal_mixture_sample",
        "functional.bivariate_normal_mixture_sample",
        lambda *a: F.bivariate_normal_mixture_sample(*a, generator=_sample_generator()),
        _BIMIX,
        "same",
        random=True,
    ),
    Record(
        "functional.bivariate_normal_nll",
        "functional.bivariate_normal_nll",
        _bivariate(_nll(F.bivariate_normal_nll)),
        (_v(shape=(2,)), *_BI),
        "promote",
        oracle=O.bivariate_normal_nll,
        undefined=_UNDEF_BIVARIATE,
        dispute_oracle=O.bivariate_nll_log_scale_grad,
    ),
    Record(
        "functional.continuous_bernoulli_cdf",
        "functional.continuous_bernoulli_cdf",
        F.continuous_bernoulli_cdf,
        (Arg("value", "probability"), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_cdf,
    ),
    # Unvalidated, any value: 0 below the support and 1 above it (issue 10).
    Record(
        "functional.continuous_bernoulli_cdf[validate_args=False]",
        "functional.continuous_bernoulli_cdf",
        lambda x, lg: F.continuous_bernoulli_cdf(x, lg, validate_args=False),
        (_v(), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_cdf,
    ),
    Record(
        "functional.continuous_bernoulli_icdf",
        "functional.continuous_bernoulli_icdf",
        F.continuous_bernoulli_icdf,
        (Arg("quantile", "probability"), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_icdf,
    ),
    Record(
        "functional.continuous_bernoulli_kl",
        "functional.continuous_bernoulli_kl",
        F.continuous_bernoulli_kl,
        (Arg("logits_q"), Arg("logits_p")),
        "promote",
        oracle=O.continuous_bernoulli_kl,
    ),
    Record(
        "functional.continuous_bernoulli_log_prob",
        "functional.continuous_bernoulli_log_prob",
        F.continuous_bernoulli_log_prob,
        (Arg("value", "probability"), Arg("logits")),
        "promote",
        oracle=O.continuous_bernoulli_log_prob,
    ),
    Record(
        "functional.laplace_log_prob",
        "functional.laplace_log_prob",
        F.laplace_log_prob,
        (_V, _LOC, _LS),
        "promote",
        oracle=O.laplace_log_prob,
    ),
    Record(
        "functional.lowrank_multivariate_normal_log_prob",
        "functional.lowrank_multivariate_normal_log_prob",
        F.lowrank_multivariate_normal_log_prob,
        (
            _v(shape=(DIM,)),
            Arg("loc", shape=(DIM,)),
            Arg("cov_factor", shape=(DIM, 1)),
            Arg("log_diag", shape=(DIM,)),
        ),
        "promote",
        oracle=O.lowrank_multivariate_normal_log_prob,
        undefined=(Undefined(_CORRELATED, _lowrank_corner),),
    ),
    Record(
        "functional.mixture_log_prob",
        "functional.mixture_log_prob",
        F.mixture_log_prob,
        (Arg("component_log_prob", shape=(K,)), Arg("logits", "mixture_logits", (K,))),
        "promote",
        oracle=O.mixture_log_prob,
    ),
    Record(
        "functional.mixture_log_prob[probs]",
        "functional.mixture_log_prob",
        lambda c, w: F.mixture_log_prob(c, probs=w),
        (Arg("component_log_prob", shape=(K,)), Arg("probs", "open_probability", (K,))),
        "promote",
        oracle=O.mixture_log_prob_probs,
    ),
    Record(
        "functional.multivariate_normal_log_prob",
        "functional.multivariate_normal_log_prob",
        F.multivariate_normal_log_prob,
        (_v(shape=(DIM,)), Arg("loc", shape=(DIM,)), Arg("scale_tril", "tril", (DIM, DIM))),
        "promote",
        oracle=O.multivariate_normal_log_prob,
        undefined=(Undefined(_CORRELATED, _tril_corner),),
    ),
    Record(
        "functional.multivariate_normal_mixture_log_prob",
        "functional.multivariate_normal_mixture_log_prob",
        F.multivariate_normal_mixture_log_prob,
        (
            _v(shape=(DIM,)),
            Arg("logits", "mixture_logits", (K,)),
            Arg("loc", shape=(K, DIM)),
            Arg("scale_tril", "tril", (K, DIM, DIM)),
        ),
        "promote",
        oracle=O.multivariate_normal_mixture_log_prob,
        undefined=_UNDEF_CORRELATED_MIXTURE,
    ),
    Record(
        "functional.normal_kl",
        "functional.normal_kl",
        F.normal_kl,
        (Arg("loc_q"), Arg("log_var_q"), Arg("loc_p"), Arg("log_var_p")),
        "promote",
        oracle=lambda mq, lq, mp_, lp: _normal_kl(mq, lq, mp_, lp),
    ),
    Record(
        "functional.normal_log_prob[log_scale]",
        "functional.normal_log_prob",
        lambda x, m, s: F.normal_log_prob(x, m, log_scale=s),
        (_V, _LOC, _LS),
        "promote",
        oracle=O.normal_log_prob,
    ),
    Record(
        "functional.normal_log_prob[scale]",
        "functional.normal_log_prob",
        lambda x, m, s: F.normal_log_prob(x, m, scale=s),
        (_V, _LOC, Arg("scale", "positive")),
        "promote",
        oracle=O.normal_log_prob_scale,
    ),
    Record(
        "functional.normal_log_prob[var]",
        "functional.normal_log_prob",
        lambda x, m, s: F.normal_log_prob(x, m, var=s),
        (_V, _LOC, Arg("var", "positive")),
        "promote",
        oracle=O.normal_log_prob_var,
    ),
    Record(
        "functional.normal_log_prob[log_var]",
        "functional.normal_log_prob",
        lambda x, m, s: F.normal_log_prob(x, m, log_var=s),
        (_V, _LOC, Arg("log_var")),
        "promote",
        oracle=O.normal_log_prob_log_var,
    ),
    Record(
        "functional.normal_mixture_log_prob",
        "functional.normal_mixture_log_prob",
        F.normal_mixture_log_prob,
        (_v(shape=(DIM,)), *_MIX),
        "promote",
        oracle=O.normal_mixture_log_prob,
        fused=F.normal_mixture_log_prob,
        fused_args=("log_scale",),
        undefined=_UNDEF_DIAGONAL_MIXTURE,
    ),
    Record(
        "functional.normal_mixture_mean",
        "functional.normal_mixture_mean",
        F.normal_mixture_mean,
        _MIX[:2],
        "same",
        oracle=O.mixture_mean,
    ),
    Record(
        "functional.normal_mixture_mode",
        "functional.normal_mixture_mode",
        F.normal_mixture_mode,
        _MIX[:2],
        "same",
    ),
    Record(
        "functional.normal_mixture_nll",
        "functional.normal_mixture_nll",
        _nll(F.normal_mixture_nll),
        (_v(shape=(DIM,)), *_MIX),
        "promote",
        oracle=O.normal_mixture_nll,
        undefined=_UNDEF_DIAGONAL_MIXTURE,
    ),
    Record(
        "functional.normal_mixture_sample",
        "functional.normal_mixture_sample",
        lambda *a: F.normal_mixture_sample(*a, generator=_sample_generator()),
        _MIX,
        "same",
        random=True,
    ),
    Record(
        "functional.normal_mixture_variance",
        "functional.normal_mixture_variance",
        F.normal_mixture_variance,
        _MIX,
        "same",
        oracle=O.mixture_variance,
    ),
    Record(
        "functional.normal_nll[log_scale]",
        "functional.normal_nll",
        lambda x, m, s: F.normal_nll(x, m, log_scale=s, reduction="none"),
        (_V, _LOC, _LS),
        "promote",
        oracle=O.normal_nll,
    ),
    Record(
        "functional.normal_nll[beta=0.5]",
        "functional.normal_nll",
        lambda x, m, s: F.normal_nll(x, m, log_scale=s, beta=0.5, reduction="none"),
        (_V, _LOC, _LS),
        "promote",
        oracle=lambda x, m, s: O.normal_nll(x, m, s, beta=0.5),
    ),
    Record(
        "functional.normal_nll[min_scale=1e-3]",
        "functional.normal_nll",
        lambda x, m, s: F.normal_nll(x, m, log_scale=s, min_scale=1e-3, reduction="none"),
        (_V, _LOC, _LS),
        "promote",
        oracle=lambda x, m, s: O.normal_nll(x, m, s, min_scale=1e-3),
    ),
    Record(
        "functional.scale_tril_from_raw",
        "functional.scale_tril_from_raw",
        lambda raw: F.scale_tril_from_raw(raw, DIM),
        (Arg("raw", shape=(3,)),),
        "promote",
        oracle=lambda raw: O.scale_tril(raw, default_min_diag(torch.float64)),
    ),
    Record(
        "functional.student_t_log_prob",
        "functional.student_t_log_prob",
        F.student_t_log_prob,
        (_V, Arg("df", "positive"), _LOC, _LS),
        "promote",
        oracle=O.student_t_log_prob,
    ),
]


def _normal_kl(loc_q, log_var_q, loc_p, log_var_p):
    """``KL = (expm1mx(d) + (mu_q - mu_p)^2 e^{-lv_p}) / 2``, ``d = lv_q - lv_p``."""
    from mpmath import mp

    out = []
    for mq, lq, mp_, lp in zip(loc_q, log_var_q, loc_p, log_var_p, strict=True):
        with mp.workdps(2 * O._dps_for(mq, lq, mp_, lp) + 40):
            d = mp.mpf(lq) - lp
            v = (mp.expm1(d) - d + (mp.mpf(mq) - mp_) ** 2 * mp.exp(-mp.mpf(lp))) / 2
            out.append((+v, +v))  # two non-negative terms: relative
    return out


# ---------------------------------------------------------------- distributions

_NORMAL_PARAMS = (_LOC, _LS)


def _normal(loc, log_scale):
    return D.Normal(loc, log_scale=log_scale)


def _cb(logits):
    return D.ContinuousBernoulli(logits=logits)


def _bi(loc, log_scale, a):
    return D.BivariateNormal(loc, log_scale, a.squeeze(-1))


DISTRIBUTIONS = [
    Record(
        "distributions.Normal.log_prob",
        "distributions.Normal.log_prob",
        lambda x, m, s: _normal(m, s).log_prob(x),
        (_V, *_NORMAL_PARAMS),
        "promote",
        oracle=O.normal_log_prob,
    ),
    Record(
        "distributions.Normal.cdf",
        "distributions.Normal.cdf",
        lambda x, m, s: _normal(m, s).cdf(x),
        (_V, *_NORMAL_PARAMS),
        "same",
        oracle=O.normal_cdf,
    ),
    Record(
        "distributions.Normal.icdf",
        "distributions.Normal.icdf",
        lambda p, m, s: _normal(m, s).icdf(p),
        (Arg("quantile", "open_probability"), *_NORMAL_PARAMS),
        "same",
        oracle=O.normal_icdf,
    ),
    Record(
        "distributions.Normal.mean",
        "distributions.Normal.mean",
        lambda m, s: _normal(m, s).mean,
        _NORMAL_PARAMS,
        "same",
        oracle=O.identity_loc,
    ),
    Record(
        "distributions.Normal.mode",
        "distributions.Normal.mode",
        lambda m, s: _normal(m, s).mode,
        _NORMAL_PARAMS,
        "same",
        oracle=O.identity_loc,
    ),
    Record(
        "distributions.Normal.variance",
        "distributions.Normal.variance",
        lambda m, s: _normal(m, s).variance,
        _NORMAL_PARAMS,
        "same",
        oracle=O.normal_variance,
    ),
    Record(
        "distributions.Normal.entropy",
        "distributions.Normal.entropy",
        lambda m, s: _normal(m, s).entropy(),
        _NORMAL_PARAMS,
        "promote",
        oracle=O.normal_entropy,
    ),
    Record(
        "distributions.BivariateNormal.log_prob",
        "distributions.BivariateNormal.log_prob",
        lambda x, *p: _bi(*p).log_prob(x),
        (_v(shape=(2,)), *_BI),
        "promote",
        oracle=O.bivariate_normal_log_prob,
        undefined=_UNDEF_BIVARIATE,
        dispute_oracle=O.bivariate_log_scale_grad,
    ),
    Record(
        "distributions.BivariateNormal.mean",
        "distributions.BivariateNormal.mean",
        lambda *p: _bi(*p).mean,
        _BI,
        "same",
        oracle=O.identity_loc,
    ),
    Record(
        "distributions.BivariateNormal.mode",
        "distributions.BivariateNormal.mode",
        lambda *p: _bi(*p).mode,
        _BI,
        "same",
        oracle=O.identity_loc,
    ),
    Record(
        "distributions.BivariateNormal.variance",
        "distributions.BivariateNormal.variance",
        lambda *p: _bi(*p).variance,
        _BI,
        "same",
        oracle=O.bivariate_variance,
    ),
    Record(
        "distributions.BivariateNormal.covariance_matrix",
        "distributions.BivariateNormal.covariance_matrix",
        lambda *p: _bi(*p).covariance_matrix,
        _BI,
        "same",
        oracle=O.bivariate_covariance,
    ),
    Record(
        "distributions.BivariateNormal.entropy",
        "distributions.BivariateNormal.entropy",
        lambda *p: _bi(*p).entropy(),
        _BI,
        "promote",
        oracle=O.bivariate_entropy,
    ),
    Record(
        "distributions.NormalMixture.log_prob",
        "distributions.NormalMixture.log_prob",
        lambda x, *p: D.NormalMixture(*p).log_prob(x),
        (_v(shape=(DIM,)), *_MIX),
        "promote",
        oracle=O.normal_mixture_log_prob,
        undefined=_UNDEF_DIAGONAL_MIXTURE,
    ),
    Record(
        "distributions.NormalMixture.mean",
        "distributions.NormalMixture.mean",
        lambda *p: D.NormalMixture(*p).mean,
        _MIX,
        "same",
        oracle=lambda lg, m, s: O.mixture_mean(lg, m),
    ),
    Record(
        "distributions.NormalMixture.mode",
        "distributions.NormalMixture.mode",
        lambda *p: D.NormalMixture(*p).mode,
        _MIX,
        "same",
    ),
    Record(
        "distributions.NormalMixture.variance",
        "distributions.NormalMixture.variance",
        lambda *p: D.NormalMixture(*p).variance,
        _MIX,
        "same",
        oracle=O.mixture_variance,
    ),
    Record(
        "distributions.BivariateNormalMixture.log_prob",
        "distributions.BivariateNormalMixture.log_prob",
        lambda x, *p: D.BivariateNormalMixture(*p).log_prob(x),
        (_v(shape=(2,)), *_BIMIX),
        "promote",
        oracle=O.bivariate_normal_mixture_log_prob,
        undefined=_UNDEF_CORRELATED_MIXTURE,
    ),
    *(
        Record(
            f"distributions.StrokeMixture.{method}",
            f"distributions.StrokeMixture.{method}",
            fn,
            args,
            policy,
            oracle=oracle,
            undefined=undefined,
        )
        for method, fn, args, policy, oracle, undefined in (
            (
                "log_prob",
                lambda x, *p: _stroke(*p).log_prob(_pen_down(x)),
                (_v(shape=(2,)), *_STROKE),
                "promote",
                O.stroke_log_prob,  # pen-down: state 0 of the one-hot
                _UNDEF_CORRELATED_MIXTURE,  # the offsets are the bivariate mixture's
            ),
            ("mean", lambda *p: _stroke(*p).mean, _STROKE, "same", O.stroke_mean, ()),
            ("variance", lambda *p: _stroke(*p).variance, _STROKE, "same", O.stroke_variance, ()),
            ("mode", lambda *p: _stroke(*p).mode, _STROKE, "same", None, ()),
        )
    ),
    Record(
        "distributions.BivariateNormalMixture.mean",
        "distributions.BivariateNormalMixture.mean",
        lambda *p: D.BivariateNormalMixture(*p).mean,
        _BIMIX,
        "same",
        oracle=lambda lg, m, s, a: O.mixture_mean(lg, m),
    ),
    Record(
        "distributions.BivariateNormalMixture.mode",
        "distributions.BivariateNormalMixture.mode",
        lambda *p: D.BivariateNormalMixture(*p).mode,
        _BIMIX,
        "same",
    ),
    Record(
        "distributions.BivariateNormalMixture.variance",
        "distributions.BivariateNormalMixture.variance",
        lambda *p: D.BivariateNormalMixture(*p).variance,
        _BIMIX,
        "same",
        oracle=O.bivariate_mixture_variance,
    ),
    Record(
        "distributions.BivariateNormalMixture.covariance_matrix",
        "distributions.BivariateNormalMixture.covariance_matrix",
        lambda *p: D.BivariateNormalMixture(*p).covariance_matrix,
        _BIMIX,
        "same",
        oracle=O.bivariate_mixture_covariance,
    ),
    Record(
        "distributions.ContinuousBernoulli.log_prob",
        "distributions.ContinuousBernoulli.log_prob",
        lambda x, lg: _cb(lg).log_prob(x),
        (Arg("value", "probability"), Arg("logits")),
        "promote",
        oracle=O.continuous_bernoulli_log_prob,
    ),
    Record(
        "distributions.ContinuousBernoulli.log_prob[probs]",
        "distributions.ContinuousBernoulli.log_prob",
        lambda x, p: D.ContinuousBernoulli(probs=p).log_prob(x),
        (Arg("value", "probability"), Arg("probs", "open_probability")),
        "promote",
    ),
    Record(
        "distributions.ContinuousBernoulli.cdf",
        "distributions.ContinuousBernoulli.cdf",
        lambda x, lg: _cb(lg).cdf(x),
        (Arg("value", "probability"), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_cdf,
    ),
    Record(
        "distributions.ContinuousBernoulli.cdf[validate_args=False]",
        "distributions.ContinuousBernoulli.cdf",
        lambda x, lg: D.ContinuousBernoulli(logits=lg, validate_args=False).cdf(x),
        (_v(), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_cdf,
    ),
    Record(
        "distributions.ContinuousBernoulli.icdf",
        "distributions.ContinuousBernoulli.icdf",
        lambda u, lg: _cb(lg).icdf(u),
        (Arg("quantile", "probability"), Arg("logits")),
        "same",
        oracle=O.continuous_bernoulli_icdf,
    ),
    Record(
        "distributions.ContinuousBernoulli.mean",
        "distributions.ContinuousBernoulli.mean",
        lambda lg: _cb(lg).mean,
        (Arg("logits"),),
        "same",
        oracle=O.cb_quantity("mean"),
    ),
    Record(
        "distributions.ContinuousBernoulli.variance",
        "distributions.ContinuousBernoulli.variance",
        lambda lg: _cb(lg).variance,
        (Arg("logits"),),
        "same",
        oracle=O.cb_quantity("variance"),
    ),
    Record(
        "distributions.ContinuousBernoulli.entropy",
        "distributions.ContinuousBernoulli.entropy",
        lambda lg: _cb(lg).entropy(),
        (Arg("logits"),),
        "promote",
        oracle=O.cb_quantity("entropy"),
    ),
]

_MVMIX = (
    Arg("logits", "mixture_logits", (K,)),
    Arg("loc", shape=(K, DIM)),
    Arg("scale_tril", "tril", (K, DIM, DIM)),
)


def _mvmix(*p):
    return D.MultivariateNormalMixture(*p)


DISTRIBUTIONS += [
    Record(
        "distributions.MultivariateNormalMixture.log_prob",
        "distributions.MultivariateNormalMixture.log_prob",
        lambda x, *p: _mvmix(*p).log_prob(x),
        (_v(shape=(DIM,)), *_MVMIX),
        "promote",
        oracle=O.multivariate_normal_mixture_log_prob,
        undefined=_UNDEF_CORRELATED_MIXTURE,
    ),
    Record(
        "distributions.MultivariateNormalMixture.mean",
        "distributions.MultivariateNormalMixture.mean",
        lambda *p: _mvmix(*p).mean,
        _MVMIX,
        "same",
        oracle=lambda lg, m, el: O.mixture_mean(lg, m),
    ),
    Record(
        "distributions.MultivariateNormalMixture.mode",
        "distributions.MultivariateNormalMixture.mode",
        lambda *p: _mvmix(*p).mode,
        _MVMIX,
        "same",
    ),
    Record(
        "distributions.MultivariateNormalMixture.variance",
        "distributions.MultivariateNormalMixture.variance",
        lambda *p: _mvmix(*p).variance,
        _MVMIX,
        "same",
        oracle=O.multivariate_mixture_variance,
    ),
]

METRICS = [
    Record(f"metrics.{name}", f"metrics.{name}", getattr(M, name), (_V, _LOC, _LS), "promote",
           oracle=getattr(O, name))
    for name in ("crps_normal", "crps_laplace", "crps_logistic")
] + [
    Record(
        "metrics.crps_ensemble",
        "metrics.crps_ensemble",
        lambda value, samples: M.crps_ensemble(value, samples.movedim(-1, 0)),  # (M, *) first
        (_v(), Arg("samples", shape=(5,))),
        "promote",
        oracle=O.crps_ensemble,
    ),
    Record(
        "metrics.crps_normal_mixture",
        "metrics.crps_normal_mixture",
        M.crps_normal_mixture,
        (_v(shape=(DIM,)), *_MIX),
        "promote",
        oracle=O.crps_normal_mixture,
    )
]  # fmt: skip

RECORDS: list[Record] = SPECIAL + FUNCTIONAL + DISTRIBUTIONS + METRICS
BY_NAME = {r.name: r for r in RECORDS}
assert len(BY_NAME) == len(RECORDS), "duplicate record names"

# The methods a distribution class must have a record for, where it defines them.
DISTRIBUTION_METHODS = (
    "log_prob",
    "cdf",
    "icdf",
    "mean",
    "variance",
    "entropy",
    "mode",
    "covariance_matrix",
)


# ---------------------------------------------------------------- known limits (open holes)


@dataclass(frozen=True)
class KnownLimit:
    """Rows where the LIBRARY is known to be wrong (an open hole, not undefined math).

    Like :class:`Undefined` (``where(*inputs64, dtype=dtype) -> (N,)`` mask, with the
    dtype of the draws; ``grads``, ``value``) and
    applied in the same one place (:func:`tests.fuzz.checks.acceptable_nan`), but it
    excuses any failure of the named outputs there (NaN, or ``inf`` where the reference is
    representable), only in ``dtypes``. Each statement must still match a row of the
    current draws, or give an ``example`` row that it matches and where the check still
    fails without it (for holes rarer than 1 in 2000 draws; ``tests/fuzz/test_records.py``):
    once the library is fixed it goes stale, that test fails, and the statement is to be
    deleted.
    """

    reason: str
    where: Callable[..., torch.Tensor]
    dtypes: tuple[torch.dtype, ...]
    grads: tuple[str, ...] | None = None
    value: bool = False
    issue: str = "10"
    example: tuple | None = None  # one failing row (nested float64 lists, one per argument)


_F64 = torch.float64
_EPS32 = torch.finfo(torch.float32).eps


def _mixture_terms(value, logits, loc, log_scale=None, scale_tril=None, atanh_rho=None):
    """``T_k = logit_k + log N_k(x)`` (up to constants), float64, ``(N, K)``; ``-inf`` for an
    infinite logit or an undefined term (also where float64 overflows on the way)."""
    if atanh_rho is not None:
        r = value.unsqueeze(-2) - loc
        z = torch.where(r == 0, 0.0, r * torch.exp(-log_scale))
        return _bivariate_terms(z, logits, log_scale, atanh_rho, shrink=0.0)
    if scale_tril is not None:
        r = value.unsqueeze(-2) - loc
        z = torch.linalg.solve_triangular(scale_tril.tril(), r.unsqueeze(-1), upper=False).squeeze(
            -1
        )
        logdet = scale_tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    else:
        r = value.unsqueeze(-2) - loc
        z = torch.where(r == 0, 0.0, r * torch.exp(-log_scale))  # 0 * e^{65504} is 0
        logdet = log_scale.sum(-1)
    t = logits - (z * z / 2).sum(-1) - logdet
    return t.nan_to_num(-math.inf, posinf=math.inf, neginf=-math.inf)


def _bivariate_terms(z, logits, log_scale, atanh_rho, shrink):
    """``logit_k + log N_k`` (up to constants) of bivariate components from their
    standardised residuals ``z`` (float64, ``(N, K, 2)``), with the eigen-coordinates ``w =
    z1 + s z2``, ``n = z1 - s z2`` (``s = sign a``, ``b = |a|``) shrunk towards 0 by
    ``shrink`` (``(N, K)`` or 0): ``Q = (w^2 (1 + e^{-2b}) + n^2 (1 + e^{2b})) / 4`` (a zero
    coordinate contributes 0 whatever ``e^{2b}``), ``log det / 2 = l1 + l2 - log cosh a``."""
    z1, z2 = z[..., 0], z[..., 1]
    b, sign = atanh_rho.abs(), torch.where(atanh_rho < 0, -1.0, 1.0)  # s = 1 at a = 0
    w = ((z1 + sign * z2).abs() - shrink).clamp(min=0.0)
    n = ((z1 - sign * z2).abs() - shrink).clamp(min=0.0)
    wide = torch.where(w == 0, 0.0, w * w * (1 + torch.exp(-2 * b)))
    narrow = torch.where(n == 0, 0.0, n * n * (1 + torch.exp(2 * b)))
    log_cosh = b + torch.log1p(torch.exp(-2 * b)) - math.log(2.0)
    t = logits - (wide + narrow) / 8 - log_scale.sum(-1) + log_cosh
    return t.nan_to_num(-math.inf, posinf=math.inf, neginf=-math.inf)


def _unresolved_mixture(value, logits, loc, scale, atanh_rho=None, *, dtype):
    """Rows of a mixture in ``dtype`` whose responsibilities its working precision cannot
    resolve (``_UNRESOLVED``)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.finfo(work).eps
    form = "scale_tril" if scale.dim() == 4 else "log_scale"
    with torch.no_grad():
        log_w = logits.log_softmax(-1).nan_to_num(-math.inf)
        t = _mixture_terms(value, log_w, loc, **{form: scale}, atanh_rho=atanh_rho)
        top, idx = t.topk(2, dim=-1)
        t1, t2 = top[..., 0], top[..., 1]
        # T_k = log w_k + log N_k carries an absolute error up to ~4 eps (|log w_k| +
        # |log N_k|) (a few roundings of each part); the two leading responsibilities are
        # unresolved where that exceeds 1 and their gap is below it plus 104 (beyond, the
        # loser's e^{-gap} is 0 in any case)
        parts = log_w.abs().gather(-1, idx) + (top - log_w.gather(-1, idx)).abs()
        err = 4 * eps * parts.nan_to_num(math.inf).amax(-1)
        rows = t1.isfinite() & t2.isfinite() & (err > 1) & (t1 - t2 < err + 104)
        if atanh_rho is not None:
            rows |= _bivariate_residual_unresolved(value, log_w, loc, scale, atanh_rho, t, work)
    return rows


def _bivariate_residual_unresolved(value, log_w, loc, log_scale, atanh_rho, t, work):
    """Rows where a bivariate component's term, computed from residuals rounded to ``work``,
    can exceed its exact value by more than 1 and reach the exact leading term (or the
    working range's end) minus 104: its responsibility, or its own gradient as the leading
    component, is not resolved.

    With ``b = |a|``, ``s = sign a`` and the eigen-coordinates ``w = z1 + s z2``,
    ``n = z1 - s z2``: ``Q = (w^2 (1 + e^{-2b}) + n^2 (1 + e^{2b})) / 4``. The residuals and
    their scaling carry a relative error of a few ``eps`` (4 allowed) and may underflow
    (``2 tiny`` allowed), so ``n`` may come out anywhere within ``4 eps (|z1| + |z2|) + 2 tiny``
    of itself, and ``e^{2b}`` amplifies that: at
    ``a = -65504``, target ``(0.000488, 0)``, mean ``(-65504, 65504)`` in float32, ``n =
    0.000488`` rounds to 0 and a term of ``-inf`` comes out ``-2.1e9``, the only finite one
    of its row (the exact leading term, ``-4e76``, is ``-inf`` in float32), and it takes the
    whole responsibility; at ``a = 744.5``, ``z1 = 1.7e-306`` underflows float32 and a
    leading term of ``-1.4e34`` comes out 34. The largest term the rounding allows is
    ``T^+`` (``|n|`` and ``|w|`` shrunk by that error, ``0 e^{2b} = 0``).
    """
    finfo = torch.finfo(work)
    r = value.unsqueeze(-2) - loc
    z = torch.where(r == 0, 0.0, r * torch.exp(-log_scale))
    z1, z2 = z[..., 0], z[..., 1]
    delta = 4 * finfo.eps * (z1.abs() + z2.abs()) + 2 * finfo.tiny  # rounding + underflow
    t_plus = _bivariate_terms(z, log_w, log_scale, atanh_rho, shrink=delta)
    sign = torch.where(atanh_rho < 0, -1.0, 1.0)
    big = finfo.max
    lead = t.amax(-1, keepdim=True).clamp(min=-big)
    beyond = ~(t >= -big)  # the exact term is -inf in the working precision
    underflowed = (z1 - sign * z2).abs() < 2 * finfo.tiny
    # a z beyond the working range makes the computed term -inf as well
    representable = (z1.abs() <= big) & (z2.abs() <= big)
    loose = representable & ((beyond & (t_plus >= -big)) | (underflowed & (t_plus > t + 1)))
    return (loose & (t_plus >= lead - 104)).any(-1)


_UNRESOLVED = (
    "responsibilities are softmax(T_k) of terms T_k = logit_k + log N_k(x) computed in the "
    "working precision (float32 for half and float32 inputs, float64 for float64): where the "
    "two leading terms carry an absolute error 4 eps |T_k| > 1 and lie within it (+104) of "
    "each other, a backward-stable evaluation cannot resolve them, and a gradient weighted "
    "by a wrong responsibility can overflow the gradient's dtype. An ill-conditioned region "
    "(one ulp of an input moves T_k by more than 1); the predicate is this rigorous bound, "
    "wider than the rows that fail. Open under issue 10: exact responsibilities need T_k "
    "to absolute accuracy (compensated or float64 sums). For bivariate components the "
    "residuals' rounding is amplified by e^{2|a|} along the correlation line: rows where it "
    "lets a losing term reach the leading one (or the working range's end) are included"
)


def _dense_backward_overflows(value, loc, scale_tril, *, dtype):
    # The gradients come from L^{-T} z (z = L^{-1}(x - mu)): where that solve overflows
    # float64 at finite inputs (a subnormal or smallest-normal diagonal entry), the back
    # substitution forms 0 * inf = NaN in entries whose exact gradient is finite, and
    # d/dL_ii = x_i z_i - 1/L_ii is inf - inf where 1/L_ii overflows too
    with torch.no_grad():
        tril = scale_tril.tril()
        z = torch.linalg.solve_triangular(tril, (value - loc).unsqueeze(-1), upper=False)
        x = torch.linalg.solve_triangular(tril.mT, z, upper=True).squeeze(-1)
        finite = value.isfinite().all(-1) & loc.isfinite().all(-1) & z.isfinite().all(-2).all(-1)
        small = (scale_tril.diagonal(dim1=-2, dim2=-1) < 1 / torch.finfo(_F64).max).any(-1)
        log_p = F.multivariate_normal_log_prob(value, loc, scale_tril, validate_args=False)
    return (finite & ~x.isfinite().all(-1)) | (small & (log_p == -math.inf))


def _lowrank_beyond_sqrt_range(value, loc, cov_factor, log_diag, *, dtype):
    # |log p| beyond sqrt(finfo(float64).max): the gradients, products of two whitened
    # quantities of that size, overflow inside the QR's backward (inf - inf)
    with torch.no_grad():
        log_p = F.lowrank_multivariate_normal_log_prob(
            value, loc, cov_factor, log_diag, validate_args=False
        )
    finite = value.isfinite().all(-1) & loc.isfinite().all(-1)
    return finite & ~(log_p > -math.sqrt(torch.finfo(_F64).max))


def _lowrank_subnormal_pivot(value, loc, cov_factor, log_diag, *, dtype):
    # Events on the per-coordinate scaled path (probloss.functional._lowrank_scaled) whose
    # triangular factor C of M = V V^T + E has a subnormal (nonzero) pivot: Sigma's
    # condition number is beyond 1/tiny, and the QR's backward divides by that pivot
    # (inf - inf = NaN) although the gradients are finite (W = (-1.8e308, -1.8e308), l =
    # (-8.4e22, -0.018) in float64: d/dlog_diag_2 = -0.49)
    from probloss.functional.lowrank import _needs_scaling

    with torch.no_grad():
        scaled = _needs_scaling(cov_factor, log_diag)
        row = cov_factor.abs().amax(-1)
        c = torch.maximum(0.5 * log_diag, torch.log(row))
        v = cov_factor * torch.exp(-c).unsqueeze(-1)
        e_half = torch.exp(0.5 * log_diag - c)
        b_t = torch.cat([v.mT, torch.diag_embed(e_half)], dim=-2)
        pivots = torch.linalg.qr(b_t)[1].diagonal(dim1=-2, dim2=-1).abs()
        tiny = torch.finfo(_F64).tiny
        finite = value.isfinite().all(-1) & loc.isfinite().all(-1) & pivots.isfinite().all(-1)
    return finite & scaled & (pivots > 0).all(-1) & (pivots < tiny).any(-1)


_LOWRANK_PIVOT = (
    "Sigma's condition number beyond 1/finfo(float64).tiny on the scaled path (a subnormal "
    "pivot of the scaled factor C): the value is right, but autograd through the QR divides "
    "by that pivot (inf - inf = NaN); closed-form gradients in scaled coordinates, "
    "-Sigma^{-1} r and (u u^T - Sigma^{-1}) W, would close it"
)


_LOWRANK = (
    "log p below -sqrt(finfo(float64).max) (a whitened quadratic form beyond 1.3e154): the "
    "value is right, but the gradients are formed by autograd through a QR whose backward "
    "multiplies quantities of that size (inf - inf = NaN); a hand-written backward from the "
    "closed forms -Sigma^{-1} r, (u u^T - Sigma^{-1}) W in scaled coordinates would close it"
)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MIXTURE = (KnownLimit(_UNRESOLVED, _unresolved_mixture, _FLOATS),)


def _kl_overflows(loc_q, log_scale_q, atanh_rho_q, loc_p, log_scale_p, atanh_rho_p, *, dtype):
    """Rows whose bivariate KL (float64 path, checked against mpmath by the oracle test)
    exceeds ``finfo.max`` of the compute dtype."""
    kl = F.bivariate_normal_kl(
        loc_q, log_scale_q, atanh_rho_q.squeeze(-1), loc_p, log_scale_p, atanh_rho_p.squeeze(-1)
    )
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return ~(kl <= torch.finfo(compute).max)


_KL = (
    KnownLimit(
        "bivariate_normal_kl's gradients where the KL itself exceeds finfo.max of the compute "
        "dtype (the value is inf, the loss unusable): the closed-form derivatives are sums "
        "of terms of the KL's size, which overflow there and meet inf - inf or 0 * inf "
        "(NaN). Some entries are finite mathematically (d/datanh_rho_q = rho_q - rho_p "
        "e^{d1 + d2 - 2 (log cosh a_q - log cosh a_p)} is formed so; d/dloc where "
        "e^{-log_scale_p} stays in range) but not all are formed in sign / log form",
        _kl_overflows,
        _FLOATS,
        issue="11",
    ),
)


def _weighted_scale_beyond_float64(value, logits, loc, log_scale, *, dtype):
    """Rows with a component whose ``w_k sigma_k`` exceeds float64's range."""
    log_w = torch.log_softmax(logits, -1).unsqueeze(-1)
    return ((log_w + log_scale) > math.log(torch.finfo(torch.float64).max)).flatten(1).any(-1)


KNOWN_LIMITS: dict[str, tuple[KnownLimit, ...]] = {
    "metrics.crps_normal_mixture": (
        KnownLimit(
            "a component whose w_k sigma_k is beyond float64's range (a weight e^-300568 on a "
            "scale e^366000) while w_k^2 sigma_k is not: the Grimit form's target and cross "
            "terms, each of size w_k sigma_k, cancel to O(w_k^2 sigma_k) but overflow first, "
            "and the score comes out inf where it is finite; combining each component's "
            "target term with its cross terms analytically would close it",
            _weighted_scale_beyond_float64,
            _FLOATS,
            value=True,
            issue="13",
        ),
    ),
    "functional.multivariate_normal_log_prob": (
        KnownLimit(
            "the solve L^{-T} z of the gradients overflows float64 at finite inputs (a "
            "subnormal or smallest-normal diagonal entry): 0 * inf in the back substitution "
            "(NaN where the exact gradient is finite), and inf - inf in d/dL_ii where 1/L_ii "
            "overflows too; a hand-written backward with scaled solves would close it",
            _dense_backward_overflows,
            (torch.float64,),
        ),
    ),
    "functional.multivariate_normal_mixture_log_prob": _MIXTURE,
    "functional.bivariate_normal_kl": _KL,
    "distributions.MultivariateNormalMixture.log_prob": _MIXTURE,
    "functional.bivariate_normal_mixture_log_prob": _MIXTURE,
    "functional.bivariate_normal_mixture_nll": _MIXTURE,
    "distributions.BivariateNormalMixture.log_prob": _MIXTURE,
    # the offsets mixture's limit (the pen logits add a finite log_softmax term)
    "distributions.StrokeMixture.log_prob": (
        KnownLimit(
            _UNRESOLVED,
            lambda x, lg, loc, ls, a, pen, *, dtype: _unresolved_mixture(
                x, lg, loc, ls, a, dtype=dtype
            ),
            _FLOATS,
        ),
    ),
    "functional.normal_mixture_log_prob": _MIXTURE,
    "functional.normal_mixture_nll": _MIXTURE,
    "distributions.NormalMixture.log_prob": _MIXTURE,
    "functional.lowrank_multivariate_normal_log_prob": (
        KnownLimit(_LOWRANK, _lowrank_beyond_sqrt_range, _FLOATS),
        KnownLimit(
            _LOWRANK_PIVOT,
            _lowrank_subnormal_pivot,
            (torch.float64,),
            example=(
                [0.11490638529234924, -6.103515625e-05],
                [8.452356980378831e-11, -1.3198125469627653],
                [[-1.7976931348623157e308], [-1.7976931348623157e308]],
                [-8.388846400297015e22, -0.018029646100079098],
            ),
        ),
    ),
}
