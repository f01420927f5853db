"""models: GPT (PhaseGPT) and TPILM — configs, shapes, causality, losses, caches and generation."""

import copy
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from kuramoto_attn import Coupling, HolographicPhaseMemory, KuramotoAttention, KuramotoInfo, MeanFieldCoupling
from models import GPT, MODELS, TPILM, GPTConfig, GPTInfo, TPILMConfig, TPILMInfo
from models.config import ConfigError, to_dict
from models.gpt import CausalSelfAttention

from helpers import built_where_freed, dynamo_traces_func_transform_check

VOCAB = 13


def tiny_gpt(dtype=torch.float64, seed=0, **overrides):
    settings = dict(vocab_size=VOCAB, max_seq_len=12, n_layers=3, n_heads=2, d_model=16, dropout=0.0)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**settings, **overrides})).to(dtype).eval()


def phase_gpt(coupling="mean_field", **overrides):
    return tiny_gpt(**{**dict(use_phase_attention=True, phase_layer_idx=(0, 2), coupling=coupling, num_oscillators=4,
                              steps=3), **overrides})


def tiny_tpi(dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    return TPILM(TPILMConfig(**{**dict(vocab_size=VOCAB, d_model=8, n_layers=2, chunk_size=4), **overrides})
                 ).to(dtype).eval()


MODEL_CASES = {
    "gpt": lambda: tiny_gpt(),
    "gpt-mean_field": lambda: phase_gpt("mean_field"),
    "gpt-attention": lambda: phase_gpt("attention", integrator="heun"),
    # a Coupling class by import path: a causal mean field with a second harmonic and its own lag
    "gpt-module": lambda: phase_gpt("kuramoto_attn:MeanFieldCoupling", coupling_options=dict(
        dim=-2, causal=True, harmonics=[1, 2], phase_lag=0.2, strength=0.8)),
    "tpi-vector": lambda: tiny_tpi(),
    "tpi-matrix-decay": lambda: tiny_tpi(state="matrix", num_heads=2, kernel="decay", normalize="sqrt",
                                         query="decoupled", ffn_expansion=0),
    "tpi-window": lambda: tiny_tpi(kernel="window", window=3, magnitude="sigmoid", normalize="sum"),
}


def tokens(b, t, seed=1):
    return torch.randint(VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- configs

REFERENCE_YAML = dict(n_layers=4, n_heads=4, d_model=128, d_ff=512, vocab_size=65, max_seq_len=64,
                      dropout=0.1, use_phase_attention=True, phase_layer_idx=[2], num_oscillators=32,
                      coupling_strength=1.0, phase_iterations=10)


def test_reference_yaml_keys_are_accepted():
    config = GPTConfig.from_dict(REFERENCE_YAML)
    assert config.phase_layer_idx == (2,) and config.steps == 10 and config.d_ff == 512
    assert GPTConfig.from_dict({**REFERENCE_YAML, "phase_layer_idx": 2}) == config  # an int is one layer
    module = GPTConfig.from_dict({**REFERENCE_YAML, "coupling": "kuramoto_attn:MeanFieldCoupling",
                                  "coupling_options": {"dim": -2, "causal": True, "harmonics": [1, 3]}})
    assert GPTConfig.from_dict(to_dict(module)) == module  # as a checkpoint's config is read back
    no_alias = {k: v for k, v in REFERENCE_YAML.items() if k != "phase_iterations"}
    assert GPTConfig.from_dict({**no_alias, "n_sync_steps": 7}).steps == 7
    assert GPTConfig.from_dict(to_dict(config)) == config
    assert GPTConfig(d_model=64, n_heads=4).d_ff == 256
    assert TPILMConfig.from_dict({"vocab_size": 256, "d_model": 128, "n_layers": 8, "ffn_expansion": 0,
                                  "kernel": "decay"}).ffn_expansion == 0


def test_coupling_options_read_numbers_written_in_exponent_form_as_numbers():
    # "strength: 1e-3" (PyYAML reads it as a string) was refused by the class; a float setting read it as 0.001
    config = GPTConfig.from_dict({**REFERENCE_YAML, "coupling": "kuramoto_attn:MeanFieldCoupling",
                                  "coupling_options": yaml.safe_load("{strength: 1e-3, phase_lag: -2.0E1, dim: -2, "
                                                                     "harmonics: [1, 2], causal: true}")})
    assert config.coupling_options["strength"] == "1e-3"  # kept as written (a checkpoint's config reads back the same)
    coupling = config.build_coupling()
    assert float(coupling.strength) == pytest.approx(1e-3) and float(coupling.phase_lag) == pytest.approx(-20.0)
    assert coupling.harmonics == (1, 2) and coupling.dim == -2 and coupling.causal is True


@pytest.mark.parametrize("cls, values, message", [
    (GPTConfig, {"n_layer": 4}, "model.n_layer: unknown key"),
    (GPTConfig, {"d_model": "128"}, "model.d_model: expected an integer"),
    (GPTConfig, {"dropout": "high"}, "model.dropout: expected a number"),
    (GPTConfig, {"use_phase_attention": "yes"}, "model.use_phase_attention: expected bool"),
    (GPTConfig, {"coupling": "graph"}, "model.coupling: expected one of"),
    (GPTConfig, {"coherence_target": 0.45}, r"model.coherence_target: has no effect without phase layers"),
    (GPTConfig, {"num_oscillators": 16}, r"model.num_oscillators: has no effect without phase layers"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], "coherence_weight": 0.5},
     "model.coherence_weight: has no effect without coherence_target"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], "coherence_mode": "band",
                 "coherence_target": 0.4}, "model.coherence_target: not read in coherence_mode='band'"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], "coherence_mode": "band",
                 "coherence_band": [0.6, 0.2]}, "model.coherence_band: expected lo <= hi"),
    (GPTConfig, {"integrator": "midpoint"}, r"model.integrator: must be one of \('euler', 'heun', 'rk4'\)"),
    (GPTConfig, {"n_heads": 0}, "model.n_heads: must be at least 1"),
    (GPTConfig, {"d_model": 100, "n_heads": 3}, "model.d_model: must be a multiple of n_heads"),
    (GPTConfig, {"dropout": 1.0}, "model.dropout: must be in"),
    (GPTConfig, {"dropout": -0.1}, "model.dropout: must be in"),
    (GPTConfig, {"dt": 0.0}, "model.dt: must be positive"),
    # the phase layers compute in float32: the config took these, the model then refused them
    *[(GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], key: k},
       rf"model.{key}: must be within ±3.403e\+38") for key, k in (("coupling_strength", 1e39),
                                                                    ("coupling_strength", -1e39), ("dt", 1e39),
                                                                    ("phase_noise", 1e39), ("freq_jitter", 1e39))],
    (GPTConfig, {"coherence_target": 1.5}, "model.coherence_target: must be in"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [12]}, "model.phase_layer_idx: layer indices"),
    # a negative index named no layer: use_phase_attention true, and no phase layer at all
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [-1]}, "model.phase_layer_idx: layer indices"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1, 1]}, "model.phase_layer_idx: has repeated"),
    (GPTConfig, {"use_phase_attention": True}, "model.phase_layer_idx: must name at least one"),
    (GPTConfig, {"phase_layer_idx": [1]}, "model.phase_layer_idx: names phase layers but use_phase_attention"),
    (GPTConfig, {"steps": 3, "phase_iterations": 3}, "model.phase_iterations: given twice"),
    # an error about an aliased key names the key as written (there is no model.steps in the file)
    (GPTConfig, {"phase_iterations": 3}, r"^model.phase_iterations: has no effect without phase layers"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], "n_sync_steps": 0},
     r"^model.n_sync_steps: must be at least 1"),
    *[(GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [1], **values}, message) for values, message in [
        ({"coupling": "no_such_package_xyz:Ring"},
         r"model.coupling: cannot import 'no_such_package_xyz:Ring' \(ModuleNotFoundError"),
        ({"coupling": "kuramoto_attn:RingCoupling"}, r"model.coupling: cannot import .*\(AttributeError"),
        ({"coupling": "kuramoto_attn:"}, r"model.coupling: expected one of 'mean_field', 'attention' or 'package"),
        ({"coupling": "torch.nn:Linear"}, "model.coupling: must name a kuramoto_attn.Coupling subclass"),
        # the abstract base built, then failed in the first step with a traceback
        ({"coupling": "kuramoto_attn:Coupling"}, "model.coupling: must name a Coupling subclass that implements"),
        ({"coupling": "kuramoto_attn:order_parameter"}, "model.coupling: must name a kuramoto_attn.Coupling"),
        ({"coupling": "kuramoto_attn:AttentionCoupling"}, "model.coupling: AttentionCoupling.interaction needs"),
        ({"coupling": "kuramoto_attn:MeanFieldCoupling", "coupling_options": {"dim": -2}},
         r"model.coupling: MeanFieldCoupling along the tokens \(dim=-2\) with causal=False"),
        ({"coupling": "kuramoto_attn:MeanFieldCoupling", "phase_lag": 0.3},
         r"model.phase_lag: with a coupling module, set the lag on the module"),
        ({"coupling": "kuramoto_attn:MeanFieldCoupling", "coupling_options": {"dims": -2}},
         r"model.coupling_options: MeanFieldCoupling\(\*\*coupling_options\) failed: .*dims"),
        # a ValueError of the class's own checks names coupling_options too, not only the class's argument
        ({"coupling": "kuramoto_attn:MeanFieldCoupling", "coupling_options": {"harmonics": [0]}},
         r"model.coupling_options: MeanFieldCoupling\(\*\*coupling_options\) failed: harmonics"),
        ({"coupling": "kuramoto_attn:MeanFieldCoupling", "coupling_options": [-2]},
         "model.coupling_options: expected a mapping"),
        ({"coupling_options": {"dim": -2}}, "model.coupling_options: is for a Coupling class given as coupling, not "
                                            "the built-in 'mean_field'"),
    ]],
    (GPTConfig, {"coupling": "kuramoto_attn:MeanFieldCoupling"}, "model.coupling: has no effect without phase layers"),
    (TPILMConfig, {"dim": 128}, "model.dim: unknown key"),
    (TPILMConfig, {"ffn_expansion": -1}, "model.ffn_expansion: must be >= 0"),
    (TPILMConfig, {"kernel": "gauss"}, "model.kernel: expected one of"),
    (TPILMConfig, {"window": 7}, "model.window: is only read with kernel: window"),
    (TPILMConfig, {"query": "offset", "constrained_scale": 3.0}, "model.constrained_scale: is only read with query"),
    (TPILMConfig, {"d_model": 10, "num_heads": 4}, "model.num_heads: must divide"),
    (TPILMConfig, {"num_heads": 2}, "model.num_heads: is only read with state: matrix"),  # vector state: no effect
    (TPILMConfig, {"dropout": 1.0}, r"model.dropout: must be in \[0, 1\)"),
])
def test_config_errors_name_the_key(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(values)



def test_config_bounds_are_inclusive_where_documented():
    # coherence_target in [0, 1]; coupling_strength within ±(the largest float32), both ends included
    largest = torch.finfo(torch.float32).max
    for values in (dict(coherence_target=1.0), dict(coherence_target=0.0), dict(coupling_strength=largest),
                   dict(coupling_strength=-largest), dict(dt=largest)):
        config = GPTConfig(vocab_size=VOCAB, n_layers=2, use_phase_attention=True, phase_layer_idx=[1], **values)
        assert all(getattr(config, key) == value for key, value in values.items())


@pytest.mark.parametrize("cls, values, message", [
    (GPTConfig, {"n_layers": True}, "n_layers: expected an integer, got True"),  # was a 1-layer GPT
    (GPTConfig, {"bias": "no"}, "bias: expected bool"),  # was a model with biases
    (GPTConfig, {"n_layers": 2.0}, "n_layers: expected an integer"),
    (GPTConfig, {"phase_layer_idx": True}, "phase_layer_idx: expected int | tuple"),
    (GPTConfig, {"use_phase_attention": True, "phase_layer_idx": [0.0]}, "phase_layer_idx: expected int | tuple"),
    (GPTConfig, {"coupling_strength": float("nan")}, "coupling_strength: expected a finite number"),
    # an OverflowError from math.isfinite, naming nothing
    (GPTConfig, {"dt": 10 ** 400}, "dt: expected a finite number, got an integer too large for a float"),
    (GPTConfig, {"coupling": "graph"}, "coupling: expected one of"),
    (TPILMConfig, {"d_model": True}, "d_model: expected an integer"),
    (TPILMConfig, {"ffn_expansion": 1.5}, "ffn_expansion: expected an integer"),
])
def test_configs_made_in_python_check_types_like_from_dict(cls, values, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        cls(**{"vocab_size": VOCAB, **values})
    config = GPTConfig(vocab_size=np.int64(VOCAB), phase_layer_idx=[1], use_phase_attention=True, dt=1)
    assert config.phase_layer_idx == (1,) and type(config.vocab_size) is int and type(config.dt) is float


def test_coherence_band_reaches_the_phase_layers():
    config = GPTConfig.from_dict(dict(vocab_size=VOCAB, max_seq_len=12, n_layers=2, n_heads=2, d_model=16,
                                      use_phase_attention=True, phase_layer_idx=[1], num_oscillators=4,
                                      coherence_mode="band", coherence_band=[0.6, 0.8], coherence_weight=1.0))
    regularizer = GPT(config).blocks[1].attn.coherence
    assert (regularizer.mode, regularizer.band, regularizer.weight) == ("band", (0.6, 0.8), 1.0)
    assert GPTConfig.from_dict(to_dict(config)) == config


def test_registry():
    assert MODELS == {"gpt": (GPT, GPTConfig), "tpi": (TPILM, TPILMConfig)}


# ---------------------------------------------------------------- GPT structure and loss

def test_phase_layers_and_tied_weights():
    model = phase_gpt()
    assert model.phase_layers == (0, 2)
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [KuramotoAttention, CausalSelfAttention, KuramotoAttention]
    assert model.head.weight is model.tok_emb.weight
    assert model.num_params() == model.num_params(non_embedding=False) - 12 * 16
    assert tiny_gpt().phase_layers == ()


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_loss_is_cross_entropy_with_ignore_index(name):
    model = MODEL_CASES[name]()
    idx, targets = tokens(2, 7), tokens(2, 7, seed=2)
    targets[0, :3] = -1
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 7, VOCAB) and model(idx)[1] is None
    kept = targets.flatten() >= 0
    expected = F.cross_entropy(logits.flatten(0, 1)[kept], targets.flatten()[kept])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True])
