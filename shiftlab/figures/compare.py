"""Grids of several results: side by side (:func:`compare_grid`) and one against another
(:func:`difference_grid`), aligned on matched layers.

Layers are matched by :func:`shiftlab.results.matching.match_layers` with every layer kept: a
layer without a partner in another result (the stride-1 max-pool in front of each BlurPool of
an antialiased model) has a row of its own. In :func:`compare_grid` that row's panel of a model
without the layer is empty and says so; in :func:`difference_grid` the row names the one
model's layer and says there is nothing to subtract.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
from matplotlib.colors import Colormap
from matplotlib.figure import Figure

from ..checks import check_choice
from ..errors import UsageError
from ..results.matching import as_results, check_comparable, match_layers, result_labels
from ..results.result import Result
from .captions import colour_label, figure_notes, random_mark, settings_line, xlabel
from .drawing import Layout, Panel, draw
from .maps import check_strips, is_strip, layer_image, range_keys, shared_scales
from .panels import (DEFAULT_COLOR_RANGE, DIFFERENCES, HIGHER_IS_BETTER, RATIO_FLOOR, VmaxSpec, colormap,
                     colour_scale, difference_map, diverging_scale, fmt, grid_columns, special_cells)
from .summaries import constant_note, layer_value, panel_note, stats_text, undefined_reason
from .views import DEFAULT_VIEW, VIEWS, select_view, stride_text, view_rows

__all__ = ["compare_grid", "difference_grid"]

Row = tuple[Optional[str], ...]


def compare_grid(results: Sequence[Result], labels: Optional[Sequence[str]] = None,
                 ncols: Optional[int] = None, scale: str = "linear", vmin: Optional[float] = None,
                 vmax: VmaxSpec = "auto", cmap: Union[str, Colormap] = "viridis",
                 title: Optional[str] = None, by: str = "auto", check_settings: bool = True,
                 color_range: str = DEFAULT_COLOR_RANGE, view: str = DEFAULT_VIEW) -> Figure:
    """Heatmaps of 2+ results side by side, aligned on matched layers.

    Matched layers (:func:`match_layers`) run left to right and wrap into bands; inside a band
    each result is one row (labelled on the left), so the same layer of every result is stacked
    in one column and shares one colour scale ('layer': per matched layer, 'stage': per stride
    of the first result that has the layer, 'shared': one for all). Each panel names its own
    layer. Every layer of every result is drawn: where a result has no partner for another's
    layer, its panel (labelled ``'missing:<label>:<the other's layer>'``) is empty and says
    "no partner in <label>".

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
         'pool1\\nMaxPool2d · s=1 · μ=0.0347', 'pool1\\nMaxPool2d · s=2 · μ=0.073',
         'blurpool1\\nBlurPool · s=2 · μ=0.0172', 'conv2\\nConv2d · s=2 · μ=0.0673',
         'conv2\\nConv2d · s=2 · μ=0.0164']
        >>> [(ax.get_label(), ax.texts[0].get_text()) for ax in fig.axes
        ...  if ax.get_label().startswith("missing:")]     # tiny has no stride-1 max-pool
        [('missing:tiny:2', 'no partner in tiny')]
    """
    results = as_results(results)
    if len(results) < 2:
        raise UsageError("compare_grid needs two or more results; use layer_grid for one")
    labels = [random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    rows = view_rows(results, match_layers(results, by=by, keep_unmatched=True), view)
    strip = check_strips(results)
    names = [dict(select_view(r, view if view in VIEWS else DEFAULT_VIEW)) for r in results]
    raw = [[None if name is None else layer_image(r, name) for r, name in zip(results, row)]
           for row in rows]
    drawn = [[None if img is None else special_cells(img[0], metric, scale) for img in group]
             for group in raw]
    keys = range_keys([_first_layer(results, row) for row in rows], color_range)
    row_arrays = [[cell[0] for cell in group if cell is not None] for group in drawn]
    row_scales = shared_scales(row_arrays, keys, lambda groups: colour_scale(
        [array for group in groups for array in group], metric, scale, vmin, vmax))
    count = len(results)
    ncols = min(grid_columns(len(rows) * count, ncols, strip), len(rows))
    own_bars = color_range != "shared"
    panels, row_labels, separators = [], {}, []
    for index, row in enumerate(rows):
        band, col = divmod(index, ncols)
        present = next(k for k, name in enumerate(row) if name is not None)
        for i, (result, label, name) in enumerate(zip(results, labels, row)):
            grid_row = band * count + i
            row_labels[grid_row] = label
            if i == 0 and band > 0 and col == 0:
                separators.append(grid_row)
            if name is None:  # no partner: an empty panel shaped like the layer it lacks
                values, xs, ys = raw[index][present]
                panels.append(Panel(f"missing:{label}:{row[present]}", "", np.full(values.shape, np.nan),
                                    xs, ys, grid_row, col, row_scales[index],
                                    note=f"no partner in {label}", scaled=False, empty=True))
                continue
            text = f"{names[i].get(name, name)}\n{stats_text(result.layer(name), layer_value(result, name))}"
            data, specials = drawn[index][i]
            values, xs, ys = raw[index][i]
            note, scaled = panel_note(result, name, values, own_bars)
            panels.append(Panel(f"layer:{label}:{name}", text, data, xs, ys, grid_row, col,
                                row_scales[index], specials, note, scaled))
    arrays = [img[0] for group in raw for img in group if img is not None]
    layout = Layout(colour_label(metric, scale),
                    title or f"{' vs '.join(labels)}\n{settings_line(results[0])}",
                    figure_notes(results, arrays, strip), row_labels, separators, strip,
                    own_bars=own_bars, xlabel=xlabel(strip))
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
    the ratio of the means (log2 μ ratio) for 'ratio'. Panels are labelled ``'layer:<b's
    layer>'``. A layer of one model without a partner in the other keeps its place: its empty
    panel is titled with the layer and its model ('2 (tiny+aa4)'; labelled ``'layer:<a's
    label>:<a's layer>'`` for a layer of a) and says there is nothing to subtract.

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
        >>> [ax.get_title() for ax in fig.axes][2:5]     # doctest: +NORMALIZE_WHITESPACE
        ['2 (tiny+aa4)\\nMaxPool2d · s=1',
         '2→3\\nMaxPool2d → BlurPool ·\\ns=2 · log2 μ ratio=-2.08',
         '3→4\\nConv2d · s=2 ·\\nlog2 μ ratio=-2.04']
        >>> print(fig.axes[2].texts[0].get_text())  # tiny has no stride-1 max-pool
        no partner in tiny:
        nothing to subtract
        >>> print(fig.axes[-1].get_ylabel())
        log2(tiny+aa4 / tiny) (cosine)
        < 0: tiny+aa4 more equivariant (−1 = halved)
    """
    check_choice("difference", difference, DIFFERENCES)
    results = [a, b]
    labels = [random_mark(label, r) for label, r in zip(result_labels(results, labels), results)]
    metric = check_comparable(results, labels, check_settings, same_grid=True)
    if difference == "ratio" and metric in HIGHER_IS_BETTER:
        raise UsageError("difference='ratio' needs a distance (cosine or l2); use difference='diff' for psnr")
    rows = view_rows(results, match_layers(results, by=by, keep_unmatched=True), view)
    if all(None in row for row in rows):
        raise UsageError(f"no layers of both results left in the {view!r} view, so nothing to"
                         " subtract; use view='all'")
    strip = is_strip(a.grid)
    pairs = [(layer_image(a, na)[0], layer_image(b, nb)[0]) for na, nb in rows if None not in (na, nb)]
    maps = iter([difference_map(pa, pb, labels, difference, pairs) for pa, pb in pairs])
    shape = pairs[0][0].shape
    drawn = [(np.full(shape, np.nan), []) if None in row else next(maps) for row in rows]
    keys = range_keys([_first_layer(results, row) for row in rows], color_range)
    scales = shared_scales([m for m, _ in drawn], keys, lambda group: diverging_scale(group, vmax))
    ncols = grid_columns(len(rows), ncols, strip)
    names = [dict(select_view(r, view)) for r in results]
    own_bars = color_range != "shared"
    panels = []
    for k, ((na, nb), (data, specials), sc) in enumerate(zip(rows, drawn, scales)):
        position = divmod(k, ncols)
        _, xs, ys = layer_image(b if nb is not None else a, nb if nb is not None else na)
        if None in (na, nb):
            panels.append(_one_sided(results, labels, names, (na, nb), data, xs, ys, position, sc))
            continue
        da, db = names[0].get(na, na), names[1].get(nb, nb)
        name = da if da == db else f"{da}→{db}"
        ia, ib = a.layer(na), b.layer(nb)
        module = " → ".join(dict.fromkeys((ia.module, ib.module)))
        stride = " → ".join(dict.fromkeys((stride_text(ia), stride_text(ib))))
        change = _change(layer_value(a, na), layer_value(b, nb), difference)
        stat = "" if math.isnan(change) else f" · {_CHANGE[difference]}={fmt(change)}"
        note, scaled = next(((reason, False) for reason in (undefined_reason(a, na), undefined_reason(b, nb))
                             if reason), None) or constant_note(data, own_bars)
        panels.append(Panel(f"layer:{nb}", f"{name}\n{module} · {stride}{stat}", data, xs, ys,
                            *position, sc, specials, note, scaled))
    if difference == "ratio":
        label = f"log2({labels[1]} / {labels[0]}) ({metric})\n< 0: {labels[1]} more equivariant (−1 = halved)"
    else:
        better = "> 0" if metric in HIGHER_IS_BETTER else "< 0"
        label = f"{labels[1]} − {labels[0]} ({metric})\n{better}: {labels[1]} more equivariant"
        if any(np.isinf(m).any() for pair in pairs for m in pair):
            label += "\n∞ clipped to the finite max"
    head = f"log2({labels[1]} / {labels[0]})" if difference == "ratio" else f"{labels[1]} − {labels[0]}"
    layout = Layout(label, title or f"{head}\n{settings_line(a)}",
                    figure_notes(results, [m for pair in pairs for m in pair], strip,
                                 f"{_CHANGE[difference]} = {_CHANGE_TEXT[difference]}".format(*labels)),
                    strip=strip, own_bars=own_bars, xlabel=xlabel(strip))
    return draw(panels, ncols, colormap(cmap, False), layout)


def _first_layer(results: Sequence[Result], row: Row):
    """The layer of the first result that has one in ``row`` (its stride sets 'stage' scales)."""
    index = next(k for k, name in enumerate(row) if name is not None)
    return results[index].layer(row[index])


def _one_sided(results: list[Result], labels: list[str], names: list[dict], row: Row,
               data: np.ndarray, xs, ys, position: tuple[int, int], scale) -> Panel:
    """The panel of a difference row that one result has no layer in: the other's layer named
    with its model, nothing drawn, a note that there is nothing to subtract."""
    index = 0 if row[0] is not None else 1
    name = row[index]
    info = results[index].layer(name)
    title = f"{names[index].get(name, name)} ({labels[index]})\n{info.module} · {stride_text(info)}"
    label = f"layer:{labels[0]}:{name}" if index == 0 else f"layer:{name}"
    return Panel(label, title, data, xs, ys, *position, scale, scaled=False, empty=True,
                 note=f"no partner in {labels[1 - index]}:\nnothing to subtract")


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
