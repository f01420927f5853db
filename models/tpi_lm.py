"""TPILM: a character/byte-level language model of holographic phase memory blocks (TPI).

Einstein legend: ``b`` batch, ``t`` tokens, ``v`` vocabulary.

Token embedding → ``n_layers`` :class:`~kuramoto_attn.TPIBlock` (pre-norm
:class:`~kuramoto_attn.HolographicPhaseMemory`, optional FFN) → final LayerNorm → output head tied
to the embedding. No position embedding: the memory's accumulated phases carry order, and the
model is recurrent, so ``max_seq_len`` limits neither ``forward`` nor ``generate``: it only bounds the
recipe's ``train.block_size``, which sets the training context (raising ``max_seq_len`` alone trains on
windows as long as before). Same call signatures as
:class:`~models.gpt.GPT`: ``(logits, loss)``, a :class:`TPICache` for incremental decoding, and
``return_info=True`` adding a :class:`TPILMInfo` (no phase regulariser here: its coherence loss
is a zero scalar, so a trainer can treat both models alike).

Example:
    >>> import torch
    >>> model = TPILM(TPILMConfig(vocab_size=11, d_model=8, n_layers=2))
    >>> idx = torch.randint(11, (2, 5))
    >>> logits, loss = model(idx, targets=idx)
    >>> logits.shape, model.generate(idx, 3, temperature=0).shape
    (torch.Size([2, 5, 11]), torch.Size([2, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from kuramoto_attn import HolographicPhaseMemory, TPIBlock
from kuramoto_attn._checks import check_bool, check_device, pytree_dataclass
from kuramoto_attn._owner import OwnedCache
from kuramoto_attn.memory import TPIState

from . import sampling
from ._tied import apply_tied, tie_after_load
from .config import ConfigError, check, check_types, from_dict

__all__ = ["TPICache", "TPILM", "TPILMConfig", "TPILMInfo"]


@dataclass(frozen=True)
class TPILMConfig:
    """The model's hyperparameters; :meth:`from_dict` reads them from a YAML mapping.

    ``ffn_expansion`` is the blocks' FFN width factor (0: no FFN). ``query`` … ``chunk_size`` are
    :class:`~kuramoto_attn.HolographicPhaseMemory`'s arguments with its names and defaults.
    ``dropout`` is used everywhere: after the embedding, in the memory's output head and after
    the FFN. ``max_seq_len`` is not a limit of the model: the recipes read it only as the bound of
    ``train.block_size``, the training context.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 8
    max_seq_len: int = 256
    dropout: float = 0.0
    ffn_expansion: int = 4
    query: Literal["shared", "decoupled", "offset", "constrained"] = "shared"
    constrained_scale: float = HolographicPhaseMemory.CONSTRAINED_SCALE
    kernel: Literal["unbounded", "window", "decay"] = "unbounded"
    window: int = HolographicPhaseMemory.WINDOW
    magnitude: Literal["none", "sigmoid"] = "none"
    normalize: Literal["none", "sum", "sqrt"] = "none"
    state: Literal["vector", "matrix"] = "vector"
    num_heads: int = 1
    expansion: int = 1
    chunk_size: int = 64

    @classmethod
    def from_dict(cls, mapping, where: str = "model") -> TPILMConfig:
        """From a mapping such as the ``model`` section of a YAML file; raises
        :class:`~models.config.ConfigError` naming the key."""
        return from_dict(cls, mapping, where=where)

    def __post_init__(self):
        check_types(self)
        for name in ("vocab_size", "d_model", "n_layers", "max_seq_len", "window", "num_heads",
                     "expansion", "chunk_size"):
            check(getattr(self, name) >= 1, name, "must be at least 1", getattr(self, name))
        check(self.ffn_expansion >= 0, "ffn_expansion", "must be >= 0 (0: no FFN)", self.ffn_expansion)
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)", self.dropout)
        check(self.constrained_scale >= 0, "constrained_scale", "must be >= 0", self.constrained_scale)
        check(self.d_model % self.num_heads == 0, "num_heads", f"must divide d_model={self.d_model}",
              self.num_heads)
        # read by one variant only: set for another, they would be ignored
        check(self.kernel == "window" or self.window == TPILMConfig.window, "window",
              "is only read with kernel: window", self.window)
        check(self.query == "constrained" or self.constrained_scale == TPILMConfig.constrained_scale,
              "constrained_scale", "is only read with query: constrained", self.constrained_scale)
        check(self.num_heads == 1 or HolographicPhaseMemory._reads_heads(self.state, self.kernel, self.magnitude),
              "num_heads", "is only read with state: matrix, kernel: decay or magnitude: sigmoid", self.num_heads)


