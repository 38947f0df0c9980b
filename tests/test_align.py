"""Alignment against ground truth: the banded bilinear forms vs. explicit upsampling (SPEC.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shiftlab.equivariance.align import make_plan
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.equivariance.metrics import distance


def upsample_circular(x: np.ndarray, stride: int) -> np.ndarray:
    """SPEC.md's circular linear upsampling, written out: A,(A+B)/2,B,... for 2x, per axis."""
    def axis(values: np.ndarray, dim: int) -> np.ndarray:
        n = values.shape[dim]
        out = []
        for k in range(n * stride):
            i, frac = divmod(k, stride)
            f = frac / stride
            low = np.take(values, i, axis=dim)
            high = np.take(values, (i + 1) % n, axis=dim)
            out.append((1 - f) * low + f * high)
        return np.stack(out, axis=dim)
    return axis(axis(x, -2), -1)


def reference_distances(ref, shifted, shifts, stride, metric, crop=False, border=0):
    """Upsample both maps, shift the reference on the fine grid, compare inside the valid region."""
    a_up = upsample_circular(ref.numpy().astype(np.float64), stride)
    out = np.zeros(shifted.shape[:2])
    n = ref.shape[-1]
    length = n * stride
    for s, (dh, dw) in enumerate(shifts):
        shifted_ref = np.roll(a_up, (int(dh), int(dw)), axis=(-2, -1))
        b_up = upsample_circular(shifted[s].numpy().astype(np.float64), stride)
        mask = np.ones((length, length), bool)
        if crop:
            k = np.arange(length)
            top = (n - 1) * stride - border
            row = (k >= border) & (k <= top) & (k - dh >= border) & (k - dh <= top)
            col = (k >= border) & (k <= top) & (k - dw >= border) & (k - dw <= top)
            mask = row[:, None] & col[None, :]
        for b in range(shifted.shape[1]):
            x = shifted_ref[b][:, mask].ravel()
            y = b_up[b][:, mask].ravel()
            if metric == "cosine":
                out[s, b] = 1 - x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
            elif metric == "l2":
                out[s, b] = np.linalg.norm(x - y) / np.linalg.norm(x)
            else:
                peak = ref[b].numpy().max() - ref[b].numpy().min()
                out[s, b] = 10 * np.log10(peak**2 / np.mean((x - y) ** 2))
    return out


def layer(stride: int, channels: int, n: int) -> LayerInfo:
    s = float(stride)
    return LayerInfo("x", "Test", "spatial", (s, s), (s, s), (channels, n, n))


@pytest.mark.parametrize("metric", ["cosine", "l2", "psnr"])
@pytest.mark.parametrize("stride", [2, 3, 4])
def test_bilinear_equals_explicit_upsampling_in_circular_mode(stride, metric):
    generator = torch.Generator().manual_seed(stride)
    ref = torch.randn(2, 3, 5, 5, generator=generator)
    shifts = [(0, 1), (1, 0), (stride - 1, 2), (stride, stride), (2 * stride + 1, 3), (7, 0)]
    shifted = ref[None] + 0.3 * torch.randn(len(shifts), 2, 3, 5, 5, generator=generator)
    plan = make_plan(layer(stride, 3, 5), torch.tensor(shifts, dtype=torch.float64), "circular",
                     "bilinear", need_peak=metric == "psnr")
    stats = plan.compare(ref, shifted)
    got = distance(stats, metric).numpy()
    expected = reference_distances(ref, shifted, shifts, stride, metric)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("border", [0, 2])
