"""Couplings against naive pairwise float64 references, gradients, and argument checks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import generators
from kuramoto_attn import (AttentionCoupling, Coupling, GraphCoupling, KuramotoField, MeanFieldCoupling, integrate,
                           weighted_sine_coupling)

# ---------- naive references: explicit pairwise sums, float64 ----------


def naive_mean_field(theta, strength, phase_lag, harmonics, causal, mask=None):
    """c_i = K/N_i Σ_{j∈S_i} Σ_m sin(m(θ_j − θ_i) − α) along the last axis; padded i get 0."""
    n = theta.shape[-1]
    valid = torch.ones_like(theta, dtype=torch.bool) if mask is None else mask.expand_as(theta)
    out = torch.zeros_like(theta)
    for i in range(n):
        for j in range(n):
            if causal and j > i:
                continue
            term = sum(torch.sin(m * (theta[..., j] - theta[..., i]) - phase_lag) for m in harmonics)
            out[..., i] += torch.where(valid[..., j], term, torch.zeros_like(term))
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    count = (valid[..., None, :] & allowed).sum(-1).clamp_min(1)  # (..., i)
    return strength * torch.where(valid, out / count, torch.zeros_like(out))


def naive_weighted(theta, weights, phase_lag):
    """Σ_j A_ij sin(θ_j − θ_i − α) along the last axis, pairwise."""
    diff = theta[..., None, :] - theta[..., :, None]  # (..., i, j)
    return (weights * torch.sin(diff - phase_lag)).sum(-1)


def random_phases(generator, *shape):
    return (torch.rand(*shape, generator=generator, dtype=torch.float64) - 0.5) * 4 * math.pi


# ---------- mean-field identity ----------


@settings(max_examples=40)
@given(gen=generators, n=st.integers(1, 9), phase_lag=st.floats(-math.pi, math.pi),
       harmonics=st.sampled_from([(1,), (2,), (1, 2), (1, 3, 4)]), causal=st.booleans(),
       strength=st.floats(-3, 3), masked=st.booleans())
def test_mean_field_equals_pairwise_sum(gen, n, phase_lag, harmonics, causal, strength, masked):
    theta = random_phases(gen, 3, n)
    mask = torch.rand(3, n, generator=gen) > 0.3 if masked else None
    coupling = MeanFieldCoupling(strength, phase_lag=phase_lag, harmonics=harmonics, causal=causal)
    got = coupling(theta, mask=mask)
    expected = naive_mean_field(theta, strength, phase_lag, harmonics, causal, mask)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_mean_field_along_tokens_with_broadcast_mask(causal):
    """(b, h, t, n) coupled along t (dim=-2), a (b, 1, t, 1) padding mask, per-head strengths."""
    gen = torch.Generator().manual_seed(0)
    theta = random_phases(gen, 2, 3, 7, 4)
    mask = torch.rand(2, 1, 7, 1, generator=gen) > 0.4
    strength = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64).view(3, 1, 1)
    coupling = MeanFieldCoupling(strength, phase_lag=0.2, dim=-2, causal=causal)
    got = coupling(theta, mask=mask)
    expected = naive_mean_field(theta.transpose(-1, -2), strength.view(3, 1, 1), 0.2, (1,), causal,
                                mask.transpose(-1, -2)).transpose(-1, -2)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    poisoned = torch.where(mask, theta, float("nan"))  # whatever padding holds never reaches valid elements
    torch.testing.assert_close(coupling(poisoned, mask=mask), got, atol=0, rtol=0)



@pytest.mark.parametrize("causal", [False, True])
def test_mean_field_along_tokens_without_mask(causal):
    """(b, h, t, n) coupled along t (dim=-2) with no mask: each token's mean counts the t (or i + 1)
    tokens of its own channel, not the n channels (t != n here)."""
    gen = torch.Generator().manual_seed(9)
    theta = random_phases(gen, 2, 3, 7, 4)
    coupling = MeanFieldCoupling(1.5, phase_lag=0.2, harmonics=(1, 2), dim=-2, causal=causal)
    expected = naive_mean_field(theta.transpose(-1, -2), 1.5, 0.2, (1, 2), causal).transpose(-1, -2)
    torch.testing.assert_close(coupling(theta), expected, atol=1e-10, rtol=0)

def test_causal_mean_field_ignores_the_future():
    gen = torch.Generator().manual_seed(1)
    theta = random_phases(gen, 2, 10)
    changed = theta.clone()
    changed[:, 6:] = random_phases(gen, 2, 4)
    coupling = MeanFieldCoupling(causal=True, harmonics=(1, 2), phase_lag=0.4)
    before, after = coupling(theta), coupling(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6], atol=0, rtol=0)
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_padded_elements_neither_pull_nor_are_pulled():
    gen = torch.Generator().manual_seed(2)
    theta = random_phases(gen, 8)
    mask = torch.tensor([True, False, True, True, False, True, True, True])
    changed = theta.clone()
    changed[~mask] += 1.234  # padded values must not matter
    for causal in (False, True):
        coupling = MeanFieldCoupling(causal=causal)
        out, out_changed = coupling(theta, mask=mask), coupling(changed, mask=mask)
        torch.testing.assert_close(out[mask], out_changed[mask], atol=1e-12, rtol=0)
        assert (out[~mask] == 0).all()


def test_graph_coupling_equals_pairwise_sum_and_mean_field():
    gen = torch.Generator().manual_seed(3)
    theta = random_phases(gen, 4, 6)
    weights = torch.randn(6, 6, generator=gen, dtype=torch.float64)  # signed: repulsive edges too
    assert (weights < 0).any() and (weights > 0).any()
    got = GraphCoupling(weights, strength=1.5, phase_lag=-0.7)(theta)
    torch.testing.assert_close(got, 1.5 * naive_weighted(theta, weights, -0.7), atol=1e-10, rtol=0)
    torch.testing.assert_close(AttentionCoupling(phase_lag=-0.7, dim=-1)(theta, weights),
                               naive_weighted(theta, weights, -0.7), atol=1e-10, rtol=0)
    all_to_all = GraphCoupling(torch.ones(6, 6, dtype=torch.float64) / 6, phase_lag=0.3)(theta)
    torch.testing.assert_close(all_to_all, MeanFieldCoupling(phase_lag=0.3)(theta), atol=1e-12, rtol=0)



def test_weights_of_another_dtype_act_in_the_phases_dtype():
    # e.g. a float32 adjacency (or attention weights) on float64 phases: the result is float64, computed
    # from the weights cast once, as with float64 weights
    gen = torch.Generator().manual_seed(4)
    theta = random_phases(gen, 3, 5)
    weights = torch.rand(5, 5, generator=gen)
    expected = naive_weighted(theta, weights.double(), 0.2)
    for got in (GraphCoupling(weights, phase_lag=0.2)(theta), AttentionCoupling(phase_lag=0.2, dim=-1)(theta, weights)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)

def test_a_strength_of_another_dtype_acts_in_the_phases_dtype():
    # per-head float64 strengths on float32 phases: the term stays float32 (integrate refuses a field
    # that changes the state's dtype), as it does for a 0-d strength
    gen = torch.Generator().manual_seed(10)
    theta = random_phases(gen, 2, 3, 5).float()
    strength = torch.tensor([0.5, 1.0, -2.0], dtype=torch.float64).view(3, 1)
    got = MeanFieldCoupling(strength)(theta)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (strength * MeanFieldCoupling()(theta.double())).float())


@settings(max_examples=25)
@given(gen=generators, t=st.integers(1, 8), n=st.integers(1, 5), phase_lag=st.floats(-3, 3))
def test_attention_coupling_equals_pairwise_sum_per_channel(gen, t, n, phase_lag):
    """(b, h, t, n) phases coupled along t with per-(b, h) weights (b, h, t, t)."""
    theta = random_phases(gen, 2, 3, t, n)
    weights = torch.softmax(torch.randn(2, 3, t, t, generator=gen, dtype=torch.float64), -1)
    got = AttentionCoupling(strength=0.8, phase_lag=phase_lag)(theta, weights)
    # channel k of token i: Σ_j A_ij sin(θ_jk − θ_ik − α)
    expected = naive_weighted(theta.transpose(-1, -2), weights[:, :, None], phase_lag).transpose(-1, -2)
    torch.testing.assert_close(got, 0.8 * expected, atol=1e-10, rtol=0)


def test_causal_attention_weights_give_causal_coupling():
    gen = torch.Generator().manual_seed(4)
    theta = random_phases(gen, 1, 2, 6, 3)
    scores = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    weights = torch.softmax(scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf), -1)
    changed = theta.clone()
    changed[:, :, 4:] += 1.0
    coupling = AttentionCoupling()
    torch.testing.assert_close(coupling(theta, weights)[:, :, :4], coupling(changed, weights)[:, :, :4],
                               atol=1e-12, rtol=0)
    assert not torch.allclose(coupling(theta, weights)[:, :, 4:], coupling(changed, weights)[:, :, 4:])  # it did reach



@pytest.mark.parametrize("shape", [(0, 3, 5, 4), (2, 3, 5, 0)], ids=["empty_batch", "no_channels"])
def test_couplings_of_an_empty_batch_or_no_channels_are_empty(shape):
    # nothing to couple is an empty term of theta's shape (a reshape to (*, n, -1) cannot infer the
    # channel count of an empty tensor)
    theta = torch.zeros(shape)
    weights = torch.ones(*shape[:2], 5, 5)
    for got in (AttentionCoupling()(theta, weights), GraphCoupling(torch.ones(5, 5), dim=-2)(theta),
                MeanFieldCoupling(dim=-2, causal=True)(theta)):
        assert got.shape == shape

# ---------- properties of the coupling term ----------


@settings(max_examples=30)
@given(gen=generators, shift=st.floats(-10, 10), k=st.integers(-3, 3), causal=st.booleans())
def test_gauge_and_periodicity(gen, shift, k, causal):
    """Coupling depends on differences only (θ + c), and is 2π-periodic in every phase."""
    theta = random_phases(gen, 2, 7)
    coupling = MeanFieldCoupling(phase_lag=0.5, harmonics=(1, 2), causal=causal)
    base = coupling(theta)
    torch.testing.assert_close(coupling(theta + shift), base, atol=1e-9, rtol=0)
    wrapped = theta.clone()
    wrapped[:, 3] += 2 * math.pi * k
    torch.testing.assert_close(coupling(wrapped), base, atol=1e-9, rtol=0)


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(5)
    theta = random_phases(gen, 3, 9)
    perm = torch.randperm(9, generator=gen)
    weights = torch.rand(9, 9, generator=gen, dtype=torch.float64)
    mean_field = MeanFieldCoupling(phase_lag=0.2, harmonics=(1, 3))
    torch.testing.assert_close(mean_field(theta[:, perm]), mean_field(theta)[:, perm], atol=1e-12, rtol=0)
    permuted_graph = GraphCoupling(weights[perm][:, perm])
    torch.testing.assert_close(permuted_graph(theta[:, perm]), GraphCoupling(weights)(theta)[:, perm],
                               atol=1e-12, rtol=0)


def test_attractive_sign_pulls_towards_the_others():
    """K > 0 moves a lagging oscillator forward (towards the mean), K < 0 pushes it away."""
    theta = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert MeanFieldCoupling(1.0)(theta)[0] > 0
    assert MeanFieldCoupling(-1.0)(theta)[0] < 0


# ---------- strength, learnability, gradients ----------


def test_learnable_strength_is_a_parameter_and_gets_gradients():
    coupling = MeanFieldCoupling(strength=torch.ones(2, 1), learnable=True)
    assert [name for name, _ in coupling.named_parameters()] == ["strength"]
    theta = random_phases(torch.Generator().manual_seed(6), 2, 5)
    coupling(theta.float()).square().sum().backward()
    assert coupling.strength.grad is not None and torch.isfinite(coupling.strength.grad).all()
    assert coupling.strength.grad.abs().sum() > 0
    assert list(MeanFieldCoupling(2.0).parameters()) == []  # fixed strength is a buffer
    # a learnable number is a parameter of the default dtype (the buffer keeps the number's float64)
    assert MeanFieldCoupling(2.0, learnable=True).strength.dtype == torch.get_default_dtype()
    # a floating tensor keeps its dtype, as nn.Parameter(tensor) does: float64 was rounded to float32
    exact = torch.tensor(1.3, dtype=torch.float64)
    assert MeanFieldCoupling(exact, learnable=True).strength.dtype == torch.float64
    assert MeanFieldCoupling(exact, learnable=True).strength.item() == 1.3
    assert MeanFieldCoupling(torch.tensor(2), learnable=True).strength.dtype == torch.get_default_dtype()
    shared = torch.nn.Parameter(torch.tensor(0.5))
    assert MeanFieldCoupling(shared).strength is shared and GraphCoupling(torch.eye(2), shared).strength is shared
    assert "strength" in MeanFieldCoupling(2.0).state_dict()


@pytest.mark.parametrize("name", ["mean_field", "causal_mean_field", "graph", "attention"])
def test_gradcheck(name):
    gen = torch.Generator().manual_seed(7)
    theta = random_phases(gen, 2, 5).requires_grad_()
    weights = torch.rand(5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    strength = torch.tensor(1.3, dtype=torch.float64)
    if name == "mean_field":
        coupling = MeanFieldCoupling(strength, phase_lag=0.3, harmonics=(1, 2), learnable=True)
        call = lambda th, k: torch.func.functional_call(coupling, {"strength": k}, (th,))  # noqa: E731
        assert torch.autograd.gradcheck(call, (theta, strength.clone().requires_grad_()))
    elif name == "causal_mean_field":
        coupling = MeanFieldCoupling(strength, phase_lag=0.3, causal=True, learnable=True)
        mask = torch.tensor([True, True, False, True, True])
        assert torch.autograd.gradcheck(lambda th: coupling(th, mask=mask), (theta,))
    elif name == "graph":
        graph = GraphCoupling(weights.detach(), phase_lag=0.3)  # a fixed graph: gradients reach θ
        assert torch.autograd.gradcheck(graph, (theta,))
    else:
        assert torch.autograd.gradcheck(lambda th, w: AttentionCoupling(phase_lag=0.3, dim=-1)(th, w),
                                        (theta, weights))


# ---------- extension point ----------


def test_a_user_coupling_needs_one_method():
    class NearestNeighbour(Coupling):
        def interaction(self, theta):
            return torch.sin(theta.roll(1, -1) - theta - self.phase_lag)

    theta = random_phases(torch.Generator().manual_seed(8), 6)
    got = NearestNeighbour(strength=2.0, phase_lag=0.1)(theta)
    torch.testing.assert_close(got, 2.0 * torch.sin(theta.roll(1, -1) - theta - 0.1))
    with pytest.raises(NotImplementedError, match="interaction"):
        Coupling()(theta)


def test_a_list_of_strengths_acts_and_resets_as_the_same_tensor():
    # a list went through the tensor checks, then float(list) raised a bare TypeError
    theta = torch.randn(2, 5, 3, dtype=torch.float64)
    from_list = MeanFieldCoupling(strength=[0.5, 2.0, -1.0], learnable=True)
    from_tensor = MeanFieldCoupling(strength=torch.tensor([0.5, 2.0, -1.0]), learnable=True)
    torch.testing.assert_close(from_list(theta), from_tensor(theta))
    with torch.no_grad():
        from_list.strength.zero_()
    from_list.reset_parameters()
    assert from_list.strength.tolist() == [0.5, 2.0, -1.0]
    # as a buffer, a list keeps its digits in float64 as a Python number does (it was float32)
    assert MeanFieldCoupling(strength=[0.1, 0.2]).strength.dtype == MeanFieldCoupling(strength=0.1).strength.dtype
    assert MeanFieldCoupling(strength=[0.1, 0.2]).strength.tolist() == [0.1, 0.2]
    array = np.array([0.1, 0.2])  # copied: the caller's array changed later changes neither value nor reset
    from_array = MeanFieldCoupling(strength=array)
    array[0] = 9.0
    from_array.reset_parameters()
    assert from_array.strength.tolist() == [0.1, 0.2]


# ---------- bad input ----------


@pytest.mark.parametrize("make, match", [
    (lambda: MeanFieldCoupling(strength=float("nan")), "strength"),
    (lambda: MeanFieldCoupling(strength=float("inf")), "strength"),
    (lambda: MeanFieldCoupling(strength="strong"), "strength"),
    (lambda: MeanFieldCoupling(strength=2j), "^strength: expected real values"),  # was cast to 0
    (lambda: MeanFieldCoupling(strength=10**400), "^strength: expected finite"),  # was a bare OverflowError
    (lambda: MeanFieldCoupling(strength=[1.0, 10**400]), "^strength: expected finite"),
    (lambda: MeanFieldCoupling(strength=[]), "^strength: expected at least one value"),  # a bare TypeError
    (lambda: GraphCoupling(torch.ones(0, 0)), "^weights: expected at least one value"),
    # True is refused as a strength, so [True] is too (it read as 1.0)
    (lambda: MeanFieldCoupling(strength=[True]), "^strength: expected real values but got booleans"),
    (lambda: MeanFieldCoupling(strength=torch.tensor([True, False])), "^strength: expected real values"),
    (lambda: MeanFieldCoupling(strength=np.array(True)), "^strength: expected real values"),
    (lambda: MeanFieldCoupling(phase_lag=10**400), "^phase_lag: expected a finite"),
    (lambda: GraphCoupling(torch.ones(2, 2, dtype=torch.complex64)), "^weights: expected real values"),
    (lambda: MeanFieldCoupling(phase_lag=float("nan")), "phase_lag"),
    (lambda: MeanFieldCoupling(harmonics=()), "harmonics"),
    (lambda: MeanFieldCoupling(harmonics=(1, 0)), "harmonics"),
    (lambda: MeanFieldCoupling(dim=1.5), "dim"),
    (lambda: GraphCoupling(torch.ones(3, 4)), "weights"),
    (lambda: GraphCoupling(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "weights"),
    (lambda: MeanFieldCoupling(causal="False"), "^causal:"),
    (lambda: MeanFieldCoupling(learnable="no"), "^learnable:"),
    (lambda: GraphCoupling(torch.ones(3, 3), learnable=1), "^learnable:"),
    (lambda: AttentionCoupling(learnable="False"), "^learnable:"),
    (lambda: MeanFieldCoupling(strength=torch.nn.Parameter(torch.ones(())), learnable="no"), "^learnable:"),
])
def test_bad_construction_names_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_boolean_adjacency_is_the_graph_of_its_zeros_and_ones():
    adjacency = [[False, True, True], [True, False, False], [True, False, False]]
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    for weights in (adjacency, torch.tensor(adjacency), np.array(adjacency)):
        expected = GraphCoupling(torch.tensor(adjacency, dtype=torch.float64))(theta)
        torch.testing.assert_close(GraphCoupling(weights)(theta), expected, rtol=1e-6, atol=0)


def test_interaction_of_another_shape_is_an_error_even_where_it_broadcasts():
    """A subclass returning ``(*, 1)`` would pass silently through ``ω + coupling(θ)`` and integrate."""
    class MeanPull(Coupling):
        def interaction(self, theta):
            return torch.sin(theta).mean(-1, keepdim=True)  # the bug: one value per row

    with pytest.raises(ValueError, match=r"^interaction: MeanPull.interaction returned \(2, 1\), expected"):
        MeanPull()(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="^interaction:"):
        integrate(KuramotoField(torch.zeros(3), MeanPull()), torch.rand(2, 3), dt=0.1, steps=2)


class _Float64Pull(Coupling):
    """A scheme whose term comes out in float64 whatever θ's dtype (a float64 constant of its own)."""

    def interaction(self, theta):
        return torch.sin(theta).double() * torch.ones((), dtype=torch.float64)


