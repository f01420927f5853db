"""Order parameters: range, analytic cases, symmetries, statistics, weights, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kuramoto_attn import daido_order_parameter, order_parameter

f64 = torch.float64
finite_phases = st.lists(st.floats(-50, 50), min_size=1, max_size=24)


def naive_order_parameter(values, weights=None):
    """R e^{iψ} = Σ w e^{iθ} / Σ w with complex arithmetic in float64."""
    z = torch.exp(1j * torch.tensor(values, dtype=f64))
    w = torch.ones(len(values), dtype=f64) if weights is None else torch.tensor(weights, dtype=f64)
    mean = (w * z).sum() / w.sum()
    return mean.abs().item(), mean.angle().item()


@settings(max_examples=60)
@given(values=finite_phases)
def test_matches_the_complex_mean_and_lies_in_the_unit_interval(values):
    R, psi = order_parameter(torch.tensor(values, dtype=f64))
    R_ref, psi_ref = naive_order_parameter(values)
    assert 0.0 <= R.item() <= 1.0
    assert -math.pi < psi.item() <= math.pi  # the documented range
    assert R.item() == pytest.approx(R_ref, abs=1e-12)
    if R_ref > 1e-6:  # ψ is undefined at R = 0
        assert math.cos(psi.item() - psi_ref) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=40)
@given(values=finite_phases, shift=st.floats(-20, 20), k=st.integers(-5, 5))
def test_gauge_invariance_and_periodicity(values, shift, k):
    theta = torch.tensor(values, dtype=f64)
    R, psi = order_parameter(theta)
    R_shift, psi_shift = order_parameter(theta + shift)
    R_wrap, _ = order_parameter(theta + 2 * math.pi * k)
    assert R_shift.item() == pytest.approx(R.item(), abs=1e-9)
    assert R_wrap.item() == pytest.approx(R.item(), abs=1e-9)
    if R.item() > 1e-3:
        assert math.cos(psi_shift.item() - psi.item() - shift) == pytest.approx(1.0, abs=1e-8)


@given(value=st.floats(-100, 100), n=st.integers(1, 50))
def test_identical_phases_give_one(value, n):
    R, psi = order_parameter(torch.full((n,), value, dtype=f64))
    assert R.item() == pytest.approx(1.0, abs=1e-12)
    assert math.cos(psi.item() - value) == pytest.approx(1.0, abs=1e-9)



@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("weighted", [False, True])
def test_R_of_identical_phases_never_rounds_above_one(dtype, weighted):
    """Identical phases: R is 1 up to rounding, which never takes it past the documented 1 (a mean
    cos/sin pair of norm 1 + ulp, e.g. three float32 phases 2.912038...)."""
    values = torch.linspace(-math.pi, math.pi, 4001, dtype=f64)
    for n in (2, 3, 5, 7):
        theta = values[:, None].expand(-1, n).to(dtype)
        R, _ = order_parameter(theta, weights=torch.ones(n) if weighted else None)
        assert R.dtype == dtype and R.max().item() <= 1.0
        torch.testing.assert_close(R, torch.ones_like(R))

@pytest.mark.parametrize("dtype, autocast", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                             (torch.float32, torch.bfloat16), (f64, torch.float16)])
@pytest.mark.parametrize("weighted", [False, True])
def test_R_under_cpu_autocast_is_that_of_the_phases_in_their_dtype(dtype, autocast, weighted):
    """Phases of one half dtype under autocast to the other raised torch.stack's "Unexpected floating
    ScalarType in at::autocast::prioritize"; R, ψ and the gradient keep the phases' dtype."""
    theta = torch.tensor([[0.1, 0.4, 0.2], [1.0, 2.0, 3.0]], dtype=dtype, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 0.5]) if weighted else None
    with torch.autocast("cpu", dtype=autocast):
        R, psi = order_parameter(theta, weights=weights)
    R.sum().backward()
    assert R.dtype == psi.dtype == theta.grad.dtype == dtype and torch.isfinite(theta.grad).all()
    for row in range(2):
        R_ref, psi_ref = naive_order_parameter(theta[row].tolist(), None if weights is None else weights.tolist())
        assert R[row].item() == pytest.approx(R_ref, abs=1e-2)
        assert math.cos(psi[row].item() - psi_ref) == pytest.approx(1.0, abs=1e-3)