def test_bilinear_equals_explicit_upsampling_in_crop_mode(border):
    stride = 2
    generator = torch.Generator().manual_seed(7)
    ref = torch.randn(1, 2, 6, 6, generator=generator)
    shifts = [(-3, 1), (1, -2), (2, 2), (0, 3)]
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), 1, 2, 6, 6, generator=generator)
    plan = make_plan(layer(stride, 2, 6), torch.tensor(shifts, dtype=torch.float64), "crop",
                     "bilinear", border=border)
    got = distance(plan.compare(ref, shifted), "cosine").numpy()
    expected = reference_distances(ref, shifted, shifts, stride, "cosine", crop=True, border=border)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_bilinear_is_zero_for_an_exactly_shifted_map_at_divisible_shifts():
    ref = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    shifts = torch.tensor([(2.0, 4.0), (6.0, 2.0)], dtype=torch.float64)
    shifted = torch.stack([torch.roll(ref, (1, 2), (-2, -1)), torch.roll(ref, (3, 1), (-2, -1))])
    for align in ("exact", "bilinear", "fourier"):
        plan = make_plan(layer(2, 4, 8), shifts, "circular", align)
        values = distance(plan.compare(ref, shifted), "l2")
        assert float(values.abs().max()) <= 1e-6, align


def test_fourier_alignment_of_a_band_limited_map_is_exact_at_half_pixel_shifts():
    n = 16
    grid = torch.arange(n, dtype=torch.float64)
    def wave(offset: float) -> torch.Tensor:
        row = torch.cos(2 * math.pi * 2 * (grid - offset) / n)
        return (row[:, None] * torch.cos(2 * math.pi * (grid[None, :] - offset) / n)).float()
    ref = wave(0.0)[None, None]
    # stride 2, input shift 1 -> feature shift 0.5
    shifted = wave(0.5)[None, None, None]
    plan = make_plan(layer(2, 1, n), torch.tensor([(1.0, 1.0)], dtype=torch.float64), "circular",
                     "fourier")
    assert float(distance(plan.compare(ref, shifted), "cosine")) <= 1e-6
    exact = make_plan(layer(2, 1, n), torch.tensor([(1.0, 1.0)], dtype=torch.float64), "circular",
                      "exact")
    assert math.isnan(float(distance(exact.compare(ref, shifted), "cosine")))


def test_crop_mode_exact_alignment_compares_only_the_overlap():
    ref = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    # the shifted window sees the same content moved down by 2 rows; its top rows are new content
    shifted = torch.roll(ref, 2, dims=-2)
    shifted[..., :2, :] = 100.0
    plan = make_plan(layer(1, 2, 8), torch.tensor([(2.0, 0.0)], dtype=torch.float64), "crop",
                     "exact")
    stats = plan.compare(ref, shifted[None])
    assert float(distance(stats, "l2")) <= 1e-6
    assert float(stats.count[0, 0]) == 2 * 6 * 8


def explicit_interpolation_cosine(ref, shifted, shifts, stride):
    """T_δ U a and U b written out for any δ and stride: U samples the circular piecewise-linear
    interpolant at k / s, T_δ U at (k - δ) / s."""
    from shiftlab.equivariance.bilinear import interpolation_matrix

    height, width = ref.shape[-2:]
    rows = torch.arange(round(height * stride), dtype=torch.float64)
    cols = torch.arange(round(width * stride), dtype=torch.float64)
    up_h, up_w = interpolation_matrix(height, rows / stride), interpolation_matrix(width, cols / stride)
    out = torch.zeros(shifted.shape[:2], dtype=torch.float64)
    for s, (dh, dw) in enumerate(shifts):
        at_h = interpolation_matrix(height, (rows - dh) / stride)
        at_w = interpolation_matrix(width, (cols - dw) / stride)
        for b in range(ref.shape[0]):
            x = at_h @ ref[b].double() @ at_w.T
            y = up_h @ shifted[s, b].double() @ up_w.T
            out[s, b] = 1 - (x * y).sum() / (x.norm() * y.norm())
    return out


