"""How a run's figures are drawn and saved: one frozen object, validated once when built.

The CLI builds it from ``--scale --color-range --vmax --view --title --format --dpi``; the
report writers pass its fields by name to the plotting functions.

>>> options = FigureOptions(view="paper", formats=("png",))
>>> options.color_range, options.dpi
('layer', 150)
>>> FigureOptions(vmax="p101")
Traceback (most recent call last):
...
shiftlab.errors.UsageError: cannot read vmax 'p101'; use auto, a percentile such as p99, or a number
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..checks import check_choice
from ..defaults import FIGURE_FORMATS
from ..errors import UsageError
from .panels import COLOR_RANGES, DEFAULT_COLOR_RANGE, SCALES, parse_vmax
from .views import DEFAULT_VIEW, VIEWS

#: the resolutions a PNG may be saved at
DPI_RANGE = (30, 1200)
#: what one heatmap panel costs to draw (s), to save in one format (s), and in memory at
#: 150 dpi (MB, growing with dpi squared): measured on a 2-core CPU with a 100- and a 200-layer
#: grid, PNG and PDF alike (docs/performance.md, "Figures")
PANEL_DRAW_S, PANEL_SAVE_S, PANEL_MB_AT_150 = 0.07, 0.04, 1.4


@dataclass(frozen=True)
class FigureOptions:
    """Colour scale, colour range, top of the scale, view, title, formats and resolution.

    ``vmax``: 'auto', a percentile ('p99') or a number; ``color_range``: 'layer' (each panel
    its own), 'stage' (one per stride) or 'shared' (the paper's).
    """

    scale: str = "linear"
    color_range: str = DEFAULT_COLOR_RANGE
    vmax: str = "auto"
    view: str = DEFAULT_VIEW
    title: Optional[str] = None
    formats: tuple[str, ...] = ("png", "pdf")
    dpi: int = 150

    def __post_init__(self) -> None:
        check_choice("scale", self.scale, SCALES)
        check_choice("color range", self.color_range, COLOR_RANGES)
        parse_vmax(self.vmax)  # a bad value fails here, before any measurement
        check_choice("view", self.view, VIEWS)
        object.__setattr__(self, "formats", tuple(self.formats))
        for fmt in self.formats:
            check_choice("figure format", fmt, FIGURE_FORMATS)
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int) or \
                not DPI_RANGE[0] <= self.dpi <= DPI_RANGE[1]:
            raise UsageError(f"dpi must be a whole number in {DPI_RANGE[0]}..{DPI_RANGE[1]},"
                             f" got {self.dpi!r}")

    def cost(self, panels: int) -> str:
        """What a layer grid of ``panels`` panels costs to draw and save in every format.

        >>> FigureOptions(formats=("png", "pdf")).cost(100)
        'a layer grid of 100 panels in png, pdf at 150 dpi: about 15 s and 140 MB'
        """
        seconds = panels * (PANEL_DRAW_S + PANEL_SAVE_S * len(self.formats))
        megabytes = panels * PANEL_MB_AT_150 * (self.dpi / 150) ** 2
        return (f"a layer grid of {panels} panels in {', '.join(self.formats)} at {self.dpi} dpi:"
                f" about {seconds:.0f} s and {megabytes:.0f} MB")