@settings(max_examples=60)
@given(b=st.integers(1, 4), n=st.integers(1, 7), seed=st.integers(0, 2**16), per_row=st.booleans())
def test_weighted_R_matches_the_complex_mean_for_broadcast_weights(b, n, seed, per_row):
    # weights of shape (b, 1), one per row, broadcast along the population: the total must count n of them
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(b, n, generator=gen, dtype=f64) * 2 * math.pi
    shape = (b, 1) if per_row else (n,)
    weights = torch.rand(shape, generator=gen, dtype=f64) + 0.1
    R, psi = order_parameter(theta, dim=-1, weights=weights)
    w = weights.expand_as(theta)
    z = (w * torch.exp(1j * theta)).sum(-1) / w.sum(-1)
    torch.testing.assert_close(R, z.abs().clamp(max=1.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cos(psi), torch.cos(z.angle()), rtol=0, atol=1e-9)
    if per_row:  # a weight constant along the population is no weighting at all
        torch.testing.assert_close(R, order_parameter(theta, dim=-1)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_psi_at_the_branch_cut_is_pi_not_minus_pi(dtype):
    # atan2(-0, -1) = -π: a mean sine of -0 (θ = -π, or -π and π mixed) gave ψ = -π, outside (-π, π]
    for values in ([-math.pi], [-math.pi, math.pi], [-math.pi, -math.pi]):
        _, psi = order_parameter(torch.tensor(values, dtype=dtype))
        assert psi.item() == pytest.approx(math.pi)


@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_splay_state_gives_zero(n):
    theta = 2 * math.pi * torch.arange(n, dtype=f64) / n
    assert order_parameter(theta)[0].item() < 1e-12


def test_expected_r_squared_is_one_over_n_for_uniform_phases():
    gen = torch.Generator().manual_seed(0)
    for n in (4, 16, 64):
        theta = torch.rand(20000, n, generator=gen, dtype=f64) * 2 * math.pi
        mean_r2 = (order_parameter(theta)[0] ** 2).mean().item()
        # N·R² is about Exp(1), so the sample mean's std is ≈ 0.7% of 1/N: 5% is a 7-sigma band
        assert mean_r2 == pytest.approx(1 / n, rel=0.05)


def test_averaging_angles_across_heads_is_the_artifact_we_avoid():
    """Independent uniform phases per head: R per head is small; the reference averaged angles
    over 12 heads first, which concentrates them and gives R ≈ 0.88."""
    gen = torch.Generator().manual_seed(1)
    theta = (torch.rand(64, 12, 32, generator=gen, dtype=f64) - 0.5) * 2 * math.pi  # (b, h, n)
    per_head = order_parameter(theta, dim=-1)[0].mean().item()
    artifact = order_parameter(theta.mean(1), dim=-1)[0].mean().item()
    assert per_head < 0.25
    assert artifact > 0.8


def test_dim_keepdim_and_batching():
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(3, 5, 4, generator=gen, dtype=f64)
    R, psi = order_parameter(theta, dim=1)
    assert R.shape == psi.shape == (3, 4)
    R_keep, _ = order_parameter(theta, dim=1, keepdim=True)
    assert R_keep.shape == (3, 1, 4)
    for b in range(3):
        for c in range(4):
            assert R[b, c].item() == pytest.approx(naive_order_parameter(theta[b, :, c].tolist())[0], abs=1e-12)


@settings(max_examples=40)
@given(data=st.data(), n=st.integers(1, 12))
def test_weights_match_the_weighted_complex_mean(data, n):
    values = data.draw(st.lists(st.floats(-10, 10), min_size=n, max_size=n))
    weights = data.draw(st.lists(st.floats(0.01, 5), min_size=n, max_size=n))
    R, _ = order_parameter(torch.tensor(values, dtype=f64), weights=torch.tensor(weights, dtype=f64))
    assert R.item() == pytest.approx(naive_order_parameter(values, weights)[0], abs=1e-12)


def test_float64_weights_of_float32_phases_keep_their_range():
    """float64 weights outside float32's range: 1e-50 each (0 in float32: R was 0, not 1) and 1e39
    (inf in float32: refused as not finite) weigh as they are; R keeps theta's dtype."""
    theta = torch.tensor([0.3, 0.3, 1.9])
    for weights, expected in (([1e-50, 1e-50, 0.0], 1.0), ([1e39, 1e39, 0.0], 1.0), ([1e39, 1.0, 1e39], None)):
        R, psi = order_parameter(theta, weights=torch.tensor(weights, dtype=f64))
        assert R.dtype == psi.dtype == torch.float32
        R_ref, psi_ref = naive_order_parameter(theta.tolist(), weights)
        assert float(R) == pytest.approx(R_ref if expected is None else expected, abs=1e-6)
        assert math.cos(float(psi) - psi_ref) == pytest.approx(1.0, abs=1e-6)


@settings(max_examples=40)
@given(values=st.lists(st.floats(-10, 10), min_size=1, max_size=8), data=st.data(),
       dtype=st.sampled_from([torch.float32, f64]))
def test_weights_at_the_ends_of_their_range_weigh_as_their_ratios(values, data, dtype):
    """R and ψ depend only on the ratios of a group's weights: finite ones whose sum overflows
    (float32: 2e38 each gave R = NaN) or tiny ones (float32 1e-40 gave R ≈ 0.03 for equal phases)
    weigh as the ratios do, against the float64 complex mean of the unscaled weights."""
    n = len(values)
    ratios = data.draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n))
    ratios[data.draw(st.integers(0, n - 1))] = 1.0  # at least one weight
    info = torch.finfo(dtype)
    scale = data.draw(st.sampled_from([info.max / 2, info.max, info.tiny / 64, info.tiny, 1.0]))
    weights = torch.tensor(ratios, dtype=f64).mul(scale).to(dtype)
    assert torch.isfinite(weights).all()
    R, psi = order_parameter(torch.tensor(values, dtype=dtype), weights=weights)
    R_ref, psi_ref = naive_order_parameter(values, ratios)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float(R) == pytest.approx(R_ref, abs=tol)
    if R_ref > 1e-3:
        assert math.cos(float(psi) - psi_ref) == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_each_group_is_scaled_by_its_own_weights(dtype):
    # one group's huge weights must not scale another's tiny ones away (to a group of no weight: R = 0)
    gen = torch.Generator().manual_seed(5)
    theta = (torch.rand(3, 5, generator=gen, dtype=f64) - 0.5) * 6
    ratios = torch.rand(3, 5, generator=gen, dtype=f64) + 0.1
    info = torch.finfo(dtype)
    scales = torch.tensor([[info.max / 8], [info.tiny], [1.0]], dtype=f64)
    R, psi = order_parameter(theta.to(dtype), weights=(ratios * scales).to(dtype))
    for g in range(3):
        R_ref, psi_ref = naive_order_parameter(theta[g].to(dtype).tolist(), ratios[g].tolist())
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert float(R[g]) == pytest.approx(R_ref, abs=tol)
        assert math.cos(float(psi[g]) - psi_ref) == pytest.approx(1.0, abs=tol)


