"""MixtureDensityHead and MixtureNLLLoss: shapes, initialisation, output layout, gradients,
extreme features, save/load, pen states (one StrokeMixture), option errors.

Reference values: the head's mixtures are checked against ``torch.distributions``
(``MixtureSameFamily`` of ``Normal`` / ``MultivariateNormal``) in float64, built by hand
from the linear layer's raw output with the layout and transforms the docstring states
(``scale = softplus(raw) + min_scale``, ``rho = tanh(atanh_rho)``, ``L`` row by row).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from probloss.distributions.mixture import (
    BivariateNormalMixture,
    MultivariateNormalMixture,
    NormalMixture,
)
from probloss.distributions.stroke import StrokeMixture
from probloss.nn import BivariateNormalHead, NormalHead
from probloss.nn.mixture import MixtureDensityHead, MixtureNLLLoss

IN, K = 6, 4
DIM = {"normal": 3, "bivariate": 2, "full": 3}
COMPONENTS = list(DIM)


def _head(component, **kw):
    return MixtureDensityHead(IN, DIM[component], K, component=component, **kw)


def _reference(head: MixtureDensityHead, features: torch.Tensor):
    """The mixture the head should return, built with torch.distributions from the raw
    linear output and the documented layout: logits (K), loc (K*D), scale parameters."""
    d = head.out_features
    out = head.linear(features)
    logits, rest = out[..., :K], out[..., K:]
    loc, rest = rest[..., : K * d].unflatten(-1, (K, d)), rest[..., K * d :]
    if head.component == "full":
        raw = rest[..., : K * d * (d + 1) // 2].unflatten(-1, (K, d * (d + 1) // 2))
        rows, cols = torch.tril_indices(d, d)
        tril = raw.new_zeros((*raw.shape[:-1], d, d))
        tril[..., rows, cols] = raw
        diag = torch.diagonal(tril, dim1=-2, dim2=-1)
        tril = (
            tril
            - torch.diag_embed(diag)
            + torch.diag_embed(torch.nn.functional.softplus(diag) + head.min_scale)
        )
        return MixtureSameFamily(
            Categorical(logits=logits), MultivariateNormal(loc, scale_tril=tril)
        )
    scale = torch.nn.functional.softplus(rest[..., : K * d].unflatten(-1, (K, d))) + head.min_scale
    if head.component == "normal":
        comp = Independent(Normal(loc, scale), 1)
    else:
        rho = torch.tanh(rest[..., K * d : K * d + K])
        off = rho * scale[..., 0] * scale[..., 1]
        cov = torch.stack(
            [
                torch.stack([scale[..., 0] ** 2, off], -1),
                torch.stack([off, scale[..., 1] ** 2], -1),
            ],
            -2,
        )
        comp = MultivariateNormal(loc, covariance_matrix=cov)
    return MixtureSameFamily(Categorical(logits=logits), comp)


@pytest.mark.parametrize("component", COMPONENTS)
def test_shapes_and_type(component):
    head = _head(component)
    mixture = head(torch.randn(2, 5, IN))
    expected_type = {
        "normal": NormalMixture,
        "bivariate": BivariateNormalMixture,
        "full": MultivariateNormalMixture,
    }[component]
    assert isinstance(mixture, expected_type)
    d = DIM[component]
    assert mixture.batch_shape == (2, 5) and mixture.event_shape == (d,)
    assert mixture.sample().shape == (2, 5, d)
    assert mixture.sample((7,)).shape == (7, 2, 5, d)
    assert mixture.log_prob(torch.randn(2, 5, d)).shape == (2, 5)
    assert mixture.log_prob(torch.randn(3, 1, 1, d)).shape == (3, 2, 5)  # sample dims


@pytest.mark.parametrize("min_scale", [None, 1e-3])
@pytest.mark.parametrize("component", COMPONENTS)
def test_matches_torch_reference_with_documented_layout(component, min_scale):
    """float64 against torch.distributions built by hand: 1e-10 relative (rounding only)."""
    torch.manual_seed(0)
    head = _head(component, min_scale=min_scale).double()
    features = torch.randn(8, IN, dtype=torch.float64)
    value = torch.randn(8, DIM[component], dtype=torch.float64)
    ours = head(features).log_prob(value)
    ref = _reference(head, features).log_prob(value)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("min_scale", [None, 1e-3])
@pytest.mark.parametrize("init_scale", [0.01, 1.0, 30.0])
@pytest.mark.parametrize("component", COMPONENTS)
def test_starts_at_init_scale_equal_weights_no_correlation(component, init_scale, min_scale):
    """Zero features leave the biases: every component scale is init_scale to float32
    rounding (relative 1e-6), weights are uniform, rho = 0, off-diagonals of L are 0."""
    head = _head(component, init_scale=init_scale, min_scale=min_scale)
    mixture = head(torch.zeros(2, IN))
    d = DIM[component]
    if component == "full":
        tril = mixture.component_distribution.scale_tril
        expected = init_scale * torch.eye(d).expand(2, K, d, d)
        torch.testing.assert_close(tril, expected, rtol=1e-6, atol=0)
        weights = mixture.mixture_distribution.probs
    else:
        scale = mixture.log_scale.exp()
        torch.testing.assert_close(scale, torch.full_like(scale, init_scale), rtol=1e-6, atol=0)
        weights = mixture.mixture_weights
        if component == "bivariate":
            assert (mixture.atanh_rho == 0).all()
    torch.testing.assert_close(weights, torch.full((2, K), 1.0 / K))


@pytest.mark.parametrize("component", COMPONENTS)
def test_initial_means_differ_between_components(component):
    """The loc biases keep nn.Linear's random init, so components do not start identical."""
    torch.manual_seed(1)
    mixture = _head(component)(torch.zeros(1, IN))
    loc = mixture.loc if component != "full" else mixture.component_distribution.loc
    assert torch.cdist(loc[0], loc[0]).add(torch.eye(K)).min() > 0


