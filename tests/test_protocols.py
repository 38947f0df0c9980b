"""The seed paper's ImageNet protocols (shiftlab.invariance.protocols) on tiny inputs with known answers.

Known answers:
* a model that reads only the window's top-left pixel, on images whose pixel values are distinct
  per position, predicts the window's offset: two windows agree exactly when their offsets are
  equal, so with R = size + 2 (offsets 0..1 per axis) P[agree] = 1/2 · 1/2 = 1/4, and with
  R = size + 1 (offset 0 only) every pair agrees;
* global average pooling + linear on images of period p, with p dividing the window side: every
  window has the same mean, so consistency is 1 and the diagonal curve is flat.
"""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from shiftlab import Provenance
from shiftlab.errors import ModelError, UsageError
from shiftlab.invariance.grid_result import uninformative_across
from shiftlab.invariance.protocols import (DiagonalResult, ProtocolResult, consistency_protocol,
                                diagonal_protocol, load_protocol)


class TopLeft(nn.Module):
    """Logits −1000·(k − v)² for k = 0..classes−1, v = channel 0 of the window's top-left pixel."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, 0, 0, 0]
        return -1000.0 * (torch.arange(self.classes, dtype=x.dtype) - v[:, None]) ** 2


def position_images(count: int, side: int) -> torch.Tensor:
    """Image i: pixel (r, c) = r·side + c + i (distinct per position), all channels alike."""
    grid = torch.arange(side * side, dtype=torch.float32).view(side, side)
    return torch.stack([(grid + i).expand(3, side, side) for i in range(count)])


def periodic_images(count: int, side: int, period: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tile = torch.randn(count, 3, period, period, generator=generator) \
        + 3 * torch.randn(count, 3, 1, 1, generator=generator)
    return tile.repeat(1, 1, side // period, side // period)


def gap_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)).eval()


def batched(images: torch.Tensor, labels, batch_size: int) -> list:
    labels = torch.as_tensor(labels)
    return [(images[i:i + batch_size], labels[i:i + batch_size])
            for i in range(0, len(images), batch_size)]


def run(model, batches, **options) -> ProtocolResult:
    return consistency_protocol(model, batches, device="cpu", progress=False, **options)


SIZE = 4


# -- consistency protocol ---------------------------------------------------------------------
def test_windows_of_a_periodic_image_give_consistency_one_for_global_average_pooling():
    images = periodic_images(6, 12)
    result = run(gap_linear(), batched(images, [0] * 6, 4), size=8, epochs=3)
    assert len(set(result.predictions.ravel())) > 1  # several classes: not trivially consistent
    assert result.consistency == 1.0 and result.consistency_interval == (1.0, 1.0)
    assert result.n_pairs == 18 == result.n_images * result.settings.epochs


def test_top_left_model_agrees_exactly_when_the_two_offsets_are_equal():
    side = SIZE + 2
    images = position_images(50, side)
    result = run(TopLeft(side * side + 50), batched(images, range(50), 8), size=SIZE, epochs=20,
                 seed=3)
    same = (result.offsets[:, :2] == result.offsets[:, 2:]).all(1)
    np.testing.assert_array_equal(result.agree, same)
    # the top-left value names the offset: prediction = image + oh·side + ow
    np.testing.assert_array_equal(
        result.predictions[:, 0], result.image + result.offsets[:, 0] * side + result.offsets[:, 1])
    low, high = result.consistency_interval
    assert low < 0.25 < high and abs(result.consistency - 0.25) < 0.05
    assert result.n_pairs == 1000


def test_offsets_cover_0_to_r_minus_size_minus_1_like_the_papers_randint():
    side = SIZE + 3
    result = run(TopLeft(100), batched(position_images(40, side), range(40), 16), size=SIZE,
                 epochs=5)
    assert set(result.offsets.ravel()) == {0, 1, 2}  # R − size = 3 values; offset 3 never drawn
    assert result.settings.n_offsets == (3, 3)


def test_one_possible_offset_makes_every_pair_agree():
    result = run(TopLeft(100), batched(position_images(5, SIZE + 1), range(5), 2), size=SIZE,
                 epochs=4)
    assert (result.offsets == 0).all() and result.consistency == 1.0


def test_accuracy_counts_windows_whose_prediction_is_the_label():
    side = SIZE + 2
    images = position_images(30, side)
    # label = the prediction at offset (0, 0): correct exactly for windows at (0, 0)
    result = run(TopLeft(200), batched(images, range(30), 7), size=SIZE, epochs=10)
    at_origin = np.concatenate([(result.offsets[:, :2] == 0).all(1), (result.offsets[:, 2:] == 0).all(1)])
    assert result.accuracy == pytest.approx(at_origin.mean())
    summary = result.summary()
    assert summary["accuracy_ci_low"] <= summary["accuracy"] <= summary["accuracy_ci_high"]


def test_same_seed_gives_identical_results_for_any_batch_size():
    images, labels = position_images(12, SIZE + 3), list(range(12))
    a = run(TopLeft(100), batched(images, labels, 1), size=SIZE, epochs=2, seed=7)
    b = run(TopLeft(100), batched(images, labels, 5), size=SIZE, epochs=2, seed=7)
    c = run(TopLeft(100), batched(images, labels, 5), size=SIZE, epochs=2, seed=8)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.predictions, b.predictions)
    assert a.summary() == b.summary()
    assert not np.array_equal(a.offsets, c.offsets)
    np.testing.assert_array_equal(a.image, np.tile(np.arange(12), 2))  # epoch-major


def test_batches_stream_one_at_a_time():
    """Memory is flat in the number of images: a batch is released before the next but one."""
    refs: list = []
    alive: list[int] = []

    def stream():
        for index in range(8):
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
            images = periodic_images(2, 12) + index
            refs.append(weakref.ref(images))
            yield images, torch.tensor([0, 1])

    result = run(gap_linear(), stream(), size=8)
    assert result.n_images == 16 and max(alive) <= 1


def test_bare_image_batches_give_consistency_without_accuracy():
    result = run(gap_linear(), [periodic_images(3, 12)], size=8)
    assert result.accuracy is None and result.summary()["accuracy_ci_low"] is None
    assert np.isnan(result.probability).all()


@pytest.mark.parametrize("make, needle", [
    (lambda: (batch for batch in batched(position_images(4, 6), range(4), 2)), "iterated again"),
    (lambda: batched(position_images(4, SIZE), range(4), 2), "too small"),
    (lambda: [], "no images"),
])
def test_unusable_batches_are_usage_errors(make, needle):
    with pytest.raises(UsageError, match=needle):
        run(TopLeft(50), make(), size=SIZE, epochs=2)


def test_batches_that_change_order_between_epochs_are_a_usage_error():
    class Shuffled:
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            order = [0, 1, 2, 3] if self.calls == 1 else [3, 2, 1, 0]
            return iter([(position_images(4, 6)[order], torch.tensor(order))])

    with pytest.raises(UsageError, match="shuffle=False"):
        run(TopLeft(50), Shuffled(), size=SIZE, epochs=2)


def test_nan_windows_are_left_out_and_an_all_nan_model_is_a_model_error():
    class NaNAtOrigin(TopLeft):
        def forward(self, x):
            out = super().forward(x)
            return torch.where((x[:, 0, 0, 0] == 0)[:, None], math.nan, out)

    images = position_images(20, SIZE + 2)  # image 0's window at (0, 0) has value 0
    with pytest.warns(UserWarning, match="NaN or Inf"):
        result = run(NaNAtOrigin(100), batched(images, range(20), 5), size=SIZE, epochs=6,
                     meta={"label": "origin"})
    at_origin = (result.image == 0) & ((result.offsets[:, :2] == 0).all(1) | (result.offsets[:, 2:] == 0).all(1))
    assert at_origin.any() and result.n_nonfinite > 0
    assert not result.agree[at_origin].any() and not result.valid[at_origin].any()
    assert result.summary()["n_nonfinite"] == result.n_nonfinite

    class AllNaN(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), math.nan)

    with pytest.raises(ModelError, match="every input"):
        run(AllNaN().eval(), [position_images(2, 6)], size=SIZE)


def test_train_mode_is_restored_after_the_protocol():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.9), nn.Linear(3, 5)).train()
    with pytest.warns(UserWarning, match="train mode"):
        result = run(model, [periodic_images(4, 12)], size=8, epochs=3)
    assert result.consistency == 1.0 and model.training


def test_protocol_result_saves_and_loads_every_array(tmp_path):
    result = run(TopLeft(100), batched(position_images(6, 6), range(6), 4), size=SIZE, epochs=2,
                 provenance=Provenance(model="topleft", extra={"note": "tiny"}))
    loaded = load_protocol(result.save(tmp_path / "p.npz"))
    assert isinstance(loaded, ProtocolResult) and loaded.settings == result.settings
    for name in ("image", "offsets", "predictions", "probability", "labels"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert loaded.summary() == result.summary() and loaded.provenance == result.provenance
    assert loaded.meta == result.meta and loaded.label == "topleft"
    assert loaded.provenance.n_images == 6 and loaded.provenance.extra == {"note": "tiny"}
    assert loaded.provenance.device == "cpu" and "torch" in loaded.provenance.versions
    with pytest.raises(Exception, match="protocol file"):
        load_protocol(tmp_path / "missing.npz")


def test_a_format_1_protocol_file_with_an_untyped_meta_is_read_into_its_typed_places(tmp_path):
    """Format 1 held the pipeline's resume identity plus device and versions as ``meta``."""
    from dataclasses import asdict

    from shiftlab.results.files import write_archive

    result = run(TopLeft(100), batched(position_images(6, 6), range(6), 4), size=SIZE, epochs=2)
    settings = asdict(result.settings)
    del settings["padding"]  # format 1 had no padding in its settings
    meta = {"model": "resnet18", "label": "resnet18", "weights": "random init",
            "pretrained": False, "seed": 0, "antialias": None, "model_fingerprint": "0375",
            "images": [], "image_digests": [], "resize": 40, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "labels": None,
            "extra": {"spec": "resnet18", "zero_padded": True, "protocol": "zhang2019"},
            "padding": "circular", "source": "8ccc", "device": "cpu", "shiftlab": "0.2.0",
            "torch": "2.4.0", "python": "3.11.7"}
    arrays = {name: getattr(result, name) for name in ("image", "offsets", "predictions",
                                                       "probability", "labels")}
    path = write_archive(tmp_path / "old.npz", {"format": 1, "kind": "shiftlab.protocol",
                                                "settings": settings, "meta": meta}, arrays)
    old = load_protocol(path)
    assert isinstance(old, ProtocolResult) and old.summary() == result.summary()
    assert old.settings.padding == "circular" and old.label == "resnet18"
    assert old.provenance.seed == 0 and old.provenance.resize == 40
    assert old.provenance.versions == {"shiftlab": "0.2.0", "torch": "2.4.0", "python": "3.11.7"}
    assert old.provenance.extra == {"spec": "resnet18", "zero_padded": True, "source": "8ccc"}
    assert math.isnan(old.provenance.seconds)  # format 1 did not record it
    again = load_protocol(old.save(tmp_path / "new.npz"))
    assert again.provenance.replace(seconds=0) == old.provenance.replace(seconds=0)
    assert again.settings == old.settings
    path = write_archive(tmp_path / "api.npz", {"format": 1, "kind": "shiftlab.protocol",
                                                "settings": settings, "meta": {"model": "net"}},
                         arrays)
    assert load_protocol(path).label == "net"


