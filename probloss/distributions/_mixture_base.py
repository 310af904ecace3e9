r"""What the mixture distributions share: their parameter constraints, ``expand``, and the
base class of the Gaussian mixtures (weights, sampling at a temperature, mean, mode)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, constraints

from .._core.dtype import upcast
from .._core.shapes import mixture_parameters
from .._core.validation import distribution_validate_args, set_validation, validate_sample
from ..functional.mixture import normal_mixture_mean, normal_mixture_mode

VECTOR = constraints.independent(constraints.real, 1)  # (*, K) or (*, P)
MATRIX = constraints.independent(constraints.real, 2)  # (*, K, D)


def expand_parameters(
    dist: Distribution, batch_shape: torch.Size | tuple[int, ...], _instance: Distribution | None
) -> Distribution:
    """``dist.expand(batch_shape)``: each parameter named in ``dist.arg_constraints``
    expanded (a view) to ``(*batch_shape, *its trailing shape)``; validation as ``dist``'s."""
    new = dist._get_checked_instance(type(dist), _instance)
    batch_shape = torch.Size(batch_shape)
    for name in dist.arg_constraints:
        t = getattr(dist, name)
        trailing = t.shape[len(dist.batch_shape) :]
        setattr(new, name, t.expand((*batch_shape, *trailing)))
    Distribution.__init__(new, batch_shape, dist.event_shape, validate_args=False)
    new._validate_args = dist._validate_args
    return new


class GaussianMixture(Distribution):
    """What the Gaussian mixtures share: weights, ``log_prob``, sampling with temperature,
    ``expand``, and the mean and the most-probable-component mode (the same for every ``D``).

    A subclass lists its parameters in the functional core's order as the keys of
    ``arg_constraints`` and names its functional log density and sampler.
    """

    support = constraints.real_vector
    has_rsample = False
    arg_constraints: ClassVar[dict[str, constraints.Constraint]]  # the parameters, in order
    _log_prob_fn: ClassVar  # (value, *parameters) -> log density
    _sample_fn: ClassVar  # (*parameters, temperature=, sample_shape=, generator=) -> draws

    def _init_params(self, event_size: int | None, validate_args: bool | None, **named) -> None:
        # checked, promoted (half stays half) and broadcast to the common batch shape
        tensors, dtype = mixture_parameters(event_size, **named)
        for name, t in zip(named, tensors, strict=True):
            setattr(self, name, t.to(dtype))
        batch_shape = self.logits.shape[:-1]
        event_shape = self.loc.shape[-1:]
        validate_args = distribution_validate_args(validate_args, *tensors)
        super().__init__(batch_shape, event_shape, validate_args=False)  # checked next, faster
        set_validation(self, validate_args)

    def _parameters(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in self.arg_constraints)

    def expand(self, batch_shape: torch.Size, _instance=None):
        return expand_parameters(self, batch_shape, _instance)

    @property
    def num_components(self) -> int:
        """The number of components ``K``."""
        return self.logits.shape[-1]

    @property
    def mixture_weights(self) -> Tensor:
        """``softmax(logits)``, shape ``(*batch_shape, K)``; sums to 1 over ``K``."""
        return torch.softmax(upcast(self.logits), -1).to(self.logits.dtype)

    @property
    def mixture_distribution(self) -> Categorical:
        """The component index as ``torch.distributions.Categorical(logits=logits)``."""
        return Categorical(logits=self.logits, validate_args=False)

    @property
    def mean(self) -> Tensor:
        """``sum_k pi_k mu_k``, shape ``(*batch_shape, D)``."""
        return normal_mixture_mean(self.logits, self.loc)

    @property
    def mode(self) -> Tensor:
        """The mean of the most probable component (not the density's highest point)."""
        return normal_mixture_mode(self.logits, self.loc)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        raise NotImplementedError(
            f"{type(self).__name__} has no reparameterised sampler (has_rsample=False): the "
            "component index is discrete. For the conditional pathwise draw (gradient to "
            "loc / log_scale only, none to logits) call "
            "probloss.functional.mixture.sampling directly"
        )

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        """Draws ``(*sample_shape, *batch_shape, *event_shape)`` from torch's global RNG."""
        return self.sample_with_temperature(1.0, sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        validate_sample(self, value)
        return self._log_prob_fn(value, *self._parameters())

    def sample_with_temperature(
        self,
        temperature: float,
        sample_shape: torch.Size | tuple[int, ...] = (),
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws at temperature ``tau`` (``0``: the ``mode``); see the family's sampler in
        :mod:`probloss.functional.mixture.sampling` for the temperature semantics."""
        with torch.no_grad():
            return self._sample_fn(
                *self._parameters(),
                temperature=temperature,
                sample_shape=sample_shape,
                generator=generator,
            )
