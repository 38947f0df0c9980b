"""measure(): argument validation, defaults, quiet runs, and no hooks left behind."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.errors import ModelError, UsageError

from conftest import make_equivariant, tiny_classifier


def _images(n: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _run(model, images, grid=None, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return shiftlab.measure(model, images, grid, **kwargs)


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("option,value,named", [
    ("mode", "reflect", "mode"), ("align", "nearest", "alignment"), ("metric", "ssim", "metric"),
    ("device", "nonsense", "device"), ("batch_size", 0, "batch_size"), ("border", -1, "border"),
])
def test_an_invalid_option_raises_usage_error_naming_it(option, value, named):
    with pytest.raises(UsageError, match=named):
        _run(make_equivariant(), _images(), ShiftGrid.square(2), **{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_raises_usage_error():
    with pytest.raises(UsageError, match="cpu"):
        _run(make_equivariant(), _images(), ShiftGrid.square(2), device="cuda")


def test_a_crop_grid_larger_than_the_margin_raises_usage_error():
    canvas = _images(size=12)
    with pytest.raises(UsageError, match="margin"):
        _run(make_equivariant(), canvas, ShiftGrid.symmetric(3), mode="crop", margin=2)


def test_a_crop_margin_that_leaves_no_image_raises_usage_error():
    with pytest.raises(UsageError, match="margin"):
        _run(make_equivariant(), _images(size=8), ShiftGrid.symmetric(4), mode="crop")


@pytest.mark.parametrize("images", [torch.zeros(3, 8, 8), torch.zeros(1, 1, 3, 8, 8),
                                    np.zeros((1, 3, 8, 8), np.float32)],
                         ids=["3-D", "5-D", "numpy"])
def test_images_that_are_not_an_n_c_h_w_tensor_raise_usage_error(images):
    with pytest.raises(UsageError, match=r"\(N, C, H, W\)"):
        _run(make_equivariant(), images, ShiftGrid.square(2))


def test_no_images_raises_usage_error():
    with pytest.raises(UsageError):
        _run(make_equivariant(), torch.zeros(0, 3, 8, 8), ShiftGrid.square(2))


def test_the_default_grid_is_square_8_in_circular_mode():
    result = _run(make_equivariant(), _images(n=1), layers="0")
    assert result.grid == ShiftGrid.square(8)
    assert result.settings.margin == 0 and result.settings.size == (8, 8)
    assert result.mean.shape == (1, 64)


def test_the_default_grid_is_symmetric_4_with_margin_4_in_crop_mode():
    canvas = _images(n=1, size=14)
    result = _run(make_equivariant(), canvas, mode="crop", layers="0")
    assert result.grid == ShiftGrid.symmetric(4)
    assert result.settings.margin == 4 and result.settings.size == (6, 6)


def test_settings_and_meta_record_the_run():
    result = _run(make_equivariant(), _images(n=3), ShiftGrid.square(2), metric="l2",
                  align="exact", layers=["0", nn.ReLU], meta={"model": "stack"})
    assert result.settings.metric == "l2" and result.settings.align == "exact"
    assert result.settings.layers == ("0", "ReLU")
    assert result.layer_names == ["0", "2", "5"]
    assert result.meta["model"] == "stack" and result.meta["n_images"] == 3
    assert result.meta["device"] == "cpu"
    assert np.all(result.n == 3)


def test_progress_false_prints_nothing(capfd):
    _run(tiny_classifier(), _images(), ShiftGrid.square(2), progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_progress_true_draws_a_bar_on_stderr(capfd):
    _run(tiny_classifier(), _images(), ShiftGrid.square(2), progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "measuring" in err


def test_measure_leaves_no_hooks_on_the_model():
    model = tiny_classifier()
    _run(model, _images(), ShiftGrid.square(2))
    assert _no_hooks(model)


class _FailsOnCall(nn.Module):
    """Wraps a model and raises on its ``fail_at``-th forward (1-based)."""

    def __init__(self, inner: nn.Module, fail_at: int) -> None:
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("model broke mid-run")
        return self.inner(x)


@pytest.mark.parametrize("fail_at", [3, 4], ids=["reference-pass", "shifted-pass"])
def test_measure_leaves_no_hooks_when_the_model_raises_mid_run(fail_at):
    # forwards 1 and 2 probe the geometry; 3 is the reference pass, 4 the first shifted batch
    model = _FailsOnCall(tiny_classifier(), fail_at).eval()
    with pytest.raises(RuntimeError, match="mid-run"):
        _run(model, _images(), ShiftGrid.square(2), batch_size=2)
    assert model.calls == fail_at
    assert _no_hooks(model)


def test_a_model_failing_on_the_probe_raises_model_error_and_leaves_no_hooks():
    model = _FailsOnCall(tiny_classifier(), 1).eval()
    with pytest.raises(ModelError, match="mid-run"):
        _run(model, _images(), ShiftGrid.square(2))
    assert _no_hooks(model)


def test_a_layer_filter_matching_nothing_raises_usage_error():
    with pytest.raises(UsageError, match="matches no module"):
        _run(make_equivariant(), _images(), ShiftGrid.square(2), layers="features.*")


def test_a_stream_of_batches_gives_the_numbers_of_the_whole_tensor():
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import make_maxpool

    images, grid = _images(5, 16), ShiftGrid.square(3)
    whole = _run(make_maxpool(), images, grid, batch_size=4)
    loader = DataLoader(TensorDataset(images, torch.arange(5)), batch_size=2)  # 2 + 2 + 1
    for stream in (loader, list(images)):  # (images, labels) batches; single (C, H, W) images
        streamed = _run(make_maxpool(), stream, grid, batch_size=4)
        assert streamed.provenance.n_images == 5
        np.testing.assert_allclose(streamed.mean, whole.mean, atol=1e-5, equal_nan=True)
        np.testing.assert_array_equal(streamed.n, whole.n)


def test_a_stream_whose_image_size_changes_is_refused():
    with pytest.raises(UsageError, match="same size"):
        _run(make_equivariant(), [_images(1, 8), _images(1, 12)], ShiftGrid.square(2))