@pytest.mark.parametrize("stride,subpixel", [(2, 2), (4, 3), (3, 4), (1.5, 1), (1.5, 2)])
def test_bilinear_equals_explicit_interpolation_at_subpixel_shifts_and_fractional_strides(
        stride, subpixel):
    generator = torch.Generator().manual_seed(5)
    ref = torch.randn(2, 3, 7, 6, generator=generator)
    values = [i / subpixel for i in range(-3 * subpixel, 3 * subpixel + 1, 2)]
    shifts = [(dh, dw) for dh in values[::2] for dw in values[1::3]]
    shifted = ref[None] + 0.3 * torch.randn(len(shifts), 2, 3, 7, 6, generator=generator)
    info = LayerInfo("x", "Test", "spatial", (stride, stride), (stride, stride), (3, 7, 6))
    plan = make_plan(info, torch.tensor(shifts, dtype=torch.float64), "circular", "bilinear")
    got = distance(plan.compare(ref, shifted), "cosine")
    expected = explicit_interpolation_cosine(ref, shifted, shifts, stride)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.fixture(params=["dense", "fft"])
def fourier_shifter(request, monkeypatch):
    """Both ways to shift a reference by a fraction: dense matrix products (maps up to
    ``DENSE_SIDE`` a side) and 1-D FFTs (larger maps), forced here on the same small maps."""
    from shiftlab.equivariance import align

    monkeypatch.setattr(align, "DENSE_SIDE", 10**6 if request.param == "dense" else 0)
    return request.param


@pytest.mark.parametrize("stride", [2, 4])
def test_fourier_shares_one_fractional_shift_between_shifts_with_the_same_fraction(
        stride, fourier_shifter):
    from shiftlab.equivariance.shifts import fourier_shift_many

    generator = torch.Generator().manual_seed(6)
    ref = torch.randn(2, 3, 8, 9, generator=generator)
    shifts = torch.tensor([(dh, dw) for dh in range(0, 3 * stride, 3) for dw in (1, stride + 1, 2)],
                          dtype=torch.float64)
    shifted = torch.randn(len(shifts), 2, 3, 8, 9, generator=generator)
    plan_info = LayerInfo("x", "Test", "spatial", (stride, stride), (stride, stride), (3, 8, 9))
    plan = make_plan(plan_info, shifts, "circular", "fourier")
    got = distance(plan.compare(ref, shifted), "l2")
    aligned = fourier_shift_many(ref.double(), shifts / stride)
    expected = (aligned - shifted.double()).flatten(2).norm(dim=-1) / aligned.flatten(2).norm(dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [(8, 10), (7, 10), (8, 9), (6, 6)])
@pytest.mark.parametrize("need_peak", [False, True])
def test_separable_fourier_alignment_equals_the_2d_band_limited_shift_on_any_parity(
        size, need_peak, fourier_shifter):
    """The alignment shifts rows, then columns (matrix products or 1-D FFTs); at even × even
    sizes the 2-D half-spectrum convention's corner bin is not separable and is added back. The
    norms of the shifted references come from the reference's spectrum (Parseval), not from a
    pass over them."""
    from shiftlab.equivariance.shifts import fourier_shift_many

    generator = torch.Generator().manual_seed(8)
    ref = torch.randn(2, 3, *size, generator=generator, dtype=torch.float64)
    shifts = torch.tensor([(1, 3), (2, 0), (0, 1), (3, 3), (5, 2), (4, 6)], dtype=torch.float64)
    shifted = torch.randn(len(shifts), 2, 3, *size, generator=generator, dtype=torch.float64)
    info = LayerInfo("x", "Test", "spatial", (4.0, 4.0), (4.0, 4.0), (3, *size))
    plan = make_plan(info, shifts, "circular", "fourier", need_peak=need_peak)
    stats = plan.compare(ref, shifted)
    aligned = fourier_shift_many(ref, shifts / 4)
    expected = (aligned - shifted).flatten(2).norm(dim=-1) / aligned.flatten(2).norm(dim=-1)
    torch.testing.assert_close(distance(stats, "l2"), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.ref_sq, aligned.square().sum((2, 3, 4)), rtol=1e-12, atol=0)
    if need_peak:
        flat = aligned.flatten(2)
        torch.testing.assert_close(stats.peak, flat.amax(-1) - flat.amin(-1), rtol=1e-10, atol=0)