def test_a_half_precision_loss_over_many_tokens_is_finite_and_accurate(name, dtype, autocast):
    # the cross-entropy was summed in the logits' dtype: a float16 model's (fabric.precision=16-true) sum
    # passed 65504 at ~25k tokens of ln(13) nats (a GPT-2 vocabulary: ~6k tokens) and the loss was inf; a
    # bfloat16 model's was ~2% low. Under autocast the loss stays float32, as F.cross_entropy's
    model = MODEL_CASES[name]()
    idx, targets = tokens(4000, 9), tokens(4000, 9, seed=2)
    targets[0, :3] = -1
    with torch.no_grad():
        expected = model(idx, targets)[1]
        if autocast:
            with torch.autocast("cpu", dtype=dtype):
                logits, loss = model.float()(idx, targets)
        else:
            logits, loss = model.to(dtype)(idx, targets)
    assert logits.dtype == dtype and loss.dtype == (torch.float32 if autocast else dtype)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=2 ** -7)


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_a_batch_whose_targets_are_all_ignored_has_zero_loss_and_gradient(name):
    # F.cross_entropy's mean would be 0/0 = NaN, which stops a training run as if it had diverged
    model = MODEL_CASES[name]()
    _, loss = model(tokens(2, 7), torch.full((2, 7), -1))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())



def naive_gpt_logits(model, idx):
    """GPT-2 written out from the model's weights in float64: explicit causally masked softmax
    attention scaled by 1/√d, exact (erf) GELU, LayerNorm by its formula, tied output head."""
    w = {name: value.double() for name, value in model.state_dict().items()}
    c = model.config
    b, t = idx.shape
    h, d = c.n_heads, c.d_model // c.n_heads

    def linear(x, name):
        y = x @ w[f"{name}.weight"].T
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    def layer_norm(x, name):
        y = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        y = y * w[f"{name}.weight"]
        return y + w[f"{name}.bias"] if f"{name}.bias" in w else y

    x = w["tok_emb.weight"][idx] + w["pos_emb.weight"][:t]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for i in range(c.n_layers):
        q, k, v = (z.view(b, t, h, d) for z in linear(layer_norm(x, f"blocks.{i}.ln_1"), f"blocks.{i}.attn.qkv")
                   .split(c.d_model, dim=-1))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
        weights = scores.masked_fill(future, float("-inf")).softmax(-1)
        heads = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, c.d_model)
        x = x + linear(heads, f"blocks.{i}.attn.proj")
        hidden = linear(layer_norm(x, f"blocks.{i}.ln_2"), f"blocks.{i}.mlp.fc")
        x = x + linear(0.5 * hidden * (1 + torch.erf(hidden / 2 ** 0.5)), f"blocks.{i}.mlp.proj")
    return layer_norm(x, "ln_f") @ w["tok_emb.weight"].T


