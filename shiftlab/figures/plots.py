"""Figures only: take Results, return matplotlib Figures (nothing is measured here).

Every function builds a standalone :class:`matplotlib.figure.Figure` (not registered with
pyplot, so nothing leaks and nothing pops up); display it in a notebook or write it with
:func:`save_figure`. Axes carry labels so code can find them: ``'layer:<name>'`` for a
heatmap panel (``'layer:<label>:<name>'`` in :func:`compare_grid`), ``'colorbar'`` for the
shared colour bar (``color_range='shared'``), ``'colorbar:<panel label>'`` for a panel's own bar
(the other colour ranges; the quantity is then the figure text with gid ``'colour-label'``),
``'profile'`` for the line plot. Panels and colour bars are images, so a PDF of a large model
costs about what a PNG does (:mod:`shiftlab.figures.drawing`).

A tiny conv / max-pool / conv network, measured and saved, then drawn from its file:

>>> import torch
>>> from torch import nn
>>> import shiftlab
>>> _ = torch.manual_seed(0)
>>> circular = dict(padding=1, padding_mode="circular")
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
...                     nn.Conv2d(4, 8, 3, **circular)).eval()
>>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
>>> import tempfile
>>> tmp = tempfile.TemporaryDirectory()
>>> _ = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4)).save(f"{tmp.name}/result.npz")
>>> fig = layer_grid(shiftlab.load(f"{tmp.name}/result.npz"), view="paper")
>>> [ax.get_label() for ax in fig.axes]      # conv1 is 0 everywhere: a note, no colour bar
['layer:0', 'layer:2', 'colorbar:layer:2', 'layer:3', 'colorbar:layer:3']
>>> [path.name for path in save_figure(fig, f"{tmp.name}/layers")]
['layers.png', 'layers.pdf']

Summary values: a panel's ``μ`` and the profile's y value are ``Result.layer_mean`` (mean over
the shifts where the layer is defined). For PSNR, whose identical maps give +inf (always at
shift (0, 0)), they are the mean over the finite shifts instead; the +inf cells are drawn in
their own colour. A layer with no defined shift but (0, 0) has no μ
(:mod:`shiftlab.figures.summaries`): its panel says "undefined", a profile leaves a gap. A panel
that is one value everywhere says so ("0 everywhere") instead of drawing a colour bar. Colour
and text helpers live in :mod:`shiftlab.figures.panels`, drawing in
:mod:`shiftlab.figures.drawing`, layer selection and paper names in :mod:`shiftlab.figures.views`.
"""
from __future__ import annotations

import math
import textwrap
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import seaborn as sns
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from ..checks import check_choice
from ..errors import SettingsMismatchError, UsageError
from ..results.files import atomic_write
from ..equivariance.geometry import LayerInfo
from ..results.matching import Results, as_results, check_comparable, match_layers, resolve_matching, result_labels
from .drawing import Layout, Panel, draw, mark_strides
from .panels import (difference_map, COLOR_RANGES, DEFAULT_COLOR_RANGE, DIFFERENCES, FS_TITLE, HIGHER_IS_BETTER,
                     METRIC_LABELS, RANDOM_INIT, RATIO_FLOOR, SCALES, UNDEFINED, NO_VALUE, Scale,
                     VmaxSpec, colormap, grid_columns, special_cells, colour_scale, diverging_scale,
                     escape, fmt, image_names, is_random_init, weights_text)
from .summaries import layer_value, undefined_reason
from ..results.result import Result
from ..equivariance.shifts import ShiftGrid
from .views import (DEFAULT_VIEW, VIEWS, blocks, plotted_layers, row_texts, select_view, stride_changes,
                    stride_text, view_rows)

__all__ = ["layer_grid", "layer_profile", "compare_grid", "difference_grid", "probability_plot",
           "save_figure", "match_layers", "select_view", "COLOR_RANGES", "DEFAULT_COLOR_RANGE",
           "DIFFERENCES", "SCALES", "VIEWS", "DEFAULT_VIEW"]



