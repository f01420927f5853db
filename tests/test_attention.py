"""KuramotoAttention against a naive O(t²·n) float64 reference, causality, cache and properties."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kuramoto_attn import (AttentionCoupling, Coupling, GraphCoupling, KuramotoAttention, KuramotoCache,
                           MeanFieldCoupling, PhaseGPTAttention, weighted_sine_coupling)

from helpers import (assert_reset_gives_constructor_values, built_where_freed, dynamo_traces_func_transform_check,
                     generators, materialize_like_fabric, repr_arguments)

INTEGRATORS = ("euler", "heun", "rk4")
COUPLINGS = ("mean_field", "attention")


def make_layer(seed=0, dtype=torch.float64, **kwargs):
    torch.manual_seed(seed)
    options = dict(d_model=16, num_heads=2, num_oscillators=3, steps=3, dt=0.2, phase_lag=0.3)
    options.update(kwargs)
    layer = KuramotoAttention(**options).to(dtype).eval()
    with torch.no_grad():  # non-trivial β and K per head, so a wrong broadcast shows
        layer.beta.copy_(torch.tensor([0.7, -1.3])[: layer.num_heads])
        if isinstance(layer.strength, torch.nn.Parameter):
            layer.strength.copy_(torch.tensor([1.5, 0.8])[: layer.num_heads].view(-1, 1, 1))
    return layer


def left_padding(b, t, gen):
    """Valid tokens at the end of each row; at least one valid token per row."""
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    return torch.arange(t)[None, :] >= (t - lengths)[:, None]


# ------------------------------------------------------------------ naive reference (float64)
def naive_step(method, field, theta, dt):
    if method == "euler":
        return theta + dt * field(theta)
    if method == "heun":
        k1 = field(theta)
        return theta + dt / 2 * (k1 + field(theta + dt * k1))
    k1 = field(theta)
    k2 = field(theta + dt / 2 * k1)
    k3 = field(theta + dt / 2 * k2)
    k4 = field(theta + dt * k3)
    return theta + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def naive_forward(layer, x, valid=None, pair_term=None):
    """Every quantity from its definition, with (b, h, t, t, n) pairwise tensors and an explicit softmax.

    ``pair_term(diff)``: the coupling's term of each pair, ``diff[b, h, i, j, k] = θ_jk − θ_ik``, averaged
    over the tokens ``j`` token ``i`` sees (a coupling module along the tokens); default ``sin(diff − α)``."""
    b, t, _ = x.shape
    h, n, d = layer.num_heads, layer.num_oscillators, layer.head_dim
    valid = torch.ones(b, t, dtype=torch.bool) if valid is None else valid
    q, k, v = (z.view(b, t, h, d).transpose(1, 2) for z in layer.qkv(x).split(layer.d_model, dim=-1))
    theta = (math.pi * torch.tanh(layer.phase_proj(x))).view(b, t, h, n).transpose(1, 2)
    omega, K, beta, alpha = layer.omega.view(h, 1, n), layer.strength, layer.beta.view(h, 1, 1), layer.phase_lag
    i, j = torch.arange(t).view(t, 1), torch.arange(t).view(1, t)
    allowed = (j <= i) if layer.causal else torch.ones(t, t, dtype=torch.bool)
    allowed = allowed & valid[:, None, None, :]  # (b, 1, t, t)

    def attention_weights(th):
        diff = th[:, :, None, :, :] - th[:, :, :, None, :]  # [b, h, i, j, k] = θ_jk − θ_ik
        logits = q @ k.transpose(-1, -2) / math.sqrt(d) + beta * torch.cos(diff).mean(-1)
        logits = logits.masked_fill(~(allowed | (i == j)), -math.inf)
        return torch.softmax(logits, dim=-1)

    def field(th):
        diff = th[:, :, None, :, :] - th[:, :, :, None, :]  # [b, h, i, j, k]
        sines = torch.sin(diff - alpha) if pair_term is None else pair_term(diff)
        if layer.coupling == "attention":
            weights = attention_weights(th)
        else:
            weights = allowed.double() / allowed.sum(-1, keepdim=True).clamp_min(1)
        pull = (weights[..., None] * sines).sum(-2) * valid[:, None, :, None]
        return omega + K * pull

    for _ in range(layer.steps):
        theta = naive_step(layer.integrator, field, theta, layer.dt)
    A = attention_weights(theta)
    out = torch.cat([A @ v, A @ torch.cos(theta), A @ torch.sin(theta)], dim=-1)
    return layer.out(out.transpose(1, 2).reshape(b, t, -1)), theta


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("padded", [False, True])
def test_matches_naive_reference(coupling, integrator, padded):
    gen = torch.Generator().manual_seed(hash((coupling, integrator, padded)) % 2**31)
    layer = make_layer(coupling=coupling, integrator=integrator)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 7, gen) if padded else None
    with torch.no_grad():
        y, info = layer(x, valid, return_info=True)
        y_ref, theta_ref = naive_forward(layer, x, valid)
    keep = slice(None) if valid is None else valid  # padded tokens' outputs are unspecified
    torch.testing.assert_close(y[keep], y_ref[keep], rtol=0, atol=1e-10)
    torch.testing.assert_close(info.phases, theta_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_non_causal_matches_naive_reference(coupling):
    gen = torch.Generator().manual_seed(5)
    layer = make_layer(coupling=coupling, causal=False, integrator="heun")
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    for valid in (None, left_padding(2, 6, gen)):
        with torch.no_grad():
            y, y_ref = layer(x, valid), naive_forward(layer, x, valid)[0]
        keep = slice(None) if valid is None else valid
        torch.testing.assert_close(y[keep], y_ref[keep], rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling, integrator", [("mean_field", "euler"), ("mean_field", "rk4"),
                                                  ("attention", "heun")])
@pytest.mark.parametrize("causal, padded", [(True, False), (True, True), (False, True)])
def test_gradients_match_autograd_of_naive_reference(coupling, integrator, causal, padded):
    """The checkpointed integration steps give the gradients of plain autograd on the naive layer."""
    gen = torch.Generator().manual_seed(21)
    layer = make_layer(coupling=coupling, integrator=integrator, causal=causal)
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = left_padding(2, 6, gen) if padded else None
    keep = torch.ones(2, 6, dtype=torch.bool) if valid is None else valid
    probe = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64) * keep[..., None]
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((layer(x, valid) * probe).sum(), params)
    grads_ref = torch.autograd.grad((naive_forward(layer, x, valid)[0] * probe).sum(), params)
    for (name, _), grad, grad_ref in zip([("x", x)] + list(layer.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-9, msg=name)


def test_layer_passes_gradcheck():
    layer = make_layer(integrator="euler", steps=2)
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[False, True, True, False, True]])
    assert torch.autograd.gradcheck(lambda inp: layer(inp, valid), (x,))


def test_grad_mode_path_matches_no_grad_path():
    """Training runs each step under a checkpoint; values and phases are the same."""
    gen = torch.Generator().manual_seed(2)
    for coupling in COUPLINGS:
        layer = make_layer(coupling=coupling, integrator="rk4")
        x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
        y = layer(x)
        with torch.no_grad():
            torch.testing.assert_close(y.detach(), layer(x), rtol=0, atol=1e-12)
        assert y.requires_grad


# ------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("coupling", COUPLINGS + ("module",))
@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("padded", [False, True])
@settings(max_examples=3)
@given(gen=generators, cut=st.integers(1, 7))
def test_future_tokens_never_change_the_past(coupling, integrator, padded, gen, cut):
    if coupling == "module":  # a causal mean field with a second harmonic, as a Coupling module
        layer = make_layer(coupling=harmonic_mean_field(), integrator=integrator, phase_lag=0.0)
    else:
        layer = make_layer(coupling=coupling, integrator=integrator)
    x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(2, 8, gen) if padded else None
    x2 = x.clone()
    x2[:, cut:] = torch.randn(2, 8 - cut, 16, generator=gen, dtype=torch.float64) * 3
    valid2 = None
    if padded:  # the future's padding may change too
        valid2 = valid.clone()
        valid2[:, cut:] = torch.rand(2, 8 - cut, generator=gen) < 0.5
    with torch.no_grad():
        y, info = layer(x, valid, return_info=True)
        y2, info2 = layer(x2, valid2, return_info=True)
    torch.testing.assert_close(y[:, :cut], y2[:, :cut], rtol=0, atol=1e-12)
    torch.testing.assert_close(info.phases[:, :, :cut], info2.phases[:, :, :cut], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, cut:], y2[:, cut:])  # the change did reach the layer


def test_non_causal_layer_leaks_the_future():
    """The reference's behaviour, an explicit opt-in: the check above would fail."""
    layer = make_layer(causal=False)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(layer(x)[:, 0], layer(x2)[:, 0])


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_padded_tokens_do_not_reach_valid_ones(coupling):
    gen = torch.Generator().manual_seed(9)
    layer = make_layer(coupling=coupling)
    x = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    valid = torch.rand(2, 7, generator=gen) < 0.6
    valid[:, 0] = True
    x2 = torch.where(valid[..., None], x, 5 * torch.randn(x.shape, generator=gen, dtype=torch.float64))
    with torch.no_grad():
        torch.testing.assert_close(layer(x, valid)[valid], layer(x2, valid)[valid], rtol=0, atol=1e-12)


def test_a_batch_of_padding_only_has_zero_coherence_loss():
    layer = make_layer(coherence_target=0.3)
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    _, info = layer(x, torch.zeros(2, 4, dtype=torch.bool), return_info=True)
    assert info.coherence_loss.item() == 0.0  # not the NaN mean of no values
    info.coherence_loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


# ----------------------------------------------------------------------------------- cache
#: the built-in couplings, a Coupling module along the tokens (causal, second harmonic, its own lag) and
#: one across the oscillators of each token (a ring: no mask, so not with padding)
CACHED = COUPLINGS + ("module", "ring")


def cache_layer(coupling, **kwargs):
    if coupling == "module":
        return make_layer(coupling=harmonic_mean_field(), phase_lag=0.0, **kwargs)
    if coupling == "ring":
        ring = torch.roll(torch.eye(3), 1, 0) + torch.roll(torch.eye(3), -1, 0)
        return make_layer(coupling=GraphCoupling(ring, strength=0.5), phase_lag=0.0, **kwargs)
    return make_layer(coupling=coupling, **kwargs)


