"""A layer x shift cell is measured or undefined: the identity shift (0 by construction) is in
no summary, and a layer with no other defined shift is NaN / "undefined", never 0."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.cli.commands import main
from conftest import make_maxpool, random_png_folder

CONFTEST = Path(__file__).resolve().with_name("conftest.py")


def stride_four_net() -> nn.Module:
    """conv (stride 1), max-pool 2 (stride 2), max-pool 2 (stride 4): circular padding."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
                         nn.MaxPool2d(2), nn.MaxPool2d(2)).eval()


def run(model, images, grid, **kwargs):
    return shiftlab.measure(model, images, grid, device="cpu", progress=False, **kwargs)


def test_a_stride_four_layer_on_a_0_to_3_grid_is_undefined_under_exact_alignment(images):
    result = run(stride_four_net(), images, ShiftGrid.square(4), align="exact")
    # stride 4: only (0, 0) lands on its grid; its distance is 0 by construction
    assert np.isnan(result.map("2")).sum() == 15 and result.map("2")[0, 0] == 0
    assert math.isnan(result.layer_mean("2"))
    assert result.undefined_layers() == ["2"]
    row = result.summary().set_index("layer").loc["2"]
    assert math.isnan(row["mean"]) and math.isnan(row["max"]) and row["defined_shifts"] == 0


def test_the_stride_two_layer_averages_only_its_three_even_shifts(images):
    result = run(stride_four_net(), images, ShiftGrid.square(4), align="exact")
    row = result.summary().set_index("layer").loc["1"]
    assert row["defined_shifts"] == 3  # (0, 2), (2, 0), (2, 2): exact at even shifts
    assert abs(row["mean"]) <= 1e-6 and abs(row["max"]) <= 1e-6
    # the conv (stride 1, circular) is defined at all 15 non-identity shifts
    assert result.summary().set_index("layer").loc["0", "defined_shifts"] == 15


def test_the_identity_shift_is_not_averaged_into_a_layer_mean(images):
    result = run(make_maxpool(), images, ShiftGrid.square(4), align="bilinear")
    for layer in result.layer_names:
        values = result.values(layer)
        shifts = np.asarray(result.grid.shifts)
        others = values[np.any(shifts != 0, axis=1)]
        assert result.layer_mean(layer) == pytest.approx(others.mean(), rel=1e-12)
        # with the identity's 0 averaged in, the mean would be lower by a factor 15/16
        assert result.layer_mean(layer) > values.mean() or others.mean() == 0


def test_a_grid_without_the_zero_shift_averages_every_shift(images):
    grid = ShiftGrid.explicit([(1, 0), (0, 1)])
    result = run(make_maxpool(), images, grid, align="bilinear")
    layer = result.layer_names[-1]
    assert result.layer_mean(layer) == pytest.approx(result.values(layer).mean(), rel=1e-12)


def test_heatmap_names_undefined_layers_and_writes_nan_never_zero(tmp_path):
    images = random_png_folder(tmp_path / "images", count=2, side=24)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, [
        "heatmap", "--model", f"{CONFTEST}:tiny_classifier", "--images", str(images),
        "--size", "16", "--max-shift", "4", "--max-images", "2", "--device", "cpu",
        "--align", "exact", "--format", "png", "--dpi", "30", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "summary.csv", dtype={"layer": str}).set_index("layer")
    # tiny_classifier: layers 3 and 4 are at stride 4, so a 0..3 grid defines only (0, 0)
    assert table.loc["3", "mean"] != table.loc["3", "mean"]  # NaN, not 0
    assert table.loc["4", "defined_shifts"] == 0
    assert table.loc["2", "defined_shifts"] == 3
    assert "undefined (no shift of the grid but (0, 0)" in result.stderr
    assert "3, 4" in result.stderr
    least = [line for line in result.stderr.splitlines() if "least equivariant" in line]
    assert least and "layer: 3 " not in least[0] and "layer: 4 " not in least[0]


def test_the_padding_table_leaves_an_undefined_layer_undefined(images):
    from shiftlab.cli.reports import padding_table

    trained = run(stride_four_net(), images, ShiftGrid.square(4), align="exact")
    circular = run(stride_four_net(), images, ShiftGrid.square(4), align="exact")
    table = padding_table([trained, circular]).set_index("layer")
    assert math.isnan(table.loc["2", "boundary_effect"])
    assert table.loc["0", "boundary_effect"] == pytest.approx(0.0, abs=1e-9)
