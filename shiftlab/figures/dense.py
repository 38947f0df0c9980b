"""Figures of a dense model's output under shifts: where in the image predictions flip (the
per-pixel agreement map), and how agreement falls with the size of the shift.

Both take :class:`shiftlab.invariance.dense_result.DenseResult` objects, one panel or one curve
per model, so a baseline and its antialiased version sit side by side.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import UsageError
from .captions import random_mark
from .panels import FS_TITLE, escape, fmt

__all__ = ["agreement_map_plot", "agreement_by_shift_plot"]


def _results(results) -> list:
    from ..invariance.dense_result import DenseResult

    items = [results] if isinstance(results, DenseResult) else list(results)
    if not items:
        raise UsageError("no results to plot")
    for item in items:
        if not isinstance(item, DenseResult):
            raise UsageError(f"expected DenseResult objects, got {type(item).__name__}")
    return items


def _settings(result) -> str:
    s = result.settings
    mode = s.mode + (f" (margin {s.margin})" if s.mode == "crop" else "")
    n = result.n_images
    return (f"{mode} shifts · {s.grid.kind} grid ({len(s.grid)} shifts) · image"
            f" {s.size[0]}×{s.size[1]} · {n} image{'s' if n != 1 else ''}")


def agreement_map_plot(results) -> Figure:
    """Per-pixel agreement, one panel per model: at each position of the unshifted image, the
    share of (image, non-zero shift) whose predicted class there equals the unshifted
    prediction. Panels share one colour scale; a panel's title gives its pooled agreement and
    mASSC. Pixels no shift compares (crop mode's edges never are) would be blank.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from shiftlab import ShiftGrid
        >>> from shiftlab.invariance.dense import measure_dense
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2),
        ...                     nn.Upsample(scale_factor=2)).eval()
        >>> result = measure_dense(net, torch.randn(2, 3, 16, 16), ShiftGrid.square(2),
        ...                        progress=False).with_label("tiny")
        >>> [ax.get_label() for ax in agreement_map_plot(result).axes][:1]
        ['agreement:tiny']
    """
    items = _results(results)
    maps = [r.agreement_map() for r in items]
    finite = np.concatenate([m[np.isfinite(m)] for m in maps] + [np.ones(1)])
    low = min(float(finite.min()), 0.99)
    ncols = min(len(items), 3)
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(3.3 * ncols + 1.0, 3.2 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    image = None
    for ax, result, agreement in zip(axes.flat, items, maps):
        ax.set_label(f"agreement:{result.label}")
        image = ax.imshow(agreement, cmap="magma", vmin=low, vmax=1.0, interpolation="nearest")
        summary = result.summary()
        ax.set_title(escape(f"{random_mark(result.label, result)}\nagreement"
                            f" {fmt(summary['agreement'])} · mASSC {fmt(summary['massc'])}"),
                     fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if result.uninformative:  # a uniform map would otherwise read as "perfectly stable"
            won = int(np.flatnonzero(result.reference_classes)[0])
            ax.text(0.5, 0.5, f"every unshifted pixel is class {won}:\nagreement says little"
                    " here", transform=ax.transAxes, ha="center", va="center", fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})
    bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.85)
    bar.set_label("share of shifted inputs whose class\nat this pixel agrees with the unshifted",
                  fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(escape(f"Where predictions flip under shifts\n{_settings(items[0])}"),
                 fontsize=FS_TITLE)
    return fig


def agreement_by_shift_plot(results: Sequence) -> Figure:
    """Agreement with the unshifted prediction against the shift's length |δ| (px), one colour
    per model: a dot per grid shift, a line through the mean at each length, and dashed the
    mASSC of the random pairs against the length |δ1 − δ2| between their two inputs; mIoU per
    shift in a second panel when the results carry masks.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from shiftlab import ShiftGrid
        >>> from shiftlab.invariance.dense import measure_dense
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2),
        ...                     nn.Upsample(scale_factor=2)).eval()
        >>> result = measure_dense(net, torch.randn(2, 3, 16, 16), ShiftGrid.square(3),
        ...                        progress=False).with_label("tiny")
        >>> [ax.get_label() for ax in agreement_by_shift_plot([result]).axes]
        ['agreement by shift']
    """
    items = _results(results)
    masked = all(r.has_masks for r in items)
    fig = Figure(figsize=(4.6 * (2 if masked else 1) + 1.6, 3.4), layout="constrained")
    axes = fig.subplots(1, 2 if masked else 1, squeeze=False)[0]
    colours = sns.color_palette("colorblind", len(items))
    summaries = [r.summary() for r in items]  # bootstraps inside: once per result
    # (axes label, y label, values per shift, the pooled number in the legend, its name)
    panels = [("agreement by shift", "agreement with the unshifted prediction",
               lambda r: r.agreement, "massc", "mASSC")]
    if masked:
        panels.append(("miou by shift", "mIoU of the shifted input", lambda r: r.miou,
                       "miou", "mIoU"))
    for ax, (name, ylabel, values, pooled, pooled_name) in zip(axes, panels):
        ax.set_label(name)
        for colour, result, summary in zip(colours, items, summaries):
            shifts = np.asarray(result.grid.shifts, dtype=np.float64).reshape(-1, 2)
            length = np.hypot(shifts[:, 0], shifts[:, 1])
            value = np.asarray(values(result), dtype=np.float64)
            ax.scatter(length, value, s=12, color=colour, alpha=0.5, linewidths=0)
            lengths = np.unique(np.round(length, 6))
            means = [np.nanmean(value[np.isclose(length, x)]) for x in lengths]
            tag = f"{pooled_name} {fmt(summary[pooled])}"
            if result.uninformative:
                tag += ", one class everywhere"
            ax.plot(lengths, means, color=colour, lw=1.8,
                    label=escape(f"{random_mark(result.label, result)} ({tag})"))
            if pooled == "massc":  # the pairs: two shifted inputs δ1 − δ2 apart
                between, massc = result.massc_by_distance()
                ax.plot(between, massc, color=colour, lw=1.0, ls="--", alpha=0.9)
        low, high = ax.get_ylim()  # shares: never an axis below 0 or above 1
        ax.set_ylim(max(low, 0.0), min(high, 1.02))
        ax.set_xlabel("shift length |δ| (px)", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(lw=0.4, color="0.9")
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(escape(f"Dense output under shifts: dots are grid shifts, solid lines their"
                        " mean; dashed: mASSC of the random pairs by |δ1 − δ2|\n"
                        f"{_settings(items[0])}"), fontsize=FS_TITLE)
    return fig
