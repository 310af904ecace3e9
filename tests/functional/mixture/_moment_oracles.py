"""References and checks of the mixture sampling and summary tests (``test_sampling*.py``,
``test_moments.py``, ``test_second_moments.py``): sampling with temperature and the
summaries (mean, variance / covariance, most-probable-component mode).

Where the numbers come from
---------------------------
* Mixture weights at temperature ``tau``: ``softmax(logits / tau)`` in float64 numpy
  (:func:`_np_weights`), the sketch-rnn definition (Ha & Eck 2017, arXiv:1704.03477);
  component scales ``sigma sqrt(tau)``.
* Closed-form moments in float64 numpy (:func:`_np_moments`), written in the *raw-moment*
  form ``E[x x^T] - m m^T`` with ``E[x x^T] = sum_k pi_k (Sigma_k + mu_k mu_k^T)``, i.e.
  not the implementation's sum of centred terms; the variance of a sample variance /
  covariance from the fourth moments of the mixture (:func:`_np_fourth`, the Gaussian
  identity ``E[(d_i + Y_i)^2 (d_j + Y_j)^2] = d_i^2 d_j^2 + d_i^2 S_jj + d_j^2 S_ii +
  4 d_i d_j S_ij + S_ii S_jj + 2 S_ij^2`` for ``Y ~ N(0, S)``, summed over components).
* Most-probable-component mode and ``temperature=0``: ``loc[argmax(logits)]`` by numpy
  indexing.
* Summaries with weights below the float32 range: the centred sums in float64 numpy
  (:func:`_np_summaries`), where ``e^{-110}`` is a normal number; with a zero weight: the
  live component's own mean / variance / ``rho s1 s2`` (closed form, exact).
* Pathwise gradients: their closed forms for the drawn component (``dx/dloc = 1``,
  ``dx/dlog_scale = x - mu``, ``dx2/datanh_rho = s2 (z1 - rho z2)``), evaluated on the
  samples themselves in float64.

Statistical bounds (every draw is from a ``torch.Generator`` with a fixed seed, so each
test is deterministic; the bounds are what a correct sampler meets with overwhelming
probability for *any* seed):

* component frequency ``n_k / N``: within ``5 sqrt(p_k (1 - p_k) / N)`` (binomial SE);
* sample mean of a component / of the mixture: within ``5 s / sqrt(n)``;
* sample variance / covariance entry: within ``5 SE``, ``SE^2 = (S_ii S_jj + S_ij^2) / n``
  for a Gaussian component (``2 s^4 / n`` on the diagonal), ``(E[A_i^2 A_j^2] - C_ij^2) / N``
  for the whole mixture (``A = x - m``).

Where draws are attributed to components by the nearest mean, every midpoint between two
means is at least 10 standard deviations (at the test's temperature) from each, so a
misclassification has probability below 1e-23 per draw.
Measured worst ratios error / SE are printed by ``-s`` and listed in the docstrings.

Closed-form bounds: summaries 1e-12 relative (float64), 2e-6 relative in the float32
cancellation case (the naive ``E[x^2] - m^2`` is off by 100%); ``temperature=0`` and the
mode: exactly equal.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SIGMAS = 5.0  # statistical bounds are 5 standard errors


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_weights(logits, tau: float = 1.0) -> np.ndarray:
    """softmax(logits / tau) over the last axis, float64 numpy."""
    x = np.asarray(logits, dtype=np.float64) / tau
    x = x - x.max(-1, keepdims=True)
    w = np.exp(x)
    return w / w.sum(-1, keepdims=True)


def _np_cov(log_scale, atanh_rho=None) -> np.ndarray:
    """Component covariances ``(..., K, D, D)``: diagonal, or the 2x2 with rho = tanh a."""
    s = np.exp(np.asarray(log_scale, dtype=np.float64))
    cov = np.einsum("...i,ij->...ij", s**2, np.eye(s.shape[-1]))
    if atanh_rho is not None:
        off = np.tanh(np.asarray(atanh_rho, dtype=np.float64)) * s[..., 0] * s[..., 1]
        cov[..., 0, 1] = cov[..., 1, 0] = off
    return cov


def _np_moments(weights, loc, cov) -> tuple[np.ndarray, np.ndarray]:
    """Mixture mean and covariance, raw-moment form ``E[x x^T] - m m^T`` (float64)."""
    loc = np.asarray(loc, dtype=np.float64)
    mean = np.einsum("...k,...kd->...d", weights, loc)
    second = np.einsum("...k,...kij->...ij", weights, cov + loc[..., :, None] * loc[..., None, :])
    return mean, second - mean[..., :, None] * mean[..., None, :]


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest center (Euclidean) for every row of ``x`` (N, D)."""
    return np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)


def _random_params(seed: int, b: int = 64, k: int = 5, d: int = 2):
    g = _gen(seed)
    logits = torch.randn(b, k, generator=g)
    logits[0] = torch.tensor([1.0, 3.0, -2.0, 3.0, 0.0])  # a tie: the first maximum wins
    loc = 10 * torch.randn(b, k, d, generator=g)
    log_scale = torch.randn(b, k, d, generator=g)
    a = 3 * torch.randn(b, k, generator=g)
    return logits, loc, log_scale, a


INF = math.inf


def _assert_matches_mp(got: torch.Tensor, ref, dtype, what: str, exponents: float = 0.0):
    """``got`` (flattened) against ``[(exact, T)]``: +-inf with the exact sign beyond the
    range (``|exact| > max (1 + eps)``, so rounding cannot bring it back), else within
    ``(16 + E) eps T`` (module bound above; ``E``, where the float64 result is
    ``e^{x}`` of a sum of logarithms that cancel, is their total size: each carries a
    relative error of eps, so ``x`` is off by ``E eps``, ``e^{x}`` by ``E eps`` relative,
    which is also the condition number of the result in those inputs)."""
    from mpmath import mpf

    f = torch.finfo(dtype)
    got = got.detach().double().reshape(-1).tolist()
    assert len(got) == len(ref), what
    for i, (g, (x, size)) in enumerate(zip(got, ref, strict=True)):
        assert not math.isnan(g), f"{what}[{i}]: NaN, exact {x}"
        if abs(x) > mpf(f.max) * (1 + mpf(f.eps)):
            assert g == math.copysign(INF, x), f"{what}[{i}]: got {g!r}, exact {x} (beyond)"
        else:  # + tiny: a result below the normal range is rounded to a subnormal or 0
            bound = (16 + exponents) * f.eps * float(size) + f.tiny
            assert abs(g - float(x)) <= bound, f"{what}[{i}]: got {g!r}, exact {x}"