@pytest.mark.parametrize("coupling", CACHED)
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_incremental_decoding_equals_full_forward(coupling, integrator):
    gen = torch.Generator().manual_seed(11)
    layer = cache_layer(coupling, integrator=integrator, dtype=torch.float32)
    x = torch.randn(2, 12, 16, generator=gen)
    with torch.no_grad():
        y_full, info_full = layer(x, return_info=True)
        cache = KuramotoCache()
        chunks = [layer(x[:, :4], cache=cache)]  # a prompt, then one token at a time, then a chunk
        chunks += [layer(x[:, i:i + 1], cache=cache) for i in range(4, 9)]
        y_last, info_last = layer(x[:, 9:], cache=cache, return_info=True)
    torch.testing.assert_close(torch.cat(chunks + [y_last], dim=1), y_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(info_last.phases, info_full.phases[:, :, 9:], rtol=0, atol=1e-5)
    assert cache.length == 12


@pytest.mark.parametrize("coupling", CACHED)
@settings(max_examples=4)
@given(sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6))
@example(sizes=[1, 2, 3])  # a chunk after a single cached token; a chunk of 2 after the cache (no padding:
@example(sizes=[3, 2, 1])  # each needs the dense causal mask, which SDPA's is_causal cannot express there)
def test_incremental_decoding_in_chunks_of_any_size(coupling, sizes):
    layer = cache_layer(coupling, integrator="heun")
    x = torch.randn(2, sum(sizes), 16, generator=torch.Generator().manual_seed(len(sizes)), dtype=torch.float64)
    with torch.no_grad():
        y_full, info_full = layer(x, return_info=True)
        cache, start, y, phases = KuramotoCache(), 0, [], []
        for size in sizes:
            out, info = layer(x[:, start:start + size], cache=cache, return_info=True)
            y.append(out)
            phases.append(info.phases)
            start += size
    torch.testing.assert_close(torch.cat(y, dim=1), y_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(phases, dim=2), info_full.phases, rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling", CACHED[:-1])
def test_incremental_decoding_with_padding(coupling):
    gen = torch.Generator().manual_seed(12)
    layer = cache_layer(coupling)
    x = torch.randn(3, 9, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 9, gen)
    with torch.no_grad():
        y_full = layer(x, valid)
        cache = KuramotoCache()
        y = [layer(x[:, :5], valid[:, :5], cache=cache)]
        y += [layer(x[:, i:i + 1], valid[:, i:i + 1], cache=cache) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(y, dim=1)[valid], y_full[valid], rtol=0, atol=1e-10)


def test_the_cache_keeps_a_copy_of_the_first_calls_padding_mask():
    """On the first call the cache took the caller's key_padding_mask itself: reused or edited by the caller
    afterwards, it changed what later tokens attend to and count in the mean field."""
    layer = cache_layer(CACHED[0])
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True, True, True], [True] * 6])
    with torch.no_grad():
        expected = layer(x, mask)[:, 5:]
        cache = KuramotoCache()
        layer(x[:, :5], mask[:, :5], cache=cache)
        mask.fill_(True)  # the caller reuses its mask tensor
        got = layer(x[:, 5:], cache=cache)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling, integrator", [("mean_field", "euler"), ("mean_field", "rk4"),
                                                  ("attention", "heun")])
