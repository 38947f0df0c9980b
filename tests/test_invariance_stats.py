"""Statistics of shiftlab.invariance.grid_result, on predictions built by hand (no model involved).

Known answers:
* pooled intervals are a bootstrap over images: with 6 images and 1000 pairs the interval is far
  wider than a Wilson interval that treats the pairs as independent, and it collapses to a
  point when every image agrees on every pair;
* the worst case over the grid (Michaeli et al. 2023) is the share of images consistent / correct
  under every shift, counted by hand below;
* class -1 (a NaN/Inf output) never agrees with anything and leaves every denominator.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from shiftlab import Provenance, ShiftGrid
from shiftlab.errors import UsageError
from shiftlab.invariance.grid_result import (InvarianceResult, InvarianceSettings, bootstrap_interval,
                                 load_invariance, uninformative_across, wilson_interval)


def build(grid_argmax, reference=None, labels=None, pairs=None, seed: int = 0) -> InvarianceResult:
    """A result from hand-written predictions: grid = the first S shifts of square(k)."""
    grid_argmax = np.asarray(grid_argmax, dtype=np.int64)
    n_images, n_shifts = grid_argmax.shape
    side = math.isqrt(n_shifts)
    assert side * side == n_shifts  # helper contract: S is a square number
    grid = ShiftGrid.square(side)
    reference = grid_argmax[:, 0] if reference is None else np.asarray(reference, dtype=np.int64)
    pairs = np.zeros((0, 3), dtype=np.int64) if pairs is None else np.asarray(pairs, dtype=np.int64)
    diagonal = [grid.shifts.index((t, t)) for t in range(side)]
    prob = np.where(grid_argmax == reference[:, None], 0.9, 0.1)
    return InvarianceResult(
        settings=InvarianceSettings(grid=grid, diagonal=ShiftGrid.diagonal(side), n_pairs=len(pairs),
                                    seed=seed),
        reference_argmax=reference, grid_argmax=grid_argmax, grid_prob=prob,
        diagonal_argmax=grid_argmax[:, diagonal], diagonal_prob=prob[:, diagonal], pairs=pairs,
        labels=None if labels is None else np.asarray(labels, dtype=np.int64))


def random_pairs(n_images: int, n_shifts: int, n_pairs: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.arange(n_pairs) % n_images, rng.integers(0, n_shifts, n_pairs),
                     rng.integers(0, n_shifts, n_pairs)], 1)


def six_images_half_invariant(seed: int = 0) -> InvarianceResult:
    """Images 0-2 keep their class under all 4 shifts; images 3-5 change it at half of them
    (agreement of a random pair: 1/2). 1000 pairs, pair k on image k mod 6."""
    rows = [[1, 1, 1, 1]] * 3 + [[2, 2, 3, 3]] * 3
    return build(rows, pairs=random_pairs(6, 4, 1000), seed=seed)


# -- bootstrap over images -------------------------------------------------------------------
def test_bootstrap_interval_over_six_images_is_wider_than_wilson_over_the_pairs():
    result = six_images_half_invariant()
    agree = result.pair_agreement
    wilson_low, wilson_high = wilson_interval(int(agree.sum()), agree.size)
    low, high = result.pairwise_interval
    assert low <= result.pairwise_consistency <= high
    # images, not pairs, are the independent units: 6 of them leave a wide interval
    assert (high - low) > 3 * (wilson_high - wilson_low)
    assert result.summary()["n_images"] == 6 and result.summary()["n_pairs"] == 1000


def test_bootstrap_interval_collapses_when_every_image_agrees_on_every_pair():
    result = build([[4, 4, 4, 4]] * 6, pairs=random_pairs(6, 4, 300))
    assert result.pairwise_interval == (1.0, 1.0)
    assert bootstrap_interval([0, 0, 0], [5, 5, 5]) == (0.0, 0.0)


def test_bootstrap_resamples_pairs_within_an_image():
    """One image: resampling images alone would give a point; its 10 pairs (5 agree) do not."""
    low, high = bootstrap_interval([5], [10], seed=1)
    assert low < 0.5 < high and high - low > 0.3


def test_bootstrap_with_one_trial_per_image_matches_wilson_for_many_images():
    successes = np.r_[np.ones(300), np.zeros(700)]
    low, high = bootstrap_interval(successes, np.ones(1000), n_resamples=4000, seed=2)
    wilson_low, wilson_high = wilson_interval(300, 1000)
    assert abs(low - wilson_low) < 0.01 and abs(high - wilson_high) < 0.01


def test_bootstrap_is_identical_for_the_same_seed_and_differs_for_another():
    a = six_images_half_invariant(seed=3).summary()
    b = six_images_half_invariant(seed=3).summary()
    c = six_images_half_invariant(seed=4).summary()
    assert a == b
    assert (a["pairwise_ci_low"], a["pairwise_ci_high"]) != (c["pairwise_ci_low"], c["pairwise_ci_high"])


def test_bootstrap_columns_are_separate_proportions():
    k = np.array([[1, 0], [1, 0], [1, 1]])
    low, high = bootstrap_interval(k, np.ones_like(k), seed=0)
    assert low[0] == high[0] == 1.0 and 0 <= low[1] < high[1] <= 1


@pytest.mark.parametrize("successes, trials", [([3], [2]), ([1, 2], [2]), ([-1], [1])])
def test_bootstrap_rejects_counts_that_are_not_proportions(successes, trials):
    with pytest.raises(UsageError, match="successes"):
        bootstrap_interval(successes, trials)


def test_summary_reports_pooled_intervals_for_reference_consistency_and_accuracy():
    result = six_images_half_invariant()
    result.labels = np.array([1, 1, 1, 2, 2, 2])
    summary = result.summary()
    # vs. reference (shift 0 is the reference): images 0-2 agree at 4/4, images 3-5 at 2/4
    assert summary["consistency_vs_reference"] == pytest.approx(18 / 24)
    assert summary["consistency_vs_reference_ci_low"] < 18 / 24 < summary["consistency_vs_reference_ci_high"]
    assert summary["accuracy"] == pytest.approx(18 / 24)
    assert summary["accuracy_ci_low"] < 18 / 24 < summary["accuracy_ci_high"]


# -- worst case over the grid ----------------------------------------------------------------
def test_worst_case_shares_count_images_consistent_and_correct_under_every_shift():
    # image 0: class 0 everywhere, label 0 -> consistent and correct under every shift
    # image 1: changes at shift 2 -> neither;  image 2: class 2 everywhere, label 1 -> consistent
    # only;  image 3: class 3 everywhere, label 3
    result = build([[0, 0, 0, 0], [1, 1, 2, 1], [2, 2, 2, 2], [3, 3, 3, 3]], labels=[0, 1, 1, 3])
    summary = result.summary()
    assert summary["consistent_all_shifts"] == 3 / 4
    assert summary["correct_all_shifts"] == 2 / 4
    assert summary["consistency_vs_reference"] == 15 / 16  # the average hides the worst case


def test_worst_case_accuracy_is_none_without_labels():
    assert build([[0, 0, 0, 0]]).summary()["correct_all_shifts"] is None


# -- non-finite outputs ----------------------------------------------------------------------
def test_nonfinite_predictions_never_agree_and_leave_every_denominator():
    # image 1 has NaN logits at shifts 1 and 2 (class -1): once equal to each other, they must
    # not count as an agreeing pair, nor as correct, nor in the worst case
    result = build([[0, 0, 0, 0], [1, -1, -1, 1]], labels=[0, 1],
                   pairs=[[1, 1, 2], [1, 0, 3], [0, 0, 1]])
    np.testing.assert_array_equal(result.pair_valid, [False, True, True])
    assert result.pairwise_consistency == 1.0
    np.testing.assert_array_equal(result.to_frame()["n"], [2, 1, 1, 2])
    np.testing.assert_array_equal(result.consistency, [1, 1, 1, 1])
    np.testing.assert_array_equal(result.accuracy, [1, 1, 1, 1])
    summary = result.summary()
    assert summary["n_nonfinite"] == 2
    assert summary["consistent_all_shifts"] == 1.0 and summary["correct_all_shifts"] == 1.0


def test_nonfinite_reference_leaves_the_image_out_of_consistency_vs_reference():
    result = build([[0, 0, 0, 0], [1, 2, 2, 2]], reference=[0, -1])
    np.testing.assert_array_equal(result.grid_valid.sum(0), [1, 1, 1, 1])
    assert result.summary()["consistency_vs_reference"] == 1.0
    assert result.n_nonfinite == 1


# -- uninformative predictions ---------------------------------------------------------------
def test_one_class_everywhere_is_flagged_uninformative():
    assert build([[7, 7, 7, 7]] * 3).uninformative == \
        "consistency is uninformative: every prediction is class 7"
    assert build([[7, 7, -1, 7]] * 3).uninformative is not None  # NaN is not a second class
    assert build([[7, 7, 7, 1]] * 3).uninformative is None


def test_identical_predictions_across_models_are_flagged_uninformative():
    a, b = build([[1, 2, 1, 2], [3, 3, 3, 3]]), build([[1, 2, 1, 2], [3, 3, 3, 3]])
    message = uninformative_across([a, b])
    assert message is not None and "all 2 models" in message
    assert uninformative_across([a, build([[1, 2, 1, 2], [3, 3, 0, 3]])]) is None
    assert uninformative_across([a]) is None


def test_save_then_load_keeps_nonfinite_entries_and_bootstrap_settings(tmp_path):
    result = build([[0, 0, 0, 0], [1, -1, -1, 1]], labels=[0, 1], pairs=[[1, 1, 2], [1, 0, 3]])
    loaded = load_invariance(result.save(tmp_path / "r.npz"))
    assert loaded.settings == result.settings and loaded.settings.n_bootstrap == 1000
    assert loaded.summary() == result.summary() and loaded.n_nonfinite == 2


def test_label_comes_from_the_provenance_and_with_label_renames_a_copy():
    result = build([[0, 1, 0, 1]])
    assert result.label == "result"
    result.provenance = Provenance(model="resnet18")
    renamed = result.with_label("resnet18#2")
    assert result.label == "resnet18" and renamed.label == "resnet18#2"
    assert renamed.provenance.label == "resnet18#2" and renamed.meta["label"] == "resnet18#2"
    assert renamed.grid_argmax is result.grid_argmax
