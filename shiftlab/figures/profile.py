"""The layer profile: each layer's μ against depth, one line per result.

Layers of several results are matched (:func:`shiftlab.results.matching.match_layers`, every
layer of every result kept): x is the matched row, so a baseline max-pool and the BlurPool that
replaced it share an x, and a layer without a partner (the stride-1 max-pool in front of a
BlurPool) has an x of its own, where only its model's line has a point.
"""
from __future__ import annotations

import math
import textwrap
import warnings
from typing import Optional, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..checks import check_choice
from ..results.matching import Results, as_results, check_comparable, match_layers, resolve_matching, result_labels
from .captions import random_mark, settings_line
from .drawing import mark_strides
from .panels import FS_TITLE, HIGHER_IS_BETTER, METRIC_LABELS, SCALES, escape
from .summaries import layer_value
from .views import DEFAULT_VIEW, NO_LAYER, row_texts, stride_changes, view_rows

__all__ = ["layer_profile"]


def layer_profile(results: Results, labels: Optional[Sequence[str]] = None, scale: str = "linear",
                  by: str = "auto", title: Optional[str] = None, check_settings: bool = True,
                  view: str = DEFAULT_VIEW) -> Figure:
    """Mean distance per layer against depth, one line per result, aligned on matched layers.

    Layers of several results are matched (see :func:`match_layers`: by name, else by structure
    so a max-pool meets the BlurPool that replaced it); x is the matched row and a tick names the
    layer of each result ('features.4 / features.5' where they differ). Every layer of every
    result is shown: a layer without a partner has a row of its own, ticked '– / 2' (the
    first result has no layer there), and each line has a point at each of its own layers only,
    dashed across the rows of the others'. A dotted vertical line with 's=2', 's=4', ... marks
    where the stride changes; global layers are hollow diamonds on a grey band. A linear axis of
    distances starts at 0 (PSNR keeps its own range); zero means vanish on a log axis. An
    undefined layer (no shift but (0, 0) defined) is a gap in its line, never a 0, and its name
    is grey when it is undefined in every result that has it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> tiny = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4))
        >>> grid = shiftlab.ShiftGrid.square(4)
        >>> tiny_aa = shiftlab.measure(shiftlab.antialias(net, 4), images, grid)
        >>> fig = layer_profile([tiny, tiny_aa], labels=["tiny", "tiny+aa4"])
        >>> [tick.get_text() for tick in fig.axes[0].get_xticklabels()]   # 2 meets BlurPool 3
        ['0', '1', '– / 2', '2 / 3', '3 / 4']
        >>> lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        >>> [lines[label].get_xdata().tolist() for label in ("tiny", "tiny+aa4")]  # none of tiny at 2
        [[0, 1, 3, 4], [0, 1, 2, 3, 4]]
        >>> float(fig.axes[0].get_ylim()[0])
        0.0
    """
    results = as_results(results)
    labels = [random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    check_choice("scale", scale, SCALES)
    matched = match_layers(results, by=resolve_matching(results, by), keep_unmatched=True)
    rows = view_rows(results, matched, view)
    columns = [[row[i] for row in rows] for i in range(len(results))]
    length = len(rows)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.14 * length + 2.5)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_label("profile")
    colours = sns.color_palette("deep", len(results))
    marks: dict[tuple[float, str], list[int]] = {}
    spans: dict[tuple[float, float], list[int]] = {}
    undefined = np.ones(length, dtype=bool)  # rows without a value in any result that has them
    handles, values = [], []
    for i, (result, names, label) in enumerate(zip(results, columns, labels)):
        x = np.array([k for k, name in enumerate(names) if name is not None], dtype=int)
        own = [names[k] for k in x]  # this result's layers: a point each, past others' rows
        y = np.array([layer_value(result, n) for n in own], dtype=float)  # NaN: a gap
        undefined[x] &= np.isnan(y)
        handles.append(_line(ax, x, y, colours[i], escape(label), clip=scale == "log"))
        values.append(y)
        glob = np.array([not result.layer(n).is_spatial for n in own], dtype=bool)
        if glob.any():
            ax.plot(x[glob], y[glob], ls="none", marker="D", ms=4.5, mfc="white",
                    mec=colours[i], mew=1.0, label="_nolegend_", zorder=3)
        changes, runs = stride_changes([None if n is None else result.layer(n) for n in names])
        for position, text in changes:
            marks.setdefault((position, text), []).append(i)
        for run in runs:
            spans.setdefault(run, []).append(i)
    mark_strides(ax, marks, spans, len(results), colours, length)
    if scale == "log":
        _log_axis(ax, np.concatenate(values))
    step = max(1, math.ceil(length / 40))
    ticks = np.arange(0, length, step)
    ax.set_xticks(ticks)
    texts = row_texts(rows, results, view)
    ax.set_xticklabels([escape(texts[t]) for t in ticks], rotation=90, fontsize=6)
    for tick, row in zip(ax.get_xticklabels(), ticks):
        if undefined[row]:
            tick.set_color("0.6")
    ax.set_xlabel(_xlabel(len(results), any(None in row for row in rows), bool(undefined.any())),
                  fontsize=8)
    ax.set_xlim(-0.7, length - 0.3)
    if scale == "linear" and metric not in HIGHER_IS_BETTER:
        ax.set_ylim(bottom=0.0)  # distances: 0 (equivariant) is where the axis starts
    ax.set_ylabel(f"mean over shifts:\n{METRIC_LABELS.get(metric, metric)}", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", lw=0.4, color="0.88")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="best")
    # a narrow figure wraps the settings line instead of cutting it at both edges
    width = int(fig.get_figwidth() * 120 / FS_TITLE)
    settings = "\n".join(textwrap.wrap(settings_line(results[0]), width, break_on_hyphens=False))
    fig.suptitle(escape(title or f"Per-layer mean distance\n{settings}"), fontsize=FS_TITLE)
    return fig


def _line(ax, x: np.ndarray, y: np.ndarray, colour, label: str, clip: bool) -> Line2D:
    """One result's line: a point at each of its layers (x: their rows), solid between
    neighbouring rows, dashed across rows where it has no layer (another result's layer without
    a partner), broken at NaN (an undefined layer). Returns the legend's handle."""
    style = dict(color=colour, lw=1.2, clip_on=clip)  # unclipped: a mean of 0 sits on the axis whole
    skips = np.flatnonzero(np.diff(x) > 1)
    if not skips.size:
        ax.plot(x, y, marker="o", ms=3, label=label, **style)
    else:
        ax.plot(x, y, marker="o", ms=3, ls="none", label=label, **style)
        ax.plot(*_broken(x, y, np.flatnonzero(np.diff(x) == 1)), label="_nolegend_", **style)
        ax.plot(*_broken(x, y, skips), ls=(0, (2.5, 2)), label="_nolegend_", **{**style, "lw": 0.9})
    return Line2D([], [], marker="o", ms=3, lw=1.2, color=colour, label=label)


def _broken(x: np.ndarray, y: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments from point k to k + 1 for each k in ``starts``, one path with NaN breaks."""
    xs = np.full(3 * len(starts), np.nan)
    ys = np.full(3 * len(starts), np.nan)
    for j, k in enumerate(starts):
        xs[3 * j:3 * j + 2], ys[3 * j:3 * j + 2] = x[k:k + 2], y[k:k + 2]
    return xs, ys


def _log_axis(ax, values: np.ndarray) -> None:
    with warnings.catch_warnings():  # matplotlib warns when no value is positive
        warnings.filterwarnings("ignore", "Data has no positive values")
        ax.set_yscale("log")
    if not (values > 0).any():  # a perfectly equivariant network: nothing above 0 to draw
        ax.set_ylim(1e-9, 1.0)
        ax.text(0.5, 0.5, "every mean is 0: nothing to show on a log axis", transform=ax.transAxes,
                ha="center", fontsize=8, color="0.35")


def _xlabel(count: int, unmatched: bool, undefined: bool) -> str:
    text = "layer (network order" + ("; matched layers share an x)" if count > 1 else ")")
    if unmatched:
        text += f"\n'{NO_LAYER}' in a name: that model has no layer here (its line is dashed across)"
    if undefined:
        text += "\ngrey: undefined (no shift but (0, 0) is defined), left out of the line"
    return text
