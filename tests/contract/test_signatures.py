"""The parameter rule of ``docs/api.md``, checked on the signature of every public name.

Nothing here is listed by hand except the exceptions, each with its reason: a new public
function or class is checked the moment it joins an ``__all__``.

* value first: log densities, CDFs and losses take the value as their first argument;
* ``log_scale`` is positional; constrained or alternative forms (``scale``, ``var``,
  ``log_var``, ``rho``, ``probs``) are keyword-only;
* one floor name, ``min_scale`` (scale units); torch's ``eps`` only on ``GaussianNLLLoss``;
* ``reduction`` is keyword-only and defaults to ``"mean"``.
"""

from __future__ import annotations

import inspect

import pytest

from tests.contract.registry import PUBLIC_CALLABLES, public_signature

KEYWORD_FORMS = ("scale", "var", "log_var", "rho", "probs")
OLD_FLOOR_NAMES = ("min_diag", "min_log_scale", "eps")

# name -> reason it may take an alternative form positionally
POSITIONAL_FORM_EXCEPTIONS = {
    # drop-ins keep torch's positional meaning (torch.distributions.Normal(loc, scale))
    "distributions.Normal": "torch drop-in: Normal(loc, scale)",
    "distributions.ContinuousBernoulli": "torch drop-in: ContinuousBernoulli(probs, logits)",
    "nn.GaussianNLLLoss.forward": "torch drop-in: forward(input, target, var)",
    # the Gaussian KL of a VAE encoder is written in its natural output, the log-variance
    "functional.normal_kl": "KL in the encoder's log-variance form",
    "vae.gaussian_kl": "KL in the encoder's log-variance form",
    "vae.gaussian_kl_per_dim": "KL in the encoder's log-variance form",
}
EPS_ALLOWED = {"nn.GaussianNLLLoss": "torch drop-in: GaussianNLLLoss(eps=1e-6)"}

# name -> reason its first argument is not the value
NOT_VALUE_FIRST = {
    "functional.continuous_bernoulli_icdf": "inverse CDF: the quantile comes first",
    "functional.mixture_log_prob": "takes the components' log densities, not a value",
    "nn.GaussianNLLLoss.forward": "torch drop-in: forward(input, target, var)",
}


def positional_forms(sig: inspect.Signature) -> list[str]:
    """The alternative-form parameters of ``sig`` that a caller can pass by position."""
    return [
        p.name
        for p in sig.parameters.values()
        if p.name in KEYWORD_FORMS and p.kind is not inspect.Parameter.KEYWORD_ONLY
    ]


def _is_density_or_loss(name: str) -> bool:
    leaf = name.split(".")[-1]
    if leaf == "forward":
        return name.split(".")[1].endswith("Loss")
    return name.startswith("functional.") and leaf.endswith(("_log_prob", "_nll", "_cdf"))


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_alternative_forms_are_keyword_only(name):
    if name in POSITIONAL_FORM_EXCEPTIONS:
        return
    positional = positional_forms(public_signature(name))
    assert not positional, f"{name}: {positional} must be keyword-only (docs/api.md, rule 1)"


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_log_scale_is_positional(name):
    sig = public_signature(name)
    param = sig.parameters.get("log_scale")
    if param is None or name in POSITIONAL_FORM_EXCEPTIONS:
        return
    assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (
        f"{name}: log_scale must be positional (docs/api.md, rule 1), is {param.kind}"
    )


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_one_floor_name(name):
    sig = public_signature(name)
    old = [n for n in OLD_FLOOR_NAMES if n in sig.parameters]
    if name in EPS_ALLOWED:
        old.remove("eps")
    assert not old, f"{name}: floors are called min_scale, in scale units (docs/api.md, rule 2)"


@pytest.mark.parametrize("name", sorted(PUBLIC_CALLABLES))
def test_reduction_is_keyword_only_and_means(name):
    param = public_signature(name).parameters.get("reduction")
    if param is None:
        return
    assert param.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}: reduction must be keyword-only"
    assert param.default == "mean", f"{name}: reduction defaults to 'mean', like torch"


@pytest.mark.parametrize("name", sorted(n for n in PUBLIC_CALLABLES if _is_density_or_loss(n)))
def test_value_first(name):
    if name in NOT_VALUE_FIRST:
        return
    params = [p for p in public_signature(name).parameters.values() if p.name != "self"]
    assert params[0].name in ("value", "target"), (
        f"{name}: the value comes first (docs/api.md, rule 1), got {params[0].name!r}"
    )


def test_exceptions_name_public_callables():
    """An exception for a name that no longer exists (or never did) is a stale entry."""
    for table in (POSITIONAL_FORM_EXCEPTIONS, EPS_ALLOWED, NOT_VALUE_FIRST):
        stale = sorted(set(table) - set(PUBLIC_CALLABLES))
        assert not stale, f"stale exception entries: {stale}"


def test_the_rule_catches_a_positional_scale():
    """The check itself can fail: a function with a positional ``scale`` is reported."""

    def bad(value, loc, scale):
        return value

    def good(value, loc, log_scale=None, *, scale=None):
        return value

    assert positional_forms(inspect.signature(bad)) == ["scale"]
    assert positional_forms(inspect.signature(good)) == []
