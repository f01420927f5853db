"""PNG plots written by the recipes (matplotlib, headless)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from recipes import INSTALL_RECIPES
from recipes.files import staged

__all__ = ["plot_history", "plot_R_curves", "check_plotting"]


def check_plotting(what: str) -> None:
    """Raise now (``what``: the setting that asks for plots) if matplotlib is missing: not after the work."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(f"{what}: the plots need matplotlib (the `recipes` extra): {INSTALL_RECIPES}",
                                  name="matplotlib")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    """``fig`` as a PNG at ``path``, through :func:`recipes.files.staged`: a kill mid-write keeps the
    previous plot whole. The figure is closed either way."""
    try:
        with staged(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")  # the staging name has no .png to infer it from
    finally:  # pyplot holds every open figure: one that failed to save stayed in memory for good
        _pyplot().close(fig)


def _one_point_marker(points) -> dict:
    """A line of one point draws nothing (no segment): a marker for it (one evaluation, one logged loss)."""
    return {"marker": "o", "ms": 3} if len(points) == 1 else {}


def plot_history(history: list[dict], run_dir: str | Path) -> list[Path]:
    """``loss.png`` (train and validation loss over steps) and, for models with phase layers,
    ``R.png`` (validation R of every phase layer, one line per head, over training steps)."""
    plt, run_dir = _pyplot(), Path(run_dir)
    written = []
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1, **_one_point_marker(train))
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    fig.tight_layout()
    _save(fig, run_dir / "loss.png")
    written.append(run_dir / "loss.png")

    heads: dict[int, dict[int, list]] = {}  # layer -> head -> [(step, R)]
    for h in history:
        for key, value in h.items():
            match = re.fullmatch(r"val_R/layer(\d+)/head(\d+)", key)
            if match:
                layer, head = map(int, match.groups())
                heads.setdefault(layer, {}).setdefault(head, []).append((h["step"], value))
    if heads:
        curves = {f"layer {layer}": {f"head {head}": points for head, points in sorted(per_head.items())}
                  for layer, per_head in sorted(heads.items())}
        written.append(plot_R_curves(curves, run_dir / "R.png", xlabel="training step",
                                     title="validation R per head over training"))
    return written


def plot_R_curves(curves: dict[str, dict[str, list]], path: str | Path, *, xlabel: str,
                  title: str) -> Path:
    """One panel per key of ``curves`` (e.g. a layer), one line per head: ``[(x, R), ...]``.

    R is per head, computed from that head's own oscillators; angles are never averaged across
    heads.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], curves.items()):
        for label, points in lines.items():
            xs, ys = zip(*points) if points else ((), ())
            ax.plot(xs, ys, lw=1, label=label, **_one_point_marker(points))
        ax.set(xlabel=xlabel, ylabel="R", title=panel, ylim=(0, 1.02))
        if len(lines) <= 12:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)