@pytest.mark.parametrize("bias", [False, True])
def test_baseline_gpt_equals_a_naive_float64_transformer(bias):
    model = tiny_gpt(bias=bias, d_ff=24)
    with torch.no_grad():  # non-trivial norms and biases (the init sets them to 1 and 0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.normal_()
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx)[0], naive_gpt_logits(model, idx), rtol=1e-10, atol=1e-10)

def test_a_gpt_without_bias_has_no_bias_anywhere():
    # the naive reference adds a bias only where the model has one: it cannot tell a stray one
    model = phase_gpt(bias=False)
    assert [name for name, _ in model.named_parameters() if "bias" in name] == []

@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_causal(name):
    model = MODEL_CASES[name]()
    idx = tokens(2, 9)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


@pytest.mark.parametrize("phase", [False, True])
def test_the_model_traces_into_one_graph_with_a_symbolic_length(phase):
    """``is_causal`` must be a bool: ``t > 1`` on a dynamic length is a SymBool, which SDPA rejects, so
    torch.compile broke the graph there and ran the whole model's forward uncompiled once the length changed.
    A phase layer broke it twice where it asked whether inference mode was on."""
    if phase and not dynamo_traces_func_transform_check():
        pytest.skip("this torch's dynamo breaks the graph at torch.func's interpreter stack")
    phase_layer = dict(use_phase_attention=True, phase_layer_idx=(1,), num_oscillators=4) if phase else {}
    model = GPT(GPTConfig(vocab_size=VOCAB, max_seq_len=16, n_layers=2, n_heads=2, d_model=8, dropout=0.0,
                          **phase_layer))
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for t in (5, 1, 7):
        idx = tokens(2, t)
        torch.testing.assert_close(compiled(idx)[0], model(idx)[0])


@pytest.mark.parametrize("name", ["gpt", "gpt-mean_field", "gpt-attention"])
def test_an_exported_model_returns_the_same_info(name):
    """``torch.export`` (strict, as ``torch.compile(fullgraph=True)`` traces) of ``return_info=True``: the
    info dataclasses are pytrees (they were an error, "not a known type")."""
    model = MODEL_CASES[name]().float().eval()
    idx = tokens(2, 6)
    strict = not name.startswith("gpt-") or dynamo_traces_func_transform_check()  # (phase layers: not on torch 2.4)
    exported = torch.export.export(model, (idx,), {"targets": idx, "return_info": True}, strict=strict).module()
    (logits, loss, info), expected = exported(idx, targets=idx, return_info=True), model(idx, idx, return_info=True)
    assert type(info) is type(expected[2])
    torch.testing.assert_close((logits, loss, info.coherence_loss),
                               (expected[0], expected[1], expected[2].coherence_loss))
    for i, layer_info in expected[2].phase.items():
        torch.testing.assert_close(vars(info.phase[i]), vars(layer_info))
    # TPILM's too (torch 2.4 cannot export the memory's autocast-off regions, so not through export here)
    zero = torch.zeros(())
    leaves, spec = torch.utils._pytree.tree_flatten(TPILMInfo(zero))
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)
    assert leaves == [zero] and isinstance(rebuilt, TPILMInfo) and rebuilt.coherence_loss is zero


def test_importing_the_library_and_the_models_says_nothing():
    # torch 2.4's pytree registration warned of a deprecated helper of its own at every import
    done = subprocess.run([sys.executable, "-c", "import kuramoto_attn, models"], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_info_per_phase_layer_and_coherence_loss():
    model = phase_gpt()
    idx = tokens(3, 6)
    logits, loss, info = model(idx, idx, return_info=True)
    assert isinstance(info, GPTInfo) and sorted(info.phase) == [0, 2]
    for layer_info in info.phase.values():
        assert isinstance(layer_info, KuramotoInfo) and layer_info.R.shape == (3, 2)
        assert ((layer_info.R >= 0) & (layer_info.R <= 1 + 1e-12)).all()
    assert info.coherence_loss.shape == () and info.coherence_loss.item() == 0.0
    torch.testing.assert_close(model(idx, idx)[1], loss)  # the info does not change the loss

    regularized = phase_gpt(coherence_target=0.0, coherence_weight=0.5)  # R > 0 exceeds the ceiling 0
    _, loss, info = regularized(idx, idx, return_info=True)
    assert info.coherence_loss.item() > 0
    expected = sum(i.coherence_loss for i in info.phase.values())
    torch.testing.assert_close(info.coherence_loss, expected)
    torch.testing.assert_close(regularized(idx, idx)[1], loss)  # reported, never added
    info.coherence_loss.backward()
    assert regularized.blocks[0].attn.phase_proj.weight.grad.abs().sum() > 0
    _, _, tpi_info = tiny_tpi()(idx, return_info=True)
    assert isinstance(tpi_info, TPILMInfo) and tpi_info.coherence_loss.item() == 0.0


@pytest.mark.parametrize("name", ["gpt-mean_field", "tpi-vector", "tpi-window"])
def test_every_parameter_gets_a_finite_gradient(name):
    model = MODEL_CASES[name]().train()
    if isinstance(model, GPT):
        model = phase_gpt(coherence_target=0.0, learnable_coupling=True).train()
    idx = tokens(2, 8)
    _, loss, info = model(idx, idx, return_info=True)
    (loss + info.coherence_loss).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch's: no SDPA vmap rule
@pytest.mark.parametrize("name", ["gpt-mean_field", "gpt-attention", "tpi-vector"])
def test_per_sample_gradients_with_torch_func_equal_each_samples_own_backward(name):
    # the token-id check read the ids' values, which vmap cannot: a bare ".item()" error, no gradients
    model = MODEL_CASES[name]()
    idx = tokens(3, 6)
    params = {key: value.detach() for key, value in model.named_parameters()}

    def loss(params, ids):
        return torch.func.functional_call(model, params, (ids[None], ids[None]))[1]

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, idx)
    for i in range(3):
        model.zero_grad()
        model(idx[i:i + 1], idx[i:i + 1])[1].backward()
        for key, p in model.named_parameters():
            torch.testing.assert_close(per_sample[key][i], p.grad, rtol=1e-9, atol=1e-12, msg=key)


# ---------------------------------------------------------------- caches and generation

@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_cached_forward_equals_uncached(name):
    model = MODEL_CASES[name]()
    idx = tokens(2, 11)
    full, _, full_info = model(idx, return_info=True)
    cache = model.new_cache()
    pieces = [model(idx[:, :4], cache=cache)[0]]  # prefill
    pieces += [model(idx[:, i:i + 1], cache=cache)[0] for i in range(4, 8)]  # one token at a time
    pieces.append(model(idx[:, 8:], cache=cache)[0])  # several tokens after a prefix
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)
    if isinstance(model, GPT) and model.phase_layers:
        cache = model.new_cache()
        model(idx[:, :10], cache=cache)
        _, _, last = model(idx[:, 10:], cache=cache, return_info=True)
        torch.testing.assert_close(last.phase[2].phases, full_info.phase[2].phases[:, :, 10:])



def test_a_gpt_cache_emptied_of_its_layers_counts_from_zero():
    # as a TPI cache emptied of its states: the layers are filled on first use, the length restarts at 0
    model, idx = tiny_gpt(), tokens(2, 5)
    cache = model.new_cache()
    model(idx, cache=cache)
    cache.layers.clear()
    logits, _ = model(idx, cache=cache)
    assert cache.length == 5
    torch.testing.assert_close(logits, model(idx)[0], rtol=1e-9, atol=1e-9)


def test_a_gpt_cache_filled_with_gradients_on_holds_no_graph():
    # training-mode decoding: the next step attends over the cached keys and values as constants, so
    # a backward through it does not run into the previous step's graph (already freed)
    model = phase_gpt(phase_layer_idx=(2,))
    idx, cache = tokens(2, 6), model.new_cache()
    model(idx[:, :4], cache=cache)[0].sum().backward()
    assert not any(layer.keys.requires_grad or layer.values.requires_grad for layer in cache.layers[:2])
    model(idx[:, 4:], cache=cache)[0].sum().backward()



@pytest.mark.parametrize("kernel", ["unbounded", "window", "decay"])
def test_a_tpi_cache_filled_with_gradients_on_holds_no_graph(kernel):
    # as GPT's: states keeping each call's graph made the next call's backward run into the previous one's
    # (already freed: an error), kept the graph of every decoded token alive, and could not be deepcopied
    model = tiny_tpi(kernel=kernel, window=3) if kernel == "window" else tiny_tpi(kernel=kernel)
    idx, cache = tokens(2, 7), model.new_cache()
    model(idx[:, :4], cache=cache)[0].sum().backward()
    assert not any(tensor.requires_grad for state in cache.states
                   for tensor in (state.phase, state.memory, state.norm, *state.buffer))
    copied = copy.deepcopy(cache)
    for t in (slice(4, 5), slice(5, 7)):  # the one-token step, then the parallel form
        logits, _ = model(idx[:, t], cache=cache)
        logits.sum().backward()
        torch.testing.assert_close(model(idx[:, t], cache=copied)[0], logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, model(idx)[0][:, 5:], rtol=1e-9, atol=1e-9)

