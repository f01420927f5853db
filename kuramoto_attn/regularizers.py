r"""Anti-synchronisation controls: keep oscillator populations away from full lock-step.

* :class:`PhaseNoise` — Gaussian noise on phases, ``θ + σ·ξ`` (training mode only).
* :class:`FrequencyJitter` — multiplicative jitter of natural frequencies, ``ω·(1 + ε)``,
  ``ε ~ N(0, relative²)`` (training mode only).
* :class:`CoherenceRegularizer` — a loss on the order parameter R, returned to the caller (never
  added to anything silently).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_axis, check_choice, check_real, check_tensor, largest_value
from .order_params import order_parameter

__all__ = ["CoherenceRegularizer", "FrequencyJitter", "PhaseNoise"]


class PhaseNoise(nn.Module):
    r"""Add Gaussian noise to phases in training mode: :math:`\theta + \sigma \xi`, :math:`\xi \sim N(0, 1)`.

    Identity in eval mode or with ``sigma = 0``.

    Args:
        sigma: noise standard deviation in radians, ``>= 0`` and finite in the default dtype
            (float32: at most ~3.4e38; a larger one is inf there, giving inf or NaN phases).

    Shapes:
        * input ``theta``: ``(*)``; output: same.

    Example:
        >>> import torch
        >>> noise = PhaseNoise(sigma=0.1).eval()
        >>> noise(torch.zeros(3)).tolist()
        [0.0, 0.0, 0.0]
    """

    def __init__(self, sigma: float = 0.03) -> None:
        super().__init__()
        self.sigma = check_real("sigma", sigma, low=0.0, high=largest_value())

    def forward(self, theta: Tensor) -> Tensor:
        """``theta`` ``(*)`` plus noise (training mode), same shape."""
        check_tensor("theta", theta)
        if not self.training or self.sigma == 0.0:
            return theta
        return theta + self.sigma * torch.randn_like(theta)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


class FrequencyJitter(nn.Module):
    r"""Jitter natural frequencies in training mode: :math:`\omega (1 + \varepsilon)`,
    :math:`\varepsilon \sim N(0, \text{relative}^2)`, drawn afresh on every call, per element.

    Identity in eval mode or with ``relative = 0``.

    Args:
        relative: standard deviation of the relative jitter, ``>= 0`` and finite in the default
            dtype (as ``PhaseNoise``'s ``sigma``).

    Shapes:
        * input ``omega``: ``(*)``; output: same.

    Example:
        >>> import torch
        >>> jitter = FrequencyJitter(relative=0.02).eval()
        >>> jitter(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, relative: float = 0.02) -> None:
        super().__init__()
        self.relative = check_real("relative", relative, low=0.0, high=largest_value())

    def forward(self, omega: Tensor) -> Tensor:
        """``omega`` ``(*)`` jittered (training mode), same shape."""
        check_tensor("omega", omega)
        if not self.training or self.relative == 0.0:
            return omega
        # ω·(1 + ε) in at least float32, rounded once: in half precision 1 + ε rounds first, on a grid finer
        # below 1 than above it (bfloat16, relative = 0.002: the mean ε was -0.38·relative, shrinking ω)
        wide = torch.promote_types(omega.dtype, torch.float32)
        factor = 1.0 + self.relative * torch.randn_like(omega, dtype=wide)
        return (omega.to(wide) * factor).to(omega.dtype)

    def extra_repr(self) -> str:
        return f"relative={self.relative}"


class CoherenceRegularizer(nn.Module):
    r"""A penalty on the order parameter R of phases, keeping coherence in a healthy range.

    R is taken over ``dim`` for every other index (e.g. per batch, head and token), the penalty is
    applied to each R and averaged:

    .. math::

        \text{ceiling: } \lambda\, \mathrm{relu}(R - r^*)^2, \qquad
        \text{center: } \lambda\, (R - r^*)^2, \qquad
        \text{band: } \lambda\, [\mathrm{relu}(lo - R)^2 + \mathrm{relu}(R - hi)^2].

    Args:
        target: ``r*`` in ``[0, 1]`` (ceiling and center modes; in band mode, a value other than the
            default is an error).
        weight: ``λ >= 0``, finite in the default dtype (as ``PhaseNoise``'s ``sigma``).
        mode: ``"ceiling"``, ``"center"`` or ``"band"``.
        band: ``(lo, hi)`` with ``0 <= lo <= hi <= 1`` (band mode; in the others, a value other than
            the default is an error).
        dim: the oscillator axis of the phases.

    Shapes:
        * input ``theta``: ``(*)`` with oscillators at ``dim``; output: a scalar loss.

    Example:
        >>> import torch
        >>> reg = CoherenceRegularizer(target=0.45, weight=0.1, mode="ceiling")
        >>> round(float(reg(torch.zeros(2, 8))), 6)     # R = 1: 0.1 * 0.55**2
        0.03025
    """

    MODES = ("ceiling", "center", "band")
    TARGET, BAND = 0.45, (0.35, 0.55)  # the defaults

    def __init__(self, target: float = TARGET, weight: float = 0.1, mode: str = "ceiling",
                 band: tuple[float, float] = BAND, dim: int = -1) -> None:
        super().__init__()
        self.target = check_real("target", target, low=0.0, high=1.0)
        self.weight = check_real("weight", weight, low=0.0, high=largest_value())
        self.mode = check_choice("mode", mode, self.MODES)
        if not isinstance(band, (tuple, list)) or len(band) != 2:
            raise ValueError(f"band: expected a pair (lo, hi) but got {band!r}")
        lo = check_real("band", band[0], low=0.0, high=1.0)
        hi = check_real("band", band[1], low=0.0, high=1.0)
        if lo > hi:
            raise ValueError(f"band: expected lo <= hi but got {band!r}")
        self.band = (lo, hi)
        # read by some modes only: set for another, they would be ignored
        if self.mode == "band" and self.target != self.TARGET:
            raise ValueError("target: not read in mode='band'; give band=(lo, hi)")
        if self.mode != "band" and self.band != self.BAND:
            raise ValueError(f"band: only read in mode='band', not {self.mode!r}")
        self.dim = check_axis("dim", dim)

    def penalty(self, R: Tensor) -> Tensor:
        """The loss for given order-parameter values ``R`` (any shape), averaged to a scalar
        (0 for no values, e.g. a batch of padding only)."""
        check_tensor("R", R)
        if self.mode == "ceiling":
            per_item = torch.relu(R - self.target) ** 2
        elif self.mode == "center":
            per_item = (R - self.target) ** 2
        else:
            lo, hi = self.band
            per_item = torch.relu(lo - R) ** 2 + torch.relu(R - hi) ** 2
        if per_item.numel() == 0:
            return per_item.sum()  # 0, still part of the graph
        return self.weight * per_item.mean()

    def forward(self, theta: Tensor) -> Tensor:
        """The scalar loss for phases ``theta`` ``(*)`` with oscillators at ``dim``."""
        R, _ = order_parameter(theta, dim=self.dim)
        return self.penalty(R)

    def extra_repr(self) -> str:
        # the arguments this mode reads, none that it ignores
        read = f"band={self.band}" if self.mode == "band" else f"target={self.target}"
        return f"{read}, weight={self.weight}, mode={self.mode!r}, dim={self.dim}"
