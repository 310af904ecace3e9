"""Figures of the VAE demo (:mod:`probloss.demos.vae`), drawn on matplotlib ``Figure`` objects.

Each function takes the ``Figure`` class (no pyplot: no global backend switch, nothing left
open), the :class:`~probloss.demos.vae_strategies.StrategyResult` list and the output path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ._common import to_numpy
from .vae_strategies import FREE_BITS, LATENT_DIMS, LIKELIHOOD_NAMES, StrategyResult

COLORS = {
    "ELBO": "tab:blue",
    "Bernoulli ELBO": "tab:gray",
    "beta-VAE": "tab:red",
    "sigmoid anneal": "tab:orange",
    "cyclical": "tab:purple",
    "free bits": "tab:green",
    "GECO": "tab:brown",
    "sigma-VAE": "tab:cyan",
}
ZOOM_NATS = 1.5  # the inset of the rate-distortion plane: -ELBO this close to the ELBO's
ZOOM_SPAN = 0.1  # ... shown if those points span at most this fraction of the axes
# one shape per strategy, drawn hollow: points that (nearly) coincide stay visible
MARKERS = {
    "ELBO": "o",
    "Bernoulli ELBO": "D",
    "beta-VAE": "v",
    "sigmoid anneal": "^",
    "cyclical": "s",
    "free bits": "P",
    "GECO": "X",
    "sigma-VAE": "h",
}


def _color(name: str) -> str:
    return COLORS.get(name, "black")


def _box(
    points: list[tuple[float, float]], pad: float, zoom: bool = False
) -> tuple[float, float, float, float]:
    """Axes limits ``(d_lo, d_hi, r_lo, r_hi)`` holding the (distortion, rate) points with a
    margin of at least ``pad`` nats; the rate axis starts at 0 unless ``zoom``."""
    distortions = [d for d, _ in points]
    rates = [r for _, r in points]
    pad_d = max(0.1 * (max(distortions) - min(distortions)), pad)
    if zoom:
        pad_r = max(0.25 * (max(rates) - min(rates)), pad)
        return (
            min(distortions) - pad_d,
            max(distortions) + pad_d,
            max(min(rates) - pad_r, 0.0),  # a KL is >= 0
            max(rates) + pad_r,
        )
    return min(distortions) - pad_d, max(distortions) + pad_d, 0.0, 1.15 * max(rates) + 1.0


def _elbo_lines(ax, box: tuple[float, float, float, float], lines: int = 6) -> None:
    """Dotted lines of constant ELBO, ``rate = c - distortion``, about ``lines`` across the
    box ``(d_lo, d_hi, r_lo, r_hi)``, which becomes the axes' limits."""
    d_lo, d_hi, r_lo, r_hi = box
    step = _nice_step((d_hi + r_hi - d_lo - r_lo) / lines)
    first = int((d_lo + r_lo) // step) + 1
    last = int((d_hi + r_hi) // step)
    for c in (k * step for k in range(first, last + 1)):
        ax.plot([d_lo, d_hi], [c - d_lo, c - d_hi], ls=":", c="0.55", lw=0.9, zorder=0)
        # the label sits just inside the box where the line enters it from the top or left
        d_at = max(c - r_hi, d_lo)
        if d_at < d_hi - 0.15 * (d_hi - d_lo):  # else no room before the right edge
            ax.annotate(
                f"-ELBO = {c:g}", (d_at, c - d_at), xytext=(3, -3), textcoords="offset points",
                fontsize=7, color="0.4", ha="left", va="top",
            )  # fmt: skip
    ax.set(xlim=(d_lo, d_hi), ylim=(r_lo, r_hi))


def _nice_step(x: float) -> float:
    """The number of the form 1, 2 or 5 times a power of 10 closest above ``x``."""
    power = 10.0 ** int(f"{x:e}".split("e")[1])
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * power >= x:
            return m * power
    return 10.0 * power


def _points(ax, rows: list[StrategyResult], label: bool) -> None:
    """One hollow marker per row at (distortion, rate), labelled for the legend if ``label``."""
    for r in rows:
        text = f"{r.name} ({LIKELIHOOD_NAMES[r.likelihood]}): -ELBO {r.nats:.2f}"
        ax.scatter(
            [r.distortion], [r.kl], s=90, marker=MARKERS.get(r.name, "o"), facecolors="none",
            edgecolors=_color(r.name), linewidths=1.8, zorder=3, label=text if label else None,
        )  # fmt: skip


def _zoom_on_the_elbo(ax, rows: list[StrategyResult], within: float = ZOOM_NATS) -> None:
    """An inset (lower right) around the rows whose -ELBO is within ``within`` nats of the
    plain ELBO's, when there are at least two besides it and they are crowded: all within
    ``ZOOM_SPAN`` of the axes' width and height, where markers overlap."""
    elbo = [r for r in rows if r.name == "ELBO"]
    if not elbo:
        return
    near = [r for r in rows if abs(r.nats - elbo[0].nats) <= within]
    (d_lo, d_hi), (r_lo, r_hi) = ax.get_xlim(), ax.get_ylim()
    d_span = max(r.distortion for r in near) - min(r.distortion for r in near)
    r_span = max(r.kl for r in near) - min(r.kl for r in near)
    crowded = d_span <= ZOOM_SPAN * (d_hi - d_lo) and r_span <= ZOOM_SPAN * (r_hi - r_lo)
    if len(near) < 3 or not crowded:
        return
    from matplotlib.ticker import MaxNLocator  # here: importing this module needs no matplotlib

    inset = ax.inset_axes([0.6, 0.06, 0.37, 0.42])
    _points(inset, near, label=False)
    _elbo_lines(inset, _box([(r.distortion, r.kl) for r in near], pad=0.3, zoom=True), lines=4)
    inset.xaxis.set_major_locator(MaxNLocator(4))
    inset.yaxis.set_major_locator(MaxNLocator(4))
    inset.tick_params(labelsize=7)
    inset.set_title(f"zoom: -ELBO within {within:g} nats of the plain ELBO's", fontsize=7)
    ax.indicate_inset_zoom(inset, edgecolor="0.3")


def plot_rate_distortion(figure_cls, results: list[StrategyResult], path: Path) -> None:
    """Distortion (x) against rate (y), Alemi et al. 2018: one point per strategy.

    Two panels: the rows whose likelihood is a density on the dequantised pixels
    (continuous Bernoulli and Gaussian, comparable), and the Bernoulli rows.
    """
    groups = [
        ("densities on (0, 1): continuous Bernoulli and Gaussian", ("cb", "sigma")),
        ("Bernoulli cross-entropy (not a density)", ("bernoulli",)),
    ]
    groups = [(t, k) for t, k in groups if any(r.likelihood in k for r in results)]
    fig = figure_cls(figsize=(13, 6.4), layout="constrained")
    axes = fig.subplots(1, len(groups), width_ratios=[2.2, 1][: len(groups)], squeeze=False)[0]
    for ax, (title, kinds) in zip(axes, groups, strict=True):
        rows = [r for r in results if r.likelihood in kinds]
        _points(ax, rows, label=True)
        _elbo_lines(ax, _box([(r.distortion, r.kl) for r in rows], pad=2.0))
        _zoom_on_the_elbo(ax, rows)
        ax.set(
            title=title,
            xlabel="distortion  -E log p(x | z)  (nats per test image)",
            ylabel="rate  KL(q(z | x) || p(z))  (nats per test image)",
        )
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(
        "Rate-distortion plane (test set, Alemi et al. 2018): a -ELBO is rate + distortion, "
        "lower-left is better; dotted lines: constant ELBO"
    )
    fig.savefig(path, dpi=110)


def plot_reconstructions(
    figure_cls, originals: Tensor, results: list[StrategyResult], path: Path
) -> None:
    """Test digits (top row) and each strategy's reconstruction (decoder mean at the
    posterior mean), one row per strategy."""
    rows = [("test digits", originals)] + [(r.name, r.reconstructions) for r in results]
    columns = originals.shape[0]
    fig = figure_cls(figsize=(1.0 * columns + 1.6, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for i, (name, images) in enumerate(rows):
        for j in range(columns):
            ax = axes[i, j]
            ax.imshow(to_numpy(images[j].reshape(8, 8)), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(
        "Test digits and reconstructions: the decoder's mean at the posterior mean\n"
        "(continuous Bernoulli rows: its mean, which is not sigmoid(logits))"
    )
    fig.savefig(path, dpi=110)


def plot_kl_per_dim(figure_cls, results: list[StrategyResult], path: Path) -> None:
    """KL of each latent dimension (test set), sorted, one panel per strategy."""
    columns = 4
    rows = -(-len(results) // columns)
    fig = figure_cls(figsize=(3.4 * columns, 2.9 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, sharey=True, squeeze=False).ravel()
    top = max(max(r.kl_per_dim) for r in results) * 1.1
    for ax, r in zip(axes, results, strict=False):
        values = sorted(r.kl_per_dim, reverse=True)
        ax.bar(range(1, len(values) + 1), values, color=_color(r.name))
        if r.name == "free bits":
            ax.axhline(FREE_BITS, ls="--", c="black", lw=0.8, label=f"{FREE_BITS:g} nats free")
            ax.legend(fontsize=7, loc="upper right")
        ax.set(
            title=f"{r.name}: KL {r.kl:.1f}, {r.active_units}/{LATENT_DIMS} active",
            xticks=range(1, len(values) + 1),
            ylim=(0.0, top),
        )
        ax.title.set_fontsize(9)
        ax.set_xlabel("latent dimension (sorted by KL)", fontsize=8)
    for ax in axes[: len(results) : columns]:
        ax.set_ylabel("KL (nats per test image)", fontsize=8)
    for ax in axes[len(results) :]:
        ax.set_visible(False)
    fig.suptitle(
        "KL per latent dimension on the test set (active: posterior-mean variance > 0.01, "
        "Burda et al. 2015)"
    )
    fig.savefig(path, dpi=110)


def plot_beta(figure_cls, results: list[StrategyResult], path: Path) -> None:
    """The KL weight at every training step: the schedules (linear axis) and GECO's
    ``1 / lambda`` (log axis)."""
    fig = figure_cls(figsize=(13, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.6, 1])
    constant: dict[float, list[str]] = {}
    for r in results:
        if r.name == "GECO":
            continue
        if len(set(r.betas)) == 1:  # constant weights: one line per value, names joined
            constant.setdefault(r.betas[0], []).append(r.name)
            continue
        left.plot(range(1, len(r.betas) + 1), r.betas, c=_color(r.name), lw=1.4, label=r.name)
    for value, names in constant.items():
        steps = len(results[0].betas)
        left.plot(
            [1, steps], [value, value], c=_color(names[0]), lw=1.4, ls="--", zorder=1,
            label=" / ".join(names),
        )  # fmt: skip
    left.set(
        title="KL weight beta over training",
        xlabel="optimizer step",
        ylabel="beta",
        ylim=(-0.05, max(max(r.betas) for r in results if r.name != "GECO") * 1.12),
    )
    left.legend(fontsize=8, loc="center right")
    geco = [r for r in results if r.name == "GECO"]
    for r in geco:
        right.plot(range(1, len(r.betas) + 1), r.betas, c=_color(r.name), lw=1.4, label=r.name)
        right.axhline(1.0, ls=":", c="0.5", lw=0.8, label="beta = 1 (plain ELBO)")
        right.set_yscale("log")
        right.set(
            title="GECO: effective beta = 1 / lambda (log scale)",
            xlabel="optimizer step",
            ylabel="1 / lambda",
        )
        right.legend(fontsize=8)
    if not geco:
        right.set_visible(False)
    fig.suptitle("KL weight in force at each training step")
    fig.savefig(path, dpi=110)


def write_figures(
    figure_cls, originals: Tensor, results: list[StrategyResult], out: Path, names: tuple
) -> list[Path]:
    """All four figures into ``out``, under ``names`` (rate-distortion, reconstructions,
    KL per dimension, beta); returns the paths."""
    paths = [out / name for name in names]
    with torch.no_grad():
        plot_rate_distortion(figure_cls, results, paths[0])
        plot_reconstructions(figure_cls, originals, results, paths[1])
        plot_kl_per_dim(figure_cls, results, paths[2])
        plot_beta(figure_cls, results, paths[3])
    return paths
