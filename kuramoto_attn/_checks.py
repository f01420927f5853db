"""Argument checks shared by the modules: each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
from typing import Any

import torch
from torch import Tensor


def largest_value() -> float:
    """The largest finite value of the default dtype, which modules compute their phases in: a
    scale beyond it is inf there (inf or NaN results). float32's also bounds bf16's and float16's
    compute type."""
    return torch.finfo(torch.get_default_dtype()).max


def broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it."""
    # plain Python: torch.broadcast_shapes costs about as much as the coupling itself
    if len(shape) > len(target):
        return False
    return all(size in (1, full) for size, full in zip(reversed(shape), reversed(target)))


def check_broadcasts(name: str, shape: torch.Size, theta_shape: torch.Size) -> None:
    """``name``'s shape must broadcast to the phases' shape without enlarging it."""
    if not broadcasts_to(shape, theta_shape):
        raise ValueError(f"{name}: expected a shape that broadcasts to theta's {tuple(theta_shape)} "
                         f"but got {tuple(shape)}")


def check_tensor(name: str, value: Any, *, floating: bool = True) -> Tensor:
    if not torch.is_tensor(value):
        raise ValueError(f"{name}: expected a tensor but got {type(value).__name__}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor but got dtype {value.dtype}")
    return value


def check_device(name: str, x: Tensor, tensor: Tensor, owner: str = "the module") -> None:
    """``x`` must be on the device of the ``owner``'s ``tensor`` (their arithmetic would fail with a bare
    device error), unless that is a CPU 0-d tensor (e.g. a scalar strength), which combines with any."""
    if x.device != tensor.device and not (tensor.dim() == 0 and tensor.device.type == "cpu"):
        raise ValueError(f"{name}: expected a tensor on {owner}'s device {tensor.device} but got {x.device}")


def check_input_like(name: str, x: Tensor, weight: Tensor) -> None:
    """``x`` must be on the device of the module's ``weight`` (:func:`check_device`) and have its dtype
    (its matrix products would fail with a bare dtype error), except under ``torch.autocast``, which
    casts their inputs itself (float64 inputs and weights excepted: autocast leaves them as they are)."""
    check_device(name, x, weight)
    dtype = weight.dtype
    if x.dtype == dtype:
        return
    if autocast_dtype(x) is None:
        raise ValueError(f"{name}: expected the module's dtype {dtype} (or torch.autocast) but got {x.dtype}")
    if x.dtype == torch.float64:
        raise ValueError(f"{name}: expected the module's dtype {dtype} but got float64, which torch.autocast "
                         "does not cast")
    if dtype == torch.float64:  # autocast casts the input but never the float64 weights
        raise ValueError(f"{name}: expected the module's dtype torch.float64 but got {x.dtype}; torch.autocast "
                         "does not cast a float64 module's weights")


def check_cache_dtype(cached: Tensor, computed: Tensor) -> None:
    """A decoding cache's past keys ``cached`` must have the dtype this call computes: ``torch.cat``
    would silently promote them (a cache filled under another dtype or autocast setting)."""
    if cached.dtype != computed.dtype:
        raise ValueError(f"cache: holds keys of dtype {cached.dtype} but this call computes {computed.dtype} "
                         "(a cache filled under another dtype or autocast setting)")


def check_mask(name: str, mask: Any, like: Tensor) -> Tensor:
    """A boolean mask (True = valid) on ``like``'s device that broadcasts to its shape."""
    shape = like.shape
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or not broadcasts_to(mask.shape, shape):
        got = f"{mask.dtype} {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"{name}: expected a boolean tensor (True = valid) broadcasting to "
                         f"{tuple(shape)} but got {got}")
    check_device(name, mask, like, owner="theta")
    return mask


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False) -> float:
    """A finite real number within ``[low, high]`` (``(low, high]`` with ``low_open``), as a float.

    NumPy scalars count (``numbers.Real``); bools and tensors do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number but got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float's range (its repr may be too long to print)
        raise ValueError(f"{name}: expected a finite number but got an integer too large for a float") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number but got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name}: expected a value {bound} but got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected a value <= {high} but got {value}")
    return value


#: the largest size torch takes (int64); a larger one fails inside torch without the argument's name
LARGEST_SIZE = 2**63 - 1


def check_int(name: str, value: Any, *, low: int, size: bool = True) -> int:
    """An integer ``>= low`` (NumPy integers count), as a Python int; with ``size`` (a size, count or
    position: torch takes them as int64) at most :data:`LARGEST_SIZE`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer but got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low} but got {value}")
    if size and value > LARGEST_SIZE:
        raise ValueError(f"{name}: expected an integer < 2**63 (torch's sizes are int64) but got {value}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` (``numpy.bool_`` counts), as a Python bool: a string such as ``"False"``
    (e.g. from a config) or a number would otherwise read as a truth value."""
    if isinstance(value, bool):
        return value
    numpy = sys.modules.get("numpy")  # not imported: the value cannot be a NumPy bool
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    raise ValueError(f"{name}: expected True or False but got {value!r}")


def check_axis(name: str, value: Any, *, ndim: int | None = None, optional: bool = False) -> int | None:
    """An integer axis; with ``ndim``, one of a tensor of that rank, returned non-negative."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer axis but got {value!r}")
    value = int(value)
    if ndim is None:
        return value
    if not -ndim <= value < ndim:
        raise ValueError(f"{name}: expected an axis of theta (ndim {ndim}) but got {value}")
    return value % ndim


