"""Output-level invariance (shiftlab.invariance.grid, `shiftlab consistency`): known answers first.

Known answers:
* an exactly invariant classifier (circular convs + global average pool + linear) keeps its
  prediction under every circular shift: consistency 1, flip rate 0, MAC 0;
* a classifier that reads the row parity of its input flips its prediction with the parity of
  dh: consistency vs. reference 1 at even dh and 0 at odd dh, 1/2 pairwise on square(2).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.cli.commands import main
from shiftlab.errors import ImageError, ModelError, ShiftlabError, UsageError
from shiftlab.data.labels import read_labels
from shiftlab.invariance.grid import default_diagonal, measure_invariance
from shiftlab.invariance.grid_result import load_invariance, wilson_interval
from shiftlab.equivariance.shifts import fourier_shift_many

from conftest import make_global_pool, tiny_classifier

# tiny random nets often predict one class everywhere: that warning is expected here
pytestmark = pytest.mark.filterwarnings("ignore:.*consistency is uninformative")

CONFTEST = Path(__file__).resolve().with_name("conftest.py")
TINY = f"{CONFTEST}:tiny_classifier"
FAST = ["--weights", "none", "--size", "16", "--max-shift", "2", "--pairs", "50", "--max-images",
        "2", "--device", "cpu", "--format", "png", "--dpi", "30", "--quiet"]
OUTPUTS = {"consistency.csv", "summary.csv", "probability.png",
           "invariance-conftest_tiny_classifier.npz"}




@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("SHIFTLAB_DEBUG", raising=False)


def run(model, images, grid, **options):
    return measure_invariance(model, images, grid, device="cpu", progress=False, **options)


class RowParity(nn.Module):
    """Logits [sum of even rows, sum of odd rows] (even columns only): the argmax is the row
    parity that carries the larger values, so a shift by an odd dh swaps it."""

    def __init__(self) -> None:
        super().__init__()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[..., ::2, ::2].sum((1, 2, 3)), x[..., 1::2, ::2].sum((1, 2, 3))], 1)


def parity_images(count: int = 3, side: int = 16, flip: tuple[int, ...] = ()) -> torch.Tensor:
    """+3 on even rows, -3 on odd rows, plus small noise; images in ``flip`` have it inverted."""
    rows = torch.where(torch.arange(side) % 2 == 0, 3.0, -3.0)[:, None].expand(side, side)
    noise = 0.1 * torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(3))
    images = rows + noise
    for index in flip:
        images[index] = -rows + noise[index]
    return images


def linear_invariant(seed: int = 0) -> nn.Module:
    """Circular conv + global average pool + linear, no nonlinearity: invariant to any
    band-limited (fractional) circular shift, because the mean is the untouched DC term."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5)).eval()


