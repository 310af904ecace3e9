"""Doctests in probloss/ run with torch imported, a fixed seed and short tensor printing."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    torch.manual_seed(0)
    torch.set_printoptions(precision=4, sci_mode=None)
    doctest_namespace["torch"] = torch
