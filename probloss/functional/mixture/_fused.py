r"""The machinery of the fused mixture kernels and of the plain path's dead components.

Fused kernels. With ``fused=True`` (the default) the diagonal and bivariate mixtures run a
``torch.autograd.Function`` whose backward is written by hand from the responsibilities.
Besides its inputs it keeps for the backward only the standardised residuals ``(*, K, D)``,
the responsibilities and the mixture weights ``(*, K)`` and the value ``(*)``, works in
place on as few fresh buffers as possible and handles the small event dimension one
coordinate plane at a time (torch's CPU loops over a broadcast innermost dimension of size
2 run 2 elements per call); ``benchmarks/bench_mixture.py`` measures its speed and peak
memory against the plain path. ``fused=False`` is the plain autograd composition of the
component log density and :func:`mixture_log_prob`. Both agree to the rounding of the terms
involved (tested: within ``1e-5`` (float32) / ``1e-12`` (float64) times the sum of the
magnitudes of the terms, in value and every gradient). The fused kernels run on the CPU,
eager or compiled (:func:`_fused_runs`: decided from the tensors' devices and types, never
their values); off the CPU and under ``torch.func`` transforms the plain path runs. They
are exact for every input: their fast formulas hold where ``exp`` of ``log_scale`` is a
normal float and, for the bivariate one, ``|atanh_rho|`` is below 42.3 (float32) / 352.8
(float64), where its backward cannot overflow; beyond, each kernel takes an exact fallback
of its own (:func:`_within_fused_bounds`: one ``aminmax`` pass each decides, read inside
the operator, where the tensors are real even in compiled code). Forward and backward are
operators (:func:`~probloss._core.ops.kernel_op`) under a ``setup_context``
``autograd.Function``, so ``torch.compile`` keeps them as single calls. A component
whose residual or quadratic form overflows (``1e6`` at ``log_scale = -80`` in float32)
has term ``-inf`` and gradient exactly 0 in both paths. The fused backward is not itself
differentiated: a double backward (``create_graph=True``, Hessians, ``gradgradcheck``)
recomputes the gradients through the plain path, so it is exact but not fast.

Responsibilities below ``2 exp(-86) = 9e-38`` (float32) / ``2 exp(-707) = 1.8e-307``
(float64) times the largest are flushed to exactly 0, and the others shifted by at most
that in absolute terms, in both paths (tested): torch's CPU ``exp`` takes a slow scalar
path on inputs whose result is subnormal or 0, which far-away components produce in every
batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._core.ops import host_readable
from ...special.exp import mul_exp
from .._params import split_residual, standardized_value, sum_to_size_rescaled

# Event sizes up to this are handled one (*, K) coordinate plane at a time; larger ones with
# broadcasting ops over the whole (*, K, D) block, whose innermost loop is then long enough.
_PLANAR_MAX_D = 4


def _residuals(value: Tensor, loc: Tensor, shape: torch.Size) -> Tensor:
    """``value[..., None, :] - loc`` as a new contiguous tensor of shape ``(*shape, D)``."""
    d = value.shape[-1]
    out = value.new_empty((*shape, d))
    if d <= _PLANAR_MAX_D:
        # One (*, K) plane per coordinate: 5-10x faster on CPU than the broadcast over K,
        # whose innermost dimension D = 2 would be looped over 2 elements at a time.
        for i in range(d):
            torch.sub(value[..., i, None].expand(shape), loc[..., i].expand(shape), out=out[..., i])
    else:
        torch.sub(value.unsqueeze(-2).expand(out.shape), loc.expand(out.shape), out=out)
    return out


def _planes_mul(z: Tensor, w: Tensor) -> Tensor:
    """``z * w[..., None]`` for ``z (*, K, D)`` and ``w (*, K)``, into a new tensor."""
    out = torch.empty_like(z)
    if z.shape[-1] <= _PLANAR_MAX_D:
        for i in range(z.shape[-1]):
            torch.mul(z[..., i], w, out=out[..., i])
    else:
        torch.mul(z, w.unsqueeze(-1), out=out)
    return out


def _planes_sub_(t: Tensor, w: Tensor) -> Tensor:
    """In place ``t -= w[..., None]`` for ``t (*, K, D)`` and ``w (*, K)``."""
    if t.shape[-1] <= _PLANAR_MAX_D:
        for i in range(t.shape[-1]):
            t[..., i].sub_(w)
        return t
    return t.sub_(w.unsqueeze(-1))


def _standardized(value: Tensor, loc: Tensor, log_scale: Tensor, shape: torch.Size) -> Tensor:
    """``z = (value - loc) e^{-log_scale}``, shape ``(*shape, D)``, new and contiguous.

    Bitwise the plain path's ``z`` (:func:`~probloss.functional._params.split_residual` and
    :func:`~probloss.special.mul_exp`, one multiplication by ``exp(-log_scale)`` in the fused
    domain): where two components' terms are within an ulp of each other, a different
    rounding of ``z`` (``r / exp(s)`` rounds ``exp(8.6e-17)`` to 1 in float64, ``exp(-8.6e-17)``
    is ``1 - 2^-53``) decides their responsibilities, so both paths round alike. A residual
    that overflowed (``value - loc`` of huge opposite numbers) is ``inf`` here and is
    recomputed by :func:`_rescue_overflowed_residuals_`.
    """
    z = _residuals(value, loc, shape)
    return z.mul_(torch.neg(log_scale).exp_())


def _standardized_anywhere(
    value: Tensor, loc: Tensor, log_scale: Tensor, shape: torch.Size
) -> Tensor:
    """``z`` of shape ``(*shape, D)``, new and contiguous, exact for every ``log_scale``:
    the plain path's :func:`~probloss.functional._params.standardized_value` (one
    :func:`~probloss.special.mul_exp`, bitwise its ``z``), for inputs outside
    :func:`_within_fused_bounds`."""
    z = standardized_value(value.unsqueeze(-2), loc, log_scale)
    return z.expand((*shape, value.shape[-1])).contiguous()


def _rescue_overflowed_residuals_(z: Tensor, value: Tensor, loc: Tensor, log_scale: Tensor) -> bool:
    """In place ``z = ((value/2 - loc/2) e^{-log_scale}) 2`` where ``value - loc`` overflowed.

    ``3.4e38 - (-1.3e36)`` overflows float32 while ``z`` at ``log_scale = 85.8`` is 19: the
    component's term is finite (``-345``, not ``-inf``). Halving is exact in the range
    where a difference can overflow; the factor 2 is applied last, so ``z`` overflows only
    where it is beyond the float range: :func:`~probloss.functional._params.split_residual`,
    as in the plain path (bitwise). Returns
    whether any entry was recomputed. Called only where some ``z`` is infinite or some
    term ``-inf`` (one host read of a reduction, where :func:`host_readable`).
    """
    r, m = split_residual(value.unsqueeze(-2), loc)
    over = m != 1  # m = 2 exactly where a difference of finite numbers overflowed
    if host_readable(over) and not bool(over.any()):
        return False  # unread (an accelerator): recomputed, counted as changed
    z.copy_(torch.where(over, (r * torch.exp(-log_scale)) * m, z))
    return True


def _joint_init(logits: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor]:
    """``(log_softmax(logits), softmax(logits))``, the first as a new tensor of the full
    ``(*, K)`` shape to add into, the second (the weights, for the backward) as ``logits``."""
    j = torch.log_softmax(logits, -1)
    weights = torch.exp(j)  # one pass; a second softmax kernel in the backward costs 3
    return (j if j.shape == shape else j.expand(shape).clone()), weights


def _any_dead(j: Tensor) -> bool:
    """Whether some joint term is ``-inf`` (or NaN): one ``amin`` pass, read on the host
    where :func:`host_readable` (else True: the fill after it is then always done, which is
    exact either way). False in the common case."""
    if not host_readable(j):
        return True
    return j.numel() > 0 and not bool(j.amin() > -math.inf)


def _clear_dead_(z: Tensor, j: Tensor, known_dead: bool | None = None) -> None:
    """In place ``z = 0`` for the components whose joint term ``j`` is ``-inf``.

    Such a component (a zero weight, or a quadratic form beyond the float range: a
    residual of ``1e6`` at ``log_scale = -80`` in float32) has responsibility exactly 0 and
    so an exactly zero gradient; but its ``z`` may be infinite, or huge enough that a
    backward factor (``z1 - z2``) overflows, and ``0 * inf`` is NaN. Its ``z`` is used only
    by the backward, where with ``w = 0`` any finite value gives the exact 0. The fill is
    skipped when no term is ``-inf`` (:func:`_any_dead`, unless ``known_dead`` says), the
    common case.
    """
    if not (_any_dead(j) if known_dead is None else known_dead):  # NaN: fill (stays NaN)
        return
    z.masked_fill_((j == -math.inf).unsqueeze(-1), 0.0)


def _weighted_responsibilities(grad: Tensor, resp: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """``(g, w)`` of the fused backwards: the incoming gradient ``g`` as ``(*, 1)``, 0 in rows
    whose value is ``-inf`` (no component can produce the target: gradient 0), and the
    weighted responsibilities ``w = g r`` ``(*, K)``."""
    g = torch.where(lse == -math.inf, 0.0, grad).unsqueeze(-1)
    return g, resp * g


def _location_scale_grads(
    a: Tensor,
    z: Tensor,
    w: Tensor,
    log_scale: Tensor,
    needed: tuple[bool, bool, bool],
    scale_is_normal: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(d/dvalue, d/dloc, d/dlog_scale)`` of the fused kernels from ``a = w d(Q/2)/dz``.

    ``a (*, K, D)`` is the weighted derivative of the half quadratic form by the
    standardised residual ``z`` (``w z`` for diagonal components), so that
    ``d/dloc = a / sigma``, ``d/dvalue = -sum_k d/dloc`` (:func:`_summed_value_gradient`)
    and ``d/dlog_scale = z a - w``. ``needed`` says which of the three are wanted (``None``
    for the others); ``a`` is overwritten when ``d/dlog_scale`` is. Where ``e^{log_scale}``
    may not be a normal float (``scale_is_normal`` False) ``d/dloc = a e^{-log_scale}`` is
    one :func:`~probloss.special.mul_exp` (exact wherever it is representable, 0 for
    ``a = 0`` where ``e^{-log_scale}`` overflows).
    """
    need_value, need_loc, need_log_scale = needed
    d_value = d_loc = d_log_scale = None
    if need_value or need_loc:
        if not scale_is_normal:
            d_loc = mul_exp(a, -log_scale)
        else:
            scale = torch.exp(log_scale)
            # into the fresh buffer of the scale when it has the full shape
            d_loc = torch.div(a, scale, out=scale) if scale.shape == a.shape else a / scale
        if need_value:
            d_value = _summed_value_gradient(d_loc, a, log_scale)
    if need_log_scale:
        d_log_scale = _planes_sub_(a.mul_(z), w)  # z_i a_i - w
    return d_value, d_loc, d_log_scale