def test_the_term_has_the_phases_dtype_even_where_the_scheme_promotes_it():
    """In θ's dtype: a float64 term made ω + term, and so every later step, float64 (and the
    layer's phases and output with it) without a word."""
    theta = torch.rand(2, 3)
    term = _Float64Pull(strength=0.5)(theta)
    assert term.dtype == torch.float32
    torch.testing.assert_close(term, 0.5 * torch.sin(theta))
    phases = integrate(KuramotoField(torch.zeros(3), _Float64Pull()), theta, dt=0.1, steps=2)
    assert phases.dtype == torch.float32


def test_graph_coupling_trains_a_parameter_adjacency_and_copies_a_plain_tensor():
    adjacency = torch.nn.Parameter(torch.rand(4, 4))
    coupling = GraphCoupling(adjacency)
    assert dict(coupling.named_parameters()) == {"weights": adjacency}
    coupling(torch.rand(2, 4)).pow(2).sum().backward()
    assert adjacency.grad is not None and adjacency.grad.abs().sum() > 0  # was detached: None
    plain = torch.rand(4, 4, requires_grad=True)
    copied = GraphCoupling(plain)
    assert "weights" in dict(copied.named_buffers()) and not copied.weights.requires_grad


def test_a_plain_strength_or_adjacency_is_copied_not_aliased():
    """The documented copy: changing the caller's tensor afterwards leaves the coupling as built."""
    strength, adjacency = torch.ones(2, 1), torch.ones(3, 3)
    mean_field, graph = MeanFieldCoupling(strength), GraphCoupling(adjacency)
    theta = random_phases(torch.Generator().manual_seed(11), 2, 3).float()
    before = mean_field(theta), graph(theta)
    strength.mul_(5.0)
    adjacency.zero_()
    torch.testing.assert_close((mean_field(theta), graph(theta)), before, atol=0, rtol=0)


