"""Integrators: order of convergence, exact cases, autograd, argument checks."""

import math

import pytest
import torch

from kuramoto_attn import (
    SOLVERS,
    AttentionCoupling,
    FixedStepSolver,
    KuramotoField,
    MeanFieldCoupling,
    integrate,
    order_parameter,
)
from kuramoto_attn._checks import autocast_dtype

METHODS = sorted(SOLVERS)


def two_oscillator_field():
    """An Adler pair that does not lock quickly: a smooth, non-trivial field."""
    omega = torch.tensor([0.0, 1.3], dtype=torch.float64)
    return KuramotoField(omega, MeanFieldCoupling(strength=1.0, phase_lag=0.2))


@pytest.mark.parametrize("method", METHODS)
def test_halving_dt_divides_the_error_by_two_to_the_order(method):
    field = two_oscillator_field()
    theta0 = torch.tensor([0.3, -1.1], dtype=torch.float64)
    horizon = 2.0
    # reference: RK4 with a step 256 times smaller (error ~1e-15)
    exact = integrate(field, theta0, dt=horizon / 5120, steps=5120, method="rk4")
    errors = []
    for steps in (20, 40, 80):
        got = integrate(field, theta0, dt=horizon / steps, steps=steps, method=method)
        errors.append((got - exact).abs().max().item())
    order = SOLVERS[method].order
    for coarse, fine in zip(errors, errors[1:]):
        ratio = coarse / fine
        assert 2 ** order * 0.8 < ratio < 2 ** order * 1.25, (method, errors)



def test_one_step_is_each_method_s_own_butcher_formula():
    # the convergence order alone lets a method of the same order pass (the midpoint rule for Heun's,
    # Kutta's 3/8 rule for the classical RK4): one step on a nonlinear field, against each formula by hand
    def f(y):
        return torch.sin(y) + 0.5 * torch.cos(2.0 * y) ** 2

    y = torch.tensor([0.3, -1.1, 2.0], dtype=torch.float64)
    h = 0.37
    k1 = f(y)
    expected = {"euler": y + h * k1, "heun": y + h / 2 * (k1 + f(y + h * k1))}
    a = k1
    b = f(y + h / 2 * a)
    c = f(y + h / 2 * b)
    d = f(y + h * c)
    expected["rk4"] = y + h / 6 * (a + 2 * b + 2 * c + d)
    assert sorted(expected) == METHODS
    for method, want in expected.items():
        torch.testing.assert_close(integrate(f, y, dt=h, steps=1, method=method), want, rtol=0, atol=1e-14)


def test_the_default_method_is_rk4():
    """The documented default (every other test names its method)."""
    field = two_oscillator_field()
    theta0 = torch.tensor([0.3, -1.1], dtype=torch.float64)
    assert torch.equal(integrate(field, theta0, dt=0.5, steps=3),
                       integrate(field, theta0, dt=0.5, steps=3, method="rk4"))
    assert not torch.equal(integrate(field, theta0, dt=0.5, steps=3),
                           integrate(field, theta0, dt=0.5, steps=3, method="heun"))

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_coupling_is_free_rotation(method, dtype):
    omega = torch.tensor([[0.5, -1.0, 2.0]], dtype=dtype)
    theta0 = torch.tensor([[0.1, 0.2, -3.0]], dtype=dtype)
    field = KuramotoField(omega, MeanFieldCoupling(strength=0.0))
    got = integrate(field, theta0, dt=0.1, steps=30, method=method)
    torch.testing.assert_close(got, theta0 + omega * 3.0)


@pytest.mark.parametrize("method", METHODS)
def test_trajectory_has_theta0_first_and_ends_at_the_result(method):
    field = two_oscillator_field()
    theta0 = torch.tensor([[0.3, -1.1], [2.0, 0.0]], dtype=torch.float64)
    trajectory = integrate(field, theta0, dt=0.05, steps=7, method=method, return_trajectory=True)
    assert trajectory.shape == (8, 2, 2)
    assert torch.equal(trajectory[0], theta0)
    torch.testing.assert_close(trajectory[-1], integrate(field, theta0, dt=0.05, steps=7, method=method),
                               atol=0, rtol=0)


