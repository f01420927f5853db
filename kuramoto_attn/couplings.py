r"""Coupling schemes: the interaction term of the Kuramoto vector field.

Every coupling is an ``nn.Module`` whose ``forward(theta, ...)`` returns a tensor of θ's shape and dtype,

.. math::

    c(\theta)_i = K \cdot \mathrm{interaction}(\theta)_i,

with the strength ``K`` a scalar, a tensor that broadcasts to θ (e.g. per head), or a learnable
parameter. Sign and normalisation follow :mod:`kuramoto_attn.dynamics`: ``sin(θ_j − θ_i − α)``,
attractive for ``K > 0``, mean-field normalised by the number of elements counted.

To add a scheme, subclass :class:`Coupling` and implement :meth:`Coupling.interaction`
(see the example in its docstring). Einstein legend: ``*`` leading dims, ``n`` coupled elements
(oscillators, or tokens for couplings along the sequence), ``c`` trailing channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._checks import (as_finite_tensor, as_tensor, autocast_off, broadcasts_to, check_axis, check_bool,
                      check_broadcasts, check_device, check_int, check_mask, check_real, check_tensor, largest_value)

__all__ = ["AttentionCoupling", "Coupling", "GraphCoupling", "MeanFieldCoupling", "weighted_sine_coupling"]


class Coupling(nn.Module):
    r"""Base class of coupling schemes: ``forward(θ, ...) = strength · interaction(θ, ...)``.

    Subclasses implement one method, :meth:`interaction`, which returns the un-scaled coupling
    term of θ's shape and may use ``self.phase_lag`` (a float, radians).

    Args:
        strength: coupling strength ``K``: a finite number, or a tensor (or list, or array) that broadcasts
            to the phases' shape (e.g. ``(h, 1, 1)`` for per-head strengths on phases ``(b, h, t, n)``).
            A number, list or array is kept in float64 as a buffer; forward casts ``K`` to the phases' dtype.
        phase_lag: the Sakaguchi lag ``α`` in radians (finite).
        learnable: make ``strength`` an ``nn.Parameter`` (otherwise a buffer): of the default
            dtype for a number, list or array, of the tensor's dtype for a floating tensor. An
            ``nn.Parameter`` passed as ``strength`` is used as it is (e.g. shared between layers);
            any other tensor is copied into the buffer, detached (no gradient reaches it: pass
            a ``Parameter``, or compute ``K`` in your ``forward`` and scale ``interaction``).

    Example:
        >>> import torch
        >>> class RingCoupling(Coupling):
        ...     '''Nearest neighbours on a ring: sin(θ_{i-1} − θ_i − α) + sin(θ_{i+1} − θ_i − α).'''
        ...     def interaction(self, theta):
        ...         left, right = theta.roll(1, -1), theta.roll(-1, -1)
        ...         return (torch.sin(left - theta - self.phase_lag)
        ...                 + torch.sin(right - theta - self.phase_lag))
        >>> RingCoupling(strength=0.5)(torch.zeros(4)).tolist()
        [0.0, 0.0, 0.0, 0.0]
    """

    def __init__(self, strength: float | Tensor = 1.0, phase_lag: float = 0.0,
                 learnable: bool = False) -> None:
        super().__init__()
        strength_tensor = as_finite_tensor("strength", strength)
        learnable = check_bool("learnable", learnable)
        if isinstance(strength, nn.Parameter):  # the caller's parameter, shared or trained as given
            self.strength = strength
        elif learnable:  # a number (or integer tensor) in the default dtype, as nn modules make their weights;
            # a floating tensor keeps its dtype, as nn.Parameter(tensor) does (float64 is not rounded)
            floating = torch.is_tensor(strength) and strength.is_floating_point()
            self.strength = nn.Parameter(strength_tensor if floating else strength_tensor.to(torch.get_default_dtype()))
        else:
            # a Python number or list stays float64 (a tensor keeps its dtype); forward casts to the phases' dtype
            self.register_buffer("strength", strength_tensor)
        # what reset_parameters restores: a copy (the buffer or parameter may share strength_tensor's memory), a
        # number or list in float64 on the CPU even under torch.device("meta"); a plain attribute, not in the state dict
        self._initial_strength = (strength_tensor.clone() if torch.is_tensor(strength)
                                  else as_tensor(strength, dtype=torch.float64, device="cpu").clone())  # a copy
        self.phase_lag = check_real("phase_lag", phase_lag)

    def reset_parameters(self) -> None:
        """Set ``strength`` to the value it was built with, in its own dtype and on its device (also an
        ``nn.Parameter`` you gave). For a coupling built on the meta device and then given storage with
        ``to_empty`` (FSDP and Fabric's ``init_module(empty_init=True)`` call it then).

        Raises:
            RuntimeError: the coupling was built from a strength tensor on the meta device, which holds
                no value to restore.
        """
        if self._initial_strength.is_meta:
            raise RuntimeError(f"strength: {type(self).__name__} was built from a tensor on the meta device, so "
                               "there is no value to reset it to; build it from a number, or load its state_dict")
        with torch.no_grad():
            self.strength.copy_(self._initial_strength)

    def interaction(self, theta: Tensor, *args, **kwargs) -> Tensor:
        """The un-scaled coupling term, shape of ``theta``. Subclasses implement this.

        Args:
            theta: phases ``(*)``, unwrapped.
            *args: whatever the scheme needs at call time (e.g. a mask or weights), passed on
                from :meth:`forward`.
            **kwargs: likewise.

        Returns:
            Tensor of ``theta``'s shape (not yet multiplied by the strength).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement interaction(theta, ...)")

    def forward(self, theta: Tensor, *args, **kwargs) -> Tensor:
        """``strength · interaction(theta, *args, **kwargs)``.

        Args:
            theta: phases ``(*)``; the strength must broadcast to this shape.
            *args: passed to :meth:`interaction`.
            **kwargs: passed to :meth:`interaction`.

        Returns:
            The coupling term, shape and dtype of ``theta``.
        """
        check_tensor("theta", theta)
        for tensor in (*self.parameters(recurse=False), *self.buffers(recurse=False)):
            check_device("theta", theta, tensor, owner="the coupling")
        check_broadcasts("strength", self.strength.shape, theta.shape)
        term = self.interaction(theta, *args, **kwargs)
        # a wrong shape that broadcasts (e.g. a mean kept as (*, 1)) would pass silently in ω + term
        if not torch.is_tensor(term) or term.shape != theta.shape:
            got = tuple(term.shape) if torch.is_tensor(term) else type(term).__name__
            raise ValueError(f"interaction: {type(self).__name__}.interaction returned {got}, expected "
                             f"theta's shape {tuple(theta.shape)}")
        # in θ's dtype: a term promoted by the scheme (a float64 tensor of its own, a matmul under autocast)
        # would otherwise change the phases' dtype in ω + term, and every step after
        return (self.strength.to(theta.dtype) * term).to(theta.dtype)

    def extra_repr(self) -> str:
        if self.strength.device.type == "meta":  # deferred initialisation: no value to print yet
            strength = f"<meta {tuple(self.strength.shape)}>"
        else:
            strength = self.strength.item() if self.strength.numel() == 1 else tuple(self.strength.shape)
        return f"strength={strength}, phase_lag={self.phase_lag:.4g}"


class MeanFieldCoupling(Coupling):
    r"""All-to-all coupling along ``dim`` through the (Daido) order parameter, in O(n).

    .. math::

        c_i = \frac{K}{N_i} \sum_{m \in \text{harmonics}} \sum_{j \in S_i} \sin(m(\theta_j - \theta_i) - \alpha)
            = K \sum_m R_{m,i} \sin(\psi_{m,i} - m\theta_i - \alpha),

    where :math:`R_{m,i} e^{i\psi_{m,i}} = \frac{1}{N_i}\sum_{j\in S_i} e^{im\theta_j}`. ``S_i`` is
    every (valid) element along ``dim``, or with ``causal=True`` the (valid) elements at indices
    ``<= i`` (a cumulative mean field); ``N_i = |S_i|``. Padded elements (``mask`` False) are not
    counted and receive zero coupling. No pairwise tensor is built.

    Args:
        strength: ``K`` (see :class:`Coupling`).
        phase_lag: ``α`` in radians.
        harmonics: positive integer harmonics ``m``, each with unit weight (``(1,)``: Kuramoto); ``m·θ`` is
            computed in float32 at least (half-precision phases too), so ``m`` is at most the default dtype's
            largest value.
        dim: the axis of coupled elements (``-1`` for oscillators, ``-2`` for tokens in
            ``(b, h, t, n)``).
        causal: couple element ``i`` only to elements ``j <= i`` along ``dim``.
        learnable: learnable strength.

    Shapes:
        * ``theta``: ``(*)``, any shape with the coupled axis at ``dim``
        * ``mask`` (optional, bool, True = valid): broadcasts to ``theta``'s shape
        * output: same as ``theta``

    Example:
        >>> import torch
        >>> coupling = MeanFieldCoupling(strength=1.0, causal=True)
        >>> coupling(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)).round(decimals=4).tolist()
        [0.0, -0.4207, -0.2805]
    """

    def __init__(self, strength: float | Tensor = 1.0, phase_lag: float = 0.0,
                 harmonics: Sequence[int] = (1,), dim: int = -1, causal: bool = False,
                 learnable: bool = False) -> None:
        super().__init__(strength, phase_lag, learnable)
        if not isinstance(harmonics, Sequence) or isinstance(harmonics, str) or len(harmonics) == 0:
            raise ValueError(f"harmonics: expected a non-empty sequence of integers but got {harmonics!r}")
        self.harmonics = tuple(check_int("harmonics", m, low=1, size=False) for m in harmonics)
        largest = largest_value()  # m·θ is computed in float32 at least: beyond its range, inf (NaN terms)
        if max(self.harmonics) > largest:
            raise ValueError(f"harmonics: expected integers at most {largest:.6g} (the largest value of the default "
                             f"dtype) but got {max(self.harmonics)}")
        self.dim = check_axis("dim", dim)
        self.causal = check_bool("causal", causal)

    def interaction(self, theta: Tensor, mask: Tensor | None = None) -> Tensor:
        """The mean-field term ``Σ_m R_m sin(ψ_m − mθ − α)`` (before the strength).

        Args:
            theta: phases ``(*)`` with the coupled axis at ``dim``.
            mask: optional bool (True = valid) broadcasting to ``theta``'s shape.

        Returns:
            Tensor of ``theta``'s shape; zero at padded elements.
        """
        dim = check_axis("dim", self.dim, ndim=theta.dim())
        weight = None
        if mask is not None:
            mask = check_mask("mask", mask, theta)
            weight = mask.to(theta.dtype)
            theta = torch.where(mask, theta, 0.0)  # whatever padding holds (even NaN) never reaches the sums
        count = _count(theta, weight, dim, self.causal)
        out = None
        wide = torch.promote_types(theta.dtype, torch.float32)
        for m in self.harmonics:
            # m·θ in at least float32, as daido_order_parameter: in half precision it rounds (bfloat16 θ ≈ 100,
            # m = 3: to a step of 2 rad) or overflows to inf; float(m), as an int past 2**64 is an OverflowError
            mtheta = theta if m == 1 else float(m) * theta.to(wide)
            cos_t, sin_t = torch.cos(mtheta).to(theta.dtype), torch.sin(mtheta).to(theta.dtype)
            # means (in [-1, 1]) back in theta's dtype; their sums are float32 at least (see _sum)
            mean_cos = (_sum(cos_t if weight is None else cos_t * weight, dim, self.causal) / count).to(theta.dtype)
            mean_sin = (_sum(sin_t if weight is None else sin_t * weight, dim, self.causal) / count).to(theta.dtype)
            term = _pull(mean_cos, mean_sin, cos_t, sin_t, self.phase_lag)
            out = term if out is None else out + term
        return out if weight is None else out * weight

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, harmonics={self.harmonics}, dim={self.dim}, "
                f"causal={self.causal}")