def test_couplings_and_field_build_on_the_meta_device():
    """Deferred initialisation (``with torch.device("meta")``): the finiteness checks read no values there."""
    with torch.device("meta"):
        modules = [MeanFieldCoupling(1.5), GraphCoupling(torch.ones(3, 3)), AttentionCoupling(learnable=True),
                   KuramotoField(torch.zeros(3), MeanFieldCoupling())]
    assert all(t.device.type == "meta" for m in modules for t in [*m.parameters(), *m.buffers()])
    assert "strength=<meta ()>" in repr(modules[0])  # printing reads no value either


def test_repr_prints_a_scalar_strength_and_the_shape_of_others():
    assert "MeanFieldCoupling(strength=2.5, phase_lag=0.3," in repr(MeanFieldCoupling(2.5, phase_lag=0.3))
    assert "strength=(3, 1, 1)," in repr(MeanFieldCoupling(torch.ones(3, 1, 1)))
    # and the axis each couples along (the graph: its shape)
    assert repr(GraphCoupling(torch.ones(4, 4), dim=-2)) == (
        "GraphCoupling(strength=1.0, phase_lag=0, weights=(4, 4), dim=-2)")
    assert repr(AttentionCoupling(phase_lag=0.5, dim=-3)) == "AttentionCoupling(strength=1.0, phase_lag=0.5, dim=-3)"


