"""The Kuramoto model's known behaviour: symmetries, invariants, Lyapunov function, Adler locking,
the Lorentzian steady state, and phase wrapping."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kuramoto_attn import (
    SOLVERS,
    AttentionCoupling,
    GraphCoupling,
    KuramotoField,
    MeanFieldCoupling,
    integrate,
    order_parameter,
    wrap_phase,
)

METHODS = sorted(SOLVERS)
f64 = torch.float64


def random_state(seed, n, batch=2):
    gen = torch.Generator().manual_seed(seed)
    theta0 = (torch.rand(batch, n, generator=gen, dtype=f64) - 0.5) * 2 * math.pi
    omega = torch.randn(n, generator=gen, dtype=f64)
    sym = torch.rand(n, n, generator=gen, dtype=f64)
    return theta0, omega, (sym + sym.T) / n


# ---------- symmetries ----------


@pytest.mark.parametrize("method", METHODS)
def test_gauge_shift_shifts_the_trajectory(method):
    theta0, omega, _ = random_state(0, 6)
    field = KuramotoField(omega, MeanFieldCoupling(2.0, phase_lag=0.4, harmonics=(1, 2)))
    base = integrate(field, theta0, dt=0.05, steps=40, method=method, return_trajectory=True)
    shifted = integrate(field, theta0 + 1.7, dt=0.05, steps=40, method=method, return_trajectory=True)
    # compare on the circle: e^{iθ}
    torch.testing.assert_close(torch.polar(torch.ones_like(shifted), shifted),
                               torch.polar(torch.ones_like(base), base + 1.7), atol=1e-10, rtol=0)
    R0, psi0 = order_parameter(base)
    R1, psi1 = order_parameter(shifted)
    torch.testing.assert_close(R1, R0, atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cos(psi1), torch.cos(psi0 + 1.7), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.sin(psi1), torch.sin(psi0 + 1.7), atol=1e-10, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_frequency_shift_is_a_rotating_frame(method):
    """ω + Ω gives θ(t) + Ω t: the coupling only sees phase differences."""
    theta0, omega, weights = random_state(1, 5)
    for coupling in (MeanFieldCoupling(1.5, phase_lag=0.3), GraphCoupling(weights, 2.0)):
        base = integrate(KuramotoField(omega, coupling), theta0, dt=0.05, steps=40, method=method)
        moved = integrate(KuramotoField(omega + 0.9, coupling), theta0, dt=0.05, steps=40, method=method)
        torch.testing.assert_close(moved, base + 0.9 * 2.0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_permutation_equivariance(method):
    theta0, omega, weights = random_state(2, 7)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    for coupling, permuted in ((MeanFieldCoupling(1.0), MeanFieldCoupling(1.0)),
                               (GraphCoupling(weights), GraphCoupling(weights[perm][:, perm]))):
        base = integrate(KuramotoField(omega, coupling), theta0, dt=0.05, steps=20, method=method)
        got = integrate(KuramotoField(omega[perm], permuted), theta0[:, perm], dt=0.05, steps=20, method=method)
        torch.testing.assert_close(got, base[:, perm], atol=1e-12, rtol=0)


# ---------- invariants and Lyapunov function ----------


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 8), method=st.sampled_from(METHODS),
       dt=st.floats(0.01, 0.2))
def test_symmetric_coupling_conserves_the_phase_sum(seed, n, method, dt):
    """Σ_ij K_ij sin(θ_j − θ_i) = 0 for symmetric K and α = 0, so Σθ(t) = Σθ(0) + tΣω."""
    theta0, omega, weights = random_state(seed, n)
    steps = 25
    for coupling in (GraphCoupling(weights, strength=3.0), MeanFieldCoupling(2.0, harmonics=(1, 2))):
        theta = integrate(KuramotoField(omega, coupling), theta0, dt=dt, steps=steps, method=method)
        expected = theta0.sum(-1) + dt * steps * omega.sum()
        torch.testing.assert_close(theta.sum(-1), expected, atol=1e-9, rtol=0)


def potential(theta, weights):
    """V = −½ Σ_ij K_ij cos(θ_j − θ_i): dθ/dt = ω − ∇V for symmetric K."""
    return -0.5 * (weights * torch.cos(theta[..., None, :] - theta[..., :, None])).sum((-1, -2))


@pytest.mark.parametrize("method", METHODS)
def test_potential_does_not_increase_for_identical_frequencies(method):
    theta0, _, weights = random_state(3, 8, batch=4)
    omega = torch.full((8,), 0.7, dtype=f64)  # identical: a common rotation, V unchanged
    field = KuramotoField(omega, GraphCoupling(weights, strength=2.0))
    trajectory = integrate(field, theta0, dt=0.01, steps=300, method=method, return_trajectory=True)
    V = potential(trajectory, 2.0 * weights)
    assert (V[1:] - V[:-1] <= 1e-12).all()
    assert (V[-1] < V[0] - 1e-3).all()  # and it really decreases


@pytest.mark.parametrize("method", METHODS)
def test_order_parameter_grows_under_attractive_all_to_all_coupling(method):
    theta0, _, _ = random_state(4, 16, batch=3)
    field = KuramotoField(torch.zeros(16, dtype=f64), MeanFieldCoupling(3.0))
    trajectory = integrate(field, theta0, dt=0.02, steps=400, method=method, return_trajectory=True)
    R2 = order_parameter(trajectory)[0] ** 2
    assert (R2[1:] - R2[:-1] >= -1e-12).all()
    assert (R2[-1] > 0.999).all()


def test_repulsive_coupling_desynchronises():
    theta0 = torch.linspace(-0.3, 0.3, 10, dtype=f64)
    field = KuramotoField(torch.zeros(10, dtype=f64), MeanFieldCoupling(-1.0))
    R = order_parameter(integrate(field, theta0, dt=0.05, steps=400))[0]
    assert R < 0.05


# ---------- Adler locking of two oscillators ----------


ADLER_CASES = [  # (Δω, K, locks)
    (0.5, 1.0, True), (0.95, 1.0, True), (-0.8, 1.0, True), (1.05, 1.0, False), (2.0, 1.0, False),
    (1.5, 2.0, True), (2.5, 2.0, False), (-2.1, 2.0, False),
]


def test_adler_two_oscillators_lock_iff_detuning_below_strength():
    """With K/N normalisation (N = 2), φ = θ₂ − θ₁ obeys dφ/dt = Δω − K sin φ: it locks iff
    |Δω| <= K, at φ* = arcsin(Δω/K). All cases run as one batch, with per-row strengths."""
    delta_omega, strength, locks = (torch.tensor(column, dtype=f64) for column in zip(*ADLER_CASES))
    omega = torch.stack([torch.zeros_like(delta_omega), delta_omega], -1)  # (cases, 2)
    field = KuramotoField(omega, MeanFieldCoupling(strength[:, None]))
    trajectory = integrate(field, torch.zeros_like(omega), dt=0.02, steps=5000, method="rk4",
                           return_trajectory=True)
    tail = (trajectory[:, :, 1] - trajectory[:, :, 0])[-1000:]  # φ over the last 20 time units
    locks = locks.bool()
    drift = tail.max(0).values - tail.min(0).values
    assert (drift[locks] < 1e-6).all()
    torch.testing.assert_close(tail[-1, locks], torch.asin(delta_omega / strength)[locks], atol=1e-6, rtol=0)
    assert ((tail[-1] - tail[0]).abs()[~locks] > 1.0).all()  # the phase difference keeps slipping


@pytest.mark.parametrize("lag", [0.5, 1.0])
def test_with_a_phase_lag_two_oscillators_lock_iff_detuning_below_strength_times_cos_lag(lag):
    """With a lag α each oscillator also feels its own term sin(−α), equal for both, so φ obeys
    dφ/dt = Δω − K cos α · sin φ: the locking threshold is K cos α (0.878 and 0.540 at K = 1), not K."""
    threshold = math.cos(lag)
    delta_omega = torch.tensor([0.9 * threshold, -0.97 * threshold, 1.03 * threshold, 1.2 * threshold], dtype=f64)
    locks = torch.tensor([True, True, False, False])
    omega = torch.stack([torch.zeros_like(delta_omega), delta_omega], -1)
    field = KuramotoField(omega, MeanFieldCoupling(1.0, phase_lag=lag))
    trajectory = integrate(field, torch.zeros_like(omega), dt=0.02, steps=10000, method="rk4",
                           return_trajectory=True)
    tail = (trajectory[:, :, 1] - trajectory[:, :, 0])[-1000:]
    drift = tail.max(0).values - tail.min(0).values
    assert (drift[locks] < 1e-6).all()
    torch.testing.assert_close(tail[-1, locks], torch.asin(delta_omega / threshold)[locks], atol=1e-6, rtol=0)
    assert ((tail[-1] - tail[0]).abs()[~locks] > 1.0).all()


# ---------- the Kuramoto transition with Lorentzian frequencies ----------


@pytest.mark.parametrize("strength", [2.0, 3.0])
def test_lorentzian_steady_state_order_parameter(strength):
    """For g(ω) Lorentzian with half-width γ, R∞ = √(1 − 2γ/K) when K > 2γ (Kuramoto 1975)."""
    gamma, n = 0.5, 4000
    # deterministic quantiles of the Lorentzian: less finite-N noise than random draws
    quantiles = (torch.arange(n, dtype=f64) + 0.5) / n
    omega = gamma * torch.tan(math.pi * (quantiles - 0.5))
    theta0 = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=f64) * 2 * math.pi
    field = KuramotoField(omega, MeanFieldCoupling(strength))
    theta = integrate(field, theta0, dt=0.05, steps=1000, method="rk4")
    trajectory = integrate(field, theta, dt=0.05, steps=200, method="rk4", return_trajectory=True)
    R = order_parameter(trajectory)[0].mean().item()  # time average over the steady state
    assert R == pytest.approx(math.sqrt(1 - 2 * gamma / strength), abs=0.03)


def test_below_threshold_stays_incoherent():
    gamma, n, strength = 0.5, 4000, 0.5  # K < 2γ
    quantiles = (torch.arange(n, dtype=f64) + 0.5) / n
    omega = gamma * torch.tan(math.pi * (quantiles - 0.5))
    theta0 = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=f64) * 2 * math.pi
    theta = integrate(KuramotoField(omega, MeanFieldCoupling(strength)), theta0, dt=0.05, steps=800)
    assert order_parameter(theta)[0].item() < 0.1


# ---------- wrapping ----------


def test_field_returns_a_new_tensor_and_checks_theta():
    field = KuramotoField(torch.tensor([1.0, 2.0]))           # free rotation: dθ/dt = ω
    field(torch.zeros(2)).mul_(0.1)                           # a caller's in-place update ...
    assert field.omega.tolist() == [1.0, 2.0]                 # ... leaves ω alone
    field(torch.zeros(3, 2)).mul_(0.1)                        # broadcast over a batch: no aliasing error
    with pytest.raises(ValueError, match="theta: expected a floating-point tensor"):
        field(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="coupling: None"):
        field(torch.zeros(2), mask=torch.ones(2, dtype=torch.bool))


def test_a_plain_omega_is_copied_not_aliased():
    """KuramotoField copies its buffer's frequencies as Coupling copies its strength: the caller's tensor
    changed later, or loading a state into one field, changed the field, the caller's tensor and every other
    field built from it. A tensor that requires gradients keeps its graph (the copy is not detached)."""
    omega = torch.tensor([1.0, 2.0, 3.0])
    first, second = KuramotoField(omega), KuramotoField(omega)
    omega.mul_(10.0)
    first.load_state_dict({"omega": torch.zeros(3)})
    assert omega.tolist() == [10.0, 20.0, 30.0] and second.omega.tolist() == [1.0, 2.0, 3.0]
    assert first.omega.tolist() == [0.0, 0.0, 0.0]
    p = torch.ones(3, requires_grad=True)
    KuramotoField(2 * p)(torch.zeros(3)).sum().backward()
    assert p.grad.tolist() == [2.0, 2.0, 2.0]


def test_reset_parameters_restores_the_frequencies_it_was_built_with():
    """As the couplings' strength: after to_empty on a field built on meta (FSDP and Fabric materialize modules
    so; the frequencies were to_empty's uninitialised memory) and after training, in omega's own dtype."""
    with torch.device("meta"):
        empty = KuramotoField([0.25, -1.5, 3.0], MeanFieldCoupling(strength=0.7))
        from_meta_tensor = KuramotoField(torch.ones(3))
    empty.to_empty(device="cpu")
    empty.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    built = KuramotoField([0.25, -1.5, 3.0], MeanFieldCoupling(strength=0.7))
    torch.testing.assert_close(dict(empty.state_dict()), dict(built.state_dict()), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="^omega: KuramotoField was built from a tensor on the meta device"):
        from_meta_tensor.to_empty(device="cpu").reset_parameters()

    omega = torch.nn.Parameter(torch.tensor([0.5, 2.0], dtype=f64))  # the caller's parameter, reset in place
    trained = KuramotoField(omega)
    with torch.no_grad():
        omega.add_(0.125)  # as an optimizer step would
    trained.reset_parameters()
    assert trained.omega is omega and omega.dtype == f64 and omega.tolist() == [0.5, 2.0]
    p = torch.ones(2, requires_grad=True)  # a buffer computed from parameters: its reset value, graph untouched
    computed = KuramotoField(2 * p)
    with torch.no_grad():
        computed.omega.zero_()
    computed.reset_parameters()
    assert computed.omega.tolist() == [2.0, 2.0] and not computed._initial_omega.requires_grad
    computed(torch.zeros(2)).sum().backward()
    assert p.grad.tolist() == [2.0, 2.0]



@pytest.mark.parametrize("call, name", [
    (lambda theta: MeanFieldCoupling(torch.ones(2, 1))(theta), "strength"),
    (lambda theta: MeanFieldCoupling()(theta, mask=torch.ones(2, 3, dtype=torch.bool)), "mask"),
    (lambda theta: order_parameter(theta, weights=torch.ones(2, 3)), "weights"),
])
def test_arguments_with_more_axes_than_theta_are_refused_not_broadcast(call, name):
    """Broadcasting "without enlarging": a strength, mask or weights with extra leading axes would make the
    output larger than theta, silently."""
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        call(torch.zeros(3))


@pytest.mark.parametrize("coupling", [None, MeanFieldCoupling(2.0)])
def test_a_scalar_cpu_omega_follows_the_phases_device(coupling):
    # a 0-d CPU ω passes the device check (it combines with any device) but was expanded on the CPU:
    # free rotation returned CPU rates for phases elsewhere, a coupling gave a bare device error
    # (the meta device stands in for a GPU)
    field = KuramotoField(torch.tensor(1.5), coupling)
    assert field(torch.zeros(2, 3, device="meta")).device.type == "meta"


@pytest.mark.parametrize("coupling, got", [
    (lambda th: torch.sin(th).mean(-1, keepdim=True), r"\(3, 1\)"),  # broadcast silently in ω + term
    (lambda th: torch.sin(th)[0], r"\(4,\)"),
    (lambda th: 0.5, "float"),
])
def test_a_callable_coupling_of_another_shape_is_named(coupling, got):
    field = KuramotoField(torch.zeros(4), coupling)
    with pytest.raises(ValueError, match=rf"^coupling: returned {got}, expected a tensor of theta's shape \(3, 4\)"):
        field(torch.rand(3, 4))


def test_field_passes_extra_arguments_to_its_coupling():
    # per-call weights and masks reach the coupling; bound with functools.partial, the field
    # integrates with them and its module keeps the coupling's learnable strength
    import functools
    theta = torch.rand(2, 3, 5, 4, dtype=torch.float64)  # (b, h, t, n), coupled over tokens
    weights = torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), -1).tril()
    coupling = AttentionCoupling(learnable=True)
    field = KuramotoField(torch.zeros(4, dtype=torch.float64), coupling)
    torch.testing.assert_close(field(theta, weights), coupling(theta, weights))
    out = integrate(functools.partial(field, weights=weights), theta, dt=0.1, steps=2, method="heun")
    out.sum().backward()
    assert coupling.strength.grad is not None and [n for n, _ in field.named_parameters()] == ["coupling.strength"]
    mask = torch.tensor([True, True, False, True, True])[:, None]  # a token out, broadcast over n
    masked = KuramotoField(torch.zeros(4, dtype=torch.float64), MeanFieldCoupling(dim=-2))
    torch.testing.assert_close(masked(theta, mask=mask), MeanFieldCoupling(dim=-2)(theta, mask=mask))


@settings(max_examples=50)
@given(values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=20))
def test_wrap_phase_range_and_equivalence(values):
    theta = torch.tensor(values, dtype=f64)
    wrapped = wrap_phase(theta)
    assert ((wrapped > -math.pi) & (wrapped <= math.pi)).all()
    torch.testing.assert_close(torch.cos(wrapped), torch.cos(theta), atol=1e-9, rtol=0)
    torch.testing.assert_close(torch.sin(wrapped), torch.sin(theta), atol=1e-9, rtol=0)
    torch.testing.assert_close(wrap_phase(wrapped), wrapped, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wrap_phase_in_half_precision_is_the_wrapped_value_rounded_once(dtype):
    # the inputs are exact in dtype: their wrap, rounded to dtype, is within one rounding of float64's
    theta = (torch.linspace(-300, 300, 4001, dtype=f64)).to(dtype)
    wrapped = wrap_phase(theta)
    assert wrapped.dtype == dtype
    assert ((wrapped.to(f64) > -math.pi) & (wrapped.to(f64) <= math.pi)).all()  # compared in float64, not dtype
    exact = wrap_phase(theta.to(f64))
    ulp = torch.finfo(dtype).eps * math.pi  # the spacing just below π: the largest in (−π, π]
    assert (wrapped.to(f64) - exact).abs().max() <= ulp
    assert torch.cos(wrapped.to(f64)).sub(torch.cos(theta.to(f64))).abs().max() <= ulp


def test_wrap_phase_boundaries():
    theta = torch.tensor([math.pi, -math.pi, 3 * math.pi, 0.0], dtype=f64)
    assert wrap_phase(theta).tolist() == pytest.approx([math.pi, math.pi, math.pi, 0.0])
    # just above π (and just below −π), in float64 and float32: (π − θ) mod 2π rounds to 2π itself
    for dtype in (f64, torch.float32):
        pi = torch.tensor(math.pi, dtype=dtype)
        for near in (torch.nextafter(pi, pi + 1), torch.nextafter(-pi, -pi - 1)):
            wrapped = wrap_phase(near)
            assert -math.pi < wrapped <= math.pi and torch.cos(wrapped) == pytest.approx(torch.cos(near))
    with pytest.raises(ValueError, match="theta"):
        wrap_phase([1.0])


@pytest.mark.parametrize("dtype", [f64, torch.float32, torch.bfloat16, torch.float16])
def test_wrap_phase_has_gradient_one_also_at_pi(dtype):
    # wrapping subtracts a constant multiple of 2π; half precision's last clamp to ±π had gradient 0 at π
    # itself under torch 2.14 (its clamp's gradient at the bounds)
    pi = torch.tensor(math.pi, dtype=dtype).item()
    theta = torch.tensor([pi, -pi, 3 * pi, 0.5, -3.0], dtype=dtype, requires_grad=True)
    wrap_phase(theta).sum().backward()
    assert theta.grad.tolist() == [1.0] * 5


def test_repr_shows_the_frequencies_shape_and_a_plain_coupling_by_name():
    def ring(theta):
        return torch.sin(theta.roll(1, -1) - theta)

    assert repr(KuramotoField(torch.zeros(3, 5), ring)) == "KuramotoField(omega=(3, 5), coupling=ring)"
    assert repr(KuramotoField(torch.zeros(4))) == "KuramotoField(omega=(4,))"
    assert repr(KuramotoField(torch.zeros(4), MeanFieldCoupling(2.0))).splitlines()[:3] == [
        "KuramotoField(", "  omega=(4,)", "  (coupling): MeanFieldCoupling(strength=2.0, phase_lag=0, harmonics=(1,), "
        "dim=-1, causal=False)"]  # a module shows as a submodule
