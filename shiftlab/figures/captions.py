"""The words around a figure: its title, the settings line, the notes under the panels, the
axis and colour-bar labels, and the 'random init' mark of a label.

>>> import numpy as np
>>> from shiftlab.equivariance.geometry import LayerInfo
>>> from shiftlab.equivariance.shifts import ShiftGrid
>>> from shiftlab.results.provenance import Provenance
>>> from shiftlab.results.result import Result, Settings
>>> conv = LayerInfo("conv", "Conv2d", "spatial", (1.0, 1.0), (1.0, 1.0), (4, 8, 8))
>>> mean = np.zeros((1, 4))
>>> result = Result(Settings(ShiftGrid.square(2), size=(32, 32)), [conv], mean, mean, mean + 1,
...                 mean, mean, provenance=Provenance(model="tiny", weights="none"))
>>> print(default_title(result))
Per-layer shift-equivariance: tiny (random init)
cosine · circular shifts · bilinear alignment · square grid 2×2 (4 shifts) · image 32×32 · 0 images
>>> random_mark("tiny", result)
'tiny (random init)'
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..results.result import Result
from .maps import is_strip
from .panels import (HIGHER_IS_BETTER, METRIC_LABELS, NO_VALUE, RANDOM_INIT, UNDEFINED, is_random_init,
                     weights_text)

#: what a panel's μ is, as the notes under a grid say it
MU_NOTE = "μ = mean over the defined shifts but (0, 0)"


def settings_line(result: Result) -> str:
    """One line of the settings every figure names: metric, mode, alignment, grid, image size."""
    s, grid = result.settings, result.grid
    if is_strip(grid):
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


def default_title(result: Result) -> str:
    """'Per-layer shift-equivariance: <model> (<weights>)' over the settings line."""
    model = result.meta.get("model") or "model"
    weights = weights_text(result)
    head = f"{model} ({weights})" if weights else str(model)
    return f"Per-layer shift-equivariance: {head}\n{settings_line(result)}"


def random_mark(label: str, result) -> str:
    """``label`` with '(random init)' added for a random-weights model, unless it says so."""
    return f"{label} ({RANDOM_INIT})" if is_random_init(result) and RANDOM_INIT not in label else label


def figure_notes(results: Sequence[Result], arrays: Sequence[np.ndarray], strip: bool,
                 summary: str = MU_NOTE) -> list[str]:
    """The notes under a grid: how to read a panel, 'random init', and the hatched-cell key when
    any drawn array has an undefined (NaN) cell."""
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


def xlabel(strip: bool) -> str:
    """The x axis of a panel: 't (dh = dw)' for a strip, else 'dw'."""
    return "t (dh = dw)" if strip else "dw"


def colour_label(metric: str, scale: str) -> str:
    """What the colour shows: the metric's label, ', log scale' added on a log scale."""
    return METRIC_LABELS.get(metric, metric) + (", log scale" if scale == "log" else "")
