"""Tests of the fused kernels (``probloss.functional.mixture._fused``): equal to the plain
autograd path, dead and zero-weight components, double backward, dispatch.

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probloss.functional.mixture import (
    _fused,
    bivariate_normal_mixture_log_prob,
    mixture_log_prob,
    normal_mixture_log_prob,
)
from tests.functional._checks import assert_within, dtype_id
from tests.functional.mixture._density_oracles import (
    AGREE_RTOL,
    BIVARIATE_NAMES,
    INF,
    NORMAL_NAMES,
    REF_EPS,
    TINY_LOG_SCALE,
    _agree,
    _check,
    _dead_bivariate_events,
    _eps,
    _events,
    _flush_eps,
    _log_space_oracle,
    _oracle_arrays,
    _seeded,
    _value_and_grads,
    bivariate_inputs,
    bivariate_oracle,
    normal_inputs,
    normal_oracle,
)

NORMAL_CASES = {
    # name: keyword arguments of normal_inputs
    "random": {"spread": 2.0},
    "far": {"spread": 1e5},
    "scales_e20": {"log_scale_range": 20.0},
    "logits_1e4": {"logit_scale": 1e4},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("case", NORMAL_CASES)
@pytest.mark.parametrize("d", [1, 2, 6])
def test_normal_fused_equals_plain(d, case, dtype):
    """Value and all four gradients, random and extreme inputs (targets 1e5 scales away,
    log_scale in [-20, 20], logits ~ 1e4): ``|fused - plain| <= 1e-5 S`` (float32),
    ``1e-12 S`` (float64)."""
    inputs = normal_inputs(64, 4, d, dtype, seed=20 + d, **NORMAL_CASES[case])
    _agree(normal_mixture_log_prob, inputs, NORMAL_NAMES, f"{case} D={d}")


SHAPES = [
    # value, logits, loc / log_scale, atanh_rho: batch broadcasting of every kind
    ((5, 2), (3,), (3, 2), (3,)),  # one unconditional mixture, many targets
    ((2,), (5, 3), (5, 3, 2), (5, 3)),  # one target, many mixtures
    ((4, 1, 2), (1, 5, 3), (5, 3, 2), (4, 5, 3)),  # mixed
]


@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_broadcast_batch_shapes_fused_equals_plain(shapes):
    """float64, both mixtures: output shape is the broadcast batch shape, gradients have
    the input shapes, and fused == plain to ``1e-12`` (relative to max(1, |plain|))."""
    v, lg, lc, a = shapes
    g = _seeded(50)
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in (v, lg, lc, lc, a)]
    inputs[3] = 0.5 * inputs[3]  # log_scale
    batch = torch.broadcast_shapes(v[:-1], lg[:-1], lc[:-2], a[:-1])
    for fn, args in (
        (normal_mixture_log_prob, inputs[:4]),
        (bivariate_normal_mixture_log_prob, inputs),
    ):
        fused = _value_and_grads(fn, args, fused=True)
        plain = _value_and_grads(fn, args, fused=False)
        assert fused[0].shape == batch
        for got, ref, t in zip(fused, plain, [fused[0], *args], strict=True):
            assert got.shape == tuple(t.shape)
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_zero_weight_component_is_ignored(fused, dtype):
    """A ``-inf`` logit: the value equals the (K-1)-component mixture (1e-6 / 1e-14
    relative), every gradient is finite, the dropped component's are exactly 0."""
    x, logits, loc, log_scale, a = bivariate_inputs(8, 3, dtype, seed=100, spread=2.0)
    logits[:, 1] = -INF
    keep = [0, 2]
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args, fused=fused)
        sub = [args[0], *(t[:, keep] for t in args[1:])]
        np.testing.assert_allclose(out[0], fn(*sub, fused=fused).double().numpy(), rtol=rtol)
        assert all(np.isfinite(t).all() for t in out)
        for grad in out[2:]:
            assert (grad[:, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_impossible_components_and_events_fused(dtype):
    """Components whose log density is ``-inf`` (``z^2/2`` beyond the float range: a
    residual of 1 at scale ``e^-400`` float64 / ``e^-80`` float32, or ``Q`` overflowing at
    ``|a| = 50`` off the line): responsibility 0, finite gradients, theirs exactly 0; an
    event where *every* component is impossible has value ``-inf`` and gradient exactly 0
    (torch.logsumexp's is NaN). The logit of an impossible component gets ``r - pi = -pi``."""
    tiny = -400.0 if dtype == torch.float64 else -80.0
    x, logits, loc, log_scale, a = bivariate_inputs(3, 3, dtype, seed=110, spread=1.0)
    log_scale[:2, 1] = tiny  # component 1 impossible in events 0 and 1
    loc[:2, 1] = x[:2] + 1.0
    log_scale[2] = tiny  # event 2: every component impossible
    loc[2] = x[2] + 1.0
    a[0, 2] = 50.0  # event 0: component 2 off its line at a = 50 (finite in float64)
    loc[0, 2] = x[0] + torch.tensor([1.0, -1.0], dtype=dtype)
    log_scale[0, 2] = 0.0
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args)
        value, grads = out[0], out[1:]
        assert np.isfinite(value[:2]).all() and value[2] == -INF
        assert all(np.isfinite(gr).all() for gr in grads)
        for gr in grads:
            assert (gr[2] == 0).all()  # the impossible event
        for gr in grads[2:]:
            assert (gr[:2, 1] == 0).all()  # the impossible component's parameters
        pi = torch.softmax(logits[:2].double(), -1)[:, 1].numpy()
        np.testing.assert_allclose(grads[1][:2, 1], -pi, rtol=1e-6)  # its logit: r - pi
    # the finite events: the mixture without the impossible component, whose weights are
    # renormalised over the others, so add log(sum of their weights) (1e-6 relative)
    sub = (x[:2], logits[:2, ::2], loc[:2, ::2], log_scale[:2, ::2])
    kept = torch.logsumexp(logits[:2, ::2], -1) - torch.logsumexp(logits[:2], -1)
    np.testing.assert_allclose(
        normal_mixture_log_prob(x[:2], logits[:2], loc[:2], log_scale[:2]).double().numpy(),
        (normal_mixture_log_prob(*sub) + kept).double().numpy(),
        rtol=1e-6,
    )


def test_fused_gradcheck_and_double_backward():
    """float64 ``gradcheck`` of both fused Functions (hand-written backward, every input,
    including broadcast ones) and ``gradgradcheck`` (the double backward goes through the
    plain path, documented)."""
    g = _seeded(120)
    x = torch.randn(3, 2, generator=g, dtype=torch.float64)
    logits = torch.randn(3, 4, generator=g, dtype=torch.float64)
    loc = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    log_scale = 0.3 * torch.randn(4, 2, generator=g, dtype=torch.float64)  # broadcast
    a = torch.randn(3, 4, generator=g, dtype=torch.float64)
    normal = [t.clone().requires_grad_(True) for t in (x, logits, loc, log_scale)]
    bivariate = [t.clone().requires_grad_(True) for t in (x, logits, loc, log_scale, a)]
    for fn, args in (
        (normal_mixture_log_prob, normal),
        (bivariate_normal_mixture_log_prob, bivariate),
    ):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    """The fused backward must not overwrite saved tensors: a second backward through a
    retained graph accumulates exactly twice the first gradients."""
    inputs = bivariate_inputs(16, 3, torch.float32, seed=130, spread=2.0)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    for fn, args in (
        (normal_mixture_log_prob, leaves[:4]),
        (bivariate_normal_mixture_log_prob, leaves),
    ):
        out = fn(*args).sum()
        first = torch.autograd.grad(out, args, retain_graph=True)
        second = torch.autograd.grad(out, args)
        for u, v in zip(first, second, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("family", ["normal", "bivariate"])
def test_plain_path_dead_component_has_zero_gradient(family):
    """Regression: a component whose log density overflows to -inf (here log_scale = -1e4 in
    float32, outside the fused domain, so the plain path runs) has responsibility 0 and
    must contribute an exactly zero gradient, not 0 * inf = NaN. The other component's
    density at its own mean is -log(2 pi) per 2 dims (closed form), weight 1/2."""
    value = torch.tensor([[1.0, 1.0]])
    logits = torch.zeros(1, 2)
    loc = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    log_scale = torch.tensor([[[-1e4, -1e4], [0.0, 0.0]]], requires_grad=True)
    if family == "normal":
        out = normal_mixture_log_prob(value, logits, loc, log_scale)
    else:
        atanh_rho = torch.zeros(1, 2, requires_grad=True)
        out = bivariate_normal_mixture_log_prob(value, logits, loc, log_scale, atanh_rho)
    assert out.item() == pytest.approx(-math.log(2 * math.pi) - math.log(2.0), rel=1e-6)
    out.sum().backward()
    assert torch.equal(loc.grad[0, 0], torch.zeros(2))
    assert torch.equal(log_scale.grad[0, 0], torch.zeros(2))
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()


# Fuzz rows (PROBLOSS_FUZZ_DRAWS=100000) where two leading terms lie within an ulp or so of
# each other: the fused kernel added z^2/2 into the log weight in one addcmul and divided
# by exp(log_scale) (exp(3.4e-8) rounds to 1 in float32, exp(-3.4e-8) does not), the plain
# path rounds z * exp(-log_scale), each coordinate's density, their sum, then adds the
# weight; the fused kernel tied components (responsibilities 0.5 / 0.5 or 1/3 each) that
# the plain path and mpmath separate (1 / 0).
_TIED_ROWS = [
    (  # float64 row 8430: equal densities, log weights 0 and -1.5e23 (half an ulp of T)
        torch.float64,
        [-6.825934953482149e19, 7.600340289596796],
        [1.5363748025226746e23, -4513297.679068608, -INF],
        [
            [-5e-324, 797.2375579715405],
            [6.852649782438854e-11, 461.3921032348621],
            [162.4299896995448, 4.926998426778105e-25],
        ],
        [
            [1.0770518587007111e-35, -5.50424010628158e-34],
            [3.284922686172289e-25, 0.003939771549901374],
            [1.0, 90.34656469027257],
        ],
    ),
    (  # float64 row 32422: log_scale 8.6e-17 (exp rounds to 1, exp(-s) to 1 - 2^-53)
        torch.float64,
        [-2.0801991620529427e-12, 2.5021032816558262e35],
        [-16.635532333438686, 0.03367955791181777, -2.572416761943155e-23],
        [
            [0.0030686947480622717, -2.6908890615241416e34],
            [4.941253761095656e-38, 88.71892521235186],
            [-0.002786121586932873, -13.782422165846185],
        ],
        [
            [0.004120917899178534, 1.7115610761247825e-29],
            [16.635532333438686, 8.59797054387884e-17],
            [202.1052657625261, 8.144018485851042e-33],
        ],
    ),
    (  # float32 row 32947: log_scale 3.4e-8
        torch.float32,
        [-1.5459589958190918, -8.156642829297254e16],
        [-7.730853860585768e-33, 2.151896924196145e-37, 0.0010479174088686705],
        [
            [-0.007985132746398449, 20.949983596801758],
            [-7.624619007110596, 123.12487030029297],
            [-1.2674539107138116e-07, -16.63553237915039],
        ],
        [
            [15.994690895080566, 3.436941753420797e-08],
            [0.029169045388698578, 1.5771336459025065e-09],
            [0.9180141091346741, -2.4978827001561513e-33],
        ],
    ),
    (  # float32 row 37284: the third component leads by 9.8e15 at |T| = 8.3e22
        torch.float32,
        [406497263616.0, -14.934499740600586],
        [-0.0, -3.4231564102633623e-34, 255.93748474121094],
        [
            [-1.1920928955078125e-07, 1.401298464324817e-45],
            [-0.006398669444024563, 5.088750369824047e18],
            [0.005852515809237957, 1.9322880875723603e-16],
        ],
        [
            [2.50592706307895e-11, 17.104766845703125],
            [-1.3983457798768496e-26, 48.655147552490234],
            [5.960464477539063e-08, -0.15814313292503357],
        ],
    ),
]


@pytest.mark.parametrize("row", range(len(_TIED_ROWS)))
def test_fused_terms_round_as_the_plain_path(row):
    """Issue 10 (fuzz, fused != plain in d/dlog_scale): the fused kernel forms the joint
    terms with the plain path's operations in the plain path's order, so its value is
    bitwise the plain one and its gradients agree to the rounding of the backward's
    factors (16 eps (|g| + 1): a handful of roundings of each product). At these rows that
    rounding separates the leading terms as mpmath does (log space, 1000 digits), so every
    gradient is also the exact one within 16 eps (|g| + 1) (responsibilities 0 or 1 up to
    e^{-1e15}, the rest products of a few rounded factors); before, the fused kernel tied
    them (r = 0.5 / 0.5: d/dlog_scale off by 3e70 in float64)."""
    dtype, *event = _TIED_ROWS[row]
    inputs = [torch.tensor([v], dtype=dtype) for v in event]
    fused = _value_and_grads(normal_mixture_log_prob, inputs, fused=True)
    plain = _value_and_grads(normal_mixture_log_prob, inputs, fused=False)
    assert fused[0] == plain[0]
    bound = 16 * _eps(dtype)
    for name, f, p in zip(NORMAL_NAMES[1:], fused[1:], plain[1:], strict=True):
        assert_within(f.ravel(), p.ravel(), bound * (np.abs(p.ravel()) + 1), range(p.size), name)
    expected = _log_space_oracle(_events(*inputs)[0])
    for name, f, e in zip(NORMAL_NAMES[1:], fused[1:], expected[1:], strict=True):
        e = np.asarray(e)
        assert_within(f.ravel(), e.ravel(), bound * (np.abs(e.ravel()) + 1), range(e.size), name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_zero_weight_component_beyond_the_float_range(fused, dtype):
    """Issue 10: a zero-weight (-inf logit) component whose residual overflows: the value
    equals the mixture without it (1e-6 / 1e-14 relative: the same sum of the same
    terms), every gradient is finite and the dropped component's are exactly 0."""
    t = TINY_LOG_SCALE[dtype]
    x = torch.tensor([[1e6, 1e6], [0.5, -1e6]], dtype=dtype)
    logits = torch.tensor([[0.0, -INF, 1.0], [-INF, 0.0, 1.0]], dtype=dtype)
    loc = torch.zeros(2, 3, 2, dtype=dtype)
    log_scale = torch.tensor(
        [[[5.0, 5.0], [t, t], [6.0, 7.0]], [[t, t], [6.0, 5.0], [7.0, 6.0]]], dtype=dtype
    )
    a = torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.3, 0.4]], dtype=dtype)
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    dead = torch.tensor([[False, True, False], [True, False, False]])
    for fn, args in (
        (normal_mixture_log_prob, (x, logits, loc, log_scale)),
        (bivariate_normal_mixture_log_prob, (x, logits, loc, log_scale, a)),
    ):
        out = _value_and_grads(fn, args, fused=fused)
        assert all(np.isfinite(g).all() for g in out)
        for row in range(2):
            keep = ~dead[row]
            sub = [args[0][row], *(t_[row][keep] for t_ in args[1:])]
            ref = fn(*sub, fused=fused).double().item()
            assert out[0][row] == pytest.approx(ref, rel=rtol)
            for grad in out[2:]:
                assert (grad[row][dead[row].numpy()] == 0).all()


