"""recipes/plots.py: the curves handed to matplotlib, read back from the figures (not only that a PNG exists)."""

from __future__ import annotations

import os

import pytest

from recipes import plots


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plot functions build, in order, kept open (they close each one after saving it)."""
    plt = plots._pyplot()
    close, kept = plt.close, []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


HISTORY = [  # as recipes.train logs it: train losses every log_interval, evaluations with R per head and per layer
    {"step": 1, "train_loss": 3.0},
    {"step": 2, "train_loss": 2.5},
    {"step": 2, "val_loss": 2.7, "val_ppl": 14.9, "val_R/layer10/head0": 0.9, "val_R/layer2": 0.3,
     "val_R/layer2/head10": 0.6, "val_R/layer2/head0": 0.2, "val_R/layer2/head1": 0.4},
    {"step": 3, "train_loss": 2.0},
    {"step": 4, "val_loss": 2.2, "val_ppl": 9.0, "val_R/layer10/head0": 0.8, "val_R/layer2": 0.4,
     "val_R/layer2/head10": 0.7, "val_R/layer2/head0": 0.25, "val_R/layer2/head1": 0.5},
]


def test_loss_plot_has_the_train_and_validation_losses_over_steps(tmp_path, figures):
    written = plots.plot_history(HISTORY, tmp_path)
    assert written == [tmp_path / "loss.png", tmp_path / "R.png"] and all(p.is_file() for p in written)
    ax = figures[0].axes[0]
    assert _lines(ax) == {"train": ([1, 2, 3], [3.0, 2.5, 2.0]), "validation": ([2, 4], [2.7, 2.2])}
    assert ax.get_xlabel() == "step" and "nats/token" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]


def test_R_plot_has_one_panel_per_phase_layer_and_one_line_per_head(tmp_path, figures):
    plots.plot_history(HISTORY, tmp_path)
    fig = figures[1]
    assert [ax.get_title() for ax in fig.axes] == ["layer 2", "layer 10"]  # by layer number, not as text
    layer2, layer10 = fig.axes
    # the heads in number order, whatever the order logged; the layer's mean (val_R/layer2) is no line of its own
    assert list(_lines(layer2)) == ["head 0", "head 1", "head 10"]
    assert _lines(layer2) == {"head 0": ([2, 4], [0.2, 0.25]), "head 1": ([2, 4], [0.4, 0.5]),
                              "head 10": ([2, 4], [0.6, 0.7])}
    assert _lines(layer10) == {"head 0": ([2, 4], [0.9, 0.8])}
    for ax in fig.axes:
        assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "R"
        assert ax.get_ylim() == pytest.approx((0, 1.02))  # R in [0, 1]: panels comparable at a glance


def _inked(fig, ax, line) -> int:
    """How many pixels of ``ax`` (its legend aside, whose sample is drawn for any line) are in ``line``'s colour."""
    import matplotlib.colors
    import numpy as np
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()
    top, bottom = fig.canvas.get_width_height()[1] - int(box.y1), fig.canvas.get_width_height()[1] - int(box.y0)
    inside = rgb[top:bottom, int(box.x0):int(box.x1)]
    colour = np.array(matplotlib.colors.to_rgb(line.get_color())) * 255
    return int((np.abs(inside - colour).max(axis=-1) < 40).sum())


def test_a_curve_of_one_point_is_drawn(tmp_path, figures):
    # one logged train loss (log_interval >= max_iters) and one evaluation (eval_interval >= max_iters):
    # a line of one point without a marker drew nothing, an empty R.png and a loss.png without its train loss
    history = [{"step": 12, "train_loss": 2.0},
               {"step": 12, "val_loss": 2.1, "val_R/layer1/head0": 0.4, "val_R/layer1/head1": 0.7}]
    plots.plot_history(history, tmp_path)
    loss, R = figures
    assert list(_lines(loss.axes[0])) == ["train", "validation"] and list(_lines(R.axes[0])) == ["head 0", "head 1"]
    for fig in (loss, R):
        for ax in fig.axes:
            for line in ax.get_lines():
                assert len(line.get_xdata()) == 1
                assert _inked(fig, ax, line) > 0, line.get_label()
                assert line.get_marker() == "o"
    # a line of more points keeps no marker (R_tokens draws one point per token)
    plots.plot_R_curves({"layer 0": {"head 0": [(0, 0.1), (1, 0.2)]}}, tmp_path / "R_tokens.png", xlabel="t", title="R")
    assert [line.get_marker() for line in figures[-1].axes[0].get_lines()] == ["None"]