def _points(n, pen_states=3, seed=0):
    """n stroke points: normal offsets, then a one-hot pen state cycling through the states."""
    g = torch.Generator().manual_seed(seed)
    pen = torch.nn.functional.one_hot(torch.arange(n) % pen_states, pen_states).float()
    return torch.cat((torch.randn(n, 2, generator=g), pen), -1)


@pytest.mark.parametrize(
    ("component", "pen_states"), [(c, 0) for c in COMPONENTS] + [("bivariate", 3)]
)
def test_gradient_reaches_every_output(component, pen_states):
    """Every bias entry (each logit, mean, scale, correlation, pen logit) and every weight
    row gets a finite, nonzero gradient from the NLL."""
    torch.manual_seed(0)
    head = _head(component, pen_states=pen_states)
    out = head(torch.randn(16, IN))
    target = _points(16) if pen_states else torch.randn(16, DIM[component])
    loss = MixtureNLLLoss()(target, out)
    loss.backward()
    for name, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert (head.linear.bias.grad != 0).all()
    assert (head.linear.weight.grad.abs().sum(-1) > 0).all()
    d = DIM[component]
    scale_outputs = {"normal": K * d, "bivariate": 3 * K, "full": K * d * (d + 1) // 2}
    assert head.linear.out_features == K + K * d + scale_outputs[component] + pen_states


def test_pen_state_output_is_one_stroke_mixture():
    """pen_states = 3: one distribution over the stroke-5 point, built from the documented
    layout (logits, loc, raw scales, atanh_rho, then the pen logits, bias 0); its log_prob
    is the offsets' mixture plus the pen state's log_softmax (exact: the same calls)."""
    torch.manual_seed(0)
    head = _head("bivariate", pen_states=3)
    features = torch.randn(4, 5, IN)
    out = head(features)
    assert isinstance(out, StrokeMixture)
    assert out.batch_shape == (4, 5) and out.event_shape == (5,)
    assert out.sample().shape == (4, 5, 5) and out.sample((2,)).shape == (2, 4, 5, 5)
    pen_logits = head.linear(features)[..., -3:]
    torch.testing.assert_close(out.pen_logits, pen_logits)
    assert isinstance(out.pen, Categorical) and out.pen.logits.shape == (4, 5, 3)
    zero = head(torch.zeros(2, IN))
    torch.testing.assert_close(zero.pen.probs, torch.full((2, 3), 1.0 / 3))  # bias 0
    points = _points(20).view(4, 5, 5)
    state = points[..., 2:].argmax(-1, keepdim=True)
    log_pen = torch.log_softmax(pen_logits, -1).gather(-1, state).squeeze(-1)
    assert torch.equal(out.log_prob(points), out.offsets.log_prob(points[..., :2]) + log_pen)


def test_removed_output_type_says_what_replaced_it():
    import probloss.nn
    import probloss.nn.mixture

    for module in (probloss.nn, probloss.nn.mixture):
        with pytest.raises(AttributeError, match=r"returns one distribution, a .*StrokeMixture"):
            module.MixtureDensityOutput  # noqa: B018
        assert not hasattr(module, "MixtureDensityOutput")
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        probloss.nn.Nothing  # noqa: B018


@pytest.mark.parametrize(
    ("component", "min_scale", "magnitude"),
    [
        ("normal", 1e-3, 1e2),
        ("normal", 1e-3, 1e4),
        ("normal", 0.0, 30.0),
        ("bivariate", 0.0, 30.0),
        ("bivariate", 1e-3, 30.0),
        # features x 1e3 push the log-scale below -87 in float32, outside the fused kernel's
        # domain: the mixture must fall back to the plain path, not return NaN
        ("normal", 0.0, 1e3),
    ],
)
def test_log_prob_and_gradient_finite_for_extreme_features(component, min_scale, magnitude):
    """Features of size 30..1e4 drive the logits to +-1e2..1e5 (softmax weights of exactly
    0 and 1), the means to +-1e2..1e4, the raw scales to far below -88, where softplus
    underflows to 0 in float32 (without a floor the log-scale is then about the raw value,
    down to -45 at magnitude 30; with min_scale = 1e-3 it is at least log 1e-3), and
    atanh_rho to about +-50, where tanh(atanh_rho) == 1 in float32. The log density at
    the mixture mean (finite: a weighted average of the means) is then finite with a
    finite gradient. Larger atanh_rho are left out: at |atanh_rho| > 88 the quadratic
    form of a point off the line of a degenerate component is ~exp(2 |atanh_rho|), beyond
    float32, so -inf is the correctly rounded log density there."""
    torch.manual_seed(0)
    head = _head(component, min_scale=min_scale)
    mixture = head(magnitude * torch.randn(32, IN))
    if component == "normal":
        assert mixture.logits.abs().max() > magnitude  # the regime claimed above
        if min_scale == 0:
            assert mixture.log_scale.min() < -40
    else:
        assert mixture.atanh_rho.abs().max() > 40
    target = mixture.mean.detach()
    nll = -mixture.log_prob(target)
    assert torch.isfinite(nll).all()
    nll.mean().backward()
    for name, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_full_covariance_floor_is_min_scale():
    """The documented floor of L's diagonal: min_scale (default: the float32 default, see
    the next test), fixed at construction whatever the module's dtype; 0 is refused, and
    the old name min_diag is a TypeError naming min_scale."""
    with pytest.raises(ValueError, match=r"min_scale must be a finite number in \(0.0"):
        _head("full", min_scale=0.0)
    with pytest.raises(TypeError, match="min_diag was renamed min_scale"):
        _head("full", min_diag=1e-3)
    head = _head("full", min_scale=1e-3)
    assert head.min_scale == 1e-3
    mixture = head.double()(torch.full((2, IN), -1e4, dtype=torch.float64))
    diag = torch.diagonal(mixture.scale_tril, dim1=-2, dim2=-1)
    assert (diag >= 1e-3).all()


def test_loss_never_reads_non_cpu_values():
    """nan_policy="raise" checks targets of CPU tensors only (a GPU step never waits for
    the host): on meta tensors, which have no values, any read would raise."""
    head = _head("bivariate").to("meta")
    features, target = torch.zeros(4, IN, device="meta"), torch.zeros(4, 2, device="meta")
    for reduction in ("mean", "sum", "none"):
        out = MixtureNLLLoss(reduction=reduction)(target, head(features))
        assert out.device.type == "meta"


def test_full_covariance_finite_for_extreme_features():
    """The diagonal of L is floored at min_scale (3.45e-4 by default): finite log density
    and gradient even where softplus(raw) underflows to 0 (raw ~ -1e3)."""
    torch.manual_seed(0)
    head = _head("full")
    assert head.min_scale == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps))
    mixture = head(1e3 * torch.randn(32, IN))
    nll = -mixture.log_prob(mixture.mean.detach())
    assert torch.isfinite(nll).all()
    nll.mean().backward()
    assert torch.isfinite(head.linear.weight.grad).all()


