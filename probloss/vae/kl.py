r"""KL terms of a VAE: analytic Gaussian KL per latent dimension, and Monte-Carlo KL.

The KL term :math:`\mathrm{KL}(q(z \mid x) \,\|\, p(z))` is available per latent dimension
whenever both distributions factorise over the dimensions, which is what diagnostics (KL per
dimension, active units) and per-dimension strategies (free bits, Kingma et al. 2016,
arXiv:1606.04934) need; the per-example KL is the sum over the latent dimensions.

Dtypes: float16 / bfloat16 inputs are computed and returned in float32: ``log_var = 30``
gives a KL of ``5.3e12``, a fine float32 and an overflow in float16.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Distribution

from .._core.dtype import compute_dtype, loss_tensors
from .._core.shapes import broadcast_shapes
from ..functional import normal_kl
from .reconstruction import resolve_event_dims, sum_trailing


def gaussian_kl_per_dim(
    loc: Tensor,
    log_var: Tensor,
    *,
    prior_loc: Tensor | float | None = None,
    prior_log_var: Tensor | float | None = None,
) -> Tensor:
    r"""``KL(N(loc, exp(log_var)) || N(prior_loc, exp(prior_log_var)))``, one value per dimension.

    .. math::
        \mathrm{KL}_j = \tfrac12\Big(\operatorname{expm1mx}(d_j)
            + \frac{(\mu_j - \mu_{p,j})^2}{\sigma_{p,j}^2}\Big),
        \qquad d_j = \log\sigma_j^2 - \log\sigma_{p,j}^2,

    :func:`~probloss.functional.normal_kl` (with :math:`\operatorname{expm1mx}(d) = e^d - 1 -
    d`): never negative, exactly 0 with zero gradient at ``q == p``, accurate near it, and
    without overflow wherever the KL is finite. The prior defaults to the standard normal,
    where it is :math:`\tfrac12(\mu^2 + e^{v} - 1 - v)` (Kingma & Welling 2013,
    arXiv:1312.6114, appendix B).

    Args:
        loc: posterior means :math:`\mu`, shape ``(*, L)``.
        log_var: posterior log-variances :math:`\log\sigma^2`, broadcastable with ``loc``.
        prior_loc: prior means, broadcastable (default 0).
        prior_log_var: prior log-variances, broadcastable (default 0).

    Returns:
        Tensor of the broadcast shape, e.g. ``(B, L)``; float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast.
        TypeError: a non-floating tensor.

    Example:
        >>> loc = torch.tensor([[0.0, 1.0, 0.0]])
        >>> gaussian_kl_per_dim(loc, torch.tensor([[0.0, 0.0, -30.0]]))
        tensor([[ 0.0000,  0.5000, 14.5000]])
    """
    given = {"loc": loc, "log_var": log_var, "prior_loc": prior_loc, "prior_log_var": prior_log_var}
    t = loss_tensors(**given)
    broadcast_shapes(**t)  # here, to name these arguments in the error
    return normal_kl(t["loc"], t["log_var"], t.get("prior_loc"), t.get("prior_log_var"))


def gaussian_kl(
    loc: Tensor,
    log_var: Tensor,
    *,
    prior_loc: Tensor | float | None = None,
    prior_log_var: Tensor | float | None = None,
    latent_dims: int = 1,
) -> Tensor:
    r"""Gaussian KL summed over the trailing ``latent_dims`` dimensions (one value per example).

    .. math::
        \mathrm{KL}(q \,\|\, p) = \sum_{j \in \text{latent}} \mathrm{KL}_j

    with :math:`\mathrm{KL}_j` from :func:`gaussian_kl_per_dim` (diagonal Gaussians).

    Args:
        loc, log_var, prior_loc, prior_log_var: as in :func:`gaussian_kl_per_dim`.
        latent_dims: number of trailing dimensions that form the latent vector (default 1,
            ``(*, L) -> (*)``); 0 returns the per-dimension values.

    Returns:
        Tensor of the broadcast shape without its last ``latent_dims`` dimensions;
        float32 for half-precision inputs.

    Raises:
        ValueError: shapes do not broadcast, or ``latent_dims`` is out of range.
        TypeError: a non-floating tensor or a non-int ``latent_dims``.

    Example:
        >>> gaussian_kl(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.zeros(2, 2))
        tensor([0.5000, 2.0000])
    """
    kl = gaussian_kl_per_dim(loc, log_var, prior_loc=prior_loc, prior_log_var=prior_log_var)
    return sum_trailing(kl, resolve_event_dims(latent_dims, kl.dim(), "latent_dims"))


def _log_ratio_samples(
    q: Distribution, p: Distribution, num_samples: int, sample: Tensor | None
) -> Tensor:
    """``log q(z) - log p(z)`` for each sample ``z``, shape ``(S, *batch)``."""
    for name, d in (("q", q), ("p", p)):
        if not isinstance(d, Distribution):
            raise TypeError(f"{name} must be a torch.distributions.Distribution, got {type(d)}")
    if q.event_shape != p.event_shape:
        raise ValueError(
            f"q and p must have the same event_shape, got {tuple(q.event_shape)} and "
            f"{tuple(p.event_shape)}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    shape = (*q.batch_shape, *q.event_shape)
    if sample is None:
        draw = q.rsample if q.has_rsample else q.sample
        z = draw((num_samples,))
    else:
        if not isinstance(sample, Tensor):
            raise TypeError(f"sample must be a tensor, got {type(sample).__name__}")
        if tuple(sample.shape) == shape:
            z = sample.unsqueeze(0)
        elif sample.dim() == len(shape) + 1 and tuple(sample.shape[1:]) == shape:
            z = sample
        else:
            raise ValueError(
                f"sample of shape {tuple(sample.shape)} must have shape (num_samples, *{shape}) "
                f"or {shape} (q's batch_shape + event_shape)"
            )
        if num_samples not in (1, z.shape[0]):
            raise ValueError(
                f"num_samples={num_samples} disagrees with sample of shape {tuple(sample.shape)}"
            )
    if z.is_floating_point():
        z = z.to(compute_dtype(z.dtype))  # half samples: evaluate log densities in float32
    log_ratio = q.log_prob(z) - p.log_prob(z)
    if log_ratio.is_floating_point():
        log_ratio = log_ratio.to(compute_dtype(log_ratio.dtype))
    return log_ratio


def monte_carlo_kl(
    q: Distribution,
    p: Distribution,
    *,
    num_samples: int = 1,
    sample: Tensor | None = None,
    latent_dims: int | None = None,
) -> Tensor:
    r"""Monte-Carlo estimate of ``KL(q || p)`` for any pair of torch distributions.

    .. math::
        \widehat{\mathrm{KL}} = \frac1S \sum_{s=1}^S \log q(z_s) - \log p(z_s),
        \qquad z_s \sim q

    unbiased, for pairs without a closed form (a flow posterior, a mixture prior). The
    samples come from ``q.rsample`` when ``q.has_rsample`` (reparameterised: the estimate
    is differentiable in ``q``'s parameters through ``z``), else from ``q.sample``: then
    ``z`` is a constant and the gradient in ``q``'s parameters comes only through
    ``log q(z)``; the score-function term is *not* included. Pass ``sample`` to reuse the
    ``z`` that fed the decoder (the usual single-sample ELBO estimate).

    The per-example KL sums ``log q(z) - log p(z)`` over the latent dimensions:
    distributions with a vector event (``Independent(Normal(...), 1)``) already do so in
    ``log_prob``; elementwise ones (``Normal`` of shape ``(*, L)``) need the last batch
    dimension summed. ``latent_dims`` says how many trailing dimensions of
    ``log_prob``'s shape to sum; by default 0 if ``q`` has a non-scalar event shape, else
    1. For the KL per latent dimension see :func:`monte_carlo_kl_per_dim`.

    Args:
        q: the posterior :math:`q(z \mid x)`, batch shape ``(*)``.
        p: the prior, batch shape broadcastable with ``q``'s, the same event shape.
        num_samples: :math:`S`, samples drawn when ``sample`` is not given.
        sample: samples of ``q`` already drawn, shape ``(S, *batch, *event)`` or
            ``(*batch, *event)`` (one sample).
        latent_dims: trailing dimensions of ``log_prob``'s shape summed (see above).

    Returns:
        The mean over the samples, shape ``(*)`` without its last ``latent_dims``
        dimensions; float32 for half-precision distributions (whose ``log_prob`` decides
        the accuracy of the terms).

    Raises:
        TypeError: ``q`` or ``p`` is not a ``Distribution``, or ``sample`` not a tensor.
        ValueError: different event shapes, a bad ``num_samples``, a ``sample`` of the
            wrong shape, or ``latent_dims`` out of range.

    Example:
        >>> from torch.distributions import Normal
        >>> q = Normal(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
        >>> z = torch.tensor([[0.5, 1.5]])
        >>> monte_carlo_kl(q, Normal(0.0, 1.0), sample=z)  # 0 + (1.5^2 - 0.5^2) / 2
        tensor([1.0000])
    """
    log_ratio = _log_ratio_samples(q, p, num_samples, sample).mean(dim=0)
    default = 0 if len(q.event_shape) else 1
    dims = default if latent_dims is None else latent_dims
    return sum_trailing(log_ratio, resolve_event_dims(dims, log_ratio.dim(), "latent_dims"))


def monte_carlo_kl_per_dim(
    q: Distribution,
    p: Distribution,
    *,
    num_samples: int = 1,
    sample: Tensor | None = None,
) -> Tensor:
    r"""Monte-Carlo ``KL(q || p)`` per latent dimension, for elementwise distributions.

    .. math::
        \widehat{\mathrm{KL}}_j = \frac1S \sum_{s=1}^S \log q_j(z_{s,j}) - \log p_j(z_{s,j})

    The KL splits into per-dimension terms only when both distributions factorise over the
    dimensions; this needs ``log_prob`` to return one value per dimension, i.e. scalar
    event shapes (``Normal`` of shape ``(*, L)``, not ``Independent(Normal, 1)``, whose
    ``log_prob`` has already summed them). Sampling as in :func:`monte_carlo_kl`; the sum
    over the last dimension is ``monte_carlo_kl(q, p, latent_dims=1)`` with the same ``z``.

    Args:
        q: elementwise posterior, batch shape ``(*, L)``, event shape ``()``.
        p: elementwise prior, batch shape broadcastable with ``q``'s, event shape ``()``.
        num_samples: samples drawn when ``sample`` is not given.
        sample: samples of ``q``, shape ``(S, *, L)`` or ``(*, L)``.

    Returns:
        Tensor of shape ``(*, L)`` (the broadcast batch shape); float32 for half precision.

    Raises:
        ValueError: a non-scalar event shape, or as :func:`monte_carlo_kl`.
        TypeError: as :func:`monte_carlo_kl`.

    Example:
        >>> from torch.distributions import Normal
        >>> q = Normal(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
        >>> monte_carlo_kl_per_dim(q, Normal(0.0, 1.0), sample=torch.tensor([[0.5, 1.5]]))
        tensor([[0.0000, 1.0000]])
    """
    for name, d in (("q", q), ("p", p)):
        if isinstance(d, Distribution) and len(d.event_shape):
            raise ValueError(
                f"per-dimension KL needs elementwise log_prob (event_shape ()), got {name} "
                f"with event_shape {tuple(d.event_shape)}; pass the base distribution, e.g. "
                "Normal rather than Independent(Normal, 1)"
            )
    return _log_ratio_samples(q, p, num_samples, sample).mean(dim=0)