def test_a_model_without_phase_layers_gets_no_R_plot(tmp_path, figures):
    history = [{k: v for k, v in h.items() if not k.startswith("val_R")} for h in HISTORY]
    assert plots.plot_history(history, tmp_path) == [tmp_path / "loss.png"]
    assert len(figures) == 1 and not (tmp_path / "R.png").exists()


def test_a_plot_interrupted_mid_write_keeps_the_previous_one_whole(tmp_path, monkeypatch):
    # savefig wrote straight into R_tokens.png / loss.png: a kill (Ctrl-C) mid-write left a truncated PNG
    # in place of the previous plot
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    curves = {"layer 0": {"head 0": [(0, 0.1), (1, 0.2)]}}
    path = plots.plot_R_curves(curves, tmp_path / "R_tokens.png", xlabel="t", title="R")
    plots.plot_history(HISTORY, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"R_tokens.png", "loss.png", "R.png"}

    original = FigureCanvasAgg.print_png

    def cut_short(self, target, **kwargs):  # half a PNG written, then the interrupt
        if not isinstance(target, (str, os.PathLike)):  # matplotlib's own dry run into memory
            return original(self, target, **{k: v for k, v in kwargs.items() if k in ("metadata", "pil_kwargs")})
        with open(target, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(FigureCanvasAgg, "print_png", cut_short)
    open_figures = plots._pyplot().get_fignums()
    with pytest.raises(KeyboardInterrupt):
        plots.plot_R_curves(curves, path, xlabel="t", title="R")
    with pytest.raises(KeyboardInterrupt):
        plots.plot_history(HISTORY, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no part, no staging file left
    # and no figure left open: pyplot kept the two that failed to save for the rest of the process
    assert plots._pyplot().get_fignums() == open_figures


@pytest.mark.parametrize("heads, legend", [(12, True), (13, False)])
def test_a_panel_has_a_legend_of_its_heads_up_to_twelve(tmp_path, figures, heads, legend):
    # more labels than that would cover the curves
    curves = {"layer 0": {f"head {h}": [(0, 0.1), (1, 0.2)] for h in range(heads)}}
    plots.plot_R_curves(curves, tmp_path / "R.png", xlabel="t", title="R")
    (ax,) = figures[0].axes
    assert (ax.get_legend() is not None) == legend
    if legend:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(curves["layer 0"])


def test_plot_R_curves_draws_each_panel_and_line_it_is_given(tmp_path, figures):
    # as recipes.interpret hands it R over token positions, for two layers of four heads
    curves = {f"layer {layer}": {f"head {h}": [(t, (layer + h + t) / 20) for t in range(5)] for h in range(4)}
              for layer in (0, 2)}
    assert plots.plot_R_curves(curves, tmp_path / "R_tokens.png", xlabel="token position t", title="R") == \
        tmp_path / "R_tokens.png"
    (fig,) = figures
    assert [text.get_text() for text in fig.texts] == ["R"]  # the suptitle (get_suptitle: matplotlib 3.8+)
    assert [ax.get_title() for ax in fig.axes] == ["layer 0", "layer 2"]
    for ax, (panel, lines) in zip(fig.axes, curves.items()):
        assert _lines(ax) == {label: ([t for t, _ in points], [r for _, r in points])
                              for label, points in lines.items()}
        assert ax.get_xlabel() == "token position t"
