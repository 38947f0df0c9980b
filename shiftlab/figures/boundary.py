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

    >>> fig = padding_profile(as_trained, circular)     # doctest: +SKIP
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
