r"""User story 3 (docs/user_stories.md): KL against reconstruction in a VAE, one strategy per row.

Data. scikit-learn's bundled 8x8 digits (``load_digits``: 1797 images, no download): 64
pixels per image on 17 grey levels ``k = 0..16`` (``k / 16`` in ``[0, 1]``). A fixed split
(from ``seed``) keeps 360 images for testing. The pixels are dequantised, ``x = (k + u) /
17`` with ``u ~ U(0, 1)`` (a new draw every epoch; one fixed draw for the test set): a
continuous density of pixels that sit exactly at 0 or 1 is unbounded (the continuous
Bernoulli's log density at 0 grows like :math:`\log|\eta|` as its logit
:math:`\eta \to -\infty`), so without it the ELBO keeps "improving" by sharpening the
always-blank border pixels, and GECO's target keeps moving. With it, every density row is a
bound on the discrete likelihood, :math:`\log P(k) \ge \mathbb E_u \log p(x) - 64 \log 17`
per image (Theis et al. 2016, arXiv:1511.01844).

Model and training, the same for every row: an MLP encoder ``64 -> 128 -> 128 -> 2 L``
(posterior means and log-variances, :math:`L = 8` latents, ELU), an MLP decoder
``L -> 128 -> 128 -> 64``, Adam (learning rate 1e-3), minibatches of 128, one
reparameterised sample per image, the same seed (initialisation, minibatch order, noise)
and the same number of steps (300 epochs of 11 steps; 15 with ``quick``). Only the
objective changes, through :class:`probloss.vae.elbo.ELBO` and a weighting:

=================  =====  ===================================================================
row                lik.   objective (:mod:`probloss.vae.weighting`, ``.schedules``)
=================  =====  ===================================================================
ELBO               CB     ``Beta(1.0)``: the plain ELBO (Kingma & Welling 2013)
Bernoulli ELBO     Bern   ``Beta(1.0)`` with the Bernoulli likelihood (see below)
beta-VAE           CB     ``Beta(4.0)``; normalised :math:`\beta L / D = 0.5` (Higgins 2017)
sigmoid anneal     CB     ``Beta(SigmoidAnnealing)``, 0 to 1 with its midpoint at 25 % of the
                          steps (Bowman et al. 2015)
cyclical           CB     ``Beta(CyclicalAnnealing)``, 4 cycles, rising over half of each
                          (Fu et al. 2019)
free bits          CB     ``FreeBits(0.5)``: 0.5 nats per latent dimension are free
                          (Kingma et al. 2016)
GECO               CB     ``GECO(tau)``: the least KL whose distortion reaches ``tau``
                          (Rezende & Viola 2018)
sigma-VAE          Gauss  ``Beta(1.0)``, Gaussian decoder with the optimal shared sigma
                          (Rybkin et al. 2021)
=================  =====  ===================================================================

Likelihoods. The main rows use the continuous Bernoulli (CB, Loaiza-Ganem & Cunningham
2019), a normalised density on ``[0, 1]``. The usual Bernoulli likelihood of grey levels is
the binary cross-entropy, not a density on ``[0, 1]`` (its normaliser depends on the
logits): its nats measure something else and do not compare with the other rows (the
``Bernoulli ELBO`` row, same model). The sigma-VAE row is a Gaussian density with mean
``sigmoid(decoder output)`` and one :math:`\sigma` for all pixels: the batch's
maximum-likelihood one (:math:`\sigma^2` = the mean squared error) during training, that of
the training set at test time. CB and Gaussian rows are densities of the same dequantised
data, so their nats compare.

GECO's tolerance. GECO needs a target distortion :math:`\tau` in nats per image. It comes
from the plain ELBO row (trained first, same model and steps): its mean training distortion
over the last epoch, minus ``GECO_MARGIN`` = 5 nats. GECO thus asks for reconstructions 5
nats better than the plain ELBO's and pays for them with the least KL it can find: its
point lies above and left of the ELBO's in the rate-distortion plane (a looser tolerance
would trade the other way). The multiplier's rate (1e-4 per nat and step) is slow enough
that the large violation of the first steps does not drive :math:`\lambda` to extremes.

Evaluation on the test set, with the KL weight *not* applied (the true bound whatever the
training objective): ``-ELBO`` in nats per image (:math:`\mathbb E_q \log p(x \mid z)` from
16 posterior samples per image, the KL in closed form), bits per dimension
``-ELBO / (64 ln 2)`` (negative for a density above 1 on ``(0, 1)``), the reconstruction
term, the KL (the rate), active units (Burda et al. 2015: the posterior mean's variance over
the test set above 0.01) and the KL per latent dimension. ``beta`` is the KL weight at the
last step (GECO: :math:`1/\lambda`).

What the default run shows (seed 0): the plain ELBO, both annealings and free bits end
within 0.4 nats of each other (-82.5 to -82.9 nats), free bits and sigmoid annealing with
every latent dimension above 0.45 nats where the plain ELBO leaves two near 0; beta = 4
cuts the rate from 8.2 to 3.1 nats and loses 6 nats of ELBO (4 of 8 units active); GECO
buys 6 nats of distortion with 13 more nats of rate; the Bernoulli likelihood uses 4 of 8
units; the sigma-VAE's Gaussian, calibrated but Gaussian, is 46 nats worse than the CB on
these bounded pixels.

Figures (PNG, in ``out``): ``vae_rate_distortion.png`` (distortion against rate, one point
per strategy, lines of constant ELBO, a zoom on the rows near the plain ELBO),
``vae_reconstructions.png`` (test digits and each strategy's reconstruction, the decoder's
mean at the posterior mean), ``vae_kl_per_dim.png`` (KL per latent dimension, sorted) and
``vae_beta.png`` (the KL weight at every step).

Modules: training, evaluation and the report here; the data and the model in
:mod:`.vae_model`, the rows in :mod:`.vae_strategies`, the figures in :mod:`.vae_plots`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..vae import (
    ELBO,
    active_units,
    elbo,
    gaussian_kl_per_dim,
    kl_per_dimension,
    sigma_vae_log_scale,
)
from ._common import (
    Progress,
    check_positive_int,
    isolated_cpu_run,
    no_progress,
    run_demo,
)
from .vae_model import LEVELS, N_TEST, VAE, decoder_mean, dequantise, load_levels, log_likelihood
from .vae_plots import write_figures
from .vae_strategies import (
    BETA_VAE,
    DATA_DIMS,
    GECO_MARGIN,
    LATENT_DIMS,
    LIKELIHOOD_NAMES,
    STRATEGIES,
    Strategy,
    StrategyResult,
    make_weighting,
)

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
EVAL_SAMPLES = 16  # posterior samples per test image for E_q log p(x | z)
N_SHOWN = 10  # test digits in the reconstruction figure
FIGURES = (
    "vae_rate_distortion.png",
    "vae_reconstructions.png",
    "vae_kl_per_dim.png",
    "vae_beta.png",
)


@dataclass(frozen=True)
class Settings:
    epochs: int  # passes over the training set (11 minibatches each)
    hidden: int  # width of the two hidden layers of encoder and decoder


FULL = Settings(epochs=300, hidden=128)
QUICK = Settings(epochs=15, hidden=128)


# --------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------


def train(
    model: VAE,
    kind: str,
    loss_fn: ELBO,
    levels: Tensor,
    epochs: int,
    seed: int,
    progress: Progress,
    desc: str,
) -> tuple[list[float], float]:
    """Adam on minibatches; returns the KL weight at each step and the last epoch's distortion.

    Every epoch draws a new dequantisation of the training images and a new order.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    order = torch.Generator().manual_seed(seed)
    per_epoch = levels.shape[0] // BATCH_SIZE  # full batches only: every step sees 128 images
    x = levels
    betas: list[float] = []
    distortions: list[float] = []
    bar = progress(range(epochs * per_epoch), desc=f"{desc:>16}", leave=False)
    batches = iter(())
    for step in bar:
        if step % per_epoch == 0:
            x = dequantise(levels, order)
            batches = iter(torch.randperm(x.shape[0], generator=order).split(BATCH_SIZE))
            distortions.clear()
        batch = x[next(batches)]
        out, loc, log_var = model(batch)
        result = loss_fn(log_likelihood(kind, batch, out)[0], gaussian_kl_per_dim(loc, log_var))
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        loss_fn.step()
        betas.append(float(result.beta))  # a log of the run: one read per step is fine here
        distortions.append(-float(result.reconstruction.detach()))
        if step % 50 == 0:
            bar.set_postfix(nats=f"{float(result.nats):.1f}", beta=f"{result.beta:.3g}")
    return betas, sum(distortions) / len(distortions)