def test_inference_mode_with_grad_enabled_runs_as_no_grad(coupling, integrator):
    """``torch.inference_mode()`` records no graph even under ``torch.enable_grad()`` (torch's own layers run
    there); the layer tried to keep phases and features for a backward and failed ("Inference tensors cannot be
    saved for backward")."""
    layer = make_layer(coupling=coupling, integrator=integrator)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode(), torch.enable_grad():
        got = layer(x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("coupling", CACHED[:-1])
def test_incremental_decoding_with_padding_after_an_unmasked_prompt(coupling):
    """A prompt given without a mask is all valid: calls after it with a padding mask still count it."""
    gen = torch.Generator().manual_seed(13)
    layer = cache_layer(coupling)
    x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, 5], valid[1, 6:] = False, False
    with torch.no_grad():
        y_full = layer(x, valid)
        cache = KuramotoCache()
        y = [layer(x[:, :4], cache=cache)]
        y += [layer(x[:, i:i + 1], valid[:, i:i + 1], cache=cache) for i in range(4, 6)]
        y.append(layer(x[:, 6:], valid[:, 6:], cache=cache))
    torch.testing.assert_close(torch.cat(y, dim=1)[valid], y_full[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling", CACHED[:-1])
def test_incremental_decoding_without_a_mask_after_a_padded_prompt(coupling):
    """Calls without a mask after a padded prompt: their tokens are valid, the prompt's padding still counts."""
    gen = torch.Generator().manual_seed(14)
    layer = cache_layer(coupling)
    x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[0, :2], valid[1, 3] = False, False
    with torch.no_grad():
        y_full = layer(x, valid)
        cache = KuramotoCache()
        y = [layer(x[:, :5], valid[:, :5], cache=cache)]
        y += [layer(x[:, i:i + 1], cache=cache) for i in range(5, 7)]
        y.append(layer(x[:, 7:], cache=cache))
    torch.testing.assert_close(torch.cat(y, dim=1)[valid], y_full[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("coupling", CACHED)
def test_a_backward_through_a_cached_call_reaches_its_new_tokens_and_stops_at_the_cached_ones(coupling):
    """As the KuramotoCache docstring says: the gradient into the new tokens is the full forward's (the
    sequence is causal, so theirs depends on no later token), the cached tokens get none, and each call
    can be backpropagated on its own (the cache holds no graph of an earlier call)."""
    layer = cache_layer(coupling, integrator="heun")
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    past, new = x[:, :4].clone().requires_grad_(), x[:, 4:].clone().requires_grad_()
    full = layer(torch.cat([past, new], dim=1))[:, 4:]
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    expected = torch.autograd.grad((full * weights).sum(), new)[0]
    cache = KuramotoCache()
    first = layer(past, cache=cache)
    (first * first).sum().backward()  # an earlier call's backward: the next one does not run into its graph
    for value in [cache.keys, cache.values, *(v for state in cache.field_state.values()
                                                for v in (state if isinstance(state, tuple) else (state,)))]:
        assert not value.requires_grad
    past.grad = None
    y = layer(new, cache=cache)
    (y * weights).sum().backward()
    torch.testing.assert_close(new.grad, expected, rtol=0, atol=1e-10)
    assert past.grad is None


def test_cache_work_per_token_does_not_recompute_the_past():
    """Decoding token t feeds only the new token through the projections (O(t) attention only)."""
    layer = make_layer()
    seen = []
    layer.qkv.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    cache = KuramotoCache()
    with torch.no_grad():
        for i in range(6):
            layer(torch.randn(1, 1, 16, dtype=torch.float64), cache=cache)
    assert seen == [1] * 6 and cache.length == 6
    assert cache.field_state[(0, 0)][0].shape == (1, 2, 3, 1)  # mean field: O(1) state per evaluation


# ------------------------------------------------------------------------------ properties
@settings(max_examples=15)
@given(gen=generators, coupling=st.sampled_from(COUPLINGS), strength=st.floats(-5, 5), padded=st.booleans())
def test_R_per_head_in_unit_interval(gen, coupling, strength, padded):
    layer = make_layer(coupling=coupling, coupling_strength=strength, learnable_coupling=False, steps=2)
    x = 3 * torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _, info = layer(x, left_padding(2, 5, gen) if padded else None, return_info=True)
    assert info.R.shape == (2, 2) and info.R_steps.shape == (3, 2, 2)
    assert ((info.R >= 0) & (info.R <= 1 + 1e-12)).all()
    assert ((info.R_steps >= 0) & (info.R_steps <= 1 + 1e-12)).all()
    torch.testing.assert_close(info.R_steps[-1], info.R)


def test_R_is_taken_per_head_over_oscillators():
    """R per head = mean over valid tokens of |mean_k e^{iθ}|: never of angles averaged across heads."""
    gen = torch.Generator().manual_seed(4)
    layer = make_layer(num_oscillators=16)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 7, gen)
    with torch.no_grad():
        _, info = layer(x, valid, return_info=True)
    per_token = torch.exp(1j * info.phases).mean(-1).abs()  # (b, h, t)
    w = valid[:, None, :].double()
    torch.testing.assert_close(info.R, (per_token * w).sum(-1) / w.sum(-1), rtol=0, atol=1e-12)


RESET_OPTIONS = [dict(), dict(learnable_coupling=False, coupling_strength=-0.5, bias=False),
                 dict(num_heads=4, num_oscillators=1, coupling="attention", integrator="rk4", coupling_strength=2.5)]


@pytest.mark.parametrize("options", RESET_OPTIONS)
def test_reset_parameters_gives_the_constructors_values(options):
    """On a layer built on meta and given storage with to_empty, and on a trained one: under the same seed,
    exactly what the constructor drew (projections, ω), β = 1 and K = coupling_strength (a buffer too)."""
    options = {**dict(d_model=16, num_heads=2, num_oscillators=3), **options}
    built = assert_reset_gives_constructor_values(lambda: KuramotoAttention(**options), torch.randn(2, 5, 16), seed=3)

    wide = KuramotoAttention(**options).double()  # drawn in the layer's dtype, as nn.Linear's reset does
    wide.reset_parameters()
    assert all(tensor.dtype == torch.float64 for tensor in wide.state_dict().values())
    assert torch.equal(wide.strength, built.strength.double()) and torch.equal(wide.beta, built.beta.double())


def test_a_meta_layer_materialized_as_fabric_does_is_initialised():
    """Fabric (FSDP, init_module(empty_init=True)) gives each module storage and calls its reset_parameters,
    parents first: without one, it refused the layer; every value is then the constructor's kind of value."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(16, 16), KuramotoAttention(16, 2, num_oscillators=3,
                                                                               coupling_strength=0.7))
    materialize_like_fabric(model)
    layer = model[1]
    assert all(not t.is_meta and t.isfinite().all() for t in model.state_dict().values())
    assert torch.equal(layer.beta, torch.ones(2)) and torch.equal(layer.strength, torch.full((2, 1, 1), 0.7))
    assert 0.02 < layer.omega.std() < 0.3  # N(0, 0.1²): not the uninitialised memory
    bound = 1 / math.sqrt(16)  # nn.Linear's default: U(-1/√fan_in, 1/√fan_in)
    assert all(lin.weight.abs().max() <= bound for lin in (layer.qkv, layer.phase_proj))
    assert layer.out.weight.abs().max() <= 1 / math.sqrt(layer.out.in_features)


def test_info_with_padding_runs_on_the_meta_device_without_a_regularizer():
    """Shape and FLOP estimates on meta: the padded tokens' R was selected (masked_select, which meta
    cannot run, and which waits for a GPU) even with no coherence loss to compute from it."""
    layer = make_layer(dtype=torch.float32).to("meta")
    _, info = layer(torch.randn(3, 9, 16, device="meta"), torch.ones(3, 9, dtype=torch.bool, device="meta"),
                    return_info=True)
    assert info.R.shape == (3, 2) and info.R_steps.shape == (4, 3, 2) and info.coherence_loss is None


@pytest.mark.parametrize("integrator, fast", [("euler", True), ("euler", False), ("heun", False)])
@pytest.mark.parametrize("padded", [False, True])
def test_R_steps_are_R_after_each_number_of_steps(integrator, fast, padded):
    """``R_steps[k]`` is the R of the phases after ``k`` steps: the same layer run for ``k`` steps
    gives it as its final ``R`` (fused Euler path, which reuses the steps' cos/sin, and generic path)."""
    gen = torch.Generator().manual_seed(5)
    layer = make_layer(integrator=integrator, steps=4)
    layer._fast_path = fast
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 7, gen) if padded else None
    with torch.no_grad():
        _, info = layer(x, valid, return_info=True)
        assert info.R_steps.shape == (5, 3, 2)
        for k in range(1, 5):
            layer.steps = k
            _, info_k = layer(x, valid, return_info=True)
            torch.testing.assert_close(info.R_steps[k], info_k.R, rtol=0, atol=1e-12, msg=f"step {k}")
        theta0 = (math.pi * torch.tanh(layer.phase_proj(x))).view(3, 7, 2, 3).transpose(1, 2)
        per_token = torch.exp(1j * theta0).mean(-1).abs()  # (b, h, t)
        w = torch.ones(3, 1, 7, dtype=torch.float64) if valid is None else valid[:, None, :].double()
        torch.testing.assert_close(info.R_steps[0], (per_token * w).sum(-1) / w.sum(-1), rtol=0, atol=1e-12)
    assert (info.R_steps[0] - info.R_steps[-1]).abs().max() > 1e-3  # the steps moved R: a real check


@pytest.mark.parametrize("fast", [True, False])
def test_R_steps_are_detached_while_R_keeps_its_gradient(fast):
    # KuramotoInfo documents R_steps as detached: the final entry (the final phases' R) is R.detach(),
    # so a loss built on R_steps never backpropagates through the integration
    layer = make_layer(steps=3)
    layer._fast_path = fast
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    _, info = layer(x, return_info=True)
    assert info.R.requires_grad and not info.R_steps.requires_grad
    with torch.no_grad():
        _, reference = layer(x, return_info=True)
    torch.testing.assert_close(info.R_steps, reference.R_steps, rtol=0, atol=1e-12)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("integrator", INTEGRATORS)
def test_zero_strength_phases_evolve_freely(coupling, integrator):
    layer = make_layer(coupling=coupling, integrator=integrator, coupling_strength=0.0,
                       learnable_coupling=False, steps=4, dt=0.25)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        _, info = layer(x, return_info=True)
        theta0 = (math.pi * torch.tanh(layer.phase_proj(x))).view(2, 6, 2, 3).transpose(1, 2)
    expected = theta0 + layer.omega.view(2, 1, 3) * (4 * 0.25)
    torch.testing.assert_close(info.phases, expected, rtol=0, atol=1e-12)


def test_positive_strength_synchronises_tokens_negative_repels():
    """Attractive sign: K > 0 raises R over tokens per oscillator channel, K < 0 lowers it."""
    x = torch.randn(2, 32, 16, dtype=torch.float64)

    def token_R(strength):
        layer = make_layer(coupling_strength=strength, learnable_coupling=False, causal=False, steps=20,
                           dt=0.1, phase_lag=0.0)
        with torch.no_grad():
            layer.omega.zero_()
            _, info = layer(x, return_info=True)
        theta0 = math.pi * torch.tanh(layer.phase_proj(x))
        return info.phases, theta0

    from kuramoto_attn import order_parameter
    plus, theta0 = token_R(2.0)
    minus, _ = token_R(-2.0)
    R0 = order_parameter(theta0.view(2, 32, 2, 3).transpose(1, 2), dim=-2)[0].mean()
    assert order_parameter(plus, dim=-2)[0].mean() > R0 + 0.1
    assert order_parameter(minus, dim=-2)[0].mean() < R0



@pytest.mark.parametrize("coupling", COUPLINGS)
def test_attention_dropout_acts_in_training_only_and_is_unbiased(coupling):
    layer = make_layer(coupling=coupling, dropout=0.5)
    plain = make_layer(coupling=coupling)  # the same weights, no dropout
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(layer.eval()(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(plain.train()(x), expected, rtol=0, atol=0)  # no other randomness here
        layer.train()
        draws = torch.stack([layer(x) for _ in range(2000)])
    assert (draws[0] - expected).abs().max() > 0.1  # each training pass drops attention weights
    # dropout scales the kept weights by 1/(1 - p): the average of many passes is the eval output
    torch.testing.assert_close(draws.mean(0), expected, rtol=0, atol=0.1 * expected.abs().max().item())
    assert (draws.mean(0) - expected).abs().max() < 0.25 * (draws[0] - expected).abs().max()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_outputs_at_padded_positions_are_finite(coupling, causal):
    # documented as unspecified but finite: queries with no valid key (padding before the first valid
    # token, a row all padding); torch 2.13's CPU SDPA would give 0 for such a row even without the
    # mask's diagonal, so this guards against other kernels and versions, not against that mutation
    layer = make_layer(coupling=coupling, causal=causal, dtype=torch.float32)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[0, :3] = False
    valid[1] = False
    with torch.no_grad():
        y, info = layer(torch.randn(3, 6, 16), valid, return_info=True)
    assert torch.isfinite(y).all() and torch.isfinite(info.phases).all() and torch.isfinite(info.R).all()


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_gradients_finite_for_every_parameter(coupling):
    layer = make_layer(coupling=coupling, dtype=torch.float32, integrator="heun",
                       coherence_target=0.3, coherence_weight=1.0, phase_noise=0.05, freq_jitter=0.1,
                       dropout=0.1).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :2] = False
    y, info = layer(x, valid, return_info=True)
    assert info.coherence_loss is not None and info.coherence_loss.dim() == 0
    (y[valid].square().sum() + info.coherence_loss).backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()


def test_coherence_loss_matches_regularizer_on_valid_tokens():
    from kuramoto_attn import CoherenceRegularizer, order_parameter
    layer = make_layer(coherence_target=0.2, coherence_weight=0.5, coherence_mode="center")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    _, info = layer(x, valid, return_info=True)
    R = order_parameter(info.phases, dim=-1)[0]
    expected = CoherenceRegularizer(0.2, 0.5, "center").penalty(R[valid[:, None, :].expand_as(R)])
    torch.testing.assert_close(info.coherence_loss, expected)
    assert make_layer()(x, return_info=True)[1].coherence_loss is None


@pytest.mark.parametrize("band", [(0.0, 0.1), (0.9, 1.0), (0.2, 0.6)])
def test_band_mode_loss_is_the_weighted_squared_distance_outside_the_band(band):
    # the band was fixed at (0.35, 0.55) and coherence_target silently ignored in band mode
    from kuramoto_attn import CoherenceRegularizer, order_parameter
    layer = make_layer(coherence_mode="band", coherence_band=band, coherence_weight=0.3)
    _, info = layer(torch.randn(2, 5, 16, dtype=torch.float64), return_info=True)
    R = order_parameter(info.phases, dim=-1)[0]
    lo, hi = band
    torch.testing.assert_close(info.coherence_loss, 0.3 * (torch.relu(lo - R) ** 2 + torch.relu(R - hi) ** 2).mean())
    torch.testing.assert_close(info.coherence_loss, CoherenceRegularizer(weight=0.3, mode="band", band=band).penalty(R))


@pytest.mark.parametrize("kwargs, message", [
    (dict(coherence_mode="band", coherence_target=0.4), "coherence_target: not read in coherence_mode='band'"),
    (dict(coherence_target=0.4, coherence_band=(0.1, 0.2)), "coherence_band: only read in coherence_mode='band'"),
    (dict(coherence_mode="band", coherence_band=(0.6, 0.2)), "coherence_band: expected lo <= hi"),
    (dict(coherence_mode="band", coherence_band=0.5), "coherence_band: expected a pair"),
    (dict(coherence_weight=0.5), "^coherence_weight: has no effect without coherence_target"),
    (dict(coherence_mode="center"), "^coherence_mode: has no effect without coherence_target"),
    (dict(coherence_mode="band"), "^coherence_mode: has no effect without coherence_target"),
])
def test_coherence_settings_that_would_be_ignored_are_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_layer(**kwargs)


def saved_bytes(steps: int, **settings) -> int:
    """Bytes autograd keeps for backward of one float32 forward of x (2, 20, 16)."""
    layer = make_layer(steps=steps, dtype=torch.float32, **settings)
    x = torch.randn(2, 20, 16)
    seen = {}

    def pack(tensor):
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return sum(seen.values())


def test_backward_memory_grows_by_one_phase_tensor_per_step():
    """Bytes autograd keeps for backward: steps=10 adds at most one (b, h, t, n) tensor per extra step."""
    phase_tensor = 2 * 2 * 20 * 3 * 4  # (b, h, t, n) float32
    for coupling in COUPLINGS:
        generic = dict(coupling=coupling, integrator="rk4")
        assert saved_bytes(10, **generic) - saved_bytes(1, **generic) <= 9 * phase_tensor * 1.05


# ------------------------------------------------------------------------- compile, bf16
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_torch_compile_matches_eager(coupling):
    """Output and the gradients of the input and every parameter (torch 2.11 traced the fused
    mean-field backward into zero gradients for the input, ω and K), in one graph (reading whether
    inference mode was on broke the graph twice per layer, and failed ``fullgraph=True`` and a strict
    ``torch.export``), also run under ``no_grad`` and inference mode."""
    layer = make_layer(dtype=torch.float32, coupling=coupling)
    x = torch.randn(2, 6, 16, requires_grad=True)
    one_graph = dynamo_traces_func_transform_check()  # (not on torch 2.4: torch's own graph break)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=one_graph)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-6)
    exported = torch.export.export(layer, (x.detach(),), strict=one_graph).module()
    torch.testing.assert_close(exported(x.detach()), layer(x.detach()), rtol=1e-5, atol=1e-6)
    regularized = make_layer(dtype=torch.float32, coupling=coupling, coherence_target=0.5)  # and its info: a pytree
    exported = torch.export.export(regularized, (x.detach(),), {"return_info": True}, strict=one_graph).module()
    (y, info), (y_eager, info_eager) = (exported(x.detach(), return_info=True),
                                        regularized(x.detach(), return_info=True))
    assert info_eager.coherence_loss is not None  # (the dataclass was "not a known type")
    torch.testing.assert_close((y, vars(info)), (y_eager, vars(info_eager)), rtol=1e-5, atol=1e-6)
    y_eager, y_compiled = layer(x), compiled(x)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
    inputs = [x, *layer.parameters()]
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, g_eager, g_compiled in zip(names, torch.autograd.grad(y_eager.sum(), inputs),
                                         torch.autograd.grad(y_compiled.sum(), inputs)):
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5, msg=name)


def test_torch_compile_of_layers_with_other_settings_in_one_process():
    """Layers that differ in dt, phase lag, integrator and coupling, compiled one after the other
    (a sweep in one process): torch 2.13's dynamo crashed on the second when the per-step
    checkpoints read dt and the lag themselves."""
    for options in (dict(dt=0.2, phase_lag=0.3), dict(dt=0.1, phase_lag=0.0),
                    dict(dt=0.05, phase_lag=-0.2, integrator="heun", coupling="attention")):
        layer = make_layer(dtype=torch.float32, **options).train()
        x = torch.randn(2, 6, 16, requires_grad=True)
        y_compiled = torch.compile(layer, backend="aot_eager")(x)
        y_eager = layer(x)
        torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
        g_compiled, g_eager = (torch.autograd.grad(y.sum(), x)[0] for y in (y_compiled, y_eager))
        torch.testing.assert_close(g_compiled, g_eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("coupling,integrator", [("mean_field", "euler"), ("mean_field", "rk4"),
                                                 ("attention", "heun")])
def test_torch_func_transforms_match_autograd(coupling, integrator):
    """``torch.func.grad`` and per-sample gradients (``vmap`` of ``grad``) through the layer equal
    plain autograd: the fused Euler path, the phase-feature buffer and the per-step checkpoints
    cannot run under a transform (the layer falls back to plain autograd ops there)."""
    from torch.func import functional_call, grad, vmap

    layer = make_layer(coupling=coupling, integrator=integrator)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(3, 5, 16, dtype=torch.float64)

    def loss(params, x):
        return functional_call(layer, params, (x,)).pow(2).sum()

    def autograd_grads(x):
        layer.zero_grad()
        layer(x).pow(2).sum().backward()
        return {name: p.grad.clone() for name, p in layer.named_parameters()}

    torch.testing.assert_close(grad(loss)(params, x), autograd_grads(x), rtol=1e-10, atol=1e-12)
    per_sample = vmap(grad(lambda p, x: loss(p, x[None])), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        torch.testing.assert_close({name: g[i] for name, g in per_sample.items()}, autograd_grads(x[i:i + 1]),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("coupling,integrator", [("mean_field", "heun"), ("attention", "euler"), ("module", "rk4")])
def test_functional_call_under_autograd_gives_the_gradients_of_the_weights_it_was_given(coupling, integrator):
    """``functional_call`` with other weights ("fast weights", MAML, hypernetworks) and plain autograd: the
    per-step checkpoints rerun in backward, after ``functional_call`` had put the layer's own parameters back,
    and read K (and β, a module's own strength) from them: wrong gradients of K, β, qkv and phase_proj, silently;
    with detached weights, a CheckpointError. The fused path passes its tensors explicitly and was right."""
    from torch.func import functional_call

    options = {}
    if coupling == "module":  # a Coupling module with a learnable parameter of its own (and the lag)
        coupling = MeanFieldCoupling(dim=-2, causal=True, strength=0.6, learnable=True, phase_lag=0.3)
        options = {"phase_lag": 0.0}
    layer = make_layer(coupling=coupling, integrator=integrator, **options)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=gen)
    mask = left_padding(2, 5, gen)
    fast = {name: (p.detach() + 0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen)).requires_grad_()
            for name, p in layer.named_parameters()}
    assert "coupling.strength" in fast or not isinstance(coupling, MeanFieldCoupling)
    given = copy.deepcopy(layer)  # the same weights held as the module's own
    with torch.no_grad():
        for name, p in given.named_parameters():
            p.copy_(fast[name])
    got = torch.autograd.grad(functional_call(layer, fast, (x, mask)).pow(2).sum(), list(fast.values()))
    expected = torch.autograd.grad(given(x, mask).pow(2).sum(), list(given.parameters()))
    torch.testing.assert_close(dict(zip(fast, got)), dict(zip(fast, expected)), rtol=1e-12, atol=1e-12)
    frozen, x = {name: p.detach() for name, p in fast.items()}, x.requires_grad_()  # the input's gradient only
    got = torch.autograd.grad(functional_call(layer, frozen, (x, mask)).sum(), x)[0]
    torch.testing.assert_close(got, torch.autograd.grad(given(x, mask).sum(), x)[0], rtol=1e-12, atol=1e-12)
    assert not any(p is fast[name] for name, p in layer.named_parameters())  # its own, put back


@pytest.mark.parametrize("coupling,integrator", [("mean_field", "rk4"), ("attention", "euler")])
def test_a_retained_graph_through_the_checkpoints_gives_the_same_gradients_again(coupling, integrator):
    # each backward recomputes the checkpoints; the context that puts the forward's tensors back could be entered
    # once only: the second backward (retain_graph, gradcheck, autograd.functional.jacobian) raised AttributeError
    layer = make_layer(coupling=coupling, integrator=integrator)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    first = torch.autograd.grad(y.pow(2).sum(), [x, layer.strength], retain_graph=True)
    again = torch.autograd.grad(y.pow(2).sum(), [x, layer.strength])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x[:1, :3].detach().requires_grad_(),))


@pytest.mark.parametrize("coupling,integrator", [("mean_field", "euler"), ("mean_field", "rk4"),
                                                 ("attention", "heun")])
def test_second_order_gradients_refused_through_autograd_and_exact_through_torch_func(coupling, integrator):
    """The hand-written backward passes are first order. A gradient penalty's gradient taken with
    ``torch.autograd.grad(..., create_graph=True)`` then ``grad(..., inputs=...)`` skipped their nodes and came
    back about 100 % wrong, silently; now the first backward raises. Nested ``torch.func.grad`` with SDPA's
    math kernel gives the naive reference's second-order gradient."""
    from torch.func import functional_call, grad
    from torch.nn.attention import SDPBackend, sdpa_kernel

    layer = make_layer(coupling=coupling, integrator=integrator)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="first order: create_graph=True"):
        torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def penalty(forward, x):  # ‖∂(Σ y²)/∂x‖²
        return grad(lambda x: forward(x).pow(2).sum())(x).pow(2).sum()

    with sdpa_kernel(SDPBackend.MATH):
        got = grad(lambda x: penalty(lambda x: functional_call(layer, params, (x,)), x))(x.detach())
    expected = grad(lambda x: penalty(lambda x: naive_forward(layer, x)[0], x))(x.detach())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["ceiling", "center", "band"])
