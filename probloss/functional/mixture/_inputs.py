r"""Inputs and outputs of the mixture log densities and NLLs: shapes, dtypes, NaN targets.

* :func:`_mixture_shapes`, :func:`_normal_inputs`, :func:`_bivariate_inputs`:
  ``value (*, D)``, ``logits (*, K)``, components ``(*, K, D)``, errors naming the argument,
  the expected layout and where ``K`` and ``D`` came from;
* :func:`_targets`: the NLLs' ``nan_policy``, NaN events rejected or masked;
* :func:`_mixture_nll`: the steps every reduced mixture loss takes around its density;
* :func:`_grad_to`, :func:`_grads_to`, :func:`_filled_grads`: the fused backwards'
  gradients summed to the shapes of their (broadcast) inputs.

(The samplers and summaries check theirs with
:func:`probloss._core.shapes.mixture_parameters`.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._core.dtype import as_loss_tensors
from ..._core.reduction import (
    check_nan_policy,
    check_reduction,
    check_value_batch,
    mask_nan_events,
    reduce_loss,
)
from ..._core.validation import check_not_nan, should_validate


def _shape_error(name: str, t: Tensor, expected: str, detail: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected} ({detail}); got {tuple(t.shape)}")


def _mixture_shapes(
    value: Tensor, logits: Tensor, components: dict[str, Tensor], event: int | None
) -> tuple[int, int, torch.Size]:
    """Check ``value (*, D)``, ``logits (*, K)`` and ``(*, K, D)`` component parameters.

    Returns ``(K, D, batch)`` with ``batch`` the broadcast ``(*)``. ``event`` fixes ``D``.
    """
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise _shape_error("logits", logits, "(*, K)", "K >= 1 mixture components")
    k = logits.shape[-1]
    if value.dim() == 0 or (event is not None and value.shape[-1] != event):
        size = "D" if event is None else str(event)
        raise _shape_error("value", value, f"(*, {size})", "the event in the last dimension")
    d = value.shape[-1]
    for name, t in components.items():
        if t.dim() < 2 or t.shape[-2:] != (k, d):
            raise _shape_error(
                name,
                t,
                f"(*, K, D) = (*, {k}, {d})",
                f"K = {k} from logits {tuple(logits.shape)}, D = {d} from value "
                f"{tuple(value.shape)}",
            )
    batches = {"value": value.shape[:-1], "logits": logits.shape[:-1]}
    batches.update({name: t.shape[:-2] for name, t in components.items()})
    return k, d, _broadcast_batch(batches)


def _broadcast_batch(batches: dict[str, torch.Size], extra: str = "") -> torch.Size:
    try:
        return torch.broadcast_shapes(*batches.values())
    except RuntimeError:
        listed = ", ".join(f"{name} {tuple(s)}" for name, s in batches.items())
        raise ValueError(f"batch shapes (*) do not broadcast: {listed}{extra}") from None


def _normal_inputs(value, logits, loc, log_scale) -> tuple[Tensor, ...]:
    value, logits, loc, log_scale = as_loss_tensors(
        value=value, logits=logits, loc=loc, log_scale=log_scale
    )
    _mixture_shapes(value, logits, {"loc": loc, "log_scale": log_scale}, None)
    return value, logits, loc, log_scale


def _bivariate_inputs(value, logits, loc, log_scale, atanh_rho) -> tuple[Tensor, ...]:
    value, logits, loc, log_scale, atanh_rho = as_loss_tensors(
        value=value, logits=logits, loc=loc, log_scale=log_scale, atanh_rho=atanh_rho
    )
    k, _, batch = _mixture_shapes(value, logits, {"loc": loc, "log_scale": log_scale}, 2)
    if atanh_rho.dim() == 0 or atanh_rho.shape[-1] != k:
        raise _shape_error(
            "atanh_rho",
            atanh_rho,
            f"(*, K) = (*, {k})",
            f"K = {k} from logits {tuple(logits.shape)}",
        )
    _broadcast_batch(
        {"batch of value, logits, loc, log_scale": batch, "atanh_rho": atanh_rho.shape[:-1]}
    )
    return value, logits, loc, log_scale, atanh_rho


def _targets(value: Tensor, loc: Tensor, nan_policy: str, validate_args: bool | None):
    """``(value, mask)`` for the NLLs: NaN events masked (``"mask"``: filled with the mean of
    component 0, detached, where every standardised residual of that component is 0) or
    rejected."""
    if nan_policy == "mask":
        return mask_nan_events(value, loc[..., 0, :], event_dims=1)
    if should_validate(validate_args, value):
        check_not_nan(value, "value")
    return value, None


# Trailing (non-batch) dimensions of each mixture parameter: (*, K) or (*, K, D).
_PARAMETER_DIMS = {"logits": 1, "loc": 2, "log_scale": 2, "atanh_rho": 1}


def _mixture_nll(
    density,
    checked_inputs,
    event: str,
    inputs: dict[str, Tensor],
    reduction: str,
    nan_policy: str,
    validate_args: bool | None,
) -> Tensor:
    """``-density(value, *parameters, fused=True)``, reduced: the steps of every mixture NLL.

    The settings are checked first, then the inputs (``checked_inputs``, e.g.
    :func:`_normal_inputs`, of ``inputs``: ``value`` first, then the parameters by name);
    a reduced loss refuses a parameter that would enlarge the targets' batch shape
    (``check_value_batch``, ``event`` naming the event shape in its message), NaN events
    are masked or rejected (:func:`_targets`), and the per-event losses reduced.
    """
    check_reduction(reduction)
    check_nan_policy(nan_policy)
    value, *params = checked_inputs(*inputs.values())
    if reduction != "none":
        batches = {
            name: p.shape[: -_PARAMETER_DIMS[name]]
            for name, p in zip(list(inputs)[1:], params, strict=True)
        }
        check_value_batch(value.shape[:-1], event, **batches)
    value, mask = _targets(value, params[1], nan_policy, validate_args)  # params[1]: loc
    loss = -density(value, *params, fused=True)
    return reduce_loss(loss, reduction, mask=mask)


def _grad_to(grad: Tensor | None, t: Tensor, needed: bool) -> Tensor | None:
    """``grad`` summed over broadcast dimensions to the shape of input ``t``, if needed."""
    return grad.sum_to_size(t.shape) if needed and grad is not None else None


def _grads_to(
    grads: tuple[Tensor | None, ...], inputs: tuple[Tensor, ...], needed: tuple[bool, ...]
) -> tuple[Tensor | None, ...]:
    """:func:`_grad_to` of each gradient and its input: a backward's return value."""
    return tuple(_grad_to(g, t, n) for g, t, n in zip(grads, inputs, needed, strict=True))


def _filled_grads(
    grads: tuple[Tensor | None, ...], inputs: tuple[Tensor, ...], needed: tuple[bool, ...]
) -> tuple[Tensor, ...]:
    """:func:`_grads_to` for an operator, which returns tensors only: an unneeded gradient
    is an empty tensor (the ``autograd.Function`` turns it into None)."""
    summed = _grads_to(grads, inputs, needed)
    return tuple(t.new_empty(0) if g is None else g for g, t in zip(summed, inputs, strict=True))
