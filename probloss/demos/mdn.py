r"""User story 2 (docs/user_stories.md): mixture density networks (Bishop 1994) against MSE.

Three tasks on built-in synthetic data, each fitted by two small MLPs (two tanh layers of
64 units, 32 with ``--quick``) with Adam, full batch, a cosine learning-rate decay and
fixed seeds, on CPU (one thread: the tensors are small). For training, inputs and targets
are divided by fixed scales (Bishop tasks: 5 and 10; spiral targets: 2) so that they are
of unit order, like the head's initial means and scales; every number and figure is in
the data's units.

* ``forward``: :math:`y = x + 7 \sin(0.75 x) + \varepsilon`, :math:`\varepsilon \sim
  \mathcal N(0, 1)`, :math:`x \sim U(-10.5, 10.5)` (Bishop's toy problem). One value of
  :math:`y` per :math:`x`, Gaussian noise: MSE regression is the right model here.
* ``inverse``: the same data with :math:`x` and :math:`y` swapped, so the target is
  multi-valued (up to three branches for one input). MSE regression predicts the
  conditional mean, which lies between the branches, where there are no data; the MDN
  recovers every branch.
* ``spiral``: points on a 2.5-turn Archimedean spiral :math:`r = 0.3 + t / 2\pi`,
  :math:`t \sim U(0, 5\pi)`, plus isotropic noise (sd 0.08). The input is the direction
  :math:`(\cos t, \sin t)` of the point, the target the 2-D point itself: every ray from
  the centre crosses the spiral two or three times, one radius per turn, so
  :math:`p(\text{point} \mid \text{direction})` has two or three separated modes, one per
  turn. MSE predicts their average, a point between the arms (or on the middle arm
  where there are three). The MDN uses 6 correlated 2-D components
  (``component="bivariate"``); on the Bishop tasks it uses 8 normal components.

The printed table compares, on held-out data, for each task:

* ``MSE`` -- the MSE network turned into a density: a Gaussian centred on its prediction
  with the per-coordinate residual variance fitted on the training data (the maximum
  likelihood variance given the mean), so that its NLL is comparable. Its 90% region is
  the central interval (the 90% ellipse for the spiral), computed exactly.
* ``MDN`` -- the same trunk with a :class:`probloss.nn.mixture.MixtureDensityHead`,
  trained with :class:`probloss.nn.mixture.MixtureNLLLoss`. Its 90% region is the 90%
  highest-density region (HDR, Hyndman 1996) of each predicted mixture, :math:`\{y : p(y \mid x) \ge
  c_x\}` with :math:`P(p(Y \mid x) \ge c_x) = 0.9` for :math:`Y \sim p(\cdot \mid x)`: so
  :math:`\log c_x` is the 10% quantile of :math:`\log p(Y \mid x)` over samples
  :math:`Y` drawn from the mixture, estimated per test input (not pooled over inputs:
  the region is conditional on :math:`x`). Its size (total length, or area) is
  :math:`E[1\{p(Y) \ge c_x\} / p(Y)]`, estimated from the same samples.

Columns: test NLL in nats per test point (lower is better; in the data's units, so it can
be negative for the spiral); coverage, the fraction of test points inside their 90% region
(0.90 for a calibrated model); size, the mean length (area for the spiral) of the 90%
regions. Both models can reach 0.90 coverage, the MSE Gaussian by being wide; the size
shows which region is informative: on the multi-valued tasks the MSE Gaussian's interval
spans the holes between the branches.

Figures (PNG, in ``--out``): ``data_and_mse_fit.png`` (data, MSE fit and its 90%
interval), ``mdn_density.png`` (the MDN's conditional log density as a heatmap with
samples from it, forward and inverse), ``spiral_density.png`` (one MDN sample per test
direction; the conditional density at three directions) and ``loss_curves.png`` (train
and test NLL during training).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..nn.mixture import MixtureDensityHead, MixtureNLLLoss
from ._common import (
    Progress,
    isolated_cpu_run,
    run_demo,
)
from .mdn_plots import plot_data_and_mse, plot_loss_curves, plot_mdn_density, plot_spiral
from .mdn_tasks import Task, make_tasks

HDR_MASS = 0.9
HDR_CHUNK = 250  # test inputs per batch of HDR samples


@dataclass(frozen=True)
class Settings:
    n_train: int
    n_test: int
    hidden: int  # width of the two tanh layers
    steps: int  # full-batch Adam steps per model
    hdr_samples: int  # samples per test input that set its HDR threshold


FULL = Settings(n_train=3000, n_test=3000, hidden=64, steps=2000, hdr_samples=2000)
QUICK = Settings(n_train=2000, n_test=1000, hidden=32, steps=400, hdr_samples=500)
# The MSE fit is a smooth problem and converges faster at the larger rate (it only helps the
# baseline); the MDN's likelihood has spikes (components narrowing on a few points) that
# the larger rate turns into restarts.
LEARNING_RATE = {"MSE": 1e-2, "MDN": 5e-3}
FIGURES = ("data_and_mse_fit.png", "mdn_density.png", "spiral_density.png", "loss_curves.png")
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def _trunk(in_features: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
    )


class MSENet(nn.Module):
    """Point prediction; ``sigma`` (per coordinate, scaled units) is set after training."""

    def __init__(self, in_features: int, out_features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(_trunk(in_features, hidden), nn.Linear(hidden, out_features))
        self.register_buffer("sigma", torch.ones(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def distribution(self, x: Tensor) -> torch.distributions.Distribution:
        normal = torch.distributions.Normal(self(x), self.sigma)
        return torch.distributions.Independent(normal, 1)


class MDN(nn.Module):
    """The same trunk as :class:`MSENet` with a :class:`MixtureDensityHead` on top."""

    def __init__(self, in_features: int, task: Task, hidden: int) -> None:
        super().__init__()
        self.trunk = _trunk(in_features, hidden)
        self.head = MixtureDensityHead(
            hidden, task.dim, task.num_components, component=task.component, init_scale=0.3
        )

    def forward(self, x: Tensor) -> torch.distributions.Distribution:
        return self.head(self.trunk(x))

    def distribution(self, x: Tensor) -> torch.distributions.Distribution:
        return self(x)


def _gaussian_nll_from_mse(mse: Tensor) -> float:
    """NLL per point of a Gaussian whose variance is the mean squared residual (per coord)."""
    return float((0.5 * (_LOG_2PI + 1.0 + torch.log(mse))).sum())


def train(
    model: nn.Module,
    task: Task,
    kind: str,
    steps: int,
    progress: Progress,
    *,
    lr: float = 5e-3,
    eval_every: int = 25,
) -> None:
    """Full-batch Adam with a cosine learning-rate decay; records NLL curves in data units."""
    x, y = task.x_train / task.x_scale, task.y_train / task.y_scale
    xt, yt = task.x_test / task.x_scale, task.y_test / task.y_scale
    shift = task.dim * math.log(task.y_scale)  # log-density change from scaled to data units
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 50)
    nll_loss = MixtureNLLLoss()
    curve = task.curves.setdefault(kind, [])
    bar = progress(range(1, steps + 1), desc=f"{task.name:>8} {kind}", leave=False)
    for step in bar:
        optimizer.zero_grad()
        if kind == "MSE":
            residual = model(x) - y
            loss = residual.square().mean()
        else:
            loss = nll_loss(y, model(x))
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                if kind == "MSE":
                    # Train: the Gaussian whose variance is the current mean squared residual;
                    # test: that same Gaussian (variance from the train data), as in the table.
                    train_mse = residual.square().mean(0)
                    train_nll = _gaussian_nll_from_mse(train_mse)
                    test_dist = torch.distributions.Normal(model(xt), train_mse.sqrt())
                    test_nll = float(-test_dist.log_prob(yt).sum(-1).mean())
                else:
                    train_nll = float(loss)
                    test_nll = float(nll_loss(yt, model(xt)))
            curve.append((step, train_nll + shift, test_nll + shift))
            bar.set_postfix(nll=f"{train_nll + shift:.3f}", refresh=False)
    if kind == "MSE":
        with torch.no_grad():
            model.sigma.copy_((model(x) - y).square().mean(0).sqrt())


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass
class Score:
    nll: float  # nats per test point, data units
    coverage: float  # fraction of test points inside their 90% region
    size: float  # mean length (D = 1) or area (D = 2) of the 90% regions, data units


def _gaussian_region(model: MSENet, task: Task) -> tuple[Tensor, float]:
    """Inside-the-90%-region flags and the region size of the MSE Gaussian (exact).

    The 90% HDR of a Gaussian with diagonal covariance is the ellipsoid
    ``sum((y - mu)^2 / sigma^2) <= q``, ``q`` the 0.9 quantile of chi-square with ``D``
    degrees of freedom: ``ndtri(0.95)^2`` for ``D = 1``, ``-2 log 0.1`` for ``D = 2``.
    """
    x, y = task.x_test / task.x_scale, task.y_test / task.y_scale
    z2 = ((y - model(x)) / model.sigma).square().sum(-1)
    sigma = model.sigma * task.y_scale
    if task.dim == 1:
        q = float(torch.special.ndtri(torch.tensor(0.5 + HDR_MASS / 2, dtype=torch.float64)))
        return z2 <= q * q, float(2.0 * q * sigma[0])
    q = -2.0 * math.log(1.0 - HDR_MASS)
    return z2 <= q, float(math.pi * q * sigma.prod())


def hdr_threshold_and_size(
    mixture: torch.distributions.Distribution, num_samples: int, mass: float = HDR_MASS
) -> tuple[Tensor, Tensor]:
    r"""Per-distribution HDR log-threshold and region size, from samples of the distribution.

    For ``Y ~ p``, ``P(log p(Y) >= log c) = mass`` defines the HDR ``{y: p(y) >= c}``, so
    ``log c`` is the ``1 - mass`` quantile of ``log p(Y)`` (Hyndman 1996). The region's
    Lebesgue measure is :math:`\int 1\{p \ge c\}\,dy = E_p[1\{p(Y) \ge c\} / p(Y)]`.

    Returns ``(log_c, size)``, each of the distribution's batch shape.
    """
    samples = mixture.sample((num_samples,))
    log_p = mixture.log_prob(samples)  # (S, *batch)
    log_c = torch.quantile(log_p, 1.0 - mass, dim=0)
    size = torch.where(log_p >= log_c, torch.exp(-log_p), 0.0).mean(0)
    return log_c, size


@torch.no_grad()
def score(model: nn.Module, task: Task, kind: str, hdr_samples: int) -> Score:
    x, y = task.x_test / task.x_scale, task.y_test / task.y_scale
    shift = task.dim * math.log(task.y_scale)
    dist = model.distribution(x)
    log_p = dist.log_prob(y)
    nll = float(-log_p.mean()) + shift
    if kind == "MSE":
        inside, size = _gaussian_region(model, task)
        return Score(nll, float(inside.float().mean()), size)
    # In chunks of test inputs: the samples and their log densities under K components
    # take S x chunk x K numbers.
    log_c, size = zip(
        *(hdr_threshold_and_size(model(chunk), hdr_samples) for chunk in x.split(HDR_CHUNK)),
        strict=True,
    )
    coverage = float((log_p >= torch.cat(log_c)).float().mean())
    return Score(nll, coverage, float(torch.cat(size).mean()) * task.y_scale**task.dim)


def format_table(scores: dict[tuple[str, str], Score]) -> list[str]:
    lines = [
        f"{'task':<9}{'model':<6}{'test NLL':>10}{'90% coverage':>14}{'90% size':>10}",
    ]
    for (task, kind), s in scores.items():
        lines.append(f"{task:<9}{kind:<6}{s.nll:>10.3f}{s.coverage:>14.3f}{s.size:>10.3f}")
    return lines


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def run(
    *,
    quick: bool = False,
    out: str | Path = "probloss-demo",
    seed: int = 0,
    epochs: int | None = None,
) -> int:
    """Train, print the table, write the figures into ``out``; return an exit status.

    Args:
        quick: a short form for CI (fewer points and steps; under a minute).
        out: output directory for the PNG figures (created if missing).
        seed: seed of the data, the initialisations and the HDR samples.
        epochs: number of full-batch Adam steps per model (default 2000, 400 with ``quick``).

    Returns:
        0, or 2 if matplotlib or tqdm is missing.

    Raises:
        TypeError: ``epochs`` is not an int.
        ValueError: ``epochs`` is below 1.
    """

    def body(figure_cls: type, progress: Progress, out: Path) -> int:
        with isolated_cpu_run():  # tiny tensors (a few thousand rows, 64 columns): one thread
            torch.manual_seed(seed)
            tasks, models = _train_and_report(quick, seed, epochs, progress)
            plot_data_and_mse(figure_cls, tasks, models, out / FIGURES[0])
            plot_mdn_density(figure_cls, tasks, models, out / FIGURES[1])
            plot_spiral(figure_cls, tasks[2], models, out / FIGURES[2])
            plot_loss_curves(figure_cls, tasks, out / FIGURES[3])
        print(f"figures written to {out}/: {', '.join(FIGURES)}")
        return 0

    return run_demo("mdn", out, body, epochs=epochs)


def _train_and_report(quick: bool, seed: int, epochs: int | None, progress: Progress):
    """Fit both models on every task, print the table; return the tasks and the models."""
    settings = QUICK if quick else FULL
    steps = epochs if epochs is not None else settings.steps
    n_train, n_test, hidden = settings.n_train, settings.n_test, settings.hidden
    hdr_samples = settings.hdr_samples
    tasks = make_tasks(n_train, n_test, seed)
    models: dict[tuple[str, str], nn.Module] = {}
    scores: dict[tuple[str, str], Score] = {}
    print(
        f"Mixture density networks (Bishop 1994) vs MSE regression: {n_train} training and "
        f"{n_test} test points, {steps} full-batch Adam steps per model, seed {seed}"
    )
    for t, task in enumerate(tasks):
        for k, kind in enumerate(("MSE", "MDN")):
            t0 = time.perf_counter()
            # One seed per model (initialisation and HDR samples), so that each result does
            # not depend on how many random numbers the models before it drew.
            torch.manual_seed(seed * 1000 + 10 * t + k)
            in_features = task.x_train.shape[-1]
            if kind == "MSE":
                model = MSENet(in_features, task.dim, hidden)
            else:
                model = MDN(in_features, task, hidden)
            train(model, task, kind, steps, progress, lr=LEARNING_RATE[kind])
            model.eval()
            models[task.name, kind] = model
            scores[task.name, kind] = score(model, task, kind, hdr_samples)
            print(f"  trained {task.name} {kind} in {time.perf_counter() - t0:.1f} s")
    print()
    print("\n".join(format_table(scores)))
    print(
        "test NLL: nats per test point (MSE: Gaussian around the prediction with the "
        "residual variance of the training data)\n"
        "coverage: fraction of test points in the model's 90% region (MSE: central "
        "interval / ellipse; MDN: 90% highest-density region from samples)\n"
        "size: mean length (spiral: area) of those 90% regions, in data units"
    )
    return tasks, models
