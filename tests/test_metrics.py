"""distance() against hand-computed values, and the float64 DistanceAccumulator."""
from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from shiftlab.equivariance.metrics import ComparisonStats, DistanceAccumulator, distance


def _stats(pairs: list[tuple[np.ndarray, np.ndarray]], valid: bool = True,
           with_peak: bool = True) -> ComparisonStats:
    """Stats of shape (1, B) for B pairs (a = reference, b = shifted run), built by hand."""
    def row(values: list[float]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.float64)

    a_list = [np.asarray(a, np.float64) for a, _ in pairs]
    b_list = [np.asarray(b, np.float64) for _, b in pairs]
    return ComparisonStats(
        ref_sq=row([float(np.sum(a * a)) for a in a_list]),
        shifted_sq=row([float(np.sum(b * b)) for b in b_list]),
        diff_sq=row([float(np.sum((a - b) ** 2)) for a, b in zip(a_list, b_list)]),
        count=row([float(a.size) for a in a_list]),
        peak=row([float(a.max() - a.min()) for a in a_list]) if with_peak else None,
        valid=torch.tensor([valid]),
    )


A = np.array([1.0, 2.0, 3.0])
B = np.array([2.0, 0.0, 1.0])


def test_cosine_distance_matches_the_hand_computed_value():
    # <a,b> = 5, |a|^2 = 14, |b|^2 = 5
    value = distance(_stats([(A, B)]), "cosine")
    assert value.shape == (1, 1) and value.dtype == torch.float64
    assert value.item() == pytest.approx(1 - 5 / math.sqrt(70), rel=1e-12)


def test_l2_distance_is_relative_to_the_reference_norm():
    # |a-b|^2 = 1 + 4 + 4 = 9
    assert distance(_stats([(A, B)]), "l2").item() == pytest.approx(3 / math.sqrt(14), rel=1e-12)
    # relative to a, not symmetric
    assert distance(_stats([(B, A)]), "l2").item() == pytest.approx(3 / math.sqrt(5), rel=1e-12)


def test_psnr_uses_the_reference_peak_to_peak_and_the_mean_squared_error():
    # peak = 3 - 1 = 2, mse = 9 / 3 = 3
    assert distance(_stats([(A, B)]), "psnr").item() == pytest.approx(10 * math.log10(4 / 3), rel=1e-12)


def test_psnr_without_a_peak_uses_peak_one():
    value = distance(_stats([(A, B)], with_peak=False), "psnr").item()
    assert value == pytest.approx(10 * math.log10(1 / 3), rel=1e-12)


def test_distances_of_several_images_are_computed_per_image():
    rng = np.random.default_rng(0)
    pairs = [(rng.normal(size=7), rng.normal(size=7)) for _ in range(4)]
    values = distance(_stats(pairs), "cosine")[0].numpy()
    expected = [1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in pairs]
    np.testing.assert_allclose(values, expected, rtol=1e-10)


def test_opposite_vectors_have_cosine_distance_two():
    assert distance(_stats([(A, -A)]), "cosine").item() == pytest.approx(2.0, rel=1e-12)


def test_two_all_zero_maps_are_at_distance_zero():
    zero = np.zeros(3)
    assert distance(_stats([(zero, zero)]), "cosine").item() == 0.0
    assert distance(_stats([(zero, zero)]), "l2").item() == 0.0


def test_l2_is_infinite_when_only_the_reference_is_zero():
    assert distance(_stats([(np.zeros(3), A)]), "l2").item() == math.inf
    assert distance(_stats([(A, np.zeros(3))]), "l2").item() == 1.0


def test_cosine_with_exactly_one_zero_map_is_one():
    assert distance(_stats([(np.zeros(3), A)]), "cosine").item() == 1.0
    assert distance(_stats([(A, np.zeros(3))]), "cosine").item() == 1.0


def test_identical_maps_give_zero_distance_and_infinite_psnr():
    stats = _stats([(A, A.copy())])
    assert distance(stats, "cosine").item() == 0.0
    assert distance(stats, "l2").item() == 0.0
    assert distance(stats, "psnr").item() == math.inf


@pytest.mark.parametrize("metric", ["cosine", "l2", "psnr"])
def test_an_invalid_shift_gives_nan(metric):
    assert math.isnan(distance(_stats([(A, B)], valid=False), metric).item())


def test_validity_applies_per_shift_row():
    stats = _stats([(A, B), (B, A)])
    two_rows = ComparisonStats(*(t.expand(2, -1) if t is not None else None for t in (
        stats.ref_sq, stats.shifted_sq, stats.diff_sq, stats.count, stats.peak)),
        valid=torch.tensor([False, True]))
    values = distance(two_rows, "l2")
    assert torch.isnan(values[0]).all()
    assert torch.isfinite(values[1]).all()


def test_an_unknown_metric_is_refused():
    with pytest.raises(ValueError):
        distance(_stats([(A, B)]), "manhattan")