@pytree_dataclass  # torch.export can return it (return_info=True)
@dataclass
class TPILMInfo:
    """Diagnostics of ``TPILM(..., return_info=True)``.

    Attributes:
        coherence_loss: a zero scalar (TPI has no coherence regulariser); present so that a
            trainer can add ``info.coherence_loss`` for either model.
    """

    coherence_loss: Tensor


@dataclass
class TPICache(OwnedCache):
    """Recurrent decoding state: one :class:`~kuramoto_attn.TPIState` per block (filled on first
    use) and the ``length`` of tokens consumed. ``forward`` replaces the states in place; with
    ``kernel="window"`` a new state shares its predecessor's ring buffer, which a one-token
    ``forward`` updates in place, so to branch (beam search, speculative decoding) continue each
    branch from its own :meth:`clone`, never from copies of ``states``. The states hold no autograd
    graph (as a :class:`~models.gpt.GPTCache`'s keys and values): a backward stops at the cached tokens.
    Its ``owner`` is the model that filled it (as :class:`~models.gpt.GPTCache`'s layers record theirs):
    another model of the same shape refuses it, where it would silently continue the first model's states."""

    states: list[TPIState] = field(default_factory=list)
    length: int = 0

    def clone(self) -> TPICache:
        """A cache to branch from: the ring buffers copied (the other tensors are never written in
        place, and stay shared), the same ``owner``."""
        return TPICache([state._replace(buffer=tuple(b.clone() for b in state.buffer)) for state in self.states],
                        self.length, owner=self.owner)


