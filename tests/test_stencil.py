"""The memory-lean building blocks against the obvious code they replace (torch.roll, dense
matrices, float64 sums)."""
from __future__ import annotations

import math

import pytest
import torch

from shiftlab.equivariance.bilinear import interpolation_matrix
from shiftlab.equivariance.shifts import phase_ramp
from shiftlab.equivariance.stencil import (Workspace, blocks, circulant_taps, dot, lag_dot, quadratic,
                              rolled_into, stencil2, sub_rolled)


def _circulant(first_row: torch.Tensor) -> torch.Tensor:
    n = len(first_row)
    index = torch.arange(n)
    return first_row[(index[None, :] - index[:, None]) % n]


@pytest.mark.parametrize("offset", [(0, 0), (1, 2), (-3, 5), (7, -1), (4, 4)])
def test_rolled_subtraction_and_copy_equal_torch_roll(offset):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, 4, 5, generator=generator)
    b = torch.randn(6, 2, 3, 4, 5, generator=generator)
    rolled = torch.roll(a, offset, dims=(-2, -1))
    assert torch.equal(sub_rolled(torch.empty_like(b), b, a, offset), b - rolled)
    assert torch.equal(rolled_into(torch.empty_like(a), a, offset), rolled)


def test_circulant_taps_rebuild_the_matrix_and_fold_in_a_roll():
    matrix = _circulant(torch.tensor([2.0, 0.5, 0.0, 0.0, 0.25], dtype=torch.float64))
    taps = circulant_taps(matrix, roll=2)
    x = torch.randn(1, 1, 3, 5, dtype=torch.float64)
    filtered = stencil2(torch.empty_like(x), x, (((0, 1.0),), taps), Workspace())
    expected = torch.roll(x @ matrix.T, 2, dims=-1)  # (M x) along the last axis, rolled by 2
    torch.testing.assert_close(filtered, expected)
    assert circulant_taps(torch.tensor([[1.0, 2.0], [0.0, 1.0]])) is None  # not circulant


@pytest.mark.parametrize("size", [(5, 7), (1, 4), (2, 2), (6, 1)])
def test_a_separable_stencil_equals_the_dense_matrices(size):
    height, width = size
    rows = _circulant(torch.rand(height, dtype=torch.float64))
    cols = _circulant(torch.rand(width, dtype=torch.float64))
    x = torch.randn(3, 2, height, width, dtype=torch.float64)
    out = stencil2(torch.empty_like(x), x, (circulant_taps(rows), circulant_taps(cols)), Workspace())
    torch.testing.assert_close(out, rows @ x @ cols.T)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 1, 6, 3), (3, 4, 1, 5), (2, 2, 2, 2)])
def test_lag_dot_equals_the_inner_product_with_a_rolled_map(shape):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    y = torch.randn(*shape, dtype=torch.float64, generator=generator)
    height, width = shape[2:]
    for lag in range(-2 * height, 2 * height + 1):
        rolled = torch.roll(x, -lag, dims=2)  # rolled[i] = x[i + lag]
        torch.testing.assert_close(lag_dot(x, y, lag), (rolled * y).sum((1, 2, 3)))
    for lag in range(-2 * width, 2 * width + 1):
        rolled = torch.roll(x, -lag, dims=3)
        torch.testing.assert_close(lag_dot(x, y, lag, dim=-1), (rolled * y).sum((1, 2, 3)))


@pytest.mark.parametrize("stride,size", [(2, (7, 6)), (4, (5, 9)), (3, (2, 2)), (2, (1, 3)),
                                         (1, (4, 4))])