def test_per_sample_gradients_of_the_coherence_loss_with_padding(mode):
    """Per-sample gradients (``vmap`` of ``grad``) with a padding mask per sample and the coherence loss:
    its valid tokens were picked with masked_select, which vmap cannot run over a batched mask (a
    RuntimeError). They equal plain autograd on each sample, one of them padding only (loss 0)."""
    from torch.func import functional_call, grad, vmap

    kwargs = dict(coherence_band=(0.2, 0.4)) if mode == "band" else dict(coherence_target=0.3)
    layer = make_layer(coherence_mode=mode, coherence_weight=0.7, **kwargs)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[0, :2] = valid[2] = False

    def loss(params, x, valid):
        y, info = functional_call(layer, params, (x[None], valid[None]), dict(return_info=True))
        return 10 * info.coherence_loss + y.pow(2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, valid)
    losses = vmap(loss, in_dims=(None, 0, 0))(params, x, valid)
    for i in range(x.shape[0]):
        layer.zero_grad()
        expected = loss(dict(layer.named_parameters()), x[i], valid[i])
        expected.backward()
        torch.testing.assert_close(losses[i], expected.detach(), rtol=1e-12, atol=0)
        torch.testing.assert_close({name: g[i] for name, g in per_sample.items()},
                                   {name: p.grad for name, p in layer.named_parameters()}, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_bf16_autocast_runs_close_to_fp32(coupling):
    layer = make_layer(dtype=torch.float32, coupling=coupling)
    x = torch.randn(2, 8, 16)
    y32 = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, info = layer(x, return_info=True)
    assert y16.dtype == torch.bfloat16 and info.phases.dtype == torch.float32
    y16.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # bf16 keeps 8 significant bits (0.4%); the difference measured 0.3–0.4% of max|y|
    assert (y16.float() - y32).abs().max() < 0.03 * y32.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations, as between layers
        assert layer(x.bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------- preset, bad inputs
def test_phasegpt_preset_and_overrides():
    layer = PhaseGPTAttention(d_model=64, num_heads=4)
    assert (layer.num_oscillators, layer.steps, layer.dt, layer.integrator, layer.coupling) == \
        (32, 10, 0.1, "euler", "mean_field")
    assert not isinstance(layer.strength, torch.nn.Parameter) and float(layer.strength[0]) == 1.0
    leaky = PhaseGPTAttention(d_model=64, num_heads=4, causal=False, coupling_strength=-1.0)
    assert not leaky.causal and float(leaky.strength[0]) == -1.0
    with torch.no_grad():
        assert layer(torch.randn(1, 5, 64)).shape == (1, 5, 64)


@pytest.mark.parametrize("kwargs, name", [
    (dict(d_model=10, num_heads=4), "d_model"),
    (dict(num_oscillators=0), "num_oscillators"),
    (dict(steps=0), "steps"),
    (dict(dt=0.0), "dt"),
    (dict(dt=-0.1), "dt"),
    # beyond float32's range: inf in the phases' arithmetic, NaN outputs
    (dict(dt=1e39), "dt"),
    (dict(phase_noise=1e39), "phase_noise"),
    (dict(freq_jitter=1e39), "freq_jitter"),
    (dict(coupling="graph"), "coupling"),
    (dict(integrator="midpoint"), "integrator"),
    (dict(dropout=1.5), "dropout"),
    (dict(coherence_target=1.5), "coherence_target"),
    (dict(coherence_target=0.4, coherence_mode="floor"), "coherence_mode"),
    (dict(coherence_target=0.4, coherence_weight=-1.0), "coherence_weight"),
    (dict(coherence_target=0.4, coherence_weight=1e39), "^coherence_weight: expected a value <="),
    (dict(coherence_band=(0.2, 0.6), coherence_mode="band", coherence_weight=1e39), "^coherence_weight: expected"),
    (dict(phase_noise=-0.1), "phase_noise"),
    (dict(freq_jitter=float("nan")), "freq_jitter"),
    (dict(coupling_strength=float("inf")), "coupling_strength"),
    (dict(coupling_strength=1e39), "^coupling_strength: expected a value <="),  # float32 overflow
    (dict(integrator=["euler"]), "^integrator: expected one of"),
    (dict(causal="False"), "causal"),
    (dict(bias="False"), "bias"),
    (dict(learnable_coupling="False"), "learnable_coupling"),
    (dict(learnable_coupling=0), "learnable_coupling"),
])
def test_bad_constructor_arguments(kwargs, name):
    options = dict(d_model=16, num_heads=2)
    options.update(kwargs)
    with pytest.raises(ValueError, match=name):
        KuramotoAttention(**options)


def test_numpy_scalars_are_accepted_as_constructor_arguments():
    # e.g. settings from np.linspace / np.arange; they act exactly like the Python numbers
    layer = KuramotoAttention(d_model=np.int64(16), num_heads=np.int64(2), num_oscillators=np.int32(4),
                              steps=np.int64(3), dt=np.float32(0.25), coupling_strength=np.float32(0.5))
    twin = KuramotoAttention(d_model=16, num_heads=2, num_oscillators=4, steps=3, dt=0.25, coupling_strength=0.5)
    assert (layer.num_oscillators, layer.steps, layer.dt) == (4, 3, 0.25) and type(layer.steps) is int
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), twin(x))
    with pytest.raises(ValueError, match="num_oscillators: expected an integer"):
        KuramotoAttention(d_model=16, num_heads=2, num_oscillators=np.bool_(True))
    # beyond int64, torch's own error named no argument
    with pytest.raises(ValueError, match=r"^num_oscillators: expected an integer < 2\*\*63"):
        KuramotoAttention(d_model=16, num_heads=2, num_oscillators=2**64)
    flags = KuramotoAttention(d_model=16, num_heads=2, causal=np.bool_(False), bias=np.bool_(False),
                              learnable_coupling=np.bool_(False))
    assert flags.causal is False and flags.qkv.bias is None and "strength" in dict(flags.named_buffers())


