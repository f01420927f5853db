"""Shared by the language models (``GPT``, ``TPILM``): input checks, the loss, and autoregressive
sampling (``GPT.generate``, ``TPILM.generate``).

A model plugs in with two things: ``model(idx, cache=cache)`` returning ``(logits, loss)`` for the
new tokens of ``idx`` (the cache updated in place), and ``model.new_cache()`` returning an empty
cache. ``context`` is the longest input the model accepts (learned positions), or ``None`` when it
has no limit (a recurrent model).
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from kuramoto_attn._checks import check_bool, check_int, in_func_transform


def check_idx(idx, name: str = "idx", vocab_size: int | None = None) -> tuple[int, int]:
    """``idx`` must be an integer tensor ``(b, t)`` with ``b, t >= 1``; returns ``(b, t)``.

    With ``vocab_size``, ids outside ``[0, vocab_size)`` are an error too, checked on CPU tensors in
    eager mode outside ``torch.func`` transforms only: on an accelerator reading the values back would
    synchronise every forward (the embedding's own device-side assert applies there), a compiled graph
    would break, and ``vmap`` cannot read them."""
    if not torch.is_tensor(idx) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if torch.is_tensor(idx) else type(idx).__name__
        raise ValueError(f"{name}: expected an int64 or int32 tensor of token ids but got {got}")
    if idx.dim() != 2 or 0 in idx.shape:
        raise ValueError(f"{name}: expected shape (batch >= 1, tokens >= 1) but got {tuple(idx.shape)}")
    if vocab_size is not None:
        _check_ids(idx, name, vocab_size, lowest=0)
    return idx.shape[0], idx.shape[1]


def _check_ids(ids: Tensor, name: str, vocab_size: int, lowest: int) -> None:
    """Ids in ``[lowest, vocab_size)``, checked where reading them costs no synchronisation, no graph
    break and no data-dependent trace: a real CPU tensor, in eager mode, outside ``torch.func``
    transforms (``vmap`` cannot read a batched tensor's values)."""
    if ids.device.type != "cpu" or torch.compiler.is_compiling() or is_fake(ids) or in_func_transform():
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < lowest or high >= vocab_size:
        ignored = " or -1 (ignored)" if lowest == -1 else ""
        raise ValueError(f"{name}: expected token ids in [0, vocab_size={vocab_size}){ignored} "
                         f"but got {low if low < lowest else high}")


def sample_next(logits: Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, vocab_size: int | None = None) -> Tensor:
    """One token per row from ``logits`` ``(b, vocab)`` -> ``(b, 1)``; temperature 0 is greedy.
    Only ids below ``vocab_size`` are drawn (all when ``None``)."""
    if vocab_size is not None:
        check_vocab_limit(vocab_size, logits.shape[-1])
        logits = logits[:, :vocab_size]
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    # float32 at least (a bf16 / float16 model's logits): tempering and softmax in bf16 erred by ~2^-8
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # the largest logit moved to 0 first: a tiny temperature then sends the others to -inf, never inf - inf;
    # it stays 0 where the temperature rounds to 0 in the logits' dtype (0 / 0 would be NaN)
    shifted = logits - logits.max(-1, keepdim=True).values
    if top_k is not None:  # chosen before tempering: a huge temperature rounds every logit to 0, all tied
        kth = torch.topk(shifted, min(top_k, shifted.shape[-1])).values[:, -1:]  # (b, 1)
        dropped = shifted < kth
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_k is not None:
        logits = logits.masked_fill(dropped, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def check_vocab_limit(vocab_size: int | None, model_vocab_size: int) -> None:
    """``vocab_size`` (a limit on the sampled ids, or None) is at most the model's number of ids."""
    if vocab_size is not None and check_int("vocab_size", vocab_size, low=1) > model_vocab_size:
        # a limit above the model's ids would limit nothing
        raise ValueError(f"vocab_size: expected at most the model's {model_vocab_size} ids but got {vocab_size}")


def generate(model: nn.Module, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None, context: int | None = None,
             vocab_size: int | None = None) -> Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``idx`` ``(b, t)`` -> ``(b, t + max_new_tokens)``.

    ``vocab_size`` limits the sampled ids to those below it: the tokenizer's vocabulary when the
    model's embedding is padded beyond it (``None``: every id the model has).

    Without the cache the model reads the last ``context`` tokens at every step (nanoGPT). With
    it the prompt is prefilled once, then one token at a time; when the cache holds ``context``
    tokens it is refilled from the last ``context`` tokens, so both paths see the same inputs
    (learned positions make a sliding cache wrong). Runs under ``torch.no_grad()`` in eval mode and
    restores the mode of every submodule (one left in eval mode inside a training model stays so).
    """
    check_idx(idx)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number >= 0 but got {temperature!r}")
    top_k, vocab_size, context = (None if value is None else check_int(name, value, low=1) for name, value in
                                  (("top_k", top_k), ("vocab_size", vocab_size), ("context", context)))
    use_cache = check_bool("use_cache", use_cache)
    # checked here, not by torch.multinomial: greedy decoding never draws, so a wrong one went unnoticed there
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None but got {type(generator).__name__}")
    if generator is not None and generator.device.type != idx.device.type:
        raise ValueError(f"generator: expected one on idx's device {idx.device} but got {generator.device}")
    with eval_mode(model), torch.no_grad():
        cache = None
        for _ in range(max_new_tokens):
            window = idx if context is None else idx[:, -context:]
            if not use_cache:
                logits, _ = model(window)
            elif cache is None or (context is not None and cache.length >= context):
                cache = model.new_cache()  # prefill (the prompt, or the cropped window)
                logits, _ = model(window, cache=cache)
            else:
                logits, _ = model(idx[:, -1:], cache=cache)  # the newest token only
            next_token = sample_next(logits[:, -1], temperature, top_k, generator, vocab_size)  # (b, 1)
            idx = torch.cat([idx, next_token.to(idx.dtype)], dim=1)  # an int32 prompt stays int32
    return idx


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` in eval mode inside the block (no dropout, phase noise or frequency jitter), and every
    submodule back in its own mode after it (``model.train()`` would put a frozen submodule in training).
    Anything else callable (a function standing in for a model) has no modes to set."""
    if not isinstance(model, nn.Module):
        yield model
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(..., v)`` against ``targets`` ``(...)`` over the targets
    that are not ``-1`` (ignored). When every target is ignored the loss is 0, with a zero gradient:
    ``F.cross_entropy``'s mean would be 0/0 = NaN there, which a training loop takes for divergence.
    The sum is taken in float32 at least, the loss returned in ``F.cross_entropy``'s dtype (the logits',
    float32 under autocast): a float16 sum passed 65504 (e.g. 16384 tokens at ln(50304) nats each) and
    the loss was inf."""
    logits, targets, count = logits.flatten(0, -2), targets.flatten(), (targets != -1).sum().clamp(min=1)
    if logits.dtype not in (torch.float16, torch.bfloat16):  # float32 / float64: cross_entropy's own sum
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum") / count
    losses = F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")  # (b·t,)
    return (losses.sum(dtype=torch.float32) / count).to(losses.dtype)


def check_targets(targets, idx: torch.Tensor, vocab_size: int | None = None) -> None:
    """``targets`` is None or an int64 tensor of ``idx``'s shape ``(b, t)`` on its device; with ``vocab_size``
    (CPU only, as :func:`check_idx`), its ids are in ``[0, vocab_size)`` or ``-1`` (ignored)."""
    if targets is None:
        return
    if not torch.is_tensor(targets) or targets.shape != idx.shape:
        got = tuple(targets.shape) if torch.is_tensor(targets) else type(targets).__name__
        raise ValueError(f"targets: expected the shape of idx {tuple(idx.shape)} but got {got}")
    if targets.dtype != torch.int64:  # what cross_entropy takes
        raise ValueError(f"targets: expected int64 token ids (-1 = ignored) but got {targets.dtype}")
    if targets.device != idx.device:  # the loss raised a bare device error
        raise ValueError(f"targets: expected a tensor on idx's device {idx.device} but got {targets.device}")
    if vocab_size is not None:
        _check_ids(targets, "targets", vocab_size, lowest=-1)