def test_crop_mode_fourier_alignment_compares_the_band_limited_shift_inside_the_overlap(
        fourier_shifter):
    from shiftlab.equivariance.shifts import fourier_shift_many
    from shiftlab.equivariance.stencil import overlap_mask

    generator = torch.Generator().manual_seed(10)
    ref = torch.randn(2, 3, 8, 9, generator=generator, dtype=torch.float64)
    shifts = torch.tensor([(1, 3), (2, 0), (0, 1), (5, 6)], dtype=torch.float64)
    shifted = torch.randn(len(shifts), 2, 3, 8, 9, generator=generator, dtype=torch.float64)
    info = LayerInfo("x", "Test", "spatial", (4.0, 4.0), (4.0, 4.0), (3, 8, 9))
    plan = make_plan(info, shifts, "crop", "fourier", border=4, need_peak=True)
    stats = plan.compare(ref, shifted)
    aligned = fourier_shift_many(ref, shifts / 4)
    rows = overlap_mask(8, shifts[:, 0] / 4, 1)
    cols = overlap_mask(9, shifts[:, 1] / 4, 1)
    mask = (rows[:, :, None] & cols[:, None, :])[:, None, None].double()
    torch.testing.assert_close(stats.diff_sq, ((aligned - shifted) * mask).square().sum((2, 3, 4)))
    torch.testing.assert_close(stats.ref_sq, (aligned * mask).square().sum((2, 3, 4)))
    torch.testing.assert_close(stats.shifted_sq, (shifted * mask).square().sum((2, 3, 4)))