def test_bad_forward_arguments():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 5, 16)
    for bad in (torch.randn(5, 16), torch.randn(2, 5, 8), torch.randn(2, 0, 16), torch.ones(2, 5, 16, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"^x: expected"):
            layer(bad)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):  # was a bare "mat1 and mat2" error
        with pytest.raises(ValueError, match=r"^x: expected the module's dtype torch.float32"):
            layer(x.to(dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # casts float32 and half inputs, not float64
        assert layer(x.to(torch.float16)).dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"^x: expected the module's dtype torch.float32 but got float64, "
                                             "which torch.autocast does not cast"):
            layer(x.to(torch.float64))
        with pytest.raises(ValueError, match=r"^x: expected the module's dtype torch.float64 but got torch.float32; "
                                             "torch.autocast does not cast a float64 module's weights"):
            make_layer()(x)  # a float64 layer: was a bare "mat1 and mat2" error
    with pytest.raises(ValueError, match=r"^x: expected a tensor on the module's device cpu but got meta"):
        layer(x.to("meta"))
    for mask in (torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 5), torch.ones(1, 5, dtype=torch.bool),
                 torch.ones(2, 5, dtype=torch.bool, device="meta")):
        with pytest.raises(ValueError, match="^key_padding_mask: expected a boolean tensor of shape"):
            layer(x, mask)
    with pytest.raises(ValueError, match="^return_info: expected True or False"):
        layer(x, return_info="False")  # would read as True
    with pytest.raises(ValueError, match="cache"):
        layer(x, cache={})
    cache = KuramotoCache()
    with torch.no_grad():
        layer(x, cache=cache)
        with pytest.raises(ValueError, match="cache"):
            layer(torch.randn(3, 1, 16), cache=cache)  # another batch size
        # keys as wide (4 + 2·5 = 8 + 2·3) from 2 heads in a layer of 4, in a cache with no owner (built by hand)
        by_hand = KuramotoCache(keys=cache.keys, values=cache.values, field_state=cache.field_state)
        with pytest.raises(ValueError, match=r"^cache: holds keys of shape \(2, 2, 5, 14\), which does not fit "
                                             r"batch 2, 4 heads and width 14"):
            KuramotoAttention(16, 4, num_oscillators=5, steps=3)(x[:, :1], cache=by_hand)
        with pytest.raises(ValueError, match="cache"):
            make_layer(dtype=torch.float32, coupling="attention")(x[:, :1], cache=cache)  # another layer
        # ... also one of the same shape: it would add its tokens to the other layer's (wrong outputs)
        before = (cache.keys.clone(), cache.length)
        with pytest.raises(ValueError, match=r"^cache: filled by another KuramotoAttention layer \(of the same "
                                             r"shape\); give each layer its own KuramotoCache"):
            make_layer(dtype=torch.float32)(x[:, :1], cache=cache)
        assert torch.equal(cache.keys, before[0]) and cache.length == before[1]
        for other in (dict(integrator="heun"), dict(steps=2), dict(steps=4)):  # other (step, stage) states
            with pytest.raises(ValueError, match="cache: holds no phase state"):
                make_layer(dtype=torch.float32, **other)(x[:, :1], cache=cache)
        heun = KuramotoCache()
        make_layer(dtype=torch.float32, integrator="heun")(x, cache=heun)
        with pytest.raises(ValueError, match="cache: holds no phase state"):  # Heun's states in an Euler layer
            layer(x[:, :1], cache=heun)
        module, attention = KuramotoCache(), KuramotoCache()  # θ (n wide) and [cos θ, sin θ] (2n) states
        cache_layer("module", dtype=torch.float32)(x, cache=module)
        make_layer(dtype=torch.float32, coupling="attention")(x, cache=attention)
        with pytest.raises(ValueError, match=r"^cache: holds no phase state for this layer's 'attention' coupling"):
            make_layer(dtype=torch.float32, coupling="attention")(x[:, :1], cache=module)
        with pytest.raises(ValueError, match=r"^cache: holds no phase state for this layer's MeanFieldCoupling"):
            cache_layer("module", dtype=torch.float32)(x[:, :1], cache=attention)
        with pytest.raises(ValueError, match="cache"):
            make_layer(dtype=torch.float32, causal=False)(x, cache=KuramotoCache())
        with pytest.raises(ValueError, match="^cache: holds tensors on cpu but the input is on meta"):
            make_layer(dtype=torch.float32).to("meta")(x[:, :1].to("meta"), cache=cache)
        with pytest.raises(ValueError, match="^cache: holds keys of dtype torch.float32 but this call computes "
                                             "torch.float64"):  # torch.cat would have promoted the past
            make_layer(dtype=torch.float64)(x[:, :1].double(), cache=cache)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="^cache: .*bfloat16"):
            layer(x[:, :1], cache=cache)


def test_a_cache_belongs_to_its_layer_not_to_whichever_layer_is_later_given_its_id():
    # the cache recorded its layer's id, which CPython gives to the next object of its size once the
    # layer is freed: `layer = KuramotoAttention(...)` run again took the old layer's keys and phase sums
    import copy

    x = torch.randn(2, 5, 16)
    layer = KuramotoAttention(16, 2, num_oscillators=4, steps=2)
    cache = KuramotoCache()
    with torch.no_grad():
        layer(x[:, :4], cache=cache)
        expected = layer(x)[:, 4:]
        # a shallow copy shares the owner (and the tensors); a deep one of the cache alone too (branches)
        for copied in (copy.copy(cache), copy.deepcopy(cache)):
            torch.testing.assert_close(layer(x[:, 4:], cache=copied), expected)
        freed = id(layer)
        del layer  # (the cache keeps no reference to it)
        layer = built_where_freed(KuramotoAttention, freed, 16, 2, num_oscillators=4, steps=2)
        with pytest.raises(ValueError, match=r"^cache: filled by another KuramotoAttention layer"):
            layer(x[:, 4:], cache=cache)
    assert cache.owner() is None and cache.length == 4


# ------------------------------------------------------------- fused Euler mean-field path
def _fast_and_generic_grads(layer, x, valid, probe):
    params = [x] + [p for p in layer.parameters()]
    results = []
    for fast in (True, False):
        layer._fast_path = fast
        try:
            torch.manual_seed(5)  # the same noise draws on both paths
            y, info = layer(x, valid, return_info=True)
            grads = torch.autograd.grad((y * probe).sum(), params)
        finally:
            del layer._fast_path
        results.append((y, info, grads))
    return params, results


@pytest.mark.parametrize("causal, padded", [(True, False), (True, True), (False, False), (False, True)])
@pytest.mark.parametrize("phase_lag", [0.0, 0.3])
@pytest.mark.parametrize("training", [False, True])
def test_fused_euler_mean_field_matches_generic_path(causal, padded, phase_lag, training):
    """The fused integration (hand-written backward) equals the generic checkpointed solver in float64:
    output, phases, R per step, and the gradients of the input and every parameter (learnable K per
    head, ω per head and oscillator), with phase noise and frequency jitter in training mode."""
    gen = torch.Generator().manual_seed(11)
    layer = make_layer(causal=causal, phase_lag=phase_lag, steps=4, phase_noise=0.05 if training else 0.0,
                       freq_jitter=0.1 if training else 0.0)
    layer.train(training)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = left_padding(3, 7, gen) if padded else None
    probe = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    params, ((y, info, grads), (y_ref, info_ref, grads_ref)) = _fast_and_generic_grads(layer, x, valid, probe)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(info.phases, info_ref.phases, rtol=0, atol=1e-12)
    torch.testing.assert_close(info.R_steps, info_ref.R_steps, rtol=0, atol=1e-12)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    assert "strength" in names and layer.strength.shape == (2, 1, 1)
    for name, grad, grad_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-10, msg=name)


