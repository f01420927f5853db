"""Fixtures every test module shares."""

import pytest
import torch
from hypothesis import settings

# No per-example deadline (hypothesis's default is 200 ms) for every property test: on a loaded 2-core CI machine
# a first call, or two processes' torch threads contending, can take longer, and the test then fails on timing
# ("Unreliable test timings"), which none of them checks.
settings.register_profile("kuramoto-attn", deadline=None)
settings.load_profile("kuramoto-attn")


@pytest.fixture(autouse=True)
def _keep_subnormal_floats():
    """torch.compile's C++ kernels of torch 2.5 and before were built with -ffast-math: loading them sets
    flush-to-zero for the whole process, and hypothesis then refuses every floats() strategy in the tests
    that run later ("we can't represent subnormal floats right now"). Each test starts with them back."""
    torch.set_flush_denormal(False)
    yield
