"""docs/semantics.md, "Known answers": every metric against cases whose answer is known analytically."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from conftest import (Twice, make_equivariant, make_global_pool, make_maxpool,
                      make_zero_padded)

METRICS = ("cosine", "l2", "psnr")
ALIGNS = ("exact", "bilinear", "fourier")


def run(model, images, grid, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return shiftlab.measure(model, images, grid, **kwargs)


def exact_value(metric: str) -> float:
    return math.inf if metric == "psnr" else 0.0


def assert_exact(values: np.ndarray, metric: str) -> None:
    if metric == "psnr":
        assert np.all(values > 120), values  # identical up to float rounding (or +inf)
    else:
        assert np.all(np.abs(values) <= 1e-6), values


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("align", ALIGNS)
def test_zero_shift_is_exactly_equivariant_at_every_layer(images, align, metric):
    result = run(make_maxpool(), images, ShiftGrid.explicit([(0, 0), (1, 0)]), align=align,
                 metric=metric)
    zero = result.grid.shifts.index((0.0, 0.0))
    for name in result.layer_names:
        assert result.values(name)[zero] == exact_value(metric), name


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("align", ALIGNS)
def test_circular_conv_stack_without_striding_is_equivariant_at_every_shift(images, align, metric):
    result = run(make_equivariant(), images, ShiftGrid.square(5), align=align, metric=metric)
    assert len(result.layer_names) == 6
    for name in result.layer_names:
        assert result.layer(name).stride == (1.0, 1.0)
        assert_exact(result.values(name), metric)


def test_maxpool_is_exact_at_even_shifts_and_not_at_odd_shifts(images):
    result = run(make_maxpool(), images, ShiftGrid.square(4), align="exact")
    pool = result.layer_names[-1]
    assert result.layer(pool).stride == (2.0, 2.0)
    values = result.map(pool)
    even = values[::2, ::2]
    assert np.all(np.abs(even) <= 1e-6)
    # exact alignment is undefined (NaN, masked in plots) where the stride does not divide δ
    assert np.isnan(values[1, 0]) and np.isnan(values[0, 1]) and np.isnan(values[1, 1])
    for align in ("bilinear", "fourier"):
        odd = run(make_maxpool(), images, ShiftGrid.square(4), align=align).map(pool)
        assert np.all(np.abs(odd[::2, ::2]) <= 1e-6), align
        assert np.all(odd[1::2, :] > 1e-3) and np.all(odd[:, 1::2] > 1e-3), align


@pytest.mark.parametrize("align", ["bilinear", "fourier"])
def test_blurpool_lowers_the_odd_shift_distance_of_maxpool(images, align):
    from shiftlab.models.antialias import BlurPool

    base = make_maxpool()
    stack = list(base.children())[:-1]
    blurred = nn.Sequential(*stack, nn.MaxPool2d(2, stride=1),
                            BlurPool(8, filt_size=4, stride=2, pad_type="circular")).eval()
    grid = ShiftGrid.square(4)
    plain = run(base, images, grid, align=align).map("6")
    aa = run(blurred, images, grid, align=align).map("7")
    odd = np.zeros(plain.shape, bool)
    odd[1::2, :] = odd[:, 1::2] = True
    assert np.all(aa[odd] < plain[odd]), (aa[odd], plain[odd])
    assert np.nanmean(aa[odd]) < 0.5 * np.nanmean(plain[odd])


@pytest.mark.parametrize("metric", METRICS)
def test_global_average_pool_is_invariant_at_every_shift(images, metric):
    result = run(make_global_pool(), images, ShiftGrid.square(6), metric=metric)
    for name in ("6", "7", "8"):
        assert result.layer(name).kind == "global"
        assert_exact(result.values(name), metric)


def test_inplace_relu_does_not_corrupt_the_conv_distance(images):
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, padding_mode="circular")
    with_relu = nn.Sequential(conv, nn.ReLU(inplace=True)).eval()
    alone = nn.Sequential(conv).eval()
    grid = ShiftGrid.square(3)
    measured = run(with_relu, images, grid)
    expected = run(alone, images, grid)
    np.testing.assert_allclose(measured.values("0"), expected.values("0"), atol=1e-7)
    # the post-ReLU distance differs, so a hook reading the overwritten tensor would be caught
    assert np.abs(measured.values("0") - measured.values("1")).max() > 1e-3


def test_module_called_twice_gives_two_layers_with_their_own_values(images):
    torch.manual_seed(4)
    twice = Twice().eval()
    twice.conv1.stride = (2, 2)  # aliasing, so distances are not all zero
    separate = nn.Sequential(twice.conv1, nn.ReLU(), twice.conv2, nn.ReLU()).eval()
    grid = ShiftGrid.square(3)
    result = run(twice, images, grid)
    reference = run(separate, images, grid)
    assert result.layer_names == ["conv1", "relu", "conv2", "relu#2"]
    np.testing.assert_allclose(result.values("relu"), reference.values("1"), atol=1e-7)
    np.testing.assert_allclose(result.values("relu#2"), reference.values("3"), atol=1e-7)
    assert not np.allclose(result.values("relu"), result.values("relu#2"))


@pytest.mark.parametrize("align", ALIGNS)
def test_crop_mode_zero_padded_convs_are_equivariant_in_the_interior(align):
    canvas = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    grid = ShiftGrid.symmetric(3)
    # two 3x3 convs: receptive-field radius 2
    result = run(make_zero_padded(), canvas, grid, mode="crop", align=align, border=2)
    assert result.settings.size == (18, 18)
    for name in result.layer_names:
        assert_exact(result.values(name), "cosine")
    # without the border margin the zero padding shows up at the edges
    edges = run(make_zero_padded(), canvas, grid, mode="crop", align=align, border=0)
    assert np.nanmax(edges.values("3")) > 1e-4


def test_same_run_twice_is_identical_and_batch_size_does_not_matter():
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    grid = ShiftGrid.square(4)
    first = run(make_maxpool(), images, grid, batch_size=64)
    second = run(make_maxpool(), images, grid, batch_size=64)
    np.testing.assert_array_equal(first.mean, second.mean)
    single = run(make_maxpool(), images, grid, batch_size=1)
    np.testing.assert_allclose(single.mean, first.mean, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(single.std, first.std, atol=1e-5, equal_nan=True)
    assert np.all(single.n[:, 0] == 5)
