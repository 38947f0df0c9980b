"""Building blocks of the figures in :mod:`shiftlab.figures.plots`: colour scales, ticks, text, layout.

Nothing here takes a :class:`~shiftlab.results.result.Result` apart beyond its provenance; ``plots``
decides what a panel shows, this module how it is drawn. The choice lists (``COLOR_RANGES``,
``DIFFERENCES``, ``SCALES``) live here once; ``shiftlab.figures.plots`` and the CLI take them from here.

>>> escape("cost $5")     # drawn literally, never parsed as mathtext
'cost \\\\$5'
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.transforms import blended_transform_factory

from ..checks import check_choice
from ..errors import UsageError

COLOR_RANGES = ("layer", "stage", "shared")
DEFAULT_COLOR_RANGE = "layer"
COLOR_RANGE_HELP = ("layer: each panel its own scale (its own small colour bar), so every layer's"
                    " stride pattern shows; stage: one scale per stride; shared: one scale for all"
                    " panels (the paper's), comparable across layers")
VMAX_HELP = ("top of the colour scale: auto (the largest value), pNN (the NN-th percentile of the"
             " plotted values, e.g. p99) or a number; larger values get the colour bar's arrow")
SCALES = ("linear", "log")
DIFFERENCES = ("diff", "ratio")
METRIC_LABELS = {
    "cosine": "cosine distance (0 = equivariant)",
    "l2": "relative L2 distance (0 = equivariant)",
    "psnr": "PSNR (dB, higher = more equivariant)",
}
HIGHER_IS_BETTER = {"psnr"}
FS_TITLE, FS_PANEL, FS_TICK, FS_NOTE = 9.0, 6.5, 5.5, 6.5
UNDEFINED = "grey = undefined (stride does not divide the shift)"
NO_VALUE = "grey = no value for this shift"
RANDOM_INIT = "random init"
INF_COLOUR, ZERO_COLOUR = "black", "white"

VmaxSpec = Union[str, float, int, None]


# -- text ------------------------------------------------------------------------------------
def escape(text: object) -> str:
    """``text`` as a string that matplotlib draws literally: every ``$`` escaped, so a module
    named ``$\\frac{a$`` is never parsed (and never crashes) as mathtext.

    >>> escape("cost $5")
    'cost \\\\$5'
    """
    return str(text).replace("$", r"\$")


def fmt(value: float) -> str:
    """A short number for titles: 3 significant digits, 1.2e-04 below 1e-3, ∞ for infinity."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0:
        return "0"
    return f"{value:.1e}" if abs(value) < 1e-3 else f"{value:.3g}"


def provenance_field(result, name: str, default=None):
    """``result.provenance.<name>`` when the result carries a typed provenance, else ``meta[name]``."""
    provenance = getattr(result, "provenance", None)
    value = getattr(provenance, name, None) if provenance is not None else None
    return value if value is not None else getattr(result, "meta", {}).get(name, default)


def is_random_init(result) -> bool:
    """True when the measured model had random weights (provenance/meta 'pretrained' False, or
    weights 'none' / 'random init')."""
    flag = getattr(getattr(result, "provenance", None), "random_init", None)
    if flag is not None:  # the typed provenance knows best (it also handles unknown weights)
        return bool(flag)
    pretrained = provenance_field(result, "pretrained")
    if pretrained is not None:
        return not bool(pretrained)
    return str(provenance_field(result, "weights", "")).lower() in ("none", RANDOM_INIT)


def weights_text(result) -> str:
    """'random init' for random weights, else the weights' name ('' when unknown)."""
    if is_random_init(result):
        return RANDOM_INIT
    weights = provenance_field(result, "weights")
    return "" if weights is None else str(weights)


def image_names(result) -> list[str]:
    """The measured images' file names (provenance or meta 'images'); [] when not recorded."""
    return [str(name) for name in (provenance_field(result, "images") or [])]


def fit(title: str, room: float, smallest: float = 5.0) -> tuple[str, float]:
    """Shrink a panel title to ``room`` inches: a smaller font, then '…' in the middle of long lines."""
    longest = max(len(line) for line in title.split("\n"))
    size = min(FS_PANEL, room * 72 / (0.58 * longest))
    if size >= smallest:
        return title, size
    keep = int(room * 72 / (0.58 * smallest))
    lines = [line if len(line) <= keep else f"{line[:keep // 2 - 1]}…{line[-(keep - keep // 2):]}"
             for line in title.split("\n")]
    return "\n".join(lines), smallest


# -- colour ------------------------------------------------------------------------------------
@dataclass
class Scale:
    """One colour scale: its norm and which ends the colour bar marks as exceeded."""

    norm: Normalize
    extend: str = "neither"


def parse_vmax(vmax: VmaxSpec) -> tuple[str, float]:
    """('auto', nan), ('percentile', q) or ('value', v) from 'auto' / None, 'p99' or a number."""
    if vmax is None or (isinstance(vmax, str) and vmax.strip().lower() == "auto"):
        return "auto", math.nan
    if isinstance(vmax, str):
        text = vmax.strip().lower()
        try:
            if text.startswith("p"):
                q = float(text[1:])
                if 0 < q <= 100:
                    return "percentile", q
                raise ValueError
            return "value", float(text)
        except ValueError:
            raise UsageError(f"cannot read vmax {vmax!r}; use auto, a percentile such as p99,"
                             " or a number") from None
    return "value", float(vmax)


def _top(values: np.ndarray, kind: str, number: float) -> float:
    if kind == "value":
        return number
    if not values.size:
        return 1.0
    return float(np.percentile(values, number)) if kind == "percentile" else float(values.max())


def _extend(values: np.ndarray, low: float, high: float, check_low: bool) -> str:
    over = bool(values.size) and float(values.max()) > high * (1 + 1e-9) + 1e-15
    under = check_low and bool(values.size) and float(values.min()) < low
    return {(True, True): "both", (True, False): "max", (False, True): "min"}.get((over, under), "neither")


def colour_scale(arrays: Sequence[np.ndarray], metric: str, scale: str = "linear",
                 vmin: Optional[float] = None, vmax: VmaxSpec = "auto") -> Scale:
    """One scale for ``arrays`` (their finite values; log scales use the positive ones).

    Example:
        >>> colour_scale([np.array([0.0, 0.5, 2.0])], "cosine", vmax=1.0).extend
        'max'
    """
    check_choice("scale", scale, SCALES)
    kind, number = parse_vmax(vmax)
    values = np.concatenate([np.ravel(a) for a in arrays]) if len(arrays) else np.array([])
    values = values[np.isfinite(values)]
    if scale == "log":
        values = values[values > 0]
        low = float(vmin) if vmin is not None else (float(values.min()) if values.size else 1e-9)
        if low <= 0:
            raise UsageError(f"a log colour scale needs vmin > 0, got {vmin}")
        high = _top(values, kind, number)
        if high <= low:
            _check_limits(vmin, kind)
            high = low * 10
        return Scale(LogNorm(vmin=low, vmax=high), _extend(values, low, high, vmin is not None))
    bottom = float(values.min()) if values.size else 0.0
    default_low = 0.0 if metric not in HIGHER_IS_BETTER and bottom >= 0 else bottom
    low = float(vmin) if vmin is not None else default_low
    high = _top(values, kind, number)
    if high <= low:
        _check_limits(vmin, kind)
        high = low + (abs(low) * 0.1 if low else 1.0)  # constant data: any scale above it
    return Scale(Normalize(vmin=low, vmax=high), _extend(values, low, high, vmin is not None))


def diverging_scale(arrays: Sequence[np.ndarray], vmax: VmaxSpec = "auto") -> Scale:
    """A scale centred at 0 from −L to L, L from the largest |value| (or its percentile, or vmax)."""
    kind, number = parse_vmax(vmax)
    values = np.concatenate([np.ravel(a) for a in arrays]) if len(arrays) else np.array([])
    size = np.abs(values[np.isfinite(values)])
    limit = _top(size, kind, number)
    if kind == "value" and limit <= 0:
        raise UsageError(f"a difference needs vmax > 0 (the scale is ±vmax), got {number:g}")
    limit = limit if limit > 0 else 1e-12  # no difference anywhere: any tiny symmetric scale
    return Scale(TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
                 "both" if size.size and size.max() > limit * (1 + 1e-9) else "neither")


def _check_limits(vmin: Optional[float], kind: str) -> None:
    """Raise when a user-given limit leaves an empty colour range (data-driven ones are widened)."""
    if vmin is not None or kind == "value":
        raise UsageError("colour limits must satisfy vmin < vmax (one may come from the data);"
                         " pass a vmax above vmin")


def colormap(cmap: Union[str, Colormap], reverse: bool) -> Colormap:
    try:
        chosen = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    except KeyError:
        raise UsageError(f"unknown colormap {cmap!r}; try viridis, magma or RdBu_r") from None
    if reverse:
        chosen = chosen.reversed()
    return chosen.with_extremes(bad=(0, 0, 0, 0))  # masked cells show the hatched background


# -- ticks ---------------------------------------------------------------------------------------
def tick_indices(values: Sequence[float], most: int = 5) -> list[int]:
    """Indices of ``values`` (evenly spaced shifts) to label: multiples of a round step (1, 2, 4,
    5, 8, 10, 16, 20, ... times the spacing), at most ``most`` of them, 0 always among them when
    present.

    >>> tick_indices(list(range(-8, 9)))
    [0, 4, 8, 12, 16]
    """
    values = [float(v) for v in values]
    if len(values) <= 1:
        return list(range(len(values)))
    unit = min(abs(b - a) for a, b in zip(values, values[1:]) if b != a) or 1.0
    for factor in (1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 256):
        step = unit * factor
        chosen = [i for i, v in enumerate(values) if abs(v / step - round(v / step)) < 1e-6]
        if len(chosen) <= most and chosen:
            return chosen
    return [values.index(min(values, key=abs))]


def special_cells(data: np.ndarray, metric: str, scale: str) -> tuple[np.ndarray, list[Special]]:
    """The data as drawn on the colour scale, and the cells that get a flat colour instead:
    +inf (identical maps for PSNR, an all-zero reference for l2) and, on a log scale, exact zeros."""
    inf = np.isinf(data)
    what = "∞ dB (identical maps)" if metric in HIGHER_IS_BETTER else "∞ (reference map all zero)"
    specials = [Special(inf, INF_COLOUR, what)]
    shown = np.where(inf, np.nan, data)
    if scale == "log":
        zero = np.isfinite(data) & (data <= 0)
        specials.append(Special(zero, ZERO_COLOUR, "exactly 0 (off the log scale)"))
        shown = np.where(zero, np.nan, shown)
    return shown, specials


def grid_columns(n: int, ncols: Optional[int], strip: bool) -> int:
    """Panels per row: ``ncols`` checked, else ceil(1.3·sqrt(n)) capped at 10 (5 strips)."""
    if ncols is not None:
        if int(ncols) < 1:
            raise UsageError(f"ncols must be >= 1, got {ncols}")
        return min(int(ncols), n)
    cap, factor = (5, 1 / 1.5) if strip else (10, 1.3)
    return max(1, min(n, cap, math.ceil(math.sqrt(n) * factor)))


# -- layout and drawing ----------------------------------------------------------------------------
@dataclass
class Special:
    """Cells drawn in one flat colour with a legend entry (PSNR's ∞, zeros on a log scale)."""

    mask: np.ndarray
    colour: str
    label: str


@dataclass
class Panel:
    """One heatmap: data (rows, cols) with NaN where undefined, x/y shift values (ys None for a
    strip), grid position, its colour scale and its special cells."""

    label: str
    title: str
    data: np.ndarray
    xs: list[float]
    ys: Optional[list[float]]
    row: int
    col: int
    scale: Scale
    specials: list[Special] = field(default_factory=list)


@dataclass
class _Box:
    """Sizes in inches."""

    panel_w: float
    panel_h: float
    title_h: float = 0.30
    hgap: float = 0.14
    vgap: float = 0.12
    tick_w: float = 0.30


def _box(strip: bool, shape: tuple[int, int], own_bars: bool) -> _Box:
    if strip:
        box = _Box(panel_w=1.9, panel_h=0.24, hgap=0.2, tick_w=0.1, vgap=0.26)
    else:
        rows, cols = shape
        side = 1.05
        box = _Box(panel_w=side * max(0.3, cols / max(rows, cols)),
                   panel_h=side * max(0.3, rows / max(rows, cols)))
    if own_bars:
        box.hgap += 0.42  # room for each panel's own colour bar and its tick labels
    return box


@dataclass
class Layout:
    """Everything around the panels: colour bar text, title, notes, row labels and separators."""

    cbar_label: str
    title: str
    notes: list[str]
    row_labels: dict[int, str] = field(default_factory=dict)
    separators: list[int] = field(default_factory=list)
    strip: bool = False
    own_bars: bool = False
    xlabel: str = "dw"
    ylabel: str = "dh"


def draw(panels: list[Panel], ncols: int, cmap: Colormap, layout: Layout) -> Figure:
    """Place ``panels`` on a grid of ``ncols`` columns with one colour bar on the right (the
    shared scale, or a key for per-panel scales when ``layout.own_bars``)."""
    strip = layout.strip
    box = _box(strip, panels[0].data.shape, layout.own_bars)
    nrows = max(p.row for p in panels) + 1
    label_w = max((len(t) for t in layout.row_labels.values()), default=0) * 7 * 0.6 / 72
    left = 0.3 + box.tick_w + (label_w + 0.12 if layout.row_labels else 0)
    area_w = ncols * box.panel_w + (ncols - 1) * box.hgap
    pitch = box.title_h + box.panel_h + box.vgap
    area_h = nrows * pitch - box.vgap
    bar_h = min(max(box.panel_h, area_h - box.title_h), 5.5)
    wrap = max(14, int(bar_h * 72 / (7.0 * 0.55)))
    bar_lines = [w for part in layout.cbar_label.split("\n") for w in textwrap.wrap(part, wrap)]
    right = 0.2 + 0.12 + 0.45 + 0.14 * len(bar_lines) + (box.hgap if layout.own_bars else 0)
    top = 0.15 + (layout.title.count("\n") + 1) * FS_TITLE * 1.35 / 72
    legend = _legend_items(panels, layout.notes)
    bottom = 0.42 + len(layout.notes) * 0.16 + (0.16 if legend else 0) + 0.05
    width, height = left + area_w + right, top + area_h + bottom
    fig = Figure(figsize=(width, height))
    frac = lambda x, y, w, h: [x / width, 1 - (y + h) / height, w / width, h / height]  # noqa: E731
    bottom_of_col: dict[int, int] = {}
    for p in panels:
        bottom_of_col[p.col] = max(bottom_of_col.get(p.col, -1), p.row)
    for p in panels:
        x = left + p.col * (box.panel_w + box.hgap)
        y = top + p.row * pitch + box.title_h
        ax = fig.add_axes(frac(x, y, box.panel_w, box.panel_h), label=p.label)
        show_x, show_y = bottom_of_col[p.col] == p.row, p.col == 0 and not strip
        _heatmap(ax, p, cmap, show_x, show_y, room=box.panel_w + 0.8 * box.hgap)
        if show_x:
            ax.set_xlabel(escape(layout.xlabel), fontsize=FS_TICK + 0.5, labelpad=1)
        if show_y:
            ax.set_ylabel(escape(layout.ylabel), fontsize=FS_TICK + 0.5, labelpad=1)
        if layout.own_bars:
            cax = fig.add_axes(frac(x + box.panel_w + 0.04, y, 0.05, box.panel_h), label=f"colorbar:{p.label}")
            bar = fig.colorbar(ScalarMappable(norm=p.scale.norm, cmap=cmap), cax=cax, extend=p.scale.extend,
                               extendfrac=0.12)
            bar.minorticks_off()  # a log bar would label its minor ticks too
            bar.set_ticks([p.scale.norm.vmin, p.scale.norm.vmax])
            bar.set_ticklabels([fmt(p.scale.norm.vmin), fmt(p.scale.norm.vmax)])
            bar.ax.tick_params(labelsize=FS_TICK - 1, length=1, width=0.3, pad=1)
            bar.outline.set_linewidth(0.3)
    for row, text in layout.row_labels.items():
        y = top + row * pitch + box.title_h + box.panel_h / 2
        fig.text((left - box.tick_w - 0.2) / width, 1 - y / height, escape(text), ha="right", va="center",
                 fontsize=7, fontweight="bold")
    for row in layout.separators:
        y = 1 - (top + row * pitch - box.vgap / 2) / height
        fig.add_artist(Line2D([0.1 / width, (left + area_w) / width], [y, y], lw=0.6, color="0.75",
                              transform=fig.transFigure))
    key_x = left + area_w + 0.2 + (box.hgap if layout.own_bars else 0)  # clear of the last panel's bar
    cax = fig.add_axes(frac(key_x, top + box.title_h, 0.12, bar_h), label="colorbar")
    if layout.own_bars:  # a key only: where each panel's own range sits on the colormap
        bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
        bar.set_ticks([0, 1])
        bar.set_ticklabels(["panel\nlow", "panel\nhigh"])
    else:
        shared = panels[0].scale
        bar = fig.colorbar(ScalarMappable(norm=shared.norm, cmap=cmap), cax=cax, extend=shared.extend)
    bar.set_label("\n".join(escape(line) for line in bar_lines), fontsize=7)
    bar.ax.tick_params(labelsize=6)
    bar.outline.set_linewidth(0.4)
    fig.suptitle(escape(layout.title), x=left / width, y=1 - 0.1 / height, ha="left", va="top",
                 fontsize=FS_TITLE)
    _notes(fig, layout.notes, legend, left / width, bottom, height)
    return fig


def _legend_items(panels: list[Panel], notes: list[str]) -> list[Patch]:
    items = [Patch(facecolor="0.86", edgecolor="0.55", hatch="////", lw=0.4, label=note)
             for note in notes if note in (UNDEFINED, NO_VALUE)]
    seen: dict[str, str] = {}
    for p in panels:
        for special in p.specials:
            if special.mask.any():
                seen.setdefault(special.label, special.colour)
    items += [Patch(facecolor=colour, edgecolor="0.3", lw=0.4, label=escape(label))
              for label, colour in seen.items()]
    return items


def _notes(fig: Figure, notes: list[str], legend: list[Patch], x: float, bottom: float,
           height: float) -> None:
    y = bottom - 0.42
    for note in notes:
        if note not in (UNDEFINED, NO_VALUE):
            fig.text(x, (y - 0.1) / height, escape(note), fontsize=FS_NOTE, color="0.3", va="center")
            y -= 0.16
    if legend:
        fig.legend(handles=legend, loc="center left", bbox_to_anchor=(x - 0.01, (y - 0.1) / height),
                   frameon=False, fontsize=FS_NOTE, handlelength=1.6, handleheight=0.9, borderpad=0,
                   borderaxespad=0, ncols=len(legend), columnspacing=1.2)


def _heatmap(ax, panel: Panel, cmap: Colormap, show_x: bool, show_y: bool, room: float) -> None:
    rows, cols = panel.data.shape
    norm = panel.scale.norm
    sns.heatmap(panel.data, ax=ax, cmap=cmap, norm=norm, vmin=norm.vmin, vmax=norm.vmax, cbar=False,
                xticklabels=False, yticklabels=False, rasterized=True)
    ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="0.86", edgecolor="0.55", hatch="////",
                           lw=0, zorder=0.5))
    for special in panel.specials:
        if special.mask.any():
            ax.pcolormesh(np.ma.masked_where(~special.mask, np.ones(special.mask.shape)),
                          cmap=ListedColormap([special.colour]), vmin=0, vmax=1, rasterized=True)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.4)
        spine.set_color("0.45")
    title, size = fit(escape(panel.title), room)
    ax.set_title(title, fontsize=size, pad=2, linespacing=1.1)
    xticks = tick_indices(panel.xs)
    ax.set_xticks([i + 0.5 for i in xticks])
    ax.set_xticklabels([f"{panel.xs[i]:g}" for i in xticks] if show_x else [])
    if panel.ys is None:
        ax.set_yticks([])
    else:
        yticks = tick_indices(panel.ys)
        ax.set_yticks([i + 0.5 for i in yticks])
        ax.set_yticklabels([f"{panel.ys[i]:g}" for i in yticks] if show_y else [], rotation=0)
    ax.tick_params(labelsize=FS_TICK, length=1.5, width=0.4, pad=1)