@pytest.fixture(scope="module")
def random_images() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def coloured_images() -> torch.Tensor:
    """Noise plus a strong colour per image, so that the random-weight invariant models below
    predict several classes (consistency 1 of a one-class model would prove nothing)."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 16, 16, generator=generator) + 5 * torch.randn(6, 3, 1, 1, generator=generator)


# -- known answers ---------------------------------------------------------------------------
def test_invariant_model_is_fully_consistent_with_no_flips_and_no_probability_change(coloured_images):
    result = run(make_global_pool(seed=2), coloured_images, ShiftGrid.square(4), n_pairs=200)
    assert result.uninformative is None and len(set(result.reference_argmax)) == 3
    np.testing.assert_array_equal(result.consistency, 1.0)
    summary = result.summary()
    assert summary["pairwise_consistency"] == 1.0 and summary["n_pairs"] == 200
    assert summary["pairwise_consistency_all_pairs"] == 1.0
    assert summary["consistency_vs_reference"] == 1.0
    assert summary["consistent_all_shifts"] == 1.0 and summary["n_nonfinite"] == 0
    assert (summary["pairwise_ci_low"], summary["pairwise_ci_high"]) == (1.0, 1.0)
    assert result.flip_rate == 0.0
    assert result.mac <= 1e-6
    assert np.abs(result.grid_prob - result.grid_prob[:, :1]).max() <= 1e-6


def test_linear_invariant_model_stays_invariant_under_subpixel_shifts(coloured_images):
    grid = ShiftGrid.square(2, subpixel=4)  # steps of 0.25 px
    result = run(linear_invariant(), coloured_images, grid, n_pairs=100)
    assert not grid.is_integer and result.uninformative is None
    np.testing.assert_array_equal(result.consistency, 1.0)
    assert result.flip_rate == 0.0 and result.mac <= 1e-6
    assert result.summary()["step_px"] == 0.25 and len(result.diagonal_steps) == 8


def test_row_parity_model_agrees_with_the_reference_at_even_dh_only():
    result = run(RowParity(), parity_images(), ShiftGrid.square(2), n_pairs=400)
    frame = result.to_frame()
    assert list(frame["consistency"]) == [1.0, 1.0, 0.0, 0.0]  # (0,0) (0,1) (1,0) (1,1)
    assert list(frame["dh"]) == [0, 0, 1, 1]
    assert result.summary()["consistency_vs_reference"] == 0.5


def test_row_parity_model_pairwise_consistency_is_one_half_on_square_2():
    """Derivation: square(2) = {(0,0), (0,1), (1,0), (1,1)}; the prediction is dh mod 2. δ1, δ2
    are drawn independently and uniformly, so P[same prediction] = P[dh1 = dh2] =
    P[both 0] + P[both 1] = (2/4)² + (2/4)² = 1/2 — the all-pairs value Σ_c (n_c/S)² with
    n_0 = n_1 = 2, S = 4. The sampled estimate is exactly the share of drawn pairs whose dh
    parities agree, and with 2000 pairs its 95% interval covers 1/2."""
    grid = ShiftGrid.square(2)
    result = run(RowParity(), parity_images(), grid, n_pairs=2000, seed=5)
    assert result.pairwise_consistency_all_pairs == 0.5
    dh = np.array([s[0] for s in grid.shifts])
    _, first, second = result.pairs.T
    assert result.pairwise_consistency == pytest.approx(float(np.mean(dh[first] == dh[second])))
    low, high = result.pairwise_interval
    assert low < 0.5 < high and high - low < 0.05
    assert result.summary()["n_pairs"] == 2000 == len(result.pairs)


def test_row_parity_model_flips_at_every_diagonal_step():
    result = run(RowParity(), parity_images(), ShiftGrid.square(2), n_pairs=10,
                 diagonal=ShiftGrid.diagonal(5))
    assert result.flip_rate == 1.0
    # the logit gap is ~1000, so the reference class's probability alternates 1, 0, 1, 0, 1
    np.testing.assert_allclose(result.diagonal_prob, [[1, 0, 1, 0, 1]] * 3, atol=1e-12)
    assert result.mac == pytest.approx(1.0)


def test_accuracy_per_shift_follows_the_labels():
    # image 0: even pattern (class 0), image 1: odd pattern (class 1), image 2: mislabelled
    images = parity_images(flip=(1,))
    result = run(RowParity(), images, ShiftGrid.square(2), labels=[0, 1, 1], n_pairs=10)
    np.testing.assert_allclose(result.accuracy, [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    summary = result.summary()
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["accuracy_unshifted"] == pytest.approx(2 / 3)
    assert list(result.to_frame()["accuracy"]) == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])


def test_a_dataloader_of_images_and_labels_streams_to_the_same_result():
    from torch.utils.data import DataLoader, TensorDataset

    images = parity_images(count=5, flip=(1, 3))
    labels = torch.tensor([0, 1, 1, 1, 0])
    whole = run(RowParity(), images, ShiftGrid.square(2), labels=labels.tolist(), n_pairs=20)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)  # 3 batches: 2 + 2 + 1
    streamed = run(RowParity(), loader, ShiftGrid.square(2), n_pairs=20)
    assert streamed.n_images == 5
    np.testing.assert_array_equal(streamed.grid_argmax, whole.grid_argmax)
    np.testing.assert_array_equal(streamed.labels, whole.labels)
    np.testing.assert_allclose(streamed.accuracy, whole.accuracy)
    assert streamed.summary()["pairwise_consistency"] == whole.summary()["pairwise_consistency"]


def test_without_labels_there_is_no_accuracy(random_images):
    result = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=10)
    assert result.accuracy is None and "accuracy" not in result.to_frame()
    assert result.summary()["accuracy"] is None


def test_worst_case_shares_need_every_shift_consistent_or_correct():
    """Image 0 (even rows, label 0) and image 1 (odd rows, label 1) are correct at even dh only;
    image 2 (even rows, label 1) is never correct. On square(2) (odd dh included) no image is
    consistent or correct at every shift; on dh = 0 only, all are consistent, 2 of 3 correct."""
    images, labels = parity_images(flip=(1,)), [0, 1, 1]
    square = run(RowParity(), images, ShiftGrid.square(2), labels=labels, n_pairs=10).summary()
    assert square["consistent_all_shifts"] == 0.0 and square["correct_all_shifts"] == 0.0
    assert square["consistency_vs_reference"] == 0.5
    even = ShiftGrid.explicit([(0, 0), (0, 1), (2, 1)])
    rows = run(RowParity(), images, even, labels=labels, n_pairs=10).summary()
    assert rows["consistent_all_shifts"] == 1.0 and rows["correct_all_shifts"] == pytest.approx(2 / 3)


class NaNForMarked(RowParity):
    """RowParity, but NaN logits for any input whose third channel holds a value > 50."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.where((x[:, 2].flatten(1).amax(1) > 50)[:, None], math.nan, out)


