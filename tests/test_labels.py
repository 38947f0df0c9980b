"""Tests for shiftlab.data.labels: when class names become indices by name and when by sorted order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from shiftlab.errors import UsageError
from shiftlab.data.labels import read_labels


def write_png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)
    return path


WNIDS = ["n04000000", "n01440764", "n02000000"]  # not in sorted order on purpose


def wnid_folders(root: Path) -> None:
    for k, wnid in enumerate(WNIDS):
        write_png(root / wnid / f"img{k}.png", seed=k)


def test_wnid_folders_are_classes_in_sorted_order_like_imagefolder(tmp_path):
    wnid_folders(tmp_path)
    labelled = read_labels(tmp_path)
    assert [p.parent.name for p in labelled.paths] == sorted(WNIDS)
    assert labelled.labels == [0, 1, 2] and labelled.order == "sorted"
    reference = ImageFolder(tmp_path)
    assert labelled.labels == reference.targets
    assert [str(p) for p in labelled.paths] == [path for path, _ in reference.samples]


def test_wnid_folders_use_sorted_order_when_they_cover_every_category(tmp_path):
    wnid_folders(tmp_path)
    # An empty class folder still takes its place in the order, as in ImageFolder's classes.
    (tmp_path / "n01000000").mkdir()
    categories = ["tench", "goldfish", "shark", "ray"]
    labelled = read_labels(tmp_path, categories)
    assert labelled.labels == [1, 2, 3] and labelled.order == "sorted"


def test_wnid_subset_of_a_larger_model_is_refused_unless_sorted_is_asked(tmp_path):
    wnid_folders(tmp_path)
    categories = [f"class {k}" for k in range(10)]
    with pytest.raises(UsageError, match=r"3 WNID classes .* model has 10: .*class_order='sorted'"):
        read_labels(tmp_path, categories)
    assert read_labels(tmp_path, categories, class_order="sorted").labels == [0, 1, 2]


def test_named_folders_keep_name_matching_not_sorted_order(tmp_path):
    write_png(tmp_path / "goldfish" / "a.png")
    write_png(tmp_path / "tench" / "b.png")
    labelled = read_labels(tmp_path, ["tench", "goldfish"])
    # Sorted order would make goldfish 0; the model says goldfish is 1.
    assert labelled.labels == [1, 0] and labelled.order == "names"


def test_class_order_sorted_numbers_any_folder_names_and_names_refuses_wnids(tmp_path):
    write_png(tmp_path / "dog" / "a.png")
    write_png(tmp_path / "cat" / "b.png")
    assert read_labels(tmp_path, None, class_order="sorted").labels == [0, 1]
    with pytest.raises(UsageError, match="class_order='sorted'"):
        read_labels(tmp_path, None)
    wnids = tmp_path / "wnids"
    wnid_folders(wnids)
    with pytest.raises(UsageError, match="unknown class names"):
        read_labels(wnids, ["a", "b", "c"], class_order="names")


def test_csv_with_wnid_labels_for_every_class_uses_sorted_order(tmp_path):
    write_png(tmp_path / "a.png")
    write_png(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("a.png,n02000000\nb.png,n01000000\n")
    assert read_labels(tmp_path / "labels.csv", ["x", "y"]).labels == [1, 0]


def test_hidden_folders_are_not_classes(tmp_path):
    wnid_folders(tmp_path)
    write_png(tmp_path / ".ipynb_checkpoints" / "c.png")
    assert read_labels(tmp_path).labels == [0, 1, 2]


def test_unknown_class_order_is_a_usage_error(tmp_path):
    wnid_folders(tmp_path)
    with pytest.raises(UsageError, match="class_order='alphabetical' is unknown"):
        read_labels(tmp_path, class_order="alphabetical")


def test_one_image_with_two_labels_in_a_csv_is_refused_naming_its_rows(tmp_path):
    from conftest import random_png_folder

    random_png_folder(tmp_path, count=2)
    (tmp_path / "labels.csv").write_text("file,label\n0.png,2\n1.png,3\n0.png,5\n")
    with pytest.raises(UsageError, match=r"0\.png has different labels \('2', '5'\) in rows 1, 3"):
        read_labels(tmp_path / "labels.csv")


def test_one_image_linked_into_two_class_folders_is_refused(tmp_path):
    from conftest import random_png_folder

    random_png_folder(tmp_path / "2", count=1)
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "0.png").symlink_to(tmp_path / "2" / "0.png")
    with pytest.raises(UsageError, match="has different labels .* in class folders"):
        read_labels(tmp_path)


def test_the_same_image_listed_twice_with_one_label_is_kept(tmp_path):
    from conftest import random_png_folder

    random_png_folder(tmp_path, count=1)
    (tmp_path / "labels.csv").write_text("0.png,1\n0.png,1\n")
    assert read_labels(tmp_path / "labels.csv").labels == [1, 1]
