"""A prototype for ``step_time.py --compiled-kernels``: the fused Euler mean-field integration of
``kuramoto_attn/_euler_mean_field.py`` with each step's math (forward, and the reverse step with
its vector-Jacobian product) written out of place and compiled by ``torch.compile``, so that
inductor fuses the elementwise work between the cumulative sums. Same formulas and same saved
tensors (one phase tensor per step) as the library's path; phase noise and ``on_trig`` as there.

Not part of the library: it needs a C++ compiler (CPU) or Triton (GPU) at run time and costs a
compilation per shape. It is here to measure whether fusing the integration pays.
"""

import math

import torch
from torch.autograd.function import once_differentiable

from kuramoto_attn._euler_mean_field import _gain


def _sums(c, s, weight, causal: bool, cos_a: float, sin_a: float):
    """Weighted (cos, sin) and their (cumulative) sums rotated by the lag: (C', S')."""
    cw, sw = (c, s) if weight is None else (c * weight, s * weight)
    if causal:
        C, S = cw.cumsum(-1), sw.cumsum(-1)
    else:
        C, S = cw.sum(-1, keepdim=True), sw.sum(-1, keepdim=True)
    if sin_a != 0.0:
        C, S = C * cos_a + S * sin_a, S * cos_a - C * sin_a
    return cw, sw, C, S


def _forward_step(theta, dt_omega, dt_gain, weight, causal: bool, cos_a: float, sin_a: float):
    c, s = torch.cos(theta), torch.sin(theta)
    _, _, C, S = _sums(c, s, weight, causal, cos_a, sin_a)
    return theta + dt_omega + dt_gain * (S * c - C * s)


def _backward_step(theta, grad, dt_gain, weight, causal: bool, cos_a: float, sin_a: float,
                   omega_acc, strength_acc):
    """The gradient before the step from the one after it (see the library module's docstring)."""
    c, s = torch.cos(theta), torch.sin(theta)
    cw, sw, C, S = _sums(c, s, weight, causal, cos_a, sin_a)
    if omega_acc is not None:
        omega_acc = omega_acc + grad
    if strength_acc is not None:
        strength_acc = strength_acc + grad * (S * c - C * s)
    u = grad * dt_gain
    own = S * s + C * c
    if causal:
        own = own - (cos_a if weight is None else weight * cos_a)
    uc, us = u * c, u * s
    if causal:  # sums over later tokens
        later_c = uc.sum(-1, keepdim=True) - uc.cumsum(-1)
        later_s = us.sum(-1, keepdim=True) - us.cumsum(-1)
    else:
        later_c, later_s = uc.sum(-1, keepdim=True), us.sum(-1, keepdim=True)
    if sin_a != 0.0:
        later_c, later_s = later_c * cos_a - later_s * sin_a, later_s * cos_a + later_c * sin_a
    return grad - u * own + cw * later_c + sw * later_s, omega_acc, strength_acc


_compiled = {}


def _kernel(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


class _CompiledEulerMeanField(torch.autograd.Function):
    @staticmethod
    def forward(ctx, theta0, omega, strength, weight, steps, dt, phase_lag, causal, noise, on_trig):
        dtype, t = theta0.dtype, theta0.shape[-1]
        dt_gain = _gain(strength.to(dtype), weight, t, causal, theta0) * dt
        dt_omega = omega.to(dtype) * dt
        lag = (math.cos(phase_lag), math.sin(phase_lag))
        step = _kernel(_forward_step)
        states, theta = [], theta0
        for _ in range(steps):
            states.append(theta)
            if on_trig is not None:
                on_trig(torch.cos(theta), torch.sin(theta))
            theta = step(theta, dt_omega, dt_gain, weight, causal, *lag)
            if noise:
                theta = theta + noise * torch.randn_like(theta)
        ctx.save_for_backward(torch.stack(states), omega, strength, weight)
        ctx.config = (dt, phase_lag, causal)
        return theta

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        states, omega, strength, weight = ctx.saved_tensors
        dt, phase_lag, causal = ctx.config
        need_theta, need_omega, need_strength = ctx.needs_input_grad[:3]
        dtype, t = states.dtype, states.shape[-1]
        per_count = _gain(torch.ones_like(strength, dtype=dtype), weight, t, causal, states[0])  # w / count
        dt_gain = per_count * strength.to(dtype) * dt
        lag = (math.cos(phase_lag), math.sin(phase_lag))
        step = _kernel(_backward_step)
        grad = grad_out.to(dtype).contiguous()
        omega_acc = torch.zeros_like(grad) if need_omega else None
        strength_acc = torch.zeros_like(grad) if need_strength else None
        for theta in reversed(states.unbind(0)):
            grad, omega_acc, strength_acc = step(theta, grad, dt_gain, weight, causal, *lag, omega_acc, strength_acc)
        grad_omega = None if omega_acc is None else (omega_acc.sum_to_size(omega.shape) * dt).to(omega.dtype)
        grad_strength = None if strength_acc is None else \
            ((strength_acc * per_count).sum_to_size(strength.shape) * dt).to(strength.dtype)
        return (grad if need_theta else None, grad_omega, grad_strength) + (None,) * 7


def compiled_euler_mean_field(theta0, omega, strength, weight, *, steps, dt, phase_lag, causal, noise=0.0,
                              on_trig=None):
    """Drop-in for ``kuramoto_attn._euler_mean_field.euler_mean_field``."""
    return _CompiledEulerMeanField.apply(theta0, omega, strength, weight, steps, dt, phase_lag, causal, noise,
                                         on_trig)