def test_boolean_mask_as_weights_selects_elements():
    theta = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=f64)
    mask = torch.tensor([[True, False, True, False]])
    R, psi = order_parameter(theta, weights=mask)
    R_ref, psi_ref = order_parameter(theta[:, mask[0]])
    torch.testing.assert_close(R, R_ref)
    torch.testing.assert_close(psi, psi_ref)
    R_empty, _ = order_parameter(theta, weights=torch.zeros(1, 4))
    assert R_empty.item() == 0.0
    poisoned = torch.where(mask, theta, float("nan"))  # masked-out phases never count, even NaN
    torch.testing.assert_close(order_parameter(poisoned, weights=mask), (R, psi))
    with pytest.raises(ValueError, match="weights: expected finite non-negative"):
        order_parameter(theta, weights=torch.tensor([[1.0, float("nan"), 1.0, 1.0]]))


def test_an_empty_batch_gives_empty_results():
    R, psi = order_parameter(torch.empty(0, 5))  # no groups, but each would have 5 oscillators
    assert R.shape == psi.shape == (0,)


def test_daido_detects_two_clusters():
    theta = torch.tensor([0.2, 0.2 + math.pi] * 5, dtype=f64)
    R1, _ = order_parameter(theta)
    R2, psi2 = daido_order_parameter(theta, m=2)
    assert R1.item() < 1e-12
    assert R2.item() == pytest.approx(1.0)
    assert math.cos(psi2.item() - 0.4) == pytest.approx(1.0)