def mark_strides(ax, marks: dict, spans: dict, n_results: int, colours, length: int) -> None:
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


RATIO_COLOURS = ("#3b0a45", "#0b5d1e")  # baseline exactly 0 / other exactly 0: outside any log
#: distances at or below this are rounding, not aliasing: the ratio map shows them as equivariant
RATIO_FLOOR = 1e-6


def difference_map(pa: np.ndarray, pb: np.ndarray, labels: list[str], difference: str,
                   pairs: list) -> tuple[np.ndarray, list[Special]]:
    """The drawn map of ``difference_grid``: b − a ('diff', ±inf clipped to the finite range of
    all pairs) or log2(b / a) ('ratio', with cells where one side is equivariant marked)."""
    if difference == "diff":
        values = np.concatenate([np.ravel(m) for pair in pairs for m in pair])
        finite = values[np.isfinite(values)]
        top, bottom = (float(finite.max()), float(finite.min())) if finite.size else (1.0, 0.0)
        clip = lambda m: np.where(np.isposinf(m), top, np.where(np.isneginf(m), bottom, m))  # noqa: E731
        return clip(pb) - clip(pa), []
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log2(pb / pa)
    # distances at float32 rounding level are "equivariant", not numbers to take a ratio of:
    # 1e-9 / 1e-12 would read log2 = 10 and set the colour scale for every panel
    zero_a, zero_b = pa <= RATIO_FLOOR, pb <= RATIO_FLOOR
    both_zero = zero_a & zero_b
    only_b, only_a = zero_a & (pb > RATIO_FLOOR), (pa > RATIO_FLOOR) & zero_b
    ratio = np.where(both_zero, 0.0, np.where(only_a | only_b, np.nan, ratio))
    return ratio, [Special(only_b, RATIO_COLOURS[0], f"{labels[0]} ≤ {RATIO_FLOOR:g} (equivariant),"
                                                     f" {labels[1]} above"),
                   Special(only_a, RATIO_COLOURS[1], f"{labels[1]} ≤ {RATIO_FLOOR:g} (equivariant),"
                                                     f" {labels[0]} above")]
