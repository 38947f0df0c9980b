"""Tests for shiftlab.data.sources: streamed batches from folders, CSVs, Datasets and DataLoaders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder

from shiftlab.data.images import load_images
from shiftlab.errors import ImageError, UsageError
from shiftlab.data.labels import read_labels
from shiftlab.data.sources import ImageBatch, ImageDataset, image_batches

RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def write_image(path: Path, seed: int, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def flat_folder(root: Path, count: int = 5, corrupt_at: int | None = None) -> list[Path]:
    paths = []
    for k in range(count):
        path = root / f"img{k}.png"
        if k == corrupt_at:
            path.write_bytes(b"not a png")
        else:
            write_image(path, seed=k, size=(24 + k, 20))
        paths.append(path)
    return paths


def collect(stream) -> tuple[torch.Tensor, list, list[int], list[ImageBatch]]:
    batches = list(stream)
    return (torch.cat([b.tensor for b in batches]), [p for b in batches for p in b.paths],
            [i for b in batches for i in b.indices], batches)


# --- agreement with load_images and across workers -----------------------------------------------


def test_streamed_batches_equal_load_images_bit_for_bit(tmp_path):
    paths = flat_folder(tmp_path, count=5, corrupt_at=2)
    loaded = load_images(paths, size=16, margin=2)
    stream = image_batches(paths, size=16, margin=2, batch_size=2, on_skip=lambda *_: None)
    tensor, streamed_paths, indices, batches = collect(stream)
    assert torch.equal(tensor, loaded.tensor)
    assert streamed_paths == loaded.paths and indices == [0, 1, 3, 4]
    assert stream.skipped == loaded.skipped
    # The corrupt file leaves its batch one image short; no batch is padded or merged.
    assert [len(b.indices) for b in batches] == [2, 1, 1]


def test_two_workers_give_the_same_batches_as_none(tmp_path):
    paths = flat_folder(tmp_path, count=7, corrupt_at=3)
    runs = []
    for workers in (0, 2):
        stream = image_batches(paths, size=16, batch_size=3, workers=workers, on_skip=lambda *_: None)
        runs.append((list(stream), stream.skipped))
    (serial, serial_skipped), (parallel, parallel_skipped) = runs
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert torch.equal(a.tensor, b.tensor) and a.paths == b.paths and a.indices == b.indices
    assert serial_skipped == parallel_skipped == [(paths[3], serial_skipped[0][1])]


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_file_is_skipped_and_reported_once(tmp_path, workers):
    paths = flat_folder(tmp_path, count=4, corrupt_at=1)
    reports = []
    stream = image_batches(tmp_path, size=16, batch_size=2, workers=workers,
                           on_skip=lambda path, reason: reports.append((path, reason)))
    _, kept, indices, _ = collect(stream)
    assert len(reports) == 1 and reports[0][0] == paths[1]
    assert "not a readable image" in reports[0][1]
    assert kept == [paths[0], paths[2], paths[3]] and indices == [0, 2, 3]
    assert stream.skipped == reports and stream.total == 4


def test_without_on_skip_one_warning_summarises_the_skips(tmp_path):
    flat_folder(tmp_path, count=5, corrupt_at=0)
    (tmp_path / "img9.png").write_bytes(b"also broken")
    with pytest.warns(UserWarning, match=r"skipped 2 of 6 images \(first: .*img0\.png") as record:
        list(image_batches(tmp_path, size=16, batch_size=2))
    assert len(record) == 1


def test_tall_png_is_skipped_in_the_stream_with_the_pixel_limit_named(tmp_path):
    good = write_image(tmp_path / "a.png", seed=0)
    tall = tmp_path / "b.png"
    Image.new("1", (8, 2_000_000)).save(tall)  # about 4 KB on disk
    stream = image_batches(tmp_path, size=16, batch_size=4, on_skip=lambda *_: None)
    _, kept, _, _ = collect(stream)
    assert kept == [good]
    assert stream.skipped[0][0] == tall and "pixel limit (shiftlab.data.images.MAX_RESIZED_PIXELS)" in stream.skipped[0][1]


def test_stream_of_only_unusable_files_raises_image_error(tmp_path):
    flat_folder(tmp_path, count=1, corrupt_at=0)
    with pytest.raises(ImageError, match="no image could be loaded: .*img0.png: not a readable image"):
        list(image_batches(tmp_path, size=16, on_skip=lambda *_: None))


def test_max_images_limits_the_stream_to_the_first_items(tmp_path):
    paths = flat_folder(tmp_path, count=5)
    _, kept, indices, _ = collect(image_batches(tmp_path, size=16, batch_size=2, max_images=3))
    assert kept == paths[:3] and indices == [0, 1, 2]


# --- labelled sources ------------------------------------------------------------------------------


def test_wnid_class_folders_stream_with_sorted_order_indices(tmp_path):
    for k, wnid in enumerate(["n02000000", "n01000000", "n03000000"]):
        write_image(tmp_path / wnid / f"x{k}.jpg", seed=k)
    batches = list(image_batches(tmp_path, size=16, batch_size=8))
    assert batches[0].labels.tolist() == [0, 1, 2]
    assert [p.parent.name for p in batches[0].paths] == ["n01000000", "n02000000", "n03000000"]
    assert batches[0].labels.dtype == torch.int64


def test_csv_source_gives_its_labels_in_row_order(tmp_path):
    write_image(tmp_path / "images" / "a.png", seed=0)
    write_image(tmp_path / "images" / "b.png", seed=1)
    (tmp_path / "labels.csv").write_text("file,label\nimages/b.png,2\nimages/a.png,Tench\n")
    batch = next(iter(image_batches(tmp_path / "labels.csv", size=16, categories=["tench", "x", "y"])))
    assert [p.name for p in batch.paths] == ["b.png", "a.png"] and batch.labels.tolist() == [2, 0]


def test_labelled_images_from_read_labels_are_a_source(tmp_path):
    write_image(tmp_path / "1" / "a.png", seed=0)
    write_image(tmp_path / "0" / "b.png", seed=1)
    batch = next(iter(image_batches(read_labels(tmp_path), size=16)))
    assert [p.name for p in batch.paths] == ["b.png", "a.png"] and batch.labels.tolist() == [0, 1]


def test_folder_tree_without_labels_is_searched_recursively(tmp_path):
    write_image(tmp_path / "cats" / "deep" / "a.png", seed=0)
    write_image(tmp_path / "dogs" / "b.png", seed=1)
    batch = next(iter(image_batches(tmp_path, size=16, with_labels=False)))
    assert [p.relative_to(tmp_path).as_posix() for p in batch.paths] == ["cats/deep/a.png", "dogs/b.png"]
    assert batch.labels is None


# --- torch Datasets and DataLoaders ----------------------------------------------------------------


def test_a_dataset_of_tensors_passes_straight_through():
    images = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([4, 3, 2, 1, 0])
    batches = list(image_batches(TensorDataset(images, targets), size=12, batch_size=2, workers=2))
    assert torch.equal(torch.cat([b.tensor for b in batches]), images)
    assert torch.cat([b.labels for b in batches]).tolist() == targets.tolist()
    assert batches[0].paths == [None, None] and batches[-1].indices == [4]


def test_imagefolder_without_transform_is_preprocessed_like_files(tmp_path):
    for k, name in enumerate(["b", "a", "b"]):
        write_image(tmp_path / name / f"{k}.png", seed=k, size=(30 + k, 20))
    folder = ImageFolder(tmp_path)
    batch = next(iter(image_batches(folder, size=16, margin=1, batch_size=8, **RAW)))
    expected = load_images([path for path, _ in folder.samples], size=16, margin=1, **RAW)
    assert torch.equal(batch.tensor, expected.tensor)
    assert batch.labels.tolist() == folder.targets and batch.paths == expected.paths


def test_a_dataloader_passes_straight_through_up_to_max_images():
    images = torch.randn(7, 3, 10, 10, generator=torch.Generator().manual_seed(1))
    loader = DataLoader(TensorDataset(images, torch.arange(7)), batch_size=3)
    batches = list(image_batches(loader, size=10, max_images=5))
    assert [len(b.indices) for b in batches] == [3, 2]
    assert torch.equal(torch.cat([b.tensor for b in batches]), images[:5])
    assert torch.cat([b.labels for b in batches]).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_images_of_the_wrong_size_name_the_expected_crop(workers):
    dataset = TensorDataset(torch.zeros(2, 3, 12, 12))
    with pytest.raises(UsageError, match=r"expected \(C, 16, 16\) = size \+ 2\*margin"):
        list(image_batches(dataset, size=12, margin=2, workers=workers))


def test_bad_stream_parameters_are_usage_errors(tmp_path):
    flat_folder(tmp_path, count=1)
    for kwargs, needle in [({"batch_size": 0}, "batch_size"), ({"workers": -1}, "workers"),
                           ({"max_images": 0}, "max_images")]:
        with pytest.raises(UsageError, match=needle):
            image_batches(tmp_path, size=16, **kwargs)
    with pytest.raises(UsageError, match="cannot stream images from a int"):
        image_batches(3, size=16)


def test_image_dataset_items_and_unreadable_file(tmp_path):
    paths = flat_folder(tmp_path, count=2, corrupt_at=1)
    dataset = ImageDataset(paths, labels=[7, 8], size=16)
    image, label = dataset[0]
    assert torch.equal(image, load_images(paths[:1], size=16).tensor[0]) and label == 7
    with pytest.raises(ImageError, match="img1.png: not a readable image"):
        dataset[1]
    with pytest.raises(UsageError, match="1 labels for 2 images"):
        ImageDataset(paths, labels=[0], size=16)