@torch.no_grad()
def evaluate(
    model: VAE, kind: str, train_x: Tensor, test_x: Tensor
) -> tuple[dict[str, float], list[float], int, Tensor]:
    """Test-set ELBO parts (beta = 1), KL per dimension, active units, reconstructions."""
    log_scale = None
    if kind == "sigma":  # one sigma for the test set: the optimal one on the training set
        out, _, _ = model(train_x)
        log_scale = sigma_vae_log_scale(train_x, torch.sigmoid(out))
    out, loc, log_var = model(test_x, samples=EVAL_SAMPLES)
    recon = log_likelihood(kind, test_x, out, log_scale).mean(dim=0)  # MC mean over z
    kl = gaussian_kl_per_dim(loc, log_var)
    bound = elbo(recon, kl, data_dims=DATA_DIMS)  # beta = 1: the true ELBO
    numbers = {
        "nats": float(bound.nats),
        "bits_per_dim": float(bound.bits_per_dim),
        "reconstruction": float(bound.reconstruction),
        "kl": float(bound.kl),
    }
    shown = decoder_mean(kind, model.decoder(loc[:N_SHOWN]))
    return numbers, kl_per_dimension(kl).tolist(), active_units(loc).count, shown


def _train_one(
    strategy: Strategy,
    data: tuple[Tensor, Tensor, Tensor],
    hidden: int,
    epochs: int,
    seed: int,
    geco_tolerance: float,
    progress: Progress,
) -> StrategyResult:
    """Train a fresh VAE with one strategy and evaluate it (``data``: training levels, one
    dequantised training set, the dequantised test set)."""
    start = time.perf_counter()
    train_levels, train_x, test_x = data
    steps = epochs * (train_levels.shape[0] // BATCH_SIZE)
    model = VAE(hidden)
    loss_fn = ELBO(make_weighting(strategy, steps, geco_tolerance), data_dims=DATA_DIMS)
    kind = strategy.likelihood
    betas, distortion = train(
        model, kind, loss_fn, train_levels, epochs, seed, progress, strategy.name
    )
    numbers, per_dim, active, shown = evaluate(model, kind, train_x, test_x)
    return StrategyResult(
        strategy.name, kind, **numbers, active_units=active, kl_per_dim=per_dim, betas=betas,
        train_distortion=distortion, reconstructions=shown, seconds=time.perf_counter() - start,
    )  # fmt: skip


def train_all(
    *,
    quick: bool = False,
    seed: int = 0,
    epochs: int | None = None,
    progress: Progress = no_progress,
) -> list[StrategyResult]:
    """Train one VAE per strategy (same seed, data, steps) and evaluate it on the test set.

    Args:
        quick: the short settings (fewer epochs).
        seed: seed of the split, the initialisation, the minibatch order and the noise.
        epochs: passes over the training set (default 300, 15 with ``quick``).
        progress: a ``tqdm``-like wrapper of iterables (default: no bar).

    Returns:
        One :class:`StrategyResult` per entry of :data:`STRATEGIES`, in order. Training runs
        on one thread; the caller's thread count and global random state are left as they
        were.

    Raises:
        TypeError: ``epochs`` is not an int.
        ValueError: ``epochs`` is below 1.
    """
    check_positive_int("epochs", epochs)
    settings = QUICK if quick else FULL
    epochs = settings.epochs if epochs is None else epochs
    train_levels, test_levels = load_levels(seed)
    fixed = torch.Generator().manual_seed(seed + 1)
    # one fixed dequantisation of the test set (an unbiased draw of the expectation over u),
    # and one of the training set for the sigma-VAE's test-time sigma
    test_x, train_x = dequantise(test_levels, fixed), dequantise(train_levels, fixed)
    results: list[StrategyResult] = []
    with isolated_cpu_run():  # tiny tensors (128 x 64): one thread
        for strategy in STRATEGIES:
            # GECO's target: the plain ELBO's distortion (trained first) minus a margin
            elbo_rows = [r.train_distortion for r in results if r.name == "ELBO"]
            tolerance = elbo_rows[0] - GECO_MARGIN if elbo_rows else math.nan
            torch.manual_seed(seed)  # the same initialisation and noise for every strategy
            data = (train_levels, train_x, test_x)
            results.append(
                _train_one(strategy, data, settings.hidden, epochs, seed, tolerance, progress)
            )
    return results


def format_table(results: list[StrategyResult]) -> list[str]:
    """The header and one line per strategy: -ELBO, bits/dim, recon, KL, active units, beta."""
    header = (
        f"{'strategy':<16}{'lik.':<6}{'-ELBO':>9}{'bits/dim':>10}{'recon':>9}{'KL':>8}"
        f"{'active':>8}{'beta':>9}"
    )
    lines = [header]
    for r in results:
        lines.append(
            f"{r.name:<16}{LIKELIHOOD_NAMES[r.likelihood]:<6}{r.nats:>9.2f}{r.bits_per_dim:>10.4f}"
            f"{r.reconstruction:>9.2f}{r.kl:>8.2f}{r.active_units:>6}/{LATENT_DIMS}"
            f"{r.betas[-1]:>9.3g}"
        )
    return lines


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def print_report(results: list[StrategyResult], steps: int, seed: int) -> None:
    """The table, with the legend of its columns and the likelihood of each row."""
    beta_norm = BETA_VAE * LATENT_DIMS / DATA_DIMS
    elbo_distortion = next((r.train_distortion for r in results if r.name == "ELBO"), math.nan)
    lines = [
        "",
        *format_table(results),
        f"test set: {N_TEST} digits, dequantised once (seed {seed + 1}); {steps} Adam steps "
        "per strategy",
        "-ELBO: nats per test image with beta = 1 (the true bound, whatever the training "
        f"objective); bits/dim = -ELBO / ({DATA_DIMS} ln 2)",
        "recon: E_q log p(x | z); KL: the rate; active: latent units whose posterior mean has "
        "variance > 0.01 (Burda 2015)",
        "beta: the KL weight at the last step (GECO: 1 / lambda)",
        "lik.: CB = continuous Bernoulli, Gauss = Gaussian with the optimal shared sigma: both",
        "      are densities of the dequantised pixels, their nats compare; Bern = Bernoulli",
        "      cross-entropy, not a density on [0, 1]: its nats compare with no other row",
        f"beta-VAE: beta = {BETA_VAE:g}, normalised beta = beta L / D = {BETA_VAE:g} x "
        f"{LATENT_DIMS} / {DATA_DIMS} = {beta_norm:g} (Higgins 2017)",
        f"GECO: tolerance = the plain ELBO's last-epoch training distortion {elbo_distortion:.2f} "
        f"- {GECO_MARGIN:g} = {elbo_distortion - GECO_MARGIN:.2f} nats",
    ]
    print("\n".join(lines))


def run(
    *,
    quick: bool = False,
    out: str | Path = "probloss-demo",
    seed: int = 0,
    epochs: int | None = None,
) -> int:
    """Train every strategy, print the table, write the figures into ``out``.

    Args:
        quick: the short form for CI (15 epochs instead of 300: under a minute).
        out: output directory for the PNG figures (created if missing).
        seed: seed of the split, the dequantisation, the initialisation and the noise.
        epochs: passes over the training set per strategy (11 Adam steps each).

    Returns:
        0, or 2 if matplotlib, tqdm or scikit-learn is missing.

    Raises:
        TypeError: ``epochs`` is not an int.
        ValueError: ``epochs`` is below 1.
    """

    def body(figure_cls: type, progress: Progress, out: Path) -> int:
        settings = QUICK if quick else FULL
        n_epochs = settings.epochs if epochs is None else epochs
        print(
            f"VAE on the 8x8 digits: {len(STRATEGIES)} strategies, the same model (latent "
            f"L = {LATENT_DIMS}, hidden {settings.hidden}), data and seed ({seed}), "
            f"{n_epochs} epochs each"
        )
        results = train_all(quick=quick, seed=seed, epochs=epochs, progress=progress)
        for r in results:
            print(f"  trained {r.name} in {r.seconds:.1f} s")
        print_report(results, len(results[0].betas), seed)
        originals = load_levels(seed)[1][:N_SHOWN] / (LEVELS - 1)
        paths = write_figures(figure_cls, originals, results, out, FIGURES)
        print(f"figures written: {', '.join(str(p) for p in paths)}")
        return 0

    # extra: the digits come with scikit-learn
    return run_demo("vae", out, body, epochs=epochs, extra=("sklearn.datasets",))
