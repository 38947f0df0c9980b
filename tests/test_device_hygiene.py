"""The per-pass code never waits for the device: no value is read back to the host.

On a GPU a read-back (``.item()``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``, ``nonzero``,
boolean-mask indexing) stalls the host until the queue drains. Tensors on the ``meta`` device
have shapes but no values, so every such read-back raises there: running the passes on ``meta``
proves, on any machine, that they contain none. On a CUDA machine the same passes also run
under ``torch.cuda.set_sync_debug_mode('error')``.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from tqdm import tqdm

from shiftlab.equivariance.engine import _Run, batch_layout, to_device
from shiftlab.equivariance.geometry import probe_layers
from shiftlab.equivariance.metrics import DistanceAccumulator
from shiftlab.results.result import Settings
from shiftlab.equivariance.shifts import ShiftGrid


def _small_net() -> nn.Module:
    """Stride 1, 2 and 4 maps, a global pool and logits: every kind of plan."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"),
        nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def _run(device: torch.device, mode: str, align: str, metric: str, grid: ShiftGrid,
         margin: int = 0) -> tuple[_Run, torch.Tensor, int]:
    """A run on ``device`` (probed, nothing measured yet), its images and shifts per pass."""
    model = _small_net().to(device)
    size = (16, 16)
    infos = probe_layers(model, size, device=device)
    settings = Settings(grid=grid, mode=mode, align=align, metric=metric, size=size, margin=margin)
    run = _Run(model, infos, settings, None, device, contextlib.nullcontext)
    images = torch.randn(3, 3, size[0] + 2 * margin, size[1] + 2 * margin,
                         generator=torch.Generator().manual_seed(0))
    return run, images, batch_layout(len(images), 8)[1]


def _passes(run: _Run, images: torch.Tensor, shifts_per_pass: int) -> None:
    """The reference pass and the shifted passes of one image batch."""
    with tqdm(disable=True) as bar:
        run.image_batch(images, shifts_per_pass, bar)


@pytest.mark.parametrize("align", ["exact", "fourier", "bilinear"])
@pytest.mark.parametrize("mode,grid,margin", [
    ("circular", ShiftGrid.square(4), 0),
    ("circular", ShiftGrid.square(2, subpixel=2), 0),
    ("crop", ShiftGrid.symmetric(2), 2),
])
def test_the_passes_read_nothing_back_from_the_device(mode, grid, margin, align):
    metric = "psnr" if align == "fourier" else "cosine"  # psnr also takes peaks
    run, images, per_pass = _run(torch.device("meta"), mode, align, metric, grid, margin)
    _passes(run, images, per_pass)
    assert run.sums.total.device.type == "meta"  # the sums stayed on the device too


def test_the_accumulator_adds_on_the_device_and_reads_back_only_for_the_result():
    accumulator = DistanceAccumulator(4, "meta", n_layers=2)
    values = torch.empty(3, 5, dtype=torch.float64, device="meta")
    accumulator.add(torch.zeros(3, dtype=torch.long, device="meta"), values,
                    torch.ones(3, dtype=torch.bool, device="meta"))
    with pytest.raises((NotImplementedError, RuntimeError)):
        accumulator.mean()  # the host boundary: a copy to the CPU


def test_a_layer_view_of_the_accumulator_shares_its_sums():
    accumulator = DistanceAccumulator(3, n_layers=2)
    accumulator.add(torch.tensor([4, 5]), torch.tensor([[0.5, 1.5], [2.0, 2.0]]),
                    torch.tensor([True, True]))
    second = accumulator.layer(1)  # flat indices 4 and 5: layer 1, shifts 1 and 2
    assert second.mean()[1:].tolist() == [1.0, 2.0] and second.n.tolist() == [0, 2, 2]
    assert accumulator.layer(0).n.tolist() == [0, 0, 0]
    second.total.zero_()
    assert accumulator.total[1].tolist() == [0.0, 0.0, 0.0]


def test_images_stay_where_they_are_on_the_cpu():
    images = torch.randn(2, 3, 4, 4)
    assert to_device(images, torch.device("cpu")) is images


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("align", ["exact", "fourier", "bilinear"])
def test_the_passes_never_synchronise_with_the_gpu(align):
    run, images, per_pass = _run(torch.device("cuda"), "circular", align, "cosine",
                                 ShiftGrid.square(4))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        _passes(run, images, per_pass)  # the first batch: plans built, constants copied
        _passes(run, images, per_pass)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert run.sums.total.is_cuda and int(run.sums.n.sum()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_images_go_to_the_gpu_through_pinned_memory(monkeypatch):
    pinned = []
    original = torch.Tensor.pin_memory

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", spy)
    images = torch.randn(2, 3, 8, 8)
    on_gpu = to_device(images, torch.device("cuda"))
    torch.cuda.synchronize()
    assert pinned and on_gpu.is_cuda and torch.equal(on_gpu.cpu(), images)
