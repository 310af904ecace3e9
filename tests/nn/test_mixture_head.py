"""MixtureDensityHead and MixtureNLLLoss: shapes, initialisation, output layout, gradients,
extreme features, save/load, pen states, errors.

Reference values: the head's mixtures are checked against ``torch.distributions``
(``MixtureSameFamily`` of ``Normal`` / ``MultivariateNormal``) in float64, built by hand
from the linear layer's raw output with the layout and transforms the docstring states
(``scale = softplus(raw) + min_scale``, ``rho = tanh(atanh_rho)``, ``L`` row by row).
"""

from __future__ import annotations

import io
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
from probloss.nn.mixture import MixtureDensityHead, MixtureDensityOutput, MixtureNLLLoss

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
            + torch.diag_embed(torch.nn.functional.softplus(diag) + head.min_diag)
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


@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
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


@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
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


@pytest.mark.parametrize("pen_states", [0, 3])
@pytest.mark.parametrize("component", COMPONENTS)
def test_gradient_reaches_every_output(component, pen_states):
    """Every bias entry (each logit, mean, scale, correlation, pen logit) and every weight
    row gets a finite, nonzero gradient from the NLL."""
    torch.manual_seed(0)
    head = _head(component, pen_states=pen_states)
    out = head(torch.randn(16, IN))
    target = torch.randn(16, DIM[component])
    if pen_states:
        loss = -(out.mixture.log_prob(target) + out.pen.log_prob(torch.arange(16) % 3)).mean()
    else:
        loss = MixtureNLLLoss()(out, target)
    loss.backward()
    for name, p in head.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    assert (head.linear.bias.grad != 0).all()
    assert (head.linear.weight.grad.abs().sum(-1) > 0).all()
    d = DIM[component]
    scale_outputs = {"normal": K * d, "bivariate": 3 * K, "full": K * d * (d + 1) // 2}
    assert head.linear.out_features == K + K * d + scale_outputs[component] + pen_states


@pytest.mark.parametrize("component", COMPONENTS)
def test_pen_state_output(component):
    head = _head(component, pen_states=3)
    out = head(torch.zeros(4, 5, IN))
    assert isinstance(out, MixtureDensityOutput) and isinstance(out, tuple)
    mixture, pen = out
    assert mixture.batch_shape == (4, 5)
    assert isinstance(pen, Categorical) and pen.logits.shape == (4, 5, 3)
    torch.testing.assert_close(pen.probs, torch.full((4, 5, 3), 1.0 / 3))  # bias 0
    assert pen.sample().shape == (4, 5)
    assert not isinstance(_head(component)(torch.zeros(2, IN)), tuple)


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


def test_full_covariance_finite_for_extreme_features():
    """The diagonal of L is floored at min_diag (3.45e-4 by default): finite log density
    and gradient even where softplus(raw) underflows to 0 (raw ~ -1e3)."""
    torch.manual_seed(0)
    head = _head("full")
    assert head.min_diag == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps))
    mixture = head(1e3 * torch.randn(32, IN))
    nll = -mixture.log_prob(mixture.mean.detach())
    assert torch.isfinite(nll).all()
    nll.mean().backward()
    assert torch.isfinite(head.linear.weight.grad).all()


@pytest.mark.parametrize("component", COMPONENTS)
def test_state_dict_round_trip(component):
    torch.manual_seed(0)
    head = _head(component, init_scale=0.3, min_scale=1e-3, pen_states=2)
    buffer = io.BytesIO()
    torch.save(head.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    loaded = _head(component, init_scale=0.3, min_scale=1e-3, pen_states=2)
    loaded.load_state_dict(torch.load(buffer))
    features, target = torch.randn(5, IN), torch.randn(5, DIM[component])
    a, b = head(features), loaded(features)
    torch.testing.assert_close(a.mixture.log_prob(target), b.mixture.log_prob(target))
    torch.testing.assert_close(a.pen.logits, b.pen.logits)
    assert "component=" in repr(head) and "num_components=4" in repr(head)


@pytest.mark.parametrize("component", COMPONENTS)
def test_nan_features_raise_on_cpu(component):
    """Parameters are validated for CPU tensors (never on a GPU, where it would sync):
    NaN features give a ValueError naming the parameter, not a NaN loss later."""
    with pytest.raises(ValueError, match="logits"):
        _head(component)(torch.full((2, IN), float("nan")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"component": "diagonal"}, "component must be one of"),
        ({"component": "bivariate", "out_features": 3}, "needs out_features == 2"),
        ({"out_features": 0}, "out_features must be a positive int"),
        ({"num_components": 0}, "num_components must be a positive int"),
        ({"in_features": 2.5}, "in_features must be a positive int"),
        ({"pen_states": -1}, "pen_states must be an int >= 0"),
        ({"min_scale": -0.1}, "min_scale must be >= 0"),
        ({"init_scale": 0.1, "min_scale": 0.1}, "must exceed min_scale"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    args = {"in_features": IN, "out_features": 2, "num_components": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        MixtureDensityHead(
            args.pop("in_features"), args.pop("out_features"), args.pop("num_components"), **args
        )


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
    assert MixtureNLLLoss(reduction="none")(mixture, target).shape == (6,)
    torch.testing.assert_close(MixtureNLLLoss(reduction="none")(mixture, target), per_event)
    torch.testing.assert_close(MixtureNLLLoss(reduction="sum")(mixture, target), per_event.sum())
    torch.testing.assert_close(MixtureNLLLoss()(mixture, target), per_event.sum() / 6)


def test_loss_nan_policy():
    mixture, target = _mixture_and_target()
    target[1, 2] = float("nan")  # one coordinate of event 1
    target[4] = float("nan")
    with pytest.raises(ValueError, match="target"):
        MixtureNLLLoss()(mixture, target)
    masked = MixtureNLLLoss(nan_policy="mask", reduction="none")(mixture, target)
    keep = torch.tensor([True, False, True, True, False, True])
    assert (masked[~keep] == 0).all()
    clean = torch.where(torch.isnan(target), 0.0, target)
    torch.testing.assert_close(masked[keep], -mixture.log_prob(clean)[keep])
    mean = MixtureNLLLoss(nan_policy="mask")(mixture, target)
    torch.testing.assert_close(mean, masked.sum() / 4)


def test_loss_masked_events_get_zero_gradient():
    torch.manual_seed(0)
    head = _head("bivariate")
    features = torch.randn(4, IN, requires_grad=True)
    target = torch.randn(4, 2)
    target[0, 0] = float("nan")
    MixtureNLLLoss(nan_policy="mask")(head(features), target).backward()
    assert (features.grad[0] == 0).all() and (features.grad[1:] != 0).any()
    assert torch.isfinite(head.linear.weight.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"reduction": "avg"}, "reduction must be"), ({"nan_policy": "omit"}, "nan_policy must be")],
)
def test_loss_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MixtureNLLLoss(**kwargs)