def test_resume_refuses_another_identity_naming_it_and_continues_the_same(tmp_path):
    images = batched(position_images(6, 6), range(6), 4)
    path = tmp_path / "progress.npz"
    run(TopLeft(100), images, size=SIZE, epochs=1, provenance=Provenance(model="a", seed=1),
        checkpoint=path)
    with pytest.raises(UsageError, match="cannot resume.*another model;"):
        run(TopLeft(100), images, size=SIZE, epochs=2, provenance=Provenance(model="b", seed=1),
            checkpoint=path, resume=True)
    with pytest.raises(UsageError, match="cannot resume.*another seed;"):  # the protocol's
        run(TopLeft(100), images, size=SIZE, epochs=2, provenance=Provenance(model="a", seed=1),
            seed=5, checkpoint=path, resume=True)
    keyed = tmp_path / "keyed.npz"  # the pipeline's resume_key replaces the provenance's fields
    run(TopLeft(100), images, size=SIZE, epochs=1, resume_key={"source": "abc"}, checkpoint=keyed)
    with pytest.raises(UsageError, match="cannot resume.*another source;"):
        run(TopLeft(100), images, size=SIZE, epochs=2, checkpoint=keyed, resume=True,
            resume_key={"source": "other"}, provenance=Provenance(model="a"))
    resumed = run(TopLeft(100), images, size=SIZE, epochs=2, checkpoint=path, resume=True,
                  provenance=Provenance(model="a", seed=1))
    assert resumed.n_pairs == 12 and resumed.provenance.model == "a"


