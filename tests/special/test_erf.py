"""``probloss.special.erf.erf``: ``torch.erf`` in eager code, exact also while compiling."""

from __future__ import annotations

import math

import pytest
import torch
from mpmath import mp

from probloss.special.erf import _series_coefficients, erf


@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # torch's
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_erf_is_exact_while_compiling(dtype):
    """Inductor's float32 vector ``erf`` has an absolute error below ``|x| = 0.28``
    (``erf(1e-15) = 0``); compiled, the library's erf is within 4 eps relative of mpmath
    everywhere (series: Horner's rule on decreasing alternating terms, a few roundings;
    ``torch.erf`` above 1/2: within 2 ulps)."""
    tiny = math.log10(torch.finfo(dtype).tiny)
    mags = torch.logspace(tiny + 1, 0, 600, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.linspace(-6, 6, 241, dtype=torch.float64)]).to(dtype)
    torch._dynamo.reset()
    got = torch.compile(erf, fullgraph=True)(x).double()
    with mp.workdps(50):
        want = [float(mp.erf(mp.mpf(float(v)))) for v in x.double()]
    want = torch.tensor(want, dtype=torch.float64)
    rel = (got - want).abs() / want.abs().clamp_min(torch.finfo(torch.float64).tiny)
    assert float(rel.max()) <= 4 * torch.finfo(dtype).eps, float(rel.max())
    assert torch.equal(erf(x), torch.erf(x))  # eager: torch's own


def test_series_length_follows_from_eps():
    """6 terms in float32, 12 in float64: the first omitted term at |x| = 1/2 is below
    eps / 4 and the last kept one is not."""
    for dtype, n in ((torch.float32, 6), (torch.float64, 12)):
        assert len(_series_coefficients(dtype)) == n
        eps = torch.finfo(dtype).eps

        def term(k):
            return 0.5 ** (2 * k) / (math.factorial(k) * (2 * k + 1))

        assert term(n) <= eps / 4 < term(n - 1)
