"""The fuzz itself: every record in every dtype (see :mod:`tests.fuzz.checks`).

References: the float64 evaluation of the same function on the exactly converted inputs
(finiteness and representability), checked on a subsample against mpmath closed forms
(:mod:`tests.fuzz.oracle`, :mod:`tests.reference`). Size ``PROBLOSS_FUZZ_DRAWS`` (default
2000: the CI short form), seed ``PROBLOSS_FUZZ_SEED`` (default 0). A failure prints the
function, dtype, the first offending rows' inputs, got and reference: paste it into a bug
report, or rerun with the same seed.
"""

from __future__ import annotations

import pytest

from .checks import run, run_fused, run_oracle
from .draws import DRAWS, DTYPES, dtype_name
from .records import RECORDS

# Rows per dtype of the mpmath subsample (4 dtypes): mpmath at up to ~1000 digits costs
# milliseconds per row; 8 rows x 4 dtypes keeps the whole subsample to a few seconds.
ORACLE_ROWS = max(8, DRAWS // 2000 * 8)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_no_nan_and_no_spurious_inf(record, dtype):
    failures = run(record, dtype, DRAWS)
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    "record", [r for r in RECORDS if r.oracle is not None], ids=lambda r: r.name
)
def test_float64_path_matches_mpmath(record):
    failures = run_oracle(record, ORACLE_ROWS)
    assert not failures, "\n\n".join(failures[:20]) + f"\n({len(failures)} in all)"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_name)
@pytest.mark.parametrize(
    "record", [r for r in RECORDS if r.fused is not None], ids=lambda r: r.name
)
def test_fused_equals_plain(record, dtype):
    failures = run_fused(record, dtype, DRAWS)
    assert not failures, "\n\n".join(failures)