def test_a_tpi_cache_emptied_of_its_states_counts_from_zero():
    # states are filled on first use: a cache whose states were cleared starts again at the first token,
    # and its length counts from 0 (not on from the tokens of the states it no longer holds)
    model = tiny_tpi()
    idx = tokens(2, 5)
    cache = model.new_cache()
    model(idx, cache=cache)
    cache.states.clear()
    logits, _ = model(idx[:, :3], cache=cache)
    assert cache.length == 3
    torch.testing.assert_close(logits, model(idx[:, :3])[0], rtol=1e-9, atol=1e-9)


def test_a_one_token_tpi_cache_forward_takes_the_recurrent_step(monkeypatch):
    # as documented: one new token takes each layer's O(1) step, several the parallel form (the two agree to
    # rounding, so the logits alone cannot tell which ran)
    model, calls = tiny_tpi(), []
    step = HolographicPhaseMemory.step
    monkeypatch.setattr(HolographicPhaseMemory, "step", lambda self, *args: calls.append("step") or step(self, *args))
    for block in model.blocks:
        block.memory.register_forward_hook(lambda module, args, out: calls.append("forward"))
    cache = model.new_cache()
    model(tokens(2, 3), cache=cache)
    assert calls == ["forward"] * 2
    calls.clear()
    model(tokens(2, 1), cache=cache)
    assert calls == ["step"] * 2


def test_a_bfloat16_tpi_cache_keeps_float32_states():
    # the cache's states took the activations' dtype: in a bf16-true model the layers' running sums stuck
    # at 256 (and γ rounded to 1): cached logits past token 256 were ~30% off the uncached ones (now ~2%)
    model = tiny_tpi(torch.bfloat16, kernel="decay", normalize="sqrt", state="matrix", num_heads=2)
    idx = tokens(1, 400)
    cache = model.new_cache()
    with torch.no_grad():
        pieces = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, i:i + 1], cache=cache)[0] for i in range(8, 400)]
        cached, full = torch.cat(pieces, 1).float()[:, 256:], model(idx)[0].float()[:, 256:]
    assert (cached - full).norm() / full.norm() < 0.1
    assert all(s.memory.dtype == s.norm.dtype == torch.float32 for s in cache.states)


@pytest.mark.parametrize("kernel", ["window", "decay"])
def test_branches_of_a_tpi_cache_clone_are_independent(kernel):
    # a one-token forward writes the window kernel's ring buffer in place: two caches holding the same
    # states (copied lists) corrupted each other silently; clone() copies the buffers
    torch.manual_seed(0)
    model = tiny_tpi(kernel=kernel, window=4) if kernel == "window" else tiny_tpi(kernel=kernel)
    prompt, a = tokens(2, 6), tokens(2, 1)
    b = (a + 1) % VOCAB
    cache = model.new_cache()
    model(prompt, cache=cache)
    fork = cache.clone()
    assert fork.length == cache.length == 6
    model(a, cache=cache)
    logits, _ = model(b, cache=fork)
    expected, _ = model(torch.cat([prompt, b], 1))
    torch.testing.assert_close(logits[:, -1], expected[:, -1], rtol=1e-9, atol=1e-9)
    logits, _ = model(b, cache=cache)  # the first branch goes on unharmed by the second
    torch.testing.assert_close(logits[:, -1], model(torch.cat([prompt, a, b], 1))[0][:, -1], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t", [1, 3])
def test_a_bad_tpi_cache_is_an_error_naming_the_cache_before_any_layer_changes_it(t):
    # the layers' own checks named a "state" argument the user never gave (they passed cache=), and a
    # refusal at layer 1 came after layer 0 had replaced its state
    model = tiny_tpi()
    cache = model.new_cache()
    model(tokens(2, 4), cache=cache)
    foreign = tiny_tpi(state="matrix").new_cache()
    tiny_tpi(state="matrix")(tokens(2, 4), cache=foreign)
    with pytest.raises(ValueError, match=r"^cache: states\[0\]: expected memory .*different configuration"):
        model(tokens(2, t), cache=foreign)
    deeper = tiny_tpi(n_layers=3)  # a cache of fewer layers than the model (the test below: more)
    with pytest.raises(ValueError, match=r"^cache: holds 2 layer states but the model has 3 layers"):
        deeper(tokens(2, t), cache=cache)
    cache.states[1] = cache.states[1]._replace(position=-1)
    before = list(cache.states)
    with pytest.raises(ValueError, match=r"^cache: states\[1\]\.position: expected"):
        model(tokens(2, t), cache=cache)
    assert all(a is b for a, b in zip(cache.states, before)) and cache.length == 4


@pytest.mark.parametrize("name, other", [("gpt", lambda: phase_gpt()), ("gpt-mean_field", lambda: tiny_gpt()),
                                         ("tpi-vector", lambda: tiny_tpi(n_layers=3))])
def test_a_cache_of_another_batch_or_model_is_an_error(name, other):
    """A cache filled for batch 2 and then fed batch 3, or one of a model with other layers, is a
    ValueError naming the cache or state, not a bare shape error (or silently wrong logits)."""
    model = MODEL_CASES[name]()
    cache = model.new_cache()
    model(tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="^cache: .*batch size"):
        model(tokens(3, 1), cache=cache)
    foreign = other().new_cache()
    other()(tokens(2, 4), cache=foreign)
    with pytest.raises(ValueError, match="^cache: .*(another model|layers do not match)"):
        model(tokens(2, 1), cache=foreign)
    with pytest.raises(ValueError, match="^cache: expected a"):
        model(tokens(2, 1), cache=[])
    if isinstance(model, GPT):  # a plain layer took anything but a KVCache for no cache, silently
        short = model.new_cache()  # one layer fewer: the model ran only the layers that had a cache
        model(tokens(2, 4), cache=short)
        short.layers.pop()
        with pytest.raises(ValueError, match="^cache: its layers do not match this model's"):
            model(tokens(2, 1), cache=short)
        cache.layers = [None] * len(cache.layers)
        with pytest.raises(ValueError, match="^cache: its layers do not match this model's"):
            model(tokens(2, 1), cache=cache)

@pytest.mark.parametrize("name", list(MODEL_CASES))
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.8, 4)])
def test_generate_with_cache_equals_without(name, temperature, top_k):
    model = MODEL_CASES[name]()
    prompt = tokens(2, 5)
    # 5 + 12 tokens run past the GPTs' max_seq_len = 12 (the cache is refilled from the cropped window)
    runs = [model.generate(prompt, 12, temperature=temperature, top_k=top_k, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert runs[0].shape == (2, 17)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :5], prompt)


@pytest.mark.parametrize("name", ["gpt-mean_field", "tpi-vector"])
def test_generate_samples_at_temperature_1_and_from_every_token_by_default(name, monkeypatch):
    # the documented defaults (temperature=1.0, top_k=None) reach each step's sampling; at
    # initialisation the logits are too flat for the tokens alone to tell 1.0 from e.g. 0.9
    from models import sampling
    seen, sample_next = [], sampling.sample_next
    monkeypatch.setattr(sampling, "sample_next", lambda logits, temperature, top_k, *args:
                        seen.append((temperature, top_k)) or sample_next(logits, temperature, top_k, *args))
    MODEL_CASES[name]().generate(tokens(1, 3), 4)
    assert seen == [(1.0, None)] * 4


