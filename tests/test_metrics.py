"""``OrderParameter`` (torchmetrics): accumulation against the functional and a naive float64
reference, masking, bounds, the no-angle-averaging rule, reset, distributed reduction, checks."""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kuramoto_attn
from helpers import clustered_phases, generators
from kuramoto_attn import OrderParameter, order_parameter

# ---------- naive references (float64, complex arithmetic) ----------


def naive_R(theta, dim=-1):
    """R = |mean_j exp(i theta_j)| over ``dim``, in complex128."""
    return torch.exp(1j * theta.to(torch.float64)).mean(dim).abs()


def naive_stats(values):
    """mean, population std, min, max of a 1-D float64 tensor (NaN for an empty one)."""
    values = values.to(torch.float64)
    if values.numel() == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {"mean": nan, "std": nan, "min": nan, "max": nan}
    mean = values.sum() / values.numel()
    std = (((values - mean) ** 2).sum() / values.numel()).sqrt()
    return {"mean": mean, "std": std, "min": values.min(), "max": values.max()}


def per_group_stats(R, group_dim):
    """Stack naive_stats over the entries of ``group_dim`` of an R tensor."""
    groups = [naive_stats(R.select(group_dim, g).reshape(-1)) for g in range(R.shape[group_dim])]
    return {key: torch.stack([s[key] for s in groups]) for key in ("mean", "std", "min", "max")}


def assert_stats_close(got, expected, atol=1e-9):
    """Values only: the (num_groups,) vs () shape for one group is checked separately (see
    test_one_group_gives_scalars_as_torchmetrics_does)."""
    assert set(got) == {"mean", "std", "min", "max"}
    got = {key: value.reshape(expected[key].shape) for key, value in got.items()}
    for key in ("mean", "min", "max"):
        torch.testing.assert_close(got[key], expected[key].to(got[key].dtype), atol=atol, rtol=0,
                                   equal_nan=True, msg=key)
    # population std from sums of squares loses ~sqrt(eps) when all values are (nearly) equal
    torch.testing.assert_close(got["std"], expected["std"].to(got["std"].dtype), atol=max(atol, 1e-6),
                               rtol=0, equal_nan=True, msg="std")


# spread of the phases: 0 (all equal, R = 1), concentrated (R near 1), broad (R small)
spreads = st.sampled_from([0.0, 0.05, 0.5, 2.0, 10.0])



# ---------- accumulation over batches equals the functional ----------


@settings(max_examples=40)
@given(gen=generators, batch_sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
       h=st.integers(1, 4), t=st.integers(1, 4), n=st.integers(1, 8), spread=spreads,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_batched_accumulation_equals_functional(gen, batch_sizes, h, t, n, spread, dtype):
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=h)
    batches = [clustered_phases(gen, (b, h, t, n), spread, dtype) for b in batch_sizes]
    for theta in batches:
        metric.update(theta)
    got = metric.compute()
    if h > 1:
        assert all(value.shape == (h,) for value in got.values())

    everything = torch.cat(batches)                           # (sum b, h, t, n)
    R, _ = order_parameter(everything, dim=-1)                # (sum b, h, t)
    # float32 reductions over differently shaped batches may differ in the last bit
    exact = 1e-6 if dtype == torch.float32 else 1e-9
    assert_stats_close(got, per_group_stats(R.to(torch.float64), group_dim=1), atol=exact)
    # and the functional itself agrees with the naive complex reference
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    assert_stats_close(got, per_group_stats(naive_R(everything), group_dim=1), atol=tol)


@settings(max_examples=30)
@given(gen=generators, batch_sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       h=st.integers(1, 3), n=st.integers(1, 6), spread=spreads)
def test_oscillators_and_groups_on_other_axes(gen, batch_sizes, h, n, spread):
    """Phases (b, n, h): oscillators at dim=1, groups at group_dim=-1."""
    metric = OrderParameter(dim=1, group_dim=-1, num_groups=h)
    batches = [clustered_phases(gen, (b, h, n), spread).transpose(1, 2) for b in batch_sizes]
    for theta in batches:
        metric.update(theta)
    R = naive_R(torch.cat(batches), dim=1)                    # (sum b, h)
    assert_stats_close(metric.compute(), per_group_stats(R, group_dim=1))


