r"""Fused forward-Euler integration of the mean-field coupling with a hand-written backward.

The fast path of :class:`~kuramoto_attn.KuramotoAttention` for its default settings (``euler``,
``mean_field``, no cache). Phases ``θ`` are ``(b, h, n, t)``; one step is

.. math::

    \theta' = \theta + dt\,\big(\omega + g_i\,(S'_i \cos\theta_i - C'_i \sin\theta_i)\big), \qquad
    g_i = \frac{K_h w_i}{\mathrm{count}_i},

with ``S_i = Σ_{j≤i} w_j sin θ_j``, ``C_i = Σ_{j≤i} w_j cos θ_j`` (sums over every token when not
causal), ``w`` the valid weight and ``(S', C')`` the sums rotated by the phase lag ``α``
(``S' = S cos α − C sin α``, ``C' = C cos α + S sin α``), so that the pull is
``Σ_j w_j sin(θ_j − θ_i − α) / count_i``.

The forward loop runs without autograd and keeps the input phases of every step (one phase tensor
per step, as the checkpointed generic path does; none when no gradient is needed); the backward
runs the steps in reverse with the analytic vector-Jacobian product, recomputing each step's
trigonometry, in preallocated buffers (causal: plus the flipped copies of a reverse cumulative sum, the
sums over later tokens ``Σ_{k≥i}``, summed from the last token so that they keep their digits).
With ``G`` the gradient of the step's output and ``u = dt·G·g``:

.. math::

    \bar\theta_i = G_i - u_i (S'_i \sin\theta_i + C'_i \cos\theta_i)
        + w_i \cos\theta_i \sum_{k \ge i} u_k \cos(\theta_k + \alpha)
        + w_i \sin\theta_i \sum_{k \ge i} u_k \sin(\theta_k + \alpha).

It is computed as ``θ̄ = G + cos θ · A_c + sin θ · A_s`` with ``A = w L − u (C', S')`` and ``L`` the two
rotated sums over ``k ≥ i``: after the sums, one multiply-add on ``(2, b, h, n, t)`` and two into ``θ̄``.

Phase noise (training) is additive after each step: drawn in the forward loop from the global RNG
in the same order as :class:`~kuramoto_attn.PhaseNoise` would, its gradient is the identity.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import Tensor

from ._checks import autograd_records


def first_order(backward: Callable) -> Callable:
    """A hand-written ``backward`` that refuses ``create_graph=True`` (autograd runs a backward with gradients
    enabled exactly then; otherwise it runs without, so nothing is recorded). ``once_differentiable``, used
    before, raised only for ``.backward()``: a second ``torch.autograd.grad(..., inputs=...)`` skipped its node,
    silently dropping those second-order terms."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "KuramotoAttention's hand-written backward is first order: create_graph=True (gradient penalties, "
                "Hessian-vector products) is not supported through it. For second-order gradients, differentiate "
                "with torch.func (e.g. torch.func.grad of torch.func.grad), under which the layer runs plain "
                "autograd ops, with SDPA's math kernel (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)): its "
                "fused kernels have no second derivative")
        return backward(ctx, *grads)
    return wrapper