def _kernel_calls(fn, *args) -> set[str]:
    """The names of the ``probloss`` operators that one forward and backward of ``fn`` ran."""
    leaves = [t.clone().requires_grad_(True) for t in args]
    with torch.profiler.profile() as prof:
        fn(*leaves).sum().backward()
    return {e.key for e in prof.key_averages() if e.key.startswith("probloss::")}


def test_fused_kernels_run_inside_compiled_code():
    """``torch.compile(fullgraph=True)`` keeps the fused kernels (forward and backward
    operators, no host read deciding it) and gives the eager result: the user's compiled
    step is as fast as the kernel, not the plain path's composition."""
    inputs = bivariate_inputs(4, 3, torch.float32, seed=200, spread=2.0)
    for fn, args, name in (
        (normal_mixture_log_prob, inputs[:4], "normal_mixture_fused"),
        (bivariate_normal_mixture_log_prob, inputs, "bivariate_mixture_fused"),
    ):
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        assert {f"probloss::{name}", f"probloss::{name}_backward"} <= _kernel_calls(compiled, *args)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-6, atol=1e-6)


def test_plain_path_under_torch_func_transforms():
    """Inside ``vmap`` / ``grad`` the plain path runs (forward-mode and higher derivatives of
    it are defined): the decision is made from the tensors' types, never their values."""
    seen = []

    def decide(x):
        seen.append(_fused._fused_runs(x))
        return x

    torch.func.vmap(decide)(torch.zeros(3, 2))
    assert seen == [False] and _fused._fused_runs(torch.zeros(3, 2))