def test_the_quadratic_form_of_linear_interpolation_equals_the_dense_form(stride, size):
    def plain(n: int) -> torch.Tensor:  # UᵀU of circular linear upsampling by ``stride``
        upsample = interpolation_matrix(n, torch.arange(n * stride, dtype=torch.float64) / stride)
        return upsample.T @ upsample

    height, width = size
    x = torch.randn(3, 4, height, width, dtype=torch.float64)
    taps = (circulant_taps(plain(height)), circulant_taps(plain(width)))
    expected = torch.einsum("ncij,ik,jl,nckl->n", x, plain(height), plain(width), x)
    torch.testing.assert_close(quadratic(x, taps, Workspace()), expected)


def test_float32_inner_products_of_large_maps_stay_close_to_float64():
    generator = torch.Generator().manual_seed(2)
    x = torch.relu(torch.randn(4, 1 << 20, generator=generator) + 0.5)
    y = x + 0.01 * torch.randn(4, 1 << 20, generator=generator)
    exact = (x.double() * y.double()).sum(1)
    assert float(((dot(x, y) - exact).abs() / exact).max()) < 1e-5


def test_workspace_reuses_one_buffer_per_slot_and_grows_it():
    workspace = Workspace()
    like = torch.zeros(1)
    small = workspace.take("diff", (2, 3), like)
    assert workspace.take("diff", (3, 2), like).data_ptr() == small.data_ptr()
    assert workspace.take("other", (2, 3), like).data_ptr() != small.data_ptr()
    assert workspace.take("diff", (4, 5), like).shape == (4, 5)


@pytest.mark.parametrize("size", [(8, 8), (7, 8), (8, 7), (7, 7), (6, 10)])
def test_half_spectrum_ramp_is_the_real_part_of_the_full_spectrum_shift(size):
    height, width = size
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    shifts = torch.tensor([[0.5, 0.25], [1.5, -0.7], [2.0, 3.0], [0.3, 0.0]], dtype=torch.float64)
    freq_h = torch.fft.fftfreq(height, dtype=torch.float64)
    freq_w = torch.fft.fftfreq(width, dtype=torch.float64)
    phase = -2 * math.pi * (shifts[:, 0, None, None] * freq_h[None, :, None]
                            + shifts[:, 1, None, None] * freq_w[None, None, :])
    ramp = torch.polar(torch.ones_like(phase), phase)
    full = torch.fft.ifft2(torch.fft.fft2(x)[None] * ramp[:, None, None]).real
    half_ramp = phase_ramp(shifts, height, width)
    half = torch.fft.irfft2(torch.fft.rfft2(x)[None] * half_ramp[:, None, None], s=size)
    torch.testing.assert_close(half, full)


@pytest.mark.parametrize("n_shifts,n_images,map_bytes,budget", [(5, 3, 10, 40), (4, 2, 50, 60),
                                                                  (3, 1, 100, 10), (1, 4, 7, 7)])
def test_blocks_cover_every_map_once_within_the_budget(n_shifts, n_images, map_bytes, budget):
    seen = torch.zeros(n_shifts, n_images, dtype=torch.int64)
    for shifts, images in blocks(n_shifts, n_images, map_bytes, budget):
        seen[shifts, images] += 1
        n_maps = (shifts.stop - shifts.start) * (images.stop - images.start)
        assert n_maps == 1 or n_maps * map_bytes <= budget
        # a block is a contiguous view of an (S, B, ...) run: all images, or a single shift
        assert images == slice(0, n_images) or shifts.stop - shifts.start == 1
    assert torch.equal(seen, torch.ones_like(seen))


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 14])
def test_dot_of_long_rows_at_different_alignments_equals_the_float64_product(lag):
    # BLAS is slow when the operands' addresses differ modulo 16 bytes; dot copies one row
    # beside the other, which must not change the value
    flat = torch.randn(2, (1 << 17) + 64, generator=torch.Generator().manual_seed(lag))
    x, y = flat[:, lag:lag + (1 << 17)], flat[:, : 1 << 17]
    expected = (x.double() * y.double()).sum(1)
    torch.testing.assert_close(dot(x, y), expected, rtol=1e-5, atol=1e-3)