def check_choice(name: str, value: Any, choices) -> str:
    try:
        known = value in choices
    except TypeError:  # an unhashable value (e.g. a list) against a dict of choices
        known = False
    if not known:
        raise ValueError(f"{name}: expected one of {sorted(choices)} but got {value!r}")
    return value


def autograd_records() -> bool:
    """Whether autograd records the ops run now: gradients enabled and not in inference mode, which records
    nothing even under ``torch.enable_grad()`` (and refuses its tensors in anything saved for a backward)."""
    return torch.is_grad_enabled() and not in_inference_mode()


def in_inference_mode() -> bool:
    """``torch.is_inference_mode_enabled()``, False while dynamo traces: it cannot trace that call (a graph
    break, an error under ``fullgraph=True`` and in ``torch.export``), and a compiled graph is made for
    the grad mode it runs under, which inference mode turns off."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def pytree_dataclass(cls: type) -> type:
    """Register a dataclass of tensors as a pytree (a class decorator), so that ``torch.export`` can return
    it. torch 2.4's registration warns of a deprecated helper of its own (a FutureWarning at every import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.export.register_dataclass(cls)
    return cls


def in_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) is running. Its tensors
    cannot pass through custom autograd functions without ``setup_context`` or a vmap rule, nor
    activation checkpoints (saved-tensor hooks), nor have their values read (``vmap``), so the
    modules then use plain autograd ops (same values, more memory for backward) and skip value checks."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)  # no public test in torch 2.13
    return peek is not None and peek() is not None


def as_tensor(value: Any, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
    """``torch.as_tensor``, also of a NumPy array with negative strides (a flipped view such as ``a[::-1]``),
    which torch refuses; numpy is imported only for a value that is one of its objects."""
    if type(value).__module__ == "numpy":
        import numpy
        # a copy in C order; not ascontiguousarray, which makes a 0-d array or a scalar (np.float32(0.5)) 1-d
        value = numpy.array(value, order="C")
    return torch.as_tensor(value, dtype=dtype, device=device)


def as_finite_tensor(name: str, value: Any, *, booleans: bool = False) -> Tensor:
    """A scalar or tensor argument (e.g. a coupling strength) as a finite floating tensor; booleans (a bool,
    or a list or tensor of them) are refused unless ``booleans`` (e.g. an adjacency matrix: 0 and 1)."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number or tensor but got {value!r}")
    try:
        if isinstance(value, (int, float)):  # keep a Python number's full precision
            tensor = torch.tensor(float(value), dtype=torch.float64)
        elif torch.is_tensor(value):
            tensor = value.detach().clone()
        else:  # a list or array: real numbers in float64, as a Python number (complex ones and booleans: below)
            tensor = as_tensor(value)
            if not (tensor.is_complex() or tensor.dtype == torch.bool):
                tensor = as_tensor(value, dtype=torch.float64)
            tensor = tensor.clone()
    except OverflowError:  # an integer beyond float's range (its repr may be too long to print)
        raise ValueError(f"{name}: expected finite values but got a number too large for a float") from None
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"{name}: expected a number or tensor but got {value!r}") from None
    if tensor.numel() == 0:  # e.g. strength=[]: it would broadcast the coupling away
        raise ValueError(f"{name}: expected at least one value but got the empty {value!r}")
    if tensor.is_complex():  # would be cast to real, silently dropping the imaginary part
        raise ValueError(f"{name}: expected real values but got the complex {value!r}")
    if tensor.dtype == torch.bool and not booleans:  # as a bare True is refused: [True] is not a strength of 1
        raise ValueError(f"{name}: expected real values but got booleans {value!r}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.get_default_dtype())
    if not is_finite(tensor):
        raise ValueError(f"{name}: expected finite values but got {value!r}")
    return tensor


def is_finite(tensor: Tensor) -> bool:
    """Whether every value is finite; True on the meta device (deferred initialisation: no values)."""
    return tensor.device.type == "meta" or bool(torch.isfinite(tensor).all())


def autocast_available(device: str) -> bool:
    """Whether the device type has autocast (meta has none: ``is_autocast_enabled`` would raise there)."""
    if torch.compiler.is_compiling():
        # dynamo of torch 2.4 to 2.7 (at least) cannot trace is_autocast_available (a graph break, an error under
        # fullgraph=True); graphs are compiled for devices with data, which all have autocast
        return device != "meta"
    return torch.amp.is_autocast_available(device)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast runs ``x``'s device's lower-precision ops in, or None when it is off there (or the
    device has none, e.g. meta: shape and FLOP estimates, where ``is_autocast_enabled`` would raise)."""
    device = x.device.type
    if autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(x: Tensor):
    """A context disabling autocast on ``x``'s device (nothing to disable on one without it, e.g. meta):
    for sums that must not run in autocast's half precision, and ops it cannot take (``torch.stack`` of
    float16 under bfloat16 autocast raised "Unexpected floating ScalarType")."""
    if autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()
