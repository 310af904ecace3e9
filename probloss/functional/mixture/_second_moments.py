r"""Second moments of Gaussian mixtures with gradients that are never ``inf - inf``.

The entries of a mixture covariance (law of total covariance),

.. math::
    C_p = \sum_k \pi_k Q_{kp}, \qquad Q_{kp} = \Sigma_{k,ij} + d_{ki} d_{kj}, \qquad
    d_k = \mu_k - m, \quad m = \sum_k \pi_k \mu_k,

for the pairs ``p = (i, j)`` asked for (the diagonal of a diagonal mixture, or the three
entries of a bivariate one; :math:`\Sigma_{k,ii} = \sigma_{ki}^2`,
:math:`\Sigma_{k,ij} = \rho_k\sigma_{ki}\sigma_{kj}`), have the gradients

.. math::
    \frac{\partial C_p}{\partial \ell_k} = \pi_k (Q_{kp} - C_p), \quad
    \frac{\partial C_p}{\partial \mu_{ka}} = \pi_k(\delta_{ia} d_{kj} + \delta_{ja} d_{ki}),
    \quad \frac{\partial C_p}{\partial \log\sigma_{ka}} = \pi_k \Sigma_{k,ij}
        (\delta_{ia} + \delta_{ja}), \quad
    \frac{\partial C_{ij}}{\partial a_k} = \pi_k \operatorname{sech}^2(a_k)
        \sigma_{ki}\sigma_{kj}

(:math:`\sum_k \pi_k d_k = 0` removes every term through :math:`m`). Autograd of the sum
forms :math:`\pi_k Q_{kp}` and :math:`\pi_k C_p` apart (softmax backward): where both
overflow, ``inf - inf = NaN`` although the difference is a defined ``+-inf`` (or finite).
:class:`_SecondMoments` therefore writes the backward by hand from the identities above.

Everything is computed in float64 (float32 and half inputs too, rounded once at the
end: exponents such as ``2 log_scale`` of ``3e38`` stay finite there, and a term
``e^{x}`` with ``x`` a sum of float32 logarithms that cancel is exact). Each value and
gradient is first formed directly (weights applied by
:func:`~probloss.special.mul_exp`); where that is not finite it is replaced by the same
expression summed in signed log space (:func:`_qsum`), exact to ``eps64`` times the size
of the exponents. Log magnitudes are carried divided by 4 (exact), so that sums of up to
four logarithms near ``finfo(float64).max`` stay finite, and as double-floats
``L + E`` (:func:`_two_sum`): a sum of exponents such as ``1.7e21 + 3.4e38`` keeps its
low part, which decides the sign where two overflowing terms of opposite signs have
exponents that agree to float64 precision (a tie, read as an exact cancellation to 0,
where mpmath says ``+inf``). A value or gradient beyond the
range of the output dtype is then ``+-inf`` with its exact sign, never NaN. The backward
is not differentiable again (``once_differentiable``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..._core.ops import host_readable, kernel_op
from ...special import log_cosh, mul_exp
from ._quarter_logs import _qadd, _qlog, _qlse, _qsum, _qvalue, _qzero, _two_sum
from ._weights import _half_mixture_mean, _weights

_LOG2_4 = math.log(2.0) / 4.0


# ---------------------------------------------------------------- the moments


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype both paths run in: float64 (float32 exponents of 3e38 double there)."""
    return torch.float64 if dtype != torch.float64 else dtype


def _pairs(event_size: int, bivariate: bool) -> tuple[list[int], list[int]]:
    if bivariate:
        return [0, 0, 1], [0, 1, 1]
    return list(range(event_size)), list(range(event_size))


