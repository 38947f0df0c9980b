"""How a grid of heatmap panels is drawn: layout, cells, colour bars, notes and stride labels.

The figures (:mod:`shiftlab.figures.plots`, :mod:`shiftlab.figures.compare`) decide what each
:class:`Panel` shows; this module places and draws them. Cells and colour-bar gradients are
images (``AxesImage``/``BboxImage``), never rasterized meshes: a vector backend embeds an
image at its own size, whereas matplotlib's mixed-mode renderer draws every ``rasterized=True``
artist through a bitmap of the whole figure and keeps each one until the file is written (a
100-layer PDF took 5.5 GB that way). Text, ticks, spines and hatching stay vectors.

>>> import numpy as np
>>> from matplotlib import colormaps
>>> from matplotlib.colors import Normalize
>>> panel = Panel("layer:a", "a\\nConv2d · s=1 · μ=0.5", np.array([[0.0, 1.0], [0.5, 0.25]]),
...               [0, 1], [0, 1], 0, 0, Scale(Normalize(0, 1)))
>>> fig = draw([panel], 1, colormaps["viridis"], Layout("distance", "title", []))
>>> [ax.get_label() for ax in fig.axes]
['layer:a', 'colorbar']
>>> [text.get_text() for text in fig.axes[1].get_yticklabels()]
['0', '0.5', '1']
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.image import BboxImage
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory, offset_copy

from .panels import (FS_NOTE, FS_PANEL, FS_TICK, FS_TITLE, NO_VALUE, UNDEFINED, Scale, Special,
                     escape, tick_indices, wrap_title)

FS_BAR = 6.0  # tick labels of every colour bar, the panels' own included
#: what a colour bar labels: at least 3 and at most 5 round values
BAR_TICKS = (3, 5)
#: the colour of cells on no colour scale (a panel that is one value everywhere, or undefined)
FLAT_CELL = "white"
COLOUR_LABEL = "colour-label"  # gid of the quantity's label when every panel has its own bar


@dataclass
class Panel:
    """One heatmap: data (rows, cols) with NaN where undefined, x/y shift values (ys None for a
    strip), grid position, its colour scale and its special cells.

    ``note`` is written across the panel ('0 everywhere', 'undefined: ...'); a panel that is not
    ``scaled`` draws its defined cells plain white and gets no colour bar of its own. An
    ``empty`` panel holds no layer (a model without a partner for another model's layer): no
    cells, no hatching and no ticks, a dashed frame around its note.
    """

    label: str
    title: str
    data: np.ndarray
    xs: list[float]
    ys: Optional[list[float]]
    row: int
    col: int
    scale: Scale
    specials: list[Special] = field(default_factory=list)
    note: Optional[str] = None
    scaled: bool = True
    empty: bool = False


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


@dataclass
class _Box:
    """Sizes in inches."""

    panel_w: float
    panel_h: float
    title_h: float = 0.30
    hgap: float = 0.28
    vgap: float = 0.12
    tick_w: float = 0.30


def _box(strip: bool, shape: tuple[int, int], own_bars: bool) -> _Box:
    if strip:  # a panel's own bar needs the height for 3 labels
        box = _Box(panel_w=1.9, panel_h=0.42 if own_bars else 0.24, hgap=0.2, tick_w=0.1, vgap=0.26)
    else:
        rows, cols = shape
        side = 1.1
        box = _Box(panel_w=side * max(0.3, cols / max(rows, cols)),
                   panel_h=side * max(0.3, rows / max(rows, cols)))
    if own_bars:
        box.hgap += 0.42  # room for each panel's own colour bar and its tick labels
    return box


def bar_ticks(norm: Normalize, most: int = BAR_TICKS[1]) -> list[float]:
    """3 to 5 round values inside the norm's range for its colour bar: powers of ten (and 2 and
    5 times them) on a log bar spanning a decade or more, else evenly spaced round values.

    >>> bar_ticks(Normalize(0, 0.0186))
    [0.0, 0.005, 0.01, 0.015]
    >>> bar_ticks(LogNorm(1e-4, 0.3))
    [0.0001, 0.001, 0.01, 0.1]
    >>> bar_ticks(LogNorm(0.05, 0.18))      # less than a decade: no crowding at the top
    [0.05, 0.1, 0.15]
    """
    low, high = float(norm.vmin), float(norm.vmax)
    fewest = min(BAR_TICKS[0], most)
    if isinstance(norm, LogNorm) and high >= 10 * low:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        inside = lambda ticks: [float(f"{t:.3g}") for t in ticks  # noqa: E731
                                if low * (1 - 1e-9) <= t <= high * (1 + 1e-9)]
        for steps in ((1, 2, 5), (1,)):
            ticks = inside(m * 10.0 ** k for k in decades for m in steps)
            if fewest <= len(ticks) <= most:
                return ticks
        return ticks[::math.ceil(len(ticks) / most)]  # many decades: every n-th power of ten
    locator = MaxNLocator(nbins=most - 1, steps=[1, 2, 5, 10], min_n_ticks=fewest,
                          symmetric=isinstance(norm, TwoSlopeNorm))
    span = (high - low) * 1e-9
    ticks = [float(f"{t:.6g}") for t in locator.tick_values(low, high)
             if low - span <= t <= high + span and (t > 0 or not isinstance(norm, LogNorm))]
    return [0.0 if t == 0 else t for t in ticks]  # no '-0'


def tick_text(value: float) -> str:
    """A colour-bar label: 3 significant digits, '2e-5' rather than '2e-05', '0' for 0.

    >>> [tick_text(v) for v in (0.0, 0.005, 12.5, 2e-05, -0.25)]
    ['0', '0.005', '12.5', '2e−5', '−0.25']
    """
    if value == 0:
        return "0"
    text = f"{value:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text.replace("-", "−")


def colour_bar(fig: Figure, cax, norm: Normalize, cmap: Colormap, extend: str = "neither",
               **kwargs):
    """A colour bar in ``cax`` with :func:`bar_ticks` labelled, its colours one image."""
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, extend=extend, **kwargs)
    # matplotlib draws the colours as a mesh that it rasterizes (a figure-sized bitmap in a PDF);
    # the same colours as one small image cost a few kB
    bar.solids.set_visible(False)
    bar.solids.set_rasterized(False)
    steps = np.linspace(0, 1, cmap.N)[:, None]
    gradient = BboxImage(cax.bbox, cmap=cmap, norm=Normalize(0, 1), interpolation="nearest",
                         origin="lower", zorder=bar.solids.get_zorder())
    gradient.set_data(steps)
    cax.add_artist(gradient)
    bar.minorticks_off()
    height = cax.get_position().height * fig.get_figheight() * 72  # points
    ticks = bar_ticks(norm, max(2, min(BAR_TICKS[1], int(height / (2 * FS_BAR)) + 1)))
    bar.set_ticks(ticks, labels=[tick_text(t) for t in ticks])
    bar.ax.tick_params(labelsize=FS_BAR, length=2, width=0.4, pad=1.5)
    bar.outline.set_linewidth(0.4)
    return bar


def draw(panels: list[Panel], ncols: int, cmap: Colormap, layout: Layout) -> Figure:
    """Place ``panels`` on a grid of ``ncols`` columns: with ``layout.own_bars`` each scaled panel
    has its own colour bar and the quantity is named on the right, else one shared bar there."""
    strip = layout.strip
    box = _box(strip, panels[0].data.shape, layout.own_bars)
    titles = [wrap_title(escape(p.title), box.panel_w + 0.8 * box.hgap) for p in panels]
    box.title_h = 0.08 + max(t.count("\n") + 1 for t in titles) * FS_PANEL * 1.2 / 72
    nrows = max(p.row for p in panels) + 1
    label_w = max((len(t) for t in layout.row_labels.values()), default=0) * 7 * 0.6 / 72
    left = 0.3 + box.tick_w + (label_w + 0.12 if layout.row_labels else 0)
    area_w = ncols * box.panel_w + (ncols - 1) * box.hgap
    pitch = box.title_h + box.panel_h + box.vgap
    area_h = nrows * pitch - box.vgap
    bar_h = min(max(box.panel_h, area_h - box.title_h), 5.5)
    label_size = 8.0 if layout.own_bars else 7.0
    wrap = max(14, int(bar_h * 72 / (label_size * 0.55)))
    bar_lines = [w for part in layout.cbar_label.split("\n") for w in textwrap.wrap(part, wrap)]
    key_w = 0.12 + 0.45 if not layout.own_bars else 0.0
    right = 0.2 + key_w + 0.15 * len(bar_lines) + (0.55 if layout.own_bars else 0)
    top = 0.15 + (layout.title.count("\n") + 1) * FS_TITLE * 1.35 / 72
    legend = _legend_items(panels, layout.notes)
    bottom = 0.42 + len(layout.notes) * 0.16 + (0.16 if legend else 0) + 0.05
    width, height = left + area_w + right, top + area_h + bottom
    fig = Figure(figsize=(width, height))
    frac = lambda x, y, w, h: [x / width, 1 - (y + h) / height, w / width, h / height]  # noqa: E731
    bottom_of_col: dict[int, int] = {}
    for p in panels:  # the lowest panel with cells labels its column's x ticks
        if not p.empty:
            bottom_of_col[p.col] = max(bottom_of_col.get(p.col, -1), p.row)
    for p, title in zip(panels, titles):
        x = left + p.col * (box.panel_w + box.hgap)
        y = top + p.row * pitch + box.title_h
        ax = fig.add_axes(frac(x, y, box.panel_w, box.panel_h), label=p.label)
        show_x = not p.empty and bottom_of_col.get(p.col) == p.row
        show_y = not p.empty and p.col == 0 and not strip
        if p.empty:
            _empty(ax, p, title, strip, box.panel_w)
        else:
            _heatmap(ax, p, cmap, show_x, show_y, title, strip, box.panel_w)
        if show_x:
            ax.set_xlabel(escape(layout.xlabel), fontsize=FS_TICK + 0.5, labelpad=1)
        if show_y:
            ax.set_ylabel(escape(layout.ylabel), fontsize=FS_TICK + 0.5, labelpad=1)
        if layout.own_bars and p.scaled and not p.empty:
            cax = fig.add_axes(frac(x + box.panel_w + 0.04, y, 0.06, box.panel_h),
                               label=f"colorbar:{p.label}")
            colour_bar(fig, cax, p.scale.norm, cmap, p.scale.extend, extendfrac=0.12)
    for row, text in layout.row_labels.items():
        y = top + row * pitch + box.title_h + box.panel_h / 2
        fig.text((left - box.tick_w - 0.2) / width, 1 - y / height, escape(text), ha="right", va="center",
                 fontsize=7, fontweight="bold")
    for row in layout.separators:
        y = 1 - (top + row * pitch - box.vgap / 2) / height
        fig.add_artist(Line2D([0.1 / width, (left + area_w) / width], [y, y], lw=0.6, color="0.75",
                              transform=fig.transFigure))
    key_x = left + area_w + (0.55 if layout.own_bars else 0.2)  # clear of the last panel's bar
    label = "\n".join(escape(line) for line in bar_lines)
    if layout.own_bars:  # each panel has its numbers on its own bar: name the quantity once
        fig.text(key_x / width, 1 - (top + box.title_h + bar_h / 2) / height, label, rotation=90,
                 ha="left", va="center", fontsize=label_size, gid=COLOUR_LABEL, linespacing=1.3)
    else:
        cax = fig.add_axes(frac(key_x, top + box.title_h, 0.12, bar_h), label="colorbar")
        shared = panels[0].scale
        bar = colour_bar(fig, cax, shared.norm, cmap, shared.extend)
        bar.set_label(label, fontsize=label_size)
        bar.ax.tick_params(labelsize=7)
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


def _cells(ax, data: np.ndarray, cmap: Colormap, norm: Normalize, zorder: float):
    """``data`` (rows, cols) as one image: cell (i, j) covers x j..j+1, y i..i+1, row 0 on top;
    NaN and masked cells transparent."""
    rows, cols = data.shape
    return ax.imshow(np.ma.masked_invalid(data), cmap=cmap, norm=norm, extent=(0, cols, rows, 0),
                     origin="upper", aspect="auto", interpolation="nearest", zorder=zorder)


def _heatmap(ax, panel: Panel, cmap: Colormap, show_x: bool, show_y: bool, title: str,
             strip: bool, width: float) -> None:
    rows, cols = panel.data.shape
    if panel.scaled:
        _cells(ax, panel.data, cmap, panel.scale.norm, zorder=1)
    else:  # no colour scale: defined cells plain, the note says what they hold
        defined = np.where(np.isnan(panel.data), np.nan, 0.0)
        _cells(ax, defined, ListedColormap([FLAT_CELL]), Normalize(0, 1), zorder=1)
    ax.add_patch(Rectangle((0, 0), cols, rows, facecolor="0.86", edgecolor="0.55", hatch="////",
                           lw=0, zorder=0.5))
    for special in panel.specials:
        if special.mask.any():
            _cells(ax, np.where(special.mask, 1.0, np.nan), ListedColormap([special.colour]),
                   Normalize(0, 1), zorder=1.1)
    if panel.note:
        _write_note(ax, panel.note, strip, width)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.4)
        spine.set_color("0.45")
    ax.set_title(title, fontsize=FS_PANEL, pad=2, linespacing=1.1)
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


def _write_note(ax, note: str, strip: bool, width: float, colour: str = "0.15") -> None:
    size = FS_TICK if strip else FS_NOTE
    ax.text(0.5, 0.5, _fill(note, width - 0.1, size), transform=ax.transAxes, ha="center",
            va="center", fontsize=size, color=colour, zorder=3, linespacing=1.15,
            bbox=dict(facecolor="white", edgecolor="0.7", lw=0.4, alpha=0.9, pad=1.5))


def _empty(ax, panel: Panel, title: str, strip: bool, width: float) -> None:
    """A panel without a layer: a light dashed frame, its note, its title; nothing to read off."""
    rows, cols = panel.data.shape
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_linewidth(0.6)
        spine.set_color("0.7")
        spine.set_linestyle((0, (3, 2)))
    ax.set_xticks([])
    ax.set_yticks([])
    if panel.note:
        _write_note(ax, panel.note, strip, width, colour="0.35")
    ax.set_title(title, fontsize=FS_PANEL, pad=2, linespacing=1.1, color="0.35")


def _fill(note: str, room: float, size: float) -> str:
    """A panel's note wrapped to ``room`` inches, '(0, 0)' kept on one line.

    >>> print(_fill("undefined: no shift except (0, 0)\\nis defined at stride 4", 1.0, 7))
    undefined: no shift
    except (0, 0) is
    defined at stride 4
    """
    width = max(8, int(room * 72 / (0.56 * size)))
    words = escape(" ".join(note.split())).replace(", ", ",\u00a0")
    return "\n".join(textwrap.wrap(words, width, break_on_hyphens=False)).replace("\u00a0", " ")


STRIDE_FONT = 6.5  # pt, the 's=2' / 'global' labels above a profile


def mark_strides(ax, marks: dict, spans: dict, n_results: int, colours, length: int) -> None:
    """Dotted lines with 's=2', 's=4', ... where the stride changes; grey bands over global runs.

    A label that would overlap the previous one on its level (their widths estimated from the
    figure's width) goes one level up.
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
    axes_inches = max(1.0, ax.figure.get_figwidth() - 1.4)  # less the y label and margins
    per_char = 0.62 * STRIDE_FONT / 72 * max(length, 1) / axes_inches  # x units per character
    ends: list[float] = []
    for x, text, colour, style in sorted(labels, key=lambda item: item[0]):
        start = x + 0.1
        level = next((k for k, end in enumerate(ends) if start > end), len(ends))
        ends[level:level + 1] = [start + (len(text) + 1) * per_char]
        raised = offset_copy(trans, ax.figure, y=1.8 * STRIDE_FONT * level, units="points")
        ax.text(start, 1.01, text, transform=raised, fontsize=STRIDE_FONT, color=colour,
                va="bottom", ha="left", fontstyle=style, clip_on=False)