@pytest.mark.parametrize("harmonics", [1, 1.0, None, "12", (), {1: 1}])
def test_bad_harmonics_name_the_argument(harmonics):
    with pytest.raises(ValueError, match="^harmonics: expected a non-empty sequence of integers"):
        MeanFieldCoupling(harmonics=harmonics)


@pytest.mark.parametrize("dtype, m, scale", [(torch.float16, 1000, 100.0), (torch.bfloat16, 3, 100.0)])
def test_a_harmonic_of_half_precision_phases_is_taken_in_float32(dtype, m, scale):
    # m·θ was computed in θ's dtype: inf in float16 past 65504 (NaN terms), steps of 2 rad in bfloat16 at 300
    theta = (scale * torch.rand(2, 6, generator=torch.Generator().manual_seed(0))).to(dtype)
    got = MeanFieldCoupling(harmonics=(m,), causal=True)(theta)
    expected = naive_mean_field(theta.double(), 1.0, 0.0, (m,), causal=True)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=0.03)


def test_a_harmonic_past_int64_is_taken_and_one_past_float32_is_refused():
    # m = 2**66 was an OverflowError at the first forward; equal phases feel no pull at any harmonic
    pull = MeanFieldCoupling(harmonics=(1, 2 ** 66))(torch.full((2, 5), 0.7))
    assert torch.isfinite(pull).all() and pull.abs().max() < 1e-5
    with pytest.raises(ValueError, match="^harmonics: expected integers at most"):
        MeanFieldCoupling(harmonics=(1, 2 ** 128))  # m·θ would be inf in float32


