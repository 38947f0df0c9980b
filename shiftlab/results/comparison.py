"""Compare two or more Results measured with the same settings: tables and figures.

>>> cmp = shiftlab.compare(baseline_result, antialiased_result)      # doctest: +SKIP
>>> cmp.summary()                                                   # doctest: +SKIP
>>> cmp.plot_difference()                                           # doctest: +SKIP
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from ..errors import SettingsMismatchError, UsageError
from .matching import input_differences, match_layers, result_labels
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
    def rows(self) -> list[tuple[str, ...]]:
        """Matched layer names, one tuple (a name per result) per row, in network order."""
        return match_layers(self.results)

    def summary(self) -> "pandas.DataFrame":
        """Per matched layer: each model's layer name, stride and mean distance, and the change."""
        import pandas as pd

        records = []
        for depth, names in enumerate(self.rows):
            row: dict = {"row": depth}
            for label, result, name in zip(self.labels, self.results, names):
                info = result.layer(name)
                row[f"layer[{label}]"] = name
                row[f"module[{label}]"] = info.module
                row[f"stride[{label}]"] = info.stride[0]
                row[f"mean[{label}]"] = result.layer_mean(name)
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
        >>> base = torchvision.models.vgg16().eval()                            # doctest: +SKIP
        >>> cmp = shiftlab.compare(base, shiftlab.antialias(base, 4), images=x)  # doctest: +SKIP
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
        from ..measure.engine import measure

        from .provenance import Provenance

        label = labels[index] if labels else f"model {index + 1}"
        results.append(measure(item, images, grid, provenance=Provenance(model=label, label=label),
                               **measure_kwargs))
    return Comparison(results, labels)
