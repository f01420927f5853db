r"""Fixed-step explicit integrators for autonomous phase ODEs ``dθ/dt = f(θ)``.

Each solver is a small class with an ``order`` and one hook, :meth:`FixedStepSolver.step`;
:func:`integrate` looks the method up in :data:`SOLVERS` by name. Integration is out of place
(autograd-safe) and never wraps phases (see :mod:`kuramoto_attn.dynamics`).

Global error after a fixed time ``t`` shrinks like ``dt**order``: halving ``dt`` divides it by
about 2 (Euler), 4 (Heun) and 16 (RK4).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._checks import autocast_off, check_bool, check_choice, check_int, check_real, check_tensor

__all__ = ["SOLVERS", "Euler", "FixedStepSolver", "Heun", "RK4", "integrate"]

VectorField = Callable[[Tensor], Tensor]


class FixedStepSolver:
    """Base class: subclasses set ``order`` and implement :meth:`step`.

    ``order`` is the method's global order of accuracy: the error after a fixed time shrinks like
    ``dt**order``. To make a new solver available to :func:`integrate`, add it to
    :data:`SOLVERS` under a name.

    Example:
        >>> import torch
        >>> class Midpoint(FixedStepSolver):
        ...     order = 2
        ...     def step(self, field, theta, dt):
        ...         return theta + dt * field(theta + 0.5 * dt * field(theta))
        >>> Midpoint().step(lambda theta: -theta, torch.ones(2), 0.1)
        tensor([0.9050, 0.9050])
    """

    order: int = 0

    def __repr__(self) -> str:  # stateless: the name says it all (not "<...Euler object at 0x...>")
        return f"{type(self).__name__}()"

    def step(self, field: VectorField, theta: Tensor, dt: float) -> Tensor:
        """Advance ``theta`` by one step of size ``dt``; must not modify ``theta`` in place.

        Args:
            field: a callable ``θ -> dθ/dt`` returning θ's shape.
            theta: phases, any shape ``(*)``.
            dt: step size.

        Returns:
            The phases after one step, shape ``(*)``.
        """
        raise NotImplementedError


class Euler(FixedStepSolver):
    r"""Forward Euler: :math:`\theta + dt\, f(\theta)`, order 1.

    Example:
        >>> import torch
        >>> Euler().step(lambda theta: -theta, torch.ones(2), 0.1)
        tensor([0.9000, 0.9000])
    """

    order = 1

    def step(self, field: VectorField, theta: Tensor, dt: float) -> Tensor:
        return theta + dt * field(theta)


class Heun(FixedStepSolver):
    r"""Heun's method (explicit trapezoid): average of the slopes at both ends of an Euler step, order 2.

    Example:
        >>> import torch
        >>> Heun().step(lambda theta: -theta, torch.ones(2), 0.1)    # exact: exp(-0.1) = 0.904837
        tensor([0.9050, 0.9050])
    """

    order = 2

    def step(self, field: VectorField, theta: Tensor, dt: float) -> Tensor:
        k1 = field(theta)
        k2 = field(theta + dt * k1)
        return theta + (0.5 * dt) * (k1 + k2)


class RK4(FixedStepSolver):
    """The classical fourth-order Runge–Kutta method, order 4.

    Example:
        >>> import torch
        >>> theta = RK4().step(lambda theta: -theta, torch.ones(1, dtype=torch.float64), 0.1)
        >>> round(float(theta), 7)                                  # exact: exp(-0.1) = 0.9048374
        0.9048375
    """

    order = 4

    def step(self, field: VectorField, theta: Tensor, dt: float) -> Tensor:
        k1 = field(theta)
        k2 = field(theta + (0.5 * dt) * k1)
        k3 = field(theta + (0.5 * dt) * k2)
        k4 = field(theta + dt * k3)
        return theta + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


SOLVERS: dict[str, type[FixedStepSolver]] = {"euler": Euler, "heun": Heun, "rk4": RK4}
"""The solvers :func:`integrate` knows, by name: ``"euler"``, ``"heun"``, ``"rk4"``."""


def integrate(
    field: VectorField,
    theta0: Tensor,
    *,
    dt: float,
    steps: int,
    method: str = "rk4",
    return_trajectory: bool = False,
) -> Tensor:
    r"""Integrate ``dθ/dt = field(θ)`` from ``theta0`` for ``steps`` fixed steps of size ``dt``.

    Args:
        field: a callable ``θ -> dθ/dt`` returning a tensor of θ's shape, dtype and device, e.g. a
            :class:`~kuramoto_attn.KuramotoField`.
        theta0: initial phases, floating point, any shape ``(*)``.
        dt: step size, a finite number ``> 0``.
        steps: number of steps, an integer ``>= 1``.
        method: one of ``"euler"``, ``"heun"``, ``"rk4"`` (keys of :data:`SOLVERS`).
        return_trajectory: also return every intermediate state.

    Returns:
        The phases at ``t = steps·dt``, shape ``(*)``; with ``return_trajectory=True`` a tensor of
        shape ``(steps + 1, *)`` whose first entry is ``theta0``.

    Raises:
        ValueError: naming the argument, for a ``field`` that is not callable, a non-tensor
            ``theta0``, ``dt <= 0``, ``steps < 1``, an unknown ``method``, or a field that returns
            something other than a tensor of θ's shape, dtype and device (checked on the first step).

    Example:
        >>> import torch
        >>> omega = torch.tensor([1.0, 2.0])
        >>> integrate(lambda theta: omega.expand_as(theta), torch.zeros(2), dt=0.5, steps=4)
        tensor([2., 4.])
    """
    if not callable(field):
        raise ValueError(f"field: expected a callable θ -> dθ/dt (e.g. a KuramotoField) but got "
                         f"{type(field).__name__}")
    check_tensor("theta0", theta0)
    dt = check_real("dt", dt, low=0.0, low_open=True)
    steps = check_int("steps", steps, low=1)
    solver = SOLVERS[check_choice("method", method, SOLVERS)]()
    return_trajectory = check_bool("return_trajectory", return_trajectory)

    def checked_field(theta: Tensor) -> Tensor:
        # on the first step only (cheap): later steps start again from phases of theta0's shape, dtype, device
        out = field(theta)
        if not torch.is_tensor(out) or (out.shape, out.dtype, out.device) != (theta.shape, theta.dtype,
                                                                               theta.device):
            got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if torch.is_tensor(out)
                   else type(out).__name__)
            raise ValueError(f"field: expected dθ/dt of theta's shape {tuple(theta.shape)}, dtype {theta.dtype} "
                             f"and device {theta.device} but got {got}")
        return out

    theta = theta0
    trajectory = [theta0]
    for step in range(steps):
        theta = solver.step(checked_field if step == 0 else field, theta, dt)
        if return_trajectory:
            trajectory.append(theta)
    if not return_trajectory:
        return theta
    with autocast_off(theta):  # torch.stack of float16 under bfloat16 autocast (or the reverse) raised
        return torch.stack(trajectory)
