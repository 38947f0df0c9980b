"""Figures only: take Results, return matplotlib Figures (nothing is measured here).

Every function builds a standalone :class:`matplotlib.figure.Figure` (not registered with
pyplot, so nothing leaks and nothing pops up); display it in a notebook or write it with
:func:`save_figure`. Axes carry labels so code can find them: ``'layer:<name>'`` for a
heatmap panel (``'layer:<label>:<name>'`` in :func:`compare_grid`), ``'colorbar'`` for the
colour bar, ``'profile'`` for the line plot.

>>> fig = layer_grid(shiftlab.load("runs/vgg16/result.npz"))     # doctest: +SKIP
>>> save_figure(fig, "runs/vgg16/layers")                         # doctest: +SKIP
[PosixPath('runs/vgg16/layers.png'), PosixPath('runs/vgg16/layers.pdf')]

Summary values: a panel's ``μ`` and the profile's y value are ``Result.layer_mean`` (mean over
the shifts where the layer is defined). For PSNR, whose identical maps give +inf (always at
shift (0, 0)), they are the mean over the finite shifts instead.
"""
from __future__ import annotations


import math
import os
import textwrap
import warnings
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from .errors import SettingsMismatchError, UsageError
from .geometry import LayerInfo
from .matching import (Results, as_results, check_comparable, match_layers, resolve_matching,
                       result_labels, weights_label)
from .files import atomic_write
from .result import Result
from .shifts import ShiftGrid


_METRIC_LABELS = {
    "cosine": "cosine distance (0 = equivariant)",
    "l2": "relative L2 distance (0 = equivariant)",
    "psnr": "PSNR (dB, higher = more equivariant)",
}
_HIGHER_IS_BETTER = {"psnr"}
_FS_TITLE, _FS_PANEL, _FS_TICK, _FS_NOTE = 9.0, 6.5, 5.5, 6.5
_UNDEFINED = "grey = undefined (stride does not divide the shift)"
_NO_VALUE = "grey = no value for this shift"


# -- public API ------------------------------------------------------------------------
def layer_grid(result: Result, layers: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
               scale: str = "linear", vmin: Optional[float] = None, vmax: Optional[float] = None,
               cmap: Union[str, Colormap] = "viridis", title: Optional[str] = None,
               spatial_only: bool = False, group_by_block: bool = False) -> Figure:
    """One small heatmap per layer of distance over input shift, on one shared colour scale.

    Rows of a panel are dh, columns dw (``result.grid.dh_values`` / ``dw_values``); a diagonal
    grid is drawn as one strip per layer (x = t). Panels follow network order and wrap into
    rows; undefined cells (``exact`` alignment where the stride does not divide the shift) are
    hatched grey, never zero.

    Args:
        result: a measurement.
        layers: layer names or glob patterns (``'features.*'``); shown in network order.
        ncols: panels per row; default ceil(1.3·sqrt(n)) capped at 10 (5 for diagonal strips).
        scale: 'linear' (cosine/l2 start at 0) or 'log' (LogNorm from the smallest positive
            value; zeros are drawn at that value).
        vmin, vmax: colour limits; default the data's finite range.
        cmap: colormap; reversed for PSNR so that equivariant is the same colour for every metric.
        title: figure title; default model, weights and settings.
        spatial_only: leave out global layers.
        group_by_block: start a row at each block (the name up to its last '.': 'features',
            'layer1.0'), labelled on the left; a block one level inside the previous one
            ('layer1.0.downsample') stays in its row; panel titles show the name inside the block.

    Returns:
        The Figure.

    Example:
        >>> fig = layer_grid(result, layers=["features.*"], scale="log")   # doctest: +SKIP
    """
    infos = _select(result, layers, spatial_only)
    strip = _is_strip(result.grid)
    metric = result.settings.metric
    images = [_image(result, info.name) for info in infos]
    norm, display, has_inf = _colour_scale([i[0] for i in images], metric, scale, vmin, vmax)
    blocks = _blocks([info.name for info in infos]) if group_by_block else [None] * len(infos)
    longest = max(blocks.count(b) for b in set(blocks)) if group_by_block else len(infos)
    ncols = _ncols(len(infos), ncols, strip) if ncols is not None else min(_ncols(len(infos), None, strip), longest)
    panels, row_labels, separators = [], {}, []
    row, col, previous = -1, ncols, None
    for info, data, (_, xs, ys), block in zip(infos, display, images, blocks):
        if col >= ncols or block != previous:
            row, col = row + 1, 0
            if block != previous:
                row_labels[row] = block or "(top level)"
                if previous is not None:
                    separators.append(row)
        previous = block
        name = info.name[len(block) + 1:] if block else info.name
        text = f"{name}\n{_stride_text(info)} · μ={_fmt(_summary(result, info.name))}"
        panels.append(_Panel(f"layer:{info.name}", text, data, xs, ys, row, col))
        col += 1
    label = _colour_label(metric, scale, has_inf)
    return _draw(panels, ncols, norm, _colormap(cmap, metric in _HIGHER_IS_BETTER), label,
                 title or _default_title(result), _notes(result, display, strip), row_labels,
                 separators, strip)