# -- diagonal protocol ------------------------------------------------------------------------
def test_diagonal_ground_truth_probability_is_one_at_t0_only_for_the_top_left_model():
    side = SIZE + 3
    result = diagonal_protocol(TopLeft(200), batched(position_images(5, side), range(5), 2),
                               size=SIZE, max_offset=3, device="cpu", progress=False)
    assert isinstance(result, DiagonalResult) and result.predictions.shape == (5, 4)
    np.testing.assert_allclose(result.mean_curve, [1, 0, 0, 0], atol=1e-9)
    np.testing.assert_array_equal(result.accuracy_curve, [1, 0, 0, 0])
    # the window at (t, t) starts at pixel t·side + t
    np.testing.assert_array_equal(result.predictions, np.arange(5)[:, None] + np.arange(4) * (side + 1))
    summary = result.summary()
    assert summary["accuracy"] == 0.25 and summary["correct_all_offsets"] == 0.0
    assert summary["consistent_all_offsets"] == 0.0 and summary["steps"] == 4


def test_diagonal_curve_is_flat_for_an_invariant_model_and_survives_save_load(tmp_path):
    images = periodic_images(4, 12)
    labels = gap_linear()(images).argmax(1)
    result = diagonal_protocol(gap_linear(), batched(images, labels, 3), size=8, max_offset=4,
                               device="cpu", progress=False)
    curves = result.probability
    np.testing.assert_allclose(curves, curves[:, :1].repeat(5, 1), atol=1e-6)
    assert result.summary()["consistent_all_offsets"] == 1.0 and result.summary()["accuracy"] == 1.0
    loaded = load_protocol(result.save(tmp_path / "d.npz"))
    assert isinstance(loaded, DiagonalResult)
    np.testing.assert_array_equal(loaded.probability, result.probability)


