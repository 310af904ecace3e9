"""Tests of the full-covariance mixture (``probloss.functional.mixture.multivariate``).

Where the numbers come from and the bounds: the module docstring of
``tests/functional/mixture/_density_oracles.py``
(the references, oracles and inputs these files share).
"""

from __future__ import annotations

import numpy as np
import scipy.special
import scipy.stats
import torch

from probloss.functional.mixture import (
    multivariate_normal_mixture_log_prob,
    normal_mixture_log_prob,
)
from tests.functional._checks import assert_within
from tests.functional.mixture._density_oracles import (
    REF_EPS,
    _eps,
    _seeded,
)


def test_multivariate_mixture_matches_scipy_and_diagonal_case():
    """float64: against ``scipy.stats.multivariate_normal.logpdf`` with ``cov = L L^T`` per
    component (``|err| <= 32 eps S``, ``S = |ref| + max_k |log pi_k + log N_k|``); with
    diagonal ``L`` it equals ``normal_mixture_log_prob`` to 1e-13 relative."""
    g = _seeded(90)
    n, k, d = 12, 3, 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64)
    loc = torch.randn(n, k, d, generator=g, dtype=torch.float64)
    tril = torch.randn(n, k, d, d, generator=g, dtype=torch.float64).tril(-1)
    tril = tril + torch.diag_embed(torch.rand(n, k, d, generator=g, dtype=torch.float64) + 0.3)
    got = multivariate_normal_mixture_log_prob(x, logits, loc, tril).numpy()
    log_w = scipy.special.log_softmax(logits.numpy(), axis=-1)
    comp = np.array(
        [
            [
                scipy.stats.multivariate_normal.logpdf(x[i], loc[i, j], tril[i, j] @ tril[i, j].T)
                for j in range(k)
            ]
            for i in range(n)
        ]
    )
    ref = scipy.special.logsumexp(log_w + comp, axis=-1)
    s = np.abs(ref) + np.abs(log_w + comp).max(-1)
    assert_within(got, ref, REF_EPS * _eps(torch.float64) * s, range(n), "mvn mixture")
    log_scale = 0.3 * torch.randn(n, k, d, generator=g, dtype=torch.float64)
    diag = multivariate_normal_mixture_log_prob(x, logits, loc, torch.diag_embed(log_scale.exp()))
    torch.testing.assert_close(
        diag, normal_mixture_log_prob(x, logits, loc, log_scale), rtol=1e-13, atol=0
    )
