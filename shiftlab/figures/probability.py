"""The probability plot: the top class's probability along the diagonal sweep, per model.

Takes :class:`shiftlab.invariance.InvarianceResult` objects (output-level consistency), not
per-layer Results; the paper's Figure 1 when the images carry labels.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from ..errors import UsageError
from .captions import random_mark
from .panels import FS_TITLE, escape, fmt, grid_columns, image_names

__all__ = ["probability_plot"]


def probability_plot(results, labels: Optional[Sequence[str]] = None, ncols: Optional[int] = None,
                     title: Optional[str] = None) -> Figure:
    """Probability of the unshifted image's top class along the diagonal sweep, one panel per model.

    Takes one or more :class:`shiftlab.invariance.InvarianceResult`. Each image is a thin line
    with one legend entry (its file name when recorded), the mean over images a thick black
    line; a panel's title gives the model, its flip rate and MAC (mean absolute change between
    consecutive steps). With labels, images whose unshifted top class is the true label are
    solid (the curve is then the true class's probability, the paper's Figure 1) and the others
    dashed. Panels share the y axis and are labelled ``'probability:<label>'``.

    Example:
        A tiny classifier (it flattens its feature map) and its antialiased copy on the six
        shipped sample photos:

        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> from shiftlab.data import load_images, sample_image_paths
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=32).tensor
        >>> base = shiftlab.measure_invariance(model, images, shiftlab.ShiftGrid.square(8))
        >>> antialiased = shiftlab.measure_invariance(shiftlab.antialias(model, 4), images,
        ...                                           shiftlab.ShiftGrid.square(8))
        >>> fig = probability_plot([base, antialiased], labels=["tiny", "tiny+aa4"])
        >>> [(ax.get_label(), ax.get_title()) for ax in fig.axes]   # doctest: +NORMALIZE_WHITESPACE
        [('probability:tiny', 'tiny\\nflip rate 0.19 · MAC 0.0148'),
         ('probability:tiny+aa4', 'tiny+aa4\\nflip rate 0.119 · MAC 0.00864')]
    """
    from ..invariance.grid_result import InvarianceResult

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
    ncols = grid_columns(len(items), ncols, strip=False) if ncols is not None else min(len(items), 3)
    nrows = math.ceil(len(items) / ncols)
    fig = Figure(figsize=(3.6 * ncols + 2.2, 2.7 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    # 0..1 for trained models; zoomed in when every probability is small (random weights)
    highest = max(float(np.nanmax(r.diagonal_prob, initial=0.0)) for r in items)
    top = 1.02 if highest > 0.5 else max(1.15 * highest, 1e-3)
    for ax in axes.flat[len(items):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for k, (ax, result, label) in enumerate(zip(axes.flat, items, labels)):
        ax.set_label(f"probability:{label}")
        steps = result.diagonal_steps
        names = image_names(result)
        colours = sns.color_palette("husl", max(1, result.n_images))
        right = (None if result.labels is None
                 else np.asarray(result.reference_argmax) == np.asarray(result.labels))
        for i, curve in enumerate(result.diagonal_prob):
            name = names[i] if i < len(names) else f"image {i + 1}"
            dashed = right is not None and not right[i]
            line, = ax.plot(steps, curve, lw=0.8, alpha=0.7, color=colours[i], ls="--" if dashed else "-",
                            label=escape(name + (" (top class ≠ label)" if dashed else "")))
            handles.setdefault(line.get_label(), line)
        mean, = ax.plot(steps, result.mean_probability, lw=2.4, color="black", label="mean over images")
        handles.setdefault("mean over images", mean)
        ax.set_title(escape(f"{random_mark(label, result)}\nflip rate {fmt(result.flip_rate)}"
                            f" · MAC {fmt(result.mac)}"), fontsize=8)
        ax.set_ylim(0.0, top)
        ax.grid(lw=0.4, color="0.9")
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=7)
        diagonal = all(dh == dw for dh, dw in result.settings.diagonal.shifts)
        if k // ncols == nrows - 1 or k + ncols >= len(items):
            ax.set_xlabel("diagonal shift t (px), δ = (t, t)" if diagonal else "sweep step", fontsize=8)
        if k % ncols == 0:
            truth = "P(true class) where it is the top class" if result.labels is not None else \
                "P(top class of the\nunshifted image)"
            ax.set_ylabel(truth.replace(" where", "\nwhere"), fontsize=8)
    fig.legend(handles=list(handles.values()), loc="outside right upper", fontsize=6.5, frameon=False)
    first = items[0]
    n = first.n_images
    settings = (f"{first.settings.mode} shifts, {first.settings.size[0]} px, {n} image"
                f"{'s' if n != 1 else ''}; thin lines: one image each")
    fig.suptitle(escape(title or f"Top-class probability along the diagonal\n{settings}"), fontsize=FS_TITLE)
    return fig
