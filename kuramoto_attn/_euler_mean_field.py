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

Phase noise (training) is additive after each step: drawn in the forward loop from the global RNG
in the same order as :class:`~kuramoto_attn.PhaseNoise` would, its gradient is the identity.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


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
        if keep:
            states = theta0.new_empty((steps,) + tuple(theta0.shape))  # the input phases of every step
            states[0].copy_(theta0)
            inputs = states.unbind(0)
            targets = list(inputs[1:]) + [out]
        else:  # nothing to save for a backward: two work tensors in turn, memory independent of steps
            work = theta0.new_empty((min(steps - 1, 2),) + tuple(theta0.shape)).unbind(0)
            inputs = [theta0] + [work[k % 2] for k in range(steps - 1)]
            targets = [work[k % 2] for k in range(steps - 1)] + [out]
        bufs = _Buffers(theta0, weight, causal, phase_lag)
        for theta, theta_next in zip(inputs, targets):
            pull = bufs.pull(theta)  # S' cos θ − C' sin θ
            if on_trig is not None:
                on_trig(bufs.cos, bufs.sin)
            torch.add(theta, dt_omega, out=theta_next)
            theta_next.addcmul_(pull, dt_gain)
            if noise:
                theta_next.add_(noise * torch.randn_like(theta_next))
        if keep:
            ctx.save_for_backward(states, omega, strength, weight)
        ctx.config = (dt, phase_lag, causal)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        states, omega, strength, weight = ctx.saved_tensors
        dt, phase_lag, causal = ctx.config
        need_theta, need_omega, need_strength = ctx.needs_input_grad[:3]
        dtype = states.dtype
        t = states.shape[-1]
        K = strength.to(dtype)
        per_count = _gain(torch.ones_like(K), weight, t, causal, states[0])  # w / count
        dt_gain = per_count * K * dt
        bufs = _Buffers(states[0], weight, causal, phase_lag)
        grad = grad_out.to(dtype).contiguous().clone()
        omega_acc = torch.zeros_like(grad) if need_omega else None
        strength_acc = torch.zeros_like(grad) if need_strength else None
        u = torch.empty_like(grad)
        tmp = torch.empty_like(grad)
        uv = torch.empty_like(bufs.cs)  # (2, ...): u cos θ, u sin θ
        later = torch.empty_like(bufs.sums)  # their sums over later tokens (all tokens if not causal)
        later_c, later_s = later.unbind(0)
        cos_a, sin_a = math.cos(phase_lag), math.sin(phase_lag)
        if phase_lag != 0.0:
            rotated = torch.empty_like(later)
            rot_c, rot_s = rotated.unbind(0)
        else:
            rot_c, rot_s = later_c, later_s
        w_cos_a = cos_a if weight is None else weight * cos_a
        for theta in reversed(states.unbind(0)):
            pull = bufs.pull(theta)  # also fills cos, sin (weighted) and the rotated sums S', C'
            if omega_acc is not None:
                omega_acc.add_(grad)
            if strength_acc is not None:
                strength_acc.addcmul_(grad, pull)
            torch.mul(grad, dt_gain, out=u)
            # own term: −u (S' sin θ + C' cos θ); causal: plus the k = i term of the sums below,
            # w u (cos θ cos(θ+α) + sin θ sin(θ+α)) = w u cos α
            torch.mul(bufs.S_rot, bufs.sin, out=tmp)
            tmp.addcmul_(bufs.C_rot, bufs.cos)
            if causal:
                tmp.sub_(w_cos_a)
            grad.addcmul_(u, tmp, value=-1.0)
            # through the sums: w cos θ Σ_{k>i} u cos(θ+α) + w sin θ Σ_{k>i} u sin(θ+α) (all k if not causal)
            torch.mul(bufs.cs, u, out=uv)
            if causal:
                # a reverse cumulative sum, from the last token: total − cumsum would cancel (u ∝ 1/count
                # is largest at the first tokens, so the later tokens' short sums lost their digits)
                torch.cumsum(uv.flip(-1), -1, out=later)  # Σ_{k≥i}, tokens last to first
                later.copy_(later.flip(-1))  # (flip copies first)
                later.sub_(uv)  # Σ_{k>i}
            else:
                torch.sum(uv, -1, keepdim=True, out=later)
            if phase_lag != 0.0:
                torch.mul(later_c, cos_a, out=rot_c)
                rot_c.add_(later_s, alpha=-sin_a)
                torch.mul(later_s, cos_a, out=rot_s)
                rot_s.add_(later_c, alpha=sin_a)
            grad.addcmul_(bufs.cos_w, rot_c)
            grad.addcmul_(bufs.sin_w, rot_s)
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
        self.cos_a, self.sin_a = math.cos(phase_lag), math.sin(phase_lag)
        self.cs = like.new_empty((2,) + tuple(like.shape))
        self.cos, self.sin = self.cs.unbind(0)
        self.csw = self.cs if weight is None else torch.empty_like(self.cs)
        self.cos_w, self.sin_w = self.csw.unbind(0)
        shape = self.cs.shape if causal else self.cs.shape[:-1] + (1,)
        self.sums = like.new_empty(shape)
        self.C, self.S = self.sums.unbind(0)
        if phase_lag != 0.0:
            self.C_rot, self.S_rot = torch.empty_like(self.sums).unbind(0)
        else:
            self.C_rot, self.S_rot = self.C, self.S
        self.out = torch.empty_like(like)

    def pull(self, theta: Tensor) -> Tensor:
        torch.cos(theta, out=self.cos)
        torch.sin(theta, out=self.sin)
        if self.weight is not None:
            torch.mul(self.cs, self.weight, out=self.csw)
        if self.causal:
            torch.cumsum(self.csw, -1, out=self.sums)
        else:
            torch.sum(self.csw, -1, keepdim=True, out=self.sums)
        if self.phase_lag != 0.0:  # C' = C cos α + S sin α, S' = S cos α − C sin α
            torch.mul(self.C, self.cos_a, out=self.C_rot)
            self.C_rot.add_(self.S, alpha=self.sin_a)
            torch.mul(self.S, self.cos_a, out=self.S_rot)
            self.S_rot.add_(self.C, alpha=-self.sin_a)
        torch.mul(self.S_rot, self.cos, out=self.out)
        self.out.addcmul_(self.C_rot, self.sin, value=-1.0)
        return self.out


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
    keep = torch.is_grad_enabled() and any(x.requires_grad for x in (theta0, omega, strength))
    return _EulerMeanField.apply(theta0, omega, strength, weight, steps, dt, phase_lag, causal,
                                 noise, on_trig, keep)
