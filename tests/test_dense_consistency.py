"""Output-level metrics of dense models: per-pixel agreement, mASSC, output distances, EQ-T,
mIoU and pixel accuracy under shifts, their known answers, files, figures and the CLI."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import shiftlab
from shiftlab.cli.commands import main
from shiftlab.errors import ModelError, UsageError
from shiftlab.figures.dense import agreement_by_shift_plot, agreement_map_plot
from shiftlab.invariance.dense import is_dense, measure_dense, pixel_classes
from shiftlab.invariance.dense_result import load_dense, mean_iou

import dense_nets

NETS = Path(dense_nets.__file__).resolve()
FAST = ["--size", "24", "--max-shift", "2", "--device", "cpu", "--format", "png", "--dpi", "30",
        "--quiet"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MPLBACKEND", "Agg")


def _images(size: int, count: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _measure(model, images, grid, **options):
    return measure_dense(model, images, grid, device="cpu", progress=False, **options)


def _even(grid: shiftlab.ShiftGrid) -> np.ndarray:
    return np.array([dh % 2 == 0 and dw % 2 == 0 for dh, dw in grid.shifts])


# -- known answers ---------------------------------------------------------------------------
def test_circular_stride_1_fcn_agrees_everywhere_with_zero_output_distance_at_every_shift():
    grid = shiftlab.ShiftGrid.square(4)
    result = _measure(dense_nets.circular_fcn(), _images(16), grid)
    assert (result.agree == result.valid).all() and (result.valid == 16 * 16).all()
    summary = result.summary()
    assert summary["massc"] == 1.0 and summary["agreement"] == 1.0
    assert np.nanmax(result.cosine) <= 1e-6 and np.nanmax(result.l2) <= 1e-6
    assert summary["eq_t_db"] > 100  # equal maps up to float rounding: inf or nearly so
    assert np.nanmin(result.agreement_map()) == 1.0


def test_one_stride_2_max_pool_then_nearest_upsampling_is_exact_at_even_shifts_only():
    grid = shiftlab.ShiftGrid.square(4)
    result = _measure(dense_nets.pool_upsample(), _images(16, count=3), grid)
    even = _even(grid)
    assert (result.agreement[even] == 1.0).all()
    assert np.nanmax(result.cosine[:, even]) <= 1e-6
    assert (result.agreement[~even] < 0.95).all()
    assert np.nanmin(result.cosine[:, ~even]) > 1e-3
    assert np.isinf(result.eq_t[even]).all() or result.eq_t[even].min() > 100
    assert result.eq_t[~even].max() < 40


def test_crop_mode_counts_only_the_pixels_both_windows_see():
    grid = shiftlab.ShiftGrid.symmetric(2)
    canvases = _images(16 + 2 * 2)
    result = _measure(dense_nets.threshold(), canvases, grid, mode="crop")
    overlap = np.array([(16 - abs(dh)) * (16 - abs(dw)) for dh, dw in grid.shifts])
    assert (result.valid == overlap).all()
    # pixel-wise, so every overlapping pixel agrees; the pixels that entered never count
    assert (result.agree == result.valid).all() and result.summary()["massc"] == 1.0
    counts = result.agreement_count
    assert counts[0, 0] < counts[8, 8]  # a corner is seen by fewer shifts than the centre


def test_circular_mode_compares_every_pixel_rolled_back():
    grid = shiftlab.ShiftGrid.square(3)
    result = _measure(dense_nets.threshold(), _images(12), grid)
    assert (result.valid == 144).all() and (result.agree == 144).all()


def test_predictions_equal_to_the_masks_have_pixel_accuracy_and_miou_1_at_every_shift():
    images = _images(20)
    masks = (images[:, 0] > 0).long()
    masks[:, :2] = 255  # an ignored band does not count
    result = _measure(dense_nets.threshold(), images, shiftlab.ShiftGrid.square(3), masks=masks)
    assert (result.pixel_accuracy == 1.0).all() and (result.miou == 1.0).all()
    assert (result.labelled == 20 * 18).all()
    summary = result.summary()
    assert summary["miou"] == 1.0 and summary["pixel_accuracy"] == 1.0


def test_crop_mode_scores_each_shifted_window_against_its_own_mask():
    canvases = _images(16 + 4)
    masks = (canvases[:, 0] > 0).long()
    result = _measure(dense_nets.threshold(), canvases, shiftlab.ShiftGrid.symmetric(2),
                      mode="crop", masks=masks)
    assert (result.pixel_accuracy == 1.0).all() and (result.labelled == 256).all()


def test_a_constant_prediction_scores_the_share_of_its_class_and_the_iou_of_the_classes():
    images = torch.zeros(2, 3, 8, 8) - 1.0  # red < 0 everywhere: class 0 is predicted
    masks = torch.zeros(2, 8, 8, dtype=torch.long)
    masks[:, :, :2] = 1  # a quarter of the pixels is class 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every pixel is one class: uninformative, said once
        result = _measure(dense_nets.threshold(), images, shiftlab.ShiftGrid.square(2),
                          masks=masks)
    # circular shifts of a mask with a band of class 1 keep a quarter of its pixels there
    assert np.allclose(result.pixel_accuracy, 0.75)
    assert np.allclose(result.miou, (0.75 + 0.0) / 2)


def test_mean_iou_averages_over_the_classes_that_occur():
    confusion = np.array([[4, 0, 0], [2, 2, 0], [0, 0, 0]])  # class 2 never occurs
    assert mean_iou(confusion) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert math.isnan(mean_iou(np.zeros((2, 2))))


def test_batch_size_does_not_change_any_number():
    grid = shiftlab.ShiftGrid.square(3)
    images = _images(16, count=3)
    masks = (images[:, 1] > 0).long()
    one = _measure(dense_nets.pool_upsample(), images, grid, masks=masks, batch_size=1)
    many = _measure(dense_nets.pool_upsample(), images, grid, masks=masks, batch_size=32)
    for name in ("agree", "valid", "pair_agree", "pair_valid", "confusion", "image_confusion"):
        assert np.array_equal(getattr(one, name), getattr(many, name)), name
    assert np.allclose(one.cosine, many.cosine, atol=1e-6)


def test_mASSC_pairs_compare_the_two_shifted_outputs_on_pixels_both_see():
    grid = shiftlab.ShiftGrid.square(4)
    result = _measure(dense_nets.pool_upsample(), _images(16, count=2), grid, n_pairs=200)
    same = result.pairs[:, 1] == result.pairs[:, 2]
    assert (result.pair_agree[same] == result.pair_valid[same]).all()
    both_even = _even(grid)[result.pairs[:, 1]] & _even(grid)[result.pairs[:, 2]]
    assert (result.pair_agree[both_even] == result.pair_valid[both_even]).all()
    assert result.summary()["massc"] < 1.0
    assert (result.pairs[:, 0] == np.arange(200) % 2).all()


def test_the_agreement_map_pools_every_image_and_non_zero_shift():
    grid = shiftlab.ShiftGrid.square(3)
    result = _measure(dense_nets.pool_upsample(), _images(12), grid)
    moved = [k for k, s in enumerate(grid.shifts) if s != (0, 0)]
    assert result.agreement_sum.sum() == result.agree[:, moved].sum()
    assert result.agreement_count.sum() == result.valid[:, moved].sum()
    assert result.agreement_map().shape == (12, 12)


def test_non_finite_pixels_never_agree_and_are_counted_with_a_warning():
    with pytest.warns(UserWarning, match="NaN or Inf"):
        result = _measure(dense_nets.NaNCorner().eval(), _images(8), shiftlab.ShiftGrid.square(2))
    assert result.n_nonfinite > 0
    assert (result.valid < 64).all()
    assert pixel_classes(torch.full((1, 2, 1, 1), math.nan)).item() == -1


# -- results ------------------------------------------------------------------------------------
def test_a_saved_result_loads_with_every_number():
    images = _images(12)
    masks = (images[:, 0] > 0).long()
    result = _measure(dense_nets.pool_upsample(), images, shiftlab.ShiftGrid.square(2),
                      masks=masks).with_label("net")
    loaded = load_dense(result.save(Path(pytest.importorskip("tempfile").mkdtemp()) / "d.npz"))
    assert loaded.label == "net" and loaded.settings == result.settings
    assert loaded.summary() == result.summary()
    assert loaded.to_frame().equals(result.to_frame())


def test_per_shift_table_has_one_row_per_shift_with_intervals():
    grid = shiftlab.ShiftGrid.square(3)
    frame = _measure(dense_nets.pool_upsample(), _images(12), grid).to_frame()
    assert len(frame) == 9
    assert (frame["ci_low"] <= frame["agreement"]).all()
    assert (frame["agreement"] <= frame["ci_high"]).all()
    assert {"cosine", "l2", "psnr", "eq_t_db", "pixels"} <= set(frame.columns)


def test_figures_show_one_panel_per_model_and_a_miou_panel_with_masks():
    images = _images(12)
    masks = (images[:, 0] > 0).long()
    grid = shiftlab.ShiftGrid.square(3)
    base = _measure(dense_nets.pool_upsample(), images, grid, masks=masks).with_label("base")
    other = _measure(dense_nets.threshold(), images, grid, masks=masks).with_label("other")
    labels = [ax.get_label() for ax in agreement_map_plot([base, other]).axes]
    assert labels[:2] == ["agreement:base", "agreement:other"]
    curves = agreement_by_shift_plot([base, other]).axes
    assert [ax.get_label() for ax in curves] == ["agreement by shift", "miou by shift"]
    assert len(curves[0].get_lines()) == 4  # per model: mean by |δ|, mASSC by |δ1 − δ2|


# -- bad input -----------------------------------------------------------------------------------
def test_an_output_smaller_than_the_input_is_refused_with_the_fix():
    with pytest.raises(ModelError, match="upsampled to the input's size"):
        _measure(dense_nets.Strided().eval(), _images(8), shiftlab.ShiftGrid.square(2))


def test_sub_pixel_shifts_are_refused():
    with pytest.raises(UsageError, match="whole-pixel"):
        _measure(dense_nets.threshold(), _images(8), shiftlab.ShiftGrid.square(2, subpixel=2))


def test_a_mask_value_that_is_no_class_is_refused():
    masks = torch.full((2, 8, 8), 7)
    with pytest.raises(UsageError, match="mask value 7 is not a class"):
        _measure(dense_nets.threshold(), _images(8), shiftlab.ShiftGrid.square(2), masks=masks)


def test_masks_of_another_shape_are_refused():
    with pytest.raises(UsageError, match="masks must be a tensor"):
        _measure(dense_nets.threshold(), _images(8), shiftlab.ShiftGrid.square(2),
                 masks=torch.zeros(2, 4, 4, dtype=torch.long))


def test_dense_models_are_told_from_classifiers_by_their_output():
    assert is_dense(dense_nets.pool_upsample(), 16)
    assert not is_dense(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)),
                        16)


# -- the pipeline and the CLI ---------------------------------------------------------------------
def test_a_torchvision_segmentation_model_gives_a_dense_result():
    # random init: MobileNetV3's activations vanish, every pixel is one class (said once)
    with pytest.warns(UserWarning, match="uninformative: every unshifted pixel is class"):
        result = shiftlab.runs.consistency("lraspp_mobilenet_v3_large", weights="none", size=32,
                                           max_shift=2, max_images=1, device="cpu",
                                           progress=False)
    assert result.kind == "dense" and result.n_classes == 21
    assert result.valid.shape == (1, 4)


@pytest.fixture
def mask_folder(tmp_path) -> Path:
    from shiftlab.data.masks import write_demo_masks

    write_demo_masks(tmp_path / "masks", size=40)
    return tmp_path / "masks"


def test_consistency_on_a_dense_model_with_masks_writes_numbers_and_figures(tmp_path, mask_folder):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample",
                                       "--antialias", "3", "--labels", str(mask_folder),
                                       "--max-images", "2", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mASSC (pairs)" in result.stdout and "mIoU" in result.stdout
    assert {p.name for p in out.iterdir()} == {
        "dense-dense_nets_pool_upsample.npz", "dense-dense_nets_pool_upsample_aa3.npz",
        "consistency.csv", "summary.csv", "agreement.png", "shift-size.png"}
    loaded = load_dense(out / "dense-dense_nets_pool_upsample.npz")
    assert loaded.has_masks and loaded.n_images == 2


def test_consistency_on_a_dense_model_without_masks_uses_the_images(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:circular_fcn",
                                       "--max-images", "2", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mIoU" not in result.stdout
    loaded = load_dense(out / "dense-dense_nets_circular_fcn.npz")
    assert not loaded.has_masks and loaded.summary()["massc"] == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--protocol", "zhang2019", "--resize", "32"], "draws windows for classifiers"),
    (["--subpixel", "2"], "whole-pixel"),
    (["--class-order", "sorted"], "masks hold class indices"),
])
def test_options_a_dense_model_cannot_use_are_refused_in_one_line(tmp_path, mask_folder, extra,
                                                                  message):
    fast = [a for a in FAST if a not in ("--max-shift", "2")] if "--protocol" in extra else FAST
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample", "--labels",
                                       str(mask_folder), *fast, *extra,
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_ignore_index_without_masks_is_refused(tmp_path):
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample",
                                       "--ignore-index", "0", *FAST])
    assert result.exit_code != 0 and "--ignore-index" in result.output


def test_a_classifier_and_a_dense_model_in_one_run_are_refused(tmp_path):
    conftest = Path(__file__).resolve().with_name("conftest.py")
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample", "-m",
                                       f"{conftest}:tiny_classifier", "--max-images", "2",
                                       *FAST, "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "separate runs" in result.output


def test_plot_redraws_the_figures_of_a_saved_dense_result(tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample",
                                      "--max-images", "1", *FAST, "--out", str(out)])
    assert first.exit_code == 0, first.output
    (out / "agreement.png").unlink()
    again = CliRunner().invoke(main, ["plot", str(out / "dense-dense_nets_pool_upsample.npz"),
                                      "--format", "png", "--dpi", "30"])
    assert again.exit_code == 0, again.output
    assert (out / "agreement.png").exists() and (out / "shift-size.png").exists()


def test_massc_by_distance_is_1_between_inputs_an_even_shift_apart_for_pool_upsample():
    grid = shiftlab.ShiftGrid.square(4)
    result = _measure(dense_nets.pool_upsample(), _images(16, count=2), grid, n_pairs=400)
    lengths, massc = result.massc_by_distance()
    assert lengths[0] == 0.0 and massc[0] == 1.0  # a pair of equal shifts always agrees
    assert np.isclose(massc[np.isclose(lengths, 2.0)], 1.0).all()  # (0, 2) and (2, 0) apart
    assert massc[np.isclose(lengths, 1.0)].max() < 1.0


def test_crop_mode_streams_mask_canvases_that_match_the_image_canvases(tmp_path, mask_folder):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["consistency", "-m", f"{NETS}:pool_upsample", "--labels",
                                       str(mask_folder), "--mode", "crop", "--grid", "symmetric",
                                       "--max-images", "2", *FAST, "--out", str(out)])
    assert result.exit_code == 0, result.output
    loaded = load_dense(out / "dense-dense_nets_pool_upsample.npz")
    assert loaded.settings.mode == "crop" and loaded.settings.margin == 2
    overlap = np.array([(24 - abs(dh)) * (24 - abs(dw)) for dh, dw in loaded.grid.shifts])
    assert (loaded.valid == overlap).all()  # no pixel compared twice or out of the overlap
    assert (loaded.labelled <= 24 * 24).all() and loaded.labelled.sum() > 0
