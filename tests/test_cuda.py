"""The same properties on a CUDA device: skipped where torch sees no GPU (CI has none).

The CPU float64 path is checked against naive references elsewhere; here the GPU path is checked
against it: float64 on the GPU to rounding, float32 and bf16 autocast to their precision. Run on a
GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from recipes.common import load_run
from recipes.config import parse_config
from recipes.train import train

from test_attention import COUPLINGS, INTEGRATORS, left_padding, make_layer
from test_models import MODEL_CASES, tokens
from test_recipes import WORDS, interrupt_then_resume, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def forward_and_grads(layer, x, valid, probe):
    x = x.detach().requires_grad_(True)
    y, info = layer(x, valid, return_info=True)
    grads = torch.autograd.grad((y.float() * probe).sum(), [x, *layer.parameters()])
    return y, info, grads


def relative_error(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("integrator", INTEGRATORS)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_float64_on_gpu_equals_cpu(coupling, integrator, padded, training):
    """Output, phases and every gradient, through the checkpointed integration (for Euler mean field
    the fused one), which grad mode takes in train and eval mode alike."""
    gen = torch.Generator().manual_seed(7)
    layer = make_layer(coupling=coupling, integrator=integrator).train(training)
    x = torch.randn(3, 9, 16, generator=gen, dtype=torch.float64)
    valid = left_padding(3, 9, gen) if padded else None
    probe = torch.randn(3, 9, 16, generator=gen, dtype=torch.float64)
    y, info, grads = forward_and_grads(layer, x, valid, probe)
    gpu = copy.deepcopy(layer).to(CUDA)
    y_gpu, info_gpu, grads_gpu = forward_and_grads(gpu, x.to(CUDA), None if valid is None else valid.to(CUDA),
                                                   probe.to(CUDA))
    keep = slice(None) if valid is None else valid
    torch.testing.assert_close(y_gpu.cpu()[keep], y[keep], rtol=0, atol=1e-10)
    torch.testing.assert_close(info_gpu.phases.cpu(), info.phases, rtol=0, atol=1e-10)
    for name, g, g_gpu in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_gpu):
        torch.testing.assert_close(g_gpu.cpu(), g, rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_float32_and_bf16_autocast_on_gpu_are_close_to_float64(coupling):
    """A size where SDPA picks its fused kernels; phases stay float32 under autocast. (With cuDNN's
    SDPA kernel computing the attention coupling's field, bf16 gradients were ~100% off on an H100.)"""
    torch.manual_seed(0)
    layer = make_layer(coupling=coupling, d_model=128, num_heads=2, num_oscillators=32, steps=10, dt=0.1,
                       phase_lag=0.0).train()
    x = torch.randn(4, 128, 128, dtype=torch.float64)
    probe = torch.randn(4, 128, 128, dtype=torch.float64)
    y, _, grads = forward_and_grads(layer, x, None, probe)
    gpu = copy.deepcopy(layer).float().to(CUDA)
    y32, info32, grads32 = forward_and_grads(gpu, x.float().to(CUDA), None, probe.float().to(CUDA))
    assert relative_error(y32, y) < 1e-4
    assert max(relative_error(g32, g) for g32, g in zip(grads32, grads)) < 1e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y16, info16, grads16 = forward_and_grads(gpu, x.float().to(CUDA), None, probe.float().to(CUDA))
    assert y16.dtype == torch.bfloat16 and info16.phases.dtype == torch.float32
    assert relative_error(y16, y) < 3e-2
    assert all(torch.isfinite(g).all() for g in grads16)
    assert max(relative_error(g16, g) for g16, g in zip(grads16, grads)) < 0.1


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_future_tokens_never_change_the_past_on_gpu(coupling):
    torch.manual_seed(1)
    layer = make_layer(dtype=torch.float32, coupling=coupling, d_model=64, num_heads=2,
                       num_oscillators=8).to(CUDA)
    x = torch.randn(2, 40, 64, device=CUDA)
    changed = x.clone()
    changed[:, 25:] = torch.randn(2, 15, 64, device=CUDA)
    with torch.no_grad():
        y, y_changed = layer(x), layer(changed)
    torch.testing.assert_close(y_changed[:, :25], y[:, :25], rtol=0, atol=1e-5)
    assert (y_changed[:, 25:] - y[:, 25:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_models_on_gpu_equal_cpu_and_cache_equals_uncached(name):
    """GPT (with phase layers) and TPILM in float64: GPU forward == CPU forward, cached == uncached,
    and cached generation == uncached generation."""
    model = MODEL_CASES[name]()
    idx = tokens(2, 11)
    full = model(idx)[0]
    gpu, idx_gpu = copy.deepcopy(model).to(CUDA), idx.to(CUDA)
    torch.testing.assert_close(gpu(idx_gpu)[0].cpu(), full, rtol=0, atol=1e-10)
    cache = gpu.new_cache()
    pieces = [gpu(idx_gpu[:, :4], cache=cache)[0]]
    pieces += [gpu(idx_gpu[:, i:i + 1], cache=cache)[0] for i in range(4, 8)]
    pieces.append(gpu(idx_gpu[:, 8:], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1).cpu(), full, rtol=0, atol=1e-9)
    runs = [gpu.generate(idx_gpu[:, :5], 12, temperature=0.8, top_k=4, use_cache=use_cache,
                         generator=torch.Generator(CUDA).manual_seed(3)) for use_cache in (True, False)]
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="^generator: expected one on idx's device cuda"):
        gpu.generate(idx_gpu[:, :5], 2, generator=torch.Generator().manual_seed(3))  # a CPU generator


def test_training_on_gpu_defaults_to_bf16_mixed_learns_and_resumes(tmp_path, monkeypatch):
    corpus = tmp_path / "text.txt"
    corpus.write_text((WORDS * 60).strip() + "\n")
    settings = dict(fabric={"accelerator": "cuda", "precision": None},
                    train={"max_iters": 40, "eval_interval": 20, "eval_iters": 2, "log_interval": 1,
                           "batch_size": 4, "block_size": 16, "progress_bar": False, "plots": False})
    straight = tiny(tmp_path / "a", corpus, **settings)
    result = train(parse_config(straight))
    state = torch.load(tmp_path / "a" / "run" / "last.pt", map_location="cpu", weights_only=True)
    first = next(h["train_loss"] for h in state["progress"]["history"] if "train_loss" in h)
    assert result["status"] == "finished" and result["final_val_loss"] < first - 0.5
    assert state["trained_precision"] == "bf16-mixed"  # what precision null resolves to on a GPU
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    model, _, config, _ = load_run(tmp_path / "a" / "run")
    assert config.fabric.precision is None and next(model.parameters()).device.type == "cpu"

    interrupted = tiny(tmp_path / "b", corpus, **settings)
    saved, resumed_result = interrupt_then_resume(interrupted, 23, monkeypatch)
    assert saved["progress"]["step"] == 23 and resumed_result["step"] == 40
    resumed = torch.load(tmp_path / "b" / "run" / "last.pt", map_location="cpu", weights_only=True)["model"]
    # GPU kernels may sum in a different order from run to run, so equal up to rounding, not bit for bit
    for key, value in state["model"].items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_batches_on_gpu_equal_cpu_batches():
    # the GPU path copies one pinned block and slices it there: the same windows, contiguous
    import numpy as np

    from recipes.data import get_batch
    data = np.arange(1000, dtype=np.uint16)
    for step in range(3):
        x, y = get_batch(data, 6, 16, seed=1, step=step, device="cuda")
        cx, cy = get_batch(data, 6, 16, seed=1, step=step)
        assert x.device.type == "cuda" and x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x.cpu(), cx) and torch.equal(y.cpu(), cy)
