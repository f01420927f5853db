"""Fixtures every test module shares."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _keep_subnormal_floats():
    """torch.compile's C++ kernels of torch 2.5 and before were built with -ffast-math: loading them sets
    flush-to-zero for the whole process, and hypothesis then refuses every floats() strategy in the tests
    that run later ("we can't represent subnormal floats right now"). Each test starts with them back."""
    torch.set_flush_denormal(False)
    yield
