"""Figures only: take Results, return matplotlib Figures (nothing is measured here).

Every function builds a standalone :class:`matplotlib.figure.Figure` (not registered with
pyplot, so nothing leaks and nothing pops up); display it in a notebook or write it with
:func:`save_figure`. Axes carry labels so code can find them: ``'layer:<name>'`` for a
heatmap panel (``'layer:<label>:<name>'`` in :func:`compare_grid`), ``'colorbar'`` for the
shared colour bar (``color_range='shared'``), ``'colorbar:<panel label>'`` for a panel's own bar
(the other colour ranges; the quantity is then the figure text with gid ``'colour-label'``),
``'profile'`` for the line plot, and ``'missing:<label>:<partner layer>'`` for a panel of
:func:`compare_grid` where a model has no partner for another model's layer. Panels and colour
bars are images, so a PDF of a large model costs about what a PNG does
(:mod:`shiftlab.figures.drawing`).

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
that is one value everywhere says so ("0 everywhere") instead of drawing a colour bar.

This module is the figures' one front door: :func:`layer_grid` lives here, and every other
figure is imported from the module that draws it, so ``shiftlab.figures.plots.<name>`` reaches
them all: :func:`layer_profile` (:mod:`~shiftlab.figures.profile`), :func:`compare_grid` and
:func:`difference_grid` (:mod:`~shiftlab.figures.compare`), :func:`probability_plot`
(:mod:`~shiftlab.figures.probability`) and :func:`save_figure` (:mod:`~shiftlab.figures.saving`).
Colour and text helpers live in :mod:`shiftlab.figures.panels`, titles and notes in
:mod:`shiftlab.figures.captions`, maps and shared scales in :mod:`shiftlab.figures.maps`,
drawing in :mod:`shiftlab.figures.drawing`, layer selection and paper names in
:mod:`shiftlab.figures.views`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from ..errors import UsageError
from ..results.matching import match_layers
from ..results.result import Result
from .captions import colour_label, default_title, figure_notes, xlabel
from .compare import compare_grid, difference_grid
from .drawing import Layout, Panel, draw
from .maps import is_strip, layer_image, range_keys, shared_scales
from .panels import (COLOR_RANGES, DEFAULT_COLOR_RANGE, DIFFERENCES, HIGHER_IS_BETTER, SCALES, VmaxSpec,
                     colormap, colour_scale, grid_columns, special_cells)
from .probability import probability_plot
from .profile import layer_profile
from .saving import save_figure
from .summaries import layer_value, panel_note, stats_text
from .views import DEFAULT_VIEW, VIEWS, blocks, plotted_layers, select_view

__all__ = ["layer_grid", "layer_profile", "compare_grid", "difference_grid", "probability_plot",
           "save_figure", "match_layers", "select_view", "COLOR_RANGES", "DEFAULT_COLOR_RANGE",
           "DIFFERENCES", "SCALES", "VIEWS", "DEFAULT_VIEW"]


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
    strip = is_strip(result.grid)
    metric = result.settings.metric
    images = [layer_image(result, info.name) for info in infos]
    drawn = [special_cells(data, metric, scale) for data, _, _ in images]
    scales = shared_scales([d for d, _ in drawn], range_keys(infos, color_range),
                           lambda group: colour_scale(group, metric, scale, vmin, vmax))
    groups = blocks([info.name for info in infos]) if group_by_block else [None] * len(infos)
    longest = max(groups.count(b) for b in set(groups)) if group_by_block else len(infos)
    ncols = (grid_columns(len(infos), ncols, strip) if ncols is not None
             else min(grid_columns(len(infos), None, strip), longest))
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
        text = f"{name}\n{stats_text(info, layer_value(result, info.name))}"
        note, scaled = panel_note(result, info.name, raw, color_range != "shared")
        panels.append(Panel(f"layer:{info.name}", text, data, xs, ys, row, col, sc, specials,
                            note, scaled))
        col += 1
    layout = Layout(colour_label(metric, scale), title or default_title(result),
                    figure_notes([result], [i[0] for i in images], strip), row_labels, separators,
                    strip, own_bars=color_range != "shared", xlabel=xlabel(strip))
    return draw(panels, ncols, colormap(cmap, metric in HIGHER_IS_BETTER), layout)