# inputs beyond the fast formulas' bounds of each dtype (|log_scale| < 86 / 707,
# |atanh_rho| < 42.3 / 352.8): the kernels take their exact fallbacks
BEYOND = {torch.float32: (100.0, 60.0), torch.float64: (750.0, 400.0)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_kernels_beyond_their_bounds_equal_the_plain_path(dtype):
    """Eager and on the CPU the fused kernels run for every input: beyond the bounds of
    their fast formulas the diagonal kernel forms ``z`` and ``d/dloc`` with ``mul_exp``, the
    bivariate one evaluates the single density per component. Value and every gradient
    agree with the plain path within the file's ``AGREE_RTOL * S``, and the kernels did
    run (their autograd node)."""
    log_scale_range, a_range = BEYOND[dtype]
    # beyond on the negative side only: a target 2 scales off would overflow at e^{+100}
    normal = normal_inputs(24, 3, 2, torch.float64, seed=210, log_scale_range=log_scale_range)
    normal[3].clamp_(max=_fused._fused_bounds(dtype)[0] - 4.0)
    normal = (normal[2][:, 0] + 2.0 * normal[3][:, 0].exp(), *normal[1:])
    normal = tuple(t.to(dtype) for t in normal)
    # S from mpmath (the float64 reference overflows at these scales)
    _, scale = _oracle_arrays(normal_oracle, _events(*normal), _flush_eps(dtype))
    fused = _value_and_grads(normal_mixture_log_prob, normal, fused=True)
    plain = _value_and_grads(normal_mixture_log_prob, normal, fused=False)
    _check(fused, plain, scale, AGREE_RTOL[dtype], NORMAL_NAMES, "normal beyond the bounds")
    bivariate = bivariate_inputs(24, 3, dtype, seed=220, spread=2.0, a_range=a_range)
    _agree(bivariate_normal_mixture_log_prob, bivariate, BIVARIATE_NAMES, "atanh_rho beyond")
    wide = list(bivariate)
    wide[3] = wide[3] * log_scale_range  # |log_scale| up to the range: beyond in some rows
    wide[0] = wide[2][:, 0] + 2.0 * wide[3][:, 0].exp()  # a target 2 scales off component 0
    _agree(bivariate_normal_mixture_log_prob, wide, BIVARIATE_NAMES, "log_scale beyond")
    for fn, args in ((normal_mixture_log_prob, normal), (bivariate_normal_mixture_log_prob, wide)):
        out = fn(*(t.clone().requires_grad_(True) for t in args))
        assert type(out.grad_fn).__name__ in ("_NormalMixtureBackward", "_BivariateMixtureBackward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_responsibilities_flushed_below_the_documented_threshold(dtype):
    """The module's claim: responsibilities below ``2 exp(floor(log tiny) + 2)`` (9e-38 /
    1.8e-307) times the largest are exactly 0, the others within that of the exact
    ``r = e^{-d} / (1 + e^{-d})`` (closed form, float64 math; plus 4 eps relative of the
    rounding of ``exp``), in ``mixture_log_prob`` (the plain path) and in the fused normal
    kernel (through ``d/dloc = r z / sigma`` of a component ``z`` scales off)."""
    floor = math.floor(math.log(torch.finfo(dtype).tiny)) + 2.0
    flush = 2.0 * math.exp(floor)
    eps = torch.finfo(dtype).eps
    for gap in (-floor + 2.0, -floor - 4.0):  # flushed; kept
        r = math.exp(-gap) / (1.0 + math.exp(-gap))
        lp = torch.tensor([[0.0, -gap]], dtype=dtype, requires_grad=True)
        mixture_log_prob(lp, torch.zeros(1, 2, dtype=dtype)).sum().backward()
        z = math.sqrt(2.0 * gap)
        x = torch.zeros(1, 1, dtype=dtype)
        loc = torch.tensor([[[0.0], [-z]]], dtype=dtype, requires_grad=True)
        normal_mixture_log_prob(x, torch.zeros(1, 2, dtype=dtype), loc, torch.zeros(1, 2, 1,
                                dtype=dtype)).sum().backward()  # fmt: skip
        zd = float(x[0, 0] - loc.detach()[0, 1, 0])
        r_fused = math.exp(-0.5 * zd * zd) / (1.0 + math.exp(-0.5 * zd * zd))
        if gap > -floor:
            assert lp.grad[0, 1] == 0 and loc.grad[0, 1, 0] == 0
        else:
            assert abs(lp.grad[0, 1].item() - r) <= flush + 4 * eps * r
            got = loc.grad[0, 1, 0].item() / zd
            assert abs(got - r_fused) <= flush + REF_EPS * eps * r_fused * (1 + gap)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_plain_path_without_host_reads_equals_the_cpu_path_at_dead_components(monkeypatch, dtype):
    """The plain path's dead-component pass has a CPU shortcut (one host read) and a
    branch-free form for accelerators and tracing; forced into the latter
    (``host_readable`` patched), values and gradients at components beyond the float range
    and at a target of ``inf`` equal the CPU path's exactly (the same second evaluation)."""
    events = _dead_bivariate_events(dtype)
    x = torch.cat([events[0], torch.tensor([[INF, 0.0]], dtype=dtype)])
    inputs = (x, *(torch.cat([t, t[:1]]) for t in events[1:]))
    for fn, args in (
        (normal_mixture_log_prob, inputs[:4]),
        (bivariate_normal_mixture_log_prob, inputs),
    ):
        cpu = _value_and_grads(fn, args, fused=False)
        with monkeypatch.context() as patch:
            patch.setattr(_fused, "host_readable", lambda *tensors: False)
            traced = _value_and_grads(fn, args, fused=False)
        for u, v in zip(cpu, traced, strict=True):
            np.testing.assert_array_equal(u, v)
        assert all(np.isfinite(g).all() for g in cpu[1:])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("family", ["normal", "bivariate"])
def test_value_gradient_where_component_gradients_overflow_with_opposite_signs(family, fused):
    """float32, two components at loc ``-+z sigma`` around the value 0 (``z`` = 40 or 50,
    ``log_scale = -86``, inside the fused domain; bivariate with ``atanh_rho = 0.3``) and
    weights 0.55 / 0.45: each ``d/dloc_k`` is about ``+-4e38`` (inf), their sum ``d/dvalue =
    -sum_k d/dloc_k`` is 8e37. It was NaN (``inf - inf``) in both paths. A third component
    at loc 1.5e-18 (``z = 3.4e19``) is dead (its ``Q/2`` overflows), so the plain path takes
    its re-evaluation branch, the one every non-CPU device takes. Against the mpmath oracle
    with the file's bound ``32 eps S``, which is below ``|ref|`` here, so 0 or NaN fail."""
    dt = torch.float32
    logits = torch.tensor([[math.log(1.1), math.log(0.9), 0.0]], dtype=dt)
    sigma = math.exp(-86.0)
    if family == "normal":
        value = torch.zeros(1, 1, dtype=dt)
        loc = torch.tensor([[[-40 * sigma], [40 * sigma], [1.5e-18]]], dtype=dt)
        inputs = (value, logits, loc, torch.full((1, 3, 1), -86.0))
        oracle, names, fn = normal_oracle, NORMAL_NAMES, normal_mixture_log_prob
    else:
        value = torch.zeros(1, 2, dtype=dt)
        loc = torch.tensor([[[-50 * sigma] * 2, [50 * sigma] * 2, [1.5e-18] * 2]], dtype=dt)
        rho = torch.full((1, 3), 0.3, dtype=dt)
        inputs = (value, logits, loc, torch.full((1, 3, 2), -86.0), rho)
        oracle, names, fn = bivariate_oracle, BIVARIATE_NAMES, bivariate_normal_mixture_log_prob
    got = _value_and_grads(fn, inputs, fused=fused)
    expected, scale = _oracle_arrays(oracle, _events(*inputs), _flush_eps(dt))
    assert (np.abs(expected[3][:, :2]) > torch.finfo(dt).max).all()  # the case: d/dloc overflow
    assert (REF_EPS * _eps(dt) * scale[1] < np.abs(expected[1])).all()  # the bound can fail
    _check(got[1:2], expected[1:2], scale[1:2], REF_EPS * _eps(dt), names[1:2], family)
