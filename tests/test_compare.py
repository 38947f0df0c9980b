"""Comparisons: variant specs (NAME[+aaK][@WEIGHTS]), Comparison / shiftlab.compare, and the
`compare` command end to end.

Tiny models, 16 px seeded random images and 2x2 or 4x4 grids keep the file well under a minute.
"""
from __future__ import annotations

import math

import dataclasses
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import shiftlab  # noqa: E402
from shiftlab import BlurPool, ShiftGrid, antialias  # noqa: E402
from shiftlab.cli.commands import main  # noqa: E402
from shiftlab.results.comparison import Comparison, compare  # noqa: E402
from shiftlab.errors import SettingsMismatchError, UsageError, WeightsError  # noqa: E402
from shiftlab.results.result import Result  # noqa: E402
from shiftlab.models.variants import load_variant, parse_variant  # noqa: E402

from conftest import ANTIALIAS_FACTORY_SOURCE as FACTORY_SOURCE  # noqa: E402
FAST = ["--size", "16", "--max-shift", "2", "--max-images", "2", "--device", "cpu", "--quiet"]


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.delenv("SHIFTLAB_DEBUG", raising=False)


def write_factory(folder: Path) -> str:
    """Write the tiny factory file into ``folder``; return its ``path.py:factory`` spec."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinynet.py"
    path.write_text(textwrap.dedent(FACTORY_SOURCE))
    return f"{path}:factory"


def write_images(folder: Path, count: int = 2, side: int = 24) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for index in range(count):
        pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"im{index}.png")
    return folder


def seeded_load(spec: str, **kwargs):
    """load_variant with the global RNG seeded (and restored), so random inits repeat."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_variant(spec, **kwargs)


def weights_of(model: nn.Module, kind: type) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, kind)]


