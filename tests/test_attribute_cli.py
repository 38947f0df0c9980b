"""`shiftlab attribute` as a user runs it: the folder it writes, several models in one figure,
`shiftlab plot` redrawing it, --dry-run, and one-line errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import shiftlab
from shiftlab.cli.commands import main
from conftest import random_png_folder

TINY = f"{Path(__file__).resolve().with_name('conftest.py')}:tiny_classifier"
FAST = ["--size", "16", "--max-images", "2", "--device", "cpu", "--format", "png", "--dpi", "40"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return random_png_folder(tmp_path_factory.mktemp("attribute") / "images", count=2, side=24)


@pytest.fixture(scope="module")
def single(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    return invoke("attribute", "--model", TINY, "--images", images, *FAST, "--out", out), out


def test_attribute_writes_the_result_the_table_and_the_chart(single):
    result, out = single
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"result.npz", "summary.csv", "attribution.png"}
    table = pd.read_csv(out / "summary.csv")
    assert table["layer"].iloc[-1] == "(remainder: non-module ops)"
    assert table["cumulative_share"].iloc[-1] == pytest.approx(1.0, abs=1e-5)
    loaded = shiftlab.load_attribution(out / "result.npz")
    assert loaded.n_images == 2 and loaded.layer_names == list(table["layer"].iloc[:-1])
    per_image = loaded.shares.sum(axis=1) + loaded.remainder_share
    np.testing.assert_allclose(per_image, 1.0, atol=1e-5)
    assert "largest shares of L F" in result.stderr


def test_several_models_share_one_figure_and_table(images, tmp_path):
    out = tmp_path / "pair"
    result = invoke("attribute", "-m", TINY, "--antialias", "2", "--weights", "none",
                    "--images", images, *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert "attribution.png" in names and "summary.csv" in names
    assert len([n for n in names if n.startswith("attribution-") and n.endswith(".npz")]) == 2
    table = pd.read_csv(out / "summary.csv")
    assert table["model"].nunique() == 2
    for _, rows in table.groupby("model"):
        assert rows["cumulative_share"].iloc[-1] == pytest.approx(1.0, abs=1e-5)


def test_plot_redraws_an_attribution_into_another_folder(single, tmp_path):
    _, out = single
    other = tmp_path / "redrawn"
    result = invoke("plot", out / "result.npz", "--out", other, "--format", "png", "--dpi", "40")
    assert result.exit_code == 0, result.output
    assert {p.name for p in other.iterdir()} == {"attribution.png"}
    refused = invoke("plot", out / "result.npz", "--layers", "3", "--out", tmp_path / "x")
    assert refused.exit_code == 2 and "attribution file is drawn whole" in refused.stderr


def test_dry_run_prints_the_passes_and_writes_nothing(images, tmp_path):
    out = tmp_path / "dry"
    result = invoke("attribute", "--model", TINY, "--images", images, *FAST, "--axis",
                    "horizontal", "--dry-run", "--out", out)
    assert result.exit_code == 0, result.output
    assert "forward-mode passes" in result.stdout and "estimated" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--axis", "diagonal"], "Invalid value for '--axis'"),
    (["--output", "softmax"], "Invalid value for '--output'"),
])
def test_bad_attribute_options_are_one_usage_line(images, tmp_path, args, needle):
    result = invoke("attribute", "--model", TINY, "--images", images, *FAST, *args,
                    "--out", tmp_path / "bad")
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_layer_selection_with_a_module_inside_another_is_refused(images, tmp_path):
    result = invoke("attribute", "--model", "resnet18", "--weights", "none", "--images", images,
                    *FAST, "--layers", "layer1*", "--out", tmp_path / "nested")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nested" in errors[0] and "Traceback" not in result.stderr