class _EulerMeanField(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta0: Tensor, omega: Tensor, strength: Tensor, weight: Tensor | None,
                steps: int, dt: float, phase_lag: float, causal: bool, noise: float,
                on_trig: Callable[[Tensor, Tensor], None] | None, keep: bool) -> Tensor:
        dtype = theta0.dtype
        t = theta0.shape[-1]
        dt_gain = _gain(strength.to(dtype), weight, t, causal, theta0) * dt  # dt K w / count
        dt_omega = omega.to(dtype) * dt
        out = torch.empty_like(theta0)
        # the input phases of the steps after the first: every one kept for a backward (θ⁰ is saved as it
        # is), else two work tensors in turn, memory independent of steps
        work = theta0.new_empty((steps - 1 if keep else min(steps - 1, 2),) + tuple(theta0.shape))
        mids = [work[k if keep else k % 2] for k in range(steps - 1)]
        bufs = _Buffers(theta0, weight, causal, phase_lag)
        for theta, theta_next in zip([theta0, *mids], [*mids, out]):
            pull = bufs.pull(theta)  # S' cos θ − C' sin θ
            if on_trig is not None:
                on_trig(bufs.cos, bufs.sin)
            torch.add(theta, dt_omega, out=theta_next)
            theta_next.addcmul_(pull, dt_gain)
            if noise:
                theta_next.add_(noise * torch.randn_like(theta_next))
        if keep:
            ctx.save_for_backward(theta0, work, omega, strength, weight)
        ctx.config = (dt, phase_lag, causal)
        return out

    @staticmethod
    @first_order
    def backward(ctx, grad_out: Tensor):
        theta0, work, omega, strength, weight = ctx.saved_tensors
        dt, phase_lag, causal = ctx.config
        need_theta, need_omega, need_strength = ctx.needs_input_grad[:3]
        dtype = theta0.dtype
        t = theta0.shape[-1]
        K = strength.to(dtype)
        per_count = _gain(torch.ones_like(K), weight, t, causal, theta0)  # w / count
        dt_gain = per_count * K * dt
        bufs = _Buffers(theta0, weight, causal, phase_lag)
        grad = grad_out.to(dtype).contiguous().clone()
        omega_acc = torch.zeros_like(grad) if need_omega else None
        strength_acc = torch.zeros_like(grad) if need_strength else None
        u = torch.empty_like(grad)
        later = torch.empty_like(bufs.cs)  # (Σ_{k≥i} u cos θ_k, Σ_{k≥i} u sin θ_k) (all k if not causal), then A
        total = None if causal else torch.empty_like(bufs.sums)
        rotated = None if phase_lag == 0.0 else torch.empty_like(later if causal else total)
        for theta in reversed([theta0, *work.unbind(0)]):
            if strength_acc is not None:  # the pull is needed for K's gradient only
                strength_acc.addcmul_(grad, bufs.pull(theta))  # (fills cos, sin, the (rotated) sums too)
            else:
                bufs.fill(theta)
            if omega_acc is not None:
                omega_acc.add_(grad)
            torch.mul(grad, dt_gain, out=u)
            torch.mul(bufs.cs, u, out=later)
            if causal:
                # a reverse cumulative sum, from the last token: total − cumsum would cancel (u ∝ 1/count
                # is largest at the first tokens, so the later tokens' short sums lost their digits)
                torch.cumsum(later.flip(-1), -1, out=later)  # tokens last to first (flip copies first)
                later.copy_(later.flip(-1))
                sums = later
            else:
                sums = torch.sum(later, -1, keepdim=True, out=total)
            if phase_lag != 0.0:  # (Σ u cos(θ+α), Σ u sin(θ+α))
                sums = _rotate(sums, phase_lag, out=rotated)
            # A = w L − u (C', S'), so that θ̄ = G + cos θ A_c + sin θ A_s: the own term is
            # −u (S' sin θ + C' cos θ), the sums' is w (cos θ L_c + sin θ L_s), their k = i terms included
            if weight is not None:
                torch.mul(sums, weight, out=later)
            elif sums is not later:
                later.copy_(sums)  # (not causal: broadcast over the tokens)
            later.addcmul_(bufs.sums_rot, u, value=-1.0)
            grad.addcmul_(bufs.cos, later[0])
            grad.addcmul_(bufs.sin, later[1])
        grad_omega = grad_strength = None
        if omega_acc is not None:
            grad_omega = (omega_acc.sum_to_size(omega.shape) * dt).to(omega.dtype)
        if strength_acc is not None:
            strength_acc.mul_(per_count)
            grad_strength = (strength_acc.sum_to_size(strength.shape) * dt).to(strength.dtype)
        return (grad if need_theta else None, grad_omega, grad_strength,
                None, None, None, None, None, None, None, None)


def _gain(K: Tensor, weight: Tensor | None, t: int, causal: bool, like: Tensor) -> Tensor:
    """``K w / count`` broadcastable to ``(b, h, n, t)``; count at least 1."""
    if weight is None:
        if causal:
            counts = torch.arange(1, t + 1, device=like.device, dtype=like.dtype)
        else:
            counts = like.new_full((), t)
        return K / counts
    counts = weight.cumsum(-1) if causal else weight.sum(-1, keepdim=True)
    return K / counts.clamp_min(1.0) * weight


