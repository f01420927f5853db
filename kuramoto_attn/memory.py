r"""Holographic phase memory: temporal phase integration (TPI) as one composable sequence mixer.

Every token ``s`` writes its content into a complex memory after rotating it by an accumulated
phase; every token ``t`` reads the memory back after rotating by its own (query) phase, so that
contributions whose phases match add up and the others interfere away.

**Vector state** (``state="vector"``, the reference's per-channel memory; the value is ``x`` itself):

.. math::

    \omega_t = W_\omega x_t, \qquad \phi_t = \sum_{s \le t} \omega_s, \qquad
    M_t = \sum_{s \le t} w(t - s)\, m_s\, x_s\, e^{i\phi_s}, \qquad
    r_t = M_t\, e^{-i\phi^q_t} / Z_t,

all per channel (``d`` independent complex memories).

**Matrix state** (``state="matrix"``): per head, keys, queries and values are projections of ``x``
(``k_t = W_k x_t``, ``q_t = W_q x_t / √c``, ``v_t = W_v x_t``, ``c = d / h`` channels per head), each key/query component is
rotated by its own phase (as in RoPE, with data-dependent frequencies), and the memory is a
complex key–value matrix:

.. math::

    M_t = \sum_{s \le t} w(t - s)\, m_s\, (k_s \odot e^{i\phi_s}) \otimes v_s, \qquad
    r_t = (q_t \odot e^{i\phi^q_t})^{H} M_t / Z_t.

**Query phase** ``φ^q``: ``"shared"`` ``φ^q = φ``; ``"decoupled"`` ``φ^q_t = Σ_{s≤t} W_{ωq} x_s``;
``"offset"`` ``φ^q_t = φ_t + W_f x_t``; ``"constrained"``
``φ^q_t = Σ_{s≤t} (ω_s + c·\tanh(W_g x_s))`` with ``c = constrained_scale`` (so ``|ω^q − ω| ≤ c``).

**Kernel** ``w(n)`` for the lag ``n = t − s ≥ 0``: ``"unbounded"`` ``1``; ``"window"``
``1[n < W]`` (the last ``W`` tokens); ``"decay"`` ``γ_h^n`` with a learned rate per head,
``γ_h = \mathrm{clamp}(\sigma(\theta_h), γ_{min}, 1)``, ``γ_{min} =`` :data:`DECAY_MIN`
(``θ_h = +∞`` or large gives ``γ = 1``: the unbounded kernel).

**Magnitude** ``m_s`` (one per head and token): ``"none"`` ``1``; ``"sigmoid"``
``5·σ(W_m x_s)``. **Normalisation** ``Z_t`` with ``S_t = Σ_{s≤t} w(t−s) m_s`` (per head):
``"none"`` ``1``; ``"sum"`` ``S_t``; ``"sqrt"`` ``\sqrt{S_t}`` (clamped below at
:data:`NORM_EPS`).

**Readout.** The complex read ``r_t`` (``d`` values) becomes the real features
``[Re r_t, Im r_t]`` (``2d``) and goes through the output head: with ``expansion == 1`` a linear
map ``2d → d`` followed by dropout; with ``expansion = e > 1`` the reference's head
``Linear(2d, e·d) → GELU → Dropout → Linear(e·d, d)``.

**Numerics.** Phases grow without bound (``|φ_t| ∼ t·|ω|``); in float32 that loses precision as
``t`` grows. Here the rates ``ω_t`` are computed in float32 at least (outside autocast, which would
round them to bf16: an error that the sum makes grow with ``t``; TF32 matmuls, which
``torch.set_float32_matmul_precision("high")`` allows on a GPU, round their inputs too, so keep PyTorch's
default ``"highest"`` where long sequences matter), ``φ`` is accumulated in
**float64** and wrapped to ``[0, 2π]`` (an exception to the library's no-wrapping rule: only
``e^{iφ}`` is ever used, which is 2π-periodic, and the gradient of the wrap is 1) before
``cos``/``sin`` are taken (in float32 at least, then cast to the dtype of the sums below); recurrent
states carry the wrapped phase in float64. The sums over tokens are computed in chunks of ``chunk_size``
tokens (a RetNet/GLA-style chunked scan): a masked ``C × C`` product inside each chunk, and a carry
between chunks that is itself computed by the same chunked scan over the chunk summaries, so
rounding error grows like the logarithm of ``T`` rather than ``T``. The window never subtracts two
prefix sums (chunk lags wholly inside the window go through chunk summaries, the at most two
straddling lags through masked blocks), and the decay only forms powers ``γ^n``, ``n ≥ 0`` (exponents
in float32 at least), so nothing overflows for any ``γ ∈ [γ_{min}, 1]``. Without a state,
``forward(x)`` sums the memory and the normaliser ``S_t`` in the input's dtype (under bfloat16 autocast,
in autocast's: its products come back in it), except float16 (an input, or autocast's), whose sums
would overflow (largest value 65504; ``S_t`` with ``kernel="unbounded"`` passes it after tens of
thousands of tokens): those are float32, outside autocast. With a state (also under autocast),
:meth:`~HolographicPhaseMemory.step` and ``forward(x, state)`` sum in the state's dtype, which
:meth:`~HolographicPhaseMemory.init_state`
makes the parameters' dtype promoted to float32 at least: a bfloat16 or float16 module casts each
token's contribution to float32, keeps memory, ``S_t`` and the window's buffer in float32 (in
bfloat16 a running sum of ones would stop growing at 256, in float16 at 2048) and casts the
normalised read back to the input's dtype before the output head.

**Recurrent form.** :meth:`HolographicPhaseMemory.step` does O(1) work per token (independent of
the position; the window kernel's state holds a ring buffer of the last ``W`` contributions and
a running sum that is recomputed from the buffer every ``W`` steps so rounding cannot drift).

**API.** ``forward(x)`` returns ``y``; ``forward(x, state)`` continues after ``state`` (e.g.
``init_state(b)``, or a previous call's) and returns ``(y, new_state)``; ``step(x_t, state)``
returns ``(y_t, new_state)``. States are :class:`TPIState` named tuples.

Einstein legend: ``b`` batch, ``t`` tokens, ``d`` model channels, ``h`` heads, ``c`` channels per
head (``d / h``), ``n`` chunks, ``i``/``j`` query/key positions inside a chunk, ``e`` = ``2c``
rotated key features ``[k cos φ, k sin φ]``, ``f`` value channels per head, ``r`` the two reads
(real and imaginary part), ``w`` window slots.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import autocast_dtype, autocast_off, check_choice, check_input_like, check_int, check_real, check_tensor

__all__ = ["DECAY_MIN", "NORM_EPS", "HolographicPhaseMemory", "TPIBlock", "TPIState"]

DECAY_MIN = 0.5
"""Smallest decay rate ``γ`` (a memory of at least ~2 tokens); also bounds ``d log γ / dγ ≤ 2``."""
NORM_EPS = 1e-6
"""Lower clamp of the normaliser ``S_t`` (``normalize="sum"``/``"sqrt"``)."""
MAGNITUDE_SCALE = 5.0  # the reference's m = 5 sigmoid(W_m x)
TWO_PI = 2 * math.pi

QUERIES = ("shared", "decoupled", "offset", "constrained")
KERNELS = ("unbounded", "window", "decay")
MAGNITUDES = ("none", "sigmoid")
NORMALIZES = ("none", "sum", "sqrt")
STATES = ("vector", "matrix")


class TPIState(NamedTuple):
    """Recurrent state of a :class:`HolographicPhaseMemory` after ``position`` tokens.

    Attributes:
        phase: key phase ``φ`` wrapped to ``[0, 2π]`` (2π itself where a tiny negative phase rounds up),
            float64, ``(b, d)``.
        query_phase: query phase ``φ^q`` (``"decoupled"``/``"constrained"`` queries), float64
            ``(b, d)``; ``None`` for the others (derived from ``phase``).
        memory: ``M`` as real numbers: vector state ``(b, h, 2c)`` = ``[Re M, Im M]``; matrix
            state ``(b, h, 2c, c)`` with rows ``[Re, Im]`` of the rotated key axis.
        norm: ``S = Σ w(t − s) m_s``, ``(b, h)``; ``memory``, ``norm`` and ``buffer`` have the state's
            dtype (:meth:`HolographicPhaseMemory.init_state`'s: float32 at least by default).
        buffer: window kernel only, the last ``W`` contributions in a ring (slot = position mod W):
            vector ``(u (b, W, h, 2c), m (b, W, h))``, matrix ``(key (b, W, h, 2c),
            value (b, W, h, c), m (b, W, h))``; ``()`` for the other kernels.
        position: number of tokens consumed.
    """

    phase: Tensor
    query_phase: Tensor | None
    memory: Tensor
    norm: Tensor
    buffer: tuple[Tensor, ...]
    position: int

    def _map(self, fn) -> TPIState:
        """The state with ``fn`` applied to each of its tensors (``query_phase`` may be ``None``)."""
        return self._replace(phase=fn(self.phase), memory=fn(self.memory), norm=fn(self.norm),
                             query_phase=None if self.query_phase is None else fn(self.query_phase),
                             buffer=tuple(fn(b) for b in self.buffer))


# ---------- kernels and the chunked scan ----------


class _Kernel(NamedTuple):
    """``w(n)`` for lags ``n``: ``kind`` in KERNELS; ``log_gamma`` (h,) for decay; ``window`` W."""

    kind: str
    log_gamma: Tensor | None = None
    window: int = 0

    def weights(self, lag: Tensor) -> Tensor:
        """``w(lag)`` for an integer tensor of lags (negative: 0), shape ``(h or 1, *lag.shape)``;
        boolean for the unbounded and window kernels."""
        valid = lag >= 0
        if self.kind == "window":
            valid = valid & (lag < self.window)
        if self.kind != "decay":
            return valid.unsqueeze(0)
        exponent = lag.clamp_min(0).to(self.log_gamma.dtype) * self.log_gamma.view(-1, *[1] * lag.dim())
        return torch.where(valid, exponent.exp(), torch.zeros_like(exponent))  # never exp of a positive

    def block_lags(self, size: int) -> list[int]:
        """Chunk lags computed as masked blocks: 0, plus for the window the (≤ 2) straddling lags."""
        if self.kind != "window":
            return [0]
        lags, lag = [0], max(1, self.window // size)  # lags 1 .. W//C − 1 are wholly inside
        while lag * size - (size - 1) < self.window:  # the block's smallest token lag is inside
            lags.append(lag)
            lag += 1
        return lags

    def summary(self, size: int):
        """``(left (h, C), read (h, C), kernel over chunk summaries)`` or ``None``.

        The carry into chunk ``n`` is ``Σ_k w'(n − 1 − k) B_k`` with ``B_k = Σ_j left_j u_{k,j}``,
        read at position ``i`` as ``read_i · carry``."""
        if self.kind == "decay":
            pos = torch.arange(size, device=self.log_gamma.device)
            left = (self.log_gamma[:, None] * (size - 1 - pos)).exp()  # γ^{C−1−j}
            read = (self.log_gamma[:, None] * (pos + 1)).exp()  # γ^{i+1}
            return left, read, _Kernel("decay", self.log_gamma * size)
        if self.kind == "window":
            full = self.window // size - 1  # chunk lags 1..full lie wholly inside the window
            if full < 1:
                return None
            return None, None, _Kernel("window", None, full)
        return None, None, _Kernel("unbounded")


def _block_weights(kernel: _Kernel, lag: int, size: int, like: Tensor) -> Tensor:
    """``L[h, i, j] = w(lag·C + i − j)``, shape ``(h, C, C)``, or ``(1, C, C)`` when shared by all heads."""
    pos = torch.arange(size, device=like.device)
    return kernel.weights(lag * size + pos[:, None] - pos[None, :]).to(like.dtype)


def _chunk_size(chunk: int, t: int) -> int:
    """``min(chunk, t)`` in eager mode; under ``torch.compile`` ``chunk`` itself, and a shorter sequence is
    padded to one chunk: with a dynamic length, a ``Min(C, t)`` in the later size expressions made
    inductor's shape reasoning fail (``Exponent must be non-negative`` with the window kernel). Dynamo
    shows a symbolic length as an ``int``, so the check is on compiling, not on the length's type."""
    return chunk if torch.compiler.is_compiling() else min(chunk, t)


def _chunks(x: Tensor, size: int) -> tuple[Tensor, int]:
    """Pad the token axis (1) with zeros to a multiple of ``size``; (b, t, *) -> (b, n, C, *)."""
    t = x.shape[1]
    n = -(-t // size)
    if n * size != t:
        x = torch.cat([x, x.new_zeros(x.shape[0], n * size - t, *x.shape[2:])], 1)
    return x.reshape(x.shape[0], n, size, *x.shape[2:]), n


def _shift(part: Tensor, lag: int) -> Tensor:
    """Place a (b, n − lag, ...) block result at chunks lag..n − 1 of a (b, n, ...) tensor."""
    if lag == 0:
        return part
    return torch.cat([part.new_zeros(part.shape[0], lag, *part.shape[2:]), part], 1)


def _kernel_sum(u: Tensor, kernel: _Kernel, chunk: int, init: Tensor | None = None) -> Tensor:
    """``y_t = Σ_{s≤t} w(t − s) u_s + γ^{t+1} init`` (init: unbounded/decay only), chunked.

    Args:
        u: ``(b, t, h, c)``.
        kernel: the kernel (decay rates per head ``h``).
        chunk: the chunk size ``C``.
        init: ``(b, h, c)``, the memory before the first token, or ``None``.

    Returns:
        ``(b, t, h, c)``.
    """
    b, t, h, c = u.shape
    size = _chunk_size(chunk, t)
    uc, n = _chunks(u, size)  # (b, n, C, h, c)
    y = None
    for lag in kernel.block_lags(size):
        if lag >= n:
            break
        weights = _block_weights(kernel, lag, size, u)  # (h or 1, C, C)
        if weights.shape[0] == 1:  # one matrix for every head: a single matmul over (h, c) columns
            part = (weights[0] @ uc[:, : n - lag].flatten(3)).view(b, n - lag, size, h, c)
        else:
            part = torch.einsum("hij,bnjhc->bnihc", weights, uc[:, : n - lag])
        part = _shift(part, lag)
        y = part if y is None else y + part
    spec = kernel.summary(size)
    if spec is not None and (n > 1 or init is not None):
        left, read, inner = spec
        # chunk summaries B_k = Σ_j left_j u_{k, j}: (b, n, h, c)
        bsum = uc.sum(2) if left is None else torch.einsum("hj,bnjhc->bnhc", left.to(u.dtype), uc)
        first = init[:, None] if init is not None else u.new_zeros(b, 1, h, c)
        carry = first
        if n > 1:  # carry into chunk k ≥ 1: the inner kernel's inclusive sum up to chunk k − 1
            # chunks of at least 2 summaries: the recursion is log(n) deep (chunk 1 would go n deep)
            carry = torch.cat([first, _kernel_sum(bsum[:, :-1], inner, max(chunk, 2), init)], 1)  # (b, n, h, c)
        if read is None:
            y = y + carry[:, :, None]
        else:
            y = y + torch.einsum("hi,bnhc->bnihc", read.to(u.dtype), carry)
    return y.reshape(b, n * size, h, c)[:, :t]  # (b, n, C, h, c) -> (b, t, h, c)


def _kernel_attention(q: Tensor, k: Tensor, v: Tensor, kernel: _Kernel, chunk: int,
                      init: Tensor | None = None) -> Tensor:
    """``y_t = Σ_{s≤t} w(t − s) (q_t · k_s) v_s + γ^{t+1} q_t · init``, chunked (linear attention).

    Args:
        q: ``(b, t, h, r, e)`` (``r`` reads per token).
        k: ``(b, t, h, e)``.
        v: ``(b, t, h, f)``.
        kernel: the kernel.
        chunk: the chunk size ``C``.
        init: ``(b, h, e, f)`` or ``None``.

    Returns:
        ``(b, t, h, r, f)``.
    """
    b, t, h, r, e = q.shape
    f = v.shape[-1]
    size = _chunk_size(chunk, t)
    qc, n = _chunks(q, size)  # (b, n, C, h, r, e)
    kc, _ = _chunks(k, size)  # (b, n, C, h, e)
    vc, _ = _chunks(v, size)  # (b, n, C, h, f)
    y = None
    for lag in kernel.block_lags(size):
        if lag >= n:
            break
        weights = _block_weights(kernel, lag, size, q)  # (h or 1, C, C)
        scores = torch.einsum("bnihre,bnjhe->bnhrij", qc[:, lag:], kc[:, : n - lag]) * weights[:, None]
        part = _shift(torch.einsum("bnhrij,bnjhf->bnihrf", scores, vc[:, : n - lag]), lag)
        y = part if y is None else y + part
    spec = kernel.summary(size)
    if spec is not None and (n > 1 or init is not None):
        left, read, inner = spec
        keys = kc if left is None else kc * left.to(q.dtype).T[None, None, :, :, None]  # (b, n, C, h, e)
        bsum = torch.einsum("bnjhe,bnjhf->bnhef", keys, vc).reshape(b, n, h, e * f)  # (b, n, h, e·f)
        first = init.reshape(b, 1, h, e * f) if init is not None else q.new_zeros(b, 1, h, e * f)
        carry = first
        if n > 1:
            init_flat = init.reshape(b, h, e * f) if init is not None else None
            carry = torch.cat([first, _kernel_sum(bsum[:, :-1], inner, max(chunk, 2), init_flat)], 1)
        carry = carry.reshape(b, n, h, e, f)  # (b, n, h, e·f) -> (b, n, h, e, f)
        part = torch.einsum("bnihre,bnhef->bnihrf", qc, carry)
        y = y + (part if read is None else part * read.to(q.dtype).T[None, None, :, :, None, None])
    return y.reshape(b, n * size, h, r, f)[:, :t]  # (b, n, C, h, r, f) -> (b, t, h, r, f)


def _final_memory(key: Tensor, value: Tensor, kernel: _Kernel, chunk: int) -> Tensor:
    """``Σ_s w(T − 1 − s) key_s ⊗ value_s`` (chunk sums, then their sum): (b, h, e, f)."""
    t, h = key.shape[1], key.shape[2]
    lag = torch.arange(t - 1, -1, -1, device=key.device)
    weights = kernel.weights(lag).to(key.dtype).expand(h, t)  # (h, t)
    size = _chunk_size(chunk, t)
    keys, _ = _chunks(key * weights.T[None, :, :, None], size)  # (b, n, C, h, e)
    values, _ = _chunks(value, size)  # (b, n, C, h, f)
    return torch.einsum("bnjhe,bnjhf->bnhef", keys, values).sum(1)


def _phase_rate(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in float64, computed in at least float32 and outside autocast: the rates are
    summed over tokens, so rounding them to bf16 (as autocast would) gives a phase error growing with t."""
    with autocast_off(x):  # (none on a device without autocast, e.g. meta: shape and FLOP estimates)
        if layer.weight.dtype in (torch.float32, torch.float64):  # the module's own call: its hooks run
            return layer(x.to(layer.weight.dtype)).to(torch.float64)
        # a half-precision module: its weights upcast (its forward hooks are not called)
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias).to(torch.float64)


def _accumulate(phase0: Tensor, omega: Tensor) -> Tensor:
    """``(φ_0 + Σ_{s≤t} ω_s) mod 2π`` in float64: (b, d) start, (b, t, d) rates -> (b, t, d)."""
    return torch.remainder(phase0[:, None] + omega.to(torch.float64).cumsum(1), TWO_PI)


def _outside_inference(state: TPIState) -> TPIState:
    """``state``, its tensors made under ``torch.inference_mode`` copied when it is used outside it (e.g. a prompt
    read under inference mode, then decoded under ``no_grad`` or with gradients): torch refuses to write them in
    place there (the window's ring buffer) or to save them for backward (the decay's ``γ · M``)."""
    if torch.is_inference_mode_enabled():  # dynamo traces neither call: a graph break, kept for the copy below
        return state
    tensors = (state.phase, state.query_phase, state.memory, state.norm, *state.buffer)
    if not any(tensor is not None and tensor.is_inference() for tensor in tensors):
        return state

    return state._map(lambda tensor: tensor.clone() if tensor.is_inference() else tensor)


class _Tokens(NamedTuple):
    """Per-token quantities: what each token writes, how it reads, and its magnitude."""

    write: tuple[Tensor, ...]  # vector: (u (b, t, h, 2c),); matrix: (key (b, t, h, 2c), value (b, t, h, c))
    read: tuple[Tensor, ...]  # vector: (cos φ^q, sin φ^q), each (b, t, h, c); matrix: (query (b, t, h, 2, 2c),)
    m: Tensor  # (b, t, h)


# ---------- the modules ----------


class HolographicPhaseMemory(nn.Module):
    r"""Holographic phase memory (TPI): a causal sequence mixer ``(b, t, d) -> (b, t, d)``.

    See the module docstring (:mod:`kuramoto_attn.memory`) for the formulas. Options compose
    freely: any query × kernel × magnitude × normalisation × state.

    Args:
        d_model: channels ``d``.
        query: ``"shared"``, ``"decoupled"``, ``"offset"`` or ``"constrained"`` query phase.
        constrained_scale: ``c`` in ``ω^q = ω + c·tanh(W_g x)``, ``>= 0`` (``query="constrained"``;
            another value than the default is an error with the other queries).
        kernel: ``"unbounded"``, ``"window"`` (last ``window`` tokens) or ``"decay"`` (learned
            ``γ`` per head, parameter ``decay_logit``; see :meth:`decay_rate`).
        window: ``W >= 1``, the window length (``kernel="window"``; another value than the default
            is an error with the other kernels).
        magnitude: ``"none"`` (``m = 1``) or ``"sigmoid"`` (``m = 5σ(W_m x)``, one per head).
        normalize: ``"none"``, ``"sum"`` (divide by ``S_t``) or ``"sqrt"`` (by ``√S_t``).
        state: ``"vector"`` (per-channel complex memory, value ``x``) or ``"matrix"`` (per-head
            complex key–value memory with projections ``W_q, W_k, W_v``).
        num_heads: ``h``, dividing ``d_model``: heads share a decay rate and a magnitude (use
            ``num_heads=d_model`` with the vector state for per-channel ones). The vector state
            reads it only with ``kernel="decay"`` or ``magnitude="sigmoid"`` (else an error).
        expansion: output head width factor ``e``: 1 gives ``Linear(2d, d)``; ``e > 1`` gives
            ``Linear(2d, e·d) → GELU → Dropout → Linear(e·d, d)``.
        dropout: dropout probability in the output head, in ``[0, 1]``.
        chunk_size: tokens per chunk ``C`` of the parallel form (a speed/memory trade-off;
            results agree to rounding for every ``C``). Under ``torch.compile``, anything shorter than
            ``C`` (a sequence, or the scan over chunk summaries) is padded to ``C``.

    Shapes:
        * ``forward``: ``x`` ``(b, t, d)`` -> ``y`` ``(b, t, d)``
        * ``step``: ``x_t`` ``(b, d)`` -> ``y_t`` ``(b, d)``

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> memory = HolographicPhaseMemory(8, kernel="decay", normalize="sqrt", state="matrix", num_heads=2)
        >>> x = torch.randn(2, 5, 8)
        >>> y, state = memory(x[:, :3], memory.init_state(2))    # a prompt, keeping the state
        >>> y_4, state = memory.step(x[:, 3], state)              # then one token at a time
        >>> torch.allclose(memory(x)[:, 3], y_4, atol=1e-5), state.position
        (True, 4)
    """

    CONSTRAINED_SCALE, WINDOW = 0.1, 64  # the defaults

    def __init__(self, d_model: int, query: str = "shared", constrained_scale: float = CONSTRAINED_SCALE,
                 kernel: str = "unbounded", window: int = WINDOW, magnitude: str = "none",
                 normalize: str = "none", state: str = "vector", num_heads: int = 1,
                 expansion: int = 1, dropout: float = 0.0, chunk_size: int = 64) -> None:
        super().__init__()
        self.d_model = d = check_int("d_model", d_model, low=1)
        self.num_heads = h = check_int("num_heads", num_heads, low=1)
        if d % h:
            raise ValueError(f"num_heads: expected a divisor of d_model={d} but got {h}")
        self.query = check_choice("query", query, QUERIES)
        self.constrained_scale = check_real("constrained_scale", constrained_scale, low=0.0)
        self.kernel = check_choice("kernel", kernel, KERNELS)
        self.window = check_int("window", window, low=1)
        self.magnitude = check_choice("magnitude", magnitude, MAGNITUDES)
        self.normalize = check_choice("normalize", normalize, NORMALIZES)
        self.state_type = check_choice("state", state, STATES)
        self.expansion = check_int("expansion", expansion, low=1)
        self.dropout = check_real("dropout", dropout, low=0.0, high=1.0)
        self.chunk_size = check_int("chunk_size", chunk_size, low=1)
        # read by one variant only: set for another, they would be ignored
        if self.kernel != "window" and self.window != self.WINDOW:
            raise ValueError(f"window: only read with kernel='window', not {self.kernel!r}")
        if self.query != "constrained" and self.constrained_scale != self.CONSTRAINED_SCALE:
            raise ValueError(f"constrained_scale: only read with query='constrained', not {self.query!r}")
        if h > 1 and not self._reads_heads(self.state_type, self.kernel, self.magnitude):
            raise ValueError(f"num_heads: only read with state='matrix', kernel='decay' or magnitude='sigmoid' "
                             f"(the vector state's heads group only those), not with state={state!r}, "
                             f"kernel={kernel!r}, magnitude={magnitude!r}; use num_heads=1")

        self.omega = nn.Linear(d, d)  # key frequencies ω (the bias: a base rotation, as in RoPE)
        self.query_omega = nn.Linear(d, d) if query == "decoupled" else None
        self.query_delta = nn.Linear(d, d) if query == "constrained" else None
        self.query_offset = nn.Linear(d, d) if query == "offset" else None
        self.magnitude_proj = nn.Linear(d, h) if magnitude == "sigmoid" else None
        if state == "matrix":
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        if kernel == "decay":
            self.decay_logit = nn.Parameter(self._initial_decay_logit(h))
        if expansion == 1:
            self.head = nn.Sequential(nn.Linear(2 * d, d), nn.Dropout(dropout))
        else:
            self.head = nn.Sequential(nn.Linear(2 * d, expansion * d), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(expansion * d, d))

    @staticmethod
    def _initial_decay_logit(num_heads: int, device: torch.device | None = None) -> Tensor:
        # γ_h = 1 − 2^{−a}, a from 4 to 8: memories of ~16 (the reference's learned 13–17) to ~256 tokens
        a = torch.linspace(4.0, 8.0, num_heads, device=device)
        return torch.log(2.0 ** a - 1.0)

    # ----- public API -----

    def reset_parameters(self) -> None:
        """Initialise the parameters as the constructor does: every projection with ``nn.Linear``'s
        default and the decay kernel's ``θ_h`` so that ``γ_h = 1 − 2^{−a}``, ``a`` evenly from 4 to 8.
        For a module built on the meta device and then given storage with ``to_empty`` (FSDP and
        Fabric's ``init_module(empty_init=True)`` call it then). It draws in the parameters' dtype, as
        ``nn.Linear`` does: in the default dtype and under the same seed, the constructor's values."""
        for module in self.modules():  # in the order the constructor made them: the same draws
            if isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.kernel == "decay":
            with torch.no_grad():
                self.decay_logit.copy_(self._initial_decay_logit(self.num_heads, self.decay_logit.device))

    def decay_rate(self) -> Tensor:
        r"""``γ_h = \mathrm{clamp}(σ(θ_h), γ_{min}, 1)``, shape ``(h,)`` (``kernel="decay"`` only)."""
        return self._log_decay().exp()

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> TPIState:
        """The empty state (no tokens seen), on the parameters' device by default.

        Args:
            batch_size: ``b``.
            device: the state's device.
            dtype: the dtype of the memory, the normaliser and the window buffer, in which
                :meth:`step` and ``forward(x, state)`` accumulate (phases are always float64).
                Default: the parameters' dtype promoted to float32 at least (a bfloat16 or
                float16 module sums in float32: in bfloat16 a running sum of ones stops growing
                at 256). A state is accepted in that dtype or in the parameters' or the input's
                own dtype (a half one then sums in half precision; the input is the parameters' dtype,
                or half under ``torch.autocast``, which leaves float64 alone). Any other dtype is refused
                here, e.g. float64 for a float32 module: no input of the module could use it.

        Returns:
            A :class:`TPIState` with ``position == 0``.
        """
        b = check_int("batch_size", batch_size, low=0)  # 0 too, as the forward takes batch 0
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating-point torch.dtype but got {dtype!r}")
        ref = self.omega.weight
        try:
            device = ref.device if device is None else torch.device(device)
        except (TypeError, RuntimeError):
            raise ValueError(f"device: expected a torch.device or its name but got {device!r}") from None
        usable = {ref.dtype, torch.promote_types(ref.dtype, torch.float32)}
        if ref.dtype != torch.float64:  # under autocast the input may be half
            usable |= {torch.float16, torch.bfloat16}
        if dtype is not None and dtype not in usable:
            names = ", ".join(sorted(str(dt) for dt in usable))
            raise ValueError(f"dtype: a state of this {ref.dtype} module is one of {names} (the dtypes its inputs "
                             f"can have, or float32 for a half one) but got {dtype}")
        dtype = torch.promote_types(ref.dtype, torch.float32) if dtype is None else dtype
        shapes = self._state_shapes(b)
        try:
            phase = torch.zeros(shapes["phase"], dtype=torch.float64, device=device)
        except (AssertionError, RuntimeError) as err:  # e.g. cuda in a CPU-only build: torch's bare assert
            raise ValueError(f"device: {device} is not available here ({err})") from None
        query_phase = None if shapes["query_phase"] is None else phase.clone()
        buffer = tuple(torch.zeros(s, dtype=dtype, device=device) for s in shapes["buffer"])
        return TPIState(phase, query_phase, torch.zeros(shapes["memory"], dtype=dtype, device=device),
                        torch.zeros(shapes["norm"], dtype=dtype, device=device), buffer, 0)

    def _state_shapes(self, b: int) -> dict:
        """The shapes of a state of batch size ``b``: phases (float64), memory, normaliser and window buffer."""
        d, h, c = self.d_model, self.num_heads, self.d_model // self.num_heads
        buffer = []
        if self.kernel == "window":
            W = self.window
            writes = [(b, W, h, 2 * c)] if self.state_type == "vector" else [(b, W, h, 2 * c), (b, W, h, c)]
            buffer = writes + [(b, W, h)]
        return {"phase": (b, d), "query_phase": (b, d) if self.query in ("decoupled", "constrained") else None,
                "memory": (b, h, 2 * c) if self.state_type == "vector" else (b, h, 2 * c, c),
                "norm": (b, h), "buffer": buffer}

    def forward(self, x: Tensor, state: TPIState | None = None):
        """The parallel (chunked) form.

        Args:
            x: ``(b, t, d)``, ``t >= 1``.
            state: continue after this state (e.g. :meth:`init_state` or a previous call's).

        Returns:
            ``y`` ``(b, t, d)`` without a state; ``(y, new_state)`` with one. (With the window
            kernel a call with a state also re-reads the ``W`` buffered contributions: O(W) extra.)
        """
        b, t = self._check_input("x", x, 3)
        if state is not None:
            self._check_state(state, x)
            state = _outside_inference(state)
        phase, query_phase = self._phases(x, state)
        # with a state, the sums are in the state's dtype (float32 for a half-precision module); in float16 (a
        # float16 input, or float16 autocast) in float32 outside autocast: float16 sums overflowed S_t past
        # 65504, which silently zeroed every later read
        float16 = x.dtype == torch.float16 or autocast_dtype(x) == torch.float16
        acc = state.memory.dtype if state is not None else \
            torch.promote_types(x.dtype, torch.float32) if float16 else x.dtype
        outside_autocast = state is not None or float16
        tokens = self._tokens(x, phase, query_phase, acc)
        write, m, read = tokens.write, tokens.m, tokens.read
        if outside_autocast:  # under autocast the projections come back in its dtype
            write, m, read = tuple(w.to(acc) for w in write), m.to(acc), tuple(r.to(acc) for r in read)
        kernel, chunk = self._kernel_spec(), self.chunk_size
        init_memory = init_norm = None
        prefix = 0
        if state is not None and self.kernel == "window":
            # the window's earlier tokens come from the ring buffer: prepend them in order
            prefix = self.window
            shift = -(state.position % self.window)
            earlier = [buf.roll(shift, 1) for buf in state.buffer]  # ring slots -> chronological
            write = tuple(torch.cat([e, w], 1) for e, w in zip(earlier, write))
            m = torch.cat([earlier[-1], m], 1)
            if self.state_type == "matrix":
                read = (torch.cat([read[0].new_zeros(b, prefix, *read[0].shape[2:]), read[0]], 1),)
        elif state is not None:
            init_memory, init_norm = state.memory, state.norm

        with autocast_off(x) if outside_autocast else contextlib.nullcontext():
            if self.state_type == "vector":
                memory = _kernel_sum(write[0], kernel, chunk, init_memory)  # (b, prefix + t, h, 2c)
                r = self._read_vector(memory[:, prefix:], *read)
            else:
                r = _kernel_attention(read[0], write[0], write[1], kernel, chunk, init_memory)[:, prefix:]
            norm = None
            if self.normalize != "none" or state is not None:
                init = init_norm[..., None] if init_norm is not None else None
                norm = _kernel_sum(m[..., None], kernel, chunk, init)[..., 0]  # (b, prefix + t, h)
        y = self._output(r, None if norm is None else norm[:, prefix:], x.dtype if acc != x.dtype else None)
        if state is None:
            return y
        if self.kernel == "decay":
            # the carried state times γ^t from float64: the scan's float32 γ^t, off by up to 3e-8 for γ near 1,
            # drifted in proportion to the number of calls (one a token in generation: 2e-4 at 16k tokens)
            power = self._decay_power(t)  # (h,)
            with autocast_off(x):
                decay = kernel.weights(torch.arange(t - 1, -1, -1, device=x.device)).to(acc)  # γ^{t−1−s}, (h, t)
                final_norm = torch.einsum("ht,bth->bh", decay, m) + power * init_norm
                if self.state_type == "vector":
                    final_memory = torch.einsum("ht,bthc->bhc", decay, write[0]) + power[:, None] * init_memory
                else:
                    final_memory = _final_memory(write[0], write[1], kernel, chunk) + power[:, None, None] * init_memory
        else:
            final_norm = norm[:, -1].clone()  # copies: views would keep every token's sums alive
            if self.state_type == "vector":
                final_memory = memory[:, -1].clone()
            else:
                with autocast_off(x):
                    final_memory = _final_memory(write[0], write[1], kernel, chunk)
                if init_memory is not None:  # the unbounded kernel's (the window's earlier tokens are in its buffer)
                    final_memory = final_memory + init_memory
        position = state.position + t
        buffer: tuple[Tensor, ...] = ()
        if self.kernel == "window":  # the last W writes, placed at their ring slots
            shift = position % self.window
            buffer = tuple(w[:, -self.window:].roll(shift, 1).to(old.dtype)
                           for w, old in zip(write + (m,), state.buffer))
        # the last token's values copied: views would keep the whole (b, t, ...) tensors alive in the state
        query_end = query_phase[:, -1].clone() if state.query_phase is not None else None
        # the state keeps its dtype
        return y, TPIState(phase[:, -1].clone(), query_end, final_memory.to(state.memory.dtype),
                           final_norm.to(state.norm.dtype), buffer, position)

    def step(self, x_t: Tensor, state: TPIState) -> tuple[Tensor, TPIState]:
        """The recurrent form: one token, O(1) work (independent of the position).

        With ``kernel="window"`` the new contribution is written into the state's ring buffer in
        place (no O(W) copy), so the state passed in must not be reused afterwards; to branch from
        one state (e.g. beam search), step from a copy of its buffer:
        ``state._replace(buffer=tuple(b.clone() for b in state.buffer))``. A state made under
        ``torch.inference_mode`` and used outside it is copied first (as by ``forward``).

        Args:
            x_t: ``(b, d)``.
            state: the state after the previous tokens (:meth:`init_state` to start).

        Returns:
            ``(y_t, new_state)`` with ``y_t`` ``(b, d)``.
        """
        self._check_input("x_t", x_t, 2)
        x = x_t[:, None]  # (b, d) -> (b, 1, d)
        self._check_state(state, x)
        if any(stride == 0 and size > 1
               for buffer in state.buffer for stride, size in zip(buffer.stride(), buffer.shape)):
            # e.g. one state broadcast over a batch with .expand: the in-place write below would fail in torch
            raise ValueError("state: its window buffer is an expanded tensor (entries share memory), which step "
                             "writes in place: step from a copy, state._replace(buffer=tuple(b.clone() for b in "
                             "state.buffer))")
        state = _outside_inference(state)
        phase, query_phase = self._phases(x, state)
        acc = state.memory.dtype  # the sums' dtype (float32 for a half-precision module's init_state)
        tokens = self._tokens(x, phase, query_phase, acc)
        # as forward(x, state): the projections (autocast's dtype under autocast) cast to the state's dtype, and the
        # products with the memory outside autocast (float16 autocast turned a memory past 65504 into inf)
        write = tuple(w[:, 0].to(acc) for w in tokens.write)
        m = tokens.m[:, 0].to(acc)  # (b, h)
        read = tuple(r.to(acc) for r in tokens.read)
        with autocast_off(x):
            new = write[0] if self.state_type == "vector" else torch.einsum("bhe,bhf->bhef", *write)
            if self.kernel == "window":
                memory, norm = self._window_step(state, write, m, new)
            else:
                gamma = self._decay_power(1)  # (h,); 1 for the unbounded kernel
                expand = gamma.view(-1, *[1] * (state.memory.dim() - 2))
                memory, norm = expand * state.memory + new, gamma * state.norm + m
            memory, norm = memory.to(state.memory.dtype), norm.to(state.norm.dtype)  # as in forward
            if self.state_type == "vector":
                r = self._read_vector(memory[:, None], *read)
            else:
                r = torch.einsum("bhre,bhef->bhrf", read[0][:, 0], memory)[:, None]  # (b, 1, h, 2, c)
        y = self._output(r, norm[:, None], x.dtype if acc != x.dtype else None)[:, 0]
        query_end = query_phase[:, -1] if state.query_phase is not None else None
        return y, TPIState(phase[:, -1], query_end, memory, norm, state.buffer, state.position + 1)

    def extra_repr(self) -> str:
        # the arguments this variant reads, none that it ignores (the dropout shows as a submodule)
        scale = f", constrained_scale={self.constrained_scale}" if self.query == "constrained" else ""
        window = f", window={self.window}" if self.kernel == "window" else ""
        return (f"d_model={self.d_model}, query={self.query!r}{scale}, kernel={self.kernel!r}{window}, "
                f"magnitude={self.magnitude!r}, normalize={self.normalize!r}, state={self.state_type!r}, "
                f"num_heads={self.num_heads}, expansion={self.expansion}, chunk_size={self.chunk_size}")

    # ----- internals -----

    @staticmethod
    def _reads_heads(state: str, kernel: str, magnitude: str) -> bool:
        """Whether ``num_heads`` changes anything: the vector state's heads only group decay rates and magnitudes."""
        return state == "matrix" or kernel == "decay" or magnitude == "sigmoid"

    def _log_decay(self) -> Tensor:
        if self.kernel != "decay":
            raise ValueError(f"kernel: the decay rate exists only for kernel='decay', not {self.kernel!r}")
        return F.logsigmoid(self.decay_logit).clamp_min(math.log(DECAY_MIN))

    def _decay_power(self, n: int) -> Tensor:
        """``γ^n`` per head, ``(h,)``, in float64 from the parallel form's float32 log γ: it scales a carried
        state at every call (every token when stepping), where a float32 γ's rounding would add up; ones
        for the unbounded and window kernels."""
        if self.kernel == "decay":
            return (self._kernel_spec().log_gamma.double() * n).exp()
        return self.omega.weight.new_ones(self.num_heads)

    def _kernel_spec(self) -> _Kernel:
        if self.kernel == "decay":
            # exponents n·log γ in float32 at least: in float16 a lag past 65504, or log γ times the
            # chunk summaries' C^k, overflows (inf · 0 = NaN), and bf16 rounds lags past 256
            log_gamma = self._log_decay()
            return _Kernel("decay", log_gamma.to(torch.promote_types(log_gamma.dtype, torch.float32)))
        return _Kernel(self.kernel, None, self.window)

    def _phases(self, x: Tensor, state: TPIState | None) -> tuple[Tensor, Tensor]:
        """Wrapped key and query phases ``(b, t, d)``, float64, continuing from ``state``."""
        b = x.shape[0]
        start = x.new_zeros(b, self.d_model, dtype=torch.float64) if state is None else state.phase
        omega = _phase_rate(self.omega, x)
        phase = _accumulate(start, omega)
        if self.query == "shared":
            return phase, phase
        if self.query == "offset":
            return phase, torch.remainder(phase + _phase_rate(self.query_offset, x), TWO_PI)
        query_start = torch.zeros_like(start) if state is None else state.query_phase
        if self.query == "decoupled":
            return phase, _accumulate(query_start, _phase_rate(self.query_omega, x))
        delta = self.constrained_scale * torch.tanh(_phase_rate(self.query_delta, x))
        return phase, _accumulate(query_start, omega + delta)

    def _tokens(self, x: Tensor, phase: Tensor, query_phase: Tensor, dtype: torch.dtype | None = None) -> _Tokens:
        """The tokens in ``dtype`` (default ``x``'s; a state's float32 for a half-precision module)."""
        b, t, d = x.shape
        h, c = self.num_heads, d // self.num_heads
        dtype = x.dtype if dtype is None else dtype
        # projections are computed in the module's dtype, then cast (only where dtype is not x's)
        cast = (lambda z: z.to(dtype)) if dtype != x.dtype else (lambda z: z)
        # wrapped phases lose nothing in float32; at least float32 so half precisions rotate accurately
        trig = torch.promote_types(dtype, torch.float32)
        phase, query_phase = phase.to(trig), query_phase.to(trig)
        cos_k, sin_k = (f(phase).to(dtype).view(b, t, h, c) for f in (torch.cos, torch.sin))  # (b, t, d) -> (b, t, h, c)
        cos_q, sin_q = (f(query_phase).to(dtype).view(b, t, h, c) for f in (torch.cos, torch.sin))
        if self.magnitude_proj is None:
            m = x.new_ones(b, t, h, dtype=dtype)
        else:
            m = cast(MAGNITUDE_SCALE * torch.sigmoid(self.magnitude_proj(x)))  # (b, t, h)
        if self.state_type == "vector":
            value = cast(x).view(b, t, h, c) * m[..., None]  # (b, t, d) -> (b, t, h, c)
            return _Tokens((torch.cat([value * cos_k, value * sin_k], -1),), (cos_q, sin_q), m)
        k = cast(self.k_proj(x)).view(b, t, h, c)  # (b, t, d) -> (b, t, h, c)
        q = cast(self.q_proj(x)).view(b, t, h, c) * c ** -0.5
        v = cast(self.v_proj(x)).view(b, t, h, c) * m[..., None]
        key = torch.cat([k * cos_k, k * sin_k], -1)  # (b, t, h, 2c)
        qc, qs = q * cos_q, q * sin_q
        # Re and Im of (q e^{iφq})^H (k e^{iφ}) as dot products with [k cos φ, k sin φ]
        query = torch.stack([torch.cat([qc, qs], -1), torch.cat([-qs, qc], -1)], 3)  # (b, t, h, 2, 2c)
        return _Tokens((key, v), (query,), m)

    @staticmethod
    def _read_vector(memory: Tensor, cos_q: Tensor, sin_q: Tensor) -> Tensor:
        """``r = M e^{−iφ^q}`` from ``[Re M, Im M]`` (b, t, h, 2c): (b, t, h, 2, c)."""
        re, im = memory.chunk(2, -1)
        return torch.stack([re * cos_q + im * sin_q, im * cos_q - re * sin_q], 3)

    def _output(self, r: Tensor, norm: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
        """Normalise ``r`` (b, t, h, 2, c) by ``S`` (b, t, h), features ``[Re r, Im r]`` (cast to
        ``dtype``, the input's, when given), head."""
        if self.normalize == "sum":
            r = r / norm.clamp_min(NORM_EPS)[..., None, None]
        elif self.normalize == "sqrt":
            r = r / norm.clamp_min(NORM_EPS).sqrt()[..., None, None]
        b, t = r.shape[:2]
        features = r.transpose(2, 3).reshape(b, t, 2 * self.d_model)  # (b, t, h, 2, c) -> (b, t, 2d)
        return self.head(features if dtype is None else features.to(dtype))

    def _window_step(self, state: TPIState, write: tuple[Tensor, ...], m: Tensor, new: Tensor):
        """Ring-buffer update: add the new contribution, drop the one leaving the window."""
        slot = state.position % self.window
        old = [buf[:, slot].clone() for buf in state.buffer]  # cloned: the slot is overwritten next
        for buf, value in zip(state.buffer, write + (m,)):
            buf[:, slot] = value
        if (state.position + 1) % self.window == 0:
            # every W steps the whole buffer is new: recompute the sums so rounding cannot drift
            if self.state_type == "vector":
                memory = state.buffer[0].sum(1)
            else:
                memory = torch.einsum("bwhe,bwhf->bhef", state.buffer[0].clone(), state.buffer[1].clone())
            return memory, state.buffer[-1].sum(1)
        gone = old[0] if self.state_type == "vector" else torch.einsum("bhe,bhf->bhef", old[0], old[1])
        return state.memory + new - gone, state.norm + m - old[-1]

    def _check_input(self, name: str, x, ndim: int) -> tuple[int, int]:
        check_tensor(name, x)
        want = "(b, t, d)" if ndim == 3 else "(b, d)"
        # batch 0 passes, as in torch's layers and KuramotoAttention; no tokens is an error
        if x.dim() != ndim or x.shape[-1] != self.d_model or (ndim == 3 and x.shape[1] == 0):
            raise ValueError(f"{name}: expected a tensor of shape {want} with "
                             f"{'t >= 1 and ' if ndim == 3 else ''}d={self.d_model} but got {tuple(x.shape)}")
        check_input_like(name, x, self.omega.weight)
        return x.shape[0], x.shape[1]

    def _check_state(self, state, x: Tensor, name: str = "state") -> None:
        """``state`` fits this module and ``x``; errors start with ``name`` (the argument as the caller
        knows it, e.g. a model's ``cache: states[i]``)."""
        if not isinstance(state, TPIState):
            raise ValueError(f"{name}: expected a TPIState (see init_state) but got {type(state).__name__}")
        # the memory's dtype: the input's or the parameters', or either promoted to float32 (init_state's
        # default: a half-precision module's sums are float32; under autocast x may be bf16 while the
        # state stays float32)
        allowed = {dt for base in (x.dtype, self.omega.weight.dtype)
                   for dt in (base, torch.promote_types(base, torch.float32))}
        dtype = state.memory.dtype if torch.is_tensor(state.memory) and state.memory.dtype in allowed \
            else torch.promote_types(x.dtype, torch.float32)
        # (shape, dtype) of each field, from the shapes alone: making init_state's tensors took most of
        # this check's time, which every decoded token spends
        shapes = self._state_shapes(x.shape[0])
        expected = {field: None if shapes[field] is None else (torch.Size(shapes[field]), field_dtype)
                    for field, field_dtype in (("phase", torch.float64), ("query_phase", torch.float64),
                                               ("memory", dtype), ("norm", dtype))}
        expected_buffer = [(torch.Size(shape), dtype) for shape in shapes["buffer"]]
        for field in ("phase", "query_phase", "memory", "norm"):  # types first: the checks below read shapes
            got = getattr(state, field)
            if got is not None and not torch.is_tensor(got):
                raise ValueError(f"{name}: expected {field} to be a tensor (or None where the module keeps none) "
                                 f"but got {type(got).__name__}")
        if not isinstance(state.buffer, (tuple, list)):
            raise ValueError(f"{name}: expected buffer to be a tuple of tensors (() without a window) but got "
                             f"{type(state.buffer).__name__}")
        if state.memory is None or state.memory.shape[0] != x.shape[0]:
            got = "no memory" if state.memory is None else f"a state of batch size {state.memory.shape[0]}"
            raise ValueError(f"{name}: expected batch size {x.shape[0]} (that of the input) but got {got}")
        for field in ("phase", "query_phase", "memory", "norm"):
            got, want = getattr(state, field), expected[field]
            if (got is None) != (want is None) or (
                    got is not None and (got.shape != want[0] or got.dtype != want[1])):
                describe = "None" if got is None else f"{tuple(got.shape)} {got.dtype}"
                wanted = "None" if want is None else f"{tuple(want[0])} {want[1]}"
                if got is not None and want is not None and got.shape == want[0]:  # the dtype alone
                    dtypes = ", ".join(sorted(str(dt) for dt in allowed))
                    why = "a state's phases are float64" if field.endswith("phase") else \
                        "a state's norm has its memory's dtype, as init_state sets it" if got.dtype in allowed else \
                        f"a state of this module and input is one of {dtypes}, as init_state(dtype=...) sets it"
                else:
                    why = "a state from a different configuration?"
                raise ValueError(f"{name}: expected {field} {wanted} for this module and input "
                                 f"but got {describe} ({why})")
            if got is not None and got.device != x.device:
                raise ValueError(f"{name}: expected {field} on {x.device} (the input's) but got {got.device}")
        if len(state.buffer) != len(expected_buffer) or any(
                not torch.is_tensor(got) or got.shape != want[0] or got.dtype != want[1] or got.device != x.device
                for got, want in zip(state.buffer, expected_buffer)):
            wanted = [f"{tuple(shape)} {dtype}" for shape, dtype in expected_buffer]
            got = [f"{tuple(g.shape)} {g.dtype} on {g.device}" if torch.is_tensor(g) else type(g).__name__
                   for g in state.buffer]
            raise ValueError(f"{name}: expected a window buffer of {wanted} on {x.device} but got {got}")
        check_int(f"{name}.position", state.position, low=0)


class TPIBlock(nn.Module):
    r"""A pre-norm residual block around a :class:`HolographicPhaseMemory`, with an optional FFN:

    .. math::

        x \leftarrow x + \mathrm{TPI}(\mathrm{LN}(x)), \qquad
        x \leftarrow x + \mathrm{FFN}(\mathrm{LN}(x)) \quad (\text{if } \mathrm{ffn\_expansion} > 0),

    one residual per sub-layer (the memory itself adds none);
    ``FFN = Linear(d, f·d) → GELU → Linear(f·d, d) → Dropout``.

    Args:
        d_model: channels ``d``.
        memory: the mixer (default ``HolographicPhaseMemory(d_model)``); its ``d_model`` must match.
        ffn_expansion: FFN width factor ``f``; 0 for no FFN.
        dropout: dropout probability after the FFN, in ``[0, 1]`` (an error without an FFN).

    Shapes:
        * ``forward``: ``x`` ``(b, t, d)`` -> ``(b, t, d)``; ``step``: ``x_t`` ``(b, d)`` -> ``(b, d)``.
        * ``forward(x, state)`` and ``step`` return ``(y, new_state)`` (a :class:`TPIState`).

    Example:
        >>> import torch
        >>> block = TPIBlock(16, HolographicPhaseMemory(16, kernel="window", window=4))
        >>> x = torch.randn(2, 6, 16)
        >>> y, state = block(x, block.init_state(2))
        >>> y.shape, torch.allclose(block(x), y)
        (torch.Size([2, 6, 16]), True)
    """

    def __init__(self, d_model: int, memory: HolographicPhaseMemory | None = None,
                 ffn_expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, low=1)
        if memory is None:
            memory = HolographicPhaseMemory(d_model)
        if not isinstance(memory, HolographicPhaseMemory) or memory.d_model != d_model:
            got = f"d_model={memory.d_model}" if isinstance(memory, HolographicPhaseMemory) else type(memory).__name__
            raise ValueError(f"memory: expected a HolographicPhaseMemory with d_model={d_model} but got {got}")
        ffn_expansion = check_int("ffn_expansion", ffn_expansion, low=0)
        dropout = check_real("dropout", dropout, low=0.0, high=1.0)
        if dropout and not ffn_expansion:
            raise ValueError(f"dropout: only read with an FFN (ffn_expansion > 0) but got {dropout}")
        self.memory = memory
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = None
        if ffn_expansion > 0:
            self.norm2 = nn.LayerNorm(d_model)
            self.ffn = nn.Sequential(nn.Linear(d_model, ffn_expansion * d_model), nn.GELU(),
                                     nn.Linear(ffn_expansion * d_model, d_model), nn.Dropout(dropout))

    def init_state(self, batch_size: int, device=None, dtype=None) -> TPIState:
        """The memory's empty state (see :meth:`HolographicPhaseMemory.init_state`)."""
        return self.memory.init_state(batch_size, device, dtype)

    def forward(self, x: Tensor, state: TPIState | None = None):
        """``x`` ``(b, t, d)`` -> ``y``, or ``(y, new_state)`` when a state is given."""
        self.memory._check_input("x", x, 3)  # before the norm, whose own errors would not name x
        out = self.memory(self.norm1(x), state)
        mixed, new_state = out if state is not None else (out, None)
        y = self._ffn(x + mixed)
        return y if state is None else (y, new_state)

    def step(self, x_t: Tensor, state: TPIState) -> tuple[Tensor, TPIState]:
        """``x_t`` ``(b, d)`` -> ``(y_t, new_state)``, O(1) per token. With ``kernel="window"`` the state
        passed in is updated in place: to branch from one state (e.g. beam search), copy its buffer first
        (see :meth:`HolographicPhaseMemory.step`)."""
        self.memory._check_input("x_t", x_t, 2)
        mixed, state = self.memory.step(self.norm1(x_t), state)
        return self._ffn(x_t + mixed), state

    def _ffn(self, x: Tensor) -> Tensor:
        return x if self.ffn is None else x + self.ffn(self.norm2(x))
