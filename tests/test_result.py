"""Result: access, tables, Settings comparison, and the .npz save/load round trip."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import shiftlab
import shiftlab.results.result
from shiftlab import ShiftGrid
from shiftlab.errors import ShiftlabError, UsageError
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.results.result import Result, Settings, load

from conftest import tiny_classifier

FRAME_COLUMNS = ["layer", "depth", "module", "kind", "stride", "dh", "dw", "mean", "std", "n"]


@pytest.fixture(scope="module")
def measured() -> Result:
    """A real measurement: the stride-4 tiny classifier, 3 images, a 3x3 grid."""
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return shiftlab.measure(tiny_classifier(), images, ShiftGrid.square(3), device="cpu",
                            progress=False, meta={"model": "tiny", "tags": ["a", 1], "seed": 7})


def _same_layer(a: LayerInfo, b: LayerInfo) -> bool:
    """Field-wise equality where NaN strides (global layers) count as equal."""
    def same(x, y):
        return all((u == v) or (math.isnan(u) and math.isnan(v)) for u, v in zip(x, y))
    return ((a.name, a.module, a.kind, a.shape) == (b.name, b.module, b.kind, b.shape)
            and same(a.stride, b.stride) and same(a.measured_stride, b.measured_stride))


def _handmade(grid: ShiftGrid, mean_rows: list[list[float]], names=("a", "b")) -> Result:
    layers = [LayerInfo(name, "Conv2d", "spatial", (1.0, 1.0), (1.0, 1.0), (2, 4, 4))
              for name in names]
    mean = np.asarray(mean_rows, dtype=np.float64)
    shape = mean.shape
    return Result(Settings(grid=grid, size=(4, 4)), layers, mean, np.zeros(shape),
                  np.ones(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64))


# -- save / load ----------------------------------------------------------------------------
def test_save_then_load_gives_back_the_same_result(measured, tmp_path):
    path = measured.save(tmp_path / "run" / "result.npz")
    assert path == tmp_path / "run" / "result.npz" and path.is_file()
    loaded = load(path)
    for name in ("mean", "std", "n", "n_inf", "n_nan"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(measured, name))
        assert getattr(loaded, name).dtype == getattr(measured, name).dtype
    assert loaded.settings == measured.settings
    assert loaded.settings.grid.kind == "square"
    assert loaded.layer_names == measured.layer_names
    assert all(_same_layer(a, b) for a, b in zip(loaded.layers, measured.layers))
    assert loaded.meta == measured.meta
    assert loaded.meta["model"] == "tiny" and loaded.meta["n_images"] == 3


def test_loaded_layer_infos_compare_equal_to_the_saved_ones(measured, tmp_path):
    loaded = load(measured.save(tmp_path / "result.npz"))
    assert loaded.layers == measured.layers


def test_save_round_trips_settings_of_a_crop_run_with_a_layer_filter(tmp_path):
    grid = ShiftGrid.explicit([(0.5, -1), (2, 0)])
    settings = Settings(grid=grid, mode="crop", align="fourier", metric="psnr", size=(10, 12),
                        margin=2, border=1, layers=("features.*", "Conv2d"))
    result = _handmade(grid, [[0.1, math.inf], [math.nan, 2.0]])
    result.settings = settings
    loaded = load(result.save(tmp_path / "crop.npz"))
    assert loaded.settings == settings
    assert loaded.settings.differences(settings) == []
    np.testing.assert_array_equal(loaded.mean, result.mean)  # inf and NaN survive


def test_the_header_is_json_inside_the_npz_and_needs_no_pickle(measured, tmp_path):
    path = measured.save(tmp_path / "result.npz")
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"mean", "std", "n", "n_inf", "n_nan", "header"}
        assert data["header"].dtype.kind == "U"
        header = json.loads(str(data["header"]))
    assert header["format"] == shiftlab.results.result.FORMAT_VERSION
    assert header["settings"]["mode"] == "circular"
    assert header["settings"]["grid"]["shifts"][1] == [0.0, 1.0]
    assert [item["name"] for item in header["layers"]] == measured.layer_names
    assert header["provenance"]["model"] == "tiny"


def test_the_header_is_strict_json(measured, tmp_path):
    path = measured.save(tmp_path / "result.npz")
    with np.load(path, allow_pickle=False) as data:
        text = str(data["header"])

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON token {token}")

    json.loads(text, parse_constant=refuse)


def test_load_of_a_missing_file_raises_shiftlab_error(tmp_path):
    with pytest.raises(ShiftlabError, match="no result file"):
        load(tmp_path / "absent.npz")
    with pytest.raises(ShiftlabError):
        load(tmp_path)  # a folder is not a result file either


def test_load_of_a_file_that_is_not_an_npz_raises_shiftlab_error(tmp_path):
    path = tmp_path / "result.npz"
    path.write_text("mean,std\n0.1,0.2\n")
    with pytest.raises(ShiftlabError, match="not a shiftlab result"):
        load(path)


def test_load_of_an_npz_without_header_raises_shiftlab_error(tmp_path):
    path = tmp_path / "result.npz"
    np.savez(path, mean=np.zeros((1, 1)), std=np.zeros((1, 1)))
    with pytest.raises(ShiftlabError, match="not a shiftlab result"):
        load(path)


def test_load_of_an_npz_whose_header_is_not_json_raises_shiftlab_error(tmp_path):
    path = tmp_path / "result.npz"
    zeros = np.zeros((1, 1))
    np.savez(path, mean=zeros, std=zeros, n=zeros, n_inf=zeros, n_nan=zeros, header=np.array("{oops"))
    with pytest.raises(ShiftlabError):
        load(path)


def test_load_of_another_format_version_raises_shiftlab_error(measured, tmp_path):
    path = tmp_path / "result.npz"
    with np.load(measured.save(path), allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    header = json.loads(str(arrays["header"]))
    header["format"] = 99
    arrays["header"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    with pytest.raises(ShiftlabError, match="format 99"):
        load(path)


def test_load_of_a_header_without_settings_raises_shiftlab_error(tmp_path):
    path = tmp_path / "result.npz"
    zeros = np.zeros((1, 1))
    np.savez(path, mean=zeros, std=zeros, n=zeros, n_inf=zeros, n_nan=zeros,
             header=np.array(json.dumps({"format": 1})))
    with pytest.raises(ShiftlabError):
        load(path)


def test_a_failed_save_leaves_the_previous_file_intact_and_no_temp_file(measured, tmp_path,
                                                                          monkeypatch):
    path = measured.save(tmp_path / "result.npz")
    before = path.read_bytes()

    def broken_writer(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez_compressed", broken_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        measured.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["result.npz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(load(path).mean, measured.mean)


def test_save_into_an_unwritable_place_raises_shiftlab_error(measured, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ShiftlabError, match="cannot write"):
        measured.save(blocker / "result.npz")


# -- tables ---------------------------------------------------------------------------------
def test_to_frame_has_one_row_per_layer_and_shift_with_the_stored_values(measured):
    frame = measured.to_frame()
    assert list(frame.columns) == FRAME_COLUMNS
    n_layers, n_shifts = len(measured.layers), len(measured.grid)
    assert len(frame) == n_layers * n_shifts
    for depth, info in enumerate(measured.layers):
        rows = frame[frame["layer"] == info.name]
        assert rows["depth"].tolist() == [depth] * n_shifts
        assert rows["kind"].iloc[0] == info.kind and rows["module"].iloc[0] == info.module
        assert list(zip(rows["dh"], rows["dw"])) == list(measured.grid.shifts)
        np.testing.assert_array_equal(rows["mean"].to_numpy(), measured.mean[depth])
        np.testing.assert_array_equal(rows["std"].to_numpy(), measured.std[depth])
        np.testing.assert_array_equal(rows["n"].to_numpy(), measured.n[depth])
    conv2 = frame[frame["layer"] == "3"]
    assert conv2["stride"].iloc[0] == 4.0


def test_summary_has_one_row_per_layer_with_mean_and_max_over_shifts(measured):
    summary = measured.summary()
    assert summary["layer"].tolist() == measured.layer_names
    others = np.any(np.asarray(measured.grid.shifts) != 0, axis=1)  # the zero shift is left out
    for depth, name in enumerate(measured.layer_names):
        row = summary.iloc[depth]
        assert row["mean"] == pytest.approx(np.nanmean(measured.mean[depth][others]))
        assert row["max"] == pytest.approx(np.nanmax(measured.mean[depth][others]))
        assert row["defined_shifts"] == len(measured.grid) - 1
    assert summary.iloc[0]["shape"] == "8x16x16"


def test_summary_and_layer_mean_skip_undefined_shifts():
    result = _handmade(ShiftGrid.explicit([(0, 0), (1, 0), (0, 1)]),
                       [[0.0, math.nan, 0.4], [math.nan, math.nan, math.nan]])
    assert result.layer_mean("a") == pytest.approx(0.4)  # (0, 0) is not averaged in
    assert math.isnan(result.layer_mean("b"))
    summary = result.summary()
    assert summary["defined_shifts"].tolist() == [1, 0]
    assert summary["max"].iloc[0] == pytest.approx(0.4) and math.isnan(summary["max"].iloc[1])


# -- maps -----------------------------------------------------------------------------------
def test_map_of_a_square_grid_puts_the_value_of_shift_dh_dw_at_row_dh_column_dw(measured):
    values = measured.values("3")
    grid_map = measured.map("3")
    assert grid_map.shape == (3, 3)
    for index, (dh, dw) in enumerate(measured.grid.shifts):
        assert grid_map[int(dh), int(dw)] == values[index]
    np.testing.assert_array_equal(measured.map("3", "n"), np.full((3, 3), 3.0))


def test_map_of_an_explicit_grid_is_nan_where_a_shift_is_absent():
    grid = ShiftGrid.explicit([(1, 0), (-1, 2), (1, 2)])
    result = _handmade(grid, [[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]])
    expected = np.array([[np.nan, 20.0], [10.0, 30.0]])  # rows dh = -1, 1; columns dw = 0, 2
    np.testing.assert_array_equal(result.map("a"), expected)
    np.testing.assert_array_equal(result.map("b"), expected / 10)


def test_an_unknown_layer_raises_usage_error(measured):
    for access in (measured.map, measured.values, measured.layer, measured.layer_mean):
        with pytest.raises(UsageError, match="no layer named"):
            access("features.99")


def test_an_unknown_statistic_raises_usage_error(measured):
    with pytest.raises(UsageError):
        measured.values("0", "median")


# -- Settings -------------------------------------------------------------------------------
def test_settings_differences_name_the_fields_that_differ():
    base = Settings(grid=ShiftGrid.square(3))
    assert base.differences(Settings(grid=ShiftGrid.square(3))) == []
    other = Settings(grid=ShiftGrid.square(4), mode="crop", align="exact", margin=2)
    names = [item.split(" ")[0] for item in base.differences(other)]
    assert names == ["grid", "mode", "align", "margin"]
    assert "9 vs 16" in base.differences(other)[0]
    assert "circular" in base.differences(other)[1] and "crop" in base.differences(other)[1]


def test_settings_differences_see_different_shifts_of_the_same_count():
    base = Settings(grid=ShiftGrid.square(2))
    moved = Settings(grid=ShiftGrid.explicit([(0, 0), (0, 1), (1, 0), (2, 2)]))
    assert base.differences(moved) == ["grid (different shifts)"]


def test_settings_differences_ignore_the_layer_filter_and_the_grid_kind():
    base = Settings(grid=ShiftGrid.diagonal(2), layers=None)
    other = Settings(grid=ShiftGrid.explicit([(0, 0), (1, 1)]), layers=("features.*",))
    assert base.differences(other) == []


def test_settings_round_trip_through_a_dict():
    settings = Settings(grid=ShiftGrid.symmetric(1), mode="crop", metric="l2", size=(5, 7),
                        margin=1, border=2, layers=("a", "b"))
    assert Settings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