@pytest.mark.parametrize("name", ["gpt-mean_field", "tpi-vector"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_samples_only_ids_below_vocab_size(name, use_cache):
    # a tokenizer of 4 ids under an embedding padded to VOCAB = 13: never sample a padding id
    model = MODEL_CASES[name]()
    kwargs = dict(temperature=2.0, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    assert (model.generate(tokens(4, 3) % 4, 40, **kwargs)[:, 3:] >= 4).any()  # without the limit
    kwargs["generator"].manual_seed(0)
    assert (model.generate(tokens(4, 3) % 4, 40, vocab_size=4, **kwargs)[:, 3:] < 4).all()
    assert (model.generate(tokens(1, 3), 5, temperature=0, vocab_size=1) == torch.cat(
        [tokens(1, 3), torch.zeros(1, 5, dtype=torch.long)], 1)).all()



@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.5, None), (2.0, 3), (0.7, 2)])
def test_sampling_follows_the_tempered_top_k_softmax(temperature, top_k):
    from models.sampling import sample_next
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    draws = 40_000
    ids = sample_next(logits.expand(draws, -1), temperature, top_k, torch.Generator().manual_seed(0))
    frequency = torch.bincount(ids.flatten(), minlength=6).double() / draws
    expected = (logits.double() / temperature).exp()
    if top_k is not None:  # only the k largest logits keep their (renormalised) weight
        expected[logits.argsort(descending=True)[top_k:]] = 0.0
    expected /= expected.sum()
    assert (frequency[expected == 0] == 0).all()
    torch.testing.assert_close(frequency, expected, rtol=0, atol=0.01)  # standard error <= 0.0025


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_documented():
    from models.sampling import sample_next
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])  # k = 2: the 2nd largest, 2.0, is tied by id 3
    ids = sample_next(logits.expand(20_000, -1), 1.0, 2, torch.Generator().manual_seed(0))
    frequency = torch.bincount(ids.flatten(), minlength=5).double() / ids.numel()
    expected = torch.tensor([3.0, -math.inf, 2.0, 2.0, -math.inf], dtype=torch.float64).softmax(-1)
    assert (frequency[expected == 0] == 0).all()
    torch.testing.assert_close(frequency, expected, rtol=0, atol=0.015)  # standard error <= 0.0036


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_sampled_from_a_float32_softmax(dtype, monkeypatch):
    # tempering and softmax ran in the logits' dtype: bf16 probabilities erred by ~2^-8 (here 1e-3)
    from models.sampling import sample_next
    seen, multinomial = [], torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda probs, *args, **kwargs:
                        seen.append(probs) or multinomial(probs, *args, **kwargs))
    logits = torch.tensor([[0.0, -1.0, -2.5, 1.25]], dtype=dtype)  # exact in both dtypes
    sample_next(logits, 3.0, None, torch.Generator().manual_seed(0))
    expected = torch.softmax(logits.double() / 3.0, -1)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0].double(), expected, rtol=1e-6, atol=1e-7)


def test_temperature_zero_is_greedy_draws_nothing_and_the_loss_sums_float64_in_float64():
    from models.sampling import next_token_loss, sample_next
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]]).expand(50, -1)  # a tie at the top: the first id, every time
    assert sample_next(logits, 0, None, generator).flatten().tolist() == [1] * 50
    assert sample_next(logits, 0, 1, generator, vocab_size=2).flatten().tolist() == [1] * 50
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(0)))
    logits, targets = torch.randn(4, 7, 11, dtype=torch.float64), torch.randint(11, (4, 7))
    targets[0, :3] = -1  # ignored
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    assert next_token_loss(logits, targets).dtype == torch.float64
    torch.testing.assert_close(next_token_loss(logits, targets), expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-300])  # 1e-300 is 0 in float32
@pytest.mark.parametrize("top_k", [None, 2])
def test_a_tiny_temperature_samples_the_argmax(temperature, top_k):
    """As the temperature goes to 0 sampling becomes greedy: logits / T overflows float32 here, which
    must not give inf − inf = NaN probabilities (positive logits) or no finite logit at all (negative)."""
    from models.sampling import sample_next
    logits = torch.tensor([[2.0, 1.0, 3.0, -1.0], [-5.0, -2.0, -7.0, -3.0]]).repeat(50, 1)
    draws = sample_next(logits, temperature, top_k, torch.Generator().manual_seed(0))
    assert torch.equal(draws[:, 0], logits.argmax(-1))


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1e300), (torch.bfloat16, 1e39), (torch.float16, 1e9)])
def test_top_k_holds_at_a_huge_temperature(dtype, temperature):
    """top_k picks the k largest logits whatever the temperature: tempering rounds the logits here
    to 0 (T overflows the dtype, or the quotients underflow), which must not tie every id with the kth."""
    from models.sampling import sample_next
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0]], dtype=dtype).expand(2000, -1)
    assert (sample_next(logits, temperature, 1, torch.Generator().manual_seed(0)) == 0).all()
    draws = sample_next(logits, temperature, 2, torch.Generator().manual_seed(0)).flatten()
    assert set(draws.tolist()) == {0, 3}  # both kept, at the huge temperature's (near-)uniform odds


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generating_no_tokens_returns_the_prompt(name, use_cache):
    prompt = tokens(2, 5)
    assert torch.equal(MODEL_CASES[name]().generate(prompt, 0, use_cache=use_cache), prompt)


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_keeps_an_int32_prompts_dtype(name, use_cache):
    # int32 ids are accepted: the tokens are appended to them, as with no new tokens (not promoted to int64)
    model, prompt = MODEL_CASES[name](), tokens(2, 5)
    out = model.generate(prompt.int(), 4, temperature=0, use_cache=use_cache)
    assert out.dtype == torch.int32
    assert torch.equal(out, model.generate(prompt, 4, temperature=0, use_cache=use_cache).int())


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_a_vocab_limit_above_the_model_is_refused_even_for_no_new_tokens(name):
    model = MODEL_CASES[name]()
    with pytest.raises(ValueError, match="vocab_size: expected at most the model's"):
        model.generate(tokens(2, 5), 0, vocab_size=10**6)
    with pytest.raises(ValueError, match="^vocab_size: expected an integer"):  # not a bare TypeError from "13" > 13
        model.generate(tokens(2, 5), 0, vocab_size="13")


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_a_vocab_limit_of_all_the_models_ids_limits_nothing(name):
    model = MODEL_CASES[name]()
    prompt, vocab = tokens(2, 3), model.config.vocab_size
    want = model.generate(prompt, 4, generator=torch.Generator().manual_seed(3))
    got = model.generate(prompt, 4, vocab_size=vocab, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


def test_greedy_generation_matches_argmax_of_forward():
    model = tiny_gpt()
    prompt = tokens(1, 4)
    out = model.generate(prompt, 1, temperature=0)
    assert out[0, -1] == model(prompt)[0][0, -1].argmax()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-0.5), "temperature"),
    (dict(max_new_tokens=2, top_k=0), "top_k"),
    (dict(max_new_tokens=2, vocab_size=0), "vocab_size"),
    (dict(max_new_tokens=2, vocab_size=14), r"vocab_size: expected at most the model's 13 ids but got 14"),
    (dict(max_new_tokens=2, use_cache="False"), "use_cache"),
    (dict(max_new_tokens=2, context=13), r"context: expected an integer in \[1, max_seq_len=12\]"),
    (dict(max_new_tokens=2, context=0), "context"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    # greedy decoding draws nothing: a wrong generator was never used, so never noticed
    (dict(max_new_tokens=2, temperature=0, generator=42), "^generator: expected a torch.Generator or None but got int"),
])
def test_generate_checks_arguments_and_restores_mode(kwargs, message):
    model = tiny_gpt().train()
    with pytest.raises(ValueError, match=message):
        model.generate(tokens(1, 3), **kwargs)
    assert model.training
    model.generate(tokens(1, 3), 2)
    assert model.training
    with pytest.raises(ValueError, match="idx"):
        model.generate(torch.zeros(1, 3), 2)


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_generate_restores_every_submodule_mode(name):
    model = MODEL_CASES[name]().train()
    frozen = list(model.modules())[-1]  # e.g. a dropout or norm the user keeps in eval mode while training
    frozen.eval()
    modes = [m.training for m in model.modules()]
    model.generate(tokens(1, 3), 2)
    assert [m.training for m in model.modules()] == modes