@settings(max_examples=30)
@given(values=finite_phases, m=st.integers(1, 5))
def test_daido_matches_complex_mean_of_harmonic(values, m):
    R_m, _ = daido_order_parameter(torch.tensor(values, dtype=f64), m=m)
    assert R_m.item() == pytest.approx(naive_order_parameter([m * v for v in values])[0], abs=1e-11)



@pytest.mark.parametrize("dtype, values, m", [
    (torch.float16, [30000.0, 30000.0, 30016.0], 3),  # m·θ beyond float16's 65504: inf, R_m was NaN
    (torch.bfloat16, [100.0, 100.5, 101.0, 101.5], 3),  # m·θ rounded to bfloat16's step of 2 there
    (torch.float16, [1000.0, 1000.5, 1001.0, 1001.5], 3),  # and to float16's
])
def test_daido_of_half_precision_phases_is_that_of_their_values(dtype, values, m):
    """R_m of half-precision phases is R_m of the values they hold (complex128 reference), in their dtype."""
    theta = torch.tensor(values, dtype=dtype)
    R_m, psi_m = daido_order_parameter(theta, m=m)
    assert R_m.dtype == psi_m.dtype == dtype
    R_ref, psi_ref = naive_order_parameter((m * theta.double()).tolist())
    assert float(R_m) == pytest.approx(R_ref, abs=1e-2)
    assert math.cos(float(psi_m) - psi_ref) == pytest.approx(1.0, abs=1e-2)


def test_daido_of_an_integer_harmonic_past_int64_is_computed():
    # an int past 2**64 was torch's OverflowError (not a ValueError naming m); within float32's range it
    # is a harmonic as any other: identical phases give R_m = 1
    for theta in (torch.zeros(3, dtype=torch.float16), torch.full((2,), math.pi / 2, dtype=f64)):
        R_m, psi_m = daido_order_parameter(theta, m=2 ** 66)
        assert R_m.dtype == theta.dtype and float(R_m) == pytest.approx(1.0, abs=1e-3)


@settings(max_examples=30)
@given(data=st.data(), n=st.integers(1, 6), m=st.integers(1, 4), keepdim=st.booleans())
def test_daido_takes_dim_weights_and_keepdim_as_order_parameter_does(data, n, m, keepdim):
    """Harmonic m along dim 0 of (n, 3) phases with weights (n, 1): per column the weighted complex
    mean of e^{imθ}, shaped as order_parameter's result (dim kept as length 1 with keepdim)."""
    values = data.draw(st.lists(st.floats(-10, 10), min_size=3 * n, max_size=3 * n))
    weights = data.draw(st.lists(st.floats(0.01, 5), min_size=n, max_size=n))
    theta, w = torch.tensor(values, dtype=f64).view(n, 3), torch.tensor(weights, dtype=f64).view(n, 1)
    R, psi = daido_order_parameter(theta, m, dim=0, weights=w, keepdim=keepdim)
    assert R.shape == psi.shape == ((1, 3) if keepdim else (3,))
    for c in range(3):
        R_ref, psi_ref = naive_order_parameter((m * theta[:, c]).tolist(), weights)
        assert R.flatten()[c].item() == pytest.approx(R_ref, abs=1e-11)
        if R_ref > 1e-6:  # ψ is defined
            assert math.cos(psi.flatten()[c].item() - psi_ref) == pytest.approx(1.0, abs=1e-9)

