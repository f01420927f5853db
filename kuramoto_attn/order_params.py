r"""Order parameters (functional): how synchronised a population of phases is.

.. math::

    R e^{i\psi} = \frac{\sum_j w_j e^{i\theta_j}}{\sum_j w_j}, \qquad
    R_m e^{i\psi_m} = \frac{1}{N}\sum_j e^{i m\theta_j} \quad \text{(Daido, harmonic } m\text{)}.

``R = 1`` when all phases are equal; ``E[R^2] = 1/N`` for independent uniform phases. R is always
taken over the oscillators of one group (e.g. one head): never average angles first (averaging the
angles of independent uniform phases across heads and then taking R gives R ≈ 0.88, an artifact).
Computed with real arithmetic (cos/sin sums), so it works under autocast and ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_axis, check_bool, check_broadcasts, check_device, check_int, check_tensor

__all__ = ["daido_order_parameter", "order_parameter"]


def order_parameter(theta: Tensor, dim: int = -1, weights: Tensor | None = None,
                    keepdim: bool = False) -> tuple[Tensor, Tensor]:
    r"""Kuramoto order parameter ``(R, ψ)`` of the phases along ``dim``.

    Args:
        theta: phases ``(*, n, *)`` with the population (length ``n >= 1``) at ``dim``; other
            axes may be empty.
        dim: the population axis.
        weights: optional non-negative weights broadcasting to ``theta`` (e.g. a validity mask);
            a group whose weights sum to zero gets ``R = 0``.
        keepdim: keep ``dim`` with length 1.

    Returns:
        ``(R, psi)``: ``R`` in ``[0, 1]`` and ``ψ`` in ``(−π, π]``, each of ``theta``'s shape
        without ``dim`` (or with it as length 1 when ``keepdim``).

    Example:
        >>> import math, torch
        >>> R, psi = order_parameter(torch.tensor([0.3, 0.3, 0.3]))
        >>> round(float(R), 6), round(float(psi), 6)
        (1.0, 0.3)
        >>> R, _ = order_parameter(torch.arange(4) * math.pi / 2)   # splay state
        >>> float(R) < 1e-6
        True
    """
    check_tensor("theta", theta)
    check_axis("dim", dim, ndim=theta.dim())
    keepdim = check_bool("keepdim", keepdim)
    if theta.shape[dim] == 0:  # R of no oscillators is undefined (the mean would give NaN)
        raise ValueError(f"theta: expected at least one oscillator along dim={dim} but got shape "
                         f"{tuple(theta.shape)}")
    # in at least float32, the results in theta's dtype: the sums of half-precision phases overflow
    # (float16's 65504 is reached by 100 weights of 1000), and ψ's gradient (C dS − S dC) / R² was NaN in
    # float16 already at R ≈ 1e-3, where R² is below float16's smallest number
    dtype, wide = theta.dtype, torch.promote_types(theta.dtype, torch.float32)
    if weights is None:
        theta = theta.to(wide)
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        mean_cos, mean_sin = cos_t.mean(dim, keepdim=keepdim), sin_t.mean(dim, keepdim=keepdim)
    else:
        check_tensor("weights", weights, floating=False)
        if weights.is_complex():  # a cast to real would drop the imaginary part
            raise ValueError(f"weights: expected real non-negative values but got dtype {weights.dtype}")
        check_device("weights", weights, theta, owner="theta")
        check_broadcasts("weights", weights.shape, theta.shape)
        # never below the weights' own floating dtype (float64 weights of 1e-50 were 0 in float32: R = 0)
        if weights.is_floating_point():
            wide = torch.promote_types(wide, weights.dtype)
        weights = weights.to(wide)
        # (no values on meta: shape and FLOP estimates run, as the unweighted path does)
        if weights.device.type != "meta" and not ((weights >= 0) & torch.isfinite(weights)).all():  # NaN too
            raise ValueError("weights: expected finite non-negative values")
        # a phase with zero weight never counts, even NaN or inf (0 · NaN is NaN); a finite one is kept, as the
        # gradient of its weight needs it (e^{iθ} − Z, not 1 − Z, for a soft mask at exactly 0)
        theta = theta.to(wide)
        theta = torch.where((weights > 0) | torch.isfinite(theta), theta, 0.0)
        cos_t, sin_t = torch.cos(theta), torch.sin(theta)
        # the mean is unchanged by scaling a group's weights: by their largest, the sums neither overflow
        # (float32 weights of 2e38 gave inf / inf: R = NaN) nor are tiny (weights of 1e-40 were divided
        # by a clamp, R ≈ 0.03 for equal phases); a group with any weight has total >= 1, one without 0
        scale = weights.expand_as(theta).amax(dim, keepdim=True)
        weights = weights / torch.where(scale > 0, scale, 1.0)
        total = weights.expand_as(theta).sum(dim, keepdim=keepdim)
        # not clamp_min(1): a total of exactly 1 (one weight left) needs its gradient, which torch 2.14's
        # clamp gives as 0 at the bound
        total = torch.where(total > 0, total, 1.0)
        mean_cos = (cos_t * weights).sum(dim, keepdim=keepdim) / total
        mean_sin = (sin_t * weights).sum(dim, keepdim=keepdim) / total
    R = _resultant_length(mean_cos, mean_sin)
    psi = torch.atan2(mean_sin, mean_cos).to(dtype)
    # atan2 gives -π for a mean sine of -0 (e.g. θ = -π), and an angle near -π can round to it in theta's
    # dtype; the documented range is (-π, π]
    return R.to(dtype), torch.where(psi == -math.pi, math.pi, psi)


def daido_order_parameter(theta: Tensor, m: int, dim: int = -1, weights: Tensor | None = None,
                          keepdim: bool = False) -> tuple[Tensor, Tensor]:
    r"""Daido order parameter of harmonic ``m``: ``R_m e^{iψ_m} = mean_j e^{imθ_j}``.

    Args:
        theta: phases ``(*, n, *)`` with the population at ``dim``.
        m: harmonic, an integer ``>= 1`` (``m = 1`` is :func:`order_parameter`), at most the largest
            value of the dtype ``m·θ`` is computed in (``theta``'s, at least float32).
        dim, weights, keepdim: as in :func:`order_parameter`.

    Returns:
        ``(R_m, psi_m)`` shaped like :func:`order_parameter`'s; ``ψ_m`` is the angle of ``Z_m``
        (not divided by ``m``).

    Example:
        >>> import math, torch
        >>> R2, _ = daido_order_parameter(torch.tensor([0.0, math.pi]), m=2)  # two clusters
        >>> round(float(R2), 6)
        1.0
    """
    m = check_int("m", m, low=1, size=False)
    check_tensor("theta", theta)
    # m·θ in at least float32: in half precision it rounds (bfloat16 θ ≈ 100, m = 3: to a step of
    # 2 rad) or overflows to inf (float16 θ > 65504 / m: R_m was NaN); the results in theta's dtype
    wide = torch.promote_types(theta.dtype, torch.float32)
    # beyond wide's largest value m·θ is inf (R_m NaN); a Python int past 2**64 was an OverflowError
    largest = torch.finfo(wide).max
    if m > largest:
        raise ValueError(f"m: expected at most {largest:.6g} (the largest {wide} value: m·θ is computed "
                         "there) but got a larger integer")
    R, psi = order_parameter(float(m) * theta.to(wide), dim=dim, weights=weights, keepdim=keepdim)
    return R.to(theta.dtype), psi.to(theta.dtype)


def _resultant_length(mean_cos: Tensor, mean_sin: Tensor) -> Tensor:
    """``R = |(mean cos θ, mean sin θ)|`` in ``[0, 1]``, elementwise over the two means (same shape)."""
    # vector_norm's gradient at Z = 0 is 0 (hypot's is NaN); rounding can exceed 1, so values above 1 are 1
    # (torch.where, not clamp: torch 2.14's clamp has no gradient at the bound itself, R = 1.0). The pair
    # on the last axis: torch's CPU norm over a leading axis of 2 is about 10x slower. Written into one
    # tensor, not torch.stack: under autocast to the other half dtype (float16 means, bfloat16 autocast)
    # stack raised "Unexpected floating ScalarType in at::autocast::prioritize"
    pair = mean_cos.new_empty((*mean_cos.shape, 2))
    pair[..., 0], pair[..., 1] = mean_cos, mean_sin
    R = torch.linalg.vector_norm(pair, dim=-1)
    return torch.where(R > 1, 1.0, R)