@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_bad_targets_are_errors_naming_targets(name):
    model, idx = MODEL_CASES[name](), tokens(2, 5)
    for bad, message in ((tokens(2, 4), r"targets: expected the shape of idx \(2, 5\) but got \(2, 4\)"),
                         (idx.double(), "targets: expected int64 token ids"),
                         (idx.tolist(), "targets: expected the shape of idx"),
                         # the loss raised a bare RuntimeError (e.g. targets left on the CPU for a GPU batch)
                         (idx.to("meta"), "^targets: expected a tensor on idx's device cpu but got meta")):
        with pytest.raises(ValueError, match=message):
            model(idx, bad)
    with pytest.raises(ValueError, match="^return_info: expected True or False"):
        model(idx, return_info="False")  # would read as True


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_token_ids_outside_the_vocabulary_are_errors_naming_them(name):
    model, idx = MODEL_CASES[name](), tokens(2, 5)
    cases = [("idx", VOCAB, rf"idx: expected token ids in \[0, vocab_size={VOCAB}\) but got {VOCAB}"),
             ("idx", -1, r"idx: .* but got -1"),
             ("targets", VOCAB, rf"targets: expected token ids in \[0, vocab_size={VOCAB}\) or -1 .* got {VOCAB}"),
             ("targets", -100, r"targets: .* but got -100")]  # PyTorch's usual ignore index is not ours
    for which, bad_id, message in cases:
        inputs = {"idx": idx.clone(), "targets": idx.clone()}
        inputs[which][1, 3] = bad_id
        with pytest.raises(ValueError, match=message):
            model(inputs["idx"], inputs["targets"])
    # the edges that are valid: id vocab_size - 1 in both, -1 (ignored) in targets
    edge_idx, edge_targets = idx.clone(), idx.clone()
    edge_idx[0, 0], edge_targets[0, 0], edge_targets[1, 1] = VOCAB - 1, VOCAB - 1, -1
    _, loss = model(edge_idx, edge_targets)
    assert torch.isfinite(loss)
    for prompt, new_tokens in ((torch.full((1, 2), -1), 1), (torch.full((1, 20), -1), 0)):  # even if none is read
        with pytest.raises(ValueError, match="idx: .* but got -1"):
            model.generate(prompt, new_tokens)
    with pytest.raises(ValueError, match="targets: expected int64"):  # cross_entropy takes no int32
        model(idx, idx.int())
    _, int32_loss = model(idx.int(), idx)  # int32 ids are fine as input
    assert int32_loss == model(idx, idx)[1]


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_the_id_check_leaves_fake_tensors_to_tracing(name):
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = MODEL_CASES[name]()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        idx = mode.from_tensor(tokens(2, 5))
        logits, loss = model(idx, idx)
    assert logits.shape == (2, 5, VOCAB) and loss.shape == ()


def test_gpt_rejects_too_long_input():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 13))
    cache = model.new_cache()
    model(tokens(1, 12), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 1), cache=cache)


def test_generate_from_a_prompt_longer_than_the_context():
    model = phase_gpt()
    prompt = tokens(2, 15)  # max_seq_len is 12: both paths read the last 12 tokens
    runs = [model.generate(prompt, 4, temperature=0, use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 19)
    assert runs[0][0, 15] == model(prompt[:, -12:])[0][0, -1].argmax()


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_reads_at_most_context_tokens(use_cache):
    # context below max_seq_len (a model trained on shorter blocks): every token is the argmax
    # of the model on the last `context` tokens only, cached or not
    model = phase_gpt()
    full = model.generate(tokens(2, 3), 12, temperature=0, use_cache=use_cache, context=12)  # the largest
    assert torch.equal(full, model.generate(tokens(2, 3), 12, temperature=0, use_cache=use_cache))
    out = model.generate(tokens(2, 3), 9, temperature=0, use_cache=use_cache, context=np.int64(5))
    for i in range(3, 12):
        assert torch.equal(out[:, i], model(out[:, max(0, i - 5):i])[0][:, -1].argmax(-1))



@pytest.mark.parametrize("use_cache", [True, False])
def test_tpilm_generation_reads_the_whole_sequence_beyond_max_seq_len(use_cache):
    # recurrent: max_seq_len is the training context only; every token is the argmax given all before it
    model = tiny_tpi(max_seq_len=4)
    out = model.generate(tokens(2, 6), 5, temperature=0, use_cache=use_cache)
    for i in range(6, 11):
        assert torch.equal(out[:, i], model(out[:, :i])[0][:, -1].argmax(-1))

@pytest.mark.parametrize("use_cache", [True, False])
def test_tpilm_generate_passes_top_k_and_use_cache_on(use_cache):
    # top_k = 1 samples the argmax at any temperature; without the cache every forward reads the whole
    # sequence and is given no cache (the two ways agree, so the tokens alone cannot tell which ran)
    model, prompt, caches = tiny_tpi(), tokens(2, 4), []
    model.register_forward_pre_hook(lambda module, args, kwargs: caches.append(kwargs.get("cache")), with_kwargs=True)
    out = model.generate(prompt, 5, temperature=2.0, top_k=1, use_cache=use_cache,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, model.generate(prompt, 5, temperature=0, use_cache=use_cache))
    assert len(caches) == 10 and all((cache is not None) == use_cache for cache in caches)


def test_numpy_numbers_are_accepted_as_settings():
    # e.g. a sweep over np.linspace: NumPy scalars are numbers (bools are not)
    model = GPT(GPTConfig.from_dict(dict(vocab_size=np.int64(VOCAB), max_seq_len=12, n_layers=2, n_heads=2,
                                         d_model=16, use_phase_attention=True, phase_layer_idx=[1],
                                         num_oscillators=np.int32(4), coupling_strength=np.float32(0.5))))
    assert model.config.vocab_size == VOCAB and type(model.config.vocab_size) is int
    assert model.generate(tokens(1, 2), np.int64(3), temperature=np.float32(0.5), top_k=np.int64(2)).shape == (1, 5)
    with pytest.raises(ConfigError, match="num_oscillators: expected an integer"):
        GPTConfig.from_dict(dict(num_oscillators=np.bool_(True)))


def test_every_phase_option_reaches_the_phase_layers():
    values = dict(num_oscillators=5, coupling_strength=-0.7, steps=4, dt=0.07, integrator="heun",
                  coupling="attention", phase_lag=0.3, learnable_coupling=False, phase_noise=0.02,
                  freq_jitter=0.04, coherence_target=0.3, coherence_weight=0.2, coherence_mode="center")
    model = GPT(GPTConfig(vocab_size=11, max_seq_len=8, n_layers=2, n_heads=2, d_model=16, dropout=0.15,
                          use_phase_attention=True, phase_layer_idx=[1], **values))
    attn = model.blocks[1].attn
    assert (attn.num_oscillators, attn.steps, attn.dt, attn.integrator, attn.coupling, attn.phase_lag) == (
        5, 4, 0.07, "heun", "attention", 0.3)
    assert "strength" in dict(attn.named_buffers()) and attn.strength.flatten().tolist() == pytest.approx([-0.7] * 2)
    assert (attn.phase_noise.sigma, attn.freq_jitter.relative, attn.dropout) == (0.02, 0.04, 0.15)
    assert (attn.coherence.target, attn.coherence.weight, attn.coherence.mode) == (0.3, 0.2, "center")


def test_a_coupling_class_by_import_path_gives_each_phase_layer_its_own_module():
    model = MODEL_CASES["gpt-module"]()
    first, last = model.blocks[0].attn.coupling, model.blocks[2].attn.coupling
    assert isinstance(first, MeanFieldCoupling) and first is not last
    assert (first.dim, first.causal, first.harmonics, first.phase_lag, first.strength.item()) == (
        -2, True, (1, 2), 0.2, pytest.approx(0.8))
    names = [name for name, _ in model.named_buffers() if "coupling" in name]  # learnable=False: buffers
    assert names == ["blocks.0.attn.coupling.strength", "blocks.2.attn.coupling.strength"]


class _RandomRing(Coupling):
    """Random neighbour weights drawn at construction, from torch's global generator."""

    def __init__(self, n=4, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("weights", torch.rand(n))

    def interaction(self, theta, mask=None):
        return self.weights * torch.sin(theta.roll(1, -1) - theta)


def test_checking_a_coupling_class_leaves_the_models_random_numbers_alone(monkeypatch):
    module = types.ModuleType("random_ring_xyz")
    module.RandomRing = _RandomRing
    monkeypatch.setitem(sys.modules, "random_ring_xyz", module)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    config = GPTConfig(vocab_size=VOCAB, max_seq_len=8, n_layers=2, n_heads=2, d_model=16, use_phase_attention=True,
                       phase_layer_idx=[0, 1], num_oscillators=4, coupling="random_ring_xyz:RandomRing")
    assert torch.equal(torch.get_rng_state(), state)  # the check built a module: on a forked generator
    torch.manual_seed(5)
    model = GPT(config)
    torch.manual_seed(5)
    again = GPT(GPTConfig.from_dict(to_dict(config)))
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(model.blocks[0].attn.coupling.weights, model.blocks[1].attn.coupling.weights)



DROPOUT_CASES = {
    "gpt": lambda p: tiny_gpt(dropout=p),
    "gpt-attention": lambda p: phase_gpt("attention", dropout=p),
    "tpi-window": lambda p: tiny_tpi(kernel="window", window=3, dropout=p),
}


def test_tpilm_config_defaults_are_the_memorys_and_the_blocks():
    # its docstring: the memory's arguments "with its names and defaults"; a default changed in one place only
    # gave TPILM another model than HolographicPhaseMemory / TPIBlock built alone
    import inspect
    from kuramoto_attn import TPIBlock
    memory = inspect.signature(HolographicPhaseMemory).parameters
    config = TPILMConfig()
    shared = ("query", "constrained_scale", "kernel", "window", "magnitude", "normalize", "state", "num_heads",
              "expansion", "chunk_size")
    assert {name: getattr(config, name) for name in shared} == {name: memory[name].default for name in shared}
    assert config.ffn_expansion == inspect.signature(TPIBlock).parameters["ffn_expansion"].default


def test_the_plain_layers_drop_attention_weights_in_training():
    # GPTConfig: dropout on "the attention weights (plain and phase layers)"; the plain layers' is SDPA's dropout_p,
    # not an nn.Dropout module, which the dropout tests look for
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, max_seq_len=8, n_layers=1, n_heads=2, d_model=8, dropout=0.5))
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # only the attention weights' dropout is left
    idx = tokens(2, 8)
    assert not torch.allclose(model.train()(idx)[0], model(idx)[0])
    assert torch.equal(model.eval()(idx)[0], model(idx)[0])