def layer_profile(results: Results, labels: Optional[Sequence[str]] = None, scale: str = "linear",
                  by: str = "auto", title: Optional[str] = None,
                  check_settings: bool = True) -> Figure:
    """Mean distance per layer against depth, one line per result.

    Layers are matched by name when the results share them (see :func:`match_layers`): then
    every result is drawn at the same x and the ticks name the layers. Otherwise each result
    is drawn at its own index in network order (no layer dropped) and the ticks are indices.
    A dotted vertical line with 's=2', 's=4', ... marks where the stride changes; global
    layers are hollow diamonds on a grey band. Zero means vanish on a log axis.

    Example:
        >>> fig = layer_profile([vgg, vgg_aa], labels=["VGG16", "VGG16-AA"])   # doctest: +SKIP
    """
    results = as_results(results)
    labels = result_labels(results, labels)
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    mode = resolve_matching(results, by)
    if mode == "name":
        rows = match_layers(results, by="name")
        columns = [[row[i] for row in rows] for i in range(len(results))]
    else:
        columns = [r.layer_names for r in results]
    length = max(len(c) for c in columns)
    fig = Figure(figsize=(min(16.0, max(6.0, 0.14 * length + 2.5)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    ax.set_label("profile")
    colours = sns.color_palette("deep", len(results))
    marks: dict[tuple[float, str], list[int]] = {}
    spans: dict[tuple[float, float], list[int]] = {}
    for i, (result, names, label) in enumerate(zip(results, columns, labels)):
        x = np.arange(len(names))
        y = np.array([_summary(result, n) for n in names], dtype=float)
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color=colours[i], label=label)
        glob = np.array([not result.layer(n).is_spatial for n in names], dtype=bool)
        if glob.any():
            ax.plot(x[glob], y[glob], ls="none", marker="D", ms=4.5, mfc="white",
                    mec=colours[i], mew=1.0, label="_nolegend_", zorder=3)
        changes, runs = _stride_changes([result.layer(n) for n in names])
        for position, text in changes:
            marks.setdefault((position, text), []).append(i)
        for run in runs:
            spans.setdefault(run, []).append(i)
    _mark_strides(ax, marks, spans, len(results), colours, length)
    if scale == "log":
        shown = np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)
        with warnings.catch_warnings():  # matplotlib warns when no value is positive
            warnings.filterwarnings("ignore", "Data has no positive values")
            ax.set_yscale("log")
        if not (shown > 0).any():  # a perfectly equivariant network: nothing above 0 to draw
            ax.set_ylim(1e-9, 1.0)
            ax.text(0.5, 0.5, "every mean is 0: nothing to show on a log axis", transform=ax.transAxes,
                    ha="center", fontsize=8, color="0.35")
    elif scale != "linear":
        raise UsageError(f"unknown scale {scale!r}; use linear or log")
    step = max(1, math.ceil(length / 40))
    ticks = np.arange(0, length, step)
    ax.set_xticks(ticks)
    if mode == "name":
        ax.set_xticklabels([columns[0][t] for t in ticks], rotation=90, fontsize=6)
        ax.set_xlabel("layer (network order)", fontsize=8)
    else:
        ax.set_xticklabels([str(t) for t in ticks], fontsize=6)
        ax.set_xlabel("layer index in each network (matched by depth: names differ)", fontsize=8)
    ax.set_xlim(-0.7, length - 0.3)
    ax.set_ylabel(f"mean over shifts:\n{_METRIC_LABELS.get(metric, metric)}", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", lw=0.4, color="0.88")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False, loc="best")
    fig.suptitle(title or f"Per-layer mean distance\n{_settings_line(results[0])}", fontsize=_FS_TITLE)
    return fig


def compare_grid(results: Sequence[Result], labels: Optional[Sequence[str]] = None,
                 ncols: Optional[int] = None, scale: str = "linear", vmin: Optional[float] = None,
                 vmax: Optional[float] = None, cmap: Union[str, Colormap] = "viridis",
                 title: Optional[str] = None, by: str = "auto",
                 check_settings: bool = True) -> Figure:
    """Heatmaps of 2+ results side by side on one shared colour scale.

    Matched layers (:func:`match_layers`) run left to right and wrap into bands; inside a band
    each result is one row (labelled on the left), so the same layer of every result is
    stacked in one column.

    Raises:
        SettingsMismatchError: the results were measured differently (``check_settings=False``
            plots them anyway, but the metric must always agree).

    Example:
        >>> fig = compare_grid([vgg, vgg_aa], labels=["VGG16", "VGG16-AA"])   # doctest: +SKIP
    """
    results = as_results(results)
    if len(results) < 2:
        raise UsageError("compare_grid needs two or more results; use layer_grid for one")
    labels = result_labels(results, labels)
    metric = check_comparable(results, labels, check_settings, same_grid=False)
    rows = match_layers(results, by=by)
    strip = _is_strip(results[0].grid)
    if any(_is_strip(r.grid) != strip for r in results):
        raise SettingsMismatchError("a diagonal grid and a 2-D grid cannot share one layout;"
                                    " compare results measured on the same kind of grid")
    arrays = [[_image(r, row[i])[0] for i, r in enumerate(results)] for row in rows]
    norm, flat, has_inf = _colour_scale([a for group in arrays for a in group], metric, scale, vmin, vmax)
    count = len(results)
    ncols = min(_ncols(len(rows) * count, ncols, strip), len(rows))
    panels, row_labels, separators = [], {}, []
    for index, row in enumerate(rows):
        band, col = divmod(index, ncols)
        for i, (result, label, name) in enumerate(zip(results, labels, row)):
            grid_row = band * count + i
            row_labels[grid_row] = label
            if i == 0 and band > 0 and col == 0:
                separators.append(grid_row)
            stats = f"{_stride_text(result.layer(name))} · μ={_fmt(_summary(result, name))}"
            text = f"{name}\n{stats}" if i == 0 or name != row[0] else stats
            _, xs, ys = _image(result, name)
            panels.append(_Panel(f"layer:{label}:{name}", text, flat[index * count + i], xs, ys,
                                 grid_row, col))
    notes = _notes(results[0], flat, strip)
    return _draw(panels, ncols, norm, _colormap(cmap, metric in _HIGHER_IS_BETTER),
                 _colour_label(metric, scale, has_inf),
                 title or f"{' vs '.join(labels)}\n{_settings_line(results[0])}", notes,
                 row_labels, separators, strip)


def difference_grid(a: Result, b: Result, labels: Optional[Sequence[str]] = None,
                    ncols: Optional[int] = None, vmax: Optional[float] = None,
                    cmap: Union[str, Colormap] = "RdBu_r", title: Optional[str] = None,
                    by: str = "auto", check_settings: bool = True) -> Figure:
    """b − a per matched layer and shift, on a diverging scale centred at 0 (±``vmax``).

    For distances (cosine, l2) a negative value means b is more equivariant there; for PSNR a
    positive one does — the colour bar says which. +inf values (PSNR of identical maps) are
    clipped to the finite maximum of both results before subtracting.

    Example:
        >>> fig = difference_grid(vgg, vgg_aa, labels=["VGG16", "VGG16-AA"])   # doctest: +SKIP
    """
    results = [a, b]
    labels = result_labels(results, labels)
    metric = check_comparable(results, labels, check_settings, same_grid=True)
    rows = match_layers(results, by=by)
    strip = _is_strip(a.grid)
    pairs = [(_image(a, na)[0], _image(b, nb)[0]) for na, nb in rows]
    _, clipped, has_inf = _colour_scale([m for pair in pairs for m in pair], metric, "linear", None, None)
    diffs = [clipped[2 * k + 1] - clipped[2 * k] for k in range(len(rows))]
    finite = np.concatenate([d[np.isfinite(d)] for d in diffs]) if diffs else np.array([])
    limit = float(vmax) if vmax is not None else (float(np.abs(finite).max()) if finite.size else 0.0)
    if limit <= 0 and vmax is not None:
        raise UsageError(f"difference_grid needs vmax > 0 (the scale is ±vmax), got {vmax}")
    limit = limit if limit > 0 else 1e-12  # no difference anywhere: any tiny symmetric scale
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    ncols = _ncols(len(rows), ncols, strip)
    panels = []
    for k, ((na, nb), data) in enumerate(zip(rows, diffs)):
        name = na if na == nb else f"{na}→{nb}"
        sa, sb = _stride_text(a.layer(na)), _stride_text(b.layer(nb))
        stride = sa if sa == sb else f"{sa}→{sb}"
        delta = _summary(b, nb) - _summary(a, na)
        _, xs, ys = _image(b, nb)
        panels.append(_Panel(f"layer:{nb}", f"{name}\n{stride} · Δμ={_fmt(delta)}", data, xs, ys,
                             *divmod(k, ncols)))
    better = "> 0" if metric in _HIGHER_IS_BETTER else "< 0"
    label = (f"{labels[1]} − {labels[0]} ({metric})\n{better}: {labels[1]} more equivariant"
             + ("\n∞ clipped to the finite max" if has_inf else ""))
    return _draw(panels, ncols, norm, _colormap(cmap, False), label,
                 title or f"{labels[1]} − {labels[0]}\n{_settings_line(a)}",
                 _notes(a, diffs, strip, "Δμ = change of μ"), {}, [], strip)


def save_figure(fig: Figure, path_stem: Union[str, os.PathLike], formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``<path_stem>.<format>`` for each format atomically (temp file, then rename).

    The figure stays open; close it when done. Returns the written paths in ``formats`` order.

    Example:
        >>> save_figure(fig, "runs/vgg16/layers", formats=("png",))   # doctest: +SKIP
        [PosixPath('runs/vgg16/layers.png')]
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise UsageError("save_figure needs at least one format, e.g. ('png', 'pdf')")
    supported = fig.canvas.get_supported_filetypes()
    paths = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in supported:
            raise UsageError(f"cannot save a figure as {fmt!r}; use one of {', '.join(sorted(supported))}")
        path = Path(f"{os.fspath(path_stem)}.{fmt}")
        atomic_write(path, lambda handle, fmt=fmt: fig.savefig(
            handle, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.08))
        paths.append(path)
    return paths


# -- selection ------------------------------------------------------------------------------
def _select(result: Result, layers: Optional[Sequence[str]], spatial_only: bool) -> list[LayerInfo]:
    as_results(result)
    infos = list(result.layers)
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        for pattern in patterns:
            if not any(fnmatchcase(i.name, pattern) for i in infos):
                raise UsageError(f"no layer matches {pattern!r}; see result.layer_names")
        infos = [i for i in infos if any(fnmatchcase(i.name, p) for p in patterns)]
    if spatial_only:
        infos = [i for i in infos if i.is_spatial]
    if not infos:
        raise UsageError("no layers left to plot (spatial_only drops global layers)")
    return infos


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


def _summary(result: Result, name: str) -> float:
    value = result.layer_mean(name)
    if result.settings.metric in _HIGHER_IS_BETTER and value == math.inf:
        finite = result.values(name)[np.isfinite(result.values(name))]
        return float(finite.mean()) if finite.size else math.inf
    return value


def _blocks(names: list[str]) -> list[str]:
    """Each layer's block: its name up to the last '.' ('layer1.0' for 'layer1.0.relu#2', '' for
    'fc'), except that a block one level inside the previous layer's ('layer1.0.downsample'
    after 'layer1.0') stays in it."""
    out: list[str] = []
    for name in names:
        block = name.split("#")[0].split("[")[0].rpartition(".")[0]
        if out and out[-1] and block.startswith(f"{out[-1]}.") and "." not in block[len(out[-1]) + 1:]:
            block = out[-1]
        out.append(block)
    return out


def _stride_text(info: LayerInfo) -> str:
    if not info.is_spatial:
        return "global"
    sh, sw = info.stride
    if not (math.isfinite(sh) and math.isfinite(sw)):
        return "s=?"
    one = lambda s: f"1/{round(1 / s)}" if 0 < s < 1 else f"{s:g}"  # noqa: E731
    return f"s={one(sh)}" if sh == sw else f"s={one(sh)}×{one(sw)}"


def _stride_changes(infos: list[LayerInfo]) -> tuple[list[tuple[float, str]], list[tuple[float, float]]]:
    """(x, 's=2') where the stride differs from the previous spatial layer's; (x0, x1) global runs."""
    marks, spans, previous, start = [], [], "s=1", None
    for x, info in enumerate(infos + [None]):
        if info is not None and not info.is_spatial:
            start = x if start is None else start
            continue
        if start is not None:
            spans.append((start - 0.5, x - 0.5))
            start = None
        if info is not None and _stride_text(info) != previous:
            previous = _stride_text(info)
            marks.append((x - 0.5, previous))
    return marks, spans


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    return f"{value:.1e}" if abs(value) < 1e-3 else f"{value:.3g}"


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
    return (f"{s.metric} · {mode} shifts · {s.align} alignment · {grid_text} · image {s.size[0]}×{s.size[1]}"
            f" · {result.meta.get('n_images', '?')} images{border}")


def _default_title(result: Result) -> str:
    model = result.meta.get("model") or "model"
    weights = weights_label(result)
    head = f"{model} ({weights})" if weights else str(model)
    return f"Per-layer shift-equivariance: {head}\n{_settings_line(result)}"


def _notes(result: Result, arrays: Sequence[np.ndarray], strip: bool,
           summary: str = "μ = mean over defined shifts") -> list[str]:
    axes = "x = diagonal shift t = dh = dw" if strip else "rows = dh, columns = dw"
    notes = [f"Each panel: {axes} (input shift, px); title: layer · stride · {summary}"]
    if result.settings.metric in _HIGHER_IS_BETTER:
        notes[0] += " (finite ones for PSNR)"
    if any(np.isnan(a).any() for a in arrays):
        notes.append(_UNDEFINED if result.settings.align == "exact" else _NO_VALUE)
    return notes


# -- colour --------------------------------------------------------------------------------
def _colour_scale(arrays: Sequence[np.ndarray], metric: str, scale: str, vmin: Optional[float],
                  vmax: Optional[float]) -> tuple[Normalize, list[np.ndarray], bool]:
    """One norm for all arrays, the arrays as drawn (±inf clipped, log zeros lifted), has_inf."""
    if scale not in ("linear", "log"):
        raise UsageError(f"unknown scale {scale!r}; use linear or log")
    values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.array([])
    finite = values[np.isfinite(values)]
    has_inf = bool(np.isinf(values).any())
    top = float(finite.max()) if finite.size else 1.0
    bottom = float(finite.min()) if finite.size else 0.0
    shown = [np.where(np.isposinf(a), top, np.where(np.isneginf(a), bottom, a)) for a in arrays]
    if scale == "log":
        positive = finite[finite > 0]
        low = float(vmin) if vmin is not None else (float(positive.min()) if positive.size else 1e-9)
        high = float(vmax) if vmax is not None else (float(positive.max()) if positive.size else 1.0)
        if low <= 0:
            raise UsageError(f"a log colour scale needs vmin > 0, got {vmin}")
        if high <= low:
            _check_limits(vmin, vmax)
            high = low * 10
        shown = [np.where(np.isfinite(a) & (a < low), low, a) for a in shown]
        return LogNorm(vmin=low, vmax=high), shown, has_inf
    default_low = 0.0 if metric not in _HIGHER_IS_BETTER and bottom >= 0 else bottom
    low = float(vmin) if vmin is not None else default_low
    high = float(vmax) if vmax is not None else top
    if high <= low:
        _check_limits(vmin, vmax)
        high = low + (abs(low) * 0.1 if low else 1.0)  # constant data: any scale above it
    return Normalize(vmin=low, vmax=high), shown, has_inf


def _check_limits(vmin: Optional[float], vmax: Optional[float]) -> None:
    """Raise when a user-given limit leaves an empty colour range (data-driven ones are widened)."""
    if vmin is not None or vmax is not None:
        raise UsageError(f"colour limits must satisfy vmin < vmax (given vmin={vmin}, vmax={vmax},"
                         " the other from the data); pass both or neither")


def _colormap(cmap: Union[str, Colormap], reverse: bool) -> Colormap:
    try:
        colormap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    except KeyError:
        raise UsageError(f"unknown colormap {cmap!r}; try viridis, magma or RdBu_r") from None
    if reverse:
        colormap = colormap.reversed()
    return colormap.with_extremes(bad=(0, 0, 0, 0))  # masked cells show the hatched background


def _colour_label(metric: str, scale: str, has_inf: bool) -> str:
    label = _METRIC_LABELS.get(metric, metric)
    if scale == "log":
        label += ", log scale"
    if has_inf:
        label += "; ∞ (identical maps) shown as the finite max" if metric in _HIGHER_IS_BETTER \
            else "; ∞ shown as the finite max"
    return label


def _ncols(n: int, ncols: Optional[int], strip: bool) -> int:
    if ncols is not None:
        if int(ncols) < 1:
            raise UsageError(f"ncols must be >= 1, got {ncols}")
        return min(int(ncols), n)
    cap, factor = (5, 1 / 1.5) if strip else (10, 1.3)
    return max(1, min(n, cap, math.ceil(math.sqrt(n) * factor)))


# -- layout and drawing --------------------------------------------------------------------
@dataclass
class _Panel:
    label: str
    title: str
    data: np.ndarray
    xs: list[float]
    ys: Optional[list[float]]
    row: int
    col: int


@dataclass
class _Box:
    """Sizes in inches."""

    panel_w: float
    panel_h: float
    title_h: float = 0.30
    hgap: float = 0.14
    vgap: float = 0.12
    tick_w: float = 0.30


def _box(strip: bool, shape: tuple[int, int]) -> _Box:
    if strip:
        return _Box(panel_w=1.9, panel_h=0.24, hgap=0.2, tick_w=0.1, vgap=0.16)
    rows, cols = shape
    side = 1.05
    return _Box(panel_w=side * max(0.3, cols / max(rows, cols)),
                panel_h=side * max(0.3, rows / max(rows, cols)))


def _draw(panels: list[_Panel], ncols: int, norm: Normalize, cmap: Colormap, cbar_label: str,
          title: str, notes: list[str], row_labels: dict[int, str], separators: list[int],
          strip: bool) -> Figure:
    box = _box(strip, panels[0].data.shape)
    nrows = max(p.row for p in panels) + 1
    label_w = max((len(t) for t in row_labels.values()), default=0) * 7 * 0.6 / 72
    left = 0.15 + box.tick_w + (label_w + 0.12 if row_labels else 0)
    area_w = ncols * box.panel_w + (ncols - 1) * box.hgap
    pitch = box.title_h + box.panel_h + box.vgap
    area_h = nrows * pitch - box.vgap
    bar_h = min(max(box.panel_h, area_h - box.title_h), 5.5)
    wrap = max(14, int(bar_h * 72 / (7.0 * 0.55)))
    bar_lines = textwrap.wrap(cbar_label, wrap, break_on_hyphens=False) if "\n" not in cbar_label \
        else [w for part in cbar_label.split("\n") for w in textwrap.wrap(part, wrap)]
    right = 0.2 + 0.12 + 0.45 + 0.14 * len(bar_lines)
    title_lines = title.count("\n") + 1
    top = 0.15 + title_lines * _FS_TITLE * 1.35 / 72
    bottom = 0.22 + len(notes) * 0.16 + 0.05
    width, height = left + area_w + right, top + area_h + bottom
    fig = Figure(figsize=(width, height))
    frac = lambda x, y, w, h: [x / width, 1 - (y + h) / height, w / width, h / height]  # noqa: E731
    bottom_of_col = {}
    for p in panels:
        bottom_of_col[p.col] = max(bottom_of_col.get(p.col, -1), p.row)
    for p in panels:
        x = left + p.col * (box.panel_w + box.hgap)
        y = top + p.row * pitch + box.title_h
        ax = fig.add_axes(frac(x, y, box.panel_w, box.panel_h), label=p.label)
        _heatmap(ax, p, norm, cmap, show_x=bottom_of_col[p.col] == p.row, show_y=p.col == 0 and not strip,
                 room=box.panel_w + 0.8 * box.hgap)
    for row, text in row_labels.items():
        y = top + row * pitch + box.title_h + box.panel_h / 2
        fig.text((left - box.tick_w - 0.08) / width, 1 - y / height, text, ha="right", va="center",
                 fontsize=7, fontweight="bold")
    for row in separators:
        y = 1 - (top + row * pitch - box.vgap / 2) / height
        fig.add_artist(Line2D([0.1 / width, (left + area_w) / width], [y, y], lw=0.6, color="0.75",
                              transform=fig.transFigure))
    bar_top = top + box.title_h
    cax = fig.add_axes(frac(left + area_w + 0.2, bar_top, 0.12, bar_h), label="colorbar")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("\n".join(bar_lines), fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.outline.set_linewidth(0.4)
    fig.suptitle(title, x=left / width, y=1 - 0.1 / height, ha="left", va="top", fontsize=_FS_TITLE)
    note_y = bottom - 0.22
    for k, note in enumerate(notes):
        y = (note_y - 0.16 * k - 0.1) / height
        if note in (_UNDEFINED, _NO_VALUE):
            fig.legend(handles=[Patch(facecolor="0.86", edgecolor="0.55", hatch="////", lw=0.4,
                                      label=note)],
                       loc="center left", bbox_to_anchor=(left / width - 0.01, y), frameon=False,
                       fontsize=_FS_NOTE, handlelength=1.6, handleheight=0.9, borderpad=0, borderaxespad=0)
        else:
            fig.text(left / width, y, note, fontsize=_FS_NOTE, color="0.3", va="center")
    return fig


def _heatmap(ax, panel: _Panel, norm: Normalize, cmap: Colormap, show_x: bool, show_y: bool,
             room: float) -> None:
    rows, cols = panel.data.shape
    sns.heatmap(panel.data, ax=ax, cmap=cmap, norm=norm, vmin=norm.vmin, vmax=norm.vmax, cbar=False,
                xticklabels=False, yticklabels=False, rasterized=True)
    ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="0.86", edgecolor="0.55", hatch="////",
                           lw=0, zorder=0.5))
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.4)
        spine.set_color("0.45")
    title, size = _fit(panel.title, room)
    ax.set_title(title, fontsize=size, pad=2, linespacing=1.1)
    ax.set_xticks([0.5, cols - 0.5] if cols > 1 else [0.5])
    ax.set_xticklabels([f"{panel.xs[0]:g}", f"{panel.xs[-1]:g}"][: len(ax.get_xticks())] if show_x else [])
    if panel.ys is None:
        ax.set_yticks([])
    else:
        ax.set_yticks([0.5, rows - 0.5] if rows > 1 else [0.5])
        ax.set_yticklabels([f"{panel.ys[0]:g}", f"{panel.ys[-1]:g}"][: len(ax.get_yticks())] if show_y else [],
                           rotation=0)
    ax.tick_params(labelsize=_FS_TICK, length=1.5, width=0.4, pad=1)


def _fit(title: str, room: float, smallest: float = 5.0) -> tuple[str, float]:
    """Shrink a panel title to ``room`` inches: a smaller font, then '…' in the middle of long lines."""
    longest = max(len(line) for line in title.split("\n"))
    size = min(_FS_PANEL, room * 72 / (0.58 * longest))
    if size >= smallest:
        return title, size
    keep = int(room * 72 / (0.58 * smallest))
    lines = [line if len(line) <= keep else f"{line[:keep // 2 - 1]}…{line[-(keep - keep // 2):]}"
             for line in title.split("\n")]
    return "\n".join(lines), smallest


def _mark_strides(ax, marks: dict, spans: dict, n_results: int, colours, length: int) -> None:
    """Dotted lines with 's=2', 's=4', ... where the stride changes; grey bands over global runs.

    Labels closer than 1/20 of the axis to the previous one on the same level drop a level.
    """
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    labels = []
    for (x, text), owners in marks.items():
        colour = "0.45" if len(owners) == n_results else colours[owners[0]]
        ax.axvline(x, ls=":", lw=0.9, color=colour, zorder=1)
        labels.append((x, text, colour, "normal"))
    for (x0, x1), owners in spans.items():
        shared = len(owners) == n_results
        ax.axvspan(x0, x1, color="0.92" if shared else colours[owners[0]], alpha=1 if shared else 0.1,
                   zorder=0, lw=0)
        labels.append((x0, "global", "0.35" if shared else colours[owners[0]], "italic"))
    last: list[float] = []
    for x, text, colour, style in sorted(labels, key=lambda item: item[0]):
        level = next((k for k, end in enumerate(last) if x - end > length / 20), len(last))
        last[level:level + 1] = [x]
        ax.text(x + 0.1, 1.01 + 0.055 * level, text, transform=trans, fontsize=6.5, color=colour,
                va="bottom", ha="left", fontstyle=style, clip_on=False)


def probability_plot(results, labels: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
                     title: Optional[str] = None) -> Figure:
    """Probability of the unshifted image's top class along the diagonal sweep, one panel per model.

    Takes one or more :class:`shiftlab.invariance.InvarianceResult`. Each image is a thin line,
    the mean over images a thick black line; a panel's title gives the model, its flip rate and
    MAC (mean absolute change between consecutive steps). Panels share the y axis (0..1) and are
    labelled ``'probability:<label>'``.

    Example:
        >>> fig = probability_plot([base, antialiased], labels=["resnet18", "resnet18+aa4"])   # doctest: +SKIP
    """
    from .invariance import InvarianceResult

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
    ncols = _ncols(len(items), ncols, strip=False) if ncols is not None else min(len(items), 3)
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(3.6 * ncols + 0.4, 2.7 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    # 0..1 for trained models; zoomed in when every probability is small (random weights)
    highest = max(float(np.nanmax(r.diagonal_prob, initial=0.0)) for r in items)
    top = 1.02 if highest > 0.5 else max(1.15 * highest, 1e-3)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    for k, (ax, result, label) in enumerate(zip(axes.flat, items, labels)):
        ax.set_label(f"probability:{label}")
        steps = result.diagonal_steps
        colours = sns.color_palette("husl", max(1, result.n_images))
        for i, curve in enumerate(result.diagonal_prob):
            ax.plot(steps, curve, lw=0.7, alpha=0.55, color=colours[i])
        ax.plot(steps, result.mean_probability, lw=2.4, color="black", label="mean over images")
        ax.set_title(f"{label}\nflip rate {_fmt(result.flip_rate)} · MAC {_fmt(result.mac)}",
                     fontsize=8)
        ax.set_ylim(0.0, top)
        ax.grid(lw=0.4, color="0.9")
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        diagonal = all(dh == dw for dh, dw in result.settings.diagonal.shifts)
        if k // ncols == nrows - 1 or k + ncols >= len(items):
            ax.set_xlabel("diagonal shift t (px), δ = (t, t)" if diagonal else "sweep step",
                          fontsize=8)
        if k % ncols == 0:
            ax.set_ylabel("P(top class of the\nunshifted image)", fontsize=8)
        if k == 0:
            ax.legend(fontsize=7, frameon=False, loc="best")
    first = items[0]
    n = first.n_images
    settings = (f"{first.settings.mode} shifts, {first.settings.size[0]} px, {n} image"
                f"{'s' if n != 1 else ''}; thin lines: one image each")
    fig.suptitle(title or f"Top-class probability along the diagonal\n{settings}",
                 fontsize=_FS_TITLE)
    return fig