# -- public API ------------------------------------------------------------------------
def layer_grid(result: Result, layers: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
               scale: str = "linear", vmin: Optional[float] = None, vmax: VmaxSpec = "auto",
               cmap: Union[str, Colormap] = "viridis", title: Optional[str] = None,
               spatial_only: bool = False, group_by_block: bool = False,
               color_range: str = DEFAULT_COLOR_RANGE, view: str = DEFAULT_VIEW) -> Figure:
    """One small heatmap per layer of distance over input shift.

    Rows of a panel are dh, columns dw (``result.grid.dh_values`` / ``dw_values``); a diagonal
    grid is drawn as one strip per layer (x = t). Panels follow network order and wrap into
    rows; undefined cells (``exact`` alignment where the stride does not divide the shift) are
    hatched grey, never zero. Titles: layer, module type, stride, μ (none where the layer is
    undefined: its panel says why). A panel that is one value everywhere (an exactly
    equivariant layer: 0) says so instead of drawing a colour bar of its own.

    Args:
        result: a measurement.
        layers: layer names or glob patterns (``'features.*'``); shown in network order.
        ncols: panels per row; default ceil(1.3·sqrt(n)) capped at 10 (5 for diagonal strips).
        scale: 'linear' or 'log' (exact zeros, which no log scale holds, get their own colour).
        vmin: bottom of the colour scale; default 0 for cosine/l2, else the data's minimum.
        vmax: 'auto' (largest value), 'pNN' (NN-th percentile of the plotted values, per colour
            range) or a number; values above it get the colour bar's "over" arrow.
        cmap: colormap; reversed for PSNR so that equivariant is the same colour for every metric.
        title: figure title; default model, weights and settings.
        spatial_only: leave out global layers.
        group_by_block: start a row at each block (the name up to its last '.').
        color_range: 'layer' (each panel its own scale and small bar: every stride pattern shows),
            'stage' (one scale per stride) or 'shared' (one scale, comparable across layers).
        view: 'all' layers or 'paper' (convolutions, pools and logits named conv1_1, pool1, ...;
            see :func:`shiftlab.figures.views.select_view`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4))
        >>> fig = layer_grid(result, view="paper", color_range="shared", vmax="p99")
        >>> [ax.get_title() for ax in fig.axes]       # the ReLU is not in the paper view
        ['conv1\\nConv2d · s=1 · μ=0', 'pool1\\nMaxPool2d · s=2 ·\\nμ=0.073',
         'conv2\\nConv2d · s=2 · μ=0.0673', '']
        >>> [text.get_text() for text in fig.axes[0].texts]   # circular convs: exact
        ['0 everywhere']
    """
    shown = dict(select_view(result, view))
    infos = [i for i in plotted_layers(result, layers, spatial_only) if i.name in shown]
    if not infos:
        raise UsageError(f"no layers left to plot in the {view!r} view; use view='all'")
    strip = _is_strip(result.grid)
    metric = result.settings.metric
    images = [_image(result, info.name) for info in infos]
    drawn = [special_cells(data, metric, scale) for data, _, _ in images]
    scales = _scales([d for d, _ in drawn], _range_keys(infos, color_range),
                     lambda group: colour_scale(group, metric, scale, vmin, vmax))
    groups = blocks([info.name for info in infos]) if group_by_block else [None] * len(infos)
    longest = max(groups.count(b) for b in set(groups)) if group_by_block else len(infos)
    ncols = grid_columns(len(infos), ncols, strip) if ncols is not None else min(grid_columns(len(infos), None, strip), longest)
    panels, row_labels, separators = [], {}, []
    row, col, previous = -1, ncols, None
    for info, (data, specials), (raw, xs, ys), block, sc in zip(infos, drawn, images, groups, scales):
        if col >= ncols or block != previous:
            row, col = row + 1, 0
            if block != previous:
                row_labels[row] = block or "(top level)"
                if previous is not None:
                    separators.append(row)
        previous = block
        name = shown[info.name]
        name = name[len(block) + 1:] if block and name.startswith(f"{block}.") else name
        text = f"{name}\n{_stats(info, layer_value(result, info.name))}"
        note, scaled = _panel_note(result, info.name, raw, color_range != "shared")
        panels.append(Panel(f"layer:{info.name}", text, data, xs, ys, row, col, sc, specials,
                            note, scaled))
        col += 1
    layout = Layout(_colour_label(metric, scale), title or _default_title(result),
                    _notes([result], [i[0] for i in images], strip), row_labels, separators, strip,
                    own_bars=color_range != "shared", xlabel=_xlabel(strip))
    return draw(panels, ncols, colormap(cmap, metric in HIGHER_IS_BETTER), layout)