@pytest.mark.parametrize("component", COMPONENTS)
def test_nan_features_raise_on_cpu(component):
    """Parameters are validated for CPU tensors (never on a GPU, where it would sync):
    NaN features give a ValueError naming the parameter, not a NaN loss later."""
    with pytest.raises(ValueError, match="logits"):
        _head(component)(torch.full((2, IN), float("nan")))


# --------------------------------------------------------------------------------------
# MixtureNLLLoss
# --------------------------------------------------------------------------------------


def _mixture_and_target(seed=0):
    torch.manual_seed(seed)
    head = _head("normal").double()
    return head(torch.randn(6, IN, dtype=torch.float64)), torch.randn(6, 3, dtype=torch.float64)


def test_loss_reductions_are_of_events():
    """'mean' averages over the 6 events (points), not the 18 coordinates."""
    mixture, target = _mixture_and_target()
    per_event = -mixture.log_prob(target)
    assert MixtureNLLLoss(reduction="none")(target, mixture).shape == (6,)
    torch.testing.assert_close(MixtureNLLLoss(reduction="none")(target, mixture), per_event)
    torch.testing.assert_close(MixtureNLLLoss(reduction="sum")(target, mixture), per_event.sum())
    torch.testing.assert_close(MixtureNLLLoss()(target, mixture), per_event.sum() / 6)


