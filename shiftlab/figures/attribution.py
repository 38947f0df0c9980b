"""The attribution chart: each layer call's share of the output's change under translation.

One row of bars per model, in network order, on one y scale: a bar is a layer's mean signed
share c_i (coloured by module type), the line its running sum (right axis, ending at 1 with
the remainder), vertical rules where the stride changes. Several models stack, so a baseline
and its antialiased copy read column against column.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..attribution.result import AttributionResult

#: how many of a row's largest shares are named on the chart
NAMED = 3


def attribution_chart(results: "AttributionResult | Sequence[AttributionResult]",
                      labels: Optional[Sequence[str]] = None,
                      title: Optional[str] = None) -> "Figure":
    """Bars of every layer call's mean share of L F, one row per result.

    >>> import torch
    >>> import shiftlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(1),
    ...                           torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    >>> x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.attribute(net, x, device="cpu", progress=False)
    >>> fig = attribution_chart(result)
    >>> [ax.get_label() for ax in fig.axes if ax.get_label().startswith("attribution")]
    ['attribution:0']
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    items = [results] if not isinstance(results, (list, tuple)) else list(results)
    if not items:
        raise UsageError("no attribution results to draw")
    labels = list(labels) if labels else [r.label for r in items]
    if len(labels) != len(items):
        raise UsageError(f"got {len(labels)} labels for {len(items)} results")
    types = _module_types(items)
    palette = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    colour = {name: palette(i % palette.N) for i, name in enumerate(types)}
    summaries = [r.summary() for r in items]
    shares = [s["mean_share"].to_numpy(float) for s in summaries]
    finite = np.concatenate([v[np.isfinite(v)] for v in shares] + [np.zeros(1)])
    low, high = min(0.0, finite.min()), max(0.0, finite.max())
    pad = 0.08 * ((high - low) or 1.0)
    width = max(layers for layers in (len(s) for s in summaries))
    fig, axes = plt.subplots(len(items), 1, figsize=(min(max(9.0, 4 + 0.09 * width), 24), 2.9 * len(items) + 1.1),
                             squeeze=False, constrained_layout=True)
    for row, (ax, result, summary, share, label) in enumerate(
            zip(axes[:, 0], items, summaries, shares, labels)):
        ax.set_label(f"attribution:{row}")
        _draw_row(ax, result, summary, share, label, colour, (low - pad, high + pad))
    handles = [Patch(color=colour[name], label=name) for name in types]
    handles.append(Patch(facecolor="0.85", edgecolor="0.4", hatch="///",
                         label="remainder (non-module ops)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6),
               fontsize=8, frameon=False)
    output = items[0].settings.output
    fig.suptitle(title or "Each layer call's share of the output's change under a sub-pixel"
                 f" translation\n({output}, axis {items[0].settings.axis})", fontsize=11)
    return fig


def _draw_row(ax, result, summary, share, label, colour, ylim) -> None:
    depth = np.arange(len(summary))
    layers = len(result.layers)
    modules = list(summary["module"])
    bar_colours = [colour.get(m, "0.5") for m in modules[:layers]] + ["0.85"]
    bars = ax.bar(depth, np.nan_to_num(share), color=bar_colours, width=0.85, linewidth=0)
    bars[-1].set_hatch("///")
    bars[-1].set_edgecolor("0.4")
    ax.axhline(0, color="0.3", linewidth=0.6)
    ax.set_ylim(*ylim)
    ax.set_xlim(-0.8, len(summary) - 0.2)
    ax.set_ylabel("share of L F")
    _mark_strides(ax, result)
    cumulative = ax.twinx()
    cumulative.step(depth, summary["cumulative_share"], where="mid", color="black",
                    linewidth=1.0)
    cumulative.set_ylim(min(0.0, float(np.nanmin(summary["cumulative_share"]))) - 0.05,
                        max(1.0, float(np.nanmax(summary["cumulative_share"]))) + 0.05)
    cumulative.set_ylabel("cumulative", fontsize=8)
    cumulative.tick_params(labelsize=7)
    for index in np.argsort(-np.abs(np.nan_to_num(share[:layers])))[:NAMED]:
        if np.isfinite(share[index]) and share[index] != 0:
            ax.annotate(result.layer_names[index], (index, share[index]),
                        xytext=(0, 3 if share[index] >= 0 else -9), textcoords="offset points",
                        ha="center", fontsize=7, rotation=0, color="0.15")
    total = np.nanmean(result.total) if np.isfinite(result.total).any() else float("nan")
    rest = np.nanmean(result.remainder_share) if np.isfinite(result.remainder_share).any() \
        else float("nan")
    lee = np.nanmean(result.lee) if np.isfinite(result.lee).any() else float("nan")
    ax.set_title(f"{label}: mean ‖L F‖ = {total:.3g}, remainder share {rest:+.3f},"
                 f" LEE {lee:.3g}\n{result.n_images} images, {layers} layer calls",
                 fontsize=9, loc="left")
    ax.set_xlabel("layer call, in network order")


def _mark_strides(ax, result) -> None:
    """A dotted rule and 's=K' (global layers: 'global') where the output stride changes,
    labelled along the bottom edge, clear of the bars' names at the top."""
    previous, last_at, level = None, -10, 0
    count = len(result.layers) + 1
    for index, info in enumerate(result.layers):
        stride = f"s={info.stride[0]:g}" if info.is_spatial else "global"
        if stride != previous:
            if index:
                ax.axvline(index - 0.5, color="0.6", linestyle=":", linewidth=0.8)
            # a label close to the previous one goes one line up, so they never touch
            level = level + 1 if index - last_at < 0.06 * count else 0
            ax.text(index - 0.2, 0.02 + 0.07 * level, stride, fontsize=7, va="bottom",
                    ha="left", color="0.35", transform=ax.get_xaxis_transform())
            previous, last_at = stride, index


def _module_types(items) -> list[str]:
    seen: list[str] = []
    for result in items:
        for info in result.layers:
            if info.module not in seen:
                seen.append(info.module)
    return seen