def test_gradients_are_finite_even_at_zero_coherence():
    theta = (2 * math.pi * torch.arange(6, dtype=f64) / 6).requires_grad_()
    R, _ = order_parameter(theta)
    R.backward()
    assert torch.isfinite(theta.grad).all()
    x = torch.randn(2, 5, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda th: order_parameter(th)[0], (x,))


@pytest.mark.parametrize("weighted", [False, True])
def test_gradient_of_R_where_it_rounds_to_one(weighted):
    # R = cos(δ/2) for two phases δ apart rounds to 1.0; its gradient ∓sin(δ/2)/2 must survive (a clamp of R
    # to [0, 1] had gradient 0 at 1.0 itself under torch 2.14)
    delta = 1e-9
    theta = torch.tensor([0.0, delta], dtype=f64, requires_grad=True)
    R, _ = order_parameter(theta, weights=torch.ones(2, dtype=f64) if weighted else None)
    assert R.item() == 1.0
    R.backward()
    expected = torch.tensor([math.sin(delta / 2) / 2, -math.sin(delta / 2) / 2], dtype=f64)
    torch.testing.assert_close(theta.grad, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: order_parameter([0.0, 1.0]), "theta"),
    (lambda: order_parameter(torch.zeros(3), dim=1), "dim"),
    (lambda: order_parameter(torch.zeros(3, 4), weights=torch.ones(3)), "weights"),
    (lambda: order_parameter(torch.zeros(3), weights=-torch.ones(3)), "weights"),
    (lambda: order_parameter(torch.zeros(3), weights=torch.tensor([1.0, math.inf, 1.0])), "^weights: expected finite"),
    (lambda: daido_order_parameter(torch.zeros(3), m=0), "m"),
    # m·θ is inf beyond float32's largest value (R_m was NaN); an int past 2**64 was torch's OverflowError
    (lambda: daido_order_parameter(torch.ones(3), m=10 ** 39), r"^m: expected at most 3.40282e\+38"),
    (lambda: daido_order_parameter(torch.ones(3, dtype=f64), m=10 ** 400), r"^m: expected at most 1.79769e\+308"),
    (lambda: order_parameter(torch.empty(0)), "^theta: expected at least one oscillator"),
    (lambda: order_parameter(torch.empty(3, 0)), "^theta: expected at least one oscillator"),
    (lambda: order_parameter(torch.empty(0, 3), dim=0), "^theta: expected at least one oscillator"),
    (lambda: order_parameter(torch.empty(3, 0), weights=torch.ones(3, 0)), "^theta: expected at least one"),
    (lambda: daido_order_parameter(torch.empty(2, 0), m=2), "^theta: expected at least one oscillator"),
    (lambda: order_parameter(torch.zeros(2, 3), keepdim=1), "^keepdim: expected True or False"),
    # a cast to real would drop the imaginary part of the weights
    (lambda: order_parameter(torch.zeros(3), weights=torch.tensor([1j, 1, 1])), "^weights: expected real"),
    (lambda: order_parameter(torch.zeros(3, device="meta"), weights=torch.ones(3)),
     "^weights: expected a tensor on theta's device meta but got cpu"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_R_of_half_precision_phases_does_not_overflow(dtype):
    # the weighted sums ran in float16: 100 weights of 1000 (or 70000 valid elements) summed to inf, R was
    # NaN; a weight of 1e5 was cast to inf first and refused as "not finite"
    theta = torch.full((100,), 0.3, dtype=dtype)
    for t, w in ((theta, torch.full((100,), 1000.0)), (torch.zeros(3, dtype=dtype), torch.tensor([1e5, 1.0, 1.0])),
                 (torch.zeros(70_000, dtype=dtype), torch.ones(70_000, dtype=torch.bool))):
        R, psi = order_parameter(t, weights=w)
        assert R.dtype == psi.dtype == dtype
        assert float(R) == pytest.approx(1.0, abs=1e-2) and float(psi) == pytest.approx(float(t[0]), abs=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_psi_gradient_of_half_precision_phases_near_R_0_is_finite_and_that_of_their_values(dtype, weighted):
    """ψ's gradient is (C dS − S dC) / R²: in float16 R² underflowed already at R ≈ 1e-3 and the gradient
    was NaN. Computed in float32 it is finite, shifts ψ with the phases (the gradients sum to 1), and is
    the float64 gradient of the same (rounded) phases while R is not tiny (at R ≈ 1e-4 ψ itself is
    ill-conditioned: float32's rounding of the sums moves the gradient by about 0.1)."""
    for gap, atol in ((2e-1, 1e-3), (2e-2, 1e-3), (2e-3, 2e-2), (2e-4, None)):  # R ≈ gap / 2
        theta = torch.tensor([0.3, 0.3 + math.pi - gap], dtype=dtype).requires_grad_()
        weights = torch.tensor([1.0, 1.0]) if weighted else None
        R, psi = order_parameter(theta, weights=weights)
        psi.backward()
        assert theta.grad.dtype == dtype and torch.isfinite(theta.grad).all(), (gap, theta.grad)
        assert theta.grad.sum().item() == pytest.approx(1.0, abs=1e-2)
        if atol is not None:
            exact = theta.detach().to(f64).requires_grad_()
            order_parameter(exact, weights=weights)[1].backward()
            torch.testing.assert_close(theta.grad.to(f64), exact.grad, rtol=0, atol=atol)


@settings(max_examples=40)
@given(n=st.integers(2, 6), seed=st.integers(0, 2**16), zeros=st.integers(1, 5))
def test_gradient_of_the_weights_is_that_of_the_complex_mean_also_at_zero_weights(n, seed, zeros):
    """A weight of exactly 0 (a soft mask, a ReLU) had its phase replaced by 0 in the sums, so its gradient
    was that of e^{i0}: ∂(R + ψ)/∂w_j is (e^{iθ_j} − Z)-shaped and needs the phase itself."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(n, generator=gen, dtype=f64) * 2 * math.pi
    weights = torch.rand(n, generator=gen, dtype=f64) + 0.1
    weights[torch.randperm(n, generator=gen)[:min(zeros, n - 1)]] = 0.0  # at least one weight stays
    weights.requires_grad_()
    R, psi = order_parameter(theta, weights=weights)
    (R + torch.cos(psi)).backward()

    def reference(w):
        z = (w * torch.exp(1j * theta)).sum() / w.sum()
        return z.abs() + torch.cos(z.angle())

    expected = torch.autograd.functional.jacobian(reference, weights.detach())
    torch.testing.assert_close(weights.grad, expected, rtol=1e-9, atol=1e-9)


def test_weighted_order_parameters_run_on_the_meta_device():
    """Shape (and FLOP) estimates: the weights' value check read values a meta tensor does not have
    (``Tensor.item() cannot be called on meta tensors``); the unweighted path already ran there."""
    theta, weights = torch.zeros(2, 3, 5, device="meta"), torch.ones(2, 1, 5, device="meta")
    for R, psi in (order_parameter(theta, weights=weights), daido_order_parameter(theta, m=2, weights=weights)):
        assert R.device.type == psi.device.type == "meta" and R.shape == psi.shape == (2, 3)
    with pytest.raises(ValueError, match="^weights: expected finite non-negative"):  # still checked on values
        order_parameter(torch.zeros(5), weights=torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