class _Buffers:
    """Preallocated work tensors of one integration, with their views made once: ``cs`` = (cos θ,
    sin θ), ``csw`` = weighted by ``w``, ``sums`` = their (cumulative) sums (C, S), the lag-rotated
    sums (C', S') and ``out`` = the pull ``S' cos θ − C' sin θ``."""

    def __init__(self, like: Tensor, weight: Tensor | None, causal: bool, phase_lag: float) -> None:
        self.weight, self.causal, self.phase_lag = weight, causal, phase_lag
        self.cs = like.new_empty((2,) + tuple(like.shape))
        self.cos, self.sin = self.cs.unbind(0)
        self.csw = self.cs if weight is None else torch.empty_like(self.cs)
        shape = self.cs.shape if causal else self.cs.shape[:-1] + (1,)
        self.sums = like.new_empty(shape)  # (C, S)
        self.sums_rot = self.sums if phase_lag == 0.0 else torch.empty_like(self.sums)  # (C', S')
        self.C_rot, self.S_rot = self.sums_rot.unbind(0)
        self.out = torch.empty_like(like)

    def pull(self, theta: Tensor) -> Tensor:
        self.fill(theta)
        torch.mul(self.S_rot, self.cos, out=self.out)
        self.out.addcmul_(self.C_rot, self.sin, value=-1.0)
        return self.out

    def fill(self, theta: Tensor) -> None:
        """cos θ, sin θ (and weighted), their sums and the rotated sums; not the pull."""
        torch.cos(theta, out=self.cos)
        torch.sin(theta, out=self.sin)
        if self.weight is not None:
            torch.mul(self.cs, self.weight, out=self.csw)
        if self.causal:
            torch.cumsum(self.csw, -1, out=self.sums)
        else:
            torch.sum(self.csw, -1, keepdim=True, out=self.sums)
        if self.phase_lag != 0.0:  # C' = C cos α + S sin α, S' = S cos α − C sin α
            _rotate(self.sums, -self.phase_lag, out=self.sums_rot)


def _rotate(pair: Tensor, angle: float, out: Tensor) -> Tensor:
    """``(c cos a − s sin a, s cos a + c sin a)`` of a ``(2, ...)`` pair ``(c, s)``, into ``out`` (not ``pair``
    itself: its halves are read after ``out`` is written)."""
    c, s = pair.unbind(0)
    out_c, out_s = out.unbind(0)
    torch.mul(pair, math.cos(angle), out=out)
    out_c.add_(s, alpha=-math.sin(angle))
    out_s.add_(c, alpha=math.sin(angle))
    return out


def euler_mean_field(theta0: Tensor, omega: Tensor, strength: Tensor, weight: Tensor | None, *,
                     steps: int, dt: float, phase_lag: float, causal: bool, noise: float = 0.0,
                     on_trig: Callable[[Tensor, Tensor], None] | None = None) -> Tensor:
    """Phases ``(b, h, n, t)`` after ``steps`` Euler steps of the mean-field Kuramoto field.

    Args:
        theta0: initial phases ``(b, h, n, t)``.
        omega: natural frequencies, broadcastable to ``theta0`` (e.g. ``(h, n, 1)``).
        strength: ``K`` broadcastable to ``theta0`` (e.g. ``(h, 1, 1)``).
        weight: valid weight ``(b, 1, 1, t)`` (1 valid, 0 padded), or None when all are valid.
        noise: std of the Gaussian noise added after each step (0: none).
        on_trig: called with ``(cos θ, sin θ)`` ``(b, h, n, t)`` of each step's input phases
            ``θ⁰ … θ^{steps−1}`` (detached, noise of the steps before included), e.g. to record R
            without computing them again. They are work buffers, valid during the call only: clone
            them to keep them.
    """
    # a backward will come: keep every step's input phases (not under no_grad / inference_mode)
    keep = autograd_records() and any(x.requires_grad for x in (theta0, omega, strength))
    return _EulerMeanField.apply(theta0, omega, strength, weight, steps, dt, phase_lag, causal,
                                 noise, on_trig, keep)
