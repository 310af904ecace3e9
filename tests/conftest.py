"""Shared pytest configuration for the probloss test suite.

Hypothesis: no per-example deadline (mpmath references at thousands of
digits for subnormal inputs take milliseconds, and the project forbids
timing assertions).  With the environment variable ``CI`` set, examples
are derandomized so a CI run is reproducible.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


_DISTRIBUTION_VALIDATION = torch.distributions.Distribution._validate_args


@pytest.fixture(autouse=True)
def _restore_distribution_validation():
    """torch.compile switches torch.distributions' default validation off globally the first
    time it runs (torch._dynamo does so on import); restore it after every test so that a
    test that compiles does not change what later tests see."""
    yield
    torch.distributions.Distribution.set_default_validate_args(_DISTRIBUTION_VALIDATION)