def test_reduced_precision_float32_products_make_fourier_use_the_ffts(monkeypatch):
    """TF32 or bf16 matrix products (a global PyTorch setting) would cost the dense shifts
    three digits; the FFT path is used instead and the distances stay exact."""
    from shiftlab.equivariance import align
    from shiftlab.equivariance.shifts import fourier_shift_many

    def refuse(*args):
        raise AssertionError("dense shifts under reduced-precision products")

    monkeypatch.setattr(align, "_DenseShifts", refuse)
    generator = torch.Generator().manual_seed(12)
    ref = torch.randn(2, 3, 8, 9, generator=generator)
    shifts = torch.tensor([(1.0, 3.0), (2.0, 1.0)], dtype=torch.float64)
    shifted = torch.randn(2, 2, 3, 8, 9, generator=generator)
    info = LayerInfo("x", "Test", "spatial", (4.0, 4.0), (4.0, 4.0), (3, 8, 9))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        stats = make_plan(info, shifts, "circular", "fourier").compare(ref, shifted)
    finally:
        torch.set_float32_matmul_precision(previous)
    aligned = fourier_shift_many(ref.double(), shifts / 4)
    torch.testing.assert_close(stats.diff_sq, (aligned - shifted).square().sum((2, 3, 4)),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("eps", [1e-2, 1e-4])
def test_the_norm_of_a_shifted_map_holding_almost_only_nyquist_content_stays_exact(eps):
    """‖T_r a‖² = ‖a‖² minus Nyquist energy is a small difference of large sums here: a
    float32 reference must not make it wrong (or negative, an infinite l2 distance)."""
    from shiftlab.equivariance.shifts import fourier_shift_many

    generator = torch.Generator().manual_seed(0)
    checker = (torch.arange(16)[:, None] % 2 * -2.0 + 1).expand(16, 16)
    ref = (10 * checker + eps * torch.randn(1, 4, 16, 16, generator=generator,
                                            dtype=torch.float64)).float()
    shifts = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # row fraction 1/2
    aligned = fourier_shift_many(ref.double(), shifts / 2)
    info = LayerInfo("x", "Test", "spatial", (2.0, 2.0), (2.0, 2.0), (4, 16, 16))
    stats = make_plan(info, shifts, "circular", "fourier").compare(ref, aligned.float())
    torch.testing.assert_close(stats.ref_sq, aligned.square().sum((2, 3, 4)), rtol=1e-4, atol=0)
    assert float(distance(stats, "l2")) < 1e-2


def test_fractions_that_float32_cannot_hold_shift_by_the_exact_amount():
    """1/6 px is not a float32 number: the operators are built from the float64 fraction."""
    from shiftlab.equivariance.shifts import fourier_shift_many

    generator = torch.Generator().manual_seed(11)
    ref = torch.randn(1, 2, 9, 10, generator=generator, dtype=torch.float64)
    shifts = torch.tensor([(1.0, 5.0), (5.0, 1.0)], dtype=torch.float64)
    shifted = torch.randn(2, 1, 2, 9, 10, generator=generator, dtype=torch.float64)
    info = LayerInfo("x", "Test", "spatial", (6.0, 6.0), (6.0, 6.0), (2, 9, 10))
    stats = make_plan(info, shifts, "circular", "fourier").compare(ref, shifted)
    aligned = fourier_shift_many(ref, shifts / 6)
    torch.testing.assert_close(stats.diff_sq, (aligned - shifted).square().sum((2, 3, 4)),
                               rtol=1e-9, atol=0)


@pytest.mark.parametrize("size", [(8, 8), (7, 8), (8, 7), (7, 7), (6, 10), (2, 2), (1, 4)])
def test_the_norm_of_a_band_limited_shift_follows_from_the_nyquist_energies(size):
    """Parseval: T_r keeps every frequency's magnitude but the Nyquist ones (even sizes)."""
    from shiftlab.equivariance.align import energy_weights, nyquist_energies
    from shiftlab.equivariance.shifts import fourier_shift_many

    ref = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    fractions = [(0.3, 0.0), (0.0, 0.7), (0.25, 0.5), (0.5, 0.5), (0.9, 0.1), (0.125, 0.875)]
    aligned = fourier_shift_many(ref, torch.tensor(fractions, dtype=torch.float64))
    nyquist = nyquist_energies(ref)
    for fraction, shifted in zip(fractions, aligned):
        got = torch.tensor(energy_weights(fraction), dtype=torch.float64) @ torch.stack(nyquist)
        torch.testing.assert_close(got, shifted.square().sum((1, 2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("align", ["bilinear", "fourier", "exact"])
def test_large_float32_maps_give_the_distances_of_float64_maps(align):
    """Long float32 sums (tens of thousands of values per map) must not cost precision."""
    generator = torch.Generator().manual_seed(7)
    ref = torch.relu(torch.randn(2, 32, 48, 48, generator=generator))
    shifts = torch.tensor([(0, 2), (2, 2), (1, 3), (3, 0)], dtype=torch.float64)
    shifted = torch.roll(ref, (1, 1), dims=(-2, -1))[None] \
        + 1e-3 * torch.randn(4, 2, 32, 48, 48, generator=generator)
    plan = make_plan(layer(2, 32, 48), shifts, "circular", align)
    single = distance(plan.compare(ref, shifted), "cosine")
    double = distance(plan.compare(ref.double(), shifted.double()), "cosine")
    valid = ~double.isnan()
    assert torch.equal(valid, ~single.isnan())
    assert float((single - double)[valid].abs().max()) < 2e-6


@pytest.mark.parametrize("align,mode", [("nearest", "circular"), ("Exact", "circular"),
                                        ("exact", "reflect")])
def test_make_plan_rejects_an_unknown_alignment_or_mode(align, mode):
    from shiftlab.errors import UsageError

    with pytest.raises(UsageError, match="choose one of"):
        make_plan(layer(2, 3, 8), torch.tensor([(1.0, 0.0)], dtype=torch.float64), mode, align)


@pytest.mark.parametrize("align", ["exact", "fourier", "bilinear"])
def test_the_zero_shift_of_a_map_holding_inf_is_nan_not_zero(align):
    """The zero shift is not computed (the map against itself), but a - a is NaN where a holds
    Inf: the shortcut must give what the computation would (counted as NaN, not as 0)."""
    ref = torch.ones(2, 3, 8, 8)
    ref[1, 0, 2, 2] = math.inf
    plan = make_plan(layer(2, 3, 8), torch.zeros(1, 2, dtype=torch.float64), "circular", align)
    got = distance(plan.compare(ref, ref[None]), "l2")
    assert got[0, 0] == 0 and torch.isnan(got[0, 1])
