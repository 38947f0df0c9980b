"""Compare two or more Results measured with the same settings: tables and figures.

A tiny network and its antialiased copy, measured on the same images and grid:

>>> import torch
>>> from torch import nn
>>> import shiftlab
>>> _ = torch.manual_seed(0)
>>> circular = dict(padding=1, padding_mode="circular")
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
...                     nn.Conv2d(4, 8, 3, **circular)).eval()
>>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
>>> grid = shiftlab.ShiftGrid.square(4)
>>> baseline_result = shiftlab.measure(net, images, grid)
>>> antialiased_result = shiftlab.measure(shiftlab.antialias(net, 4), images, grid)
>>> cmp = shiftlab.compare(baseline_result, antialiased_result, labels=["tiny", "tiny+aa4"])
>>> cmp.summary()[["layer[tiny]", "layer[tiny+aa4]", "mean[tiny]", "mean[tiny+aa4]"]].round(4)
  layer[tiny] layer[tiny+aa4]  mean[tiny]  mean[tiny+aa4]
0           0               0      0.0000          0.0000
1           1               1      0.0000          0.0000
2                           2         NaN          0.0347
3           2               3      0.0730          0.0172
4           3               4      0.0673          0.0164
>>> cmp.unmatched        # the antialiased max-pool (stride 1, before the BlurPool) is its own row
{'tiny': [], 'tiny+aa4': ['2']}
>>> fig = cmp.plot_difference()
>>> [ax.get_label() for ax in fig.axes]
['layer:0', 'layer:1', 'layer:2', 'layer:3', 'layer:4', 'colorbar']
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import SettingsMismatchError, UsageError
from .matching import input_differences, match_layers, result_labels, unmatched_layers
from .result import Result

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure


class Comparison:
    """Results of several models on the same images, grid, mode, alignment and metric.

    Layers are matched by name where the architectures share them and by structure (an
    alignment on kind, stride and shape) otherwise, so a baseline max-pool pairs with the
    BlurPool that replaced it.
    """

    def __init__(self, results: Sequence[Result], labels: Optional[Sequence[str]] = None,
                 allow: Sequence[str] = ()) -> None:
        results = list(results)
        if len(results) < 2:
            raise UsageError("a comparison needs at least two results")
        self.results = results
        self.labels = list(labels) if labels else result_labels(results)
        if len(self.labels) != len(results):
            raise UsageError(f"got {len(self.labels)} labels for {len(results)} results")
        first = results[0]
        for label, result in zip(self.labels[1:], results[1:]):
            differences = [d for d in first.settings.differences(result.settings)
                           if d.split(" ")[0] not in allow]
            differences += input_differences(first.provenance, result.provenance)
            if differences:
                raise SettingsMismatchError(
                    f"cannot compare {self.labels[0]} and {label}: they differ in"
                    f" {', '.join(differences)}; measure both with the same settings and images")

    @property
    def rows(self) -> list[tuple[Optional[str], ...]]:
        """One tuple (a layer name per result) per row, in network order; a layer that no other
        result's layer matches has a row of its own with None for the others."""
        return match_layers(self.results, keep_unmatched=True)

    @property
    def unmatched(self) -> dict[str, list[str]]:
        """Per label, the layers without a partner in the other results (empty lists: none)."""
        return dict(zip(self.labels, unmatched_layers(self.results)))

    def summary(self) -> "pandas.DataFrame":
        """Per row: each model's layer name, module, stride and mean distance, and the change
        from the first model (NaN where a model has no layer in that row)."""
        import math

        import pandas as pd

        records = []
        for depth, names in enumerate(self.rows):
            row: dict = {"row": depth}
            for label, result, name in zip(self.labels, self.results, names):
                info = result.layer(name) if name is not None else None
                row[f"layer[{label}]"] = name or ""
                row[f"module[{label}]"] = info.module if info else ""
                row[f"stride[{label}]"] = info.stride[0] if info else math.nan
                row[f"mean[{label}]"] = result.layer_mean(name) if info else math.nan
            for label in self.labels[1:]:
                row[f"change[{label}]"] = row[f"mean[{label}]"] - row[f"mean[{self.labels[0]}]"]
            records.append(row)
        return pd.DataFrame(records)

    def plot_grids(self, **kwargs) -> "Figure":
        """Side-by-side layer grids with one shared colour scale."""
        from ..figures.plots import compare_grid

        return compare_grid(self.results, labels=self.labels, **kwargs)

    def plot_difference(self, first: int = 0, second: int = 1, **kwargs) -> "Figure":
        """Map of result[second] − result[first] per matched layer, diverging colours at 0."""
        from ..figures.plots import difference_grid

        return difference_grid(self.results[first], self.results[second],
                               labels=[self.labels[first], self.labels[second]], **kwargs)

    def plot_profile(self, **kwargs) -> "Figure":
        """Mean distance per layer vs. depth, one line per result."""
        from ..figures.plots import layer_profile

        return layer_profile(self.results, labels=self.labels, **kwargs)


def compare(*items, labels: Optional[Sequence[str]] = None, images=None, grid=None,
            **measure_kwargs) -> Comparison:
    """Compare Results, or measure models (nn.Module) on the same ``images`` and ``grid`` first.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> base = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                      nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> cmp = shiftlab.compare(base, shiftlab.antialias(base, 4), images=x,
        ...                        grid=shiftlab.ShiftGrid.square(4))
        >>> cmp.labels, cmp.rows
        (['model 1', 'model 2'], [('0', '0'), ('1', '1'), (None, '2'), ('2', '3'), ('3', '4')])
        >>> cmp.summary()[["module[model 2]", "change[model 2]"]].round(3)
          module[model 2]  change[model 2]
        0          Conv2d            0.000
        1            ReLU            0.000
        2       MaxPool2d              NaN
        3        BlurPool           -0.056
        4          Conv2d           -0.051
    """
    if len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = tuple(items[0])
    if labels is not None and len(labels) != len(items):
        raise UsageError(f"got {len(labels)} labels for {len(items)} results")
    results = []
    for index, item in enumerate(items):
        if isinstance(item, Result):
            results.append(item)
            continue
        if images is None:
            raise UsageError("pass images= to measure models in a comparison")
        from ..equivariance.engine import measure

        from .provenance import Provenance

        label = labels[index] if labels else f"model {index + 1}"
        results.append(measure(item, images, grid, provenance=Provenance(model=label, label=label),
                               **measure_kwargs))
    return Comparison(results, labels)
