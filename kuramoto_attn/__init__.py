"""kuramoto-attn: oscillator (Kuramoto) attention components for PyTorch.

Conventions (sign, normalisation, wrapping) are stated in :mod:`kuramoto_attn.dynamics`.
"""

from .attention import KuramotoAttention, KuramotoCache, KuramotoInfo, PhaseGPTAttention
from .couplings import AttentionCoupling, Coupling, GraphCoupling, MeanFieldCoupling, weighted_sine_coupling
from .dynamics import KuramotoField, wrap_phase
from .integrators import RK4, SOLVERS, Euler, FixedStepSolver, Heun, integrate
from .memory import HolographicPhaseMemory, TPIBlock
from .order_params import daido_order_parameter, order_parameter
from .regularizers import CoherenceRegularizer, FrequencyJitter, PhaseNoise

__version__ = "0.1.0"


def __getattr__(name: str):
    # OrderParameter on first use: torchmetrics' import takes about a second (with matplotlib, where that is
    # installed), which a model using only the layers should not pay
    if name == "OrderParameter":
        from .metrics import OrderParameter

        globals()[name] = OrderParameter  # later lookups find it directly
        return OrderParameter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"OrderParameter"})

__all__ = [
    # dynamics and integration
    "KuramotoField",
    "integrate",
    "wrap_phase",
    "SOLVERS",
    "FixedStepSolver",
    "Euler",
    "Heun",
    "RK4",
    # couplings
    "Coupling",
    "MeanFieldCoupling",
    "GraphCoupling",
    "AttentionCoupling",
    "weighted_sine_coupling",
    # order parameters
    "order_parameter",
    "daido_order_parameter",
    "OrderParameter",
    # anti-synchronisation controls
    "PhaseNoise",
    "FrequencyJitter",
    "CoherenceRegularizer",
    # attention
    "KuramotoAttention",
    "PhaseGPTAttention",
    "KuramotoCache",
    "KuramotoInfo",
    # holographic phase memory
    "HolographicPhaseMemory",
    "TPIBlock",
]