def test_fused_euler_mean_field_fixed_strength_and_float32():
    """A fixed K (buffer) gets no gradient; float32 agrees with the generic path to rounding."""
    gen = torch.Generator().manual_seed(12)
    layer = make_layer(dtype=torch.float32, learnable_coupling=False, steps=10)
    x = torch.randn(2, 9, 16, generator=gen, requires_grad=True)
    valid = left_padding(2, 9, gen)
    probe = torch.randn(2, 9, 16, generator=gen)
    _, ((y, _, grads), (y_ref, _, grads_ref)) = _fast_and_generic_grads(layer, x, valid, probe)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal, padded", [(True, True), (False, True), (True, False)])
def test_fused_euler_mean_field_gradcheck(causal, padded):
    """gradcheck of the fused integration itself: phases, ω (h, n, 1) and K (h, 1, 1), with lag."""
    from kuramoto_attn._euler_mean_field import euler_mean_field

    gen = torch.Generator().manual_seed(13)
    theta = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    omega = torch.randn(2, 3, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    strength = torch.tensor([1.5, -0.8], dtype=torch.float64).view(2, 1, 1).requires_grad_()
    weight = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.float64)[:, None, None, :]
    weight = weight if padded else None

    def run(th, om, k):
        return euler_mean_field(th, om, k, weight, steps=3, dt=0.3, phase_lag=0.4, causal=causal)

    assert torch.autograd.gradcheck(run, (theta, omega, strength))



@pytest.mark.parametrize("which", [0, 1, 2])
def test_fused_euler_mean_field_gradient_of_one_input_alone(which):
    """Only one of phases, ω, K requires a gradient (e.g. frozen ω and a fixed input, learnable K):
    the fused integration still keeps the phases for the backward and its gradient is right."""
    from kuramoto_attn._euler_mean_field import euler_mean_field

    gen = torch.Generator().manual_seed(15)
    inputs = [torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64),
              torch.randn(2, 3, 1, generator=gen, dtype=torch.float64),
              torch.tensor([1.5, -0.8], dtype=torch.float64).view(2, 1, 1)]
    weight = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.float64)[:, None, None, :]

    def run(x):
        args = [x if k == which else inputs[k] for k in range(3)]
        return euler_mean_field(*args, weight, steps=3, dt=0.3, phase_lag=0.4, causal=True)

    assert torch.autograd.gradcheck(run, (inputs[which].clone().requires_grad_(),))


