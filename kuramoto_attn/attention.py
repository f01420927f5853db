r"""KuramotoAttention: causal multi-head attention whose logits are modulated by Kuramoto phases.

Einstein legend: ``b`` batch, ``t`` query tokens, ``s`` key tokens, ``h`` heads, ``d`` head width
(``d_model / h``), ``n`` oscillators per head and token, ``e = d + 2n``.

For every head, each token ``i`` carries ``n`` oscillators:

1. **Initial phases** from a bounded map of the input, as in the reference PhaseGPT layer,
   :math:`\theta^0_i = \pi \tanh(W_\theta x_i) \in (-\pi, \pi)`: a smooth function of ``x``, never
   a wrapped angle.
2. **Integration** for ``steps`` steps of size ``dt`` with the chosen solver of

   .. math::

       \frac{d\theta_{ik}}{dt} = \omega_{hk} + K_h\, c_{ik}(\theta), \qquad
       c_{ik} = \begin{cases}
         \frac{1}{|S_i|}\sum_{j \in S_i} \sin(\theta_{jk} - \theta_{ik} - \alpha) & \text{mean\_field} \\
         \sum_j A_{ij}(\theta)\, \sin(\theta_{jk} - \theta_{ik} - \alpha) & \text{attention}
       \end{cases}

   with ``S_i`` the valid tokens ``j <= i`` (all valid tokens when ``causal=False``). The mean field
   is a cumulative sum of :math:`e^{i\theta}` over tokens (O(t·n)); the attention coupling uses the
   layer's own attention weights at the current phases, as the ``[cos θ, sin θ]`` value columns of
   one SDPA call per evaluation (O(t·n) memory). Sign and normalisation follow
   :mod:`kuramoto_attn.dynamics`: attractive for ``K > 0``. Any other scheme is a
   :class:`~kuramoto_attn.Coupling` module given as ``coupling``: then :math:`c = \mathrm{coupling}(\theta)`
   with the phases laid out ``(b, h, t, n)`` (tokens on axis −2, oscillators on −1).
3. **Phase-modulated attention**, one ``scaled_dot_product_attention`` call:

   .. math::

       \ell_{ij} = \frac{q_i \cdot k_j}{\sqrt d} + \frac{\beta_h}{n}\sum_k \cos(\theta_{ik} - \theta_{jk})
       = \frac{[q_i,\, c\cos\theta_i,\, c\sin\theta_i] \cdot [k_j,\, \cos\theta_j,\, \sin\theta_j]}{\sqrt d},
       \quad c = \frac{\beta_h \sqrt d}{n},

   so the rank-2n phase term rides in the query/key features and no ``t × t × n`` tensor exists.
   Values are ``[v_j, cos θ_j, sin θ_j]``, so queries, keys and values share the width ``e`` (SDPA's
   fused CPU/GPU kernels need that) and phase information reaches the output as features.
4. **Output**: :math:`y_i = W_o\, \mathrm{concat}_h [\sum_j A_{ij} v_j, \sum_j A_{ij}\cos\theta_j,
   \sum_j A_{ij}\sin\theta_j]`.

Backward memory does not grow with ``steps`` beyond one phase tensor ``(b, h, t, n)`` per step:
each step runs under activation checkpointing, so only its input phases are kept. The default
configuration (Euler, mean field, no cache) runs all steps in one autograd function with a
hand-written backward that keeps the same (``kuramoto_attn/_euler_mean_field.py``; nothing per step
under ``torch.no_grad``, e.g. in evaluation and generation). These
hand-written backward passes are first order: ``create_graph=True`` (gradient penalties,
Hessian-vector products) through them is an error. Under ``torch.func`` transforms (``grad``, ``vmap``,
``jacrev``, e.g. per-sample gradients) the layer uses plain autograd ops instead, without
checkpoints: the same values and gradients, with every intermediate of every step kept for backward;
nested (``grad`` of ``grad``) they give second-order gradients, with SDPA's math kernel
(``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``: the fused kernels have no second derivative).
``torch.func.functional_call`` under plain autograd (other weights for one call: fast weights, hypernetworks)
gives the gradients of the weights it was given: the checkpoints rerun each step with them in backward.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from ._checks import (autograd_records, check_bool, check_cache_dtype, check_choice, check_input_like, check_int,
                      check_real, check_tensor, in_func_transform, in_inference_mode, largest_value,
                      pytree_dataclass)
from ._euler_mean_field import euler_mean_field, first_order
from ._owner import OwnedCache
from .couplings import Coupling, GraphCoupling, MeanFieldCoupling, _pull
from .integrators import SOLVERS
from .order_params import _resultant_length
from .regularizers import CoherenceRegularizer, FrequencyJitter, PhaseNoise

__all__ = ["KuramotoAttention", "KuramotoCache", "KuramotoInfo", "PhaseGPTAttention"]

COUPLINGS = ("mean_field", "attention")


@pytree_dataclass  # torch.export can return it (return_info=True)
@dataclass
class KuramotoInfo:
    """Diagnostics returned by ``KuramotoAttention(..., return_info=True)``.

    Attributes:
        phases: final phases ``(b, h, t, n)``, unwrapped (see :func:`~kuramoto_attn.wrap_phase`).
        R: order parameter per head ``(b, h)``: R over each token's ``n`` oscillators, computed per
            head, averaged over the valid tokens.
        R_steps: the same after every integration step ``(steps + 1, b, h)``, first entry at
            ``θ⁰`` (detached).
        coherence_loss: the coherence regularizer's scalar loss on the final phases (padded tokens
            excluded), or ``None`` when the layer has no regularizer (neither ``coherence_target``
            nor ``coherence_band``). It is returned, never added to anything: add it to your loss.

    Example:
        >>> import torch
        >>> layer = KuramotoAttention(d_model=16, num_heads=2, num_oscillators=4, steps=3,
        ...                           coherence_target=0.5)
        >>> _, info = layer(torch.randn(1, 5, 16), return_info=True)
        >>> info.phases.shape, info.R.shape, info.R_steps.shape, info.coherence_loss.shape
        (torch.Size([1, 2, 5, 4]), torch.Size([1, 2]), torch.Size([4, 1, 2]), torch.Size([]))
    """

    phases: Tensor
    R: Tensor
    R_steps: Tensor
    coherence_loss: Tensor | None = None


@dataclass
class KuramotoCache(OwnedCache):
    """State of the tokens seen so far, for incremental decoding; ``forward`` updates it in place.

    Start with an empty ``KuramotoCache()`` and pass the same object on every call.

    The cache holds no autograd graph: a backward through a call reaches that call's new tokens and the
    layer's parameters, and stops at the cached tokens (their keys, values and phase sums are constants
    there). It is for decoding; to train across chunks with gradients into earlier tokens, run the whole
    sequence in one forward. (A cache that kept each call's graph would make the next call's backward run
    into a graph already freed, and keep every earlier call's graph alive.)

    Attributes:
        keys: ``[k, cos θ, sin θ]`` of past tokens ``(b, h, s, e)`` (final phases).
        values: ``[v, cos θ, sin θ]`` of past tokens ``(b, h, s, e)``.
        valid: which past tokens are valid ``(b, s)``.
        field_state: per solver evaluation ``(step, stage)``: for the mean field the running sums
            ``(Σ cos θ, Σ sin θ)`` of shape ``(b, h, n, 1)`` and the valid count ``(b, 1, 1, 1)``; for
            the attention coupling the past tokens' ``[cos θ, sin θ]`` at that evaluation
            ``(b, h, s, 2n)`` (so it grows by ``steps × stages × 2n`` numbers per token and head); for a
            coupling module the past tokens' phases ``(b, h, s, n)`` at that evaluation.
        owner: weak reference to the layer that filled it (None before). Any other layer refuses the
            cache (give each layer its own), and so does every layer once that one is gone. A
            ``copy.deepcopy`` of the cache belongs to the same layer (to branch), or to the layer's copy
            when the layer is copied first in the same call (``copy.deepcopy((model, cache))``); a
            cache pickled and loaded belongs to no layer.

    Example:
        >>> import torch
        >>> layer = KuramotoAttention(d_model=16, num_heads=2, num_oscillators=4, steps=2)
        >>> cache = KuramotoCache()
        >>> y = layer(torch.randn(3, 4, 16), cache=cache)       # a prompt of 4 tokens
        >>> y = layer(torch.randn(3, 1, 16), cache=cache)       # then one token at a time
        >>> cache.length, tuple(cache.keys.shape)               # keys: (b, h, s, d + 2n)
        (5, (3, 2, 5, 16))
    """

    keys: Tensor | None = None
    values: Tensor | None = None
    valid: Tensor | None = None
    field_state: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        """Number of tokens cached."""
        return 0 if self.keys is None else self.keys.shape[-2]


@dataclass
class _Pass:
    """What one forward call's coupling evaluations share (not a public type)."""

    q: Tensor | None  # (b, t, h, d), the new tokens
    k: Tensor | None  # (b, t, h, d)
    v: Tensor | None  # (b, t, h, d)
    valid: Tensor | None  # (b, s) or None when every token is valid
    mask: Tensor | None  # (b, 1, t, s) boolean SDPA mask, or None
    is_causal: bool
    cache: KuramotoCache | None  # holding past tokens, else None
    record: bool  # keep each evaluation's phase state for the cache
    plain: bool = False  # under a torch.func transform: plain autograd ops only (see in_func_transform)
    new_state: dict = field(default_factory=dict)


# The attention coupling's SDPA calls (whose output feeds the phase field) avoid cuDNN's kernel: its
# backward gave gradients wrong by ~100% in bf16 (torch 2.11, H100), where flash, efficient and math
# agree with float64 (tests/test_cuda.py). The layer's final attention may use any kernel.
_FIELD_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KuramotoAttention(nn.Module):
    r"""Multi-head self-attention coupled to Kuramoto oscillators, causal and O(t·n) in memory.

    See the module docstring for the formulas. Learnable: the projections, natural frequencies
    ``ω`` ``(h, n)`` (initialised ``N(0, 0.1²)``), the phase-logit weight ``β`` per head
    (initialised 1) and, with ``learnable_coupling``, the strength ``K`` per head.

    Args:
        d_model: model width, divisible by ``num_heads``.
        num_heads: number of heads ``h``.
        num_oscillators: oscillators per head and token ``n >= 1``.
        coupling_strength: initial ``K`` (negative: the reference's repulsive sign).
        steps: integration steps ``>= 1``.
        dt: step size ``> 0``.
        integrator: ``"euler"``, ``"heun"`` or ``"rk4"``.
        coupling: ``"mean_field"`` (cumulative mean field over tokens), ``"attention"`` (the
            layer's softmax attention weights), or a :class:`~kuramoto_attn.Coupling` module (your
            own scheme, or e.g. ``MeanFieldCoupling(dim=-2, causal=True, harmonics=(1, 2))``): it is
            called on the phases ``(b, h, t, n)``, with ``mask=`` ``(b, 1, t, 1)`` (True = valid)
            when there is padding, and its term (its own strength and lag included) is scaled by the
            layer's ``K`` per head; padded tokens get zero coupling (the layer zeroes their own term,
            even a NaN one, but for finite gradients it must be finite;
            a module along the tokens must itself use ``mask`` to keep them from pulling valid tokens:
            one that ignores it lets padding change the valid outputs). With ``causal=True`` it must not
            mix later tokens into earlier ones (along tokens: ``causal=True``; across the
            oscillators of one token, any); a :class:`~kuramoto_attn.MeanFieldCoupling` along the
            tokens that is not causal, or a :class:`~kuramoto_attn.GraphCoupling` along them whose
            weights are learnable or not lower-triangular, is an error, and so is either along the batch
            axis (dim 0: it would couple the sequences of a batch); other modules are trusted. A
            :class:`~kuramoto_attn.GraphCoupling` along the tokens couples sequences of exactly its
            ``n`` tokens (another length, or decoding with a ``cache``, is an error).
            Runs on the generic solver path. With a
            ``cache``, the module sees the past tokens' phases (and mask) at each evaluation followed by the new
            tokens' (O(t) work per decoded token) and only the new tokens' terms are used: this
            equals the full forward for a module that is causal along the tokens.
        phase_lag: Sakaguchi lag ``α`` in radians (of a coupling module: its own ``phase_lag``).
        learnable_coupling: learn ``K`` per head (otherwise a fixed buffer).
        phase_noise: std of :class:`~kuramoto_attn.PhaseNoise` added after each step (training).
        freq_jitter: relative :class:`~kuramoto_attn.FrequencyJitter` of ``ω`` (training).
        dropout: attention-weight dropout of the output attention (training; the coupling's
            weights are not dropped).
        causal: token ``i`` sees tokens ``j <= i`` in attention and coupling. ``False`` is the
            reference's (leaky) behaviour, for comparison only.
        bias: biases in the projections.
        coherence_target: if given, a :class:`~kuramoto_attn.CoherenceRegularizer` with this
            target is applied to the final phases and its loss returned in the info (modes
            ``"ceiling"`` and ``"center"``).
        coherence_weight: the regularizer's weight ``λ``.
        coherence_mode: ``"ceiling"``, ``"center"`` or ``"band"``. Weight and mode other than their
            defaults are an error without a target or band (they would have no effect).
        coherence_band: ``(lo, hi)``: in ``"band"`` mode, the regularizer keeps R inside it (and
            ``coherence_target`` is not given); an error in the other modes.

    Shapes:
        * ``x``: ``(b, t, d_model)``
        * ``key_padding_mask`` (optional, bool, True = valid): ``(b, t)``; padded tokens are neither
          attended to nor counted in the mean field; their own outputs are unspecified (finite).
        * output: ``(b, t, d_model)``, or ``(output, KuramotoInfo)`` with ``return_info=True``.

    Example:
        >>> import torch
        >>> layer = KuramotoAttention(d_model=32, num_heads=4, num_oscillators=8)
        >>> x = torch.randn(2, 10, 32)
        >>> y, info = layer(x, return_info=True)
        >>> y.shape, info.phases.shape, info.R.shape
        (torch.Size([2, 10, 32]), torch.Size([2, 4, 10, 8]), torch.Size([2, 4]))
        >>> cache = KuramotoCache()                         # incremental decoding
        >>> steps = [layer(x[:, i:i + 1], cache=cache) for i in range(10)]
        >>> torch.allclose(torch.cat(steps, dim=1), y, atol=1e-5)
        True
    """

    def __init__(self, d_model: int, num_heads: int, num_oscillators: int = 32,
                 coupling_strength: float = 1.0, steps: int = 10, dt: float = 0.1,
                 integrator: str = "euler", coupling: str | Coupling = "mean_field", phase_lag: float = 0.0,
                 learnable_coupling: bool = True, phase_noise: float = 0.0, freq_jitter: float = 0.0,
                 dropout: float = 0.0, causal: bool = True, bias: bool = True,
                 coherence_target: float | None = None, coherence_weight: float = 0.1,
                 coherence_mode: str = "ceiling", coherence_band: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.d_model = check_int("d_model", d_model, low=1)
        self.num_heads = check_int("num_heads", num_heads, low=1)
        if d_model % num_heads:
            raise ValueError(f"d_model: expected a multiple of num_heads={num_heads} but got {d_model}")
        self.head_dim = d_model // num_heads
        self.num_oscillators = check_int("num_oscillators", num_oscillators, low=1)
        self.steps = check_int("steps", steps, low=1)
        # the phases' arithmetic runs in the parameters' dtype: a larger number is inf there (NaN outputs)
        largest = largest_value()
        self.dt = check_real("dt", dt, low=0.0, low_open=True, high=largest)
        self.integrator = check_choice("integrator", integrator, SOLVERS)
        calls = []  # the solver's field evaluations per step (a cache holds a state for each)
        SOLVERS[integrator]().step(lambda theta: calls.append(0) or theta, torch.zeros(()), 0.0)
        self._stages = len(calls)
        self.phase_lag = check_real("phase_lag", phase_lag)
        self.causal = check_bool("causal", causal)
        self.coupling = self._check_coupling(coupling, self.phase_lag, self.causal)
        self.dropout = check_real("dropout", dropout, low=0.0, high=1.0)
        self._bias = bias = check_bool("bias", bias)
        h, n = num_heads, num_oscillators

        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.phase_proj = nn.Linear(d_model, h * n, bias=bias)
        self.out = nn.Linear(h * (self.head_dim + 2 * n), d_model, bias=bias)
        self.omega = nn.Parameter(0.1 * torch.randn(h, n))
        self.beta = nn.Parameter(torch.ones(h))
        self._initial_strength = check_real("coupling_strength", coupling_strength, low=-largest, high=largest)
        strength = torch.full((h, 1, 1), self._initial_strength)
        if check_bool("learnable_coupling", learnable_coupling):
            self.strength = nn.Parameter(strength)
        else:
            self.register_buffer("strength", strength)
        self.phase_noise = PhaseNoise(check_real("phase_noise", phase_noise, low=0.0, high=largest))
        self.freq_jitter = FrequencyJitter(check_real("freq_jitter", freq_jitter, low=0.0, high=largest))
        self.coherence = self._coherence(coherence_target, coherence_weight, coherence_mode, coherence_band)

    def reset_parameters(self) -> None:
        """Initialise the layer's parameters as the constructor does: the projections with
        ``nn.Linear``'s default, ``ω ~ N(0, 0.1²)``, ``β = 1`` and ``K = coupling_strength`` (a buffer
        when ``learnable_coupling=False``). For a layer built on the meta device and then given storage
        with ``to_empty`` (FSDP and Fabric's ``init_module(empty_init=True)`` call it then). It draws in the
        parameters' dtype, as ``nn.Linear`` does: in the default dtype and under the same seed, the
        constructor's values. A ``coupling`` module you gave is yours: not reset.
        """
        for linear in (self.qkv, self.phase_proj, self.out):  # the constructor's order: the same draws
            linear.reset_parameters()
        with torch.no_grad():
            # in the parameter's own dtype and device, as nn.Linear.reset_parameters draws
            self.omega.copy_(0.1 * torch.randn(self.omega.shape, device=self.omega.device, dtype=self.omega.dtype))
            self.beta.fill_(1.0)
            self.strength.fill_(self._initial_strength)

    @staticmethod
    def _coherence(target, weight, mode, band) -> CoherenceRegularizer | None:
        """The regularizer (None without a target or band), checked so that errors name this layer's
        arguments: the target is read in ceiling and center modes, the band in band mode only."""
        weight = check_real("coherence_weight", weight, low=0.0, high=largest_value())
        mode = check_choice("coherence_mode", mode, CoherenceRegularizer.MODES)
        if target is None and band is None:  # a weight or mode given for no regularizer is a mistake
            defaults = inspect.signature(KuramotoAttention).parameters
            for name, value in (("coherence_weight", weight), ("coherence_mode", mode)):
                if value != defaults[name].default:
                    raise ValueError(f"{name}: has no effect without coherence_target (or coherence_band) "
                                     f"(got {value!r})")
            return None
        if mode != "band":
            if band is not None:
                raise ValueError(f"coherence_band: only read in coherence_mode='band', not {mode!r}")
            return CoherenceRegularizer(check_real("coherence_target", target, low=0.0, high=1.0), weight, mode)
        if target is not None:
            raise ValueError("coherence_target: not read in coherence_mode='band'; give coherence_band=(lo, hi)")
        try:
            return CoherenceRegularizer(weight=weight, mode=mode, band=band)
        except ValueError as err:  # "band: ..."
            raise ValueError(f"coherence_{err}") from None

    @staticmethod
    def _check_coupling(coupling, phase_lag: float, causal: bool) -> str | Coupling:
        if not isinstance(coupling, Coupling):
            if not isinstance(coupling, str):
                raise ValueError(f"coupling: expected one of {sorted(COUPLINGS)} or a kuramoto_attn.Coupling module "
                                 f"but got {type(coupling).__name__}")
            return check_choice("coupling", coupling, COUPLINGS)
        name = type(coupling).__name__
        if phase_lag != 0.0:  # two lags, one of them silently on top of the other
            raise ValueError(f"phase_lag: with a coupling module, set the lag on the module ({name}.phase_lag), "
                             f"not on the layer (got {phase_lag})")
        parameters = list(inspect.signature(coupling.interaction).parameters.values())[1:]  # after theta
        needed = [p.name for p in parameters if p.default is p.empty and p.name != "mask"
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if needed:
            raise ValueError(f"coupling: {name}.interaction needs {', '.join(needed)}, which this layer cannot "
                             "give (for the layer's own attention weights use coupling='attention')")
        if any(p.name == "mask" and p.kind == p.POSITIONAL_ONLY for p in parameters):  # given as mask=...
            raise ValueError(f"coupling: {name}.interaction takes mask as a positional-only argument; this layer "
                             "passes it as a keyword (mask=...), so make it an ordinary argument")
        if any(p.name == "mask" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in parameters):  # the layer calls it without a mask when nothing is padded
            raise ValueError(f"coupling: {name}.interaction needs mask, which this layer gives only with padding; "
                             "give it a default (mask=None: no padding)")
        if isinstance(coupling, (MeanFieldCoupling, GraphCoupling)) and coupling.dim in (0, -4):
            raise ValueError(f"coupling: {name} along dim={coupling.dim}, the batch axis of the phases (b, h, t, n), "
                             "would couple different sequences; use dim=-2 (tokens) or -1 (oscillators)")
        if isinstance(coupling, MeanFieldCoupling) and causal and not coupling.causal and coupling.dim in (-2, 2):
            raise ValueError(f"coupling: {name} along the tokens (dim={coupling.dim}) with causal=False would let "
                             "every token see later ones in a causal layer; give it causal=True")
        _check_graph_causal(coupling, causal)
        return coupling

    #: use the fused Euler mean-field integration where it applies (False: the generic solver path)
    _fast_path = True

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, *,
                cache: KuramotoCache | None = None,
                return_info: bool = False) -> Tensor | tuple[Tensor, KuramotoInfo]:
        """Attend over ``x`` (and the cached tokens, if a ``cache`` is given; it is updated in place).

        Args:
            x: ``(b, t, d_model)``.
            key_padding_mask: optional bool ``(b, t)``, True = valid. Padded positions still pass through
                the projections: their inputs must be finite, as for ``nn.MultiheadAttention`` (a NaN there
                reaches every output, as 0 · NaN is NaN).
            cache: a :class:`KuramotoCache` (empty to start) for incremental decoding; ``x`` then
                holds the new tokens only. Needs ``causal=True``.
            return_info: also return a :class:`KuramotoInfo` (for the tokens of ``x``).

        Returns:
            ``(b, t, d_model)``, or ``(output, KuramotoInfo)`` with ``return_info=True``.
        """
        b, t = self._check_input(x)
        valid = self._check_mask(key_padding_mask, b, t, x.device)
        past = self._check_cache(cache, b, x.device)
        return_info = check_bool("return_info", return_info)
        h, n, d = self.num_heads, self.num_oscillators, self.head_dim
        # (b, t, 3 * h * d) -> 3 × (b, t, h, d) views: SDPA then returns (b, t, h, e) memory, so the
        # output projection needs no copy
        q, k, v = self.qkv(x).view(b, t, 3, h, d).unbind(2)
        if past:
            check_cache_dtype(cache.keys, q)
        if past and cache._filled_by_another(self):  # last: the checks above say more where they apply
            raise ValueError("cache: filled by another KuramotoAttention layer (of the same shape); give each "
                             "layer its own KuramotoCache")
        phase_dtype = x.dtype if x.dtype == torch.float64 else torch.float32  # phases never in half
        # (b, t, h * n) -> (b, h, n, t): the integration's layout; the cumulative mean field then
        # runs along the contiguous last axis (about 2.4x faster than along the tokens of (b, h, t, n))
        theta_proj = self.phase_proj(x).to(phase_dtype).view(b, t, h, n).permute(0, 2, 3, 1).contiguous()
        # π·tanh(u) written as 2π·σ(2u) − π: the same function, and torch's CPU sigmoid is about 9x
        # faster than its tanh (on (12, 4, 32, 64) float32: 22 against 200 µs on one thread)
        theta0 = torch.sigmoid(2.0 * theta_proj).mul(2.0 * math.pi).sub_(math.pi)

        if valid is not None or (past and cache.valid is not None):
            new_valid = valid if valid is not None else x.new_ones(b, t, dtype=torch.bool)
            valid = new_valid if not past else torch.cat([self._cached_valid(cache, b), new_valid], dim=1)
        if valid is not None and isinstance(self.coupling, Coupling) and not _takes_mask(self.coupling):
            raise ValueError(f"key_padding_mask: the coupling {type(self.coupling).__name__}.interaction takes no "
                             "mask, so padded tokens would couple to valid ones; give it a mask= argument")
        _check_graph_causal(self.coupling, self.causal)  # its weights may have been loaded or edited since
        mask, is_causal = self._attention_mask(t, past, valid, x.device)
        run = _Pass(q, k, v, valid, mask, is_causal, cache if past else None, record=cache is not None,
                    plain=in_func_transform())

        omega = self.freq_jitter(self.omega).view(h, n, 1)
        theta, R_steps = self._integrate(theta0, omega, run, return_info)
        out, keys, values = self._attend(run, theta, dropout=self.dropout if self.training else 0.0)
        y = self.out(out.transpose(1, 2).reshape(b, t, h * (d + 2 * n)))  # (b, h, t, e) -> (b, t, h * e)

        if cache is not None:
            self._update_cache(cache, keys, values, valid, run.new_state)
        if not return_info:
            return y
        return y, self._info(theta, valid, R_steps)

    # ------------------------------------------------------------ integration
    def _integrate(self, theta: Tensor, omega: Tensor, run: _Pass, record_R: bool) -> tuple[Tensor, list]:
        """Phases ``(b, h, n, t)`` after ``steps`` steps, and R per head of each step's input phases
        ``θ⁰ … θ^{steps−1}`` (if ``record_R``; :meth:`_info` adds the final phases' R)."""
        R_steps = []
        if self._fast_path and self.integrator == "euler" and self.coupling == "mean_field" \
                and run.cache is None and not run.record and not run.plain and not torch.compiler.is_compiling():
            # fused Euler steps with a hand-written backward: same values, far fewer autograd ops.
            # Not under torch.compile, which fuses the generic path itself: torch 2.11's tracing of
            # this backward (in-place ops on aliased views) gave zero gradients.
            t = theta.shape[-1]
            weight = None if run.valid is None else run.valid[:, None, None, -t:].to(theta.dtype)
            noise = self.phase_noise.sigma if self.phase_noise.training else 0.0
            # R from the cos θ, sin θ each step computes anyway: no trigonometry of its own
            on_trig = (lambda cos_t, sin_t: R_steps.append(_order_of(cos_t, sin_t, run.valid)[0])) \
                if record_R else None
            theta = euler_mean_field(theta, omega, self.strength, weight, steps=self.steps, dt=self.dt,
                                     phase_lag=self.phase_lag, causal=self.causal, noise=noise,
                                     on_trig=on_trig)
            return theta, R_steps
        solver = SOLVERS[self.integrator]()
        # per-step checkpoints keep one phase tensor per step for backward, not every intermediate
        save_memory = autograd_records() and not run.record and not run.plain
        # what the checkpoints hold until backward: the mean field needs no queries, keys or values
        step_run = run if self.coupling == "attention" else replace(run, q=None, k=None, v=None)
        # read here and passed in, not read inside the checkpoints: under torch.compile, a float that
        # dynamo first meets inside one checkpoint and reuses in the next crashes it (torch 2.13,
        # pytorch/pytorch#193194) once a layer with other dt / phase_lag was compiled in the process
        dt, phase_lag = float(self.dt), float(self.phase_lag)
        contexts = {}
        if save_memory and not torch.compiler.is_compiling():  # dynamo takes no context_fn of its own
            # backward reruns each step with the tensors this forward read: torch.func.functional_call swaps
            # the module's parameters for the forward only, and the rerun read the module's own (wrong gradients)
            put_back = _TensorsPutBack(self, _tensors(self))
            contexts["context_fn"] = lambda: (contextlib.nullcontext(), put_back)
        for step in range(self.steps):
            if record_R:
                R_steps.append(_order(theta.detach(), run.valid)[0])
            if save_memory:
                theta = checkpoint(self._step, solver, theta, omega, step_run, step, dt, phase_lag,
                                   use_reentrant=False, **contexts)
            else:
                theta = self._step(solver, theta, omega, run, step, dt, phase_lag)
            theta = self.phase_noise(theta)
        return theta, R_steps

    def _step(self, solver, theta: Tensor, omega: Tensor, run: _Pass, step: int, dt: float,
              phase_lag: float) -> Tensor:
        stage = itertools.count()
        if self.coupling == "mean_field":
            coupling = self._mean_field
        elif self.coupling == "attention":
            coupling = self._attention_field
        else:  # a Coupling module
            coupling = self._module_field

        def field(phases: Tensor) -> Tensor:
            return omega + coupling(phases, run, (step, next(stage)), phase_lag)

        return solver.step(field, theta, dt)

    def _mean_field(self, theta: Tensor, run: _Pass, key: tuple, phase_lag: float) -> Tensor:
        """``(K/|S_i|) Σ_{j∈S_i} sin(θ_j − θ_i − α)`` ``(b, h, n, t)`` from running sums of ``e^{iθ}``."""
        t = theta.shape[-1]
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        weight = None if run.valid is None else run.valid[:, None, None, -t:].to(theta.dtype)  # (b, 1, 1, t)
        cos_w, sin_w = (cos_t, sin_t) if weight is None else (cos_t * weight, sin_t * weight)
        if self.causal:
            sum_cos, sum_sin = cos_w.cumsum(-1), sin_w.cumsum(-1)
            if weight is None:
                counts = torch.arange(1, t + 1, device=theta.device, dtype=theta.dtype)
            else:
                counts = weight.cumsum(-1)
            if run.cache is not None:  # add the past tokens' sums at this evaluation
                past_cos, past_sin, past_count = run.cache.field_state[key]
                sum_cos, sum_sin, counts = sum_cos + past_cos, sum_sin + past_sin, counts + past_count
            if run.record:
                last_count = counts.expand(theta.shape[0], 1, 1, t)[..., -1:]
                run.new_state[key] = (sum_cos[..., -1:], sum_sin[..., -1:], last_count)
        else:
            sum_cos, sum_sin = cos_w.sum(-1, keepdim=True), sin_w.sum(-1, keepdim=True)
            counts = theta.new_full((), t) if weight is None else weight.sum(-1, keepdim=True)
        # K / |S_i| is small ((h, 1, t) or (b, h, 1, t)): one multiply instead of dividing both sums
        gain = self.strength.to(theta.dtype) / counts.clamp_min(1.0)
        if weight is not None:
            gain = gain * weight  # padded tokens get zero coupling
        return _pull(sum_cos, sum_sin, cos_t, sin_t, phase_lag) * gain

    def _attention_field(self, theta: Tensor, run: _Pass, key: tuple, phase_lag: float) -> Tensor:
        """``K Σ_j A_ij(θ) sin(θ_j − θ_i − α)`` ``(b, h, n, t)``, as ``[cos θ, sin θ]`` columns of SDPA."""
        n, t = self.num_oscillators, theta.shape[-1]
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        out, _, _ = self._attend(run, theta, cos_sin=(cos_t, sin_t), key=key, dropout=0.0)
        # (b, h, t, e) -> the [cos, sin] columns as (b, h, 2n, t)
        pooled = out[..., -2 * n:].transpose(-1, -2).to(theta.dtype)
        pull = _pull(pooled[:, :, :n], pooled[:, :, n:], cos_t, sin_t, phase_lag)
        gain = self.strength.to(theta.dtype)
        if run.valid is not None:  # padded tokens get zero coupling, as in the mean field
            gain = gain * run.valid[:, None, None, -t:].to(theta.dtype)
        return pull * gain

    def _module_field(self, theta: Tensor, run: _Pass, key: tuple, phase_lag: float) -> Tensor:
        """``K · coupling(θ)`` ``(b, h, n, t)``, the module seeing the phases as ``(b, h, t, n)``
        (after the cached tokens' phases at this evaluation, if any: only the new rows are kept)."""
        t = theta.shape[-1]
        # contiguous, as they are after the cache's concatenation: a module may view() them either way
        phases = theta.transpose(-1, -2).contiguous()
        if run.cache is not None:
            phases = torch.cat([run.cache.field_state[key].to(phases.dtype), phases], dim=-2)  # (b, h, s, n)
        if run.record:  # every token's phases at this evaluation, for later tokens
            run.new_state[key] = phases
        coupling = self.coupling
        if (isinstance(coupling, GraphCoupling) and coupling.dim in (-2, 2)
                and coupling.weights.shape[-1] != phases.shape[-2]):
            raise ValueError(f"coupling: {type(coupling).__name__} along the tokens has weights for "
                             f"{coupling.weights.shape[-1]} tokens, but this pass has {phases.shape[-2]} (cached "
                             "tokens included); it couples sequences of exactly that length, so it cannot decode "
                             "with a cache or run other lengths")
        if run.valid is None:
            term = coupling(phases)
        else:
            valid = run.valid[:, None, :, None]  # (b, 1, s, 1): the past tokens' too
            # where, not a product: a padded row's term may be NaN (a masked mean over no valid token)
            term = torch.where(valid, coupling(phases, mask=valid), 0.0)  # padded tokens: none
        return term[..., -t:, :].transpose(-1, -2) * self.strength.to(theta.dtype)

    # -------------------------------------------------------------- attention
    def _attend(self, run: _Pass, theta: Tensor, *, cos_sin: tuple | None = None, key: tuple | None = None,
                dropout: float) -> tuple[Tensor, Tensor, Tensor]:
        """SDPA over ``[q, c cos θ, c sin θ] · [k, cos θ, sin θ]`` with values ``[v, cos θ, sin θ]``.

        ``theta`` holds the new tokens' phases ``(b, h, n, t)``; ``key`` names the solver evaluation
        (None: the final phases). Returns the output ``(b, h, t, e)`` and the keys and values
        ``(b, h, s, e)`` of every token seen.
        """
        d, dtype = self.head_dim, run.q.dtype
        phase_weight = self.beta.to(dtype).view(-1, 1) * (math.sqrt(d) / self.num_oscillators)  # (h, 1)
        if cos_sin is None and run.cache is None and theta.dtype == dtype and not run.plain:
            # the final phases without a cache: one buffer, no concatenations (same values)
            query, keys, values = (z.transpose(1, 2) for z in
                                   _PhaseFeatures.apply(run.q, run.k, run.v, theta, phase_weight))
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=run.mask, dropout_p=dropout,
                                                 is_causal=run.is_causal, scale=1.0 / math.sqrt(d))
            return out, keys, values
        cos_t, sin_t = cos_sin if cos_sin is not None else (torch.cos(theta), torch.sin(theta))
        # (b, h, 2n, t) -> (b, t, h, 2n): concatenated with (b, t, h, d) views into (b, t, h, e) memory
        feats = torch.cat([cos_t, sin_t], dim=2)
        if not run.plain:
            feats = _ContiguousGrad.apply(feats)
        feats = feats.permute(0, 3, 1, 2).to(dtype).contiguous()
        query = torch.cat([run.q, feats * phase_weight], dim=-1).transpose(1, 2)  # (b, h, t, e)
        keys = torch.cat([run.k, feats], dim=-1).transpose(1, 2)
        values = torch.cat([run.v, feats], dim=-1).transpose(1, 2)
        if key is not None and run.record:  # this evaluation's features, for later tokens
            past_feats = run.cache.field_state[key] if run.cache is not None else None
            new_feats = feats.transpose(1, 2)  # (b, h, t, 2n)
            run.new_state[key] = new_feats if past_feats is None else torch.cat([past_feats, new_feats], dim=2)
        if run.cache is not None:
            if key is None:  # final phases: the past tokens' cached keys and values
                past_keys, past_values = run.cache.keys, run.cache.values
            else:  # an intermediate evaluation: the past tokens' features at that evaluation
                past_feats = run.cache.field_state[key].to(dtype)
                past_keys = torch.cat([run.cache.keys[..., :d], past_feats], dim=-1)
                past_values = torch.cat([run.cache.values[..., :d], past_feats], dim=-1)
            keys, values = torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2)
        with sdpa_kernel(_FIELD_BACKENDS) if cos_sin is not None and query.is_cuda else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=run.mask, dropout_p=dropout,
                                                 is_causal=run.is_causal, scale=1.0 / math.sqrt(d))
        return out, keys, values

    def _attention_mask(self, t: int, past: int, valid: Tensor | None,
                        device: torch.device) -> tuple[Tensor | None, bool]:
        """``(mask, is_causal)`` for SDPA; a dense mask only where ``is_causal`` cannot express it."""
        if valid is None:
            if not self.causal or t == 1:
                return None, False
            if past == 0:
                return None, True  # the fused kernels' fast path
        s = past + t
        rows = torch.arange(past, s, device=device).view(t, 1)  # query positions
        cols = torch.arange(s, device=device).view(1, s)
        allowed = (cols <= rows) if self.causal else torch.ones(t, s, dtype=torch.bool, device=device)
        if valid is not None:
            allowed = allowed & valid[:, None, None, :]  # (b, 1, t, s)
        # every query may see itself, so a padded query's row is never empty (no NaN)
        return allowed | (cols == rows), False

    # ------------------------------------------------------------ diagnostics
    def _info(self, theta: Tensor, valid: Tensor | None, R_steps: list) -> KuramotoInfo:
        """``R_steps``: R of each step's input phases; the final phases' R completes it."""
        R, R_tok = _order(theta, valid)
        loss = None
        if self.coherence is not None:  # masked_select only when needed: on a GPU it waits for the device
            if valid is not None and in_func_transform():
                # vmap has no rule for masked_select over a batched mask (per-sample gradients with padding):
                # each token's own penalty, averaged over the valid ones (0 for none, as penalty gives)
                weight = valid[:, None, -theta.shape[-1]:].expand_as(R_tok).to(R_tok.dtype)
                per_token = torch.vmap(self.coherence.penalty)(R_tok.reshape(-1, 1)).view_as(R_tok)
                loss = (per_token * weight).sum() / weight.sum().clamp_min(1.0)
            else:
                kept = R_tok if valid is None else R_tok.masked_select(valid[:, None, -theta.shape[-1]:])
                loss = self.coherence.penalty(kept)
        return KuramotoInfo(phases=theta.transpose(-1, -2), R=R, R_steps=torch.stack(R_steps + [R.detach()]),
                            coherence_loss=loss)

    # ----------------------------------------------------------------- checks
    def _check_input(self, x: Tensor) -> tuple[int, int]:
        check_tensor("x", x)
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"x: expected shape (batch, tokens >= 1, {self.d_model}) but got {tuple(x.shape)}")
        # omega, not a projection's weight: a projection may be replaced by a module without one (a wrapper)
        check_input_like("x", x, self.omega)
        return x.shape[0], x.shape[1]

    @staticmethod
    def _check_mask(mask: Tensor | None, b: int, t: int, device: torch.device) -> Tensor | None:
        if mask is None:
            return None
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or mask.shape != (b, t) or mask.device != device:
            got = (f"{mask.dtype} {tuple(mask.shape)} on {mask.device}" if torch.is_tensor(mask)
                   else type(mask).__name__)
            raise ValueError(f"key_padding_mask: expected a boolean tensor of shape ({b}, {t}) on {device} "
                             f"(True = valid) but got {got}")
        return mask

    def _check_cache(self, cache: KuramotoCache | None, b: int, device: torch.device) -> int:
        if cache is None:
            return 0
        if not isinstance(cache, KuramotoCache):
            raise ValueError(f"cache: expected a KuramotoCache but got {type(cache).__name__}")
        if not self.causal:
            raise ValueError("cache: incremental decoding needs a causal layer (causal=True)")
        if cache.keys is None:
            return 0
        if cache.keys.device != device:
            raise ValueError(f"cache: holds tensors on {cache.keys.device} but the input is on {device}")
        e = self.head_dim + 2 * self.num_oscillators
        if cache.keys.shape[0] != b or cache.keys.shape[1] != self.num_heads or cache.keys.shape[-1] != e:
            raise ValueError(f"cache: holds keys of shape {tuple(cache.keys.shape)}, which does not fit "
                             f"batch {b}, {self.num_heads} heads and width {e} (a cache of another layer?)")
        # one state per (step, stage): another integrator or step count has other keys
        keys = {(step, stage) for step in range(self.steps) for stage in range(self._stages)}
        # the mean field keeps sums (a tuple); attention [cos θ, sin θ] (2n wide); a module θ (n wide)
        mean_field = self.coupling == "mean_field"
        width = 2 * self.num_oscillators if self.coupling == "attention" else self.num_oscillators
        if set(cache.field_state) != keys or any(
                isinstance(state, tuple) != mean_field or (not mean_field and state.shape[-1] != width)
                for state in cache.field_state.values()):
            raise ValueError(f"cache: holds no phase state for this layer's {self._coupling_name} coupling "
                             f"with {self.integrator!r} over {self.steps} steps (a cache of another layer?)")
        return cache.length

    @staticmethod
    def _cached_valid(cache: KuramotoCache, b: int) -> Tensor:
        if cache.valid is not None:
            return cache.valid
        return torch.ones(b, cache.length, dtype=torch.bool, device=cache.keys.device)

    def _update_cache(self, cache: KuramotoCache, keys: Tensor, values: Tensor, valid: Tensor | None,
                      state: dict) -> None:
        cache.keys, cache.values = keys.detach(), values.detach()
        cache._claim(self)  # one cache shared by two layers would mix their tokens
        # a copy: on the first call valid is the caller's key_padding_mask, which the caller may reuse or edit
        cache.valid = None if valid is None else valid.detach().clone()
        cache.field_state = {key: _detach(value) for key, value in state.items()}

    @property
    def _coupling_name(self) -> str:
        """The built-in coupling's name quoted, or the coupling module's class (for messages)."""
        return repr(self.coupling) if isinstance(self.coupling, str) else type(self.coupling).__name__

    def extra_repr(self) -> str:
        # the constructor's arguments, but those shown as submodules (noise, jitter, regularizer; a coupling
        # module, with its own lag: the layer's is not read then); K as initialised (training changes the tensor)
        lag = "" if isinstance(self.coupling, Coupling) else f", phase_lag={self.phase_lag}"
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_oscillators={self.num_oscillators}, "
                f"coupling_strength={self._initial_strength}, steps={self.steps}, dt={self.dt}, "
                f"integrator={self.integrator!r}, coupling={self._coupling_name}{lag}, "
                f"learnable_coupling={isinstance(self.strength, nn.Parameter)}, dropout={self.dropout}, "
                f"causal={self.causal}, bias={self._bias}")


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    Gradients coming back from the (b, t, h, e) attention layout would otherwise reach every
    integration step in a permuted layout, where CPU elementwise kernels run several times slower.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _PhaseFeatures(torch.autograd.Function):
    """``[q, c cos θ, c sin θ]``, ``[k, cos θ, sin θ]``, ``[v, cos θ, sin θ]`` ``(b, t, h, e)`` each, written
    into one ``(3, b, t, h, e)`` buffer: the concatenations of :meth:`KuramotoAttention._attend` without
    their temporaries. Inputs: ``q, k, v`` ``(b, t, h, d)``, phases ``(b, h, n, t)``, ``c`` ``(h, 1)``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, theta: Tensor, phase_weight: Tensor):
        b, t, h, d = q.shape
        n = theta.shape[2]
        buf = q.new_empty((3, b, t, h, d + 2 * n))
        for i, z in enumerate((q, k, v)):
            buf[i, ..., :d].copy_(z)
        feats = buf[1, ..., d:]  # (b, t, h, 2n)
        # trigonometry on contiguous memory, then copied into the strided slots (faster than writing
        # the strided slots directly)
        phases = theta.permute(0, 3, 1, 2).contiguous()  # (b, t, h, n)
        feats[..., :n].copy_(torch.cos(phases))
        feats[..., n:].copy_(torch.sin(phases))
        buf[2, ..., d:].copy_(feats)
        if torch.compiler.is_compiling():  # dynamo before torch 2.6 refuses out= on inputs that require grad
            buf[0, ..., d:].copy_(feats * phase_weight)
        else:
            torch.mul(feats, phase_weight, out=buf[0, ..., d:])
        if not in_inference_mode():  # (no backward there, even with grad enabled: saving would fail)
            ctx.save_for_backward(buf[1], phase_weight)  # the keys, which SDPA keeps anyway
        ctx.dims = (d, n)
        return buf[0], buf[1], buf[2]

    @staticmethod
    @first_order
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        keys, phase_weight = ctx.saved_tensors
        d, n = ctx.dims
        feats = keys[..., d:]
        grads = [g if g is not None else torch.zeros_like(keys) for g in (grad_q, grad_k, grad_v)]
        grad_feats = grads[1][..., d:] + grads[2][..., d:]
        grad_feats.addcmul_(grads[0][..., d:], phase_weight)
        grad_weight = None
        if ctx.needs_input_grad[4]:
            grad_weight = (grads[0][..., d:] * feats).sum((0, 1, 3)).view_as(phase_weight)
        grad_theta = None
        if ctx.needs_input_grad[3]:
            b, t, h, _ = keys.shape
            grad_theta = keys.new_empty((b, h, n, t))  # contiguous in the integration's layout
            view = grad_theta.permute(0, 3, 1, 2)
            torch.mul(feats[..., :n], grad_feats[..., n:], out=view)  # cos θ · ∂/∂ sin θ
            view.addcmul_(feats[..., n:], grad_feats[..., :n], value=-1.0)  # − sin θ · ∂/∂ cos θ
        return grads[0][..., :d], grads[1][..., :d], grads[2][..., :d], grad_theta, grad_weight


def _check_graph_causal(coupling, causal: bool) -> None:
    """A :class:`GraphCoupling` along the tokens of a causal layer must have fixed lower-triangular weights:
    ``A[i, j] != 0`` for ``j > i`` couples token ``i`` to a later one (and a learnable ``A`` may learn that).
    Checked at construction and again by every forward (weights may be loaded or edited in place since)."""
    if not (isinstance(coupling, GraphCoupling) and causal and coupling.dim in (-2, 2)):
        return
    weights = coupling.weights
    if isinstance(weights, nn.Parameter) or (weights.device.type != "meta" and torch.triu(weights, 1).any()):
        raise ValueError(f"coupling: {type(coupling).__name__} along the tokens (dim={coupling.dim}) in a causal "
                         "layer needs fixed lower-triangular weights (A[i, j] = 0 for j > i); these would let tokens "
                         "see later ones")


def _takes_mask(coupling: Coupling) -> bool:
    parameters = inspect.signature(coupling.interaction).parameters.values()
    return any(p.name == "mask" or p.kind == p.VAR_KEYWORD for p in parameters)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers ``module`` holds now, by name (those of ``functional_call`` while it runs)."""
    return dict(itertools.chain(module.named_parameters(remove_duplicate=False),
                                module.named_buffers(remove_duplicate=False)))


