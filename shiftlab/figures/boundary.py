"""The boundary-effect figure of ``shiftlab heatmap --padding both``.

Two measurements of one model under circular shifts: as trained (zero padding) and with every
padding made circular (``shiftlab.circular_padding``). Circular padding removes the wrap-seam
artefact, so what remains is aliasing (and non-equivariant layers such as fixed-size adaptive
pools). The gap is shaded as "boundary effect". It is an indication, not an additive
decomposition: the two effects interact, and a layer's gap can even be negative.
"""
from __future__ import annotations

import numpy as np

from .panels import escape, is_random_init
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
    [0.064, 0.056, 0.08, 0.215]
    >>> [round(circular.layer_mean(name), 3) for name in circular.layer_names]
    [0.0, 0.0, 0.068, 0.077]
    >>> fig = padding_profile(as_trained, circular)
    >>> [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    ['as trained (zero padding)', 'circular padding (aliasing)',
     'gap: boundary effect (not additive)']
    >>> plt.close(fig)
    """
    from matplotlib import pyplot as plt

    names = [n for n in trained.layer_names if n in set(circular.layer_names)]
    first = np.array([trained.layer_mean(n) for n in names], dtype=float)
    second = np.array([circular.layer_mean(n) for n in names], dtype=float)
    x = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(max(6.0, 0.22 * len(names) + 2), 3.8), layout="constrained")
    axes.plot(x, first, "o-", ms=3, label="as trained (zero padding)", color="C3")
    axes.plot(x, second, "o-", ms=3, label="circular padding (aliasing)", color="C0")
    axes.fill_between(x, second, first, where=np.isfinite(first) & np.isfinite(second),
                      color="C3", alpha=0.15, label="gap: boundary effect (not additive)")
    if scale == "log":
        axes.set_yscale("symlog", linthresh=1e-4)
    step = max(1, len(names) // 30)
    axes.set_xticks(x[::step], [escape(n) for n in names[::step]], rotation=90, fontsize=7)
    axes.set_ylabel(f"mean {trained.settings.metric} distance over shifts")
    model = escape(trained.provenance.model or trained.label)
    note = " · random init" if is_random_init(trained) else ""
    axes.set_title(f"{model}: as trained vs. circular padding ({trained.settings.align},"
                   f" {len(trained.grid)} circular shifts){note}", fontsize=9)
    axes.legend(fontsize=8)
    return figure