def test_numpy_bools_are_accepted_as_flags():
    coupling = MeanFieldCoupling(causal=np.bool_(True), learnable=np.bool_(True))
    assert coupling.causal is True and isinstance(coupling.strength, torch.nn.Parameter)


@pytest.mark.parametrize("call, match", [
    (lambda th: MeanFieldCoupling(strength=torch.ones(3))(th), "strength"),
    (lambda th: MeanFieldCoupling(dim=2)(th), "dim"),
    (lambda th: MeanFieldCoupling()(th, mask=torch.ones(2, 4)), "mask"),
    (lambda th: MeanFieldCoupling()(th, mask=torch.ones(3, 5, dtype=torch.bool)), "mask"),
    (lambda th: GraphCoupling(torch.ones(3, 3))(th), "weights"),
    (lambda th: AttentionCoupling(dim=-1)(th, torch.ones(5, 5)), "weights"),
    (lambda th: AttentionCoupling(dim=-1)(th, torch.ones(3, 4, 4)), "weights"),
    (lambda th: MeanFieldCoupling()(th.long()), "theta"),
    (lambda th: weighted_sine_coupling(th, torch.ones(4, 4), torch.tensor(0.3)), "phase_lag: expected a real"),
    (lambda th: weighted_sine_coupling(th, torch.ones(4, 4).tolist()), "weights: expected a tensor"),
    (lambda th: GraphCoupling(torch.ones(4, 4))(th.to("meta")), "^theta: expected a tensor on the coupling's device"),
    (lambda th: MeanFieldCoupling(torch.ones(4))(th.to("meta")), "^theta: expected a tensor on the coupling's device"),
    # a learnable strength or adjacency is a parameter, not a buffer: checked the same
    (lambda th: MeanFieldCoupling(torch.ones(4), learnable=True)(th.to("meta")),
     "^theta: expected a tensor on the coupling's device"),
    (lambda th: GraphCoupling(torch.nn.Parameter(torch.ones(4, 4)))(th.to("meta")),
     "^theta: expected a tensor on the coupling's device"),
    # a 0-d strength combines with θ on any device only from the CPU (one moved to a GPU does not)
    (lambda th: MeanFieldCoupling(2.0).to("meta")(th), "^theta: expected a tensor on the coupling's device meta"),
    # per-call masks and weights on another device than θ: was a bare device error
    (lambda th: MeanFieldCoupling()(th.to("meta"), mask=torch.ones(4, dtype=torch.bool)),
     "^mask: expected a tensor on theta's device meta but got cpu"),
    (lambda th: AttentionCoupling(dim=-1)(th.to("meta"), torch.ones(4, 4)),
     "^weights: expected a tensor on theta's device meta but got cpu"),
    (lambda th: KuramotoField(torch.zeros(4))(th.to("meta")), "^theta: expected a tensor on the field's device cpu"),
])
def test_bad_call_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(2, 4))