class _Terms:
    """The pieces of both paths for one set of parameters (in one dtype)."""

    def __init__(self, logits, loc, log_scale, atanh_rho, bivariate, quarter: bool):
        self.I, self.J = _pairs(loc.shape[-1], bivariate)  # first / second coordinate of p
        pairs = zip(self.I, self.J, strict=True)
        self.off = torch.tensor([i != j for i, j in pairs], device=loc.device)
        self.log_w, self.zero, self.total = _weights(logits)
        # m / 2, never beyond the range although m may be (float64 means near its max)
        half_m = _half_mixture_mean(self.log_w, self.zero, self.total, loc)
        alive = ~self.zero.unsqueeze(-1)  # (*, K, 1)
        self.half_dev = torch.where(alive, 0.5 * loc - half_m.unsqueeze(-2), 0.0)
        self.ls = torch.where(alive, log_scale, 0.0)
        self.rho = None if atanh_rho is None else torch.tanh(atanh_rho)
        self.a = atanh_rho
        if not quarter:
            return
        # quarter-logs (double-floats): pi_k, |d_ki| (d = 2 (mu/2 - m/2), exact), sigma_ki
        lw4 = _two_sum(logits / 4.0, -logits.amax(-1, keepdim=True) / 4.0)
        lse, lse_e = _qlse(*lw4, -1)
        Lpi = _qadd(lw4, (-lse.unsqueeze(-1), -lse_e.unsqueeze(-1)))
        self.Lpi = torch.where(self.zero, -math.inf, Lpi[0])
        self.Epi = torch.where(self.zero, 0.0, Lpi[1])
        Ld, _, self.Sd = _qlog(self.half_dev)
        self.Ld, self.Ed = _two_sum(Ld, _LOG2_4)
        self.Ls = self.ls / 4.0

    def coefficient(self) -> Tensor:
        """``(*, K, P)``: 1 on the diagonal, ``rho_k`` off it."""
        shape = (*self.ls.shape[:-1], len(self.I))
        if self.rho is None:
            return torch.ones(shape, dtype=self.ls.dtype, device=self.ls.device)
        return torch.where(self.off, self.rho.unsqueeze(-1), 1.0).expand(shape)

    # quarter-log terms, (*, K, P), without the weight
    def pi(self, *lead: int) -> tuple[Tensor, Tensor]:
        """``(L, E)`` of ``pi_k`` with ``lead`` trailing dimensions added."""
        L, E = self.Lpi, self.Epi
        for _ in lead:
            L, E = L.unsqueeze(-1), E.unsqueeze(-1)
        return L, E

    def q_sigma(self) -> tuple[Tensor, Tensor, Tensor]:
        Lc, Ec, Sc = _qlog(self.coefficient())
        L, E = _qadd((self.Ls[..., self.I], 0.0), (self.Ls[..., self.J], 0.0), (Lc, Ec))
        return L, E, Sc

    def q_dev(self) -> tuple[Tensor, Tensor, Tensor]:
        i, j = self.I, self.J
        L, E = _qadd((self.Ld[..., i], self.Ed[..., i]), (self.Ld[..., j], self.Ed[..., j]))
        return L, E, self.Sd[..., i] * self.Sd[..., j]

    def q_Q(self) -> tuple[Tensor, Tensor, Tensor]:
        (L1, E1, S1), (L2, E2, S2) = self.q_sigma(), self.q_dev()
        st = (torch.stack(x, -1) for x in ((L1, L2), (E1, E2), (S1, S2)))
        return _qsum(*st, -1)

    def q_C(self) -> tuple[Tensor, Tensor, Tensor]:
        L, E, S = self.q_Q()
        return _qsum(*_qadd((L, E), self.pi(1)), S, -2)

    # direct terms, (*, K, P), weighted by pi_k
    def sigma(self) -> Tensor:
        t = self.ls[..., self.I] + self.ls[..., self.J]
        return mul_exp(self.coefficient() / self.total.unsqueeze(-1), self.log_w.unsqueeze(-1) + t)

    def pi_dev(self, i: list[int]) -> Tensor:
        """``pi_k d_ki`` for the coordinates ``i``: ``2 pi (mu/2 - m/2)``."""
        log_w = torch.where(self.zero, -math.inf, self.log_w)
        return mul_exp(2.0 * self.half_dev[..., i] / self.total.unsqueeze(-1), log_w.unsqueeze(-1))

    def dev(self, i: list[int]) -> Tensor:
        return 2.0 * self.half_dev[..., i]


def _value(t: _Terms) -> Tensor:
    """``C (*, P)`` by direct sums."""
    return (t.sigma() + t.pi_dev(t.I) * t.dev(t.J)).sum(-2)


def log_row_norm(scale_tril: Tensor) -> Tensor:
    r"""``log sqrt(sum_j L_ij^2)`` per row of ``(*, D, D)``: the log standard deviations.

    ``log m + log ||L / m||`` with ``m`` the row's largest ``|L_ij|`` (detached: the
    identity holds for every ``m > 0``, so the gradient is still exact), so that squares of
    entries near ``finfo.max`` do not overflow where the log is finite.
    """
    m = scale_tril.detach().abs().amax(-1)
    m = torch.where((m > 0) & torch.isfinite(m), m, 1.0)  # a 0 / inf row keeps log||L||
    return torch.log(m) + 0.5 * torch.log((scale_tril / m.unsqueeze(-1)).square().sum(-1))