def test_loss_nan_policy():
    mixture, target = _mixture_and_target()
    target[1, 2] = float("nan")  # one coordinate of event 1
    target[4] = float("nan")
    with pytest.raises(ValueError, match="target"):
        MixtureNLLLoss()(target, mixture)
    masked = MixtureNLLLoss(nan_policy="mask", reduction="none")(target, mixture)
    keep = torch.tensor([True, False, True, True, False, True])
    assert (masked[~keep] == 0).all()
    clean = torch.where(torch.isnan(target), 0.0, target)
    torch.testing.assert_close(masked[keep], -mixture.log_prob(clean)[keep])
    mean = MixtureNLLLoss(nan_policy="mask")(target, mixture)
    torch.testing.assert_close(mean, masked.sum() / 4)


def test_loss_masked_events_get_zero_gradient():
    torch.manual_seed(0)
    head = _head("bivariate")
    features = torch.randn(4, IN, requires_grad=True)
    target = torch.randn(4, 2)
    target[0, 0] = float("nan")
    MixtureNLLLoss(nan_policy="mask")(target, head(features)).backward()
    assert (features.grad[0] == 0).all() and (features.grad[1:] != 0).any()
    assert torch.isfinite(head.linear.weight.grad).all()


def test_loss_takes_the_value_first():
    """(value, distribution), like every probloss loss; the old order is a TypeError that
    says so, and reduction / nan_policy are keyword-only."""
    mixture, target = _mixture_and_target()
    with pytest.raises(TypeError, match=r"the order is \(value, distribution\)"):
        MixtureNLLLoss()(mixture, target)
    with pytest.raises(TypeError, match=r"the order is \(value, distribution\)"):
        MixtureNLLLoss()(target, (mixture, mixture))  # e.g. the old (mixture, pen) tuple
    with pytest.raises(TypeError):
        MixtureNLLLoss("sum")


HEAD_OUTPUTS = {
    "normal-head": (lambda: NormalHead(IN, 3), lambda n: torch.randn(n, 3)),
    "bivariate-head": (lambda: BivariateNormalHead(IN), lambda n: torch.randn(n, 2)),
    **{
        f"mdn-{c}": (lambda c=c: _head(c), lambda n, c=c: torch.randn(n, DIM[c]))
        for c in COMPONENTS
    },
    "mdn-pen": (lambda: _head("bivariate", pen_states=3), _points),
}