def images16(count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def pool_net() -> nn.Module:
    """conv, relu, MaxPool2d(2), conv; circular padding so only the pool breaks equivariance."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                         nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")).eval()


def run(model: nn.Module, x: torch.Tensor, grid: ShiftGrid, label: str, **kwargs) -> Result:
    return shiftlab.measure(model, x, grid, device="cpu", progress=False,
                            meta={"label": label, "model": label, **kwargs.pop("meta", {})},
                            **kwargs)


@pytest.fixture(scope="module")
def base_vs_aa() -> tuple[Result, Result]:
    """SPEC known answer 4: MaxPool(2) vs MaxPool(2, stride 1) + circular BlurPool, bilinear."""
    base = pool_net()
    blurred = antialias(base, filt_size=3, pad_type="circular").eval()
    grid = ShiftGrid.square(4)
    return run(base, images16(), grid, "base"), run(blurred, images16(), grid, "aa")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def everything(result) -> str:
    return result.output + result.stderr


def assert_clean_error(result, exit_code: int, *needles: str) -> str:
    """Exit code, one 'error:' line on stderr naming ``needles``, no traceback, nothing on stdout."""
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{everything(result)}"
    assert result.exit_code == exit_code, everything(result)
    assert "Traceback" not in everything(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    return lines[0]


# -- parse_variant ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("vgg16", ("vgg16", None, None)),
    ("vgg16+aa4", ("vgg16", 4, None)),
    ("resnet50+aa4@w.pth", ("resnet50", 4, "w.pth")),
    ("file.py:factory+aa3@DEFAULT", ("file.py:factory", 3, "DEFAULT")),
    ("resnet18@IMAGENET1K_V1", ("resnet18", None, "IMAGENET1K_V1")),
    ("  vgg11+aa1  ", ("vgg11", 1, None)),
])
def test_parse_variant_splits_name_filter_and_weights(text, expected):
    assert parse_variant(text) == expected


@pytest.mark.parametrize("text, size", [("vgg16+aa0", "0"), ("vgg16+aa8", "8"), ("x.py:f+aa8@w.pth", "8")])
def test_parse_variant_refuses_filter_sizes_outside_1_to_7(text, size):
    with pytest.raises(UsageError, match=f"1..7, got {size}"):
        parse_variant(text)


def test_parse_variant_keeps_an_at_sign_inside_a_factory_path():
    expected = ("ci/workspace@2/model.py:factory", 2, None)
    assert parse_variant("ci/workspace@2/model.py:factory+aa2") == expected


# -- load_variant ----------------------------------------------------------------------------
def test_aa_spec_gives_a_blurpool_model_named_with_its_filter(tmp_path):
    spec = write_factory(tmp_path)
    loaded = seeded_load(f"{spec}+aa2", weights="none")
    pools = [m for m in loaded.model.modules() if isinstance(m, BlurPool)]
    assert len(pools) == 2 and {p.filt_size for p in pools} == {2}  # the max-pool and the strided conv
    strided = [m for m in loaded.model.modules()
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d)) and m.stride not in (1, (1, 1))]
    assert strided == []
    assert loaded.name.endswith("+aa2") and loaded.name == "tinynet:factory+aa2"
    assert not loaded.model.training
    assert loaded.model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)
    baseline = seeded_load(spec, weights="none")
    assert baseline.name == "tinynet:factory"
    assert not any(isinstance(m, BlurPool) for m in baseline.model.modules())


def test_aa_spec_without_a_checkpoint_copies_the_baseline_weights(tmp_path):
    spec = write_factory(tmp_path)
    baseline = seeded_load(spec, weights="none").model
    converted = seeded_load(f"{spec}+aa2", weights="none").model
    for kind in (nn.Conv2d, nn.Linear):
        mine, theirs = weights_of(converted, kind), weights_of(baseline, kind)
        assert len(mine) == len(theirs) > 0
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs)), kind
    # the filter size may also come from the argument instead of the spec
    by_argument = seeded_load(spec, weights="none", antialias=2)
    assert by_argument.name == "tinynet:factory+aa2"
    assert all(torch.equal(a, b) for a, b in zip(weights_of(by_argument.model, nn.Conv2d),
                                                 weights_of(baseline, nn.Conv2d)))


def test_aa_spec_with_a_checkpoint_loads_it_strictly(tmp_path):
    spec = write_factory(tmp_path)
    trained = seeded_load(f"{spec}+aa2", weights="none").model
    generator = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    saved = {k: v.clone() for k, v in trained.state_dict().items()}
    torch.save(saved, tmp_path / "lpf2.pth")
    loaded = seeded_load(f"{spec}+aa2@{tmp_path / 'lpf2.pth'}")
    state = loaded.model.state_dict()
    assert set(state) == set(saved) and any(k.endswith(".filt") for k in state)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert loaded.name == "tinynet:factory+aa2" and loaded.weights == str(tmp_path / "lpf2.pth")


def test_baseline_checkpoint_for_an_aa_spec_is_a_weights_error_listing_keys(tmp_path):
    spec = write_factory(tmp_path)
    torch.save(seeded_load(spec, weights="none").model.state_dict(), tmp_path / "base.pth")
    with pytest.raises(WeightsError) as caught:
        load_variant(f"{spec}+aa2@{tmp_path / 'base.pth'}")
    message = str(caught.value)
    assert "missing keys" in message and "3.filt" in message  # the BlurPool's buffer
    assert "unexpected keys" in message and "7.weight" in message  # the baseline's linear layer


# -- Comparison ------------------------------------------------------------------------------
def test_two_results_with_the_same_settings_compare(base_vs_aa):
    base, aa = base_vs_aa
    cmp = Comparison([base, aa])
    assert cmp.results == [base, aa] and cmp.labels == ["base", "aa"]
    assert Comparison([base, aa], labels=["A", "B"]).labels == ["A", "B"]


@pytest.mark.parametrize("field, value, words", [
    ("metric", "l2", "metric (cosine vs l2)"),
    ("align", "exact", "align (bilinear vs exact)"),
    ("grid", ShiftGrid.square(3), "grid (16 vs 9 shifts)"),
    ("mode", "crop", "mode (circular vs crop)"),
])
def test_results_measured_differently_cannot_be_compared(base_vs_aa, field, value, words):
    base, aa = base_vs_aa
    other = dataclasses.replace(aa, settings=dataclasses.replace(aa.settings, **{field: value}))
    with pytest.raises(SettingsMismatchError) as caught:
        Comparison([base, other])
    assert words in str(caught.value)
    assert "same settings" in str(caught.value)


def with_images(result: Result, *names: str) -> Result:
    return dataclasses.replace(result, provenance=result.provenance.replace(images=names))


def test_results_measured_on_different_images_cannot_be_compared(base_vs_aa):
    base, aa = base_vs_aa
    a = with_images(base, "cat.png", "dog.png")
    b = with_images(aa, "cat.png", "car.png")
    with pytest.raises(SettingsMismatchError, match="differ in image files"):
        Comparison([a, b])
    same = with_images(aa, "cat.png", "dog.png")
    assert len(Comparison([a, same]).results) == 2


def test_a_result_without_an_image_list_compares_in_either_order(base_vs_aa):
    base, aa = base_vs_aa
    listed = with_images(aa, "cat.png")
    assert len(Comparison([listed, base]).results) == 2  # passes today
    assert len(Comparison([base, listed]).results) == 2  # raises today


def test_a_comparison_needs_two_results_and_one_label_each(base_vs_aa):
    base, aa = base_vs_aa
    with pytest.raises(UsageError, match="at least two"):
        Comparison([base])
    with pytest.raises(UsageError, match="at least two"):
        compare(base)
    with pytest.raises(UsageError, match="1 labels for 2"):
        Comparison([base, aa], labels=["only"])


def test_summary_has_one_row_per_matched_layer_with_means_and_change(base_vs_aa):
    base, aa = base_vs_aa
    cmp = Comparison([base, aa])
    table = cmp.summary()
    rows = cmp.rows
    assert len(table) == len(rows) > 0
    assert list(table["layer[base]"]) == [a or "" for a, _ in rows]
    assert list(table["layer[aa]"]) == [b or "" for _, b in rows]
    for record, (a, b) in zip(table.to_dict("records"), rows):
        if a is None:  # the antialiased model's stride-1 max-pool: no baseline partner
            assert math.isnan(record["mean[base]"]) and math.isnan(record["change[aa]"])
            assert record["mean[aa]"] == aa.layer_mean(b)
            continue
        assert record["mean[base]"] == base.layer_mean(a)
        assert record["mean[aa]"] == aa.layer_mean(b)
        assert record["change[aa]"] == pytest.approx(aa.layer_mean(b) - base.layer_mean(a), abs=1e-15)
        assert record["module[aa]"] == aa.layer(b).module
    assert "change[base]" not in table.columns


def test_structure_matching_pairs_the_maxpool_with_the_blurpool_that_replaced_it(base_vs_aa):
    base, aa = base_vs_aa
    assert base.layer_names == ["0", "1", "2", "3"]
    assert aa.layer_names == ["0", "1", "2", "3", "4"]  # MaxPool(2, 1) then BlurPool inserted
    rows = Comparison([base, aa]).rows
    assert rows == [("0", "0"), ("1", "1"), (None, "2"), ("2", "3"), ("3", "4")]
    pool_row = next(row for row in rows if row[0] and base.layer(row[0]).module == "MaxPool2d")
    assert aa.layer(pool_row[1]).module == "BlurPool"
    assert base.layer(pool_row[0]).stride == aa.layer(pool_row[1]).stride == (2.0, 2.0)


def test_structure_matching_pairs_the_maxpool_with_its_blurpool_before_a_strided_conv():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU()).eval()
    blurred = antialias(base, filt_size=2).eval()
    grid = ShiftGrid.square(2)
    a, b = run(base, images16(1), grid, "base"), run(blurred, images16(1), grid, "aa")
    # base: 0 conv, 1 relu, 2 pool(s2), 3 conv(s4), 4 relu(s4)
    # aa:   0 conv, 1 relu, 2 pool(s1), 3 BlurPool(s2), 4 conv(s2), 5 relu(s2), 6 BlurPool(s4)
    rows = Comparison([a, b]).rows
    pool_row = next(row for row in rows if row[0] == "2")
    assert b.layer(pool_row[1]).module == "BlurPool", rows


# -- SPEC known answer 4 through the comparison --------------------------------------------
def test_blurpool_lowers_the_pool_rows_mean_and_difference_at_odd_shifts(base_vs_aa):
    base, aa = base_vs_aa
    cmp = Comparison([base, aa])
    table = cmp.summary()
    pool = table[table["module[base]"] == "MaxPool2d"].iloc[0]
    assert pool["module[aa]"] == "BlurPool"
    assert pool["mean[aa]"] < pool["mean[base]"] and pool["change[aa]"] < 0
    fig = cmp.plot_difference()
    axes = [ax for ax in fig.axes if ax.get_label() == "layer:3"]  # panels are labelled by b's layer
    assert len(axes) == 1  # the first title line names both layers, however it is spaced
    assert "".join(axes[0].get_title().splitlines()[0].split()) == "2→3", axes[0].get_title()
    drawn = np.ma.filled(axes[0].images[0].get_array().astype(float), np.nan)
    expected = aa.map("3") - base.map("2")
    assert drawn.shape == (4, 4) and np.allclose(drawn, expected)
    odd = np.zeros((4, 4), bool)
    odd[1::2, :] = odd[:, 1::2] = True  # rows = dh, columns = dw: either one odd
    assert np.all(drawn[odd] < 0), drawn
    assert np.all(np.abs(base.map("2")[~odd]) <= 1e-6)  # the max-pool is exact at even shifts


def test_comparison_figures_show_every_layer_of_both_models(base_vs_aa):
    base, aa = base_vs_aa
    cmp = Comparison([base, aa])
    assert [row for row in cmp.rows if None in row] == [(None, "2")]  # aa's stride-1 max-pool
    from shiftlab.figures.captions import random_mark

    shown_base, shown_aa = random_mark("base", base), random_mark("aa", aa)  # as the figures name them
    grids = [ax.get_label() for ax in cmp.plot_grids().axes]
    assert {f"layer:{shown_aa}:2", f"missing:{shown_base}:2"} <= set(grids)
    profile = cmp.plot_profile().axes[0]
    line = next(line for line in profile.get_lines() if line.get_label() == shown_aa)
    assert list(line.get_xdata()) == list(range(len(aa.layers)))
    difference = cmp.plot_difference()
    alone = next(ax for ax in difference.axes if ax.get_label() == "layer:2")
    assert "nothing to subtract" in " ".join(alone.texts[0].get_text().split())


# -- shiftlab.compare -------------------------------------------------------------------------
def test_compare_measures_models_on_the_same_images_and_grid():
    base = pool_net()
    blurred = antialias(base, filt_size=3)
    x, grid = images16(), ShiftGrid.square(2)
    cmp = shiftlab.compare(base, blurred, images=x, grid=grid, labels=["plain", "blur"],
                           device="cpu", progress=False)
    assert isinstance(cmp, shiftlab.Comparison)
    assert cmp.labels == ["plain", "blur"]
    assert [r.meta["label"] for r in cmp.results] == ["plain", "blur"]
    assert all(r.grid == grid for r in cmp.results)
    direct = shiftlab.measure(blurred, x, grid, device="cpu", progress=False)
    assert cmp.results[1].layer_names == direct.layer_names
    assert np.allclose(cmp.results[1].mean, direct.mean, equal_nan=True)
    assert ("2", "3") in cmp.rows


def test_compare_takes_results_as_they_are_and_needs_images_for_models(base_vs_aa):
    base, aa = base_vs_aa
    cmp = shiftlab.compare(base, aa)
    assert cmp.results[0] is base and cmp.results[1] is aa and cmp.labels == ["base", "aa"]
    assert shiftlab.compare([base, aa], labels=["x", "y"]).labels == ["x", "y"]
    with pytest.raises(UsageError, match="images="):
        shiftlab.compare(pool_net(), pool_net())


def test_compare_with_too_few_labels_for_models_is_a_usage_error():
    with pytest.raises(UsageError, match="labels"):
        shiftlab.compare(pool_net(), pool_net(), images=images16(1), grid=ShiftGrid.square(2),
                         labels=["only one"], device="cpu", progress=False)


# -- the compare command ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`compare --model <factory> --antialias 2` once per worker: (result, out folder, images, spec)."""
    root = tmp_path_factory.mktemp("compare_cli")
    spec = write_factory(root / "models")
    images = write_images(root / "images")
    out = root / "out"
    result = invoke("compare", "--model", spec, "--antialias", 2, "--weights", "none", *FAST,
                    "--images", images, "--out", out)
    return result, out, images, spec


def test_cli_compare_model_with_antialias_writes_figures_table_and_results(cli_run):
    result, out, _, _ = cli_run
    assert result.exit_code == 0, everything(result)
    assert "Traceback" not in everything(result)
    names = {p.name for p in out.iterdir()}
    figures = {f"{stem}.{fmt}" for stem in ("grids", "difference", "profile") for fmt in ("png", "pdf")}
    npz = sorted(out.glob("result-*.npz"))
    assert names == figures | {"summary.csv"} | {p.name for p in npz} and len(npz) == 2
    assert {Path(line).name for line in result.stdout.splitlines()} == names  # every written path
    assert (out / "grids.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "difference.pdf").read_bytes()[:5] == b"%PDF-"
    a, b = (shiftlab.load(p) for p in npz)
    assert a.settings == b.settings and a.settings.size == (16, 16) and len(a.grid) == 4
    assert sorted([a.meta["model"], b.meta["model"]]) == ["tinynet:factory", "tinynet:factory+aa2"]
    assert a.meta["images"] == b.meta["images"] == ["im0.png", "im1.png"]
    table = pd.read_csv(out / "summary.csv")
    columns = {"mean[tinynet:factory]", "mean[tinynet:factory+aa2]", "change[tinynet:factory+aa2]"}
    assert columns <= set(table.columns)
    assert "BlurPool" in set(table["module[tinynet:factory+aa2]"])
    assert len(table) == len(Comparison([a, b] if a.meta["model"] == "tinynet:factory" else [b, a]).rows)


def test_cli_compare_redraws_from_saved_results(cli_run, tmp_path):
    first, out, _, _ = cli_run
    assert first.exit_code == 0, everything(first)
    npz = sorted(out.glob("result-*.npz"))
    again = tmp_path / "again"
    result = invoke("compare", *npz, "--out", again, "--format", "png")
    assert result.exit_code == 0, everything(result)
    assert "Traceback" not in everything(result)
    assert {p.name for p in again.iterdir()} == {"grids.png", "difference.png", "profile.png", "summary.csv"}
    saved = pd.read_csv(out / "summary.csv")
    redrawn = pd.read_csv(again / "summary.csv")
    pd.testing.assert_frame_equal(saved, redrawn)  # the same comparison, without re-measuring


def test_cli_compare_of_results_with_different_metrics_is_one_error_line(cli_run, tmp_path):
    first, out, _, _ = cli_run
    npz = sorted(out.glob("result-*.npz"))[0]
    cosine = shiftlab.load(npz)
    l2 = dataclasses.replace(cosine, settings=dataclasses.replace(cosine.settings, metric="l2"))
    l2.save(tmp_path / "l2.npz")
    target = tmp_path / "never"
    result = invoke("compare", npz, tmp_path / "l2.npz", "--out", target)
    assert_clean_error(result, 1, "metric", "cosine vs l2")
    assert not target.exists()


def test_cli_compare_usage_errors_exit_2(cli_run, tmp_path):
    first, out, images, spec = cli_run
    npz = sorted(out.glob("result-*.npz"))
    target = tmp_path / "never"
    both = invoke("compare", *npz, "--model", spec, "--out", target)
    assert_clean_error(both, 2, "not both")
    with_aa = invoke("compare", *npz, "--antialias", 2, "--out", target)
    assert_clean_error(with_aa, 2, "--antialias needs --model")
    single = invoke("compare", "--model", spec, "--weights", "none", *FAST, "--images", images,
                    "--out", target)
    assert_clean_error(single, 2, "two models")
    nothing = invoke("compare", "--out", target)
    assert_clean_error(nothing, 2, "nothing to compare")
    assert not target.exists()


def test_cli_antialias_with_a_baseline_checkpoint_copies_its_weights(cli_run, tmp_path):
    _, _, images, spec = cli_run
    baseline = seeded_load(spec, weights="none").model
    torch.save(baseline.state_dict(), tmp_path / "base.pth")
    out = tmp_path / "out"
    result = invoke("compare", "--model", spec, "--antialias", 2, "--weights", tmp_path / "base.pth",
                    *FAST, "--images", images, "--out", out, "--format", "png")
    assert result.exit_code == 0, everything(result)
    assert len(list(out.glob("result-*.npz"))) == 2


def _pool5_like_pair():
    """A baseline whose last max-pool gives 3x3 at 14 px and its circular BlurPool copy, whose
    pool gives 4x4 (the vgg16 pool5 case at 112 px with --padding circular)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    images = torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(0))
    grid = shiftlab.ShiftGrid.square(2)
    base = shiftlab.measure(shiftlab.circular_padding(net), images, grid, progress=False)
    aa = shiftlab.measure(shiftlab.circular_padding(shiftlab.antialias(net, 4)), images, grid,
                          progress=False)
    return base, aa


def test_a_blurpool_one_pixel_larger_than_its_maxpool_still_pairs_with_it():
    base, aa = _pool5_like_pair()
    assert base.layer("5").shape[1:] == (3, 3) and aa.layer("7").shape[1:] == (4, 4)
    table = shiftlab.compare(base, aa, labels=["base", "aa"]).summary()
    last = table.iloc[-1]
    assert (last["layer[base]"], last["layer[aa]"]) == ("5", "7")


def test_compare_gives_every_layer_of_both_models_a_row():
    base, aa = _pool5_like_pair()
    comparison = shiftlab.compare(base, aa, labels=["base", "aa"])
    table = comparison.summary()
    assert set(table["layer[base]"]) - {""} == set(base.layer_names)
    assert set(table["layer[aa]"]) - {""} == set(aa.layer_names)
    # the stride-1 max-pools in front of each BlurPool have no baseline partner
    assert comparison.unmatched == {"base": [], "aa": ["2", "6"]}
    alone = table[table["layer[base]"] == ""]
    assert list(alone["layer[aa]"]) == ["2", "6"] and alone["mean[base]"].isna().all()
    # rows keep each network's order
    order = [name for name in table["layer[aa]"] if name]
    assert order == aa.layer_names


def test_cli_compare_names_layers_without_a_partner_on_stderr(cli_run):
    result = cli_run[0]
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if "without a partner" in line]
    assert len(lines) == 1 and "+aa2" in lines[0], result.stderr
