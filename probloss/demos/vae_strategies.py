"""What the VAE demo (:mod:`probloss.demos.vae`) compares: its strategies and their results.

The rows of the table (one :class:`Strategy` each, in :data:`STRATEGIES`), the weighting
that defines each row's objective (:func:`make_weighting`), the constants of those
objectives, and :class:`StrategyResult`, the numbers one trained row gives to the table
(:mod:`probloss.demos.vae`) and to the figures (:mod:`probloss.demos.vae_plots`).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..vae import GECO, Beta, CyclicalAnnealing, FreeBits, SigmoidAnnealing, Weighting

DATA_DIMS = 64  # 8 x 8 pixels
LATENT_DIMS = 8
BETA_VAE = 4.0
FREE_BITS = 0.5  # nats per latent dimension
GECO_MARGIN = 5.0  # nats per example: GECO's target is this much better than the ELBO's


@dataclass(frozen=True)
class Strategy:
    """One row: its name (:func:`make_weighting` builds its objective) and its likelihood."""

    name: str
    likelihood: str  # "cb" (continuous Bernoulli), "bernoulli" or "sigma" (sigma-VAE)


STRATEGIES = (
    Strategy("ELBO", "cb"),  # first: GECO's tolerance comes from it
    Strategy("Bernoulli ELBO", "bernoulli"),
    Strategy("beta-VAE", "cb"),
    Strategy("sigmoid anneal", "cb"),
    Strategy("cyclical", "cb"),
    Strategy("free bits", "cb"),
    Strategy("GECO", "cb"),
    Strategy("sigma-VAE", "sigma"),
)
LIKELIHOOD_NAMES = {"cb": "CB", "bernoulli": "Bern", "sigma": "Gauss"}


@dataclass
class StrategyResult:
    """Test-set numbers (nats per example) and what the figures need, for one strategy."""

    name: str
    likelihood: str
    nats: float  # -ELBO per test example (the true bound, beta = 1)
    bits_per_dim: float  # nats / (64 ln 2)
    reconstruction: float  # E_q log p(x | z) per test example
    kl: float  # KL(q(z | x) || p(z)) per test example: the rate
    active_units: int
    kl_per_dim: list[float]  # (L,) mean KL of each latent dimension
    betas: list[float]  # KL weight in force at each training step
    train_distortion: float  # mean -log p(x | z) over the last training epoch
    reconstructions: Tensor  # (N_SHOWN, 64) decoder means at the posterior means
    seconds: float

    @property
    def distortion(self) -> float:
        return -self.reconstruction


def make_weighting(strategy: Strategy, steps: int, geco_tolerance: float) -> Weighting:
    """The weighting module of one row, its schedule laid out over ``steps`` steps.

    Raises:
        ValueError: ``strategy`` is not one of :data:`STRATEGIES`.

    Example:
        >>> make_weighting(Strategy("free bits", "cb"), steps=1000, geco_tolerance=0.0)
        FreeBits(threshold=0.5, beta=Constant(beta=1.0))
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of STRATEGIES, got {strategy!r}")
    if strategy.name == "beta-VAE":
        return Beta(BETA_VAE)
    if strategy.name == "sigmoid anneal":
        # 2 % to 98 % of the rise over 20 % of training (width ~ 8 / steepness)
        return Beta(SigmoidAnnealing(midpoint=0.25 * steps, steepness=40.0 / steps))
    if strategy.name == "cyclical":
        return Beta(CyclicalAnnealing(period=max(steps // 4, 1), ratio=0.5, cycles=4))
    if strategy.name == "free bits":
        return FreeBits(FREE_BITS)
    if strategy.name == "GECO":
        return GECO(geco_tolerance, alpha=0.99, lr=1e-4)
    return Beta(1.0)
