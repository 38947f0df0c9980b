"""What a figure reports for one layer: its μ, or why it has none.

A layer × shift cell is either measured or undefined (NaN). The identity shift (0, 0) is 0 by
construction and carries no information, so a layer whose only defined cell is (0, 0) (a
stride-4 layer on a 0..3 grid under exact alignment) has no μ: its panel says why, a profile
leaves a gap there, never a 0. Everything else about μ is ``Result.layer_mean``'s rule. A
panel's title line (:func:`stats_text`) and its note (:func:`panel_note`: undefined, or one value
everywhere) come from here too.

A stride-4 pool under exact alignment on a 0..3 grid: only (0, 0) is defined.

>>> import math
>>> import numpy as np
>>> from shiftlab.equivariance.geometry import LayerInfo
>>> from shiftlab.equivariance.shifts import ShiftGrid
>>> from shiftlab.results.result import Result, Settings
>>> grid = ShiftGrid.square(4)
>>> pool = LayerInfo("pool", "MaxPool2d", "spatial", (4.0, 4.0), (4.0, 4.0), (8, 4, 4))
>>> mean = np.full((1, 16), math.nan)
>>> mean[0, 0] = 0.0                                  # shift (0, 0)
>>> result = Result(Settings(grid, align="exact"), [pool], mean, np.zeros_like(mean),
...                 (~np.isnan(mean)).astype(int), np.zeros((1, 16)), np.zeros((1, 16)))
>>> print(undefined_reason(result, "pool"))
undefined: no shift except (0, 0)
is defined at stride 4
>>> layer_value(result, "pool")
nan
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..equivariance.geometry import LayerInfo
from ..results.result import Result
from .panels import HIGHER_IS_BETTER, fmt
from .views import stride_text

#: the shift that is 0 by construction: it never makes a layer "defined"
IDENTITY = (0.0, 0.0)


def undefined_reason(result: Result, name: str) -> Optional[str]:
    """None when layer ``name`` has a value at some shift other than (0, 0); else the two-line
    text its panel shows instead of a colour scale."""
    values = result.values(name)
    other = np.array([tuple(map(float, s)) != IDENTITY for s in result.grid.shifts], dtype=bool)
    if (~np.isnan(values[other])).any():
        return None
    head = "undefined: no shift except (0, 0)" if (~other).any() else "undefined: no shift"
    info = result.layer(name)
    if result.settings.align == "exact" and info.is_spatial:
        return f"{head}\nis defined at stride {stride_text(info)[2:]}"
    return f"{head}\nhas a value"


def layer_value(result: Result, name: str) -> float:
    """μ of layer ``name`` as the figures show it: ``Result.layer_mean``, NaN when the layer is
    undefined (:func:`undefined_reason`); for PSNR, +inf when every defined shift gave
    identical maps (there is no finite value to average)."""
    if undefined_reason(result, name) is not None:
        return math.nan
    value = result.layer_mean(name)
    if result.settings.metric in HIGHER_IS_BETTER and not math.isfinite(value):
        values = result.values(name)
        finite = values[np.isfinite(values)]
        if finite.size:
            return float(finite.mean())
        return math.inf if np.isposinf(values).any() else math.nan
    return value


def panel_note(result: Result, name: str, values: np.ndarray, own_bars: bool) -> tuple[Optional[str], bool]:
    """(note, scaled) of a layer's panel: why it is undefined (no colour scale), or '0 everywhere'
    when every defined cell holds one value (on a colour scale only when that scale is shared,
    where the value has a place), else (None, True)."""
    reason = undefined_reason(result, name)
    if reason is not None:
        return reason, False
    return constant_note(values, own_bars)


def constant_note(values: np.ndarray, own_bars: bool) -> tuple[Optional[str], bool]:
    """('<value> everywhere', scaled) when every defined cell of ``values`` is one value, else
    (None, True); such a panel is on a colour scale only when that scale is shared."""
    defined = values[~np.isnan(values)]
    if defined.size and bool(np.all(defined == defined.flat[0])):
        return f"{fmt(float(defined.flat[0]))} everywhere", not own_bars
    return None, True


def stats_text(info: LayerInfo, summary: float, name: str = "μ") -> str:
    """'Conv2d · s=2 · μ=0.0123'; without the value where there is none (an undefined layer).

    >>> stats_text(LayerInfo("p", "MaxPool2d", "spatial", (2.0, 2.0), (2.0, 2.0), (4, 8, 8)), 0.0123)
    'MaxPool2d · s=2 · μ=0.0123'
    """
    head = f"{info.module} · {stride_text(info)}"
    return head if math.isnan(summary) else f"{head} · {name}={fmt(summary)}"