@settings(max_examples=30)
@given(gen=generators, batch_sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       h=st.integers(1, 3), t=st.integers(1, 3), n=st.integers(1, 6), spread=spreads)
def test_no_grouping_gives_matching_scalars(gen, batch_sizes, h, t, n, spread):
    metric = OrderParameter(dim=-1)
    batches = [clustered_phases(gen, (b, h, t, n), spread) for b in batch_sizes]
    for theta in batches:
        metric.update(theta)
    got = metric.compute()
    assert all(value.shape == () for value in got.values())
    assert_stats_close(got, naive_stats(naive_R(torch.cat(batches)).reshape(-1)))


@settings(max_examples=40)
@given(gen=generators, batch_sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       h=st.integers(1, 3), t=st.integers(1, 4), n=st.integers(1, 6), spread=spreads,
       mask_kind=st.sampled_from(["full", "per_batch_token", "per_token", "per_head"]),
       grouped=st.booleans())
def test_mask_excludes_masked_values(gen, batch_sizes, h, t, n, spread, mask_kind, grouped):
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=h) if grouped else OrderParameter(dim=-1)
    Rs, keeps = [], []
    for b in batch_sizes:
        theta = clustered_phases(gen, (b, h, t, n), spread)
        mask_shape = {"full": (b, h, t, 1), "per_batch_token": (b, 1, t, 1),
                      "per_token": (t, 1), "per_head": (h, 1, 1)}[mask_kind]
        mask = torch.rand(mask_shape, generator=gen) < 0.6
        metric.update(theta, mask=mask)
        Rs.append(naive_R(theta))                             # (b, h, t)
        keeps.append(mask.expand(b, h, t, 1).squeeze(-1))
    R, keep = torch.cat(Rs), torch.cat(keeps)
    got = metric.compute()
    if grouped:
        expected = [naive_stats(R[:, g][keep[:, g]]) for g in range(h)]
        expected = {key: torch.stack([e[key] for e in expected]) for key in got}
    else:
        expected = naive_stats(R[keep])                       # manual selection
    assert_stats_close(got, expected)


