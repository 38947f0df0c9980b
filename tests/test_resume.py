"""Interrupted runs resume from their last completed image batch and equal an uninterrupted run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.errors import UsageError
from conftest import make_maxpool

# the interrupting test model is left in train mode on purpose: the warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*was in train mode")


class Interrupting(torch.nn.Module):
    """Wraps a model and raises KeyboardInterrupt on the n-th forward."""

    def __init__(self, model: torch.nn.Module, at: int) -> None:
        super().__init__()
        self.model, self.at, self.calls = model, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.model(x)


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    grid = ShiftGrid.square(3)
    options = dict(device="cpu", progress=False, batch_size=2, align="bilinear")
    full = shiftlab.measure(make_maxpool(), images, grid, **options)
    checkpoint = tmp_path / "progress.npz"
    # 2 images per batch, 8 shifted passes + 1 reference per batch, plus 2 probe forwards:
    # the 25th forward falls inside the third image batch
    broken = Interrupting(make_maxpool(), at=25)
    with pytest.raises(KeyboardInterrupt):
        shiftlab.measure(broken, images, grid, checkpoint=checkpoint, **options)
    assert checkpoint.is_file()
    resumed_model = Interrupting(make_maxpool(), at=10**9)
    resumed = shiftlab.measure(resumed_model, images, grid, checkpoint=checkpoint, resume=True, **options)
    np.testing.assert_array_equal(resumed.n, full.n)
    np.testing.assert_allclose(resumed.mean, full.mean, atol=1e-12, equal_nan=True)
    assert not checkpoint.exists()  # removed after completion
    # only the unfinished batch was recomputed: 2 probes + 1 batch x (1 reference + 8 shifted)
    assert resumed_model.calls == 2 + 9


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    checkpoint = tmp_path / "progress.npz"
    with pytest.raises(KeyboardInterrupt):
        shiftlab.measure(Interrupting(make_maxpool(), at=14), images, ShiftGrid.square(3), device="cpu",
                         progress=False, batch_size=2, checkpoint=checkpoint)
    with pytest.raises(UsageError, match="other settings"):
        shiftlab.measure(make_maxpool(), images, ShiftGrid.square(3), device="cpu", progress=False,
                         batch_size=2, checkpoint=checkpoint, resume=True, metric="l2")
