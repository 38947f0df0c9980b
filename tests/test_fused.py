"""The reference images ride with the first shifted pass (one forward pass fewer per batch of
images, every batch as full as the bare forwards'), without changing any distance."""
from __future__ import annotations

import numpy as np
import torch

import shiftlab
from shiftlab import ShiftGrid

from conftest import make_equivariant, tiny_classifier


def _batch_sizes(model: torch.nn.Module, images: torch.Tensor, **kwargs) -> tuple[list[int], object]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    try:
        result = shiftlab.measure(model, images, progress=False, **kwargs)
    finally:
        handle.remove()
    return sizes, result


def test_the_reference_shares_the_first_pass_so_passes_match_the_bare_forwards():
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sizes, _ = _batch_sizes(tiny_classifier(), images, grid=ShiftGrid.square(4), batch_size=16)
    # 16 shifts (zero included) x 2 images at 16 per pass: two full passes; the probe's forwards
    # come first, with smaller batches
    assert [n for n in sizes if n > 2] == [16, 16]


def test_a_pass_without_room_for_the_reference_leaves_it_a_pass_of_its_own():
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sizes, _ = _batch_sizes(tiny_classifier(), images, grid=ShiftGrid.square(2), batch_size=2)
    assert max(sizes[-4:]) <= 2 and len(sizes) >= 4  # never more than the batch size


def test_an_exactly_equivariant_model_reads_zero_with_the_reference_in_the_first_pass():
    images = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    _, result = _batch_sizes(make_equivariant(), images, grid=ShiftGrid.square(3), batch_size=6,
                             align="exact")
    assert np.nanmax(np.abs(np.asarray(result.mean))) <= 1e-6
