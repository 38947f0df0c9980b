"""The accuracy-vs-consistency scatter plot of several models."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402

from shiftlab.figures.tradeoff import accuracy_consistency_plot  # noqa: E402


def _table(**columns):
    return pd.DataFrame(columns)


def test_one_point_per_model_with_accuracy_at_its_consistency():
    table = _table(model=["base", "aa4"], pairwise_consistency=[0.6, 0.9],
                   pairwise_ci_low=[0.5, 0.85], pairwise_ci_high=[0.7, 0.95],
                   accuracy=[0.7, 0.8], accuracy_ci_low=[0.65, 0.75], accuracy_ci_high=[0.75, 0.85])
    figure = accuracy_consistency_plot(table)
    axes = figure.axes[0]
    points = [line.get_xydata()[0].tolist() for line in axes.lines if len(line.get_xydata()) == 1
              and line.get_marker() == "o"]
    assert points == [[0.6, 0.7], [0.9, 0.8]]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["base", "aa4"]


def test_protocol_tables_use_their_consistency_and_models_without_accuracy_are_skipped():
    table = _table(model=["a", "b"], consistency=[0.9, 0.95], ci_low=[0.8, 0.9],
                   ci_high=[0.95, 0.99], accuracy=[0.5, math.nan],
                   accuracy_ci_low=[math.nan, math.nan], accuracy_ci_high=[math.nan, math.nan])
    axes = accuracy_consistency_plot(table).axes[0]
    points = [line.get_xydata()[0].tolist() for line in axes.lines if line.get_marker() == "o"]
    assert points == [[0.9, 0.5]]


def test_diagonal_plot_draws_each_models_mean_curve_and_marks_random_init():
    import numpy as np

    from shiftlab.figures.tradeoff import diagonal_plot

    class Diagonal:  # the attributes diagonal_plot reads from a DiagonalResult
        def __init__(self, label, curves):
            from shiftlab.results.provenance import Provenance

            self.label, self.probability = label, np.asarray(curves)
            self.offsets = np.arange(self.probability.shape[1])
            self.mean_curve = self.probability.mean(0)
            self.n_images = len(curves)
            self.provenance = Provenance(model=label, weights="none")

    figure = diagonal_plot([Diagonal("a", [[0.2, 0.4], [0.4, 0.6]]), Diagonal("b", [[0.5, 0.5]])])
    first, second = figure.axes
    assert first.lines[-1].get_ydata().tolist() == [0.30000000000000004, 0.5]
    assert "random init" in first.get_title() and "(2 images)" in first.get_title()
    assert second.lines[-1].get_ydata().tolist() == [0.5, 0.5]