@pytest.mark.parametrize("half", ["float16 phases", "float16 autocast"])
def test_weighted_sums_past_65504_do_not_overflow_in_half_precision(half):
    # Σ_j A_ij e^{iθ_j} reaches 10^5 here while the term, Σ_j A_ij sin(θ_j − θ_i − α), stays within float16's
    # range: the products ran in float16 (of the phases, or autocast's on float32 phases) and gave inf
    n = 1000
    weights = 100.0 * torch.tril(torch.ones(n, n))
    theta = (0.5 + 0.2 * torch.rand(n, 2, generator=torch.Generator().manual_seed(0))).half().float()  # float16's
    expected = naive_weighted(theta.double().T, weights.double(), 0.3).T  # channels first for the reference
    assert expected.abs().max() < 6e4
    if half == "float16 phases":
        got = GraphCoupling(weights, phase_lag=0.3, dim=0)(theta.half())
        assert got.dtype == torch.float16
    else:
        with torch.autocast("cpu", dtype=torch.float16):
            got = GraphCoupling(weights, phase_lag=0.3, dim=0)(theta)
        assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=0)


@pytest.mark.parametrize("causal, masked", [(False, False), (False, True), (True, False), (True, True)])
def test_mean_field_of_many_half_precision_phases_does_not_overflow(causal, masked):
    # the sums (and the causal counts) ran in float16: past 65504 elements inf, and the term NaN or inf
    n = 70_000
    theta = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.bool) if masked else None
    coupling = MeanFieldCoupling(causal=causal)
    expected = coupling(theta, mask)
    got = coupling(theta.half(), None if mask is None else mask)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.double() - expected).abs().max() < 5e-3