def test_mask_changes_the_result():
    """A masked-out outlier must not move the statistics (guards against an ignored mask)."""
    theta = torch.zeros(1, 1, 2, 8)
    theta[0, 0, 1] = torch.arange(8) * 2 * math.pi / 8       # token 1: splay, R = 0
    masked = OrderParameter(dim=-1)
    masked.update(theta, mask=torch.tensor([True, False]).reshape(2, 1))
    stats = masked.compute()
    assert stats["mean"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["min"].item() == pytest.approx(1.0, abs=1e-6)
    unmasked = OrderParameter(dim=-1)
    unmasked.update(theta)
    assert unmasked.compute()["mean"].item() == pytest.approx(0.5, abs=1e-6)


# ---------- bounds, identical phases, invariances ----------


@settings(max_examples=30)
@given(gen=generators, h=st.integers(1, 3), n=st.integers(1, 8), spread=spreads,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_values_within_unit_interval(gen, h, n, spread, dtype):
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=h)
    metric.update(clustered_phases(gen, (3, h, 4, n), spread, dtype))
    stats = metric.compute()
    for key in ("mean", "min", "max"):
        assert ((stats[key] >= 0) & (stats[key] <= 1)).all(), key
    assert (stats["std"] >= 0).all() and (stats["std"] <= 0.5).all()
    assert (stats["min"] <= stats["mean"] + 1e-12).all() and (stats["mean"] <= stats["max"] + 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_phases_give_mean_one_std_zero(dtype):
    gen = torch.Generator().manual_seed(0)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    for _ in range(3):
        # every oscillator of a population shares one (arbitrary, per-population) phase
        common = (torch.rand(2, 3, 5, 1, generator=gen, dtype=dtype) - 0.5) * 20
        metric.update(common.expand(2, 3, 5, 7))
    stats = metric.compute()
    torch.testing.assert_close(stats["mean"], torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats["std"], torch.zeros(3, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats["min"], torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


@settings(max_examples=25)
@given(gen=generators, n=st.integers(2, 8), spread=spreads, shift=st.floats(-20, 20),
       turns=st.integers(-3, 3))
def test_invariant_to_global_rotation_and_full_turns(gen, n, spread, shift, turns):
    theta = clustered_phases(gen, (2, 2, 3, n), spread)
    base, moved = (OrderParameter(dim=-1, group_dim=1, num_groups=2) for _ in range(2))
    base.update(theta)
    # shift every phase by the same angle; add whole turns to some oscillators
    whole = 2 * math.pi * turns * (torch.rand(theta.shape, generator=gen) < 0.5).to(torch.float64)
    moved.update(theta + shift + whole)
    assert_stats_close(moved.compute(), base.compute(), atol=1e-9)


# ---------- never average angles across heads ----------


def test_never_averages_angles_across_heads():
    """Independent uniform phases: per-population R is small (E R ≈ sqrt(pi / (4 n))).

    The artifact this guards against: averaging the *angles* over heads first (each oscillator's
    angle becomes an arithmetic mean of many independent uniform angles, which concentrates around
    pi) and then taking R gives R ≈ 0.88 or more — the populations look synchronised when they are
    not.
    """
    gen = torch.Generator().manual_seed(1234)
    b, h, t, n = 4, 64, 8, 32
    theta = torch.rand(b, h, t, n, generator=gen, dtype=torch.float64) * 2 * math.pi

    metric = OrderParameter(dim=-1, group_dim=1, num_groups=h)
    metric.update(theta)
    per_head = metric.compute()["mean"]
    assert (per_head < 0.5).all()
    assert per_head.mean().item() == pytest.approx(math.sqrt(math.pi / (4 * n)), abs=0.02)

    pooled = OrderParameter(dim=-1)
    pooled.update(theta)
    assert pooled.compute()["mean"].item() < 0.5

    # the wrong way, for documentation: average angles over heads, then take R
    artifact = naive_R(theta.mean(dim=1)).mean().item()       # (b, t, n) -> R over n
    assert artifact > 0.8
    assert abs(artifact - per_head.mean().item()) > 0.5


# ---------- reset, empty groups, forward ----------


def test_reset_restores_initial_state():
    gen = torch.Generator().manual_seed(3)
    fresh = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    first = clustered_phases(gen, (3, 2, 4, 5), 0.5)
    metric.update(first)
    assert metric.count.sum().item() > 0
    metric.reset()
    for name in ("total", "total_sq", "count", "low", "high"):
        torch.testing.assert_close(getattr(metric, name), getattr(fresh, name), rtol=0, atol=0,
                                   msg=name)
    assert torch.isinf(metric.low).all() and (metric.low > 0).all()
    assert torch.isinf(metric.high).all() and (metric.high < 0).all()
    # after reset, only new data counts
    second = clustered_phases(gen, (2, 2, 4, 5), 2.0)
    metric.update(second)
    assert_stats_close(metric.compute(), per_group_stats(naive_R(second), group_dim=1))


@pytest.mark.parametrize("nested", [False, True])
def test_a_metric_built_on_meta_starts_reset_after_to_empty(monkeypatch, nested):
    """``to_empty`` on the metric raised a TypeError (torchmetrics' ``_apply`` takes no ``recurse``); inside a
    module it gave the states (and the defaults ``reset`` copies) uninitialised memory: made NaN here."""
    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: real_empty_like(t, **kw).fill_(float("nan")))
    with torch.device("meta"):
        metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
        holder = torch.nn.Sequential(torch.nn.Linear(2, 2), metric)
    (holder if nested else metric).to_empty(device="cpu")
    fresh = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    for name in ("total", "total_sq", "count", "low", "high"):
        assert getattr(metric, name).device.type == "cpu", name
        torch.testing.assert_close(getattr(metric, name), getattr(fresh, name), rtol=0, atol=0, msg=name)
    theta = clustered_phases(torch.Generator().manual_seed(5), (3, 2, 4, 5), 0.5)
    for _ in range(2):  # and reset gives a fresh metric again
        metric.update(theta)
        assert_stats_close(metric.compute(), per_group_stats(naive_R(theta), group_dim=1))
        metric.reset()


def test_empty_group_is_nan():
    theta = torch.zeros(2, 3, 4, 5)
    mask = torch.ones(1, 3, 1, 1, dtype=torch.bool)
    mask[0, 1] = False                                        # head 1 never counted
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    metric.update(theta, mask=mask)
    stats = metric.compute()
    for key, value in stats.items():
        assert torch.isnan(value[1]), key
        assert not torch.isnan(value[[0, 2]]).any(), key
    assert metric.count.tolist() == [8.0, 0.0, 8.0]


def test_an_empty_batch_adds_nothing():
    theta = torch.rand(3, 2, 5, 8) * 6.0
    one = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    one.update(theta)
    both = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    both.update(theta[:0])                                    # no batch elements
    both.update(theta)
    both.update(theta[:, :, :0])                              # no tokens
    for key, value in one.compute().items():
        torch.testing.assert_close(both.compute()[key], value)


def test_states_keep_the_dtype_set_for_them():
    """set_dtype(float32): every state stays float32 when float64 phases arrive (min and max became float64)."""
    metric = OrderParameter(group_dim=0, num_groups=2)
    metric.set_dtype(torch.float32)
    metric.update(torch.rand(2, 3, 4, dtype=torch.float64))
    assert {name: getattr(metric, name).dtype for name in metric._defaults} == dict.fromkeys(
        ("total", "total_sq", "count", "low", "high"), torch.float32)


def test_a_modules_to_dtype_keeps_the_float64_states():
    """``.to(torch.bfloat16)`` (e.g. of a model holding the metric) made the sums bfloat16: counts stopped at 256
    and R's mean rounded. The states keep float64 and their digits; set_dtype still converts them."""
    metric = OrderParameter(dim=-1)
    theta = torch.rand(300, 8, dtype=torch.float64)
    metric.update(theta[:100])
    before = {name: getattr(metric, name).clone() for name in metric._defaults}
    holder = torch.nn.Module()
    holder.metric = metric
    dtype = metric.dtype
    holder.to(torch.bfloat16)
    assert metric.dtype == dtype
    for name, value in before.items():
        assert getattr(metric, name).dtype == torch.float64 and torch.equal(getattr(metric, name), value), name
    metric.update(theta[100:])
    assert metric.count.item() == 300
    expected = order_parameter(theta, dim=-1)[0]
    torch.testing.assert_close(metric.compute()["mean"], expected.mean(), rtol=0, atol=1e-12)
    metric.set_dtype(torch.float32)
    assert all(getattr(metric, name).dtype == torch.float32 for name in metric._defaults)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@given(spread=st.floats(1e-3, 0.1), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=20, deadline=None)
def test_half_precision_phases_near_synchrony_keep_the_spread_of_R(dtype, spread, seed):
    """R was computed in the phases' dtype before the float64 sums: bf16 rounded every R near 1 to exactly 1
    (mean 1, std 0, min = max = 1 for phases 0.03 apart). The statistics are now those of R computed from the
    same (half-precision) phases in float64, to float32's rounding."""
    theta = (spread * torch.randn(8, 2, 16, 32, generator=torch.Generator().manual_seed(seed))).to(dtype)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    metric.update(theta)
    expected = per_group_stats(naive_R(theta, dim=-1), group_dim=1)
    got = metric.compute()
    for key in ("mean", "min", "max"):
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    # std of values near 1 from E[R²] − mean²: float32 R leaves ~1e-7 per value, so compare loosely but
    # far tighter than bf16's spacing of 0.004 near 1, which left std 0
    torch.testing.assert_close(got["std"], expected["std"], rtol=0.05, atol=2e-6)


def test_persistent_states_load_only_into_a_metric_of_their_shape():
    """torchmetrics loads any tensor as a state: 3 groups' states went into a metric without groups (compute
    then gave shape (3,), later updates broadcast onto all three), one group's into a 3-group metric (the
    next update failed with a bare broadcast error). Loading is now checked, copies onto the metric's
    device and into its dtype, and drops a cached result."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.rand(4, 3, 5, 8, dtype=torch.float64, generator=generator) * 6
    source = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    source.persistent(True)
    source.update(theta)
    saved = source.state_dict()
    for target in (OrderParameter(dim=-1), OrderParameter(dim=-1, group_dim=1, num_groups=2)):
        target.persistent(True)
        target.update(torch.rand(2, 2, 5, 8, generator=generator))
        before = {name: getattr(target, name).clone() for name in target._defaults}
        with pytest.raises(RuntimeError, match=r"total: expected a tensor of shape \(\d,\) \(one value per group\) "
                                               r"but got shape \(3,\)"):
            target.load_state_dict(saved)
        for name, value in before.items():  # nothing loaded
            assert torch.equal(getattr(target, name), value), name

    target = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    target.persistent(True)
    target.set_dtype(torch.float32)
    target.update(torch.rand(2, 3, 5, 8, generator=generator))
    target.compute()  # cached: the load must drop it
    target.load_state_dict(saved)
    for name in target._defaults:  # in its own dtype
        assert torch.equal(getattr(target, name), getattr(source, name).float()), name
    torch.testing.assert_close(target.compute()["mean"], source.compute()["mean"].float())  # not the cached one
    target.update(theta)  # into copies: the given tensors are left alone
    assert all(torch.equal(saved[name], getattr(source, name)) for name in source._defaults)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: a persistent state left out is missing
        target.load_state_dict({})
    target.load_state_dict({}, strict=False)


def test_no_oscillators_rejected():
    metric = OrderParameter(dim=-1)
    for theta in (torch.empty(3, 0), torch.empty(0, 0)):  # R over zero oscillators is undefined
        with pytest.raises(ValueError, match="^theta: expected at least one oscillator"):
            metric.update(theta)
    assert metric.count.item() == 0


def test_compute_before_any_update_is_nan():
    for metric in (OrderParameter(dim=-1), OrderParameter(dim=-1, group_dim=0, num_groups=2)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                   # torchmetrics warns: compute before update
            stats = metric.compute()
        for key, value in stats.items():
            assert torch.isnan(value).all(), key


def test_forward_returns_batch_stats_and_accumulates():
    gen = torch.Generator().manual_seed(5)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    batches = [clustered_phases(gen, (2, 2, 3, 6), spread) for spread in (0.1, 1.0, 5.0)]
    for theta in batches:
        batch_stats = metric(theta)
        assert_stats_close(batch_stats, per_group_stats(naive_R(theta), group_dim=1))
    assert_stats_close(metric.compute(), per_group_stats(naive_R(torch.cat(batches)), group_dim=1))


@pytest.mark.parametrize("dist_sync_on_step", [False, True])
@pytest.mark.parametrize("bad_call", [
    lambda metric: metric(torch.zeros(2, 3, 3, 6)),                                # 3 groups, not 2
    lambda metric: metric(torch.zeros(2, 2, 3, 6), mask=torch.ones(2, 1, 3, 1)),   # not boolean
    lambda metric: metric(torch.zeros(2, 2, 3, 6, dtype=torch.int64)),
    lambda metric: metric(torch.zeros(2, 2, 3, 6, device="meta")),                 # not the metric's device
])
def test_forward_of_refused_input_keeps_what_was_accumulated(bad_call, dist_sync_on_step):
    """torchmetrics' forward resets the states before its update: a refused batch wiped them (and
    left the metric set not to sync on compute)."""
    gen = torch.Generator().manual_seed(6)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=2, dist_sync_on_step=dist_sync_on_step)
    batches = [clustered_phases(gen, (2, 2, 3, 6), spread) for spread in (0.1, 3.0)]
    metric(batches[0])
    before = {name: getattr(metric, name).clone() for name in metric._defaults}
    to_sync = metric._to_sync
    with pytest.raises(ValueError):
        bad_call(metric)
    for name, value in before.items():
        assert torch.equal(getattr(metric, name), value), name
    assert metric._to_sync == to_sync and metric._update_count == 1
    metric(batches[1])
    assert_stats_close(metric.compute(), per_group_stats(naive_R(torch.cat(batches)), group_dim=1))


@pytest.mark.parametrize("num_groups", [2, 3])
def test_grouped_results_have_group_axis(num_groups):
    metric = OrderParameter(dim=-1, group_dim=0, num_groups=num_groups)
    metric.update(torch.zeros(num_groups, 3, 4))
    assert all(value.shape == (num_groups,) for value in metric.compute().values())
    assert all(value.shape == (num_groups,) for value in metric(torch.zeros(num_groups, 3, 4)).values())


def test_one_group_gives_scalars_as_torchmetrics_does():
    """torchmetrics squeezes one-element results in compute/forward (documented in the class)."""
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=1)
    metric.update(torch.zeros(2, 1, 3, 4))
    assert all(value.shape == () for value in metric.compute().values())
    assert metric.compute()["mean"].item() == 1.0


def test_does_not_track_gradients():
    theta = torch.rand(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
    metric.update(theta)
    assert all(not value.requires_grad for value in metric.compute().values())


# ---------- distributed reduction ----------


def _split_data(seed, h=3):
    gen = torch.Generator().manual_seed(seed)
    # rank 0 sees concentrated phases, rank 1 broad ones, so min/max come from different ranks
    rank0 = [clustered_phases(gen, (2, h, 3, 6), 0.2) for _ in range(2)]
    rank1 = [clustered_phases(gen, (3, h, 3, 6), 3.0) for _ in range(3)]
    return rank0, rank1


def _metric_on(batches, h=3):
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=h)
    for theta in batches:
        metric.update(theta)
    return metric


def test_merge_state_equals_one_metric_on_all_data():
    rank0, rank1 = _split_data(7)
    merged = _metric_on(rank0)
    merged.merge_state(_metric_on(rank1))
    single = _metric_on(rank0 + rank1)
    assert_stats_close(merged.compute(), single.compute(), atol=1e-12)
    assert_stats_close(merged.compute(), per_group_stats(naive_R(torch.cat(rank0 + rank1)), 1))


def test_compute_after_merge_state_includes_the_merged_data():
    """A compute() before the merge cached its result: the merge must not leave it in place."""
    rank0, rank1 = _split_data(7)
    merged = _metric_on(rank0)
    merged.compute()
    merged.merge_state(_metric_on(rank1))
    assert_stats_close(merged.compute(), per_group_stats(naive_R(torch.cat(rank0 + rank1)), 1))
    as_dict = _metric_on(rank0)
    as_dict.compute()
    other = _metric_on(rank1)
    as_dict.merge_state({name: getattr(other, name) for name in other._reductions})
    assert_stats_close(as_dict.compute(), per_group_stats(naive_R(torch.cat(rank0 + rank1)), 1))


def test_merge_state_of_another_number_of_groups_is_rejected():
    """Its states would broadcast: a pooled metric's totals added to every group, or a grouped
    metric's turning a pooled one's state into per-group values."""
    grouped, pooled = _metric_on(_split_data(7)[0]), OrderParameter(dim=-1)
    pooled.update(torch.zeros(2, 3, 4))
    before = {name: getattr(grouped, name).clone() for name in grouped._reductions}
    with pytest.raises(ValueError, match="^incoming_state: expected total of shape"):
        grouped.merge_state(pooled)
    with pytest.raises(ValueError, match="^incoming_state: expected total of shape"):
        pooled.merge_state(grouped)
    with pytest.raises(ValueError, match="^incoming_state: expected total of shape"):
        grouped.merge_state({name: getattr(pooled, name) for name in pooled._reductions})
    for name, value in before.items():  # nothing merged
        assert torch.equal(getattr(grouped, name), value), name
    assert pooled.count.shape == (1,)


@pytest.mark.parametrize("spoil", ["missing", "list", "device"])
def test_a_refused_merge_state_merges_nothing(spoil):
    """torchmetrics merges state by state: a dict lacking ``high`` (or holding it as a list, or on
    another device) left total, total_sq, count and low merged and high not."""
    rank0, rank1 = _split_data(7)
    metric, other = _metric_on(rank0), _metric_on(rank1)
    states = {name: getattr(other, name) for name in other._reductions}
    if spoil == "missing":
        del states["high"]
    elif spoil == "list":
        states["high"] = states["high"].tolist()
    else:
        states["high"] = states["high"].to("meta")
    before = {name: getattr(metric, name).clone() for name in metric._reductions}
    with pytest.raises(ValueError, match="^incoming_state: .*high"):
        metric.merge_state(states)
    for name, value in before.items():
        assert torch.equal(getattr(metric, name), value), name
    assert_stats_close(metric.compute(), per_group_stats(naive_R(torch.cat(rank0)), 1))


def test_state_reductions_equal_one_metric_on_all_data():
    """Reduce gathered states with each state's own ``dist_reduce_fx``, as a real sync does."""
    rank0, rank1 = _split_data(8)
    metric, other = _metric_on(rank0), _metric_on(rank1)
    assert set(metric._reductions) == {"total", "total_sq", "count", "low", "high"}
    # the path torchmetrics takes on sync: all_gather each state, stack, reduce
    states = {name: getattr(other, name) for name in metric._reductions}

    def fake_gather(tensor, group=None):
        (name,) = [key for key in metric._reductions if getattr(metric, key) is tensor]
        return [tensor, states[name]]

    metric._sync_dist(fake_gather)
    single = _metric_on(rank0 + rank1)
    for name in metric._reductions:
        torch.testing.assert_close(getattr(metric, name), getattr(single, name), rtol=1e-12, atol=1e-12,
                                   msg=name)
    assert_stats_close(metric.compute(), single.compute(), atol=1e-12)


# a lean worker (imports only torch and the library, so each process starts in a few seconds)
_GLOO_WORKER = """
import sys, torch, torch.distributed as dist
from kuramoto_attn import OrderParameter
rank, store, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
try:
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    for theta in torch.load(data):
        metric.update(theta)
    torch.save(metric.compute(), out)                 # compute() syncs across both processes
    # torch 2.4's gloo could hang in destroy_process_group when the other rank had already left
    # (3 of 40 pairs; none of 80 with the barrier)
    dist.barrier()
finally:
    dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_two_process_gloo_sync_equals_one_metric_on_all_data(tmp_path):
    rank_data = _split_data(9)
    # a file store, not a TCP port: no port race with other tests running in parallel (xdist)
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(kuramoto_attn.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    procs = []
    for rank, batches in enumerate(rank_data):
        torch.save(batches, tmp_path / f"data{rank}.pt")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _GLOO_WORKER, str(rank), str(store), str(tmp_path / f"data{rank}.pt"),
             str(tmp_path / f"out{rank}.pt")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("gloo workers timed out")
        assert proc.returncode == 0, output.decode(errors="replace")
    expected = _metric_on(rank_data[0] + rank_data[1]).compute()
    local = _metric_on(rank_data[0]).compute()
    for rank in range(2):
        stats = torch.load(tmp_path / f"out{rank}.pt")
        assert_stats_close(stats, expected, atol=1e-12)
    # the synced result really differs from what rank 0 alone would report
    assert not torch.allclose(local["mean"], expected["mean"])


# ---------- argument checks ----------


def test_group_dim_requires_num_groups():
    with pytest.raises(ValueError, match="num_groups"):
        OrderParameter(dim=-1, group_dim=1)


@pytest.mark.parametrize("num_groups", [0, -2, 2.0, True])
def test_bad_num_groups(num_groups):
    with pytest.raises(ValueError, match="num_groups"):
        OrderParameter(dim=-1, group_dim=1, num_groups=num_groups)


def test_num_groups_without_group_dim():
    with pytest.raises(ValueError, match="num_groups"):
        OrderParameter(dim=-1, num_groups=2)


@pytest.mark.parametrize("dim", [1.0, None, True])
def test_bad_dim_type(dim):
    with pytest.raises(ValueError, match="^dim: expected an integer"):
        OrderParameter(dim=dim)


def test_bad_group_dim_type():
    with pytest.raises(ValueError, match="group_dim"):
        OrderParameter(dim=-1, group_dim=1.0, num_groups=2)


@pytest.mark.parametrize("dim,group_dim", [(-1, 3), (3, -1), (-1, -1), (1, 1)])
def test_group_dim_equal_to_dim(dim, group_dim):
    if dim == group_dim:  # caught at construction; as another sign, once theta's rank is known
        with pytest.raises(ValueError, match="group_dim: expected an axis other than dim"):
            OrderParameter(dim=dim, group_dim=group_dim, num_groups=4)
        return
    metric = OrderParameter(dim=dim, group_dim=group_dim, num_groups=4)
    # its own error: "theta: expected 4 groups along group_dim=..." would also mention group_dim
    with pytest.raises(ValueError, match="^group_dim: must differ from dim"):
        metric.update(torch.zeros(4, 4, 4, 4))


def test_numpy_integers_are_accepted_as_axes_and_counts():
    metric = OrderParameter(dim=np.int64(-1), group_dim=np.int32(1), num_groups=np.int64(2))
    assert (metric.dim, metric.group_dim, metric.num_groups) == (-1, 1, 2)
    assert all(type(v) is int for v in (metric.dim, metric.group_dim, metric.num_groups))
    metric.update(torch.zeros(3, 2, 5))
    torch.testing.assert_close(metric.compute()["mean"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("dim,group_dim,name", [(4, 1, "dim"), (-5, 1, "dim"), (-1, 4, "group_dim"),
                                                (-1, -5, "group_dim")])
def test_axis_out_of_range(dim, group_dim, name):
    metric = OrderParameter(dim=dim, group_dim=group_dim, num_groups=2)
    with pytest.raises(ValueError, match=f"^{name}:"):
        metric.update(torch.zeros(2, 2, 3, 5))


def test_wrong_number_of_groups_at_update():
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    with pytest.raises(ValueError, match=r"theta: expected 3 groups"):
        metric.update(torch.zeros(2, 4, 3, 5))
    assert metric.count.sum().item() == 0                   # nothing was accumulated


@pytest.mark.parametrize("mask", [
    torch.ones(2, 3, 4, 1),                                  # not boolean
    torch.ones(2, 3, 4, 1, dtype=torch.int64),               # not boolean
    torch.ones(2, 3, 4, dtype=torch.bool),                   # oscillator axis dropped
    torch.ones(2, 3, 4, 5, dtype=torch.bool),                # full theta shape (dim not length 1)
    torch.ones(3, 3, 4, 1, dtype=torch.bool),                # wrong batch size
    torch.ones(1, 2, 3, 4, 1, dtype=torch.bool),             # more dims than theta
    [[True]],                                                # not a tensor
])
def test_bad_mask(mask):
    metric = OrderParameter(dim=-1, group_dim=1, num_groups=3)
    with pytest.raises(ValueError, match="^mask:"):
        metric.update(torch.zeros(2, 3, 4, 5), mask=mask)


@pytest.mark.parametrize("theta", [[0.0, 1.0], torch.zeros(2, 3, dtype=torch.int64)])
def test_bad_theta(theta):
    with pytest.raises(ValueError, match="^theta:"):
        OrderParameter(dim=-1).update(theta)


def test_phases_on_another_device_than_the_metric_are_named():
    """A metric left on the CPU while the phases are elsewhere (a GPU; meta here) got torch's bare device
    error from the sums; the other device is named as merge_state names it."""
    with pytest.raises(ValueError, match="^theta: expected a tensor on the metric's device cpu but got meta"):
        OrderParameter(dim=-1).update(torch.zeros(2, 3, device="meta"))


def test_std_of_identical_values_is_zero():
    # E[R²] − mean² left 1.5e-8 for seven batches of one value (min == max)
    metric = OrderParameter()
    theta = torch.tensor([0.0, 1.5904], dtype=torch.float64).expand(1000, 2)
    for _ in range(7):
        metric.update(theta)
    stats = metric.compute()
    assert float(stats["min"]) == float(stats["max"]) and float(stats["std"]) == 0.0


def test_a_non_finite_phase_makes_its_group_nan_until_reset():
    # as the docstring says: a diverged batch shows in its group's statistics (not skipped), the others keep theirs
    metric = OrderParameter(dim=-1, group_dim=0, num_groups=2)
    for bad in (float("nan"), float("inf")):
        theta = torch.zeros(2, 3, 4)
        theta[0, 1, 2] = bad
        metric.update(theta)
        metric.update(torch.zeros(2, 3, 4))  # a clean batch after it does not clear it
        stats = metric.compute()
        assert all(torch.isnan(value[0]) for value in stats.values())
        assert [float(stats[key][1]) for key in ("mean", "std", "min", "max")] == [1.0, 0.0, 1.0, 1.0]
        metric.reset()
        metric.update(torch.zeros(2, 3, 4))
        assert metric.compute()["mean"].tolist() == [1.0, 1.0]
        metric.reset()


def test_the_layers_import_without_torchmetrics_and_the_metric_comes_on_first_use():
    # torchmetrics (and matplotlib with it, where installed) took about a second of every `import kuramoto_attn`
    code = ("import sys, kuramoto_attn\n"
            "assert 'torchmetrics' not in sys.modules, 'torchmetrics imported'\n"
            "from kuramoto_attn import OrderParameter\n"
            "assert OrderParameter is sys.modules['kuramoto_attn.metrics'].OrderParameter\n"
            "assert 'OrderParameter' in dir(kuramoto_attn) and 'torchmetrics' in sys.modules\n"
            "try:\n    kuramoto_attn.NoSuchThing\nexcept AttributeError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "module 'kuramoto_attn' has no attribute 'NoSuchThing'"


def test_repr_shows_the_axes():
    assert repr(OrderParameter()) == "OrderParameter(dim=-1)"
    assert repr(OrderParameter(dim=-2, group_dim=1, num_groups=4)) == "OrderParameter(dim=-2, group_dim=1, num_groups=4)"