def _second_moments_value(logits, loc, log_scale, atanh_rho, bivariate: bool) -> Tensor:
    """``C (*, P)`` in the dtype of ``logits``: the direct sums, and where one is not finite
    the same sum in signed quarter-logs (both formed unless the direct ones are all finite
    and :func:`host_readable`: a CPU fast path reading one reduction)."""
    dtype, wide = logits.dtype, _wide(logits.dtype)
    inputs = _to(wide, logits, loc, log_scale, atanh_rho)
    c = _value(_Terms(*inputs, bivariate, quarter=False))
    bad = ~torch.isfinite(c)
    if host_readable(c) and not bool(bad.any()):
        return c.to(dtype)  # nothing to replace
    w = _Terms(*inputs, bivariate, quarter=True)
    return torch.where(bad, _qvalue(*w.q_C()), c).to(dtype)


def _moments_fake(logits: Tensor, loc: Tensor, log_scale: Tensor, *atanh_rho: Tensor) -> Tensor:
    batch = torch.broadcast_shapes(logits.shape[:-1], loc.shape[:-2], log_scale.shape[:-2])
    pairs = 3 if atanh_rho else loc.shape[-1]
    return logits.new_empty((*batch, pairs))


@kernel_op("diagonal_mixture_second_moments", event_dims=(1, 2, 2), fake=_moments_fake)
def _diagonal_moments(logits: Tensor, loc: Tensor, log_scale: Tensor) -> Tensor:
    """The forward of :class:`_SecondMoments` for a diagonal mixture: ``(*, D)``."""
    return _second_moments_value(logits, loc, log_scale, None, False)


@kernel_op("bivariate_mixture_second_moments", event_dims=(1, 2, 2, 1), fake=_moments_fake)
def _bivariate_moments(logits: Tensor, loc: Tensor, log_scale: Tensor, atanh_rho: Tensor) -> Tensor:
    """The forward of :class:`_SecondMoments` for a bivariate mixture: ``(c11, c12, c22)``."""
    return _second_moments_value(logits, loc, log_scale, atanh_rho, True)


