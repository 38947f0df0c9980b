"""The boundary-effect figure of ``shiftlab heatmap --padding both``.

Two measurements of one model under circular shifts: as trained (zero padding) and with every
padding made circular (``shiftlab.circular_padding``). Circular padding removes the wrap-seam
artefact, so what remains is aliasing (and non-equivariant layers such as fixed-size adaptive
pools). The gap is shaded as "boundary effect". It is an indication, not an additive
decomposition: the two effects interact, and a layer's gap can even be negative. A layer with no
defined shift but (0, 0) (:mod:`shiftlab.figures.summaries`) has no mean: both lines leave a gap
there, nothing is shaded, and its name is grey, never a 0 "boundary effect".
"""
from __future__ import annotations

import numpy as np

from .panels import HIGHER_IS_BETTER, escape, is_random_init
from .summaries import layer_value
from ..results.result import Result


def padding_profile(trained: Result, circular: Result, scale: str = "linear"):
    """Mean distance per layer as trained and with circular padding; the gap shaded.

    A tiny zero-padded network measured as trained and with circular padding:

    >>> import torch
    >>> from matplotlib import pyplot as plt
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(4, 4, 3, padding=1)).eval()
    >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> grid = shiftlab.ShiftGrid.square(4)
    >>> as_trained = shiftlab.measure(net, images, grid, meta={"model": "tiny"})
    >>> circular = shiftlab.measure(shiftlab.circular_padding(net), images, grid)
    >>> [round(as_trained.layer_mean(name), 3) for name in as_trained.layer_names]
    [0.068, 0.06, 0.085, 0.229]
    >>> [round(circular.layer_mean(name), 3) for name in circular.layer_names]
    [0.0, 0.0, 0.073, 0.083]
    >>> fig = padding_profile(as_trained, circular)
    >>> [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    ['as trained (zero padding)', 'circular padding (aliasing)',
     'gap: boundary effect (not additive)']
    >>> float(fig.axes[0].get_ylim()[0])         # distances: the axis starts at 0
    0.0
    >>> plt.close(fig)
    """
    from matplotlib import pyplot as plt

    names = [n for n in trained.layer_names if n in set(circular.layer_names)]
    first = np.array([layer_value(trained, n) for n in names], dtype=float)  # NaN: a gap
    second = np.array([layer_value(circular, n) for n in names], dtype=float)
    x = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 3.8), layout="constrained")
    clip = scale == "log"  # on a linear axis a mean of 0 sits on the axis, its marker whole
    axes.plot(x, first, "o-", ms=3, label="as trained (zero padding)", color="C3", clip_on=clip)
    axes.plot(x, second, "o-", ms=3, label="circular padding (aliasing)", color="C0", clip_on=clip)
    axes.fill_between(x, second, first, where=np.isfinite(first) & np.isfinite(second),
                      color="C3", alpha=0.15, label="gap: boundary effect (not additive)")
    if scale == "log":
        axes.set_yscale("symlog", linthresh=1e-4)
    step = max(1, len(names) // 30)
    axes.set_xticks(x[::step], [escape(n) for n in names[::step]], rotation=90, fontsize=7)
    undefined = np.isnan(first) & np.isnan(second)
    for tick, index in zip(axes.get_xticklabels(), x[::step]):
        if undefined[index]:
            tick.set_color("0.6")
    if undefined.any():
        axes.set_xlabel("grey: undefined (no shift but (0, 0) is defined): no value, no gap",
                        fontsize=8, color="0.35")
    axes.set_ylabel(f"mean {trained.settings.metric} distance over shifts")
    if scale == "linear" and trained.settings.metric not in HIGHER_IS_BETTER:
        axes.set_ylim(bottom=0.0)
    model = escape(trained.provenance.model or trained.label)
    note = " · random init" if is_random_init(trained) else ""
    axes.set_title(f"{model}: as trained vs. circular padding ({trained.settings.align},"
                   f" {len(trained.grid)} circular shifts){note}", fontsize=9)
    axes.legend(fontsize=8)
    return figure
