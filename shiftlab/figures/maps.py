"""A layer's values as a panel draws them, and which panels share a colour scale.

A 2-D shift grid gives each layer a (dh, dw) map; a diagonal grid (or any grid whose shifts
all have dh = dw) gives a one-row strip over t. Every grid figure of
:mod:`shiftlab.figures` takes its panels' data from :func:`layer_image` and groups their colour
scales with :func:`range_keys` and :func:`shared_scales`.

>>> from shiftlab.equivariance.shifts import ShiftGrid
>>> is_strip(ShiftGrid.square(4)), is_strip(ShiftGrid.diagonal(4))
(False, True)
>>> shared_scales(["a", "b", "c"], [0, 1, 0], lambda group: "+".join(group))
['a+c', 'b', 'a+c']
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

import numpy as np

from ..checks import check_choice
from ..equivariance.geometry import LayerInfo
from ..equivariance.shifts import ShiftGrid
from ..errors import SettingsMismatchError
from ..results.result import Result
from .panels import COLOR_RANGES
from .views import stride_text

T = TypeVar("T")
S = TypeVar("S")


def is_strip(grid: ShiftGrid) -> bool:
    """True when the grid's panels are strips over t (a diagonal grid, or dh = dw everywhere)."""
    return grid.kind == "diagonal" or (len(grid) > 1 and all(dh == dw for dh, dw in grid.shifts))


def check_strips(results: Sequence[Result]) -> bool:
    """Whether the results' panels are strips; a ``SettingsMismatchError`` when they disagree."""
    strip = is_strip(results[0].grid)
    if any(is_strip(r.grid) != strip for r in results):
        raise SettingsMismatchError("a diagonal grid and a 2-D grid cannot share one layout;"
                                    " compare results measured on the same kind of grid")
    return strip


def layer_image(result: Result, name: str) -> tuple[np.ndarray, list[float], Optional[list[float]]]:
    """(values (rows, cols) to draw, x values, y values): the (dh, dw) map with x = dw and
    y = dh, or for a strip one row over t with y None."""
    grid = result.grid
    if is_strip(grid):
        order = np.argsort([dh for dh, _ in grid.shifts], kind="stable")
        return result.values(name)[order][None, :].astype(float), [grid.shifts[i][0] for i in order], None
    return result.map(name), list(grid.dw_values), list(grid.dh_values)


def range_keys(infos: Sequence[LayerInfo], color_range: str) -> list:
    """Which panels share a colour scale: all ('shared'), one per stride ('stage'), none ('layer')."""
    check_choice("color_range", color_range, COLOR_RANGES)
    if color_range == "shared":
        return [0] * len(infos)
    if color_range == "stage":
        return [stride_text(info) for info in infos]
    return list(range(len(infos)))


def shared_scales(items: Sequence[T], keys: Sequence, make: Callable[[list[T]], S]) -> list[S]:
    """``make(items of one group)`` for each group of equal keys, handed back per item."""
    made = {key: make([item for item, k in zip(items, keys) if k == key]) for key in dict.fromkeys(keys)}
    return [made[key] for key in keys]
