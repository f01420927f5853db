"""Fixtures every test module shares."""

import signal

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


@pytest.fixture
def usual_signal_handlers():
    """SIGINT raises KeyboardInterrupt and SIGTERM, SIGHUP have their default action in this process (and
    its children), as in a terminal: a shell's background job (`pytest &`, a CI script's `... &`) starts
    with SIGINT ignored, `nohup` with SIGHUP ignored, and recipes.train and recipes.sweep keep an ignored
    signal ignored, as they should, so a test's signal would do nothing."""
    usual = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    if hasattr(signal, "SIGHUP"):
        usual[signal.SIGHUP] = signal.SIG_DFL
    started = {signum: signal.signal(signum, handler) for signum, handler in usual.items()}
    yield
    for signum, handler in started.items():
        if handler is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signum, handler)
