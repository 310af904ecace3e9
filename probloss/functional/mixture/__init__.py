r"""Gaussian mixtures for mixture density networks: log densities, losses, samples, moments.

A mixture density network (Bishop 1994) predicts, per input, mixture ``logits``
:math:`\ell_k` and the parameters of :math:`K` components; its loss is the negative log of

.. math::
    p(x) = \sum_{k=1}^K \pi_k\, p_k(x), \qquad \pi = \operatorname{softmax}(\ell).

The tutorial form multiplies per-dimension densities and takes the log of the weighted sum:
as soon as a target is 14.4 scales from every mean in float32 (38.6 in float64; one
dimension, unit scales), every :math:`p_k(x)` underflows to 0 and the loss is ``inf``
(its gradient NaN). Here everything stays in log space:

.. math::
    \log p(x) = \operatorname{logsumexp}_k\big(\log\operatorname{softmax}(\ell)_k
        + \log p_k(x)\big),

finite wherever one term is (residuals of ``1e6`` scales give ``-5e11``, not ``-inf``), and
its gradients are the *responsibilities* (posterior component weights)
:math:`r_k = \pi_k p_k(x) / p(x)`, the softmax of the joint terms:

.. math::
    \frac{\partial \log p}{\partial \log p_k} = r_k, \qquad
    \frac{\partial \log p}{\partial \ell_k} = r_k - \pi_k .

``torch.logsumexp`` back-propagates ``exp(x - result)``, which is ``exp(-inf + inf) = NaN``
when every term of a row is ``-inf`` (a target no component can produce, e.g. beyond the
float range, or zero-weight components only). Here such a row has value ``-inf`` and
gradient exactly 0 (:func:`~probloss.special.logsumexp`), and zero-weight components (``-inf``
logits) or components with ``-inf`` log density get responsibility 0 without NaN.

Functions (value first, one value per event, unreduced; batch dimensions broadcast like
torch, every target against every mixture if the shapes say so):

* :func:`mixture_log_prob`: any mixture, from component log densities ``(*, K)``;
* :func:`normal_mixture_log_prob`: diagonal Gaussian components (Bishop 1994);
* :func:`bivariate_normal_mixture_log_prob`: correlated bivariate Gaussians, the offset
  likelihood of handwriting and sketch models (Graves 2013, arXiv:1308.0850, eqs. 23-26;
  Ha & Eck 2017, sketch-rnn, arXiv:1704.03477);
* :func:`multivariate_normal_mixture_log_prob`: full covariances from ``scale_tril``;
* :func:`normal_mixture_nll`, :func:`bivariate_normal_mixture_nll`: the reduced losses,
  with NaN-target masking; reduced, they refuse a parameter that would enlarge the
  targets' batch shape (``out[:, 4:5]`` for ``out[:, 4]``), a silently wrong average.

A batch of no events gives an empty result (and an empty gradient) everywhere.

Weights: the Gaussian mixtures take ``logits``, the unconstrained output of a network.
Weights known as probabilities, possibly with exact zeros, go to :func:`mixture_log_prob`
as ``probs=`` (with component log densities from e.g.
:func:`~probloss.functional.normal.normal_log_prob`), whose gradient stays finite at a
zero weight; ``log(probs)`` passed as logits would give ``0 * inf = NaN`` there.

Dtypes: float16 / bfloat16 inputs are computed and returned in float32 (docs/numerics.md,
half precision); float32 and float64 stay as they are.

Modules (one idea each):

* :mod:`.general`: :func:`mixture_log_prob` over any component log densities;
* :mod:`.diagonal`, :mod:`.bivariate`, :mod:`.multivariate`: the Gaussian mixtures and NLLs;
* :mod:`._fused`: the fused kernels' machinery (hand-written backwards, where they run);
* :mod:`.sampling`: draws at a temperature, and the most-probable-component modes;
* :mod:`.moments`: means, variances, covariances (:mod:`._weights`, :mod:`._second_moments`);
* :mod:`._inputs`: shape checks and NaN targets.
"""

from .bivariate import bivariate_normal_mixture_log_prob, bivariate_normal_mixture_nll
from .diagonal import normal_mixture_log_prob, normal_mixture_nll
from .general import mixture_log_prob
from .moments import (
    bivariate_normal_mixture_covariance,
    bivariate_normal_mixture_mean,
    normal_mixture_mean,
    normal_mixture_variance,
)
from .multivariate import multivariate_normal_mixture_log_prob
from .sampling import (
    bivariate_normal_mixture_mode,
    bivariate_normal_mixture_sample,
    normal_mixture_mode,
    normal_mixture_sample,
)

__all__ = [
    "bivariate_normal_mixture_covariance",
    "bivariate_normal_mixture_log_prob",
    "bivariate_normal_mixture_mean",
    "bivariate_normal_mixture_mode",
    "bivariate_normal_mixture_nll",
    "bivariate_normal_mixture_sample",
    "mixture_log_prob",
    "multivariate_normal_mixture_log_prob",
    "normal_mixture_log_prob",
    "normal_mixture_mean",
    "normal_mixture_mode",
    "normal_mixture_nll",
    "normal_mixture_sample",
    "normal_mixture_variance",
]
