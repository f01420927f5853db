r"""The Kuramoto vector field and this library's phase conventions.

Convention (used by every module in the library):

.. math::

    \frac{d\theta_i}{dt} = \omega_i + \sum_j K_{ij} \sin(\theta_j - \theta_i - \alpha)

* **Sign.** ``sin(θ_j − θ_i)``: with ``K > 0`` oscillator *i* is pulled towards *j*
  (attractive, synchronising). A negative strength gives the repulsive coupling.
* **Normalisation.** All-to-all (mean-field) coupling uses ``K_ij = K / N``, where ``N`` counts the
  oscillators taking part (for causal or masked coupling: the elements actually counted).
  Two oscillators then phase-lock iff ``|Δω| ≤ K``, at ``sin φ* = Δω / K`` (Adler); with a phase lag
  ``α`` iff ``|Δω| ≤ K cos α`` (all-to-all: each oscillator's own term ``sin(−α)`` is the same for both).
* **Phase lag** ``α`` (Sakaguchi) is subtracted inside the sine.
* **Wrapping policy.** Phases are *unwrapped* real numbers everywhere inside the library: integrators,
  couplings and order parameters never wrap (every formula is 2π-periodic, and wrapping inside an
  integrator would make trajectories discontinuous and break autograd). Call :func:`wrap_phase`
  only when presenting or storing angles; feed phases to layers as ``[cos θ, sin θ]`` features.
  Unwrapped phases lose resolution as they grow (``ω t``): near 1000 rad the step between representable
  values is 0.5 rad in float16, 4 rad in bfloat16 and 6e-5 rad in float32, and each integration step
  rounds to it, in the same direction step after step: 20,000 Euler steps of ``dt = 0.05`` (θ near 1300)
  end 0.2 rad off in float32. Integrate long runs in float64, or wrap the phases between
  :func:`~kuramoto_attn.integrate` calls (every 100 steps: 7e-4 rad there).

Einstein legend for shapes: ``*`` any leading batch dimensions, ``n`` oscillators.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import as_tensor, check_broadcasts, check_device, check_tensor, is_finite

__all__ = ["KuramotoField", "wrap_phase"]


def wrap_phase(theta: Tensor) -> Tensor:
    r"""Wrap angles to the half-open interval ``(−π, π]``.

    Args:
        theta: phases of any shape.

    Returns:
        Tensor of the same shape with ``θ − 2πk`` in ``(−π, π]``.

    Example:
        >>> import math, torch
        >>> wrap_phase(torch.tensor([math.pi, -math.pi, 3 * math.pi / 2], dtype=torch.float64)).tolist()
        [3.141592653589793, 3.141592653589793, -1.5707963267948966]
    """
    check_tensor("theta", theta)
    low_precision = theta.dtype in (torch.float16, torch.bfloat16)
    # in half precision 2π itself rounds (to 6.28125 in bf16): wrap in float32, then round once
    work = theta.float() if low_precision else theta
    # π − ((π − θ) mod 2π) lies in (−π, π]; wrapping θ + π directly would give [−π, π)
    wrapped = math.pi - torch.remainder(math.pi - work, 2 * math.pi)
    # rounding: for θ just above π, (π − θ) mod 2π can round up to 2π itself, giving −π
    wrapped = torch.where(wrapped <= -math.pi, wrapped + 2 * math.pi, wrapped)
    if not low_precision:
        return wrapped
    # a value near ±π may round beyond it: keep the nearest representable one inside (π rounds below π);
    # torch.where, not clamp, whose gradient torch 2.14 makes 0 at the bounds themselves (θ = π)
    pi = torch.tensor(math.pi, dtype=theta.dtype).item()
    wrapped = wrapped.to(theta.dtype)
    return torch.where(wrapped.abs() > pi, wrapped.clamp(-pi, pi), wrapped)


class KuramotoField(nn.Module):
    r"""The Kuramoto vector field ``f(θ) = ω + coupling(θ)``, separate from any solver.

    .. math::

        f(\theta)_i = \omega_i + \mathrm{coupling}(\theta)_i

    Args:
        omega: natural frequencies; must broadcast to the phases' shape without enlarging it
            (e.g. shape ``(n,)`` for phases ``(*, n)``). An ``nn.Parameter`` is registered as
            a parameter (learnable frequencies), anything else as a buffer (a copy, so the caller's tensor
            and the field do not change each other). A buffer computed from
            parameters (``2 * p``) keeps its autograd graph, as any module's would: gradients reach
            ``p`` through one backward, and the field cannot be deep-copied; for frequencies
            recomputed per call, make the field inside your module's ``forward``.
        coupling: a callable ``θ -> coupling term`` of θ's shape, typically a
            :class:`~kuramoto_attn.Coupling`; ``None`` for free rotation. Extra arguments of
            ``forward`` (e.g. :class:`~kuramoto_attn.AttentionCoupling`'s ``weights``) are passed
            on to it; to integrate with them, bind them to the field:
            ``integrate(functools.partial(field, weights=A), theta0, ...)`` (binding them to the
            coupling instead would hide its parameters from the field).

    Shapes:
        * input ``theta``: ``(*, n)`` (or any shape ω broadcasts to)
        * output: same as ``theta``

    Example:
        >>> import torch
        >>> from kuramoto_attn import KuramotoField, MeanFieldCoupling, integrate
        >>> field = KuramotoField(torch.zeros(3), MeanFieldCoupling(strength=2.0))
        >>> theta = integrate(field, torch.tensor([0.0, 0.5, 1.0]), dt=0.1, steps=100)
        >>> float(theta.max() - theta.min()) < 1e-3
        True
    """

    def __init__(self, omega: Tensor, coupling: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        if isinstance(omega, nn.Parameter):  # learnable frequencies stay trainable
            self.omega = omega
        else:
            try:  # a copy, as Coupling's strength: not the caller's tensor (changed later, or by load_state_dict);
                # not detached: gradients still reach a tensor that requires them
                self.register_buffer("omega", as_tensor(omega).clone())
            except (TypeError, RuntimeError, ValueError):  # e.g. a string
                raise ValueError(f"omega: expected finite floating-point natural frequencies "
                                 f"but got {omega!r}") from None
        if not self.omega.is_floating_point() or not is_finite(self.omega):
            raise ValueError("omega: expected finite floating-point natural frequencies")
        # what reset_parameters restores, as Coupling keeps its strength: a copy without the autograd graph,
        # on the CPU for a list even under torch.device("meta"); a plain attribute, not in the state dict
        self._initial_omega = (omega.detach().clone() if torch.is_tensor(omega)
                               else as_tensor(omega, device="cpu").clone())
        if coupling is not None and not callable(coupling):
            raise ValueError(f"coupling: expected a callable θ -> coupling term (e.g. a Coupling) or None "
                             f"but got {type(coupling).__name__}")
        self.coupling = coupling

    def extra_repr(self) -> str:
        # a coupling module shows below as a submodule; a plain callable (e.g. a function) by its name here
        coupling = self.coupling
        named = "" if coupling is None or isinstance(coupling, nn.Module) else \
            f", coupling={getattr(coupling, '__name__', type(coupling).__name__)}"
        return f"omega={tuple(self.omega.shape)}{named}"

    def reset_parameters(self) -> None:
        """Set ``omega`` to the frequencies the field was built with, in place (also an ``nn.Parameter``
        you gave), in its own dtype and on its device. For a field built on the meta device and then given
        storage with ``to_empty`` (FSDP and Fabric's ``init_module(empty_init=True)`` call it then). The
        coupling is a submodule with its own ``reset_parameters``.

        Raises:
            RuntimeError: the field was built from a tensor on the meta device, which holds no value to
                restore.
        """
        if self._initial_omega.is_meta:
            raise RuntimeError("omega: KuramotoField was built from a tensor on the meta device, so there is no "
                               "value to reset it to; build it from a list or CPU tensor, or load its state_dict")
        with torch.no_grad():
            self.omega.copy_(self._initial_omega)

    def forward(self, theta: Tensor, *args, **kwargs) -> Tensor:
        """``dθ/dt`` at ``theta`` ``(*, n)``; returns the same shape (a new tensor). ``args`` and
        ``kwargs`` go to the coupling (e.g. a mask or per-call weights)."""
        check_tensor("theta", theta)
        check_broadcasts("omega", self.omega.shape, theta.shape)
        check_device("theta", theta, self.omega, owner="the field")
        # to theta's device too: a 0-d CPU ω passes check_device, but expanded it no longer combines
        omega = self.omega.to(theta.device, theta.dtype).expand_as(theta)
        if self.coupling is None:
            if args or kwargs:
                raise ValueError("coupling: None (free rotation) takes no extra arguments")
            return omega.clone()  # never a view of the ω buffer (a caller may update it in place)
        term = self.coupling(theta, *args, **kwargs)
        # a plain callable's term of another shape that broadcasts (e.g. a mean kept as (*, 1)) would
        # pass silently in ω + term (a Coupling checks its own)
        if not torch.is_tensor(term) or term.shape != theta.shape:
            got = tuple(term.shape) if torch.is_tensor(term) else type(term).__name__
            raise ValueError(f"coupling: returned {got}, expected a tensor of theta's shape {tuple(theta.shape)}")
        return omega + term
