r"""VAE diagnostics: active units, KL per latent dimension, rate and distortion.

These answer "is my VAE using its latent space?" and "how is the objective split?":

* :func:`active_units` counts latent dimensions whose posterior mean varies with the input
  (Burda et al. 2015, arXiv:1509.00519, section 5.2); a collapsed unit has
  :math:`q(z_u \mid x) \approx p(z_u)` for every ``x``.
* :func:`kl_per_dimension` averages a per-example, per-dimension KL (from
  :func:`~probloss.vae.kl.gaussian_kl_per_dim`) over the examples: a collapsed unit shows
  a KL near 0.
* :func:`rate_distortion` splits the negative ELBO into rate (KL) and distortion (negative
  reconstruction log-likelihood), Alemi et al. 2018, arXiv:1711.00464.

All values are in nats.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .._core.dtype import loss_tensors
from .._core.validation import check_not_nan, should_validate


class ActiveUnits(NamedTuple):
    """Result of :func:`active_units`: ``count`` active units of the ``mask``, and the
    per-unit ``variance`` of the posterior means (unbiased sample variance)."""

    count: int
    mask: Tensor
    variance: Tensor


class RateDistortion(NamedTuple):
    """Result of :func:`rate_distortion`, in nats per example: ``rate`` (mean KL),
    ``distortion`` (mean negative reconstruction log-likelihood) and
    ``elbo = -(rate + distortion)``."""

    rate: float
    distortion: float
    elbo: float


def active_units(
    posterior_loc: Tensor, *, threshold: float = 1e-2, validate_args: bool | None = None
) -> ActiveUnits:
    r"""Latent units whose posterior mean varies across the data (Burda et al. 2015).

    .. math::
        A_u = \operatorname{Cov}_x\big(\mathbb{E}_{q(z \mid x)}[z_u]\big) > \delta

    Unit ``u`` is active when the variance over the dataset of its posterior mean exceeds
    the threshold :math:`\delta` (``1e-2`` in arXiv:1509.00519, section 5.2). The variance
    is the unbiased sample variance (divisor :math:`N - 1`) over the ``N`` rows, the
    sample covariance the paper uses.

    Args:
        posterior_loc: posterior means :math:`\mathbb{E}_{q(z \mid x_n)}[z]` over a dataset,
            shape ``(N, L)``, ``N >= 2``.
        threshold: :math:`\delta \ge 0`; a unit is active if its variance is strictly above.
        validate_args: check ``posterior_loc`` has no NaN; ``None`` checks CPU tensors only.

    Returns:
        :class:`ActiveUnits` with ``count`` (int), ``mask`` (bool, shape ``(L,)``) and
        ``variance`` (shape ``(L,)``, float32 for half-precision inputs).

    Raises:
        ValueError: ``posterior_loc`` is not 2-D with at least 2 rows, contains NaN (when
            validating), or ``threshold`` is negative or NaN.
        TypeError: a non-floating ``posterior_loc``.

    Example:
        >>> means = torch.tensor([[0.0, 1.0, 5.0], [0.0, -1.0, 5.01], [0.0, 0.0, 4.99]])
        >>> result = active_units(means)
        >>> result.count, result.mask
        (1, tensor([False,  True, False]))
    """
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    loc = loss_tensors(posterior_loc=posterior_loc)["posterior_loc"]
    if loc.dim() != 2 or loc.shape[0] < 2:
        raise ValueError(
            f"posterior_loc must have shape (N, L) with N >= 2, got {tuple(loc.shape)}"
        )
    if should_validate(validate_args, loc):
        check_not_nan(loc, "posterior_loc")
    variance = loc.var(dim=0, correction=1)
    mask = variance > threshold
    return ActiveUnits(count=int(mask.sum()), mask=mask, variance=variance)


def kl_per_dimension(kl_per_dim: Tensor) -> Tensor:
    r"""Average KL of each latent dimension over the examples.

    .. math::
        \overline{\mathrm{KL}}_j = \frac1N \sum_{n=1}^N \mathrm{KL}_{n, j}

    where ``n`` runs over all leading dimensions of ``kl_per_dim`` (a batch, or samples and
    a batch). Dimensions with an average near 0 carry no information about ``x`` (posterior
    collapse); the values add up to the mean per-example KL, the rate.

    Args:
        kl_per_dim: per-example, per-dimension KL, shape ``(*, L)``, e.g. from
            :func:`~probloss.vae.kl.gaussian_kl_per_dim`.

    Returns:
        Tensor of shape ``(L,)``; float32 for half-precision inputs. With no leading
        dimension it is the input; with an empty leading shape it is NaN (a mean of
        nothing).

    Raises:
        ValueError: ``kl_per_dim`` is 0-dimensional.
        TypeError: a non-floating tensor.

    Example:
        >>> kl_per_dimension(torch.tensor([[0.0, 1.0], [0.0, 3.0]]))
        tensor([0., 2.])
    """
    kl = loss_tensors(kl_per_dim=kl_per_dim)["kl_per_dim"]
    if kl.dim() == 0:
        raise ValueError("kl_per_dim must have shape (*, L), got a 0-dimensional tensor")
    return kl.reshape(-1, kl.shape[-1]).mean(dim=0)


def rate_distortion(reconstruction_log_likelihood: Tensor, kl: Tensor) -> RateDistortion:
    r"""Rate, distortion and ELBO in nats per example (Alemi et al. 2018).

    .. math::
        R = \frac1N \sum_n \mathrm{KL}\big(q(z \mid x_n) \,\|\, p(z)\big), \qquad
        D = -\frac1N \sum_n \mathbb{E}_q \log p(x_n \mid z), \qquad
        \mathrm{ELBO} = -(R + D)

    ("Fixing a Broken ELBO", arXiv:1711.00464): for a given ELBO, high rate with low
    distortion is a VAE using its latents; rate near 0 is posterior collapse. The means are
    taken in float64 and returned as Python floats (reading them synchronises a GPU: a
    diagnostic, not for the training step).

    Args:
        reconstruction_log_likelihood: :math:`\log p(x_n \mid z_n)` per example, shape
            ``(N,)``, e.g. from :func:`~probloss.vae.reconstruction.gaussian_log_likelihood`.
        kl: KL per example, shape ``(N,)``, e.g. from :func:`~probloss.vae.kl.gaussian_kl`.

    Returns:
        :class:`RateDistortion` ``(rate, distortion, elbo)``.

    Raises:
        ValueError: the inputs are not 1-D of the same non-zero length.
        TypeError: a non-floating tensor.

    Example:
        >>> rate_distortion(torch.tensor([-100.0, -80.0]), torch.tensor([10.0, 14.0]))
        RateDistortion(rate=12.0, distortion=90.0, elbo=-102.0)
    """
    t = loss_tensors(reconstruction_log_likelihood=reconstruction_log_likelihood, kl=kl)
    shapes = {name: tuple(v.shape) for name, v in t.items()}
    if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(f"expected two 1-D tensors of the same shape (N,), got {listed}")
    if shapes["kl"][0] == 0:
        raise ValueError("reconstruction_log_likelihood and kl are empty (N = 0)")
    rate = float(t["kl"].double().mean())
    distortion = float(-t["reconstruction_log_likelihood"].double().mean())
    return RateDistortion(rate=rate, distortion=distortion, elbo=-(rate + distortion))