class TPILM(nn.Module):
    """Language model of :class:`~kuramoto_attn.TPIBlock` s (see the module docstring).

    Args:
        config: a :class:`TPILMConfig`.

    Shapes:
        * ``idx``: ``(b, t)`` int64 token ids in ``[0, vocab_size)``; ``targets`` (optional): ``(b, t)``,
          ``-1`` = ignored. Ids outside are an error naming the argument (checked on CPU tensors in eager mode).
        * returns ``(logits (b, t, vocab), loss)``, or ``(logits, loss, TPILMInfo)`` with
          ``return_info=True``.

    Deferred initialisation: materialised from the meta device module by module (FSDP, Fabric's
    ``init_module(empty_init=True)``), the token embedding gets ``nn.Embedding``'s N(0, 1), not N(0, 0.02),
    and the head may come untied, as for :class:`~models.gpt.GPT`: build the model directly. State dicts with the
    tied tensor named once, or with a head that differs from the embedding, load as for GPT.
    """

    def __init__(self, config: TPILMConfig):
        super().__init__()
        if not isinstance(config, TPILMConfig):
            raise ConfigError(f"config: expected a TPILMConfig but got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TPIBlock(c.d_model, HolographicPhaseMemory(
                c.d_model, query=c.query, constrained_scale=c.constrained_scale, kernel=c.kernel,
                window=c.window, magnitude=c.magnitude, normalize=c.normalize, state=c.state,
                num_heads=c.num_heads, expansion=c.expansion, dropout=c.dropout, chunk_size=c.chunk_size),
                ffn_expansion=c.ffn_expansion, dropout=c.dropout if c.ffn_expansion else 0.0)
            for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input/output embeddings
        tie_after_load(self)  # load_state_dict(assign=True) keeps it tied, as _apply does (models/_tied.py)
        # N(0, 0.02) as in GPT: the tied head then starts with small logits; blocks keep their init
        nn.init.normal_(self.tok_emb.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        return apply_tied(self, super()._apply, fn, recurse)  # to_empty, .to("meta"): the head kept tied

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (there is no position embedding, so ``non_embedding`` changes
        nothing; it is accepted for the same signature as :meth:`models.gpt.GPT.num_params`)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> TPICache:
        """An empty :class:`TPICache` for incremental decoding."""
        return TPICache()

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, cache: TPICache | None = None,
                return_info: bool = False):
        """Logits for ``idx`` (continuing after the cached tokens if a ``cache`` is given).

        Args:
            idx: ``(b, t)`` token ids; with a cache, the new tokens only (one token takes the
                O(1) recurrent step, several the chunked parallel form).
            targets: ``(b, t)`` token ids, ``-1`` = ignored; gives ``loss``, the mean cross-entropy over the
                others (0 if every target is ignored).
            cache: a :class:`TPICache` (:meth:`new_cache` to start), updated in place.
            return_info: also return a :class:`TPILMInfo`.

        Returns:
            ``(logits, loss)`` or ``(logits, loss, info)``.
        """
        b, t = sampling.check_idx(idx, vocab_size=self.config.vocab_size)
        check_device("idx", idx, self.tok_emb.weight, owner="the model")  # the embedding's error names no argument
        sampling.check_targets(targets, idx, vocab_size=self.config.vocab_size)
        return_info = check_bool("return_info", return_info)
        x = self.drop(self.tok_emb(idx))  # (b, t, d_model)
        if cache is None:
            for block in self.blocks:
                x = block(x)
        else:
            states = self._check_cache(cache, x)
            for i, (block, state) in enumerate(zip(self.blocks, states)):
                if t == 1:
                    y, state = block.step(x[:, 0], state)
                    x = y[:, None]  # (b, d) -> (b, 1, d)
                else:
                    x, state = block(x, state)
                # detached, as GPT's cache: a state holding this call's graph made the next call's backward run
                # into it (already freed: an error), kept every earlier call's graph alive, and could not be deepcopied
                states[i] = state._map(Tensor.detach)
            cache.length += t
        logits = self.head(self.ln_f(x))  # (b, t, v)
        loss = None
        if targets is not None:
            loss = sampling.next_token_loss(logits, targets)
        if not return_info:
            return logits, loss
        return logits, loss, TPILMInfo(coherence_loss=logits.new_zeros(()))

    def generate(self, idx: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, vocab_size: int | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` ``(b, t)`` -> ``(b, t + max_new_tokens)``.

        As :meth:`models.gpt.GPT.generate`, except that the whole sequence is read (no cropping:
        the model is recurrent). ``use_cache`` prefills the prompt once, then steps the recurrent
        state one token at a time (O(1) per token); without it every step re-reads the whole
        sequence with the parallel form. The two agree to rounding; with the default unbounded,
        unnormalised memory, rounding grows with the length read, and far beyond the training
        context (hundreds of tokens past it, in float32) a greedy sample of the two can part
        (``kernel="decay"``, which the recipes' TPI presets use, or ``normalize="sqrt"`` keep them
        together).
        """
        sampling.check_idx(idx, vocab_size=self.config.vocab_size)  # the whole prompt, whatever the model reads
        sampling.check_vocab_limit(vocab_size, self.config.vocab_size)  # before any step: even with no new tokens
        return sampling.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                                 use_cache=use_cache, generator=generator, context=None,
                                 vocab_size=vocab_size)

    def _check_cache(self, cache: TPICache, x: Tensor) -> list[TPIState]:
        if not isinstance(cache, TPICache):
            raise ValueError(f"cache: expected a TPICache (see new_cache) but got {type(cache).__name__}")
        if not cache.states:
            # the layers' default state dtype: float32 at least (a bf16 model's sums would stop growing at 256)
            cache.states = [block.init_state(x.shape[0], device=x.device) for block in self.blocks]
            cache.length = 0
            cache._claim(self)
        elif len(cache.states) != len(self.blocks):
            raise ValueError(f"cache: holds {len(cache.states)} layer states but the model has "
                             f"{len(self.blocks)} layers (a cache of another model?)")
        # every state is checked before any layer replaces its own, each named as the user gave it
        for i, (block, state) in enumerate(zip(self.blocks, cache.states)):
            block.memory._check_state(state, x, name=f"cache: states[{i}]")
        if cache._filled_by_another(self):  # last: a state of another configuration says more
            raise ValueError("cache: filled by another model (of the same layers); give each model its own "
                             "(see new_cache)")
        return cache.states
