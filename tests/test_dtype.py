"""Autocast for the forward passes; comparisons stay float32 and accumulation float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.errors import UsageError
from conftest import make_maxpool


def test_bfloat16_forwards_stay_close_to_float32_and_are_recorded():
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grid = ShiftGrid.square(4)
    full = shiftlab.measure(make_maxpool(), images, grid, device="cpu", progress=False)
    half = shiftlab.measure(make_maxpool(), images, grid, device="cpu", progress=False, dtype="bfloat16")
    assert half.settings.dtype == "bfloat16"
    # bf16 has ~3 significant digits; the distances (up to ~0.08 here) move by far less than that
    assert np.nanmax(np.abs(full.mean - half.mean)) < 1e-3
    assert not np.array_equal(full.mean, half.mean)  # autocast really ran


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_unsupported_dtypes_on_cpu_are_usage_errors(dtype):
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(UsageError):
        shiftlab.measure(make_maxpool(), images, ShiftGrid.square(2), device="cpu", progress=False,
                         dtype=dtype)
