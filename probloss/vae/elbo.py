r"""The evidence lower bound with an explicit reduction, explicit KL weighting and units.

For examples :math:`x_1, \dots, x_B` with reconstruction log-likelihoods
:math:`r_b = \mathbb{E}_q \log p(x_b \mid z)` (summed over the data's :math:`D` dimensions)
and KL terms :math:`k_{bd} = \mathrm{KL}(q(z_d \mid x_b) \,\|\, p(z_d))` per latent
dimension :math:`d = 1..L`,

.. math::
    \mathrm{ELBO}(x_b) = r_b - \sum_{d=1}^{L} k_{bd} \;\le\; \log p(x_b)

(Kingma & Welling 2013, arXiv:1312.6114, eq. 3). The inputs are plain tensors (from
:mod:`probloss.vae.reconstruction` and :mod:`probloss.vae.kl`, or from any other code):
``recon_log_prob`` of shape ``(B,)`` and ``kl_per_dim`` of shape ``(B, L)``.

Units: everything is in nats. The negative ELBO per example is also reported in bits per
data dimension, :math:`-\mathrm{ELBO} / (D \ln 2)`, the unit of image-model papers
(comparable to them only for a discrete likelihood over the 256 pixel levels, or a
continuous one with the usual dequantisation correction).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from torch import Tensor, nn

from .._core.constants import LOG_2
from .._core.dtype import loss_tensors
from .._core.reduction import check_reduction
from .schedules import _check_weight
from .weighting import Beta, WeightedLoss, Weighting, _beta_loss

_REDUCTIONS = ("mean", "sum")


class ELBOResult(NamedTuple):
    """What :func:`elbo` and :class:`ELBO` return.

    Attributes:
        loss: the scalar to minimise, as the weighting returned it (``"sum"``: times ``B``).
        reconstruction: reconstruction log-likelihood reduced over examples, nats, scalar.
        kl: the plain KL term reduced over examples (no weighting or floor), nats, scalar.
        kl_per_dim: the KL of each latent dimension reduced over examples, shape ``(L,)``.
        beta: the KL weight in force (see :class:`~probloss.vae.weighting.WeightedLoss`).
        nats: the negative ELBO per example (mean over examples, whatever the reduction
            or weighting: the true bound), a detached scalar.
        bits_per_dim: ``nats / (data_dims * ln 2)``, a detached scalar.
    """

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    kl_per_dim: Tensor
    beta: float | Tensor
    nats: Tensor
    bits_per_dim: Tensor


def _check_settings(data_dims: int, reduction: str) -> None:
    """``data_dims`` an integer >= 1, ``reduction`` one of ``"mean"``, ``"sum"``."""
    check_reduction(reduction, _REDUCTIONS)
    if isinstance(data_dims, bool) or not isinstance(data_dims, int):
        raise TypeError(f"data_dims must be an integer, got {data_dims!r}")
    if data_dims < 1:
        raise ValueError(f"data_dims must be >= 1, got {data_dims}")


def _check(
    recon_log_prob: Tensor, kl_per_dim: Tensor, data_dims: int, reduction: str
) -> tuple[Tensor, Tensor]:
    """Shapes ``(B,)`` and ``(B, L)``, ``data_dims >= 1``, the reduction; half -> float32."""
    _check_settings(data_dims, reduction)
    t = loss_tensors(recon_log_prob=recon_log_prob, kl_per_dim=kl_per_dim)
    recon, kl = t["recon_log_prob"], t["kl_per_dim"]
    if recon.dim() != 1:
        raise ValueError(
            f"recon_log_prob must have shape (B,) (summed over the data's dimensions), "
            f"got {tuple(recon.shape)}"
        )
    if kl.dim() != 2:
        raise ValueError(f"kl_per_dim must have shape (B, L), got {tuple(kl.shape)}")
    if recon.shape[0] != kl.shape[0]:
        raise ValueError(
            f"batch sizes differ: recon_log_prob {tuple(recon.shape)}, kl_per_dim {tuple(kl.shape)}"
        )
    if kl.shape[0] == 0 or kl.shape[1] == 0:
        raise ValueError(f"need B >= 1 and L >= 1, got kl_per_dim {tuple(kl.shape)}")
    return recon, kl


def _elbo(
    recon_log_prob: Tensor,
    kl_per_dim: Tensor,
    data_dims: int,
    reduction: str,
    weigh: Callable[[Tensor, Tensor], WeightedLoss],
) -> ELBOResult:
    """The ELBO of checked inputs; ``weigh(distortion, kl_per_dim)`` sees per-example means."""
    recon, kl = _check(recon_log_prob, kl_per_dim, data_dims, reduction)
    recon_mean = recon.mean()
    kl_mean = kl.mean(dim=0)
    weighted = weigh(-recon_mean, kl_mean)
    nats = (kl_mean.sum() - recon_mean).detach()  # -(r - KL), averaged over examples
    bits_per_dim = nats / (data_dims * LOG_2)
    if reduction == "mean":
        reconstruction, per_dim, loss = recon_mean, kl_mean, weighted.loss
    else:
        # B times the per-example objective: thresholds, capacities and tolerances of the
        # weighting keep their per-example meaning (a sum fed to them would not)
        reconstruction, per_dim, loss = recon.sum(), kl.sum(dim=0), weighted.loss * recon.shape[0]
    return ELBOResult(
        loss, reconstruction, per_dim.sum(), per_dim, weighted.beta, nats, bits_per_dim
    )


def elbo(
    recon_log_prob: Tensor,
    kl_per_dim: Tensor,
    *,
    data_dims: int,
    beta: float = 1.0,
    reduction: str = "mean",
) -> ELBOResult:
    r"""The negative ELBO with a constant KL weight, its parts, and its units.

    .. math::
        \mathcal{L} = \frac1B \sum_{b=1}^{B} \Big(-r_b + \beta \sum_{d=1}^{L} k_{bd}\Big),
        \qquad
        \text{bits/dim} = \frac{1}{D \ln 2}\,\frac1B \sum_b \Big(-r_b + \sum_d k_{bd}\Big)

    ``beta = 1`` is the plain negative ELBO (Kingma & Welling 2013, arXiv:1312.6114),
    ``beta > 1`` the beta-VAE (Higgins et al. 2017). For schedules, free bits, capacity or
    GECO use :class:`ELBO` with a :mod:`~probloss.vae.weighting` strategy; ``elbo(...,
    beta=b)`` equals ``ELBO(Beta(b), ...)`` bit for bit.

    Reductions (neither changes the balance of the two terms, so neither changes the
    effective beta; a weighting always sees the per-example means, which are the minibatch
    means of the free-bits and GECO papers):

    * ``"mean"`` (default): the mean over the ``B`` examples of the sums over the data's
      and the latent dimensions, i.e. the per-example negative ELBO
      :math:`\frac1B \sum_b \big(-r_b + \beta \sum_d k_{bd}\big)` for a plain beta. Its
      scale does not depend on the batch size.
    * ``"sum"``: ``B`` times the ``"mean"`` loss, for a plain beta the sum over examples.
      Same optimum, gradients ``B`` times larger (rescale the learning rate).
      ``reconstruction``, ``kl`` and ``kl_per_dim`` are then sums over examples too.

    Nothing divides by the number of data dimensions: averaging the reconstruction over
    pixels while summing the KL over latents is a silent :math:`\beta = D` (see
    :func:`~probloss.vae.weighting.normalised_beta`); per-dimension units are reported in
    ``bits_per_dim`` instead.

    Args:
        recon_log_prob: :math:`r_b`, reconstruction log-likelihood per example, summed over
            the data's dimensions, shape ``(B,)``.
        kl_per_dim: :math:`k_{bd}`, KL per example and latent dimension, shape ``(B, L)``.
        data_dims: :math:`D`, the number of data dimensions per example (e.g.
            ``C * H * W``), for ``bits_per_dim``.
        beta: the KL weight, finite and ``>= 0``.
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Returns:
        :class:`ELBOResult`; float32 for half-precision inputs.

    Raises:
        ValueError: shapes other than ``(B,)`` and ``(B, L)`` with one ``B >= 1`` (naming
            both shapes), ``data_dims < 1``, a bad ``beta`` or ``reduction``.
        TypeError: non-floating tensors, a non-integer ``data_dims``.

    Example:
        >>> recon = torch.tensor([-120.0, -100.0])  # log p(x | z), summed over 784 pixels
        >>> kl = torch.tensor([[3.0, 1.0], [5.0, 1.0]])
        >>> out = elbo(recon, kl, data_dims=784)
        >>> out.loss, out.kl_per_dim, out.nats
        (tensor(115.), tensor([4., 1.]), tensor(115.))
        >>> round(float(out.bits_per_dim), 4)  # 115 / (784 ln 2)
        0.2116
        >>> elbo(recon, kl, data_dims=784, beta=4.0, reduction="sum").loss  # 2 * (110 + 4 * 5)
        tensor(260.)
    """
    _check_weight("beta", beta)
    beta = float(beta)
    return _elbo(
        recon_log_prob,
        kl_per_dim,
        data_dims,
        reduction,
        lambda distortion, kl: _beta_loss(distortion, kl, beta),
    )


class ELBO(nn.Module):
    r"""The negative ELBO with a KL weighting strategy: one line to switch strategies.

    ``forward(recon_log_prob, kl_per_dim)`` reduces the inputs, passes the distortion
    :math:`-\frac1B \sum_b r_b` and the KL per dimension :math:`\frac1B \sum_b k_{bd}` to
    ``weighting`` (default :class:`~probloss.vae.weighting.Beta` ``(1.0)``, the plain ELBO)
    and returns an :class:`ELBOResult`; ``step()`` calls ``weighting.step()`` (once per
    optimizer step). The weighting is a submodule, so its state (step counter, GECO
    multiplier) is in this module's ``state_dict``. Reductions and units as in :func:`elbo`
    (neither reduction changes the balance of the terms; the weighting always sees
    per-example means).

    Args:
        weighting: a :class:`~probloss.vae.weighting.Weighting`, or ``None`` for ``Beta(1.0)``.
        data_dims: :math:`D`, the number of data dimensions per example, for ``bits_per_dim``.
        reduction: ``"mean"`` or ``"sum"`` over examples.

    Raises:
        ValueError: a bad ``data_dims`` or ``reduction`` (at construction), bad shapes (in
            ``forward``, naming them).
        TypeError: ``weighting`` not a ``Weighting``.

    Example:
        >>> from probloss.vae.weighting import FreeBits
        >>> loss_fn = ELBO(FreeBits(threshold=2.0), data_dims=784)
        >>> out = loss_fn(torch.tensor([-120.0, -100.0]), torch.tensor([[3.0, 1.0], [5.0, 1.0]]))
        >>> out.loss, out.nats  # 110 + max(2, 4) + max(2, 1); the bound is still 115
        (tensor(116.), tensor(115.))
        >>> loss_fn.step()
    """

    def __init__(
        self, weighting: Weighting | None = None, *, data_dims: int, reduction: str = "mean"
    ) -> None:
        super().__init__()
        if weighting is None:
            weighting = Beta(1.0)
        if not isinstance(weighting, Weighting):
            raise TypeError(f"weighting must be a probloss Weighting, got {type(weighting)}")
        _check_settings(data_dims, reduction)
        self.weighting = weighting
        self.data_dims = data_dims
        self.reduction = reduction

    def forward(self, recon_log_prob: Tensor, kl_per_dim: Tensor) -> ELBOResult:
        return _elbo(recon_log_prob, kl_per_dim, self.data_dims, self.reduction, self.weighting)

    def step(self) -> None:
        """One optimizer step done: advance the weighting (schedules, GECO multiplier)."""
        self.weighting.step()

    def extra_repr(self) -> str:
        return f"data_dims={self.data_dims}, reduction={self.reduction!r}"
