"""PhaseGPT: a GPT-2-style decoder whose chosen layers attend through :class:`KuramotoAttention`.

Einstein legend: ``b`` batch, ``t`` new tokens, ``s`` tokens attended to (cached + new), ``h``
heads, ``d`` head width (``d_model / h``), ``v`` vocabulary.

Pre-LayerNorm blocks, learned positions, tied input/output embeddings, causal
``scaled_dot_product_attention``, GELU MLP and dropout, as in nanoGPT's ``model.py``. The layers
listed in ``phase_layer_idx`` replace the plain attention with
:class:`~kuramoto_attn.KuramotoAttention` (its own initialisation kept). ``forward`` returns
``(logits, loss)``; ``return_info=True`` adds a :class:`GPTInfo` with every phase layer's
diagnostics and the summed coherence loss, which is reported, never added to ``loss``.

Example:
    >>> import torch
    >>> config = GPTConfig(vocab_size=11, max_seq_len=8, n_layers=2, n_heads=2, d_model=16,
    ...                    use_phase_attention=True, phase_layer_idx=[1], num_oscillators=4, steps=2)
    >>> model = GPT(config)
    >>> idx = torch.randint(11, (2, 5))
    >>> logits, loss, info = model(idx, targets=idx, return_info=True)
    >>> logits.shape, model.phase_layers, info.phase[1].R.shape
    (torch.Size([2, 5, 11]), (1,), torch.Size([2, 2]))
    >>> model.generate(idx, 4, temperature=0).shape
    torch.Size([2, 9])
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kuramoto_attn import SOLVERS, Coupling, KuramotoAttention, KuramotoCache, KuramotoInfo
from kuramoto_attn.attention import COUPLINGS
from kuramoto_attn._checks import (check_bool, check_cache_dtype, check_device, check_int, largest_value,
                                   pytree_dataclass)
from kuramoto_attn._owner import OwnedCache

from . import sampling
from ._tied import apply_tied, tie_after_load
from .config import ConfigError, check, check_types, from_dict, numbers_as_written

__all__ = ["GPT", "GPTCache", "GPTConfig", "GPTInfo", "KVCache"]


@dataclass(frozen=True)
class GPTConfig:
    """The model's hyperparameters; :meth:`from_dict` reads them from a YAML mapping.

    The phase options (``num_oscillators`` … ``coherence_band``) are
    :class:`~kuramoto_attn.KuramotoAttention`'s arguments, with its names and defaults; they apply
    to the layers in ``phase_layer_idx``, and without phase layers they must keep their defaults
    (set, they would be ignored: an error). ``d_ff=None`` becomes ``4 * d_model``; an int
    ``phase_layer_idx`` becomes a one-element tuple. ``use_phase_attention`` must agree with
    ``phase_layer_idx`` (true iff it is non-empty): a contradiction is an error, never ignored.

    The sizes: ``vocab_size`` token ids, ``max_seq_len`` learned positions (the longest input),
    ``n_layers`` blocks of ``n_heads`` heads over width ``d_model`` (divisible by ``n_heads``), MLP
    width ``d_ff``; ``bias`` in the projections, the MLP and the LayerNorms (the tied output head has
    none). ``dropout`` in ``[0, 1)`` applies to the embeddings, the attention weights (plain and phase
    layers, as :class:`~kuramoto_attn.KuramotoAttention`'s ``dropout``), and the attention and MLP
    outputs before they join the residual stream.

    ``coupling`` is ``"mean_field"``, ``"attention"`` or the import path ``"package.module:Class"`` of a
    :class:`~kuramoto_attn.Coupling` subclass (your own scheme), which each phase layer builds as
    ``Class(**coupling_options)`` and gives to :class:`~kuramoto_attn.KuramotoAttention` (the module
    is imported, so it must be importable wherever the config is read, e.g. a checkpoint loaded).
    ``coupling_options`` is for such a class only (a number written ``1e-3``, which YAML reads as a string, is a
    number there too):

    >>> config = GPTConfig(n_layers=2, use_phase_attention=True, phase_layer_idx=1,
    ...                    coupling="kuramoto_attn:MeanFieldCoupling",
    ...                    coupling_options={"dim": -2, "causal": True, "harmonics": [1, 2]})
    >>> GPT(config).blocks[1].attn.coupling
    MeanFieldCoupling(strength=1.0, phase_lag=0, harmonics=(1, 2), dim=-2, causal=True)
    """

    vocab_size: int = 50304
    max_seq_len: int = 512
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    d_ff: int | None = None
    dropout: float = 0.1
    bias: bool = True
    use_phase_attention: bool = False
    phase_layer_idx: int | tuple[int, ...] = ()
    num_oscillators: int = 32
    coupling_strength: float = 1.0
    steps: int = 10
    dt: float = 0.1
    integrator: str = "euler"  # a key of kuramoto_attn.SOLVERS (solvers registered there count)
    coupling: str = "mean_field"  # or "package.module:Class", a kuramoto_attn.Coupling subclass
    coupling_options: dict[str, Any] | None = None  # keyword arguments of that class
    phase_lag: float = 0.0
    learnable_coupling: bool = True
    phase_noise: float = 0.0
    freq_jitter: float = 0.0
    coherence_target: float | None = None
    coherence_weight: float = 0.1
    coherence_mode: Literal["ceiling", "center", "band"] = "ceiling"
    coherence_band: tuple[float, ...] | None = None

    ALIASES: typing.ClassVar[dict[str, str]] = {"phase_iterations": "steps", "n_sync_steps": "steps"}

    def build_coupling(self) -> str | Coupling:
        """What a phase layer gets as ``coupling``: the built-in's name, or a new module of the
        configured class. Raises :class:`ConfigError` naming ``coupling`` or ``coupling_options``."""
        if self.coupling in COUPLINGS:
            return self.coupling
        module_name, sep, name = self.coupling.partition(":")
        check(bool(sep and module_name and name), "coupling",
              f"expected one of {', '.join(map(repr, COUPLINGS))} or 'package.module:Class'", self.coupling)
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"coupling: cannot import {self.coupling!r} ({type(err).__name__}: {err})") from None
        check(isinstance(cls, type) and issubclass(cls, Coupling), "coupling",
              "must name a kuramoto_attn.Coupling subclass", self.coupling)
        # the base class itself builds, and then fails in the first training step
        check(cls.interaction is not Coupling.interaction, "coupling",
              "must name a Coupling subclass that implements interaction(theta, ...)", self.coupling)
        try:
            return cls(**numbers_as_written(self.coupling_options or {}))  # strength: 1e-3 as written
        except (TypeError, ValueError) as err:
            raise ConfigError(f"coupling_options: {cls.__name__}(**coupling_options) failed: {err}") from None

    @classmethod
    def from_dict(cls, mapping, where: str = "model") -> GPTConfig:
        """From a mapping such as the ``model`` section of a YAML file (``phase_iterations`` and
        ``n_sync_steps`` are accepted for ``steps``); raises :class:`ConfigError` naming the key."""
        return from_dict(cls, mapping, where=where, aliases=cls.ALIASES)

    def __post_init__(self):
        check_types(self)
        if isinstance(self.phase_layer_idx, int):  # one layer
            object.__setattr__(self, "phase_layer_idx", (self.phase_layer_idx,))
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "max_seq_len", "n_layers", "n_heads", "d_model", "d_ff",
                     "num_oscillators", "steps"):
            check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        check(self.d_model % self.n_heads == 0, "d_model", f"must be a multiple of n_heads={self.n_heads}",
              self.d_model)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        check(self.dt > 0, "dt", "must be positive", self.dt)
        largest = largest_value()  # the phase layers compute in the default dtype
        for name in ("coupling_strength", "dt", "phase_noise", "freq_jitter"):
            check(abs(getattr(self, name)) <= largest, name,
                  f"must be within ±{largest:.4g} (the largest {torch.get_default_dtype()})", getattr(self, name))
        for name in ("phase_noise", "freq_jitter", "coherence_weight"):
            check(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        if self.coherence_target is not None:
            check(0 <= self.coherence_target <= 1, "coherence_target", "must be in [0, 1]",
                  self.coherence_target)
        check(self.integrator in SOLVERS, "integrator", f"must be one of {tuple(SOLVERS)}", self.integrator)
        if self.coupling in COUPLINGS:
            check(self.coupling_options is None, "coupling_options",
                  f"is for a Coupling class given as coupling, not the built-in {self.coupling!r}",
                  self.coupling_options)
        else:
            # the layer's own checks (phase_lag on the module, causality, needed arguments) on a module
            # built for them alone: its initialisation must not use up random numbers of the model's
            try:
                with torch.random.fork_rng(devices=[]):
                    KuramotoAttention._check_coupling(self.build_coupling(), self.phase_lag, causal=True)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        try:  # which of target, band, weight and mode are read, as the layer checks it
            KuramotoAttention._coherence(self.coherence_target, self.coherence_weight, self.coherence_mode,
                                         self.coherence_band)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        layers = self.phase_layer_idx
        for i in layers:
            check(isinstance(i, int) and 0 <= i < self.n_layers, "phase_layer_idx",
                  f"layer indices must be in [0, n_layers={self.n_layers})", layers)
        check(len(set(layers)) == len(layers), "phase_layer_idx", "has repeated layers", layers)
        if self.use_phase_attention:
            check(len(layers) > 0, "phase_layer_idx",
                  "must name at least one layer when use_phase_attention is true", layers)
        else:
            check(len(layers) == 0, "phase_layer_idx",
                  "names phase layers but use_phase_attention is false (set it true, or drop them)", layers)
            for option in PHASE_OPTIONS:  # "every key is used or rejected": these would be ignored
                check(getattr(self, option) == _DEFAULTS[option], option,
                      "has no effect without phase layers (use_phase_attention is false)", getattr(self, option))


#: the options of the phase layers (KuramotoAttention's arguments), unused by a model without them
PHASE_OPTIONS = ("num_oscillators", "coupling_strength", "steps", "dt", "integrator", "coupling",
                 "coupling_options", "phase_lag", "learnable_coupling", "phase_noise", "freq_jitter",
                 "coherence_target", "coherence_weight", "coherence_mode", "coherence_band")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTConfig)}


@pytree_dataclass  # torch.export can return it (return_info=True)
@dataclass
class GPTInfo:
    """Diagnostics of ``GPT(..., return_info=True)``.

    Attributes:
        phase: layer index -> that phase layer's :class:`~kuramoto_attn.KuramotoInfo` (for the
            tokens of this call); empty without phase layers.
        coherence_loss: sum of the phase layers' coherence losses (a zero scalar when no layer has
            a regularizer: a ``coherence_target`` or ``coherence_band``). Not part of ``loss``: add it
            yourself.
    """

    phase: dict[int, KuramotoInfo]
    coherence_loss: Tensor


@dataclass
class KVCache(OwnedCache):
    """Keys and values ``(b, h, s, d)`` of the tokens seen by one plain attention layer. Its ``owner`` is the
    layer that filled it (as :class:`~kuramoto_attn.KuramotoCache`'s): another model's layer refuses it, where
    it would silently attend over the first model's keys and values."""

    keys: Tensor | None = None
    values: Tensor | None = None


@dataclass
class GPTCache:
    """Per-layer decoding state (a :class:`KVCache` or :class:`~kuramoto_attn.KuramotoCache` per
    layer), filled on first use; ``length`` tokens so far. ``forward`` updates it in place. Like each layer's
    cache it holds no autograd graph: a backward stops at the cached tokens."""

    layers: list = field(default_factory=list)
    length: int = 0


class CausalSelfAttention(nn.Module):
    """Plain causal multi-head attention: one fused qkv projection and one SDPA call."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.d_model, self.dropout = config.n_heads, config.d_model, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        b, t, _ = x.shape
        h, d = self.n_heads, self.d_model // self.n_heads
        q, k, v = self.qkv(x).view(b, t, 3, h, d).transpose(1, 3).unbind(2)  # 3 × (b, h, t, d)
        # True if ... else False, not t > 1: under torch.compile with a dynamic length that is a SymBool, which
        # SDPA refuses (a graph break that ran the whole model uncompiled)
        mask, is_causal = None, True if t > 1 else False
        if cache is not None:
            if cache.keys is not None:
                check_cache_dtype(cache.keys, k)  # as KuramotoAttention: a refusal leaves every layer's cache as it was
                k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)  # (b, h, s, d)
                past = k.shape[2] - t
                if t > 1:  # new tokens see every past token and the new ones up to themselves
                    rows = torch.arange(past, past + t, device=x.device).view(t, 1)
                    mask, is_causal = torch.arange(past + t, device=x.device) <= rows, False
                else:
                    is_causal = False
            cache.keys, cache.values = k.detach(), v.detach()
            cache._claim(self)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.d_model))  # (b, h, t, d) -> (b, t, h·d)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """``x + Dropout(Attn(LN(x)))``, then ``x + MLP(LN(x))``; Attn is Kuramoto attention if ``phase``."""

    def __init__(self, config: GPTConfig, phase: bool):
        super().__init__()
        self.phase = phase
        self.ln_1 = nn.LayerNorm(config.d_model, bias=config.bias)
        if phase:
            c = config
            self.attn = KuramotoAttention(
                c.d_model, c.n_heads, num_oscillators=c.num_oscillators, coupling_strength=c.coupling_strength,
                steps=c.steps, dt=c.dt, integrator=c.integrator, coupling=c.build_coupling(), phase_lag=c.phase_lag,
                learnable_coupling=c.learnable_coupling, phase_noise=c.phase_noise, freq_jitter=c.freq_jitter,
                dropout=c.dropout, causal=True, bias=c.bias, coherence_target=c.coherence_target,
                coherence_weight=c.coherence_weight, coherence_mode=c.coherence_mode,
                coherence_band=c.coherence_band)
        else:
            self.attn = CausalSelfAttention(config)
        self.drop = nn.Dropout(config.dropout)
        self.ln_2 = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache=None, return_info: bool = False) -> tuple[Tensor, KuramotoInfo | None]:
        info = None
        if self.phase:
            out = self.attn(self.ln_1(x), cache=cache, return_info=return_info)
            if return_info:
                out, info = out
        else:
            out = self.attn(self.ln_1(x), cache)
        x = x + self.drop(out)
        x = x + self.mlp(self.ln_2(x))
        return x, info


class GPT(nn.Module):
    """GPT-2-style language model with optional Kuramoto attention layers (see the module docstring).

    Args:
        config: a :class:`GPTConfig`.

    Shapes:
        * ``idx``: ``(b, t)`` int64 token ids in ``[0, vocab_size)``; ``targets`` (optional): ``(b, t)``,
          ``-1`` = ignored. Ids outside are an error naming the argument (checked on CPU tensors in eager mode).
        * returns ``(logits (b, t, vocab), loss)`` (loss: mean cross-entropy, ``None`` without
          targets), or ``(logits, loss, GPTInfo)`` with ``return_info=True``.

    Deferred initialisation: a model built on the meta device and materialised module by module, each
    with its own ``reset_parameters()`` (FSDP and Fabric's ``init_module(empty_init=True)`` do that),
    gets ``nn.Embedding``'s N(0, 1) embeddings and ``nn.Linear``'s default weights, not this model's
    N(0, 0.02); where the head gets its storage on its own (FSDP1), it is no longer tied to the token
    embedding. Build the model directly (as the recipes do), or load a state dict once it is materialised.

    State dicts: the tied head and embedding are one tensor under two keys. A state dict that names it once (as
    ``safetensors``' ``save_model`` writes it) loads tied, also with ``assign=True`` (the other key is reported
    missing, as torch reports it: load with ``strict=False``, or ``safetensors.torch.load_model``); one whose
    ``head.weight`` and ``tok_emb.weight`` differ is an error (the tied model cannot hold both: untie its head
    first). See ``models/_tied.py``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise ConfigError(f"config: expected a GPTConfig but got {type(config).__name__}")
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i in config.phase_layer_idx) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, bias=config.bias)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        tie_after_load(self)  # load_state_dict(assign=True) keeps it tied, as _apply does (models/_tied.py)
        self._init_weights()

    @property
    def phase_layers(self) -> tuple[int, ...]:
        """Indices of the layers with Kuramoto attention, ascending."""
        return tuple(i for i, block in enumerate(self.blocks) if block.phase)

    def _apply(self, fn, recurse=True):
        return apply_tied(self, super()._apply, fn, recurse)  # to_empty, .to("meta"): the head kept tied

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters; without the position embedding by default (nanoGPT's count: the
        token embedding is tied to the output head, so it counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.pos_emb.weight.numel() if non_embedding else n

    def new_cache(self) -> GPTCache:
        """An empty :class:`GPTCache` for incremental decoding."""
        return GPTCache()

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: GPTCache | None = None,
                return_info: bool = False):
        """Logits for ``idx`` (after the cached tokens, if a ``cache`` is given; updated in place).

        Args:
            idx: ``(b, t)`` token ids; with a cache, the new tokens only.
            targets: ``(b, t)`` token ids, ``-1`` = ignored; gives ``loss``, the mean cross-entropy over the
                others (0 if every target is ignored).
            cache: a :class:`GPTCache` (:meth:`new_cache` to start). Cached + new tokens must fit
                in ``max_seq_len``.
            return_info: also return a :class:`GPTInfo`.

        Returns:
            ``(logits, loss)`` or ``(logits, loss, info)``.
        """
        b, t = sampling.check_idx(idx, vocab_size=self.config.vocab_size)
        check_device("idx", idx, self.tok_emb.weight, owner="the model")  # the embedding's error names no argument
        sampling.check_targets(targets, idx, vocab_size=self.config.vocab_size)
        return_info = check_bool("return_info", return_info)
        past = self._check_cache(cache, b, idx.device)
        if past + t > self.config.max_seq_len:
            raise ValueError(f"idx: {past} cached + {t} new tokens exceed max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(past, past + t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (b, t, d_model)
        layer_caches = cache.layers if cache is not None else [None] * len(self.blocks)
        infos = {}
        for i, (block, layer_cache) in enumerate(zip(self.blocks, layer_caches)):
            x, info = block(x, layer_cache, return_info)
            if info is not None:
                infos[i] = info
        logits = self.head(self.ln_f(x))  # (b, t, v)
        loss = None
        if targets is not None:
            loss = sampling.next_token_loss(logits, targets)
        if cache is not None:
            cache.length = past + t
        if not return_info:
            return logits, loss
        coherence = [info.coherence_loss for info in infos.values() if info.coherence_loss is not None]
        coherence_loss = torch.stack(coherence).sum() if coherence else logits.new_zeros(())
        return logits, loss, GPTInfo(phase=infos, coherence_loss=coherence_loss)

    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, vocab_size: int | None = None,
                 context: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``(b, t)`` -> ``(b, t + max_new_tokens)``.

        ``temperature=0`` is greedy; otherwise ``torch.multinomial`` with ``generator`` over the ``top_k``
        most likely tokens and any tied with the ``top_k``-th, as nanoGPT (all if ``None``). The model
        reads at most the last ``context`` tokens (default and largest: ``max_seq_len``; pass the training
        length when it was shorter, since learned positions beyond it were never trained); ``use_cache``
        (prefill, then one token at a time, refilled from the cropped window once full) gives the same
        tokens as recomputing every step. ``vocab_size`` (e.g. the tokenizer's, when ``config.vocab_size``
        pads the embedding) limits the sampled ids to those below it. Runs under
        ``torch.no_grad()`` in eval mode, then restores the mode.
        """
        if context is None:
            context = self.config.max_seq_len
        elif check_int("context", context, low=1) > self.config.max_seq_len:  # the type and lower bound
            raise ValueError(f"context: expected an integer in [1, max_seq_len={self.config.max_seq_len}] "
                             f"but got {context!r}")
        sampling.check_idx(idx, vocab_size=self.config.vocab_size)  # the whole prompt, whatever the model reads
        sampling.check_vocab_limit(vocab_size, self.config.vocab_size)  # before any step: even with no new tokens
        return sampling.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 use_cache=use_cache, generator=generator, context=context,
                                 vocab_size=vocab_size)

    def _check_cache(self, cache: GPTCache | None, b: int, device: torch.device) -> int:
        """Tokens already in ``cache`` (0 without one); fills an empty cache with per-layer caches."""
        if cache is None:
            return 0
        if not isinstance(cache, GPTCache):
            raise ValueError(f"cache: expected a GPTCache (see new_cache) but got {type(cache).__name__}")
        if not cache.layers:
            cache.layers = [KuramotoCache() if block.phase else KVCache() for block in self.blocks]
            cache.length = 0
        elif len(cache.layers) != len(self.blocks) or any(
                not isinstance(c, KuramotoCache if block.phase else KVCache)
                for c, block in zip(cache.layers, self.blocks)):
            raise ValueError("cache: its layers do not match this model's (a cache of another model?)")
        # a phase layer refuses another layer's cache itself, but only after the plain layers before it
        # have added this call's tokens to theirs: checked here, before any layer changes its cache
        # (and here only for the plain layers, which would otherwise take another model's keys and values)
        if any(c._filled_by_another(block.attn) for c, block in zip(cache.layers, self.blocks)):
            raise ValueError("cache: filled by another model (of the same layers); give each model its own "
                             "(see new_cache)")
        kv = next((c for c in cache.layers if isinstance(c, KVCache)), None)
        if kv is not None and kv.keys is not None and kv.keys.shape[0] != b:
            raise ValueError(f"cache: holds batch size {kv.keys.shape[0]} but idx has {b}")
        if kv is not None and kv.keys is not None and kv.keys.device != device:  # as the phase layers check it
            raise ValueError(f"cache: holds tensors on {kv.keys.device} but idx is on {device}")
        return cache.length

    def _init_weights(self) -> None:
        """nanoGPT's: N(0, 0.02) weights and zero biases, residual projections N(0, 0.02/√(2L)).
        Kuramoto attention layers keep their own initialisation."""
        kuramoto = {id(m) for block in self.blocks if block.phase for m in block.attn.modules()}
        for module in self.modules():
            if id(module) in kuramoto:
                continue
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)
            if not block.phase:
                nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
