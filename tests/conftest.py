"""Shared pytest configuration for the probloss test suite.

Hypothesis: no per-example deadline (mpmath references at thousands of
digits for subnormal inputs take milliseconds, and the project forbids
timing assertions).  With the environment variable ``CI`` set, examples
are derandomized so a CI run is reproducible.
"""

import os

from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")