def _pull(z_cos: Tensor, z_sin: Tensor, cos_t: Tensor, sin_t: Tensor, phase_lag: float) -> Tensor:
    """``Im(Z e^{−iα} e^{−iθ}) = Im Z' cos θ − Re Z' sin θ`` with ``Z' = Z e^{−iα}``.

    The lag rotates ``Z`` (often reduced, hence small) rather than every phase."""
    if phase_lag != 0.0:
        cos_lag, sin_lag = math.cos(phase_lag), math.sin(phase_lag)
        z_cos, z_sin = z_cos * cos_lag + z_sin * sin_lag, z_sin * cos_lag - z_cos * sin_lag
    return z_sin * cos_t - z_cos * sin_t


def _sum(x: Tensor, dim: int, causal: bool) -> Tensor:
    """(Cumulative) sum along ``dim``, in float32 at least: float16 overflows past 65504 elements."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return x.cumsum(dim, dtype=dtype) if causal else x.sum(dim, keepdim=True, dtype=dtype)


def _count(theta: Tensor, weight: Tensor | None, dim: int, causal: bool) -> Tensor | float:
    """How many (valid) elements each mean counts, in float32 at least; at least 1 so empty
    prefixes give zero."""
    if weight is None:
        if not causal:
            return float(theta.shape[dim])
        shape = [1] * theta.dim()
        shape[dim] = theta.shape[dim]
        dtype = torch.promote_types(theta.dtype, torch.float32)
        return torch.arange(1, theta.shape[dim] + 1, device=theta.device, dtype=dtype).view(shape)
    return _sum(weight.expand_as(theta), dim, causal).clamp_min(1.0)


def weighted_sine_coupling(theta: Tensor, weights: Tensor, phase_lag: float = 0.0,
                           dim: int = -1) -> Tensor:
    r"""``Σ_j A_ij sin(θ_j − θ_i − α)`` along ``dim`` as ``Im(e^{−i(θ_i+α)} (A e^{iθ})_i)``.

    Two matrix products with ``[cos θ, sin θ]``; no pairwise tensor is built.

    Args:
        theta: phases ``(*, n, *c)`` with the coupled axis (length ``n``) at ``dim``.
        weights: ``A``, shape ``(n, n)`` or batched ``(*, n, n)`` broadcasting against the
            dimensions of ``theta`` before ``dim``; ``A[..., i, j]`` weights ``j``'s pull on ``i``.
        phase_lag: ``α`` in radians, a number (a learnable or per-head lag needs its own
            sine term, as in :class:`Coupling`'s example).
        dim: the coupled axis; all axes after it are channels coupled independently.

    Returns:
        Tensor of ``theta``'s shape.

    Example:
        >>> import torch
        >>> theta = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
        >>> chain = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
        >>> weighted_sine_coupling(theta, chain).round(decimals=4).tolist()   # sin(1), sin(-1) + sin(1), sin(-1)
        [0.8415, 0.0, -0.8415]
    """
    check_tensor("theta", theta)
    check_tensor("weights", weights)
    check_device("weights", weights, theta, owner="theta")
    phase_lag = check_real("phase_lag", phase_lag)  # a tensor would be detached by math.cos
    dim = check_axis("dim", dim, ndim=theta.dim())
    n = theta.shape[dim]
    if weights.dim() < 2 or weights.shape[-2:] != (n, n):
        raise ValueError(f"weights: expected shape (..., {n}, {n}) for {n} coupled elements "
                         f"but got {tuple(weights.shape)}")
    lead = theta.shape[:dim]
    if not broadcasts_to(weights.shape[:-2], lead):
        raise ValueError(f"weights: expected batch dimensions that broadcast to {tuple(lead)} "
                         f"but got {tuple(weights.shape[:-2])}")
    # (*, n, *c) -> (*, n, c): trailing channels become matmul columns
    flat = theta.reshape(*lead, n, math.prod(theta.shape[dim + 1:]))
    # the products in float32 at least and outside autocast (as _sum's): in float16 their sums overflowed
    # past 65504 (inf, then NaN phases) where the float32 result is finite
    acc = torch.promote_types(theta.dtype, torch.float32)
    cos_t, sin_t = torch.cos(flat).to(acc), torch.sin(flat).to(acc)
    weights = weights.to(acc)
    with autocast_off(theta):
        pull_cos, pull_sin = weights @ cos_t, weights @ sin_t  # Re and Im of (A e^{iθ})
    return _pull(pull_cos, pull_sin, cos_t, sin_t, phase_lag).to(theta.dtype).reshape(theta.shape)


class GraphCoupling(Coupling):
    r"""Coupling over a weighted graph (fixed, or a learnable ``nn.Parameter``) along ``dim``:

    .. math::

        c_i = K \sum_j A_{ij} \sin(\theta_j - \theta_i - \alpha)
            = K\, \mathrm{Im}\!\left(e^{-i(\theta_i + \alpha)} (A e^{i\theta})_i\right).

    No normalisation is applied: ``A = ones(n, n) / n`` reproduces :class:`MeanFieldCoupling`.

    Args:
        weights: adjacency ``A``, shape ``(n, n)`` (or batched, see :func:`weighted_sine_coupling`);
            copied into a buffer, detached, unless it is an ``nn.Parameter``, which is used as it is
            (a learnable graph).
        strength: ``K`` (see :class:`Coupling`).
        phase_lag: ``α`` in radians.
        dim: the coupled axis (default: the last).
        learnable: learnable strength.

    Shapes:
        * ``theta``: ``(*, n, *c)`` with ``n`` at ``dim``; output: same.

    Example:
        >>> import torch
        >>> ring = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
        >>> GraphCoupling(ring)(torch.tensor([0.0, 0.0, 0.0])).tolist()
        [0.0, 0.0, 0.0]
    """

    def __init__(self, weights: Tensor, strength: float | Tensor = 1.0, phase_lag: float = 0.0,
                 dim: int = -1, learnable: bool = False) -> None:
        super().__init__(strength, phase_lag, learnable)
        tensor = as_finite_tensor("weights", weights, booleans=True)  # an adjacency of booleans: 0 and 1
        if tensor.dim() < 2 or tensor.shape[-1] != tensor.shape[-2]:
            raise ValueError(f"weights: expected a square matrix (..., n, n) but got {tuple(tensor.shape)}")
        if isinstance(weights, nn.Parameter):  # the caller's parameter: trained as given
            self.weights = weights
        else:
            self.register_buffer("weights", tensor)
        self.dim = check_axis("dim", dim)

    def reset_parameters(self) -> None:
        """Not possible: the weights are the graph you gave, which the coupling does not keep a second copy
        of. A GraphCoupling built on the meta device gets its values from a ``load_state_dict`` instead.

        Raises:
            RuntimeError: always (rather than leave the weights as ``to_empty`` left them).
        """
        raise RuntimeError("weights: GraphCoupling cannot reset its weights, the graph you gave it; build it off the "
                           "meta device, or load its state_dict after to_empty")

    def interaction(self, theta: Tensor) -> Tensor:
        """``Σ_j A_ij sin(θ_j − θ_i − α)``: ``theta`` ``(*, n, *c)`` -> the same shape."""
        return weighted_sine_coupling(theta, self.weights, self.phase_lag, self.dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weights={tuple(self.weights.shape)}, dim={self.dim}"


class AttentionCoupling(Coupling):
    r"""Coupling with weights given at call time (e.g. softmax attention weights) along ``dim``:

    .. math::

        c_i = K \sum_j A_{ij} \sin(\theta_j - \theta_i - \alpha).

    A causal (lower-triangular) ``A`` gives a causal coupling.

    Args:
        strength: ``K`` (see :class:`Coupling`).
        phase_lag: ``α`` in radians.
        dim: the coupled axis (default ``-2``: tokens in ``(b, h, t, n)``).
        learnable: learnable strength.

    Shapes:
        * ``theta``: ``(*, t, *c)`` with ``t`` at ``dim``, e.g. ``(b, h, t, n)``
        * ``weights``: ``(*, t, t)`` broadcasting against θ's dims before ``dim``, e.g. ``(b, h, t, t)``
        * output: same as ``theta``

    Example:
        >>> import torch
        >>> theta = torch.tensor([[0.0], [1.0]], dtype=torch.float64)   # (t=2, n=1)
        >>> weights = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
        >>> AttentionCoupling()(theta, weights).round(decimals=4).tolist()
        [[0.0], [-0.4207]]
    """

    def __init__(self, strength: float | Tensor = 1.0, phase_lag: float = 0.0, dim: int = -2,
                 learnable: bool = False) -> None:
        super().__init__(strength, phase_lag, learnable)
        self.dim = check_axis("dim", dim)

    def interaction(self, theta: Tensor, weights: Tensor) -> Tensor:
        """``Σ_j A_ij sin(θ_j − θ_i − α)``.

        Args:
            theta: phases ``(*, t, *c)``, e.g. ``(b, h, t, n)``.
            weights: ``A`` ``(*, t, t)``, e.g. ``(b, h, t, t)``.

        Returns:
            Tensor of ``theta``'s shape.
        """
        check_tensor("weights", weights)
        return weighted_sine_coupling(theta, weights, self.phase_lag, self.dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dim={self.dim}"
