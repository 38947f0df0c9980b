"""Figure views: which layers the 'paper' view keeps and the names it gives them."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import shiftlab  # noqa: E402
from shiftlab.figures import plots  # noqa: E402
from shiftlab.models.antialias import BlurPool  # noqa: E402
from shiftlab.errors import UsageError  # noqa: E402
from shiftlab.equivariance.geometry import LayerInfo  # noqa: E402
from shiftlab.results.result import Result, Settings  # noqa: E402
from shiftlab.equivariance.shifts import ShiftGrid  # noqa: E402
from shiftlab.figures.views import (VIEWS, row_texts, select_view, stride_changes, stride_text,  # noqa: E402
                                    view_rows)

NAN2 = (math.nan, math.nan)


def layer(name: str, module: str, stride: float = None) -> LayerInfo:
    if stride is None:
        return LayerInfo(name, module, "global", NAN2, NAN2, (10,))
    return LayerInfo(name, module, "spatial", (float(stride),) * 2, (float(stride),) * 2, (4, 8, 8))


def result_of(layers: list[LayerInfo]) -> Result:
    grid = ShiftGrid.square(2)
    mean = np.zeros((len(layers), len(grid)))
    return Result(settings=Settings(grid=grid, size=(32, 32)), layers=layers, mean=mean,
                  std=mean.copy(), n=np.ones_like(mean), n_inf=np.zeros_like(mean),
                  n_nan=np.zeros_like(mean))


def test_views_are_a_module_constant_and_unknown_views_are_refused():
    assert VIEWS == ("all", "paper")
    with pytest.raises(UsageError, match="paper"):
        select_view(result_of([layer("c", "Conv2d", 1)]), "pretty")


def test_all_view_keeps_every_layer_under_its_own_name():
    layers = [layer("features.0", "Conv2d", 1), layer("features.1", "Dropout", 1), layer("fc", "Linear")]
    assert select_view(result_of(layers), "all") == [(i.name, i.name) for i in layers]


def test_paper_view_names_a_vgg_like_stack_by_stage():
    layers = [layer("features.0", "Conv2d", 1), layer("features.1", "ReLU", 1),
              layer("features.2", "Conv2d", 1), layer("features.3", "ReLU", 1),
              layer("features.4", "MaxPool2d", 2), layer("features.5", "Conv2d", 2),
              layer("features.6", "ReLU", 2), layer("features.7", "MaxPool2d", 4),
              layer("avgpool", "AdaptiveAvgPool2d"), layer("classifier.0", "Linear"),
              layer("classifier.1", "Dropout"), layer("classifier.2", "Linear")]
    assert select_view(result_of(layers), "paper") == [
        ("features.0", "conv1_1"), ("features.2", "conv1_2"), ("features.4", "pool1"),
        ("features.5", "conv2"), ("features.7", "pool2"), ("classifier.2", "logits")]


def test_paper_view_of_an_antialiased_stack_names_the_stride1_pool_and_its_blurpool():
    layers = [layer("features.0", "Conv2d", 1), layer("features.1", "MaxPool2d", 1),
              layer("features.2", "BlurPool", 2), layer("features.3", "Conv2d", 2),
              layer("fc", "Linear")]
    names = [shown for _, shown in select_view(result_of(layers), "paper")]
    assert names == ["conv1", "pool1", "blurpool1", "conv2", "logits"]


def test_paper_view_names_resnet_blocks_by_stage_from_the_strides():
    layers = [layer("conv1", "Conv2d", 2), layer("bn1", "BatchNorm2d", 2), layer("relu", "ReLU", 2),
              layer("maxpool", "MaxPool2d", 4),
              layer("layer1.0.conv1", "Conv2d", 4), layer("layer1.0.relu", "ReLU", 4),
              layer("layer1.0.conv2", "Conv2d", 4), layer("layer1.0.relu#2", "ReLU", 4),
              layer("layer1.1.conv1", "Conv2d", 4), layer("layer1.1.conv2", "Conv2d", 4),
              layer("layer2.0.conv1", "Conv2d", 8), layer("layer2.0.conv2", "Conv2d", 8),
              layer("layer2.0.downsample.0", "Conv2d", 8),
              layer("avgpool", "AdaptiveAvgPool2d"), layer("fc", "Linear")]
    assert [shown for _, shown in select_view(result_of(layers), "paper")] == [
        "conv1", "pool1", "stage2.block1.conv1", "stage2.block1.conv2", "stage2.block2.conv1",
        "stage2.block2.conv2", "stage3.block1.conv1", "stage3.block1.conv2",
        "stage3.block1.downsample.0", "logits"]


def test_paper_view_of_a_measured_tiny_vgg_draws_convs_pools_and_logits():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, stride=1),
        BlurPool(4, filt_size=3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(), nn.Linear(4, 3)).eval()
    images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    measured = shiftlab.measure(net, images, ShiftGrid.square(2), device="cpu", progress=False)
    fig = plots.layer_grid(measured, view="paper")
    titles = [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_label().startswith("layer:")]
    assert titles == ["conv1_1", "conv1_2", "pool1", "conv2", "pool2", "blurpool2", "logits"]  # 3+3+1
    assert len(measured.layers) == 13  # ReLUs, adaptive pool, flatten and dropout left out
    plt.close("all")


def test_stride_text_shows_fractions_and_anisotropic_strides():
    assert stride_text(layer("up", "Upsample", 0.5)) == "s=1/2"
    assert stride_text(LayerInfo("x", "Conv2d", "spatial", (2.0, 4.0), (2.0, 4.0), (1, 2, 2))) == "s=2×4"
    assert stride_text(layer("fc", "Linear")) == "global"


# -- rows of several results, a layer without a partner among them ------------------------------
def base_and_antialiased() -> tuple[Result, Result]:
    base = result_of([layer("0", "Conv2d", 1), layer("1", "ReLU", 1), layer("2", "MaxPool2d", 2),
                      layer("3", "Conv2d", 2)])
    aa = result_of([layer("0", "Conv2d", 1), layer("1", "ReLU", 1), layer("2", "MaxPool2d", 1),
                    layer("3", "BlurPool", 2), layer("4", "Conv2d", 2)])
    return base, aa


ROWS = [("0", "0"), ("1", "1"), (None, "2"), ("2", "3"), ("3", "4")]


def test_view_rows_checks_a_row_without_the_first_results_layer_in_the_next_results_view():
    base, aa = base_and_antialiased()
    assert view_rows([base, aa], ROWS, "all") == ROWS
    # paper view: the ReLU row goes, aa's stride-1 max-pool (pool1 in aa's view) stays
    assert view_rows([base, aa], ROWS, "paper") == [("0", "0"), (None, "2"), ("2", "3"), ("3", "4")]
    only_relu = result_of([layer("1", "ReLU", 1), layer("2", "MaxPool2d", 2)])
    assert view_rows([base, only_relu], [("1", "1"), ("2", None)], "all") == [("1", "1"), ("2", None)]


def test_row_texts_put_a_dash_where_a_result_has_no_layer():
    base, aa = base_and_antialiased()
    assert row_texts(ROWS, [base, aa], "all") == ["0", "1", "– / 2", "2 / 3", "3 / 4"]
    assert row_texts([("0", "0"), (None, "2"), ("2", "3")], [base, aa], "paper") == [
        "conv1", "– / pool1", "pool1 / blurpool1"]
    assert row_texts([("3", None)], [base, aa], "all") == ["3 / –"]


def test_stride_changes_skip_rows_where_a_result_has_no_layer():
    base, aa = base_and_antialiased()
    column = [None if name is None else base.layer(name) for name, _ in ROWS]
    assert stride_changes(column) == ([(2.5, "s=2")], [])  # the stride changes at row 3, not 2
    fc = layer("fc", "Linear")
    assert stride_changes([fc, None, fc, layer("c", "Conv2d", 1)]) == ([], [(-0.5, 2.5)])
    assert stride_changes([layer("c", "Conv2d", 1), fc, None]) == ([], [(0.5, 2.5)])