@pytest.mark.parametrize("learnable", [False, True])
def test_reset_parameters_restores_the_strength_it_was_built_with(learnable):
    """After to_empty on a coupling built on meta (as FSDP and Fabric materialize modules), and after training:
    the number it was built with, in the strength's own dtype."""
    with torch.device("meta"):
        empty = MeanFieldCoupling(strength=0.7, learnable=learnable)
    empty.to_empty(device="cpu")
    empty.reset_parameters()
    built = MeanFieldCoupling(strength=0.7, learnable=learnable)
    assert empty.strength.dtype == built.strength.dtype and torch.equal(empty.strength, built.strength)

    per_head = torch.tensor([0.5, -1.25], dtype=torch.float64).view(2, 1, 1)
    trained = AttentionCoupling(strength=per_head, learnable=learnable)
    with torch.no_grad():
        trained.strength.add_(0.25)  # as training (or a load into the buffer) would
    assert torch.equal(trained._initial_strength, per_head)  # the copy kept apart from the live tensor
    trained.reset_parameters()
    assert trained.strength.dtype == torch.float64 and torch.equal(trained.strength, per_head)


def test_reset_parameters_restores_a_shared_parameter_in_place():
    shared = torch.nn.Parameter(torch.tensor(0.3))
    couplings = [MeanFieldCoupling(strength=shared), MeanFieldCoupling(strength=shared, dim=-2)]
    with torch.no_grad():
        shared.mul_(4.0)
    couplings[0].reset_parameters()
    assert couplings[1].strength is shared and shared.item() == pytest.approx(0.3)