@pytest.mark.parametrize("phases, autocast", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_a_trajectory_of_one_half_dtype_under_autocast_to_the_other(phases, autocast):
    # torch.stack of the trajectory raised "Unexpected floating ScalarType in at::autocast::prioritize"
    field = KuramotoField(torch.zeros(4), MeanFieldCoupling())
    theta0 = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)).to(phases)
    with torch.autocast("cpu", dtype=autocast):
        trajectory = integrate(field, theta0, dt=0.1, steps=3, return_trajectory=True)
        end = integrate(field, theta0, dt=0.1, steps=3)
    assert trajectory.shape == (4, 2, 4) and trajectory.dtype == phases
    assert torch.equal(trajectory[0], theta0) and torch.equal(trajectory[-1], end)


def test_phases_are_never_wrapped():
    field = KuramotoField(torch.tensor([10.0], dtype=torch.float64))
    got = integrate(field, torch.zeros(1, dtype=torch.float64), dt=0.1, steps=10)
    assert got.item() == pytest.approx(10.0)  # far outside (−π, π]


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_through_integration(method):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.rand(2, 4, generator=gen, dtype=torch.float64).requires_grad_()
    omega = torch.randn(4, generator=gen, dtype=torch.float64).requires_grad_()
    strength = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def run(theta0, omega, strength):
        coupling = MeanFieldCoupling(phase_lag=0.3, harmonics=(1, 2), learnable=True)
        field = KuramotoField(omega, lambda th: torch.func.functional_call(coupling, {"strength": strength}, (th,)))
        return integrate(field, theta0, dt=0.1, steps=5, method=method)

    assert torch.autograd.gradcheck(run, (theta0, omega, strength))


def test_learnable_omega_parameter_gets_gradients():
    omega = torch.nn.Parameter(torch.randn(5))
    field = KuramotoField(omega, MeanFieldCoupling(1.0))
    assert [name for name, _ in field.named_parameters()] == ["omega"]
    integrate(field, torch.zeros(5), dt=0.1, steps=3).sum().backward()
    torch.testing.assert_close(omega.grad, torch.full((5,), 0.3))  # Σ_i coupling_i = 0


def test_a_new_solver_registers_by_name():
    class Midpoint(FixedStepSolver):
        order = 2

        def step(self, field, theta, dt):
            return theta + dt * field(theta + 0.5 * dt * field(theta))

    SOLVERS["midpoint"] = Midpoint
    try:
        field = KuramotoField(torch.tensor([1.0], dtype=torch.float64))
        assert integrate(field, torch.zeros(1, dtype=torch.float64), dt=0.5, steps=4, method="midpoint").item() == 2.0
        # and by name in the layer and the model config (the GPT's phase layer integrates with it)
        from models import GPT, GPTConfig
        model = GPT(GPTConfig.from_dict(dict(vocab_size=7, max_seq_len=8, n_layers=1, n_heads=2, d_model=8,
                                             use_phase_attention=True, phase_layer_idx=[0], num_oscillators=2,
                                             integrator="midpoint")))
        assert model.blocks[0].attn.integrator == "midpoint"
    finally:
        del SOLVERS["midpoint"]


