"""Hypothesis strategies and phase generators shared by the tests."""

import math

import torch
from hypothesis import strategies as st

# a seeded torch.Generator per example: hypothesis controls (and shrinks) the seed
generators = st.integers(min_value=0, max_value=2**31 - 1).map(lambda seed: torch.Generator().manual_seed(seed))


def clustered_phases(gen, shape, spread, dtype=torch.float64):
    """Rows with a random centre and Gaussian spread: R from 1 (spread 0) down to ~1/sqrt(n)."""
    centre = torch.rand(shape[:-1] + (1,), generator=gen, dtype=torch.float64) * 2 * math.pi
    theta = centre + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    return theta.to(dtype)