@pytest.mark.parametrize("name", list(HEAD_OUTPUTS))
def test_loss_works_on_every_head_output(name):
    """MixtureNLLLoss(target, head(x)) for every head and option: one value per point,
    "mean" the average over points of -log_prob (exact: the same calls), and with
    nan_policy="mask" a point with a NaN coordinate (an offset, or a pen entry) gives 0
    and the others their -log_prob."""
    torch.manual_seed(0)
    make_head, make_target = HEAD_OUTPUTS[name]
    d = make_head()(torch.randn(6, IN))
    target = make_target(6)
    per_point = -d.log_prob(target)
    assert per_point.shape == (6,)
    assert torch.equal(MixtureNLLLoss(reduction="none")(target, d), per_point)
    assert torch.equal(MixtureNLLLoss()(target, d), per_point.sum() / 6)
    target[2, 0] = float("nan")
    target[4, -1] = float("nan")  # the last pen entry for stroke points
    masked = MixtureNLLLoss(nan_policy="mask", reduction="none")(target, d)
    keep = torch.tensor([True, True, False, True, False, True])
    assert (masked[~keep] == 0).all()
    assert torch.equal(masked[keep], per_point[keep])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_loss_refuses_a_mixture_that_enlarges_the_target_batch(component, reduction):
    """Features of shape (64, 1, IN) give a mixture of batch shape (64, 1); against
    targets (64, D) its log_prob is a (64, 64) matrix whose mean is a silent wrong loss.
    A reduced loss raises, naming the argument and both shapes; "none" broadcasts."""
    head = _head(component)
    mixture = head(torch.zeros(64, 1, IN))
    target = torch.zeros(64, DIM[component])
    with pytest.raises(ValueError, match=r"distribution of batch shape \(64, 1\).*\(64,\)"):
        MixtureNLLLoss(reduction=reduction)(target, mixture)
    assert MixtureNLLLoss(reduction="none")(target, mixture).shape == (64, 64)
    # a mixture broadcast *up to* the targets (one shared mixture) is fine
    shared = head(torch.zeros(1, IN))
    assert MixtureNLLLoss(reduction=reduction)(target, shared).shape == ()