@pytest.mark.parametrize("kwargs, match", [
    ({"dt": 0.0}, "dt"),
    ({"dt": -0.1}, "dt"),
    ({"dt": math.nan}, "dt"),
    ({"dt": "0.1"}, "dt"),
    ({"dt": 10**400}, "^dt: expected a finite"),  # was a bare OverflowError
    ({"steps": 0}, "steps"),
    ({"steps": 2.5}, "steps"),
    ({"method": "dopri5"}, "method"),
    ({"method": ["rk4"]}, "^method: expected one of"),  # was a bare "unhashable type" TypeError
    ({"return_trajectory": "no"}, "^return_trajectory:"),
    ({"return_trajectory": 1}, "^return_trajectory:"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    args = {"dt": 0.1, "steps": 3, "method": "rk4"} | kwargs
    field = KuramotoField(torch.zeros(3))
    with pytest.raises(ValueError, match=match):
        integrate(field, torch.zeros(3), **args)


def test_bad_theta0_and_field_output_are_named():
    field = KuramotoField(torch.zeros(3))
    with pytest.raises(ValueError, match="theta0"):
        integrate(field, [0.0, 0.0, 0.0], dt=0.1, steps=1)
    with pytest.raises(ValueError, match="theta0"):
        integrate(field, torch.zeros(3, dtype=torch.long), dt=0.1, steps=1)
    with pytest.raises(ValueError, match="field"):
        integrate(lambda th: th.sum(), torch.zeros(3), dt=0.1, steps=1)
    with pytest.raises(ValueError, match="^field: expected a callable"):  # was "'str' object is not callable"
        integrate("euler", torch.zeros(3), dt=0.1, steps=1)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [
    lambda th: torch.ones_like(th, dtype=torch.float64),  # silently made the state float64
    lambda th: torch.ones_like(th, dtype=torch.float16),
    lambda th: torch.ones_like(th, dtype=torch.long),
    lambda th: torch.ones_like(th, device="meta"),  # a bare device error deep in the solver
    lambda th: torch.ones(1, 3),  # broadcasts against (2, 3)
    lambda th: th.tolist(),
], ids=["float64", "float16", "long", "device", "shape", "list"])
def test_field_returning_another_dtype_device_or_shape_is_named(method, bad):
    with pytest.raises(ValueError, match=r"^field: expected dθ/dt of theta's shape \(2, 3\), dtype torch.float32"):
        integrate(bad, torch.zeros(2, 3), dt=0.1, steps=2, method=method)


def test_mismatched_omega_shape_is_named():
    field = KuramotoField(torch.zeros(4), MeanFieldCoupling())
    with pytest.raises(ValueError, match="omega"):
        integrate(field, torch.zeros(2, 3), dt=0.1, steps=1)
    with pytest.raises(ValueError, match="omega"):
        integrate(KuramotoField(torch.zeros(2, 1, 3)), torch.zeros(2, 3), dt=0.1, steps=1)  # would enlarge θ
    with pytest.raises(ValueError, match="omega"):
        KuramotoField(torch.tensor([0.0, math.inf]))
    for bad in ("abc", [0.0, "x"], None, torch.tensor([1, 2]), torch.tensor([1j])):
        with pytest.raises(ValueError, match="^omega:"):
            KuramotoField(bad)


@pytest.mark.parametrize("coupling", [5, "mean_field", torch.zeros(3)])
def test_non_callable_coupling_is_named(coupling):
    with pytest.raises(ValueError, match="^coupling: expected a callable"):
        KuramotoField(torch.zeros(3), coupling=coupling)


def test_integration_traces_into_one_graph_for_torch_compile():
    """fullgraph=True fails on any graph break; aot_eager checks tracing and autograd without the
    slow inductor code generation. Values and gradients must equal eager mode."""
    gen = torch.Generator().manual_seed(1)
    field = KuramotoField(torch.randn(8, generator=gen), MeanFieldCoupling(1.5, phase_lag=0.2, dim=-2, causal=True))
    attention = AttentionCoupling(0.7, dim=-2)
    weights = torch.softmax(torch.randn(2, 3, 6, 6, generator=gen), -1)

    def run(theta):
        theta = integrate(field, theta, dt=0.1, steps=3, method="heun")
        theta = theta + attention(theta, weights)
        return order_parameter(theta)[0].mean()

    theta = torch.randn(2, 3, 6, 8, generator=gen, requires_grad=True)
    eager = run(theta)
    (eager_grad,) = torch.autograd.grad(eager, theta)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(theta)
    (compiled_grad,) = torch.autograd.grad(compiled, theta)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("dtype, code", [(None, 0.0), (torch.bfloat16, 1.0), (torch.float16, 2.0)])
def test_autocast_state_is_read_in_one_graph_under_torch_compile(dtype, code):
    # dynamo of torch 2.4 to 2.7 (at least) cannot trace torch.amp.is_autocast_available: a graph break in every
    # integration (integrate's autocast_off), an error under fullgraph=True
    def read(x):
        found = autocast_dtype(x)
        return x * (0.0 if found is None else 1.0 if found == torch.bfloat16 else 2.0)

    x = torch.ones(3)
    torch.compiler.reset()  # a new graph per case: dynamo before torch 2.7 did not guard on autocast's dtype
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        assert autocast_dtype(x) == dtype
        torch.testing.assert_close(torch.compile(read, fullgraph=True, backend="eager")(x), torch.full((3,), code))
    assert autocast_dtype(torch.ones(3, device="meta")) is None  # no autocast there (is_autocast_enabled raises)


def test_solvers_print_their_names():
    # a solver printed as "<kuramoto_attn.integrators.Euler object at 0x...>"
    assert [repr(solver()) for solver in SOLVERS.values()] == [f"{name}()" for name in ("Euler", "Heun", "RK4")]

    class Midpoint(FixedStepSolver):
        order = 2

    assert repr(Midpoint()) == "Midpoint()"
