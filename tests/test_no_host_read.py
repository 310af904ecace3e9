"""Off the CPU, no public function or distribution method reads a tensor on the host.

A host read (``.item()``, ``bool(t)``, ``if t.any()``, a value check) makes a GPU wait and
breaks ``torch.compile(fullgraph=True)``; probloss allows one only on CPU tensors (a fast-path
check, default validation). Meta tensors carry shapes and no values, so any host read on
them raises: running every fuzz record (``tests/fuzz/records.py``, one per public function
and distribution method) on meta tensors, forward and backward, checks the non-CPU path on
a machine without a GPU. ``tests/test_device.py`` checks the same paths' values on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.fuzz.records import RECORDS

ROWS = 4


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_runs_on_meta_tensors(record):
    tensors = [
        torch.zeros((ROWS, *arg.shape), device="meta").requires_grad_(arg.grad)
        for arg in record.args
    ]
    out = record.fn(*tensors)
    assert out.device.type == "meta" and out.shape[0] == ROWS
    leaves = [t for t in tensors if t.requires_grad]
    if out.requires_grad:
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        for leaf, grad in zip(leaves, grads, strict=True):
            assert grad is None or grad.shape == leaf.shape
