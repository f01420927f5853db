r"""``OrderParameter``: a torchmetrics ``Metric`` accumulating the order parameter R over batches.

Each update takes phases, computes R over the oscillator axis for every other index (every batch
element, head, token ...) with :func:`~kuramoto_attn.order_parameter` — never averaging angles
first — and adds the values to sufficient statistics per group (e.g. per head):

.. math::

    \bar R_g = \frac{1}{n_g}\sum R, \quad
    \sigma_g = \sqrt{\frac{1}{n_g}\sum R^2 - \bar R_g^2}, \quad \min_g R, \quad \max_g R.

Sums, counts, minima and maxima reduce exactly across processes (``dist_reduce_fx`` sum/min/max),
so distributed sync comes for free.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from ._checks import check_axis, check_device, check_int, check_mask, check_tensor
from .order_params import order_parameter

__all__ = ["OrderParameter"]


def _order_parameter_update(theta: Tensor, dim: int, group_dim: int | None, num_groups: int,
                            mask: Tensor | None = None) -> tuple[Tensor, ...]:
    """R over ``dim`` (in at least float32), then per-group (sum, sum of squares, count, min, max) in float64."""
    # order_parameter returns R in theta's dtype: bf16 rounded R near 1 to 1 (std 0 near synchrony)
    theta = theta.to(torch.promote_types(theta.dtype, torch.float32))
    R, _ = order_parameter(theta, dim=dim, keepdim=True)  # theta's shape, dim -> 1
    R = R.detach().to(torch.float64)
    valid = torch.ones_like(R, dtype=torch.bool)
    if mask is not None:
        valid = check_mask("mask", mask, R).expand_as(R)  # R: theta's shape, dim -> 1
    if group_dim is None:
        R, valid = R.reshape(1, -1), valid.reshape(1, -1)
    else:
        if R.shape[group_dim] != num_groups:
            raise ValueError(f"theta: expected {num_groups} groups along group_dim={group_dim} "
                             f"but got {R.shape[group_dim]}")
        # (..., g, ...) -> (g, rest)
        R = R.movedim(group_dim, 0).reshape(num_groups, -1)
        valid = valid.movedim(group_dim, 0).reshape(num_groups, -1)
    if R.shape[1] == 0:  # an empty batch (or no tokens) adds nothing
        zeros = R.new_zeros(R.shape[0])
        return zeros, zeros, zeros, torch.full_like(zeros, float("inf")), torch.full_like(zeros, -float("inf"))
    zeros = torch.zeros_like(R)
    inf = torch.full_like(R, float("inf"))
    return (
        torch.where(valid, R, zeros).sum(1),
        torch.where(valid, R * R, zeros).sum(1),
        valid.sum(1).to(torch.float64),
        torch.where(valid, R, inf).amin(1),
        torch.where(valid, R, -inf).amax(1),
    )


def _order_parameter_compute(total: Tensor, total_sq: Tensor, count: Tensor, low: Tensor,
                             high: Tensor) -> dict[str, Tensor]:
    """Mean, population std, min and max per group; NaN for a group with no values."""
    empty = count == 0
    count = count.clamp_min(1.0)
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0.0).sqrt()
    # E[R²] − mean² cancels: identical values left ~1e-8. Popoviciu: std <= (max − min) / 2 (0 when all equal)
    std = torch.minimum(std, (high - low).clamp_min(0.0) / 2)
    nan = torch.full_like(mean, float("nan"))
    return {key: torch.where(empty, nan, value)
            for key, value in {"mean": mean, "std": std, "min": low, "max": high}.items()}


class OrderParameter(Metric):
    r"""Statistics of the order parameter R accumulated over batches, per group.

    Args:
        dim: the oscillator axis of the phases, over which each R is taken.
        group_dim: an axis of the phases whose entries are kept apart (e.g. ``1``, heads, for
            phases ``(b, h, t, n)``); ``None`` pools everything into one group.
        num_groups: the length of ``group_dim`` (required with it, since states have fixed size).
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).

    Shapes:
        * ``update(theta, mask=None)``: ``theta`` ``(*)`` with oscillators at ``dim``;
          ``mask`` (bool, True = counted) broadcasting to ``theta``'s shape with ``dim`` of length 1.
        * ``compute()``: a dict with ``"mean"``, ``"std"`` (population), ``"min"``, ``"max"``,
          each of shape ``(num_groups,)``, or ``()`` without ``group_dim``. As for every
          torchmetrics metric, a one-element result is squeezed: ``num_groups=1`` gives ``()``.

    A NaN or infinite phase (e.g. from a diverged run) makes its R NaN, and every statistic of its group
    stays NaN until :meth:`reset`: a diverged batch shows, it is not skipped.

    In a :class:`torchmetrics.MetricCollection`, build it with ``compute_groups=False`` when it holds
    OrderParameters of different ``dim`` or ``group_dim``: the collection merges metrics of one class
    whose states are equal after the first update, and then updates only one of them.

    Example:
        >>> import torch
        >>> metric = OrderParameter(dim=-1, group_dim=1, num_groups=2)
        >>> theta = torch.zeros(4, 2, 8, 16)          # (b, h, t, n): all phases equal
        >>> metric.update(theta)
        >>> metric.compute()["mean"].tolist()
        [1.0, 1.0]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, dim: int = -1, group_dim: int | None = None, num_groups: int | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        dim = check_axis("dim", dim)
        group_dim = check_axis("group_dim", group_dim, optional=True)
        if group_dim is None:
            if num_groups is not None:
                raise ValueError("num_groups: only meaningful together with group_dim")
            num_groups = 1
        else:
            if num_groups is None:
                raise ValueError("num_groups: required when group_dim is given")
            num_groups = check_int("num_groups", num_groups, low=1)
            if group_dim == dim:  # axes of opposite signs can only be compared in update
                raise ValueError(f"group_dim: expected an axis other than dim={dim} but got {group_dim}")
        self.dim, self.group_dim, self.num_groups = dim, group_dim, num_groups
        reduce = {"total": "sum", "total_sq": "sum", "count": "sum", "low": "min", "high": "max"}
        for name, value in self._initial_states(torch.float64, None).items():
            self.add_state(name, value, dist_reduce_fx=reduce[name])

    def extra_repr(self) -> str:
        groups = "" if self.group_dim is None else f", group_dim={self.group_dim}, num_groups={self.num_groups}"
        return f"dim={self.dim}{groups}"

    def _initial_states(self, dtype: torch.dtype, device: torch.device | None) -> dict[str, Tensor]:
        """The states of a metric that has seen nothing: zero sums and counts, minima +inf, maxima −inf."""
        zeros = torch.zeros(self.num_groups, dtype=dtype, device=device)
        return {"total": zeros, "total_sq": zeros.clone(), "count": zeros.clone(),
                "low": torch.full_like(zeros, float("inf")), "high": torch.full_like(zeros, float("-inf"))}

    def update(self, theta: Tensor, mask: Tensor | None = None) -> None:
        """Add the R values of ``theta`` ``(*)`` (R over ``dim``) to the statistics.

        Args:
            theta: phases with oscillators at ``dim`` (and groups at ``group_dim``); half-precision
                phases are read in float32, so that R near 1 keeps its spread.
            mask: optional bool, True = counted, broadcasting to ``theta``'s shape with ``dim``
                of length 1 (e.g. ``(b, 1, t, 1)`` for phases ``(b, h, t, n)``).
        """
        check_tensor("theta", theta)
        check_device("theta", theta, self.total, owner="the metric")  # e.g. GPU phases, metric left on the CPU
        dim = check_axis("dim", self.dim, ndim=theta.dim())
        group_dim = check_axis("group_dim", self.group_dim, ndim=theta.dim(), optional=True)
        if group_dim == dim:
            raise ValueError("group_dim: must differ from dim (R is taken over dim)")
        total, total_sq, count, low, high = _order_parameter_update(
            theta, dim, group_dim, self.num_groups, mask)
        self.total += total
        self.total_sq += total_sq
        self.count += count
        # in the states' dtype, as the sums above are (a float32 state met by float64 R stays float32)
        self.low = torch.minimum(self.low, low.to(self.low.dtype))
        self.high = torch.maximum(self.high, high.to(self.high.dtype))

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        """As torchmetrics' ``forward``: the statistics of this batch alone, which are also added to the
        accumulated ones. Input that :meth:`update` refuses leaves the metric as it was: torchmetrics
        resets the states before that update and restores them only after it, so a refused batch lost
        everything accumulated (and left the metric set not to sync on :meth:`compute`)."""
        saved = {name: getattr(self, name).clone() for name in self._defaults}
        for name in ("_update_count", "_computed", "_forward_cache", "_cache", "_is_synced", "_to_sync",
                     "_should_unsync", "_enable_grad", "compute_on_cpu"):
            if hasattr(self, name):  # torchmetrics' internals: not every version has each
                saved[name] = getattr(self, name)
        try:
            return super().forward(*args, **kwargs)
        except Exception:
            for name, value in saved.items():
                setattr(self, name, value)
            raise

    def merge_state(self, incoming_state: dict[str, Tensor] | Metric) -> None:
        """Add another ``OrderParameter``'s states (or a dict of them) to this one's. Their group
        counts must match: states of another ``num_groups`` would broadcast onto every group. A dict
        must hold every state as a tensor on this metric's device; a refused merge merges nothing
        (torchmetrics merges state by state, so one missing or bad state left the others merged). A
        result cached by an earlier :meth:`compute` is dropped (torchmetrics' own ``merge_state`` kept
        it, so ``compute`` went on returning the statistics from before the merge)."""
        states = incoming_state.metric_state if isinstance(incoming_state, OrderParameter) else incoming_state
        if isinstance(states, dict):
            for name in self._defaults:
                value, own = states.get(name), getattr(self, name)
                if not torch.is_tensor(value):
                    raise ValueError(f"incoming_state: expected the state {name} as a tensor but got "
                                     f"{type(value).__name__}")
                check_device(f"incoming_state: {name}", value, own, owner="the metric")
                if value.shape != own.shape:
                    raise ValueError(f"incoming_state: expected {name} of shape {tuple(own.shape)} "
                                     f"({self.num_groups} groups) but got {tuple(value.shape)}")
        super().merge_state(incoming_state)
        self._computed = None  # as update does: the states changed

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load states saved with ``persistent(True)``: only states of this metric's shape (torchmetrics took any
        tensor, so states of another ``num_groups`` loaded without a word and then broadcast onto every group,
        or failed at the next update), copied onto the metric's device and into its dtype, as a module's
        parameters are (later updates do not write into the given tensors); with ``strict``, a persistent
        state missing from ``state_dict`` is a missing key. Nothing is loaded unless every state given fits."""
        loaded, errors = {}, []
        for name in self._defaults:
            key = prefix + name
            if key not in state_dict:
                if strict and self._persistent[name]:
                    missing_keys.append(key)
                continue
            value, own = state_dict.pop(key), getattr(self, name)
            if torch.is_tensor(value) and value.shape == own.shape:
                loaded[name] = value.detach().to(device=own.device, dtype=own.dtype, copy=True)
            else:
                got = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
                errors.append(f"{key}: expected a tensor of shape {tuple(own.shape)} (one value per group) "
                              f"but got {got}")
        if not errors:
            for name, value in loaded.items():
                setattr(self, name, value)
            self._computed = None  # as update does: the states changed
        error_msgs.extend(errors)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset(self) -> None:
        """Forget every update: the states of a new metric, in the states' dtype and on their device. Built
        anew, not copied from torchmetrics' saved defaults, which ``to_empty`` leaves uninitialised."""
        for name, value in self._initial_states(self.total.dtype, self.total.device).items():
            self._defaults[name] = value
        super().reset()

    def _apply(self, fn, exclude_state=(), recurse=True):
        """Moves the states with the module but keeps their dtype, unless :meth:`set_dtype` asks. torchmetrics
        keeps it for ``.half()``, ``.float()`` and ``.double()`` but not for ``.to(dtype)``, so e.g. a model's
        ``.to(torch.bfloat16)`` made the float64 sums bfloat16 (a count that stopped at 256).

        A metric built on the meta device and given storage with ``to_empty`` (``recurse`` is accepted for
        it: a metric has no submodules) starts reset: ``to_empty`` leaves memory uninitialised, and here
        it was the statistics, silently (or a TypeError, called on the metric itself)."""
        was_meta = self.total.is_meta
        this = self._apply_same_dtype(fn, exclude_state)
        if was_meta and not this.total.is_meta:  # given storage: only to_empty moves meta tensors anywhere
            this.reset()
        return this

    def _apply_same_dtype(self, fn, exclude_state):
        if self._dtype_convert:
            return super()._apply(fn, exclude_state)

        def same_dtype(tensor: Tensor) -> Tensor:
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)  # not rounded first

        dtype = self._dtype  # torchmetrics sets it from what fn makes of a float32 tensor: it stays as well
        this = super()._apply(same_dtype, exclude_state)
        this._dtype = dtype
        return this

    def compute(self) -> dict[str, Tensor]:
        """``{"mean", "std", "min", "max"}`` of R, each ``(num_groups,)`` (``()`` without groups, and
        for ``num_groups=1``: torchmetrics squeezes one-element results; ``.reshape(-1)`` gives ``(1,)``)."""
        stats = _order_parameter_compute(self.total, self.total_sq, self.count, self.low, self.high)
        if self.group_dim is None:
            stats = {key: value.squeeze(0) for key, value in stats.items()}
        return stats