def layer_profile(results: Results, labels: Optional[Sequence[str]] = None, scale: str = "linear",
                  by: str = "auto", title: Optional[str] = None, check_settings: bool = True,
                  view: str = DEFAULT_VIEW) -> Figure:
    """Mean distance per layer against depth, one line per result, aligned on matched layers.

    Layers of several results are matched (see :func:`match_layers`: by name, else by structure
    so a max-pool meets the BlurPool that replaced it); x is the matched row and a tick names the
    layer of each result ('features.4 / features.5' where they differ). A dotted vertical line
    with 's=2', 's=4', ... marks where the stride changes; global layers are hollow diamonds on a
    grey band. A linear axis of distances starts at 0 (PSNR keeps its own range); zero means
    vanish on a log axis. An undefined layer (no shift but (0, 0) defined) is a gap in its line,
    never a 0, and its name is grey when it is undefined in every result.

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
        ['0', '1', '2 / 3', '3 / 4']
        >>> fig.axes[0].get_xlabel(), float(fig.axes[0].get_ylim()[0])
        ('layer (network order; matched layers share an x)', 0.0)
    """
    results = as_results(results)
    labels = [_random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    check_choice("scale", scale, SCALES)
    rows = view_rows(results, match_layers(results, by=resolve_matching(results, by)), view)
    columns = [[row[i] for row in rows] for i in range(len(results))]
    length = len(rows)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.14 * length + 2.5)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_label("profile")
    colours = sns.color_palette("deep", len(results))
    marks: dict[tuple[float, str], list[int]] = {}
    spans: dict[tuple[float, float], list[int]] = {}
    undefined = np.ones(length, dtype=bool)  # rows without a value in any result
    for i, (result, names, label) in enumerate(zip(results, columns, labels)):
        x = np.arange(len(names))
        y = np.array([layer_value(result, n) for n in names], dtype=float)  # NaN: a gap
        undefined &= np.isnan(y)
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color=colours[i], label=escape(label),
                clip_on=scale == "log")  # a mean of 0 sits on the axis, its marker whole
        glob = np.array([not result.layer(n).is_spatial for n in names], dtype=bool)
        if glob.any():
            ax.plot(x[glob], y[glob], ls="none", marker="D", ms=4.5, mfc="white",
                    mec=colours[i], mew=1.0, label="_nolegend_", zorder=3)
        changes, runs = stride_changes([result.layer(n) for n in names])
        for position, text in changes:
            marks.setdefault((position, text), []).append(i)
        for run in runs:
            spans.setdefault(run, []).append(i)
    mark_strides(ax, marks, spans, len(results), colours, length)
    if scale == "log":
        shown = np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)
        with warnings.catch_warnings():  # matplotlib warns when no value is positive
            warnings.filterwarnings("ignore", "Data has no positive values")
            ax.set_yscale("log")
        if not (shown > 0).any():  # a perfectly equivariant network: nothing above 0 to draw
            ax.set_ylim(1e-9, 1.0)
            ax.text(0.5, 0.5, "every mean is 0: nothing to show on a log axis", transform=ax.transAxes,
                    ha="center", fontsize=8, color="0.35")
    step = max(1, math.ceil(length / 40))
    ticks = np.arange(0, length, step)
    ax.set_xticks(ticks)
    texts = row_texts(rows, results, view)
    ax.set_xticklabels([escape(texts[t]) for t in ticks], rotation=90, fontsize=6)
    for tick, row in zip(ax.get_xticklabels(), ticks):
        if undefined[row]:
            tick.set_color("0.6")
    xlabel = "layer (network order" + ("; matched layers share an x)" if len(results) > 1 else ")")
    if undefined.any():
        xlabel += "\ngrey: undefined (no shift but (0, 0) is defined), left out of the line"
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_xlim(-0.7, length - 0.3)
    if scale == "linear" and metric not in HIGHER_IS_BETTER:
        ax.set_ylim(bottom=0.0)  # distances: 0 (equivariant) is where the axis starts
    ax.set_ylabel(f"mean over shifts:\n{METRIC_LABELS.get(metric, metric)}", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", lw=0.4, color="0.88")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="best")
    # a narrow figure wraps the settings line instead of cutting it at both edges
    width = int(fig.get_figwidth() * 120 / FS_TITLE)
    settings = "\n".join(textwrap.wrap(_settings_line(results[0]), width, break_on_hyphens=False))
    fig.suptitle(escape(title or f"Per-layer mean distance\n{settings}"), fontsize=FS_TITLE)
    return fig


def compare_grid(results: Sequence[Result], labels: Optional[Sequence[str]] = None,
                 ncols: Optional[int] = None, scale: str = "linear", vmin: Optional[float] = None,
                 vmax: VmaxSpec = "auto", cmap: Union[str, Colormap] = "viridis",
                 title: Optional[str] = None, by: str = "auto", check_settings: bool = True,
                 color_range: str = DEFAULT_COLOR_RANGE, view: str = DEFAULT_VIEW) -> Figure:
    """Heatmaps of 2+ results side by side, aligned on matched layers.

    Matched layers (:func:`match_layers`) run left to right and wrap into bands; inside a band
    each result is one row (labelled on the left), so the same layer of every result is stacked
    in one column and shares one colour scale ('layer': per matched layer, 'stage': per stride
    of the first result, 'shared': one for all). Each panel names its own layer.

    Raises:
        SettingsMismatchError: the results were measured differently (``check_settings=False``
            plots them anyway, but the metric must always agree).

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
        >>> fig = compare_grid([tiny, tiny_aa], labels=["tiny", "tiny+aa4"], view="paper")
        >>> [ax.get_title() for ax in fig.axes if ax.get_label().startswith("layer:")]
        ... # doctest: +NORMALIZE_WHITESPACE
        ['conv1\\nConv2d · s=1 · μ=0', 'conv1\\nConv2d · s=1 · μ=0',
         'pool1\\nMaxPool2d · s=2 · μ=0.073', 'blurpool1\\nBlurPool · s=2 · μ=0.0172',
         'conv2\\nConv2d · s=2 · μ=0.0673', 'conv2\\nConv2d · s=2 · μ=0.0164']
    """
    results = as_results(results)
    if len(results) < 2:
        raise UsageError("compare_grid needs two or more results; use layer_grid for one")
    labels = [_random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    rows = view_rows(results, match_layers(results, by=by), view)
    strip = _check_strips(results)
    names = [dict(select_view(r, view if view in VIEWS else DEFAULT_VIEW)) for r in results]
    raw = [[_image(r, row[i]) for i, r in enumerate(results)] for row in rows]
    drawn = [[special_cells(img[0], metric, scale) for img in group] for group in raw]
    keys = _range_keys([results[0].layer(row[0]) for row in rows], color_range)
    row_scales = _scales([[d for d, _ in group] for group in drawn], keys,
                         lambda groups: colour_scale([a for g in groups for a in g], metric, scale, vmin, vmax))
    count = len(results)
    ncols = min(grid_columns(len(rows) * count, ncols, strip), len(rows))
    panels, row_labels, separators = [], {}, []
    for index, row in enumerate(rows):
        band, col = divmod(index, ncols)
        for i, (result, label, name) in enumerate(zip(results, labels, row)):
            grid_row = band * count + i
            row_labels[grid_row] = label
            if i == 0 and band > 0 and col == 0:
                separators.append(grid_row)
            text = f"{names[i].get(name, name)}\n{_stats(result.layer(name), layer_value(result, name))}"
            data, specials = drawn[index][i]
            values, xs, ys = raw[index][i]
            note, scaled = _panel_note(result, name, values, color_range != "shared")
            panels.append(Panel(f"layer:{label}:{name}", text, data, xs, ys, grid_row, col,
                                row_scales[index], specials, note, scaled))
    layout = Layout(_colour_label(metric, scale),
                    title or f"{' vs '.join(labels)}\n{_settings_line(results[0])}",
                    _notes(results, [img[0] for group in raw for img in group], strip), row_labels,
                    separators, strip, own_bars=color_range != "shared", xlabel=_xlabel(strip))
    return draw(panels, ncols, colormap(cmap, metric in HIGHER_IS_BETTER), layout)


def difference_grid(a: Result, b: Result, labels: Optional[Sequence[str]] = None,
                    ncols: Optional[int] = None, vmax: VmaxSpec = "auto",
                    cmap: Union[str, Colormap] = "RdBu_r", title: Optional[str] = None,
                    by: str = "auto", check_settings: bool = True, difference: str = "diff",
                    color_range: str = "shared", view: str = DEFAULT_VIEW) -> Figure:
    """b against a per matched layer and shift, on a diverging scale centred at 0 (±limit).

    ``difference='diff'``: b − a. For distances (cosine, l2) a negative value means b is more
    equivariant there; for PSNR a positive one does — the colour bar says which. +inf values
    (PSNR of identical maps) are clipped to the finite maximum of both results first.
    ``difference='ratio'``: log2(b / a) (distances only), so a halving reads −1 in a layer of
    distance 0.001 as in one of 0.5; both 0 gives 0, and cells where exactly one is 0 get their
    own colours. The limit comes from ``vmax`` ('auto', 'pNN' of |values|, or a number).
    A title gives the summary in the colour's unit: Δμ (b's μ − a's μ) for 'diff', the log2 of
    the ratio of the means (log2 μ ratio) for 'ratio'.

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
        >>> fig = difference_grid(tiny, tiny_aa, labels=["tiny", "tiny+aa4"], difference="ratio")
        >>> [ax.get_title() for ax in fig.axes][2:4]     # doctest: +NORMALIZE_WHITESPACE
        ['2→3\\nMaxPool2d → BlurPool ·\\ns=2 · log2 μ ratio=-2.08',
         '3→4\\nConv2d · s=2 ·\\nlog2 μ ratio=-2.04']
        >>> print(fig.axes[-1].get_ylabel())
        log2(tiny+aa4 / tiny) (cosine)
        < 0: tiny+aa4 more equivariant (−1 = halved)
    """
    check_choice("difference", difference, DIFFERENCES)
    results = [a, b]
    labels = [_random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=True)
    if difference == "ratio" and metric in HIGHER_IS_BETTER:
        raise UsageError("difference='ratio' needs a distance (cosine or l2); use difference='diff' for psnr")
    rows = view_rows(results, match_layers(results, by=by), view)
    strip = _is_strip(a.grid)
    pairs = [(_image(a, na)[0], _image(b, nb)[0]) for na, nb in rows]
    maps = [difference_map(pa, pb, labels, difference, pairs) for pa, pb in pairs]
    keys = _range_keys([a.layer(na) for na, _ in rows], color_range)
    scales = _scales([m for m, _ in maps], keys, lambda group: diverging_scale(group, vmax))
    ncols = grid_columns(len(rows), ncols, strip)
    names = [dict(select_view(r, view)) for r in results]
    panels = []
    for k, ((na, nb), (data, specials), sc) in enumerate(zip(rows, maps, scales)):
        da, db = names[0].get(na, na), names[1].get(nb, nb)
        name = da if da == db else f"{da}→{db}"
        ia, ib = a.layer(na), b.layer(nb)
        module = " → ".join(dict.fromkeys((ia.module, ib.module)))
        stride = " → ".join(dict.fromkeys((stride_text(ia), stride_text(ib))))
        change = _change(layer_value(a, na), layer_value(b, nb), difference)
        stat = "" if math.isnan(change) else f" · {_CHANGE[difference]}={fmt(change)}"
        _, xs, ys = _image(b, nb)
        note, scaled = next(((reason, False) for reason in (undefined_reason(a, na), undefined_reason(b, nb))
                             if reason), None) or _constant_note(data, color_range != "shared")
        panels.append(Panel(f"layer:{nb}", f"{name}\n{module} · {stride}{stat}", data, xs, ys,
                            *divmod(k, ncols), sc, specials, note, scaled))
    if difference == "ratio":
        label = f"log2({labels[1]} / {labels[0]}) ({metric})\n< 0: {labels[1]} more equivariant (−1 = halved)"
    else:
        better = "> 0" if metric in HIGHER_IS_BETTER else "< 0"
        label = f"{labels[1]} − {labels[0]} ({metric})\n{better}: {labels[1]} more equivariant"
        if any(np.isinf(m).any() for pair in pairs for m in pair):
            label += "\n∞ clipped to the finite max"
    head = f"log2({labels[1]} / {labels[0]})" if difference == "ratio" else f"{labels[1]} − {labels[0]}"
    layout = Layout(label, title or f"{head}\n{_settings_line(a)}",
                    _notes(results, [m for pair in pairs for m in pair], strip,
                           f"{_CHANGE[difference]} = {_CHANGE_TEXT[difference]}".format(*labels)),
                    strip=strip, own_bars=color_range != "shared", xlabel=_xlabel(strip))
    return draw(panels, ncols, colormap(cmap, False), layout)


def save_figure(fig: Figure, path_stem: Union[str, os.PathLike], formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``<path_stem>.<format>`` for each format atomically (temp file, then rename).

    The figure stays open; close it when done. Returns the written paths in ``formats`` order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> import tempfile
        >>> fig = layer_grid(shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4)))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> paths = save_figure(fig, f"{tmp.name}/layers", formats=("png",))
        >>> [path.name for path in paths], paths[0].read_bytes()[:4]
        (['layers.png'], b'\\x89PNG')
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise UsageError("save_figure needs at least one format, e.g. ('png', 'pdf')")
    supported = fig.canvas.get_supported_filetypes()
    paths = []
    for fmt_ in formats:
        fmt_ = fmt_.lower().lstrip(".")
        if fmt_ not in supported:
            raise UsageError(f"cannot save a figure as {fmt_!r}; use one of {', '.join(sorted(supported))}")
        path = Path(f"{os.fspath(path_stem)}.{fmt_}")
        atomic_write(path, lambda handle, f=fmt_: fig.savefig(
            handle, format=f, dpi=dpi, bbox_inches="tight", pad_inches=0.08))
        paths.append(path)
    return paths


def probability_plot(results, labels: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
                     title: Optional[str] = None) -> Figure:
    """Probability of the unshifted image's top class along the diagonal sweep, one panel per model.

    Takes one or more :class:`shiftlab.invariance.InvarianceResult`. Each image is a thin line
    with one legend entry (its file name when recorded), the mean over images a thick black
    line; a panel's title gives the model, its flip rate and MAC (mean absolute change between
    consecutive steps). With labels, images whose unshifted top class is the true label are
    solid (the curve is then the true class's probability, the paper's Figure 1) and the others
    dashed. Panels share the y axis and are labelled ``'probability:<label>'``.

    Example:
        A tiny classifier (it flattens its feature map) and its antialiased copy on the six
        shipped sample photos:

        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> from shiftlab.data import load_images, sample_image_paths
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=32).tensor
        >>> base = shiftlab.measure_invariance(model, images, shiftlab.ShiftGrid.square(8))
        >>> antialiased = shiftlab.measure_invariance(shiftlab.antialias(model, 4), images,
        ...                                           shiftlab.ShiftGrid.square(8))
        >>> fig = probability_plot([base, antialiased], labels=["tiny", "tiny+aa4"])
        >>> [(ax.get_label(), ax.get_title()) for ax in fig.axes]   # doctest: +NORMALIZE_WHITESPACE
        [('probability:tiny', 'tiny\\nflip rate 0.19 · MAC 0.0148'),
         ('probability:tiny+aa4', 'tiny+aa4\\nflip rate 0.119 · MAC 0.00864')]
    """
    from ..invariance.grid_result import InvarianceResult

    items = [results] if isinstance(results, InvarianceResult) else list(results)
    if not items:
        raise UsageError("no results to plot")
    for item in items:
        if not isinstance(item, InvarianceResult):
            raise UsageError(f"expected InvarianceResult objects, got {type(item).__name__}")
    if labels is None:
        labels = [str(r.meta.get("label") or r.meta.get("model") or f"model {i + 1}")
                  for i, r in enumerate(items)]
    labels = list(labels)
    if len(labels) != len(items):
        raise UsageError(f"got {len(labels)} labels for {len(items)} results")
    ncols = grid_columns(len(items), ncols, strip=False) if ncols is not None else min(len(items), 3)
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(3.6 * ncols + 2.2, 2.7 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    # 0..1 for trained models; zoomed in when every probability is small (random weights)
    highest = max(float(np.nanmax(r.diagonal_prob, initial=0.0)) for r in items)
    top = 1.02 if highest > 0.5 else max(1.15 * highest, 1e-3)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for k, (ax, result, label) in enumerate(zip(axes.flat, items, labels)):
        ax.set_label(f"probability:{label}")
        steps = result.diagonal_steps
        names = image_names(result)
        colours = sns.color_palette("husl", max(1, result.n_images))
        right = (None if result.labels is None
                 else np.asarray(result.reference_argmax) == np.asarray(result.labels))
        for i, curve in enumerate(result.diagonal_prob):
            name = names[i] if i < len(names) else f"image {i + 1}"
            dashed = right is not None and not right[i]
            line, = ax.plot(steps, curve, lw=0.8, alpha=0.7, color=colours[i], ls="--" if dashed else "-",
                            label=escape(name + (" (top class ≠ label)" if dashed else "")))
            handles.setdefault(line.get_label(), line)
        mean, = ax.plot(steps, result.mean_probability, lw=2.4, color="black", label="mean over images")
        handles.setdefault("mean over images", mean)
        ax.set_title(escape(f"{_random_mark(label, result)}\nflip rate {fmt(result.flip_rate)}"
                            f" · MAC {fmt(result.mac)}"), fontsize=8)
        ax.set_ylim(0.0, top)
        ax.grid(lw=0.4, color="0.9")
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        diagonal = all(dh == dw for dh, dw in result.settings.diagonal.shifts)
        if k // ncols == nrows - 1 or k + ncols >= len(items):
            ax.set_xlabel("diagonal shift t (px), δ = (t, t)" if diagonal else "sweep step", fontsize=8)
        if k % ncols == 0:
            truth = "P(true class) where it is the top class" if result.labels is not None else \
                "P(top class of the\nunshifted image)"
            ax.set_ylabel(truth.replace(" where", "\nwhere"), fontsize=8)
    fig.legend(handles=list(handles.values()), loc="outside right upper", fontsize=6.5, frameon=False)
    first = items[0]
    n = first.n_images
    settings = (f"{first.settings.mode} shifts, {first.settings.size[0]} px, {n} image"
                f"{'s' if n != 1 else ''}; thin lines: one image each")
    fig.suptitle(escape(title or f"Top-class probability along the diagonal\n{settings}"), fontsize=FS_TITLE)
    return fig






def _check_strips(results: list[Result]) -> bool:
    strip = _is_strip(results[0].grid)
    if any(_is_strip(r.grid) != strip for r in results):
        raise SettingsMismatchError("a diagonal grid and a 2-D grid cannot share one layout;"
                                    " compare results measured on the same kind of grid")
    return strip


# -- what a panel shows ------------------------------------------------------------------
def _is_strip(grid: ShiftGrid) -> bool:
    return grid.kind == "diagonal" or (len(grid) > 1 and all(dh == dw for dh, dw in grid.shifts))


def _image(result: Result, name: str) -> tuple[np.ndarray, list[float], Optional[list[float]]]:
    """(rows, cols) values to draw, x values, y values (None for a strip)."""
    grid = result.grid
    if _is_strip(grid):
        order = np.argsort([dh for dh, _ in grid.shifts], kind="stable")
        return result.values(name)[order][None, :].astype(float), [grid.shifts[i][0] for i in order], None
    return result.map(name), list(grid.dw_values), list(grid.dh_values)






def _range_keys(infos: list[LayerInfo], color_range: str) -> list:
    """Which panels share a colour scale: all ('shared'), one per stride ('stage'), none ('layer')."""
    check_choice("color_range", color_range, COLOR_RANGES)
    if color_range == "shared":
        return [0] * len(infos)
    if color_range == "stage":
        return [stride_text(info) for info in infos]
    return list(range(len(infos)))


def _scales(items: list, keys: list, make) -> list[Scale]:
    """``make(items of one group)`` for each group of equal keys, handed back per item."""
    made = {key: make([item for item, k in zip(items, keys) if k == key]) for key in dict.fromkeys(keys)}
    return [made[key] for key in keys]


_CHANGE = {"diff": "Δμ", "ratio": "log2 μ ratio"}
_CHANGE_TEXT = {"diff": "{1}'s μ − {0}'s μ", "ratio": "log2({1}'s μ / {0}'s μ)"}


def _change(first: float, second: float, difference: str) -> float:
    """The change of μ in the colour's unit: second − first, or log2(second / first) with the
    ratio map's rule for distances at rounding level (both: 0, one: ±∞). NaN when either is."""
    if difference == "diff" or math.isnan(first) or math.isnan(second):
        return second - first
    low_first, low_second = first <= RATIO_FLOOR, second <= RATIO_FLOOR
    if low_first or low_second:
        return 0.0 if low_first and low_second else (math.inf if low_first else -math.inf)
    return math.log2(second / first)


def _panel_note(result: Result, name: str, values: np.ndarray, own_bars: bool) -> tuple[Optional[str], bool]:
    """(note, scaled) of a layer's panel: why it is undefined (no colour scale), or '0 everywhere'
    when every defined cell holds one value (on a colour scale only when that scale is shared,
    where the value has a place), else (None, True)."""
    reason = undefined_reason(result, name)
    if reason is not None:
        return reason, False
    return _constant_note(values, own_bars)


def _constant_note(values: np.ndarray, own_bars: bool) -> tuple[Optional[str], bool]:
    defined = values[~np.isnan(values)]
    if defined.size and bool(np.all(defined == defined.flat[0])):
        return f"{fmt(float(defined.flat[0]))} everywhere", not own_bars
    return None, True


def _stats(info: LayerInfo, summary: float, name: str = "μ") -> str:
    """'Conv2d · s=2 · μ=0.0123'; without the value where there is none (an undefined layer)."""
    head = f"{info.module} · {stride_text(info)}"
    return head if math.isnan(summary) else f"{head} · {name}={fmt(summary)}"








def _settings_line(result: Result) -> str:
    s, grid = result.settings, result.grid
    if _is_strip(grid):
        ts = sorted(dh for dh, _ in grid.shifts)
        grid_text = f"diagonal grid t={ts[0]:g}…{ts[-1]:g} ({len(grid)} shifts)"
    else:
        rows, cols = grid.map_shape
        grid_text = f"{grid.kind} grid {rows}×{cols} ({len(grid)} shifts)"
    mode = s.mode + (f" (margin {s.margin})" if s.mode == "crop" else "")
    border = f" · border {s.border}" if s.border else ""
    padding = f" · {s.padding} padding" if s.padding != "as-trained" else ""
    return (f"{s.metric} · {mode} shifts · {s.align} alignment · {grid_text} · image {s.size[0]}×{s.size[1]}"
            f" · {result.meta.get('n_images', '?')} images{border}{padding}")


def _default_title(result: Result) -> str:
    model = result.meta.get("model") or "model"
    weights = weights_text(result)
    head = f"{model} ({weights})" if weights else str(model)
    return f"Per-layer shift-equivariance: {head}\n{_settings_line(result)}"


def _random_mark(label: str, result) -> str:
    """``label`` with '(random init)' added for a random-weights model, unless it says so."""
    return f"{label} ({RANDOM_INIT})" if is_random_init(result) and RANDOM_INIT not in label else label


def _notes(results: list[Result], arrays: Sequence[np.ndarray], strip: bool,
           summary: str = "μ = mean over the defined shifts but (0, 0)") -> list[str]:
    result = results[0]
    axes = "x = diagonal shift t = dh = dw" if strip else "rows = dh, columns = dw"
    notes = [f"Each panel: {axes} (input shift, px); title: layer · module · stride · {summary}"]
    if result.settings.metric in HIGHER_IS_BETTER:
        notes[0] += " (finite ones for PSNR)"
    if any(is_random_init(r) for r in results):
        notes.append(f"{RANDOM_INIT}: untrained weights, not a trained network's behaviour")
    if any(np.isnan(a).any() for a in arrays):
        notes.append(UNDEFINED if result.settings.align == "exact" else NO_VALUE)
    return notes


def _xlabel(strip: bool) -> str:
    return "t (dh = dw)" if strip else "dw"


def _colour_label(metric: str, scale: str) -> str:
    return METRIC_LABELS.get(metric, metric) + (", log scale" if scale == "log" else "")
