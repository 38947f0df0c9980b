"""Building blocks of the figures in :mod:`shiftlab.figures.plots`: colour scales, ticks, text.

Nothing here takes a :class:`~shiftlab.results.result.Result` apart beyond its provenance; ``plots``
decides what a panel shows, :mod:`shiftlab.figures.drawing` how it is drawn. The choice lists (``COLOR_RANGES``,
``DIFFERENCES``, ``SCALES``) live here once; ``shiftlab.figures.plots`` and the CLI take them from here.

>>> escape("cost $5")     # drawn literally, never parsed as mathtext
'cost \\\\$5'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import matplotlib
import numpy as np
from matplotlib.colors import Colormap, LogNorm, Normalize, TwoSlopeNorm

from ..checks import check_choice
from ..errors import UsageError

COLOR_RANGES = ("layer", "stage", "shared")
DEFAULT_COLOR_RANGE = "layer"
COLOR_RANGE_HELP = ("How the heatmap panels share colour scales. layer (the default): each panel"
                    " its own scale and colour bar, so every layer's stride pattern shows; stage:"
                    " one scale per stride; shared: one scale and one colour bar for all panels"
                    " (the paper's), comparable across layers. A panel that is one value"
                    " everywhere ('0 everywhere') or undefined gets no bar of its own. compare's"
                    " difference figure always uses one symmetric scale.")
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
FS_TITLE, FS_PANEL, FS_TICK, FS_NOTE = 9.0, 7.0, 6.0, 7.0
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


#: where a title line may break: after ' · ' and ' → ' first, then inside a module path
_BREAKS = ("·→", "._/")


def wrap_title(title: str, room: float, size: Optional[float] = None) -> str:
    """``title`` broken into lines that fit ``room`` inches at ``size`` pt, every character kept.

    Lines break after ' · ' and '→'; a part still too long, in a first line (the layer's name),
    then breaks after '.', '_' or '/'; what is still too long is cut into line-long chunks,
    never shortened.

    >>> print(wrap_title("backbone.body.stage4.block12.proj\\nConv2d · s=16 · μ=0.0123", 1.0))
    backbone.body.
    stage4.block12.
    proj
    Conv2d · s=16 ·
    μ=0.0123
    >>> print(wrap_title("features.10→features.13", 1.0))
    features.10→
    features.13
    """
    size = FS_PANEL if size is None else size
    width = max(8, int(room * 72 / (0.56 * size)))
    lines: list[str] = []
    for number, line in enumerate(title.split("\n")):
        lines += _wrap(line, width, _BREAKS if number == 0 else _BREAKS[:1])
    return "\n".join(lines)


def _wrap(text: str, width: int, breaks: Sequence[str]) -> list[str]:
    if len(text) <= width:
        return [text]
    if not breaks:  # no place left to break: line-long chunks
        return [text[i:i + width] for i in range(0, len(text), width)]
    lines: list[str] = []
    for line in _pack(_pieces(text, breaks[0]), width):
        lines += _wrap(line, width, breaks[1:])
    return lines


def _pieces(line: str, separators: str) -> list[str]:
    """``line`` cut after each separator (and the space after a '·' or '→')."""
    pieces, current = [], ""
    for k, char in enumerate(line):
        current += char
        if char in separators and not (char in "·→" and line[k + 1:k + 2] == " "):
            pieces.append(current)
            current = ""
        elif char == " " and k > 0 and line[k - 1] in "·→":
            pieces.append(current)
            current = ""
    return pieces + ([current] if current else [])


def _pack(pieces: list[str], width: int) -> list[str]:
    """Pieces joined greedily into lines of at most ``width`` (a longer piece stays whole)."""
    lines, current = [], ""
    for piece in pieces:
        if current and len((current + piece).rstrip()) > width:
            lines.append(current.rstrip())
            current = ""
        current += piece
    return lines + ([current.rstrip()] if current.strip() or not lines else [])


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


# -- cells drawn apart ------------------------------------------------------------------------
@dataclass
class Special:
    """Cells drawn in one flat colour with a legend entry (PSNR's ∞, zeros on a log scale)."""

    mask: np.ndarray
    colour: str
    label: str


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