@pytest.mark.parametrize("nan_policy", ["raise", "mask"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_loss_of_an_empty_batch_reduces_like_torch(component, nan_policy):
    """Empty in, empty out: "none" is empty, "sum" is 0, "mean" is NaN (0 / 0 events, as
    torch's losses and torch.mean), and backward runs (zero gradient)."""
    head = _head(component)
    mixture = head(torch.zeros(0, IN))
    target = torch.zeros(0, DIM[component])
    assert MixtureNLLLoss(reduction="none", nan_policy=nan_policy)(target, mixture).shape == (0,)
    total = MixtureNLLLoss(reduction="sum", nan_policy=nan_policy)(target, mixture)
    assert total == 0
    total.backward()
    assert (head.linear.weight.grad == 0).all()
    assert torch.isnan(MixtureNLLLoss(reduction="mean", nan_policy=nan_policy)(target, mixture))


# --------------------------------------------------------------------------------------
# Extreme features with min_scale = 0 (issue 10: NaN from the fused kernels)
# --------------------------------------------------------------------------------------


def _mp_log_prob(value, logits, loc, log_scale, atanh_rho=None):
    """mpmath oracle: log sum_k softmax(logits)_k N(value | component k), from the closed
    form (diagonal normal, or the bivariate density with rho = tanh(atanh_rho)) at 60
    digits (more inside ``mp.diff``, which raises the precision for its differences);
    exp of -1e87 is an ordinary mpf there, nothing under- or overflows."""
    from mpmath import mp

    with mp.workdps(max(60, mp.dps)):
        log_w = [mp.mpf(v) for v in logits]
        lse_w = mp.log(mp.fsum(mp.exp(v) for v in log_w))
        terms = []
        for k in range(len(log_w)):
            z = [(mp.mpf(x) - mp.mpf(m)) / mp.exp(mp.mpf(s))
                 for x, m, s in zip(value, loc[k], log_scale[k], strict=True)]  # fmt: skip
            log_norm = -mp.fsum(mp.mpf(s) for s in log_scale[k]) - len(z) * mp.log(2 * mp.pi) / 2
            if atanh_rho is None:
                quad = mp.fsum(v * v for v in z) / 2
            else:
                rho = mp.tanh(mp.mpf(atanh_rho[k]))
                one_m = 1 - rho * rho
                log_norm -= mp.log(one_m) / 2
                quad = (z[0] ** 2 - 2 * rho * z[0] * z[1] + z[1] ** 2) / (2 * one_m)
            terms.append(log_w[k] - lse_w + log_norm - quad)
        top = max(terms)
        return top + mp.log(mp.fsum(mp.exp(t - top) for t in terms))


def _mp_gradient(f, args):
    """d f / d args[i][j] by mpmath's high-precision numerical differentiation."""
    from mpmath import mp

    grads = []
    with mp.workdps(60):
        for i, arg in enumerate(args):
            flat = list(arg)
            row = []
            for j in range(len(flat)):

                def g(t, i=i, j=j):
                    new = [list(a) for a in args]
                    new[i][j] = t
                    return f(*new)

                row.append(float(mp.diff(g, mp.mpf(flat[j]))))
            grads.append(row)
    return grads


@pytest.mark.parametrize("component", ["normal", "bivariate"])
def test_far_value_with_a_degenerate_component_is_finite_and_exact(component):
    """The issue's reproduction through the head, default min_scale = 0, float32: two
    equal-weight components at 0 with log-scales -80 and 5 (the raw biases -80, where
    log_softplus(-80) = -80 in float32, and softplus_inverse(e^5)), value (1e6, 1e6).
    Component 0's residual 1e6 e^80 overflows; the exact log density is that of
    component 1, -4.54e7, with gradients 45.4 (loc), 4.54e7 (log_scale, atanh_rho),
    -+0.5 (logits) and 0 for component 0.

    Reference: mpmath (``_mp_log_prob``) at the head's own float32 parameters. Bound:
    the value and each gradient is z^2, z or a constant with z = r e^{-s}: exp within
    2 ulp, a product and a square add 1.5 ulp, so z^2 carries at most 8 ulp and the few
    O(1) terms added to it nothing visible: 16 eps32 relative, the entries that are
    exactly 0 must be 0."""
    from probloss.special import softplus_inverse

    d = DIM[component]
    head = MixtureDensityHead(1, d, 2, component=component)  # min_scale = 0
    with torch.no_grad():
        head.linear.weight.zero_()
        bias = list(head.linear.bias.split(head._sizes))
        bias[0].zero_()
        bias[1].zero_()
        raw = bias[2].view(2, d)
        raw[0] = -80.0
        raw[1] = float(softplus_inverse(torch.tensor(math.exp(5.0), dtype=torch.float64)))
        if component == "bivariate":
            bias[3].zero_()
    mixture = head(torch.zeros(1, 1))
    params = ["logits", "loc", "log_scale"] + (["atanh_rho"] if component == "bivariate" else [])
    for name in params:
        getattr(mixture, name).retain_grad()
    value = torch.full((1, d), 1e6)
    lp = mixture.log_prob(value)
    lp.sum().backward()

    flat = [getattr(mixture, n).detach()[0].double().flatten().tolist() for n in params]

    def f(logits, loc, log_scale, *rest):
        k2 = lambda v: [v[:d], v[d:]]  # noqa: E731
        return _mp_log_prob(value[0].tolist(), logits, k2(loc), k2(log_scale), *rest)

    expected = float(f(*flat))
    bound = 16 * torch.finfo(torch.float32).eps
    assert math.isfinite(lp.item()) and lp.item() == pytest.approx(expected, rel=bound)
    for name, exp_grad in zip(params, _mp_gradient(f, flat), strict=True):
        got = getattr(mixture, name).grad[0].double().flatten()
        exp_grad = torch.tensor(exp_grad, dtype=torch.float64)
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(
            got, exp_grad, rtol=bound, atol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    for pname, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("component", ["normal", "bivariate"])
def test_zero_weight_component_with_overflowing_residual_is_finite(component):
    """The sibling case: a component whose weight underflows (logit -200 against 0,
    softmax weight e^-200 = 0 in float32) and whose residual overflows (log-scale -80 at
    distance 1e6) must drop out of the log density and its gradient, not give NaN. The
    exact value is that of the other component (unit scale, at distance 1 per
    coordinate): log N = -D/2 log 2 pi - D/2, float32 to 4 ulp."""
    d = DIM[component]
    head = MixtureDensityHead(1, d, 2, component=component)
    with torch.no_grad():
        head.linear.weight.zero_()
        bias = list(head.linear.bias.split(head._sizes))
        bias[0].copy_(torch.tensor([-200.0, 0.0]))
        loc = bias[1].view(2, d)
        loc[0] = 0.0
        loc[1] = 1e6 - 1.0
        raw = bias[2].view(2, d)
        raw[0] = -80.0
        raw[1] = math.log(math.e - 1.0)  # softplus = 1: unit scale
        if component == "bivariate":
            bias[3].zero_()
    mixture = head(torch.zeros(1, 1))
    lp = mixture.log_prob(torch.full((1, d), 1e6))
    lp.sum().backward()
    expected = -d / 2 * math.log(2 * math.pi) - d / 2
    assert lp.item() == pytest.approx(expected, rel=4 * torch.finfo(torch.float32).eps, abs=1e-6)
    for pname, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), pname
