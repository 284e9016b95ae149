"""Shared test setup: kernels run through Triton's interpreter on machines without a GPU."""
import os

import pytest

try:
    import torch
    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # front-end tests still run
    torch = None
    HAS_CUDA = False

# Launchers allocate outputs NaN-filled under this flag, so unwritten elements fail tests.
os.environ.setdefault("NSA_DSL_NAN_FILL", "1")

if not HAS_CUDA:
    # Must be set before any generated kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    if torch is not None:
        torch.manual_seed(0)
