"""Contract of the fuzz registry (:mod:`tests.fuzz.records`): nothing public goes unfuzzed.

Every name in ``probloss.special.__all__``, ``probloss.functional.__all__`` and
``probloss.metrics.__all__``, and every
distribution class in ``probloss.distributions.__all__`` (each of ``log_prob``, ``cdf``,
``icdf``, ``mean``, ``variance``, ``entropy``, ``mode``, ``covariance_matrix`` that the
class defines, i.e. does not inherit from ``torch.distributions.Distribution``'s
``NotImplementedError``) must have a record; a new public function without one fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Distribution

import probloss.distributions
import probloss.functional
import probloss.metrics
import probloss.special

from .draws import KINDS
from .records import DISTRIBUTION_METHODS, RECORDS


def _targets() -> set[str]:
    return {r.target for r in RECORDS}


def _defined_methods(cls) -> list[str]:
    return [
        m
        for m in DISTRIBUTION_METHODS
        if getattr(cls, m, None) is not None
        and getattr(cls, m) is not getattr(Distribution, m, None)
    ]


@pytest.mark.parametrize(
    "module",
    [probloss.special, probloss.functional, probloss.metrics],
    ids=lambda m: m.__name__,
)
def test_every_public_function_has_a_record(module):
    short = module.__name__.removeprefix("probloss.")
    missing = [n for n in module.__all__ if f"{short}.{n}" not in _targets()]
    assert not missing, f"add a fuzz record in tests/fuzz/records.py for {short}: {missing}"


@pytest.mark.parametrize("name", probloss.distributions.__all__)
def test_every_distribution_method_has_a_record(name):
    cls = getattr(probloss.distributions, name)
    assert issubclass(cls, Distribution)
    missing = [m for m in _defined_methods(cls) if f"distributions.{name}.{m}" not in _targets()]
    assert not missing, f"add fuzz records in tests/fuzz/records.py for {name}: {missing}"


def test_every_record_targets_a_public_name():
    for r in RECORDS:
        module, _, rest = r.target.partition(".")
        obj = getattr(probloss, module)
        head = rest.split(".")[0]
        assert head in obj.__all__, f"{r.name}: {head} is not in probloss.{module}.__all__"


def test_records_state_their_domains():
    for r in RECORDS:
        assert r.policy in ("same", "promote"), r.name
        for a in r.args:
            assert a.domain in KINDS, f"{r.name}: argument {a.name} has domain {a.domain!r}"


def test_contract_catches_a_missing_record(monkeypatch):
    """The contract can fail: an extra public name without a record is reported."""
    monkeypatch.setattr(probloss.special, "__all__", [*probloss.special.__all__, "new_fn"])
    with pytest.raises(AssertionError, match="new_fn"):
        test_every_public_function_has_a_record(probloss.special)


def test_distribution_methods_found():
    """The defined-method rule sees inherited definitions and leaves out missing ones."""
    assert "cdf" in _defined_methods(torch.distributions.Normal)  # torch's own cdf counts
    assert "cdf" not in _defined_methods(probloss.distributions.NormalMixture)
    assert "covariance_matrix" not in _defined_methods(probloss.distributions.Normal)


def test_undefined_statements_are_well_formed():
    """Each statement has a reason, names existing arguments, and marks a (N,) boolean mask
    of the record's own draws; on those draws it covers few rows (the rule stays strict: an
    infinite value coordinate is drawn with probability 1/32, two with about 1/1000)."""
    from .checks import make_inputs

    for r in RECORDS:
        for u in r.undefined:
            assert u.reason, r.name
            names = {a.name for a in r.args}
            assert u.grads is None or set(u.grads) <= names, r.name
            rows = u.where(*make_inputs(r, torch.float64, 4000))
            assert rows.dtype == torch.bool and rows.shape == (4000,), r.name
            assert int(rows.sum()) <= 40, (r.name, int(rows.sum()))


def _known_limit_rows():
    from .checks import make_inputs
    from .records import BY_NAME, KNOWN_LIMITS

    for name, limits in KNOWN_LIMITS.items():
        r = BY_NAME[name]
        for i, lim in enumerate(limits):
            counts = {
                d: int(lim.where(*make_inputs(r, d, 2000), dtype=d).sum()) for d in lim.dtypes
            }
            yield name, i, lim, counts


def _example_still_fails(name: str, lim) -> int:
    """1 where the limit's example row is matched and fails the check without the limit."""
    from . import checks
    from .records import BY_NAME, KNOWN_LIMITS

    if lim.example is None:
        return 0
    record = BY_NAME[name]
    row = [torch.tensor([v], dtype=torch.float64) for v in lim.example]
    matched = 0
    for d in lim.dtypes:
        assert bool(lim.where(*row, dtype=d).all()), (name, "the example is not matched", d)
        excused = checks.check(record, d, row)
        others = tuple(other for other in KNOWN_LIMITS[name] if other is not lim)
        saved = KNOWN_LIMITS[name]
        KNOWN_LIMITS[name] = others
        try:
            bare = checks.check(record, d, row)
        finally:
            KNOWN_LIMITS[name] = saved
        assert not excused, (name, excused)
        matched += bool(bare)
    return matched


def test_known_limits_are_not_stale():
    """Every KnownLimit (an open library hole) still matches a row of the current draws
    (2000 per dtype, seed 0), or its example row still fails without it: when the library
    is fixed, delete the statement."""
    for name, i, lim, counts in _known_limit_rows():
        assert lim.reason and lim.issue, name
        total = sum(counts.values()) + _example_still_fails(name, lim)
        assert total >= 1, (
            f"{name}: KnownLimit #{i} ({lim.reason[:60]}...) matches no draw: the hole looks "
            "fixed; check it and delete the statement in tests/fuzz/records.py"
        )