@pytest.mark.parametrize("padded", [False, True])
def test_fused_euler_mean_field_gradients_of_late_tokens_stay_accurate(padded):
    """In float32 over 4096 tokens, with the gradient of the first tokens large (their gain K/count is the
    largest), the later tokens' phase gradients still match a float64 reference to float32 rounding of
    their own size: the backward's sums over later tokens are summed from the last token (formed as
    total − cumsum they carried an error of the first tokens' size, ~400x theirs here)."""
    from kuramoto_attn._euler_mean_field import euler_mean_field

    gen = torch.Generator().manual_seed(17)
    t, steps, dt = 4096, 2, 0.1
    theta = (2 * torch.rand(1, 1, 4, t, generator=gen, dtype=torch.float64) - 1) * math.pi
    omega = 0.1 * torch.randn(1, 4, 1, generator=gen, dtype=torch.float64)
    strength = torch.full((1, 1, 1), 10.0, dtype=torch.float64)
    probe = torch.randn(1, 1, 4, t, generator=gen, dtype=torch.float64)
    probe[..., :8] *= 1e3
    weight = (torch.arange(t) < 3 * t // 4).to(torch.float64).view(1, 1, 1, t) if padded else None

    def reference(th, om, k):  # float64 autograd through the cumulative mean field
        w = torch.ones(t, dtype=torch.float64) if weight is None else weight
        gain = k * w / w.cumsum(-1).clamp_min(1.0)
        for _ in range(steps):
            sums_cos, sums_sin = (torch.cos(th) * w).cumsum(-1), (torch.sin(th) * w).cumsum(-1)
            th = th + dt * (om + gain * (sums_sin * torch.cos(th) - sums_cos * torch.sin(th)))
        return th

    inputs = [z.clone().requires_grad_() for z in (theta, omega, strength)]
    expected = torch.autograd.grad(reference(*inputs), inputs[0], probe)[0][..., t // 2:]
    inputs = [z.float().requires_grad_() for z in (theta, omega, strength)]
    w32 = None if weight is None else weight.float()
    out = euler_mean_field(*inputs, w32, steps=steps, dt=dt, phase_lag=0.0, causal=True)
    got = torch.autograd.grad(out, inputs[0], probe.float())[0][..., t // 2:]
    scale = expected.abs().max()
    torch.testing.assert_close(got.double() / scale, expected / scale, rtol=0, atol=1e-6)


def test_fused_euler_mean_field_backward_leaves_the_incoming_gradient_alone():
    """The hand-written backward accumulates in a copy: a caller's grad_outputs tensor is not overwritten."""
    from kuramoto_attn._euler_mean_field import euler_mean_field

    gen = torch.Generator().manual_seed(16)
    theta = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    omega = torch.randn(2, 3, 1, generator=gen, dtype=torch.float64)
    strength = torch.tensor([1.5, -0.8], dtype=torch.float64).view(2, 1, 1)
    probe = torch.randn(2, 2, 3, 5, generator=gen, dtype=torch.float64)
    before = probe.clone()
    for causal in (True, False):
        out = euler_mean_field(theta, omega, strength, None, steps=3, dt=0.3, phase_lag=0.4, causal=causal)
        torch.autograd.grad(out, theta, probe)
        assert torch.equal(probe, before)

def test_fused_euler_mean_field_without_grad_keeps_no_phases_per_step():
    """Under no_grad (evaluation, generation) the fused path gives the same phases from two work
    tensors: what it allocates does not grow with the steps (it kept every step's phases before)."""
    from torch.profiler import profile

    from kuramoto_attn._euler_mean_field import euler_mean_field

    gen = torch.Generator().manual_seed(14)
    theta = torch.randn(2, 3, 4, 64, generator=gen)
    omega = torch.randn(3, 4, 1, generator=gen, requires_grad=True)
    strength = torch.ones(3, 1, 1)

    def run(steps):
        return euler_mean_field(theta, omega, strength, None, steps=steps, dt=0.1, phase_lag=0.3, causal=True)

    def allocated(steps, grad):
        with profile(profile_memory=True) as prof, torch.set_grad_enabled(grad):
            run(steps)
        return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())

    for steps in (1, 2, 3, 6):
        with torch.no_grad():
            phases = run(steps)
        assert torch.equal(phases, run(steps).detach())
    phase_tensor = theta.numel() * 4
    assert allocated(12, True) - allocated(3, True) >= 9 * phase_tensor  # what the measure sees with grad
    assert allocated(12, False) - allocated(3, False) < phase_tensor
    omega.requires_grad_(False)  # grad mode on but nothing to differentiate (a frozen layer): nothing kept either
    assert allocated(12, True) - allocated(3, True) < phase_tensor


def test_fused_euler_mean_field_backward_memory_grows_by_one_phase_tensor_per_step():
    """The fused path keeps what the checkpointed steps kept: one (b, h, t, n) tensor per extra step."""
    fused = dict(integrator="euler", coupling="mean_field")
    phase_tensor = 2 * 2 * 20 * 3 * 4  # (b, h, t, n) float32
    assert saved_bytes(10, **fused) - saved_bytes(1, **fused) <= 9 * phase_tensor * 1.05


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_dropout_never_changes_the_phases(coupling):
    layer = make_layer(coupling=coupling, dropout=0.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, reference = layer.eval()(x, return_info=True)
        layer.train()
        for _ in range(5):
            y, info = layer(x, return_info=True)
            torch.testing.assert_close(info.phases, reference.phases, rtol=0, atol=0)


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("integrator", ["euler", "rk4"])
def test_frequency_jitter_is_applied_in_training(coupling, integrator):
    layer = make_layer(coupling=coupling, integrator=integrator, coupling_strength=0.0, learnable_coupling=False,
                       steps=4, dt=0.25, freq_jitter=0.5).train()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.manual_seed(3)
        jittered = layer.freq_jitter(layer.omega)  # the only random draw of this forward
        torch.manual_seed(3)
        _, info = layer(x, return_info=True)
        theta0 = (math.pi * torch.tanh(layer.phase_proj(x))).view(2, 6, 2, 3).transpose(1, 2)
    expected = theta0 + jittered.view(2, 1, 3) * (4 * 0.25)
    assert not torch.allclose(jittered, layer.omega)
    torch.testing.assert_close(info.phases, expected, rtol=0, atol=1e-12)



@pytest.mark.parametrize("coupling, integrator", [("mean_field", "euler"), ("mean_field", "rk4"),
                                                  ("attention", "heun")])
def test_phase_noise_acts_in_training_only(coupling, integrator):
    """Eval: a layer with phase noise is the noiseless layer exactly, the fused Euler mean-field path
    included. Training, with no coupling: the phases are the free rotation plus ``steps`` independent
    draws of N(0, σ²) each, so they deviate by N(0, steps·σ²)."""
    settings = dict(coupling=coupling, integrator=integrator, coupling_strength=0.0, learnable_coupling=False,
                    steps=4, dt=0.25)
    quiet, noisy = make_layer(**settings), make_layer(phase_noise=0.3, **settings)  # the same weights
    x = torch.randn(4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y, info = quiet(x, return_info=True)
        for _ in range(2):
            y_eval, info_eval = noisy(x, return_info=True)
            torch.testing.assert_close(y_eval, y, rtol=0, atol=0)
            torch.testing.assert_close(info_eval.phases, info.phases, rtol=0, atol=0)
        torch.manual_seed(0)
        _, info_train = noisy.train()(x, return_info=True)
    deviation = info_train.phases - info.phases  # 4 * 2 * 16 * 3 = 384 draws
    assert deviation.mean().abs() < 0.1
    assert deviation.std().item() == pytest.approx(0.3 * math.sqrt(4), rel=0.15)


def test_a_bfloat16_layer_integrates_its_phases_in_float32():
    """Phases are never integrated in half precision: a bf16 layer's phases are float32 and agree
    with a float32 layer of the same (rounded) weights to the rounding of the bf16 projections."""
    half = make_layer(dtype=torch.bfloat16, steps=6)
    full = make_layer(dtype=torch.bfloat16, steps=6).float()
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        y, info = half(x, return_info=True)
        _, info_ref = full(x.float(), return_info=True)
    assert y.dtype == torch.bfloat16
    assert info.phases.dtype == torch.float32 and info.R.dtype == torch.float32
    torch.testing.assert_close(info.phases, info_ref.phases, rtol=0, atol=0.05)


def test_initialisation_of_the_phase_parameters():
    """As documented: ω ~ N(0, 0.1²) per head and oscillator, β = 1 per head, K = coupling_strength per head."""
    torch.manual_seed(0)
    layer = KuramotoAttention(d_model=64, num_heads=8, num_oscillators=32, coupling_strength=-0.7)
    assert layer.omega.shape == (8, 32) and layer.beta.shape == (8,) and layer.strength.shape == (8, 1, 1)
    assert torch.equal(layer.beta.detach(), torch.ones(8))
    assert torch.equal(layer.strength.detach(), torch.full((8, 1, 1), -0.7))
    assert abs(layer.omega.mean().item()) < 0.02  # 256 draws: standard error 0.006
    assert layer.omega.std().item() == pytest.approx(0.1, rel=0.15)

@pytest.mark.parametrize("coupling", CACHED[:-1])
def test_info_with_cache_and_padding_equals_full_forward(coupling):
    gen = torch.Generator().manual_seed(12)
    layer = cache_layer(coupling, coherence_target=0.1)
    x = torch.randn(3, 9, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 9, gen)
    valid[:, 5:] = torch.rand(3, 4, generator=gen) < 0.5  # padding inside the decoded part too
    with torch.no_grad():
        cache = KuramotoCache()
        layer(x[:, :5], valid[:, :5], cache=cache)
        _, info = layer(x[:, 5:], valid[:, 5:], cache=cache, return_info=True)
        _, full = layer(x, valid, return_info=True)
    R_tok = torch.exp(1j * full.phases[:, :, 5:]).mean(-1).abs()  # (b, h, 4)
    w = valid[:, None, 5:].double()
    torch.testing.assert_close(info.R, (R_tok * w).sum(-1) / w.sum(-1).clamp_min(1), rtol=0, atol=1e-10)
    kept = R_tok.masked_select(valid[:, None, 5:])
    torch.testing.assert_close(info.coherence_loss, layer.coherence.penalty(kept), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ coupling modules
def harmonic_mean_field(learnable=False):
    """A causal mean field along the tokens with a second harmonic: no built-in coupling does this."""
    return MeanFieldCoupling(strength=0.7, phase_lag=0.3, harmonics=(1, 2), dim=-2, causal=True, learnable=learnable)


def harmonic_pairs(coupling):
    """Its pair term for naive_forward: K_c (sin(Δ − α) + sin(2Δ − α))."""
    return lambda diff: coupling.strength * (torch.sin(diff - 0.3) + torch.sin(2 * diff - 0.3))


@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("padded", [False, True])
def test_a_coupling_module_along_the_tokens_matches_naive_reference(integrator, padded):
    gen = torch.Generator().manual_seed(hash((integrator, padded)) % 2**31)
    layer = make_layer(coupling=harmonic_mean_field(), integrator=integrator, phase_lag=0.0)
    x = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 7, gen) if padded else None
    with torch.no_grad():
        y, info = layer(x, valid, return_info=True)
        y_ref, theta_ref = naive_forward(layer, x, valid, pair_term=harmonic_pairs(layer.coupling))
    keep = slice(None) if valid is None else valid
    torch.testing.assert_close(y[keep], y_ref[keep], rtol=0, atol=1e-10)
    torch.testing.assert_close(info.phases, theta_ref, rtol=0, atol=1e-10)


def test_a_coupling_module_gets_gradients_like_the_naive_reference():
    """Its learnable strength included, through the per-step checkpoints."""
    gen = torch.Generator().manual_seed(4)
    layer = make_layer(coupling=harmonic_mean_field(learnable=True), integrator="heun", phase_lag=0.0)
    assert "coupling.strength" in dict(layer.named_parameters())
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = left_padding(2, 6, gen)
    probe = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64) * valid[..., None]
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad((layer(x, valid) * probe).sum(), params)
    naive = naive_forward(layer, x, valid, pair_term=harmonic_pairs(layer.coupling))[0]
    grads_ref = torch.autograd.grad((naive * probe).sum(), params)
    for (name, _), grad, grad_ref in zip([("x", x)] + list(layer.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=1e-9, msg=name)
    named = dict(zip(["x"] + [name for name, _ in layer.named_parameters()], grads))
    assert named["coupling.strength"].abs() > 0


def test_the_built_in_mean_field_is_the_mean_field_module_along_the_tokens():
    gen = torch.Generator().manual_seed(6)
    built_in = make_layer(integrator="rk4", phase_lag=0.3)
    module = make_layer(integrator="rk4", phase_lag=0.0,
                        coupling=MeanFieldCoupling(phase_lag=0.3, dim=-2, causal=True))
    module.load_state_dict(built_in.state_dict(), strict=False)  # all but the module's strength, 1
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    for valid in (None, left_padding(2, 6, gen)):
        with torch.no_grad():
            keep = slice(None) if valid is None else valid
            torch.testing.assert_close(module(x, valid)[keep], built_in(x, valid)[keep], rtol=0, atol=1e-12)


def test_a_coupling_module_across_the_oscillators_of_each_token():
    """A ring of oscillators within each token (GraphCoupling on the last axis), against Euler steps of
    dθ_k/dt = ω_k + K_h Σ_l A_kl sin(θ_l − θ_k) written out here."""
    gen = torch.Generator().manual_seed(8)
    n = 4
    ring = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        ring[k, (k + 1) % n] = ring[k, (k - 1) % n] = 1.0
    layer = make_layer(num_oscillators=n, phase_lag=0.0, coupling=GraphCoupling(ring, strength=0.5))
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _, info = layer(x, return_info=True)
        theta = (math.pi * torch.tanh(layer.phase_proj(x))).view(2, 5, 2, n).transpose(1, 2)  # (b, h, t, n)
        for _ in range(layer.steps):
            pull = (ring * torch.sin(theta[..., None, :] - theta[..., :, None])).sum(-1)  # [.., k, l] = θ_l − θ_k
            theta = theta + layer.dt * (layer.omega[:, None, :] + layer.strength * 0.5 * pull)
    torch.testing.assert_close(info.phases, theta, rtol=0, atol=1e-12)


class _Drift(Coupling):
    """A constant pull that ignores its mask: the layer itself keeps it from padded tokens."""

    def interaction(self, theta, mask=None):
        return torch.ones_like(theta)


class _DriftKwargs(_Drift):
    """The same, taking its mask through ``**kwargs``."""

    def interaction(self, theta, **kwargs):
        return torch.ones_like(theta)


@pytest.mark.parametrize("drift", [_Drift, _DriftKwargs])
def test_padded_tokens_get_no_coupling_from_a_module(drift):
    layer = make_layer(phase_lag=0.0, coupling=drift(strength=0.25))
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    valid = torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        _, info = layer(x, valid, return_info=True)
        theta0 = (math.pi * torch.tanh(layer.phase_proj(x))).view(1, 4, 2, 3).transpose(1, 2)
    free = theta0 + layer.steps * layer.dt * layer.omega[:, None, :]
    pulled = free + layer.steps * layer.dt * 0.25 * layer.strength.detach()
    torch.testing.assert_close(info.phases, torch.where(valid[:, None, :, None], pulled, free), rtol=0, atol=1e-12)


class _Flattening(Coupling):
    """Uses ``theta.view``, which needs contiguous phases: a pull of each oscillator to the first one."""

    def interaction(self, theta):
        flat = theta.view(-1, theta.shape[-1])
        return torch.sin(flat[:, :1] - flat).view(theta.shape)


def test_a_coupling_module_gets_contiguous_phases_with_and_without_a_cache():
    # without a cache the phases were a transposed view, so view() failed with torch's own error
    layer = make_layer(phase_lag=0.0, coupling=_Flattening(strength=0.5))
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        whole = layer(x)
        cache = KuramotoCache()
        steps = [layer(x[:, i:i + 1], cache=cache) for i in range(5)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=0, atol=1e-12)


class _Float64Drift(Coupling):
    """A constant pull computed in float64 whatever the phases' dtype."""

    def interaction(self, theta, mask=None):
        return torch.ones(theta.shape, dtype=torch.float64)


def test_a_coupling_module_that_promotes_its_term_leaves_the_phases_dtype():
    # its float64 term made the float32 layer integrate, and return its phases, in float64
    layer = make_layer(phase_lag=0.0, coupling=_Float64Drift(strength=0.25)).float()
    x = torch.randn(2, 5, 16)
    y, info = layer(x, return_info=True)
    assert y.dtype == info.phases.dtype == torch.float32
    with torch.no_grad():
        cache = KuramotoCache()
        steps = [layer(x[:, i:i + 1], cache=cache) for i in range(5)]
    assert cache.keys.dtype == torch.float32
    torch.testing.assert_close(torch.cat(steps, 1), y.detach(), rtol=0, atol=1e-5)


class _NeedsWeights(Coupling):
    def interaction(self, theta, weights):
        return weights * torch.sin(theta)


def test_coupling_modules_the_layer_cannot_use_are_errors():
    with pytest.raises(ValueError, match=r"^phase_lag: with a coupling module, set the lag on the module "
                                         r"\(MeanFieldCoupling.phase_lag\)"):
        make_layer(coupling=MeanFieldCoupling(dim=-2, causal=True), phase_lag=0.3)
    for needs in (AttentionCoupling(), _NeedsWeights()):
        with pytest.raises(ValueError, match=r"^coupling: \w+.interaction needs weights, which this layer cannot give"):
            make_layer(coupling=needs, phase_lag=0.0)
    with pytest.raises(ValueError, match=r"^coupling: MeanFieldCoupling along the tokens \(dim=-2\) with causal=False"):
        make_layer(coupling=MeanFieldCoupling(dim=-2), phase_lag=0.0)
    make_layer(coupling=MeanFieldCoupling(dim=-2), phase_lag=0.0, causal=False)  # a non-causal layer may
    make_layer(coupling=MeanFieldCoupling(dim=-1), phase_lag=0.0)  # across the oscillators: causal
    # a graph over the tokens: only fixed lower-triangular weights keep a causal layer causal
    # (one coupling to the next token is enough to leak)
    for leaky in (torch.ones(5, 5) / 5, torch.triu(torch.ones(5, 5), 1) - torch.triu(torch.ones(5, 5), 2),
                  torch.nn.Parameter(torch.tril(torch.ones(5, 5)))):
        with pytest.raises(ValueError, match=r"^coupling: GraphCoupling along the tokens \(dim=-2\) in a causal "
                                             "layer needs fixed lower-triangular weights"):
            make_layer(coupling=GraphCoupling(leaky, dim=-2), phase_lag=0.0)
    tril = make_layer(coupling=GraphCoupling(torch.tril(torch.ones(5, 5)) / 5, dim=-2), phase_lag=0.0)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    edited = x.clone()
    edited[:, 4] += 1.0  # the last token changes: the outputs before it must not
    torch.testing.assert_close(tril(x)[:, :4], tril(edited)[:, :4], rtol=0, atol=0)
    # weights loaded or edited after construction are checked again by forward
    state = {key: value.clone() for key, value in tril.state_dict().items()}
    state["coupling.weights"] = torch.ones(5, 5) / 5
    tril.load_state_dict(state)
    with pytest.raises(ValueError, match=r"^coupling: GraphCoupling along the tokens \(dim=-2\) in a causal "):
        tril(x)
    tril.coupling.weights.copy_(torch.tril(torch.ones(5, 5)) / 5)
    tril(x)  # lower-triangular again: it runs
    tril.coupling.weights[1, 3] = 0.5  # an edit in place
    with pytest.raises(ValueError, match=r"^coupling: GraphCoupling along the tokens \(dim=-2\) in a causal "):
        tril(x)
    make_layer(coupling=GraphCoupling(torch.ones(5, 5) / 5, dim=-2), phase_lag=0.0, causal=False)
    with pytest.raises(ValueError, match=r"^coupling: expected one of \['attention', 'mean_field'\] or a "
                                         r"kuramoto_attn.Coupling module but got Identity"):
        make_layer(coupling=torch.nn.Identity(), phase_lag=0.0)
    ring = make_layer(num_oscillators=4, phase_lag=0.0, coupling=GraphCoupling(torch.ones(4, 4)))
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"^key_padding_mask: the coupling GraphCoupling.interaction takes no mask"):
        ring(x, torch.tensor([[False, True, True]]))
    assert ring(x).shape == x.shape  # without padding it runs


class _NeedsMask(Coupling):
    def interaction(self, theta, mask):
        return torch.sin(theta) * mask


class _PositionalMask(Coupling):
    def interaction(self, theta, mask=None, /):
        return torch.sin(theta)


class _CausalMaskedMean(Coupling):
    """The mean of sin(θ_j - θ_i) over the valid tokens j <= i: 0/0, NaN, on a padded token before
    the first valid one (the padded rows' terms are the layer's to drop)."""

    def interaction(self, theta, mask=None):
        t = theta.shape[-2]
        weights = torch.tril(torch.ones(t, t, dtype=theta.dtype))
        if mask is not None:
            weights = weights * mask.transpose(-1, -2).to(theta.dtype)  # no padded columns
        return weighted_sine_coupling(theta, weights / weights.sum(-1, keepdim=True), self.phase_lag, dim=-2)


def test_a_coupling_module_with_a_positional_only_mask_is_refused():
    # the layer passes mask= by name: with padding it was a bare TypeError in forward
    with pytest.raises(ValueError, match=r"^coupling: _PositionalMask.interaction takes mask as a positional-only"):
        make_layer(coupling=_PositionalMask(), phase_lag=0.0)


def test_a_nan_coupling_term_on_a_padded_token_does_not_reach_the_valid_outputs():
    # the padded tokens' terms were zeroed by a product, and NaN * 0 is NaN: every valid output was NaN
    layer = make_layer(num_oscillators=4, coupling=_CausalMaskedMean(), phase_lag=0.0)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    y = layer(x, valid)
    assert torch.isfinite(y).all()
    # the valid tokens as if the padding were not there (the scheme keeps it out of their means)
    torch.testing.assert_close(y[0, 1:], layer(x[:1, 1:])[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[1], layer(x[1:])[0], rtol=1e-12, atol=1e-12)


def test_a_graph_coupling_along_the_tokens_names_its_length_on_another_one():
    # it couples exactly n tokens: another length, or a cache, was a shape error about "weights"
    layer = make_layer(coupling=GraphCoupling(torch.tril(torch.ones(5, 5)) / 5, dim=-2), phase_lag=0.0)
    assert layer(torch.randn(1, 5, 16, dtype=torch.float64)).shape == (1, 5, 16)
    for x, cache in ((torch.randn(1, 4, 16, dtype=torch.float64), None),
                     (torch.randn(1, 2, 16, dtype=torch.float64), KuramotoCache())):
        with pytest.raises(ValueError, match=r"^coupling: GraphCoupling along the tokens has weights for 5 tokens, "
                                             rf"but this pass has {x.shape[1]} \(cached tokens included\)"):
            layer(x, cache=cache)


def test_a_coupling_module_whose_mask_has_no_default_is_refused():
    # the layer passes mask= only when something is padded: unpadded, it was a bare TypeError in forward
    with pytest.raises(ValueError, match=r"^coupling: _NeedsMask.interaction needs mask, which this layer gives "
                                         r"only with padding; give it a default \(mask=None"):
        make_layer(coupling=_NeedsMask(), phase_lag=0.0)


def test_token_axis_couplings_given_with_a_positive_dim_are_checked_too():
    # a coupling module sees phases (b, h, t, n): dim=2 is the token axis just as dim=-2 is
    with pytest.raises(ValueError, match=r"^coupling: MeanFieldCoupling along the tokens \(dim=2\) with causal=False"):
        make_layer(coupling=MeanFieldCoupling(dim=2), phase_lag=0.0)
    with pytest.raises(ValueError, match=r"^coupling: GraphCoupling along the tokens \(dim=2\) in a causal "
                                         "layer needs fixed lower-triangular weights"):
        make_layer(coupling=GraphCoupling(torch.ones(5, 5) / 5, dim=2), phase_lag=0.0)
    make_layer(coupling=MeanFieldCoupling(dim=2, causal=True), phase_lag=0.0)  # causal along the tokens: fine


def test_every_query_row_of_the_dense_attention_mask_allows_the_query_itself():
    # padded queries (here before the first valid token, and a row of padding only) must keep one allowed
    # key, else SDPA's softmax over an empty row is 0/0 on kernels without torch's "safe softmax"
    layer = make_layer()
    valid = torch.tensor([[False, False, True, True, True, True], [False] * 6])
    for past, t in ((0, 6), (2, 4)):
        mask, is_causal = layer._attention_mask(t, past, valid, torch.device("cpu"))
        assert not is_causal and mask.shape == (2, 1, t, 6)
        assert mask[..., torch.arange(t), past + torch.arange(t)].all()  # the diagonal (query = key)


@pytest.mark.parametrize("dim", [0, -4])
def test_a_coupling_along_the_batch_axis_is_refused(dim):
    # MeanFieldCoupling(dim=0) coupled the sequences of a batch: one sample's output moved with another's
    for coupling in (MeanFieldCoupling(dim=dim), GraphCoupling(torch.eye(2), dim=dim)):
        with pytest.raises(ValueError, match=rf"^coupling: {type(coupling).__name__} along dim={dim}, the batch axis"):
            make_layer(coupling=coupling, phase_lag=0.0)


def test_the_documented_defaults():
    # the signature issue 3 fixed (num_oscillators=32, coupling_strength=1.0, steps=10, dt=0.1, ...): a default
    # changed in the code alone gave every model built with defaults another layer, with no test noticing
    layer = KuramotoAttention(16, 2)
    assert (layer.num_oscillators, layer.steps, layer.dt, layer.integrator, layer.coupling, layer.phase_lag,
            layer.causal, layer.dropout, layer.coherence) == (32, 10, 0.1, "euler", "mean_field", 0.0, True, 0.0, None)
    assert isinstance(layer.strength, torch.nn.Parameter)
    assert torch.equal(layer.strength, torch.ones_like(layer.strength))
    assert layer.qkv.bias is not None and layer.phase_proj.bias is not None and layer.out.bias is not None
    assert (layer.phase_noise.sigma, layer.freq_jitter.relative) == (0.0, 0.0)
    regularized = KuramotoAttention(16, 2, coherence_target=0.45).coherence
    assert (regularized.target, regularized.weight, regularized.mode) == (0.45, 0.1, "ceiling")


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_repr_rebuilds_the_layer(coupling):
    layer = KuramotoAttention(24, 2, num_oscillators=3, coupling_strength=-0.5, steps=4, dt=0.05, integrator="heun",
                              coupling=coupling, phase_lag=0.25, learnable_coupling=False, dropout=0.1,
                              causal=False, bias=False)
    shown = repr_arguments(layer)
    rebuilt = KuramotoAttention(**shown)
    assert rebuilt.extra_repr() == layer.extra_repr()
    assert [(n, p.shape) for n, p in rebuilt.state_dict().items()] == [
        (n, p.shape) for n, p in layer.state_dict().items()]  # the same buffers (no learnable K, no biases)


class _Wrapped(torch.nn.Module):
    """A projection behind a wrapper with no ``weight`` or ``bias`` of its own (as adapters and
    quantised stand-ins are): the layer must only call it."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_projections_replaced_by_wrappers_give_the_same_layer(coupling):
    layer = make_layer(coupling=coupling, bias=False)
    wrapped = copy.deepcopy(layer)
    for name in ("qkv", "phase_proj", "out"):
        setattr(wrapped, name, _Wrapped(getattr(layer, name)))
    x = torch.randn(2, 5, layer.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, info = layer(x, return_info=True)
    y_wrapped, info_wrapped = wrapped(x, return_info=True)
    torch.testing.assert_close(y_wrapped, y, rtol=0, atol=0)
    torch.testing.assert_close(info_wrapped.R, info.R, rtol=0, atol=0)
    assert wrapped.extra_repr() == layer.extra_repr()  # bias=False: the constructor's, not read off a projection
    with pytest.raises(ValueError, match=r"^x: expected the module's dtype torch.float64"):
        wrapped(x.float())  # the input checks still hold


def test_repr_with_a_coupling_module_leaves_the_lag_to_it():
    # the layer's phase_lag is not read with a module (its own lag is, shown in its repr below the layer's)
    layer = KuramotoAttention(24, 2, num_oscillators=3, coupling=MeanFieldCoupling(2.0, phase_lag=0.2))
    assert "phase_lag" not in layer.extra_repr() and "coupling=MeanFieldCoupling," in layer.extra_repr()
    assert "phase_lag=0.2" in repr(layer.coupling)