def test_diagonal_needs_labels_and_room_for_the_last_window():
    with pytest.raises(UsageError, match="labels"):
        diagonal_protocol(gap_linear(), [periodic_images(2, 12)], size=8, max_offset=2,
                          device="cpu", progress=False)
    with pytest.raises(UsageError, match="too small"):
        diagonal_protocol(gap_linear(), batched(periodic_images(2, 12), [0, 1], 2), size=8,
                          max_offset=5, device="cpu", progress=False)


def test_one_class_everywhere_warns_and_identical_models_are_flagged_across():
    class Always1(nn.Module):
        def forward(self, x):
            return torch.tensor([0.0, 1.0]).expand(len(x), 2) + 0 * x.mean()

    with pytest.warns(UserWarning, match="uninformative: every prediction is class 1"):
        one = run(Always1().eval(), [position_images(3, 6)], size=SIZE, meta={"label": "one"})
    assert one.uninformative is not None and one.label == "one"
    assert one.with_label("renamed").label == "renamed" and one.label == "one"
    images = batched(position_images(6, 6), range(6), 3)
    a, b = (run(TopLeft(100), images, size=SIZE, seed=1) for _ in range(2))
    assert a.uninformative is None and "all 2 models" in uninformative_across([a, b])
    assert uninformative_across([a, run(TopLeft(100), images, size=SIZE, seed=2)]) is None