class _TensorsPutBack:
    """A context in which ``module`` holds ``tensors`` (from :func:`_tensors`) again; those it holds now after it.
    Only tensors that differ are swapped: none, unless ``functional_call`` swapped them for the forward. It may be
    entered again (each backward through a retained graph recomputes the checkpoints in it)."""

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]):
        self.module, self.tensors, self.swapped = module, tensors, []

    def __enter__(self) -> None:
        for name, tensor in self.tensors.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = self.module.get_submodule(owner_name)
            slots = owner._parameters if attribute in owner._parameters else owner._buffers
            if slots.get(attribute) is not tensor:
                self.swapped.append((slots, attribute, slots.get(attribute)))
                slots[attribute] = tensor

    def __exit__(self, *exc) -> None:
        while self.swapped:
            slots, attribute, tensor = self.swapped.pop()
            slots[attribute] = tensor


def _order(theta: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """From phases ``(b, h, n, t)``: R per head ``(b, h)`` (mean over valid tokens) and per token
    ``(b, h, t)``, each over the oscillators of one head (:func:`~kuramoto_attn.order_parameter`
    along ``n``, without the angle)."""
    return _order_of(torch.cos(theta), torch.sin(theta), valid)


def _order_of(cos_t: Tensor, sin_t: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`_order` from ``cos θ`` and ``sin θ`` ``(b, h, n, t)``."""
    R_tok = _resultant_length(cos_t.mean(-2), sin_t.mean(-2))  # per head and token: never averaged across heads
    if valid is None:
        return R_tok.mean(-1), R_tok
    weight = valid[:, None, -R_tok.shape[-1]:].to(R_tok.dtype)  # (b, 1, t)
    return (R_tok * weight).sum(-1) / weight.sum(-1).clamp_min(1.0), R_tok


def _detach(value):
    return tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()


class PhaseGPTAttention(KuramotoAttention):
    r"""The reference PhaseGPT layer's settings, made causal and O(t·n): a preset of
    :class:`KuramotoAttention` for comparison studies.

    Fixed as in the reference: phases ``π·tanh(W x)``, forward Euler with ``dt = 0.1`` for 10 steps,
    mean-field coupling with no phase lag and a fixed (not learned) strength ``K = 1``, 32
    oscillators, output from phase features. What differs from the reference, and why:

    * causal by default: the reference's mean over tokens included future tokens (leakage);
      ``causal=False`` reproduces that, for comparison only;
    * attractive sign: the reference's coupling was repulsive while it claimed synchronisation; pass
      a negative ``coupling_strength`` to reproduce it;
    * the masked mean divides by the number of valid tokens (the reference divided by ``t``);
    * phases reach the output as ``[cos θ, sin θ]`` features, not raw wrapped angles;
    * O(t·n) memory: no ``(b, h, t, t, n)`` tensor of phase differences.

    Args:
        d_model, num_heads: as for :class:`KuramotoAttention`.
        **overrides: any other :class:`KuramotoAttention` argument (e.g. ``causal=False``,
            ``coupling_strength=-1.0``, ``num_oscillators=16``).

    Example:
        >>> layer = PhaseGPTAttention(d_model=64, num_heads=4)
        >>> layer.integrator, layer.steps, layer.dt, layer.coupling, layer.causal
        ('euler', 10, 0.1, 'mean_field', True)
    """

    PRESET = dict(num_oscillators=32, coupling_strength=1.0, steps=10, dt=0.1, integrator="euler",
                  coupling="mean_field", phase_lag=0.0, learnable_coupling=False)

    def __init__(self, d_model: int, num_heads: int, **overrides) -> None:
        super().__init__(d_model, num_heads, **{**self.PRESET, **overrides})