def test_nan_outputs_are_left_out_counted_and_named_in_a_warning():
    """Image 0 gives NaN at every shift. Before, NaN's argmax (class 0 every time) counted as
    agreement and, with label 0, as correct; now the numbers are those of images 1 and 2."""
    images = parity_images()
    images[0, 2, 5, 5] = 100.0
    with pytest.warns(UserWarning, match=r"^parity: 4 of 12 outputs have NaN or Inf logits"):
        result = run(NaNForMarked(), images, ShiftGrid.square(2), labels=[0, 0, 0], n_pairs=60,
                     meta={"label": "parity"})
    np.testing.assert_array_equal(result.consistency, [1, 1, 0, 0])
    np.testing.assert_array_equal(result.to_frame()["n"], [2, 2, 2, 2])
    np.testing.assert_array_equal(result.accuracy, [1, 1, 0, 0])
    assert result.flip_rate == 1.0 and result.pairwise_consistency_all_pairs == 0.5
    summary = result.summary()
    assert summary["n_nonfinite"] == 4 and summary["consistent_all_shifts"] == 0.0
    assert np.isnan(result.diagonal_prob[0]).all() and np.isfinite(result.diagonal_prob[1:]).all()


def test_a_model_with_only_nan_outputs_is_a_model_error(random_images):
    class AllNaN(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 3), math.nan)

    with pytest.raises(ModelError, match="NaN or Inf logits for every input") as info:
        run(AllNaN().eval(), random_images, ShiftGrid.square(2), meta={"model": "broken"})
    assert info.value.exit_code == 1 and str(info.value).startswith("broken")


def dropout_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, padding_mode="circular"),
                         nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(6, 5))


def test_a_model_in_train_mode_is_measured_in_eval_mode_and_given_back_its_modes(coloured_images):
    """In train mode dropout would make the prediction random and BatchNorm would update its
    running statistics; measured in eval mode the circular-conv + GAP model is invariant."""
    model = dropout_classifier().train()
    model[0].eval()  # a submodule the user set on purpose keeps its own mode
    model[1].running_mean.normal_(generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="was in train mode"):
        result = run(model, coloured_images, ShiftGrid.square(3), n_pairs=50)
    assert result.uninformative is None
    np.testing.assert_array_equal(result.consistency, 1.0)
    assert result.pairwise_consistency == 1.0
    assert model.training and model[1].training and model[5].training and not model[0].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_train_mode_is_restored_when_the_forward_fails(random_images):
    model = nn.Conv2d(3, 4, 3).train()
    with pytest.warns(UserWarning, match="train mode"), pytest.raises(ModelError):
        run(model, random_images, ShiftGrid.square(2))
    assert model.training


def test_one_class_for_every_image_and_shift_warns_that_consistency_is_uninformative(random_images):
    class Always2(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 1.0]).expand(x.shape[0], 3) + 0 * x.mean()

    with pytest.warns(UserWarning, match="consistency is uninformative: every prediction is class 2"):
        result = run(Always2().eval(), random_images, ShiftGrid.square(2), n_pairs=10)
    assert result.uninformative == "consistency is uninformative: every prediction is class 2"
    assert result.pairwise_consistency == 1.0  # the number the warning puts in context


