"""Helpers shared by the tests of ``probloss.vae``: random decoder data (reconstruction and
sigma-VAE tests) and exact float64 inputs and stepping for the weighting strategies
(``test_weighting.py``, ``test_constrained.py``)."""

from __future__ import annotations

import torch

from probloss.vae.weighting import Weighting

F64 = torch.float64


def _data(seed=0, shape=(3, 2, 5), unit=False):
    """Random float64 data and decoder output; with ``unit`` the data lies in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    loc = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (x.sigmoid() if unit else x), loc


def t64(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=F64)


def vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def leaves(distortion: float, kl: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.tensor(distortion, dtype=F64, requires_grad=True)
    k = torch.tensor(kl, dtype=F64, requires_grad=True)
    return d, k


def advance(weighting: Weighting, n: int) -> None:
    for _ in range(n):
        weighting.step()