class _SecondMoments(torch.autograd.Function):
    """The moments of :func:`second_moments` with the hand-written backward (module
    docstring). ``log_scale`` is given (detached, in the wide dtype) also for a
    full-covariance mixture, whose gradient goes to ``scale_tril`` instead."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, loc, log_scale, atanh_rho, bivariate: bool, scale_tril):
        if bivariate:
            return _bivariate_moments(logits, loc, log_scale, atanh_rho)
        return _diagonal_moments(logits, loc, log_scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, loc, log_scale, atanh_rho, ctx.bivariate, scale_tril = inputs
        ctx.save_for_backward(logits, loc, log_scale, atanh_rho, scale_tril)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        logits, loc, log_scale, atanh_rho, scale_tril = ctx.saved_tensors
        need = ctx.needs_input_grad
        if scale_tril is not None:
            grads = _tril_moment_grads(g, logits, loc, log_scale, scale_tril, *need[:2], need[5])
            grads = (*grads[:2], None, None, None, grads[2])
        elif ctx.bivariate:
            grads = (*_bivariate_moment_grads(g, logits, loc, log_scale, atanh_rho, *need[:4]),)
        else:
            grads = _diagonal_moment_grads(g, logits, loc, log_scale, *need[:3])
        grads = (*grads, *(None,) * (6 - len(grads)))
        return tuple(x if n else None for x, n in zip(grads, need, strict=True))


def _to(dtype, *tensors):
    return tuple(None if x is None else x.to(dtype) for x in tensors)


def _moment_grads(g, logits, loc, log_scale, atanh_rho, scale_tril, bivariate, need) -> list:
    """The gradients of :class:`_SecondMoments` by its six inputs (None where not in
    ``need``), from the identities of the module docstring."""
    dtype, wide = g.dtype, _wide(g.dtype)
    logits, loc, log_scale, atanh_rho, scale_tril, g = _to(
        wide, logits, loc, log_scale, atanh_rho, scale_tril, g
    )
    t = w = _Terms(logits, loc, log_scale, atanh_rho, bivariate, quarter=True)
    Lg, Eg, Sg = _qlog(g.unsqueeze(-2))  # (*, 1, P)
    Lg, Eg, Sg = _qzero(Lg, Eg, Sg, Sg != 0)
    grads = [None] * 6

    def pick(direct, L, E, S):
        return torch.where(torch.isfinite(direct), direct, _qvalue(L, E, S)).to(dtype)

    if need[0]:  # sum_p g_p pi_k (Q_kp - C_p)
        c = _value(t).unsqueeze(-2)
        q = t.sigma() + t.pi_dev(t.I) * t.dev(t.J)  # pi_k Q_kp
        direct = (
            g.unsqueeze(-2) * (q - mul_exp(c / t.total.unsqueeze(-1), t.log_w.unsqueeze(-1)))
        ).sum(-1)
        direct = torch.where(t.zero, 0.0, direct)
        (LQ, EQ, SQ), (LC, EC, SC) = w.q_Q(), w.q_C()
        LC, EC, SC = (x.unsqueeze(-2).expand_as(LQ) for x in (LC, EC, SC))
        st = (torch.stack(x, -1) for x in ((LQ, LC), (EQ, EC), (SQ, -SC)))
        L, E, S = _qsum(*st, -1)
        L, E, S = _qsum(*_qadd((L, E), w.pi(1), (Lg, Eg)), S * Sg, -1)
        grads[0] = pick(direct, *_qzero(L, E, S, ~w.zero))
    if need[1] or need[2]:
        # contributions of pair p to coordinate I[p] and to J[p]: (*, K, P, 2)
        D = loc.shape[-1]
        target = torch.tensor([t.I, t.J], device=loc.device).T  # (P, 2)
        onehot = target.unsqueeze(-1) == torch.arange(D, device=loc.device)  # (P, 2, D)

        def scatter(direct_pk, L_pk, E_pk, S_pk):
            """``sum_p`` of ``(*, K, P, 2)`` contributions into ``(*, K, D)``."""
            d = torch.where(onehot, direct_pk.unsqueeze(-1), 0.0).sum((-3, -2))
            Lx = torch.where(onehot, L_pk.unsqueeze(-1), -math.inf).flatten(-3, -2)
            Ex = torch.where(onehot, E_pk.unsqueeze(-1), 0.0).flatten(-3, -2)
            Sx = torch.where(onehot, S_pk.unsqueeze(-1), 0.0).flatten(-3, -2)
            return pick(d, *_qsum(Lx, Ex, Sx, -2))

        gg = g.unsqueeze(-2).unsqueeze(-1)  # (*, 1, P, 1)
        qg2, Sg2 = (Lg.unsqueeze(-1), Eg.unsqueeze(-1)), Sg.unsqueeze(-1)
        if need[1]:  # g_p pi_k d_{k, other coordinate}
            other = torch.stack((t.pi_dev(t.J), t.pi_dev(t.I)), -1)
            Lo = torch.stack((w.Ld[..., w.J], w.Ld[..., w.I]), -1)
            Eo = torch.stack((w.Ed[..., w.J], w.Ed[..., w.I]), -1)
            So = torch.stack((w.Sd[..., w.J], w.Sd[..., w.I]), -1)
            L, E = _qadd((Lo, Eo), w.pi(1, 1), qg2)
            grads[1] = scatter(gg * other, *_qzero(L, E, So * Sg2, So * Sg2 != 0))
        if need[2]:  # g_p pi_k Sigma_kp, to both coordinates
            sig = t.sigma().unsqueeze(-1).expand(*t.sigma().shape, 2)
            Ls, Es, Ss = w.q_sigma()
            L, E = _qadd((Ls.unsqueeze(-1), Es.unsqueeze(-1)), w.pi(1, 1), qg2)
            S = Ss.unsqueeze(-1) * Sg2
            L, E, S = _qzero(L, E, S, S != 0)
            grads[2] = scatter(gg * sig, *(x.expand_as(sig) for x in (L, E, S)))
    if atanh_rho is not None and need[3]:  # sum_{p off} g_p pi_k sech^2(a_k) s_i s_j
        lc = 2.0 * log_cosh(t.a).unsqueeze(-1)
        ls = t.ls[..., t.I] + t.ls[..., t.J]
        gp = torch.where(t.off, g.unsqueeze(-2), 0.0)
        direct = mul_exp(gp / t.total.unsqueeze(-1), t.log_w.unsqueeze(-1) + ls - lc).sum(-1)
        direct = torch.where(t.zero, 0.0, direct)
        L, E = _qadd(
            (w.Ls[..., w.I], 0.0),
            (w.Ls[..., w.J], 0.0),
            (-2.0 * log_cosh(w.a).unsqueeze(-1) / 4.0, 0.0),
            w.pi(1),
            (Lg, Eg),
        )
        S = Sg * w.off
        L, E, S = _qzero(L, E, S, (S != 0) & ~w.zero.unsqueeze(-1))
        grads[3] = pick(direct, *_qsum(L, E, S, -1))
    if scale_tril is not None and need[5]:  # 2 g_i pi_k L_kij (diagonal pairs only)
        gi = g.unsqueeze(-2).unsqueeze(-1)  # (*, 1, D, 1)
        log_w = t.log_w[..., None, None]
        direct = mul_exp(gi * scale_tril / t.total[..., None, None], log_w + math.log(2.0))
        Ll, El, Sl = _qlog(scale_tril)
        L, E = _qadd(w.pi(1, 1), (Lg.unsqueeze(-1), Eg.unsqueeze(-1)), (Ll, El), (_LOG2_4, 0.0))
        S = Sg.unsqueeze(-1) * Sl
        L, E, S = _qzero(L, E, S, (S != 0) & ~w.zero[..., None, None])
        direct = torch.where(w.zero[..., None, None], 0.0, direct)
        grads[5] = pick(direct, L, E, S)
    return grads

def _filled(grads, g: Tensor) -> tuple[Tensor, ...]:
    """An operator returns tensors only: an unneeded gradient is an empty tensor."""
    return tuple(g.new_empty(0) if gr is None else gr for gr in grads)


def _moment_grads_fake(g: Tensor, *args) -> tuple[Tensor, ...]:
    tensors = [a for a in args if isinstance(a, Tensor)]
    needed = [a for a in args if isinstance(a, bool)]
    pairs = zip(tensors, needed, strict=True)
    return tuple(t.new_empty(t.shape if n else (0,), dtype=g.dtype) for t, n in pairs)


def _tril_grads_fake(g, logits, loc, log_scale, scale_tril, *needed) -> tuple[Tensor, ...]:
    return _moment_grads_fake(g, logits, loc, scale_tril, *needed)


@kernel_op(
    "diagonal_mixture_second_moments_backward",
    event_dims=(1, 1, 2, 2, None, None, None),
    fake=_moment_grads_fake,
)
def _diagonal_moment_grads(
    g: Tensor, logits: Tensor, loc: Tensor, log_scale: Tensor, n0: bool, n1: bool, n2: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :class:`_SecondMoments` for a diagonal mixture (an operator: its
    quarter-log graph is run, not traced, by ``torch.compile``)."""
    grads = _moment_grads(g, logits, loc, log_scale, None, None, False, (n0, n1, n2, 0, 0, 0))
    return _filled(grads[:3], g)