# -- fractional shifts -----------------------------------------------------------------------
def test_fourier_shift_by_one_full_pixel_equals_the_integer_roll():
    x = torch.randn(2, 3, 15, 16, generator=torch.Generator().manual_seed(2))
    shifted = fourier_shift_many(x, torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    torch.testing.assert_close(shifted[0], torch.roll(x, (1, 1), (-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted[1], torch.roll(x, (-1, 2), (-2, -1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [0.25, 0.5, 1.7])
def test_fractional_shift_then_its_inverse_returns_odd_sized_input(t):
    x = torch.randn(1, 3, 15, 17, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    there = fourier_shift_many(x, torch.tensor([[t, t]]))[0]
    back = fourier_shift_many(there, torch.tensor([[-t, -t]]))[0]
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_fractional_shift_then_its_inverse_returns_band_limited_even_sized_input():
    """Even sides: the Nyquist row/column of a real image cannot be shifted by a fraction and
    stay real (README), so the round trip is exact only without that component."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spectrum = torch.fft.fft2(x)
    spectrum[..., 8, :] = 0
    spectrum[..., :, 8] = 0
    x = torch.fft.ifft2(spectrum).real
    there = fourier_shift_many(x, torch.tensor([[0.5, 0.3]]))[0]
    back = fourier_shift_many(there, torch.tensor([[-0.5, -0.3]]))[0]
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_whole_pixel_shifts_of_a_subpixel_grid_match_the_integer_grid(random_images):
    """In a sub-pixel grid the whole-pixel shifts go through the FFT too; they must agree."""
    whole = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=10)
    sub = run(tiny_classifier(), random_images, ShiftGrid.square(2, subpixel=2), n_pairs=10)
    columns = [sub.grid.shifts.index(s) for s in whole.grid.shifts]
    np.testing.assert_allclose(sub.grid_prob[:, columns], whole.grid_prob, atol=1e-5)
    np.testing.assert_array_equal(sub.grid_argmax[:, columns], whole.grid_argmax)


def test_crop_mode_with_subpixel_shifts_uses_a_margin_that_holds_them():
    canvases = torch.randn(2, 3, 22, 22, generator=torch.Generator().manual_seed(6))
    grid = ShiftGrid.symmetric(2, subpixel=2)
    result = run(tiny_classifier(), canvases, grid, mode="crop", margin=3, n_pairs=20)
    assert result.settings.size == (16, 16) and result.settings.margin == 3
    assert result.diagonal_steps[0] == -2 and result.diagonal_steps[-1] == 2
    assert result.consistency[grid.shifts.index((0.0, 0.0))] == 1.0
    with pytest.raises(UsageError, match="margin"):
        run(tiny_classifier(), canvases, ShiftGrid.symmetric(4), mode="crop", margin=3)


# -- Wilson interval -------------------------------------------------------------------------
def test_wilson_interval_matches_the_textbook_value_and_contains_the_estimate():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    for k, n in [(0, 5), (3, 7), (7, 7), (500, 1000)]:
        low, high = wilson_interval(k, n)
        assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_shrinks_with_n():
    widths = [np.subtract(*wilson_interval(n // 2, n)[::-1]) for n in (10, 100, 1000, 10000)]
    assert all(a > b for a, b in zip(widths, widths[1:]))
    assert widths[-1] < 0.02


def test_wilson_interval_is_elementwise_and_nan_without_trials():
    low, high = wilson_interval(np.array([0, 2, 0]), np.array([4, 4, 0]))
    assert low[0] == 0 and high[0] < 1 and math.isnan(low[2]) and math.isnan(high[2])


# -- labels ----------------------------------------------------------------------------------
def write_png(path: Path, seed: int = 0, side: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(path)
    return path


CATEGORIES = ["tench", "great white shark", "Goldfish"]


def test_folder_labels_map_class_names_case_insensitively_and_underscores_to_spaces(tmp_path):
    write_png(tmp_path / "GOLDFISH" / "b.png")
    write_png(tmp_path / "great_white_shark" / "a.jpg")
    write_png(tmp_path / "great_white_shark" / "c.png")
    write_png(tmp_path / "0" / "d.png")
    (tmp_path / "great_white_shark" / "notes.txt").write_text("not an image")
    labelled = read_labels(tmp_path, CATEGORIES)
    assert [p.relative_to(tmp_path).as_posix() for p in labelled.paths] == [
        "0/d.png", "GOLDFISH/b.png", "great_white_shark/a.jpg", "great_white_shark/c.png"]
    assert labelled.labels == [0, 2, 1, 1]
    assert labelled.for_paths([labelled.paths[2], labelled.paths[1]]) == [1, 2]


def test_csv_labels_take_indices_or_names_relative_to_the_csv(tmp_path):
    write_png(tmp_path / "images" / "a.png")
    write_png(tmp_path / "images" / "b.png")
    (tmp_path / "labels.csv").write_text("file,label\nimages/a.png,2\nimages/b.png,Great White Shark\n")
    labelled = read_labels(tmp_path / "labels.csv", CATEGORIES)
    assert [p.name for p in labelled.paths] == ["a.png", "b.png"] and labelled.labels == [2, 1]
    (tmp_path / "plain.csv").write_text("images/b.png,0\n")  # no header
    assert read_labels(tmp_path / "plain.csv").labels == [0]


def test_unknown_class_names_are_listed_with_a_suggestion(tmp_path):
    write_png(tmp_path / "goldfsh" / "a.png")
    write_png(tmp_path / "zebra" / "b.png")
    with pytest.raises(UsageError) as info:
        read_labels(tmp_path, CATEGORIES)
    message = str(info.value)
    assert "2 unknown class names" in message and "'goldfsh'" in message and "'zebra'" in message
    assert "'Goldfish'" in message


def test_class_names_without_model_categories_ask_for_indices(tmp_path):
    write_png(tmp_path / "cat" / "a.png")
    with pytest.raises(UsageError, match="class indices"):
        read_labels(tmp_path, None)


@pytest.mark.parametrize("content, error, needle", [
    ("file,label\n", UsageError, "no rows"),
    ("a.png\n", UsageError, "row 1"),
    ("missing.png,0\n", ImageError, "does not exist"),
])
def test_bad_csv_labels_name_the_problem(tmp_path, content, error, needle):
    (tmp_path / "labels.csv").write_text(content)
    with pytest.raises(error, match=needle):
        read_labels(tmp_path / "labels.csv", CATEGORIES)


def test_missing_labels_path_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_labels(tmp_path / "nowhere")


# -- settings, determinism, persistence ------------------------------------------------------
def test_batch_size_does_not_change_the_result(random_images):
    grid = ShiftGrid.square(3, subpixel=2)
    one = run(tiny_classifier(), random_images, grid, n_pairs=100, batch_size=1)
    many = run(tiny_classifier(), random_images, grid, n_pairs=100, batch_size=64)
    np.testing.assert_array_equal(one.grid_argmax, many.grid_argmax)
    np.testing.assert_allclose(one.grid_prob, many.grid_prob, atol=1e-5)
    np.testing.assert_allclose(one.diagonal_prob, many.diagonal_prob, atol=1e-5)
    np.testing.assert_array_equal(one.pairs, many.pairs)
    assert one.summary()["pairwise_consistency"] == many.summary()["pairwise_consistency"]


def test_pairs_depend_on_the_seed_only(random_images):
    grid = ShiftGrid.square(4)
    a = run(tiny_classifier(), random_images, grid, n_pairs=50, seed=1)
    b = run(tiny_classifier(), random_images, grid, n_pairs=50, seed=1)
    c = run(tiny_classifier(), random_images, grid, n_pairs=50, seed=2)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    assert not np.array_equal(a.pairs, c.pairs)
    assert list(a.pairs[:6, 0]) == [0, 1, 2, 3, 0, 1]  # pair k uses image k mod N
    assert a.settings.seed == 1 and a.settings.n_pairs == 50


def test_default_diagonal_is_the_grids_own_diagonal_or_its_extent():
    assert default_diagonal(ShiftGrid.square(3)).shifts == ((0, 0), (1, 1), (2, 2))
    assert default_diagonal(ShiftGrid.square(2, subpixel=2)).shifts[1] == (0.5, 0.5)
    assert len(default_diagonal(ShiftGrid.symmetric(2))) == 5
    explicit = ShiftGrid.explicit([(0, 0), (0, 2)])
    assert default_diagonal(explicit).shifts == ((0, 0), (1, 1), (2, 2))


def test_save_then_load_gives_back_every_number(tmp_path):
    result = run(RowParity(), parity_images(flip=(1,)), ShiftGrid.square(2, subpixel=2),
                 labels=[0, 1, 1], n_pairs=30,
                 provenance=shiftlab.Provenance(model="parity", label="parity"))
    path = result.save(tmp_path / "out" / "invariance.npz")
    loaded = load_invariance(path)
    for name in ("reference_argmax", "grid_argmax", "grid_prob", "diagonal_argmax",
                 "diagonal_prob", "pairs", "labels"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.settings == result.settings and loaded.provenance == result.provenance
    assert loaded.meta == result.meta and loaded.n_classes == result.n_classes == 2
    assert loaded.provenance.n_images == 3 and loaded.provenance.device == "cpu"
    assert set(loaded.provenance.versions) == {"shiftlab", "torch", "python"}
    assert loaded.summary() == result.summary()
    assert loaded.to_frame().equals(result.to_frame())
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())


def test_save_then_load_without_labels(tmp_path, random_images):
    result = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=5)
    loaded = load_invariance(result.save(tmp_path / "r.npz"))
    assert loaded.labels is None and loaded.summary() == result.summary()


def test_loading_something_else_is_a_runtime_error(tmp_path, random_images):
    with pytest.raises(ShiftlabError, match="no invariance file"):
        load_invariance(tmp_path / "missing.npz")
    measured = shiftlab.measure(tiny_classifier(), random_images, ShiftGrid.square(2), device="cpu",
                                progress=False)
    with pytest.raises(ShiftlabError, match="not a shiftlab invariance file"):
        load_invariance(measured.save(tmp_path / "result.npz"))


@pytest.mark.parametrize("options, needle", [
    ({"n_pairs": 0}, "n_pairs"), ({"labels": [0, 1]}, "labels must be 4"),
    ({"labels": [0, 1, 2, 99]}, "out of range"), ({"batch_size": 0}, "batch_size"),
    ({"mode": "mirror"}, "unknown mode"),
])
def test_bad_arguments_are_usage_errors(random_images, options, needle):
    with pytest.raises(UsageError, match=needle):
        run(tiny_classifier(), random_images, ShiftGrid.square(2), **options)


def test_a_model_without_logits_is_a_model_error(random_images):
    with pytest.raises(ModelError, match="classes"):
        run(nn.Conv2d(3, 4, 3).eval(), random_images, ShiftGrid.square(2))


def test_probability_plot_draws_one_panel_per_model(random_images):
    from shiftlab.figures.plots import probability_plot

    results = [run(model, random_images, ShiftGrid.square(3), n_pairs=5)
               for model in (tiny_classifier(), make_global_pool())]
    figure = probability_plot(results, labels=["tiny", "pool"])
    panels = [ax for ax in figure.axes if ax.get_label().startswith("probability:")]
    assert [ax.get_label() for ax in panels] == ["probability:tiny", "probability:pool"]
    assert len(panels[0].get_lines()) == 4 + 1  # one thin line per image and the mean
    assert panels[0].get_ylim()[1] < 1  # small probabilities (random weights): zoomed in
    parity = run(RowParity(), parity_images(), ShiftGrid.square(2), n_pairs=5)
    assert probability_plot(parity).axes[0].get_ylim() == (0.0, 1.02)
    with pytest.raises(UsageError):
        probability_plot([])


# -- command line ----------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(result, exit_code: int, needle: str) -> None:
    everything = result.output + result.stderr
    assert result.exit_code == exit_code, everything
    assert "Traceback" not in everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], lines
    assert result.stdout == ""


@pytest.fixture
def image_folder(tmp_path) -> Path:
    for index in range(3):
        write_png(tmp_path / "images" / f"im{index}.png", seed=index)
    return tmp_path / "images"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_writes_every_output_and_prints_the_table(image_folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("consistency", "--model", TINY, "--images", image_folder, *FAST, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert {p.name for p in out.iterdir()} == OUTPUTS
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and "consistency (pairs)" in lines[0] and "flip rate" in lines[0]
    assert "conftest:tiny_classifier" in lines[1] and " 50 " in lines[1]
    rows = read_csv(out / "consistency.csv")
    assert len(rows) == 4 and {"model", "dh", "dw", "consistency", "ci_low", "ci_high"} <= set(rows[0])
    saved = load_invariance(out / "invariance-conftest_tiny_classifier.npz")
    assert saved.n_images == 2 and saved.settings.n_pairs == 50 and len(saved.grid) == 4
    assert saved.meta["model"] == "conftest:tiny_classifier" and saved.meta["images"] == ["im0.png", "im1.png"]
    summary = read_csv(out / "summary.csv")
    assert float(summary[0]["pairwise_consistency"]) == saved.pairwise_consistency


def test_cli_antialias_measures_both_models(image_folder, tmp_path):
    out = tmp_path / "out"
    result = invoke("consistency", "--model", TINY, "--antialias", "2", "--images", image_folder,
                    *FAST, "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and "tiny_classifier+aa2" in lines[2]
    assert (out / "invariance-conftest_tiny_classifier_aa2.npz").is_file()
    assert {row["model"] for row in read_csv(out / "consistency.csv")} == {
        "conftest:tiny_classifier", "conftest:tiny_classifier+aa2"}


def test_cli_labels_from_class_index_folders_give_accuracy(tmp_path):
    for name, seed in (("3", 0), ("3", 1), ("7", 2)):
        write_png(tmp_path / "labelled" / name / f"im{seed}.png", seed=seed)
    out = tmp_path / "out"
    result = invoke("consistency", "--model", TINY, "--labels", tmp_path / "labelled", *FAST,
                    "--max-images", "3", "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert "accuracy" in result.stdout and "acc. 95% CI" in result.stdout
    saved = load_invariance(out / "invariance-conftest_tiny_classifier.npz")
    assert list(saved.labels) == [3, 3, 7]
    rows = read_csv(out / "consistency.csv")
    np.testing.assert_allclose([float(r["accuracy"]) for r in rows], saved.accuracy)


def test_cli_labels_from_a_csv_with_class_names_of_a_torchvision_model(tmp_path):
    write_png(tmp_path / "a.png", seed=0)
    write_png(tmp_path / "b.png", seed=1)
    (tmp_path / "labels.csv").write_text("file,label\na.png,Tench\nb.png,goldfish\n")
    out = tmp_path / "out"
    result = invoke("consistency", "--model", "resnet18", "--labels", tmp_path / "labels.csv",
                    *FAST, "--max-shift", "1", "--out", out)
    assert result.exit_code == 0, result.output + result.stderr
    assert list(load_invariance(out / "invariance-resnet18.npz").labels) == [0, 1]


@pytest.mark.parametrize("setup, code, needle", [
    (lambda root: root / "missing", 2, "does not exist"),
    (lambda root: write_png(root / "l" / "zebraa" / "a.png").parent.parent, 2, "unknown class"),
    (lambda root: (root / "bad.csv").write_text("a,b,c\n") and root / "bad.csv", 2, "row 1"),
])
def test_cli_bad_labels_are_one_line_errors(tmp_path, setup, code, needle):
    labels = setup(tmp_path)
    out = tmp_path / "out"
    result = invoke("consistency", "--model", "resnet18", "--labels", labels, *FAST, "--out", out)
    assert_clean_error(result, code, needle)
    assert not out.exists()


def test_cli_labels_and_images_together_is_a_usage_error(image_folder, tmp_path):
    result = invoke("consistency", "--model", TINY, "--labels", image_folder, "--images",
                    image_folder, *FAST)
    assert_clean_error(result, 2, "--labels")


def test_cli_zero_pairs_is_a_usage_error(image_folder, tmp_path):
    result = invoke("consistency", "--model", TINY, "--images", image_folder, *FAST, "--pairs", "0",
                    "--out", tmp_path / "out")
    assert result.exit_code == 2 and "--pairs" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_model_without_logits_is_a_runtime_error(image_folder, tmp_path):
    module = tmp_path / "features.py"
    module.write_text("from torch import nn\ndef net():\n    return nn.Conv2d(3, 4, 3)\n")
    result = invoke("consistency", "--model", f"{module}:net", "--images", image_folder, *FAST,
                    "--out", tmp_path / "out")
    assert_clean_error(result, 1, "classes")


def test_the_typed_provenance_of_a_saved_result_keeps_its_extra_fields(tmp_path, random_images):
    from shiftlab.results.provenance import Provenance

    provenance = Provenance(model="net", weights="none", extra={"spec": "net.py:build"})
    result = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=10,
                 provenance=provenance)
    loaded = load_invariance(result.save(tmp_path / "invariance.npz"))
    assert loaded.provenance.model == "net" and loaded.provenance.random_init
    assert loaded.provenance.extra["spec"] == "net.py:build"
    assert loaded.label == "net" and loaded.with_label("b").provenance.label == "b"


def test_the_older_meta_keyword_is_read_into_the_provenance(random_images):
    from shiftlab.results.provenance import Provenance

    result = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=10,
                 meta={"model": "net", "tag": 3})
    assert result.provenance.model == "net" and result.provenance.extra == {"tag": 3}
    assert result.label == "net" and result.meta["tag"] == 3
    both = run(tiny_classifier(), random_images, ShiftGrid.square(2), n_pairs=10,
               provenance=Provenance(model="net"), meta={"tag": 3})
    assert both.provenance.model == "net" and both.provenance.extra == {"tag": 3}


def test_a_format_2_file_with_an_untyped_meta_is_read_into_its_typed_places(tmp_path):
    """Files written before the provenance was typed held a ``meta`` dict (the pipeline's: a
    provenance dict plus padding, n_classes and the versions at the top level)."""
    from shiftlab.results.files import write_archive

    result = run(RowParity(), parity_images(flip=(1,)), ShiftGrid.square(2), labels=[0, 1, 1],
                 n_pairs=30)
    settings = result.settings.to_dict()
    del settings["padding"]  # format 2 had no padding in its settings
    meta = {"model": "resnet18", "label": "resnet18", "weights": "random init",
            "pretrained": False, "seed": 0, "antialias": None, "model_fingerprint": "0375",
            "images": ["a.png", "b.png", "c.png"], "image_digests": ["1", "2", "3"],
            "resize": 37, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "labels": None, "n_images": 3, "input_digest": "", "seconds": 1.098,
            "device": "cpu", "versions": {}, "extra": {"spec": "resnet18", "zero_padded": False},
            "padding": "circular", "n_classes": 1000, "shiftlab": "0.2.0", "torch": "2.4.0",
            "python": "3.11.7"}
    arrays = {name: getattr(result, name) for name in ("reference_argmax", "grid_argmax",
              "grid_prob", "diagonal_argmax", "diagonal_prob", "pairs", "labels")}
    path = write_archive(tmp_path / "old.npz", {"format": 2, "kind": "shiftlab.invariance",
                                                "settings": settings, "meta": meta}, arrays)
    old = load_invariance(path)
    assert old.summary() == result.summary()
    assert old.settings.padding == "circular" and old.n_classes == 1000
    assert old.label == "resnet18" and old.provenance.images == ("a.png", "b.png", "c.png")
    assert old.provenance.seed == 0 and old.provenance.n_images == 3
    assert old.provenance.versions == {"shiftlab": "0.2.0", "torch": "2.4.0", "python": "3.11.7"}
    assert old.provenance.extra == {"spec": "resnet18", "zero_padded": False}
    again = load_invariance(old.save(tmp_path / "new.npz"))  # written again: the typed format
    assert again.provenance == old.provenance and again.settings == old.settings
    assert again.n_classes == 1000
    # an API result of format 2 held a free-form meta
    path = write_archive(tmp_path / "api.npz", {"format": 2, "kind": "shiftlab.invariance",
                                                "settings": settings,
                                                "meta": {"model": "tiny", "n_classes": 2}},
                         arrays)
    api = load_invariance(path)
    assert api.label == "tiny" and api.n_classes == 2 and api.provenance.extra == {}


def test_the_train_mode_warning_points_at_the_callers_line(random_images):
    model = dropout_classifier().train()
    with pytest.warns(UserWarning, match="was in train mode") as caught:
        measure_invariance(model, random_images, ShiftGrid.square(2), n_pairs=10, device="cpu",
                           progress=False)
    [warning] = [w for w in caught if "train mode" in str(w.message)]
    assert warning.filename == __file__ and str(warning.message).startswith("Sequential was")
    with pytest.warns(UserWarning, match="net was in train mode") as caught:
        shiftlab.measure(model, random_images, ShiftGrid.square(2), device="cpu", progress=False,
                         provenance=shiftlab.Provenance(model="net"))
    [warning] = [w for w in caught if "train mode" in str(w.message)]
    assert warning.filename == __file__ and model.training
