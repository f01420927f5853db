"""Anti-synchronisation controls: noise statistics, the coherence penalty against a naive float64
formula, gradients (including at R = 0), and argument checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import clustered_phases, generators, repr_arguments
from kuramoto_attn import CoherenceRegularizer, FrequencyJitter, PhaseNoise, order_parameter

# ---------- naive references (float64) ----------


def naive_R(theta, dim=-1):
    """R = |mean_j exp(i theta_j)| per row, in complex128."""
    return torch.exp(1j * theta.to(torch.float64)).mean(dim).abs()


def naive_penalty(theta, mode, target, weight, band, dim=-1):
    """The documented per-row penalty, averaged over rows, in plain Python float64 arithmetic."""
    values = naive_R(theta, dim).reshape(-1).tolist()
    lo, hi = band
    relu = lambda x: max(x, 0.0)  # noqa: E731
    if mode == "ceiling":
        per_row = [relu(R - target) ** 2 for R in values]
    elif mode == "center":
        per_row = [(R - target) ** 2 for R in values]
    else:
        per_row = [relu(lo - R) ** 2 + relu(R - hi) ** 2 for R in values]
    return weight * sum(per_row) / len(per_row)


def regularizer(mode, target, weight, band, **kwargs):
    """A CoherenceRegularizer given only what its mode reads: the target or the band."""
    read = dict(band=tuple(band)) if mode == "band" else dict(target=target)
    return CoherenceRegularizer(weight=weight, mode=mode, **read, **kwargs)


spreads = st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0])



unit = st.floats(0.0, 1.0, allow_nan=False)

# ---------- PhaseNoise ----------


@pytest.mark.parametrize("sigma", [0.0, 0.03, 1.5])
def test_phase_noise_identity_in_eval(sigma):
    theta = torch.randn(4, 5, dtype=torch.float64)
    noise = PhaseNoise(sigma=sigma).eval()
    torch.manual_seed(0)
    assert torch.equal(noise(theta), theta)


def test_phase_noise_identity_with_zero_sigma_in_training():
    theta = torch.randn(4, 5)
    noise = PhaseNoise(sigma=0.0).train()
    assert torch.equal(noise(theta), theta)
    assert torch.equal(PhaseNoise(sigma=0).train()(theta), theta)        # integer 0 as well
    # and draws nothing: the layers call it after every step, where a draw would move dropout's masks
    before = torch.get_rng_state()
    noise(theta)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("sigma", [0.03, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_phase_noise_statistics_in_training(sigma, dtype):
    torch.manual_seed(1234)
    n = 200_000
    theta = (torch.rand(n, dtype=torch.float64) * 2 * math.pi).to(dtype)
    out = PhaseNoise(sigma=sigma).train()(theta)
    assert out.shape == theta.shape and out.dtype == dtype
    added = (out.to(torch.float64) - theta.to(torch.float64))
    # std of the sample std ≈ sigma / sqrt(2n) ≈ 0.16 % of sigma; mean's ≈ sigma / sqrt(n)
    assert added.std().item() == pytest.approx(sigma, rel=0.01)
    assert abs(added.mean().item()) < 5 * sigma / math.sqrt(n)
    # Gaussian: ~68.3 % within one sigma
    assert (added.abs() < sigma).to(torch.float64).mean().item() == pytest.approx(0.6827, abs=0.01)


def test_phase_noise_is_fresh_per_call_and_seeded():
    theta = torch.zeros(1000)
    noise = PhaseNoise(sigma=0.1).train()
    torch.manual_seed(0)
    first, second = noise(theta), noise(theta)
    assert not torch.allclose(first, second)
    torch.manual_seed(0)
    assert torch.equal(noise(theta), first)


@pytest.mark.parametrize("training", [True, False])
def test_phase_noise_gradient_is_identity(training):
    theta = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    noise = PhaseNoise(sigma=0.3).train(training)
    upstream = torch.randn(3, 7, dtype=torch.float64)
    (noise(theta) * upstream).sum().backward()
    torch.testing.assert_close(theta.grad, upstream, rtol=0, atol=0)


# ---------- FrequencyJitter ----------


@pytest.mark.parametrize("relative", [0.0, 0.02, 0.5])
def test_frequency_jitter_identity_in_eval(relative):
    omega = torch.randn(4, 5, dtype=torch.float64)
    assert torch.equal(FrequencyJitter(relative=relative).eval()(omega), omega)


def test_frequency_jitter_identity_with_zero_relative_in_training():
    omega = torch.randn(4, 5)
    assert torch.equal(FrequencyJitter(relative=0.0).train()(omega), omega)
    before = torch.get_rng_state()  # and draws nothing (a seeded run's later draws stay where they were)
    FrequencyJitter(relative=0.0).train()(omega)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("relative", [0.02, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_frequency_jitter_relative_statistics(relative, dtype):
    torch.manual_seed(4321)
    n = 200_000
    # magnitudes in [0.5, 3), both signs: the jitter must be relative, not absolute
    magnitude = 0.5 + 2.5 * torch.rand(n, dtype=torch.float64)
    sign = torch.where(torch.rand(n) < 0.5, -1.0, 1.0).to(torch.float64)
    omega = (magnitude * sign).to(dtype)
    out = FrequencyJitter(relative=relative).train()(omega)
    assert out.shape == omega.shape and out.dtype == dtype
    deviation = out.to(torch.float64) / omega.to(torch.float64) - 1.0
    assert deviation.std().item() == pytest.approx(relative, rel=0.01)
    assert abs(deviation.mean().item()) < 5 * relative / math.sqrt(n)
    # the absolute change scales with |omega|: small and large frequencies have the same relative std
    small, large = magnitude < 1.0, magnitude > 2.5
    assert deviation[small].std().item() == pytest.approx(relative, rel=0.05)
    assert deviation[large].std().item() == pytest.approx(relative, rel=0.05)
    assert (out - omega)[large].abs().mean() > 2 * (out - omega)[small].abs().mean()


@pytest.mark.parametrize("dtype, relative", [(torch.bfloat16, 0.002), (torch.bfloat16, 0.005), (torch.float16, 0.001)])
def test_frequency_jitter_in_half_precision_is_unbiased(dtype, relative):
    """ω·(1 + ε) rounded once: 1 + ε rounded first (finer below 1 than above) biased the jitter's mean to
    -0.38·relative in bfloat16 (relative = 0.002), -0.07·relative in float16 (0.001): ω shrank."""
    torch.manual_seed(0)
    n = 200_000
    magnitude = 0.5 + 2.5 * torch.rand(n, dtype=torch.float64)
    omega = (magnitude * torch.where(torch.rand(n) < 0.5, -1.0, 1.0).to(torch.float64)).to(dtype)
    out = FrequencyJitter(relative=relative).train()(omega)
    assert out.dtype == dtype
    deviation = out.to(torch.float64) / omega.to(torch.float64) - 1.0
    assert abs(deviation.mean().item()) < 5 * relative / math.sqrt(n)


def test_frequency_jitter_zero_frequency_stays_zero_and_gradient():
    omega = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    out = FrequencyJitter(relative=0.1).train()(omega)
    assert out[0].item() == 0.0
    out.sum().backward()
    # d out / d omega = 1 + eps = out / omega (for nonzero omega)
    torch.testing.assert_close(omega.grad[1:], (out / omega)[1:].detach(), rtol=1e-12, atol=0)


# ---------- CoherenceRegularizer: value against the formula ----------


@settings(max_examples=50)
@given(gen=generators, rows=st.integers(1, 6), n=st.integers(1, 10), spread=spreads,
       mode=st.sampled_from(CoherenceRegularizer.MODES), target=unit,
       weight=st.floats(0.0, 10.0, allow_nan=False), band=st.tuples(unit, unit).map(sorted),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_coherence_penalty_equals_formula(gen, rows, n, spread, mode, target, weight, band, dtype):
    theta = clustered_phases(gen, (rows, n), spread, dtype)
    reg = regularizer(mode, target, weight, band)
    got = reg(theta)
    assert got.shape == ()
    expected = naive_penalty(theta, mode, target, weight, band)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert got.item() == pytest.approx(expected, abs=tol * max(weight, 1.0))


@settings(max_examples=25)
@given(gen=generators, n=st.integers(2, 8), spread=spreads,
       mode=st.sampled_from(CoherenceRegularizer.MODES), target=unit)
def test_coherence_penalty_on_other_axis_and_batch_dims(gen, n, spread, mode, target):
    theta = clustered_phases(gen, (2, 3, n), spread)                    # oscillators last
    last = regularizer(mode, target, 0.7, (0.2, 0.6))
    middle = regularizer(mode, target, 0.7, (0.2, 0.6), dim=1)
    moved = theta.transpose(1, 2)                                    # oscillators at dim 1
    expected = naive_penalty(theta, mode, target, 0.7, (0.2, 0.6))
    assert last(theta).item() == pytest.approx(expected, abs=1e-10)
    assert middle(moved).item() == pytest.approx(expected, abs=1e-10)


def test_coherence_penalty_doc_values():
    theta = torch.zeros(2, 8, dtype=torch.float64)                   # R = 1
    assert CoherenceRegularizer(0.45, 0.1, "ceiling")(theta).item() == pytest.approx(0.1 * 0.55**2)
    assert CoherenceRegularizer(0.45, 0.1, "center")(theta).item() == pytest.approx(0.1 * 0.55**2)
    assert CoherenceRegularizer(weight=2.0, mode="band", band=(0.3, 0.4))(theta).item() \
        == pytest.approx(2.0 * 0.6**2)
    splay = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8   # R = 0
    assert CoherenceRegularizer(0.45, 0.1, "ceiling")(splay).item() == pytest.approx(0.0, abs=1e-20)
    assert CoherenceRegularizer(0.45, 0.1, "center")(splay).item() == pytest.approx(0.1 * 0.45**2)
    assert CoherenceRegularizer(weight=2.0, mode="band", band=(0.3, 0.4))(splay).item() \
        == pytest.approx(2.0 * 0.3**2)


@settings(max_examples=30)
@given(gen=generators, rows=st.integers(1, 6), n=st.integers(1, 10), spread=spreads,
       slack=st.floats(0.0, 0.2), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_ceiling_is_zero_when_all_R_below_target(gen, rows, n, spread, slack, dtype):
    theta = clustered_phases(gen, (rows, n), spread, dtype).requires_grad_(True)
    R, _ = order_parameter(theta.detach())
    target = min(1.0, float(R.max()) + slack)                        # every R <= target
    loss = CoherenceRegularizer(target=target, weight=3.0, mode="ceiling")(theta)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(theta.grad, torch.zeros_like(theta))


@settings(max_examples=30)
@given(gen=generators, rows=st.integers(1, 6), n=st.integers(1, 10), spread=spreads,
       below=st.floats(0.0, 0.2), above=st.floats(0.0, 0.2))
def test_band_is_zero_inside_the_band(gen, rows, n, spread, below, above):
    theta = clustered_phases(gen, (rows, n), spread).requires_grad_(True)
    R, _ = order_parameter(theta.detach())
    lo, hi = max(0.0, float(R.min()) - below), min(1.0, float(R.max()) + above)
    loss = CoherenceRegularizer(weight=5.0, mode="band", band=(lo, hi))(theta)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(theta.grad, torch.zeros_like(theta))


@settings(max_examples=25)
@given(gen=generators, rows=st.integers(1, 4), n=st.integers(2, 8), spread=spreads, target=unit)
def test_center_scales_with_weight_and_is_bounded_below(gen, rows, n, spread, target):
    theta = clustered_phases(gen, (rows, n), spread)
    one = CoherenceRegularizer(target=target, weight=1.0, mode="center")(theta).item()
    three = CoherenceRegularizer(target=target, weight=3.0, mode="center")(theta).item()
    zero = CoherenceRegularizer(target=target, weight=0.0, mode="center")(theta).item()
    assert three == pytest.approx(3 * one, rel=1e-12, abs=1e-300)
    assert zero == 0.0
    R = naive_R(theta)
    # center penalty is at least the squared distance of the mean R to the target (Jensen)
    assert one >= (R.mean().item() - target) ** 2 - 1e-12


# ---------- CoherenceRegularizer: gradients ----------


@pytest.mark.parametrize("n", [2, 3, 4, 7, 16, 64])
@pytest.mark.parametrize("mode", CoherenceRegularizer.MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_finite_at_splay_state(n, mode, dtype):
    theta = (torch.arange(n, dtype=torch.float64) * 2 * math.pi / n).to(dtype).repeat(3, 1)
    theta.requires_grad_(True)
    assert naive_R(theta.detach()).max().item() < 1e-6                # R ≈ 0
    reg = regularizer(mode, 0.45, 1.0, (0.3, 0.6))
    loss = reg(theta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()
    # |dR/dtheta_j| <= 1/n, so the loss gradient is bounded by 2 * weight * max|R - r| / n per row
    assert theta.grad.abs().max().item() <= 2 * 1.0 / n / 3 + 1e-6


@pytest.mark.parametrize("mode", CoherenceRegularizer.MODES)
def test_gradient_finite_at_exactly_zero_R(mode):
    # cos: 1, -1, -1, 1 and sin: 0, s, -s, 0 cancel exactly, so R is exactly 0
    theta = torch.tensor([0.0, math.pi, -math.pi, 0.0], dtype=torch.float64, requires_grad=True)
    R, _ = order_parameter(theta.detach())
    assert R.item() == 0.0
    loss = regularizer(mode, 0.45, 1.0, (0.3, 0.6))(theta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()


@settings(max_examples=25)
@given(gen=generators, rows=st.integers(1, 4), n=st.integers(2, 12),
       spread=st.sampled_from([0.05, 0.2, 0.5]), target=st.floats(0.0, 0.4))
def test_gradient_step_reduces_R_above_ceiling(gen, rows, n, spread, target):
    theta = clustered_phases(gen, (rows, n), spread).requires_grad_(True)
    R_before = naive_R(theta.detach())
    assert (R_before > target + 0.05).all()                          # concentrated: above ceiling
    loss = CoherenceRegularizer(target=target, weight=1.0, mode="ceiling")(theta)
    loss.backward()
    grad = theta.grad
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # analytic gradient: dL/dtheta_j = 2 (R - r) / rows * dR/dtheta_j, dR/dtheta_j = sin(psi - theta_j) / n
    z = torch.exp(1j * theta.detach()).mean(-1, keepdim=True)
    dR = torch.sin(torch.angle(z) - theta.detach()) / n
    expected = 2 * (R_before[:, None] - target) / rows * dR
    torch.testing.assert_close(grad, expected, rtol=1e-7, atol=1e-12)
    with torch.no_grad():
        stepped = theta - 0.5 * rows * n * grad                      # small step on each row
        R_after = naive_R(stepped)
        loss_after = CoherenceRegularizer(target=target, weight=1.0, mode="ceiling")(stepped)
    assert (R_after < R_before).all()
    assert loss_after.item() < loss.item()


# ---------- argument checks ----------


@pytest.mark.parametrize("sigma", [-0.1, -1, float("nan"), float("inf"), 1e39, "0.1", None, True])
def test_phase_noise_bad_sigma(sigma):
    with pytest.raises(ValueError, match="^sigma:"):
        PhaseNoise(sigma=sigma)


@pytest.mark.parametrize("relative", [-0.01, float("nan"), float("-inf"), 1e39, "0.02", True])
def test_frequency_jitter_bad_relative(relative):
    with pytest.raises(ValueError, match="^relative:"):
        FrequencyJitter(relative=relative)


@pytest.mark.parametrize("target", [-0.01, 1.01, float("nan"), float("inf"), None])
def test_coherence_bad_target(target):
    with pytest.raises(ValueError, match="^target:"):
        CoherenceRegularizer(target=target)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), 1e39, "1"])
def test_coherence_bad_weight(weight):
    with pytest.raises(ValueError, match="^weight:"):
        CoherenceRegularizer(weight=weight)


def test_scales_beyond_float32_are_named_and_its_largest_accepted():
    """1e39 is inf in float32 (sigma = 1e39 gave inf phases, weight = 1e39 a NaN loss, silently); the
    bound is the default dtype's largest value, as KuramotoAttention's dt / phase_noise / freq_jitter."""
    for make, name in ((lambda v: PhaseNoise(sigma=v), "sigma"), (lambda v: FrequencyJitter(relative=v), "relative"),
                       (lambda v: CoherenceRegularizer(weight=v), "weight")):
        with pytest.raises(ValueError, match=rf"^{name}: expected a value <= 3.40\d*e\+38 but got 1e\+39"):
            make(1e39)
        assert getattr(make(torch.finfo(torch.float32).max), name) == torch.finfo(torch.float32).max
    theta = torch.rand(2, 64) * 2 * math.pi  # R well below the default target: a 0 loss, not NaN
    assert CoherenceRegularizer(weight=torch.finfo(torch.float32).max)(theta).item() == 0.0


@pytest.mark.parametrize("mode", ["floor", "Ceiling", "", None])
def test_coherence_unknown_mode(mode):
    with pytest.raises(ValueError, match="^mode:"):
        CoherenceRegularizer(mode=mode)


@pytest.mark.parametrize("band", [
    (0.6, 0.4),                      # lo > hi
    (0.3,),                          # not a pair
    (0.1, 0.2, 0.3),                 # not a pair
    0.5,                             # not a pair
    "ab",                            # not a pair
    (-0.1, 0.5),                     # outside [0, 1]
    (0.2, 1.2),                      # outside [0, 1]
    (0.2, float("nan")),             # not finite
    (None, 0.5),                     # not a number
])
def test_coherence_bad_band(band):
    with pytest.raises(ValueError, match="^band:"):
        CoherenceRegularizer(mode="band", band=band)


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="ceiling", band=(0.2, 0.5)), "band: only read in mode='band', not 'ceiling'"),
    (dict(mode="center", band=[0.1, 0.9]), "band: only read in mode='band', not 'center'"),
    (dict(mode="band", target=0.9), "target: not read in mode='band'"),
    (dict(mode="band", target=0.9, band=(0.2, 0.5)), "target: not read in mode='band'"),
])
def test_coherence_argument_the_mode_ignores_rejected(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        CoherenceRegularizer(**kwargs)
    # the defaults are not "given": every mode accepts them, written out or not
    CoherenceRegularizer(mode=kwargs["mode"], target=0.45, band=[0.35, 0.55])


def test_coherence_band_as_list_and_degenerate_band_accepted():
    assert CoherenceRegularizer(mode="band", band=[0.2, 0.5]).band == (0.2, 0.5)
    assert CoherenceRegularizer(mode="band", band=(0.4, 0.4)).band == (0.4, 0.4)


@pytest.mark.parametrize("module", [PhaseNoise(0.1), FrequencyJitter(0.1), CoherenceRegularizer()])
@pytest.mark.parametrize("value", [[0.0, 1.0], torch.zeros(3, dtype=torch.int64)])
def test_non_float_tensor_input_rejected(module, value):
    with pytest.raises(ValueError, match="^(theta|omega):"):
        module.train()(value)


def test_penalty_of_a_non_tensor_is_named():
    with pytest.raises(ValueError, match="^R: expected a tensor"):
        CoherenceRegularizer().penalty([0.5])


def test_coherence_without_oscillators_rejected_but_empty_batch_is_zero():
    with pytest.raises(ValueError, match="^theta: expected at least one oscillator"):
        CoherenceRegularizer()(torch.empty(2, 0))
    assert CoherenceRegularizer()(torch.empty(0, 8)).item() == 0.0  # no rows: e.g. padding only


def test_coherence_bad_dim_at_forward():
    with pytest.raises(ValueError, match="^dim:"):
        CoherenceRegularizer(dim=2)(torch.zeros(3, 4))


def test_the_documented_defaults():
    # PhaseNoise 0.03, FrequencyJitter 0.02 (the reference's anti-synchronisation settings), CoherenceRegularizer
    # target 0.45 in ceiling mode, weight 0.1, band (0.35, 0.55): changed in the code alone, no test noticed
    assert PhaseNoise().sigma == 0.03 and FrequencyJitter().relative == 0.02
    regularizer = CoherenceRegularizer()
    assert (regularizer.target, regularizer.weight, regularizer.mode, regularizer.band, regularizer.dim) == (
        0.45, 0.1, "ceiling", (0.35, 0.55), -1)


@settings(max_examples=30)
@given(mode=st.sampled_from(CoherenceRegularizer.MODES), target=st.floats(0.0, 1.0), weight=st.floats(0.0, 10.0),
       lo=st.floats(0.0, 0.5), width=st.floats(0.0, 0.5), dim=st.integers(-3, 2))
def test_coherence_repr_shows_the_arguments_its_mode_reads_and_rebuilds_it(mode, target, weight, lo, width, dim):
    read = {"band": (lo, lo + width)} if mode == "band" else {"target": target}
    regularizer = CoherenceRegularizer(weight=weight, mode=mode, dim=dim, **read)
    shown = repr_arguments(regularizer)
    # the argument its mode ignores is not shown (a default value printed there would read as being used)
    assert ("target" in shown, "band" in shown) == (mode != "band", mode == "band")
    rebuilt = CoherenceRegularizer(**shown)
    assert (rebuilt.target, rebuilt.weight, rebuilt.mode, rebuilt.band, rebuilt.dim) == (
        regularizer.target, regularizer.weight, regularizer.mode, regularizer.band, regularizer.dim)