def _logits_grad_(w: Tensor, weights: Tensor, g: Tensor) -> Tensor:
    """``d/dlogits = w - g pi``, in place into ``w`` (its last use)."""
    return w.addcmul_(weights, g, value=-1.0)


def _summed_value_gradient(d_loc: Tensor, a: Tensor, log_scale: Tensor) -> Tensor:
    """``d/dvalue = -sum_k d/dloc_k`` (*, D) of the fused kernels, ``d/dloc = a e^{-log_scale}``.

    Finite where two components' ``d/dloc`` overflow with opposite signs but their sum
    does not (:func:`sum_to_size_rescaled`): ``loc = +-1.8e-30``, ``log_scale = -80``,
    value 0 in float32 gave NaN, exact 0.
    """

    def log_abs(wide: torch.dtype) -> Tensor:
        return a.to(wide).abs().log() - log_scale.to(wide)

    shape = (*d_loc.shape[:-2], 1, d_loc.shape[-1])
    return sum_to_size_rescaled(-d_loc, shape, -a.sign(), log_abs).squeeze(-2)


def _double_backward(ctx, grad: Tensor, plain) -> tuple[Tensor | None, ...]:
    """First derivatives recomputed through the plain path, differentiably (create_graph)."""
    inputs = ctx.saved_tensors[: len(ctx.needs_input_grad)]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=True) if need]
    with torch.enable_grad():
        out = plain(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


def _fused_outputs_fake(value: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, *rest):
    """Shapes of the fused forwards: ``(log p (*), z (*, K, D), r (*, K), pi)``."""
    shape = torch.broadcast_shapes(
        (*value.shape[:-1], 1), logits.shape, loc.shape[:-1], log_scale.shape[:-1],
        *(t.shape for t in rest),
    )  # fmt: skip
    return (
        value.new_empty(shape[:-1]),
        value.new_empty((*shape, value.shape[-1])),
        value.new_empty(shape),
        logits.new_empty(logits.shape),
    )


def _grads_fake(inputs: tuple[Tensor, ...], needed: tuple[bool, ...]) -> tuple[Tensor, ...]:
    """Shapes of the fused backwards: each input's gradient, or an empty tensor if unneeded."""
    return tuple(
        t.new_empty(t.shape if n else (0,)) for t, n in zip(inputs, needed, strict=True)
    )


def _without_dead_components(
    components, value: Tensor, loc: Tensor, *params: tuple[Tensor, float | Tensor, int]
) -> Tensor:
    """Component log densities ``(*, K)`` whose ``-inf`` entries carry an exactly zero gradient.

    ``components(x, loc, *tensors)`` evaluates them from targets ``x`` (``(*, 1, D)`` or
    ``(*, K, D)``), ``loc (*, K, D)`` and the other parameters; ``params`` are
    ``(tensor, safe value, event dimensions after K)``: ``(log_scale, 0.0, 1)``,
    ``(atanh_rho, 0.0, 0)``.

    A component whose quadratic form overflows (log density ``-inf``: a target infinitely
    many of its scales away, or at infinity) has responsibility 0, but autograd through its
    density multiplies that 0 by an infinite derivative (NaN). Such components are found
    after one evaluation and evaluated again at a safe point (the mean moved onto the
    target, the parameters' safe values: a residual of 0 at unit scale), with ``-inf`` put back as a
    constant: the double-where pattern, applied to a condition known only after
    evaluation. (At the mean alone, a residual of ``3e38`` in both coordinates still
    overflowed the bivariate ``z1 - z2`` at unit scale, and a target of ``inf`` gave
    ``inf - inf``: NaN.) On CPU, outside tracing, when no component is dead (one host read
    of a reduction, free there) the first evaluation is returned as it is.
    """
    x = value.unsqueeze(-2)
    tensors = [t for t, _, _ in params]
    if host_readable(value, loc, *tensors):
        first = components(x, loc, *tensors)
        dead = (first == -math.inf).detach()
        if not bool(dead.any()):
            return first
    else:  # no host read: always the second evaluation; the first needs no graph
        with torch.no_grad():
            dead = components(x, loc, *tensors) == -math.inf
    return torch.where(dead, -math.inf, components(*_at_safe_points(dead, x, loc, *params)))


def _at_safe_points(
    idle: Tensor, x: Tensor, loc: Tensor, *params: tuple[Tensor, float | Tensor, int]
) -> list[Tensor]:
    """``[x, loc, *tensors]`` with the components where ``idle`` (``(*, K)``) moved to a safe
    point, where their density and its derivatives are finite: mean := target (detached),
    a residual of exactly 0, and each parameter its safe value (``params`` as in
    :func:`_without_dead_components`).

    The target keeps its shape ``(*, 1, D)``, so that its gradient is summed over K inside
    the density's backward (``sum_to_size_rescaled``: finite where two components' terms
    overflow with opposite signs). A row whose components are all idle (a target at
    infinity) has its target set to 0.
    """
    x_safe = torch.where(idle.all(-1)[..., None, None], 0.0, x)
    safe = [x_safe, torch.where(idle.unsqueeze(-1), x_safe.detach(), loc)]
    for t, fill, event_dims in params:
        mask = idle[(..., *(None,) * event_dims)]
        safe.append(torch.where(mask, torch.as_tensor(fill, dtype=t.dtype, device=t.device), t))
    return safe


def _fused_runs(*tensors: Tensor) -> bool:
    """Whether the fused kernels are used: every tensor on the CPU (known while tracing, so
    no host read decides it) and none wrapped by a ``torch.func`` transform (there the plain
    path runs, which every transform, forward-mode and higher derivatives included, can
    differentiate). Eager and compiled code on the CPU both take the kernels; the kernels
    themselves stay exact for every input (:func:`_within_fused_bounds`)."""
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    if torch.compiler.is_compiling():  # dynamo cannot trace the check below: none needed
        return on_cpu
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return on_cpu and not any(is_wrapped(t) for t in tensors)


def _within_fused_bounds(log_scale: Tensor, atanh_rho: Tensor | None = None) -> bool:
    """Whether the kernels' fast formulas hold for these inputs: ``|log_scale|`` and
    ``|atanh_rho|`` below the bounds of :func:`_fused_bounds`. Read inside the operators
    (real CPU tensors even while the caller is compiled: one ``aminmax`` pass each, free
    there); outside the bounds each kernel takes its exact fallback.

    The kernels take ``exp`` of ``log_scale``, which must be a normal float:
    ``|log_scale| < -log(tiny) - 1`` (86 in float32, 707 in float64); beyond, the
    diagonal kernel forms ``z`` and ``d/dloc`` with :func:`~probloss.special.mul_exp`
    instead. The bivariate backward forms ``A = w dQ/dz`` before dividing by the scale, with
    a factor ``M e^{|a|}`` where ``M^2 <= 8 Q`` is finite: ``A`` cannot overflow (where
    ``A / s`` would not) while ``e^{|a|} sqrt(8 max) <= max / e``, i.e.
    ``|atanh_rho| < (log(max) - log 8) / 2 - 1`` (42.3 in float32, 352.8 in float64; at
    ``|a| = 64`` in float32 a finite ``d/dloc`` of 1e17 came out ``inf``); beyond either
    bound the bivariate kernel evaluates the single density's exact forward and backward per
    component. Nothing else limits them: a standardised residual or quadratic form beyond
    the float range makes its component's term ``-inf`` and its gradient exactly 0
    (:func:`_clear_dead_`), which is exact, since its responsibility is below any float.
    NaN is outside the bounds.
    """
    checks = [(log_scale, _fused_bounds(log_scale.dtype)[0])]
    if atanh_rho is not None:
        checks.append((atanh_rho, _fused_bounds(atanh_rho.dtype)[1]))
    for t, bound in checks:
        if t.numel() == 0:
            continue
        low, high = torch.aminmax(t)
        if not (bool(low > -bound) and bool(high < bound)):  # also False for NaN
            return False
    return True


def _fused_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """``(log_scale bound, atanh_rho bound)`` of the kernels (:func:`_within_fused_bounds`)."""
    finfo = torch.finfo(dtype)
    return -math.log(finfo.tiny) - 1.0, 0.5 * (math.log(finfo.max) - math.log(8.0)) - 1.0