def _exact_cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1 - <a,b>/(|a||b|) with 60 significant digits on the exact float64 inputs."""
    getcontext().prec = 60
    da, db = [Decimal(float(v)) for v in a], [Decimal(float(v)) for v in b]
    dot = sum(x * y for x, y in zip(da, db))
    norms = (sum(x * x for x in da) * sum(y * y for y in db)).sqrt()
    return float(1 - dot / norms)


@pytest.mark.parametrize("noise", [1e-4, 1e-7])
def test_cosine_stays_accurate_for_nearly_equal_maps(noise):
    rng = np.random.default_rng(1)
    a = rng.normal(size=200)
    b = a + noise * rng.normal(size=200)
    reference = _exact_cosine_distance(a, b)
    assert 0 < reference < 1e-6
    value = distance(_stats([(a, b)]), "cosine").item()
    assert value == pytest.approx(reference, rel=1e-3, abs=0)
    # the naive float64 formula is what cancellation ruins at the smaller noise level
    naive = 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if noise < 1e-6:
        assert abs(naive - reference) > 1e-3 * reference


# -- DistanceAccumulator --------------------------------------------------------------------
def _valid(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_mean_and_std_equal_numpy_over_images_added_in_chunks_in_any_order():
    rng = np.random.default_rng(2)
    values = rng.random((3, 10))  # 3 shifts x 10 images
    forward = DistanceAccumulator(3)
    forward.add(torch.arange(3), torch.tensor(values[:, :4]), _valid(3))
    forward.add(torch.arange(3), torch.tensor(values[:, 4:]), _valid(3))
    backward = DistanceAccumulator(3)
    for chunk in (slice(7, 10), slice(0, 2), slice(2, 7)):
        for shift in (2, 0, 1):  # one shift at a time, shifts out of order
            backward.add(torch.tensor([shift]), torch.tensor(values[shift:shift + 1, chunk]), _valid(1))
    for acc in (forward, backward):
        np.testing.assert_allclose(acc.mean().numpy(), values.mean(1), rtol=1e-12)
        np.testing.assert_allclose(acc.std().numpy(), values.std(1), rtol=1e-9)
        assert acc.n.tolist() == [10, 10, 10]
        assert acc.mean().dtype == torch.float64


def test_merged_accumulators_equal_one_that_saw_everything():
    rng = np.random.default_rng(3)
    values = torch.tensor(rng.random((2, 6)))
    whole, left, right = DistanceAccumulator(2), DistanceAccumulator(2), DistanceAccumulator(2)
    whole.add(torch.arange(2), values, _valid(2))
    left.add(torch.arange(2), values[:, :2], _valid(2))
    right.add(torch.arange(2), values[:, 2:], _valid(2))
    left.merge(right)
    torch.testing.assert_close(left.mean(), whole.mean())
    torch.testing.assert_close(left.std(), whole.std())
    assert torch.equal(left.n, whole.n)


def test_one_image_has_std_zero():
    acc = DistanceAccumulator(1)
    acc.add(torch.tensor([0]), torch.tensor([[0.25]]), _valid(1))
    assert acc.mean().item() == 0.25 and acc.std().item() == 0.0


def test_an_infinite_value_is_counted_and_makes_the_mean_infinite():
    acc = DistanceAccumulator(2)
    acc.add(torch.arange(2), torch.tensor([[1.0, math.inf, 3.0], [1.0, 2.0, 3.0]]), _valid(2))
    assert acc.n_inf.tolist() == [1, 0]
    assert acc.n.tolist() == [2, 3]
    assert acc.mean()[0].item() == math.inf
    assert acc.mean()[1].item() == pytest.approx(2.0)
    assert acc.std()[0].item() == pytest.approx(1.0)  # over the finite values 1 and 3
    assert acc.n_nan.tolist() == [0, 0]


def test_a_nan_value_is_counted_apart_and_left_out_of_the_mean():
    acc = DistanceAccumulator(1)
    acc.add(torch.tensor([0]), torch.tensor([[1.0, math.nan, 4.0, -math.inf]]), _valid(1))
    assert acc.n_nan.tolist() == [2]
    assert acc.n.tolist() == [2]
    assert acc.n_inf.tolist() == [0]
    assert acc.mean().item() == pytest.approx(2.5)
    assert acc.std().item() == pytest.approx(1.5)


def test_invalid_shifts_are_not_counted_at_all():
    acc = DistanceAccumulator(3)
    values = torch.tensor([[0.5, 0.7], [math.nan, math.nan], [0.1, 0.3]])
    acc.add(torch.arange(3), values, torch.tensor([True, False, True]))
    assert acc.n.tolist() == [2, 0, 2]
    assert acc.n_nan.tolist() == [0, 0, 0]
    assert math.isnan(acc.mean()[1].item()) and math.isnan(acc.std()[1].item())
    assert acc.mean()[0].item() == pytest.approx(0.6)


def test_a_shift_that_saw_no_image_has_a_nan_mean():
    acc = DistanceAccumulator(2)
    acc.add(torch.tensor([1]), torch.tensor([[0.5]]), _valid(1))
    assert math.isnan(acc.mean()[0].item())
    assert acc.mean()[1].item() == 0.5
