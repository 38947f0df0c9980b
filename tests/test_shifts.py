"""ShiftGrid layout and the shift operators T_δ (docs/semantics.md, "Shifts")."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from shiftlab.errors import UsageError
from shiftlab.equivariance.shifts import (ShiftGrid, apply_shifts, centre_window, circular_shift, crop_shift,
                             fourier_shift_many, roll_many)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _cosine_image(height: int, width: int, kh: int, kw: int, dh: float = 0.0,
                  dw: float = 0.0) -> torch.Tensor:
    """(1, 1, H, W) band-limited cosine, its content moved down/right by (dh, dw) analytically."""
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    cols = torch.arange(width, dtype=torch.float64)[None, :]
    phase = 2 * math.pi * (kh * (rows - dh) / height + kw * (cols - dw) / width)
    return (torch.cos(phase) + 0.5 * torch.sin(2 * math.pi * kh * (rows - dh) / height))[None, None]


# -- ShiftGrid constructors ---------------------------------------------------------------
def test_square_grid_lists_all_shifts_row_major():
    grid = ShiftGrid.square(3)
    assert grid.kind == "square"
    assert len(grid) == 9
    assert grid.shifts == tuple((float(h), float(w)) for h in range(3) for w in range(3))
    assert grid.is_integer
    assert grid.max_abs == 2.0


def test_square_grid_with_subpixel_steps_has_fractional_shifts():
    grid = ShiftGrid.square(2, subpixel=2)
    assert grid.dh_values == (0.0, 0.5, 1.0, 1.5)
    assert len(grid) == 16
    assert not grid.is_integer


def test_symmetric_grid_spans_minus_k_to_k():
    grid = ShiftGrid.symmetric(2)
    assert grid.kind == "symmetric"
    assert len(grid) == 25
    assert grid.dh_values == (-2.0, -1.0, 0.0, 1.0, 2.0)
    assert grid.dw_values == grid.dh_values
    assert grid.shifts[0] == (-2.0, -2.0) and grid.shifts[-1] == (2.0, 2.0)
    assert ShiftGrid.symmetric(0).shifts == ((0.0, 0.0),)


def test_symmetric_grid_with_subpixel_steps_includes_both_ends():
    grid = ShiftGrid.symmetric(1, subpixel=2)
    assert grid.dh_values == (-1.0, -0.5, 0.0, 0.5, 1.0)
    assert len(grid) == 25


def test_diagonal_grid_is_a_sweep_of_equal_shifts():
    assert ShiftGrid.diagonal(3).shifts == ((0.0, 0.0), (1.0, 1.0), (2.0, 2.0))
    assert ShiftGrid.diagonal(3, start=-1).shifts == ((-1.0, -1.0), (0.0, 0.0), (1.0, 1.0))
    assert ShiftGrid.diagonal(3, subpixel=4).shifts == ((0.0, 0.0), (0.25, 0.25), (0.5, 0.5))
    assert ShiftGrid.diagonal(2).kind == "diagonal"


def test_explicit_grid_keeps_the_given_order_as_floats():
    grid = ShiftGrid.explicit([(3, -1), (0, 0), (0.5, 2)])
    assert grid.shifts == ((3.0, -1.0), (0.0, 0.0), (0.5, 2.0))
    assert all(isinstance(v, float) for shift in grid.shifts for v in shift)
    assert grid.kind == "explicit"
    assert grid.max_abs == 3.0


@pytest.mark.parametrize("build", [
    lambda: ShiftGrid.explicit([]),
    lambda: ShiftGrid.explicit([(1, 2), (0, 0), (1, 2)]),
    lambda: ShiftGrid.explicit([(0.0, 0.0), (-0.0, 0.0)]),
    lambda: ShiftGrid.explicit([(math.nan, 0)]),
    lambda: ShiftGrid.explicit([(0, math.inf)]),
    lambda: ShiftGrid.square(0),
    lambda: ShiftGrid.square(-2),
    lambda: ShiftGrid.square(4, subpixel=0),
    lambda: ShiftGrid.square(4, subpixel=1.5),
    lambda: ShiftGrid.symmetric(-1),
    lambda: ShiftGrid.symmetric(2, subpixel=-1),
    lambda: ShiftGrid.diagonal(0),
    lambda: ShiftGrid.diagonal(3, subpixel=0),
    lambda: ShiftGrid(()),
], ids=["empty", "duplicate", "duplicate-signed-zero", "nan", "inf", "square-0", "square-neg",
        "subpixel-0", "subpixel-frac", "symmetric-neg", "symmetric-subpixel-neg", "diagonal-0",
        "diagonal-subpixel-0", "direct-empty"])
def test_bad_grid_arguments_raise_usage_error(build):
    with pytest.raises(UsageError):
        build()


def test_explicit_grid_with_a_three_number_shift_raises_usage_error():
    with pytest.raises(UsageError):
        ShiftGrid.explicit([(1, 2, 3)])


# -- layout ---------------------------------------------------------------------------------
def test_map_index_places_each_shift_at_its_sorted_row_and_column():
    grid = ShiftGrid.explicit([(1, 0), (-1, 2), (1, 2), (0, 0)])
    assert grid.dh_values == (-1.0, 0.0, 1.0)
    assert grid.dw_values == (0.0, 2.0)
    assert grid.map_shape == (3, 2)
    rows, cols = grid.map_index()
    assert rows == [2, 0, 2, 1]
    assert cols == [0, 1, 1, 0]


def test_map_index_of_a_square_grid_is_row_major():
    grid = ShiftGrid.square(3)
    rows, cols = grid.map_index()
    for index, (dh, dw) in enumerate(grid.shifts):
        assert (rows[index], cols[index]) == (int(dh), int(dw))


@pytest.mark.parametrize("grid", [ShiftGrid.square(3, subpixel=2), ShiftGrid.symmetric(1),
                                  ShiftGrid.diagonal(4, start=-2),
                                  ShiftGrid.explicit([(0.25, -3), (7, 1)])],
                         ids=["square", "symmetric", "diagonal", "explicit"])
def test_grid_survives_a_json_round_trip_of_to_dict(grid):
    data = json.loads(json.dumps(grid.to_dict()))
    again = ShiftGrid.from_dict(data)
    assert again == grid
    assert again.kind == grid.kind
    assert again.shifts == grid.shifts


# -- roll_many ------------------------------------------------------------------------------
def test_roll_many_equals_torch_roll_for_each_shift():
    x = _randn(2, 3, 5, 7)
    shifts = torch.tensor([[0, 0], [1, 2], [-1, -3], [6, 15], [-11, 8], [5, 7]])
    out = roll_many(x, shifts)
    assert out.shape == (len(shifts), 2, 3, 5, 7)
    for s, (dh, dw) in enumerate(shifts.tolist()):
        assert torch.equal(out[s], torch.roll(x, (dh, dw), dims=(-2, -1))), (dh, dw)


def test_roll_many_moves_content_down_and_right():
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 1.0
    out = roll_many(x, torch.tensor([[1, 2]]))[0, 0, 0]
    assert out[1, 2] == 1.0 and out.sum() == 1.0


@settings(max_examples=25, deadline=None)
@given(a=st.tuples(st.integers(-20, 20), st.integers(-20, 20)),
       b=st.tuples(st.integers(-20, 20), st.integers(-20, 20)))
def test_roll_many_composes_additively(a, b):
    x = _randn(1, 2, 5, 6, seed=3)
    once = roll_many(roll_many(x, torch.tensor([a]))[0], torch.tensor([b]))[0]
    total = roll_many(x, torch.tensor([[a[0] + b[0], a[1] + b[1]]]))[0]
    assert torch.equal(once, total)
    assert torch.equal(total, torch.roll(x, (a[0] + b[0], a[1] + b[1]), dims=(-2, -1)))


# -- fourier_shift_many ---------------------------------------------------------------------
# Random inputs use odd sizes: on an even axis the Nyquist coefficient of a real signal can only
# be scaled by cos(pi t) under a real fractional shift, so no real operator that agrees with
# torch.roll at integers can be exactly invertible/composable there (a property of the maths,
# not of the code).
def test_fourier_shift_by_an_integer_equals_torch_roll():
    x = _randn(2, 3, 8, 6, seed=1)  # even sizes are fine for integer shifts
    shifts = torch.tensor([[0, 0], [1, 0], [0, -2], [3, 5], [-9, 13]])
    out = fourier_shift_many(x, shifts)
    assert out.shape == (5, 2, 3, 8, 6) and out.dtype == x.dtype
    for s, (dh, dw) in enumerate(shifts.tolist()):
        torch.testing.assert_close(out[s], torch.roll(x, (dh, dw), dims=(-2, -1)), atol=1e-5, rtol=0)


def test_fourier_shift_there_and_back_returns_the_input():
    x = _randn(2, 3, 9, 11, seed=2)
    t = torch.tensor([[0.3, -1.7]])
    back = fourier_shift_many(fourier_shift_many(x, t)[0], -t)[0]
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    assert (fourier_shift_many(x, t)[0] - x).abs().max() > 0.1  # the shift did something


def test_fourier_shift_by_the_full_period_is_the_identity():
    x = _randn(1, 2, 8, 6, seed=4)
    out = fourier_shift_many(x, torch.tensor([[8.0, 0.0], [0.0, 6.0], [8.0, -6.0]]))
    for s in range(3):
        torch.testing.assert_close(out[s], x, atol=1e-5, rtol=0)


def test_two_fractional_fourier_shifts_compose_into_one_shift_by_the_sum():
    x = _randn(1, 3, 9, 7, seed=5)
    first, second = torch.tensor([[0.25, 0.6]]), torch.tensor([[1.4, -0.35]])
    twice = fourier_shift_many(fourier_shift_many(x, first)[0], second)[0]
    once = fourier_shift_many(x, first + second)[0]
    torch.testing.assert_close(twice, once, atol=1e-4, rtol=0)


@pytest.mark.parametrize("height,width", [(16, 16), (15, 12)])
def test_fourier_half_pixel_shift_of_a_band_limited_cosine_is_the_analytic_shift(height, width):
    x = _cosine_image(height, width, kh=2, kw=1)
    shifts = torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.5, -0.5], [-1.5, 2.5]], dtype=torch.float64)
    out = fourier_shift_many(x, shifts)
    for s, (dh, dw) in enumerate(shifts.tolist()):
        expected = _cosine_image(height, width, kh=2, kw=1, dh=dh, dw=dw)
        torch.testing.assert_close(out[s], expected, atol=1e-9, rtol=0)
    # float32 input: same answer at float32 precision
    out32 = fourier_shift_many(x.float(), shifts[:1].float())[0]
    torch.testing.assert_close(out32.double(), _cosine_image(height, width, 2, 1, dh=0.5),
                               atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(dh=st.floats(-12, 12, allow_nan=False), dw=st.floats(-12, 12, allow_nan=False))
def test_fourier_shift_is_inverted_by_the_opposite_shift(dh, dw):
    x = _randn(1, 2, 7, 9, seed=6, dtype=torch.float64)
    shift = torch.tensor([[dh, dw]], dtype=torch.float64)
    back = fourier_shift_many(fourier_shift_many(x, shift)[0], -shift)[0]
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_circular_shift_rolls_integers_and_phase_shifts_fractions():
    x = _randn(1, 1, 9, 9, seed=7)
    integer = circular_shift(x, torch.tensor([[2.0, -1.0]]))
    assert torch.equal(integer[0], torch.roll(x, (2, -1), dims=(-2, -1)))
    fractional = circular_shift(x, torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(fractional, fourier_shift_many(x, torch.tensor([[0.5, 1.0]])))


# -- crop_shift -----------------------------------------------------------------------------
def test_crop_window_content_is_the_canvas_shifted_down_and_right():
    margin, height, width = 3, 4, 5
    canvas = torch.arange(2 * 1 * (height + 2 * margin) * (width + 2 * margin),
                          dtype=torch.float32).reshape(2, 1, height + 2 * margin, width + 2 * margin)
    shifts = [(0, 0), (1, 2), (-3, 3), (2, -1), (-1, -2)]
    out = crop_shift(canvas, torch.tensor(shifts), margin)
    assert out.shape == (len(shifts), 2, 1, height, width)
    for s, (dh, dw) in enumerate(shifts):
        for i in range(height):
            for j in range(width):
                assert out[s, :, :, i, j].equal(canvas[:, :, margin - dh + i, margin - dw + j]), (dh, dw)


def test_crop_zero_shift_is_the_centre_window():
    canvas = _randn(2, 3, 12, 14, seed=8)
    out = crop_shift(canvas, torch.tensor([[0, 0]]), 2)[0]
    assert torch.equal(out, canvas[..., 2:10, 2:12])
    assert torch.equal(out, centre_window(canvas, 2))
    assert torch.equal(centre_window(canvas, 0), canvas)


def test_crop_shift_agrees_with_roll_away_from_the_wrap_around():
    canvas = _randn(1, 2, 14, 14, seed=9)
    margin = 3
    out = crop_shift(canvas, torch.tensor([[2, -1]]), margin)[0]
    rolled = torch.roll(canvas, (2, -1), dims=(-2, -1))
    assert torch.equal(out, centre_window(rolled, margin))


@pytest.mark.parametrize("dh,dw", [(0.5, 0.0), (-0.5, 1.5), (1.25, -2.75)])
def test_crop_fractional_shift_of_a_band_limited_canvas_is_the_analytic_shift(dh, dw):
    margin, size = 3, 16
    canvas = _cosine_image(size, size, kh=1, kw=2)
    out = crop_shift(canvas, torch.tensor([[dh, dw]]), margin)[0]
    expected = _cosine_image(size, size, kh=1, kw=2, dh=dh, dw=dw)[..., margin:-margin, margin:-margin]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("shift", [(3, 0), (0, -3), (2.5, 0)])
def test_crop_shift_beyond_the_margin_raises_usage_error(shift):
    canvas = torch.zeros(1, 1, 8, 8)
    with pytest.raises(UsageError, match="margin"):
        crop_shift(canvas, torch.tensor([shift]), 2)


def test_crop_shift_at_the_margin_is_allowed():
    canvas = _randn(1, 1, 8, 8, seed=10)
    out = crop_shift(canvas, torch.tensor([[2, -2]]), 2)[0]
    assert torch.equal(out, canvas[..., 0:4, 4:8])


# -- apply_shifts ---------------------------------------------------------------------------
def test_apply_shifts_dispatches_on_the_mode():
    x = _randn(1, 1, 8, 8, seed=11)
    shifts = torch.tensor([[1, -1]])
    assert torch.equal(apply_shifts(x, shifts, "circular"), roll_many(x, shifts))
    assert torch.equal(apply_shifts(x, shifts, "crop", margin=2), crop_shift(x, shifts, 2))


def test_apply_shifts_with_an_unknown_mode_raises_usage_error_naming_the_modes():
    with pytest.raises(UsageError, match="circular"):
        apply_shifts(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0]]), "reflect")
