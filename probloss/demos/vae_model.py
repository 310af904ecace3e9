r"""The data and the model of the VAE demo (:mod:`probloss.demos.vae`).

The digits' grey levels and their dequantisation, the VAE (MLP encoder to a diagonal
Gaussian posterior, MLP decoder), and the likelihood of each row's decoder: the continuous
Bernoulli, the Bernoulli cross-entropy or the sigma-VAE's Gaussian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..special import cb_mean
from ..vae import (
    bernoulli_log_likelihood,
    continuous_bernoulli_log_likelihood,
    gaussian_log_likelihood,
    sigma_vae_log_likelihood,
)
from .vae_strategies import DATA_DIMS, LATENT_DIMS

LEVELS = 17  # grey levels 0..16
N_TEST = 360  # test images of the fixed split


def load_levels(seed: int) -> tuple[Tensor, Tensor]:
    """The digits' grey levels ``0..16`` as float32 rows of 64: ``(train, test)``, a fixed split."""
    from sklearn.datasets import load_digits

    levels = torch.as_tensor(load_digits().data, dtype=torch.float32)
    order = torch.randperm(levels.shape[0], generator=torch.Generator().manual_seed(seed))
    return levels[order[N_TEST:]], levels[order[:N_TEST]]


def dequantise(levels: Tensor, generator: torch.Generator) -> Tensor:
    r"""``(k + u) / 17`` with ``u ~ U(0, 1)``: level ``k`` spread uniformly over its bin.

    A continuous density of the result is a bound on the discrete likelihood of the levels,
    :math:`\log P(k) \ge \mathbb E_u \log p((k + u) / 17) - \log 17` per pixel (Theis et al.
    2016, arXiv:1511.01844); without it a density on pixels exactly at 0 or 1 is unbounded.

    Example:
        >>> x = dequantise(torch.tensor([0.0, 8.0, 16.0]), torch.Generator().manual_seed(0))
        >>> torch.floor(x * 17)  # each value stays in its level's bin
        tensor([ 0.,  8., 16.])
    """
    return (levels + torch.rand(levels.shape, generator=generator)) / LEVELS


class VAE(nn.Module):
    """MLP encoder to a diagonal Gaussian posterior, MLP decoder to 64 outputs per image."""

    def __init__(self, hidden: int, latent: int = LATENT_DIMS) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(DATA_DIMS, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
            nn.Linear(hidden, 2 * latent),
        )  # fmt: skip
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(),
            nn.Linear(hidden, DATA_DIMS),
        )  # fmt: skip

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior means and log-variances, each ``(B, L)``."""
        loc, log_var = self.encoder(x).chunk(2, dim=-1)
        return loc, log_var

    def forward(self, x: Tensor, samples: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """Decoder outputs ``(S, B, 64)`` for ``S`` reparameterised posterior samples."""
        loc, log_var = self.encode(x)
        noise = torch.randn((samples, *loc.shape), dtype=loc.dtype)
        z = loc + torch.exp(0.5 * log_var) * noise  # z = mu + sigma eps, sigma = exp(log_var / 2)
        return self.decoder(z), loc, log_var


def log_likelihood(kind: str, x: Tensor, out: Tensor, log_scale: Tensor | None = None) -> Tensor:
    """``log p(x | z)`` per sample and image, shape ``(S, B)``, from decoder outputs ``out``.

    For ``"sigma"`` the scale is the batch's optimal one unless ``log_scale`` is given.
    """
    if kind == "cb":
        return continuous_bernoulli_log_likelihood(x, out, event_dims=1)
    if kind == "bernoulli":
        return bernoulli_log_likelihood(x, out, event_dims=1)
    loc = torch.sigmoid(out)
    if log_scale is None:
        return sigma_vae_log_likelihood(x, loc, event_dims=1)
    return gaussian_log_likelihood(x, loc, log_scale=log_scale, event_dims=1)


def decoder_mean(kind: str, out: Tensor) -> Tensor:
    """The mean of ``p(x | z)``: what a reconstruction shows."""
    if kind == "cb":
        return cb_mean(out)  # the CB mean is not sigmoid(logits)
    return torch.sigmoid(out)