@pytest.mark.parametrize("name", list(DROPOUT_CASES))
def test_dropout_acts_in_training_only_and_generation_runs_in_eval(name):
    """With dropout, eval mode is the dropout-free model exactly (the same weights), training mode
    applies every Dropout module of the model, and generate runs in eval even from training mode."""
    idx = tokens(2, 7)
    plain, model = DROPOUT_CASES[name](0.0), DROPOUT_CASES[name](0.3)
    expected = plain(idx)[0]
    torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=0)
    dropouts = [module for module in model.modules() if isinstance(module, torch.nn.Dropout)]
    called = set()
    for module in dropouts:
        module.register_forward_hook(lambda module, args, out: called.add(id(module)))
    model.train()
    assert not torch.allclose(model(idx)[0], expected)
    assert called == {id(module) for module in dropouts}  # none is constructed and then skipped
    kwargs = dict(temperature=0.0, use_cache=True)
    assert torch.equal(model.generate(idx, 4, **kwargs), plain.generate(idx, 4, **kwargs))
    assert model.training and not plain.training  # each mode restored

def test_tpilm_dropout_reaches_every_place():
    model = TPILM(TPILMConfig(vocab_size=11, d_model=8, n_layers=1, dropout=0.2))
    block = model.blocks[0]
    assert model.drop.p == 0.2 and block.memory.head[1].p == 0.2 and block.ffn[-1].p == 0.2



def test_every_tpi_option_reaches_the_memory_and_the_blocks():
    # every option away from its default (constrained_scale 0: the bound >= 0 is inclusive)
    values = dict(query="constrained", constrained_scale=0.0, kernel="window", window=5, magnitude="sigmoid",
                  normalize="sqrt", state="matrix", num_heads=2, expansion=3, chunk_size=7)
    model = TPILM(TPILMConfig(vocab_size=11, d_model=8, n_layers=2, ffn_expansion=3, dropout=0.1, **values))
    for block in model.blocks:
        memory = block.memory
        assert {name: getattr(memory, "state_type" if name == "state" else name) for name in values} == values
        assert memory.dropout == 0.1 and block.ffn[0].out_features == 24 and block.ffn[-1].p == 0.1
    # no FFN: the dropout still reaches the embedding and the memory's head, and the blocks take none
    model = TPILM(TPILMConfig(vocab_size=11, d_model=8, n_layers=1, ffn_expansion=0, dropout=0.2))
    assert model.blocks[0].ffn is None and model.drop.p == 0.2 and model.blocks[0].memory.head[1].p == 0.2


def test_tpilm_head_is_tied_to_its_embedding_initialised_as_gpts():
    torch.manual_seed(0)
    model = TPILM(TPILMConfig(vocab_size=256, d_model=64, n_layers=1))
    assert model.head.weight is model.tok_emb.weight
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)  # small logits at the start
    logits, _ = model(tokens(2, 5))
    assert logits.abs().max() < 1.0


@pytest.mark.parametrize("name", ["gpt-mean_field", "tpi-window"])
def test_the_head_stays_tied_to_the_embedding_when_built_on_the_meta_device(name):
    # to_empty (and .to("meta")) gave the head and the embedding a new Parameter each, load_state_dict(assign=True)
    # a tensor each: loaded, the model computed the same, but trained the head apart from the embedding
    trained = MODEL_CASES[name]()
    state, idx = trained.state_dict(), tokens(2, 5)
    with torch.device("meta"):
        empty, assigned = MODEL_CASES[name](), MODEL_CASES[name]()
    empty.to_empty(device="cpu").load_state_dict(state)
    assigned.load_state_dict(state, assign=True)
    moved = MODEL_CASES[name]().to("meta")
    for model in (empty, assigned, moved):
        assert model.head.weight is model.tok_emb.weight
        assert model.num_params(non_embedding=False) == trained.num_params(non_embedding=False)
    for model in (empty, assigned):
        torch.testing.assert_close(model(idx)[0], trained(idx)[0], rtol=0, atol=0)
        model(idx)[0].sum().backward()
        assert model.head.weight.grad is model.tok_emb.weight.grad  # one gradient: the head's and the embedding's
    untied, replaced = MODEL_CASES[name](), MODEL_CASES[name]()
    untied.head.weight = torch.nn.Parameter(untied.tok_emb.weight.detach().clone())  # untied on purpose: left so
    assert untied.to(torch.float32).head.weight is not untied.tok_emb.weight
    replaced.head = torch.nn.Identity()  # a head of the user's, without a weight
    assert isinstance(replaced.to(torch.float32).head, torch.nn.Identity)

@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_a_state_dict_naming_the_tied_tensor_once_loads_tied(name):
    # safetensors' save_model keeps one name of a shared tensor; with assign=True the other attribute kept its
    # random initial weights: an untied model with wrong logits, and only the expected missing key to show it.
    # The name is still reported missing: safetensors.torch.load_model looks for it there (else "unexpected")
    trained, idx = MODEL_CASES[name](), tokens(2, 5)
    for kept in ("head.weight", "tok_emb.weight"):
        dropped = {"head.weight": "tok_emb.weight", "tok_emb.weight": "head.weight"}[kept]
        state = {key: value for key, value in trained.state_dict().items() if key != dropped}
        for assign in (True, False):
            torch.manual_seed(5)
            model = MODEL_CASES[name]()
            assert model.load_state_dict(state, assign=assign, strict=False).missing_keys == [dropped]
            assert model.head.weight is model.tok_emb.weight
            torch.testing.assert_close(model(idx)[0], trained(idx)[0], rtol=0, atol=0)
        outer, wrapped = torch.nn.ModuleDict({"lm": MODEL_CASES[name]()}), {f"lm.{k}": v for k, v in state.items()}
        assert outer.load_state_dict(wrapped, assign=True, strict=False).missing_keys == [f"lm.{dropped}"]
        assert outer["lm"].head.weight is outer["lm"].tok_emb.weight  # inside another module: keys with a prefix
        torch.testing.assert_close(outer["lm"](idx)[0], trained(idx)[0], rtol=0, atol=0)
    copies = {key: value.clone() for key, value in trained.state_dict().items()}  # equal, not one storage
    model = MODEL_CASES[name]()
    model.load_state_dict(copies, assign=True)
    assert model.head.weight is model.tok_emb.weight
    torch.testing.assert_close(model(idx)[0], trained(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_a_state_dict_whose_head_differs_from_its_embedding_is_refused_by_a_tied_model(name):
    # saved from a model untied on purpose: the tied model loaded the head over the embedding, silently
    untied = MODEL_CASES[name]()
    untied.head.weight = torch.nn.Parameter(untied.tok_emb.weight.detach() * 2)
    state = untied.state_dict()
    in_half = {**state, "head.weight": state["tok_emb.weight"].half()}  # in another dtype: compared as well
    for given, assign in ((state, False), (state, True), (in_half, False)):
        with pytest.raises(RuntimeError, match=r"head.weight and tok_emb.weight differ, but this model's head is tied "
                                               r"to its embedding .*; untie it first to load both"):
            MODEL_CASES[name]().load_state_dict(given, assign=assign, strict=False)
    exact = {**state, "head.weight": state["tok_emb.weight"].double()}  # the same values in float64: one tensor
    model = MODEL_CASES[name]()
    model.load_state_dict(exact)
    assert model.head.weight is model.tok_emb.weight and torch.equal(model.head.weight, state["tok_emb.weight"])
    diverged = {key: value.clone() for key, value in MODEL_CASES[name]().state_dict().items()}
    diverged["tok_emb.weight"][0, 0] = diverged["head.weight"][0, 0] = float("nan")  # equal copies, NaN and all
    model.load_state_dict(diverged, assign=True)
    assert model.head.weight is model.tok_emb.weight and model.head.weight[0, 0].isnan()
    wrong = {**state, "head.weight": torch.zeros(state["head.weight"].shape[0] + 1, state["head.weight"].shape[1])}
    with pytest.raises(RuntimeError, match=r"size mismatch for head.weight"):  # loaded silently over it
        MODEL_CASES[name]().load_state_dict(wrong)
    model = MODEL_CASES[name]()
    model.head.weight = torch.nn.Parameter(model.tok_emb.weight.detach().clone())  # untied: loads both
    model.load_state_dict(state)
    assert torch.equal(model.head.weight, untied.head.weight) and torch.equal(model.tok_emb.weight,
                                                                               untied.tok_emb.weight)


@pytest.mark.parametrize("name", ["gpt", "tpi-vector"])
def test_a_meta_state_dict_assigned_keeps_a_tied_model_tied_and_an_untied_one_untied(name):
    # meta tensors all have data_ptr 0, so ties cannot be read from storage: a tied model came back untied
    model = MODEL_CASES[name]()
    model.load_state_dict(MODEL_CASES[name]().to("meta").state_dict(), assign=True)
    assert model.head.weight is model.tok_emb.weight and model.head.weight.is_meta
    untied = MODEL_CASES[name]()
    untied.head.weight = torch.nn.Parameter(untied.tok_emb.weight.detach().clone())
    untied.load_state_dict({k: torch.empty_like(v, device="meta") for k, v in untied.state_dict().items()},
                           assign=True)
    assert untied.head.weight is not untied.tok_emb.weight


def test_gpt_init_is_nanogpts_and_keeps_the_phase_layers_own():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, max_seq_len=16, n_layers=4, n_heads=4, d_model=256,
                       use_phase_attention=True, phase_layer_idx=[1], num_oscillators=8)
    model = GPT(config)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.02)
    assert model.blocks[1].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.02)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
               and not name.startswith("blocks.1.attn")]
    assert len(linears) == 4 * 4 - 2 and not any(m.bias.any() for m in linears)  # zero biases
    # the phase layer keeps nn.Linear's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
    assert model.blocks[1].attn.phase_proj.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)


