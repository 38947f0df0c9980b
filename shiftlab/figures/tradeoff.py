"""Figures of the output-level results across models: accuracy against consistency (the
antialiased-cnns README's scatter plot) and the diagonal protocol's probability curves (the
paper's Figure 1)."""
from __future__ import annotations

import math

import pandas as pd

from .panels import escape


def accuracy_consistency_plot(table: pd.DataFrame):
    """One point per model (``consistency_table`` rows with accuracy), with 95% intervals.

    Works for the grid protocol (pairwise consistency) and for ``--protocol zhang2019``.

    >>> import torch
    >>> from matplotlib import pyplot as plt
    >>> from torch import nn
    >>> import shiftlab
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> _ = torch.manual_seed(0)
    >>> tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                      nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> models = {"tiny": tiny, "tiny+aa4": shiftlab.antialias(tiny, 4)}
    >>> labels = [3, 3, 7, 1, 3, 3]     # made up: tiny's own classes for the unshifted photos
    >>> images = load_images(sample_image_paths(), size=32).tensor
    >>> results = [shiftlab.measure_invariance(model, images, labels=labels, meta={"model": name})
    ...            for name, model in models.items()]
    >>> from shiftlab.cli.consistency_table import consistency_table
    >>> table = consistency_table(results)
    >>> table[["model", "pairwise_consistency", "accuracy"]].round(3)
          model  pairwise_consistency  accuracy
    0      tiny                 0.706     0.690
    1  tiny+aa4                 0.771     0.719
    >>> fig = accuracy_consistency_plot(table)
    >>> [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    ['tiny', 'tiny+aa4']
    >>> plt.close(fig)
    """
    from matplotlib import pyplot as plt

    paper = "consistency" in table and table["consistency"].notna().all()
    x_name, low, high = (("consistency", "ci_low", "ci_high") if paper else
                         ("pairwise_consistency", "pairwise_ci_low", "pairwise_ci_high"))
    figure, axes = plt.subplots(figsize=(5.2, 4.2), layout="constrained")
    for index, row in enumerate(table.itertuples(index=False)):
        x, y = getattr(row, x_name), row.accuracy
        if x is None or y is None or (isinstance(y, float) and math.isnan(y)):
            continue
        xerr = [[x - getattr(row, low)], [getattr(row, high) - x]]
        yerr = None
        if getattr(row, "accuracy_ci_low", None) is not None and \
                not math.isnan(getattr(row, "accuracy_ci_low")):
            yerr = [[y - row.accuracy_ci_low], [row.accuracy_ci_high - y]]
        axes.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", color=f"C{index % 10}", capsize=3,
                      label=escape(row.model))
        # a name beside each point, staggered: models that coincide stay readable
        axes.annotate(escape(row.model), (x, y), xytext=(6, 6 + 10 * index),
                      textcoords="offset points", fontsize=7, color=f"C{index % 10}")
    axes.set_xlabel("consistency (top-1 agreement under shifts)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"accuracy vs. consistency ({len(table)} models, 95% bootstrap intervals)",
                   fontsize=9)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def diagonal_plot(results, max_images: int = 12):
    """Ground-truth class probability along the windows (t, t), one panel per model: the mean
    over images (thick) and up to ``max_images`` single images (thin).

    >>> import torch
    >>> from matplotlib import pyplot as plt
    >>> from torch import nn
    >>> import shiftlab
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> _ = torch.manual_seed(0)
    >>> tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
    ...                      nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> models = {"tiny": tiny, "tiny+aa4": shiftlab.antialias(tiny, 4)}
    >>> labels = [3, 3, 7, 1, 3, 3]     # made up: tiny's own classes for the unshifted photos
    >>> from shiftlab.invariance.protocols import diagonal_protocol
    >>> batches = [(load_images(sample_image_paths(), size=40).tensor, torch.tensor(labels))]
    >>> baseline_diagonal, antialiased_diagonal = [
    ...     diagonal_protocol(model, batches, size=32, max_offset=8, meta={"model": name})
    ...     for name, model in models.items()]
    >>> fig = diagonal_plot([baseline_diagonal, antialiased_diagonal])
    >>> [ax.get_title() for ax in fig.axes]
    ['tiny (6 images) · random init', 'tiny+aa4 (6 images) · random init']
    >>> plt.close(fig)
    """
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True,
                                layout="constrained", squeeze=False)
    for ax, result in zip(axes[0], results):
        offsets = result.offsets
        for row in result.probability[:max_images]:
            ax.plot(offsets, row, lw=0.6, alpha=0.5, color="0.5")
        ax.plot(offsets, result.mean_curve, lw=2.0, color="C0", label="mean over images")
        note = " · random init" if result.provenance.random_init else ""
        ax.set_title(f"{escape(result.label)} ({result.n_images} images){note}", fontsize=9)
        ax.set_xlabel("window offset (t, t) in px")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probability of the true class")
    axes[0][0].legend(fontsize=8)
    figure.suptitle("the paper's diagonal protocol: true-class probability vs. diagonal shift",
                    fontsize=10)
    return figure