def test_reset_parameters_refuses_what_it_cannot_restore():
    with torch.device("meta"):
        from_tensor = MeanFieldCoupling(strength=torch.full((2, 1, 1), 0.5))
        graph = GraphCoupling(torch.eye(3))
    with pytest.raises(RuntimeError, match="^strength: MeanFieldCoupling was built from a tensor on the meta device"):
        from_tensor.to_empty(device="cpu").reset_parameters()
    # the graph is the caller's: resetting only the strength would leave to_empty's memory in the weights
    with pytest.raises(RuntimeError, match="^weights: GraphCoupling cannot reset its weights"):
        graph.to_empty(device="cpu").reset_parameters()
    with pytest.raises(RuntimeError, match="^weights: GraphCoupling cannot reset its weights"):
        GraphCoupling(torch.eye(3)).reset_parameters()


def test_flipped_numpy_arrays_are_accepted_as_their_values():
    """A NumPy view with negative strides (``a[::-1]``, ``np.flipud``) is an array like any other; torch.as_tensor
    refuses it, and the refusal was reworded as "expected a number or tensor"."""
    adjacency = np.arange(9.0).reshape(3, 3)
    assert GraphCoupling(np.flipud(adjacency)).weights.tolist() == np.flipud(adjacency).tolist()
    strength = np.array([1.0, 2.0])[::-1]
    coupling = MeanFieldCoupling(strength)
    assert coupling.strength.tolist() == [2.0, 1.0] and coupling._initial_strength.tolist() == [2.0, 1.0]
    assert KuramotoField(np.array([1.0, 2.0, 3.0])[::-1]).omega.tolist() == [3.0, 2.0, 1.0]


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(2), np.array(0.5)])
def test_numpy_scalars_and_0d_arrays_stay_0d(value):
    """Made contiguous for the flipped-view case above, a NumPy scalar or 0-d array became shape (1,): its
    state_dict did not load into a coupling made from a Python number, and 0-d phases were refused."""
    coupling = MeanFieldCoupling(strength=value)
    assert coupling.strength.shape == () and coupling.strength.item() == float(value)
    coupling.load_state_dict(MeanFieldCoupling(strength=float(value)).state_dict())
    if not np.issubdtype(np.asarray(value).dtype, np.floating):  # ω is refused unless floating-point
        return
    field = KuramotoField(value)
    assert field.omega.shape == () and field.omega.item() == float(value)
    theta = integrate(KuramotoField(value), torch.tensor(0.0, dtype=torch.float64), dt=0.1, steps=2)
    assert theta.shape == () and theta.item() == pytest.approx(0.2 * float(value))


def test_a_strength_or_omega_that_would_enlarge_the_phases_is_refused():
    # a length-1 axis of θ does not take a longer one of the strength or ω: the term would have another shape than θ
    theta = torch.zeros(1, 5, dtype=torch.float64)
    for strength in (torch.ones(3, 1, dtype=torch.float64), torch.ones(2, 1, 5, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"^strength: expected a shape that broadcasts to theta's \(1, 5\) "):
            MeanFieldCoupling(strength=strength)(theta)
    with pytest.raises(ValueError, match=r"^omega: expected a shape that broadcasts to theta's \(1, 5\) "):
        KuramotoField(torch.zeros(3, 5, dtype=torch.float64), MeanFieldCoupling())(theta)
    assert MeanFieldCoupling(strength=torch.ones(1, 1, dtype=torch.float64))(theta).shape == (1, 5)
