"""The top-level package: ``import probloss`` gives every subpackage the README names,
``probloss.audit`` included, in a fresh interpreter and whichever is imported first."""

from __future__ import annotations

import subprocess
import sys

import pytest

SUBPACKAGES = ("audit", "distributions", "functional", "metrics", "nn", "special", "vae")


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_probloss_gives_audit_and_every_subpackage():
    code = (
        "import probloss\n"
        "print(probloss.audit.audit.__module__, probloss.audit.NaNGuard.__name__)\n"
        "print(sorted(set(probloss.__all__) - {'__version__'}))"
    )
    result = _fresh(code)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "probloss.audit.runner NaNGuard"
    assert second == str(sorted(SUBPACKAGES))


@pytest.mark.parametrize("first", SUBPACKAGES)
def test_no_import_cycle_whichever_subpackage_comes_first(first):
    result = _fresh(f"import probloss.{first}\nimport probloss\nprobloss.audit.NaNGuard")
    assert result.returncode == 0, result.stderr