@pytest.mark.parametrize("name", ["gpt", "gpt-mean_field", "tpi-vector"])
def test_idx_on_another_device_than_the_model_is_an_error_naming_idx(name):
    # the embedding's device error named no argument (and a meta model took CPU ids silently)
    model = MODEL_CASES[name]().float().to("meta")
    with pytest.raises(ValueError, match=r"^idx: expected a tensor on the model's device meta but got cpu"):
        model(tokens(2, 5))
    with pytest.raises(ValueError, match=r"^idx: expected a tensor on the model's device meta but got cpu"):
        model.generate(tokens(1, 3), 2)


@pytest.mark.parametrize("name", ["gpt-mean_field", "tpi-vector"])
def test_models_run_on_the_meta_device(name):
    # shapes and FLOPs estimated without memory: every layer, TPI's rates outside autocast included
    model = MODEL_CASES[name]().float().to("meta")
    logits, loss = model(tokens(2, 5).to("meta"), targets=tokens(2, 5).to("meta"))
    assert logits.device.type == "meta" and logits.shape == (2, 5, VOCAB) and loss.shape == ()


def test_a_tpi_cache_of_another_model_of_the_same_layers_is_refused():
    # it was taken silently: the other model continued the first model's states (as GPT's plain layers did)
    model, other = tiny_tpi(seed=0), tiny_tpi(seed=1)
    idx = tokens(2, 6)
    cache = model.new_cache()
    model(idx[:, :4], cache=cache)
    for foreign in (other, copy.deepcopy(model)):  # a copy too: its weights may have been changed since
        with pytest.raises(ValueError, match=r"^cache: filled by another model \(of the same layers\)"):
            foreign(idx[:, 4:5], cache=cache)
        with pytest.raises(ValueError, match=r"^cache: filled by another model \(of the same layers\)"):
            foreign(idx[:, 4:5], cache=cache.clone())  # a branch keeps its owner
    assert cache.length == 4
    logits, _ = model(idx[:, 4:], cache=cache)
    torch.testing.assert_close(logits, model(idx)[0][:, 4:], rtol=1e-9, atol=1e-9)


def test_a_tpi_cache_is_refused_by_a_model_built_again_where_its_model_was():
    # the cache recorded its model's id, and CPython gives a freed object's id to the next one of its
    # size: `model = TPILM(config)` run again took the previous model's cache and continued its states
    config = TPILMConfig(vocab_size=VOCAB, d_model=8, n_layers=2, chunk_size=4)
    idx = tokens(2, 5)
    model = TPILM(config)
    cache = model.new_cache()
    model(idx[:, :4], cache=cache)
    freed = id(model)
    del model  # (the cache keeps no reference to it)
    model = built_where_freed(TPILM, freed, config)
    with pytest.raises(ValueError, match=r"^cache: filled by another model \(of the same layers\)"):
        model(idx[:, 4:], cache=cache)
    assert cache.owner() is None and cache.length == 4


@pytest.mark.parametrize("name", ["gpt", "gpt-mean_field", "tpi-window"])
def test_copies_of_a_cache_belong_to_the_model_they_were_copied_with(name):
    # deepcopy of a cache alone: the same model's (branches); of model and cache in one call: the copies
    # go together, as a pair saved in one object would; pickled and loaded: no model's (its model is not
    # pickled along), refused rather than attached to whichever model has that id
    import pickle

    model = MODEL_CASES[name]()
    idx = tokens(2, 6)
    cache = model.new_cache()
    model(idx[:, :4], cache=cache)
    expected = model(idx)[0][:, 4:5]
    refused = r"^cache: filled by another model \(of the same layers\)"
    torch.testing.assert_close(model(idx[:, 4:5], cache=copy.deepcopy(cache))[0], expected, rtol=1e-9, atol=1e-9)
    model_copy, cache_copy = copy.deepcopy((model, cache))
    torch.testing.assert_close(model_copy(idx[:, 4:5], cache=cache_copy)[0], expected, rtol=1e-9, atol=1e-9)
    for other, foreign in ((model, copy.deepcopy(cache_copy)), (model_copy, copy.deepcopy(cache))):
        with pytest.raises(ValueError, match=refused):
            other(idx[:, 4:5], cache=foreign)
    loaded = pickle.loads(pickle.dumps(cache))
    with pytest.raises(ValueError, match=refused):
        model(idx[:, 4:5], cache=loaded)
    assert (cache.owner() if name.startswith("tpi") else cache.layers[0].owner()) is \
        (model if name.startswith("tpi") else model.blocks[0].attn)  # unchanged by the copies


@pytest.mark.parametrize("make", [lambda seed: phase_gpt(phase_layer_idx=(2,), seed=seed),
                                  lambda seed: tiny_gpt(seed=seed)], ids=["phase", "plain"])
def test_a_cache_of_another_model_of_the_same_layers_is_refused_before_any_layer_changes_it(make):
    # its phase layer refused it, after the plain layer before it had taken the new token: the cache,
    # used on with its own model, then gave logits from one token too many in that layer; a model of
    # plain layers only took it silently and attended over the first model's keys and values
    model, other = make(0), make(1)
    idx = tokens(2, 6)
    cache = model.new_cache()
    model(idx[:, :4], cache=cache)
    with pytest.raises(ValueError, match=r"^cache: filled by another model \(of the same layers\)"):
        other(idx[:, 4:5], cache=cache)
    assert [layer.keys.shape[2] for layer in cache.layers] == [4, 4, 4]
    logits, _ = model(idx[:, 4:], cache=cache)
    torch.testing.assert_close(logits, model(idx)[0][:, 4:], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("phase_layers", [(), (2,)])
def test_a_gpt_cache_on_another_device_is_an_error_naming_the_cache(phase_layers):
    # the plain layers' torch.cat raised a bare RuntimeError (the phase layers name the cache)
    model = phase_gpt(phase_layer_idx=phase_layers) if phase_layers else tiny_gpt()
    cache = model.new_cache()
    model(tokens(2, 4), cache=cache)
    with pytest.raises(ValueError, match="^cache: holds tensors on cpu but idx is on meta"):
        model.to("meta")(tokens(2, 1).to("meta"), cache=cache)


def test_a_cache_filled_in_another_dtype_is_refused_before_any_layer_changes_it():
    # the plain layers refuse it as the phase layers do: torch.cat would promote, and a refusal at a
    # later layer would leave the earlier layers' caches one token longer than the others
    model = phase_gpt(phase_layer_idx=(2,)).float()  # plain layers first
    cache = model.new_cache()
    model(tokens(2, 4), cache=cache)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(
            ValueError, match="^cache: holds keys of dtype torch.float32 but this call computes torch.bfloat16"):
        model(tokens(2, 1), cache=cache)
    assert all(torch.equal(layer.keys, k) and torch.equal(layer.values, v)
               for layer, (k, v) in zip(cache.layers, before))