@kernel_op(
    "bivariate_mixture_second_moments_backward",
    event_dims=(1, 1, 2, 2, 1, None, None, None, None),
    fake=_moment_grads_fake,
)
def _bivariate_moment_grads(
    g: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    atanh_rho: Tensor,
    n0: bool,
    n1: bool,
    n2: bool,
    n3: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward of :class:`_SecondMoments` for a bivariate mixture."""
    need = (n0, n1, n2, n3, False, False)
    grads = _moment_grads(g, logits, loc, log_scale, atanh_rho, None, True, need)
    return _filled(grads[:4], g)


@kernel_op(
    "tril_mixture_second_moments_backward",
    event_dims=(1, 1, 2, 2, 3, None, None, None),
    fake=_tril_grads_fake,
)
def _tril_moment_grads(
    g: Tensor,
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor,
    scale_tril: Tensor,
    n0: bool,
    n1: bool,
    n5: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of :class:`_SecondMoments` for a full-covariance mixture (its
    ``log_scale`` is computed from ``scale_tril``: no gradient of its own)."""
    need = (n0, n1, False, False, False, n5)
    grads = _moment_grads(g, logits, loc, log_scale, None, scale_tril, False, need)
    return _filled((grads[0], grads[1], grads[5]), g)


def second_moments(
    logits: Tensor,
    loc: Tensor,
    log_scale: Tensor | None,
    atanh_rho: Tensor | None,
    scale_tril: Tensor | None = None,
) -> Tensor:
    """``(*, P)``: the diagonal ``(*, D)`` of a diagonal mixture (``atanh_rho`` None) or
    ``(c11, c12, c22)`` of a bivariate one; the diagonal of a full-covariance mixture with
    ``scale_tril (*, K, D, D)`` in place of ``log_scale`` (``sigma_ki^2 = sum_j L_kij^2``,
    differentiated by ``L`` directly: ``2 pi_k L_kij``, where the chain through
    ``log sigma`` would form ``inf * 0``). Inputs expanded to ``(*, K, ...)``, in one
    compute dtype."""
    if scale_tril is not None:  # sigma_ki^2 = sum_j L_kij^2; the backward is by L
        log_scale = log_row_norm(scale_tril.detach().to(_wide(logits.dtype)))
    return _SecondMoments.apply(
        logits, loc, log_scale, atanh_rho, atanh_rho is not None, scale_tril
    )
