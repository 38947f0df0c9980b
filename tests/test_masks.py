"""Tests for shiftlab.data.masks: pairing images with masks, reading class indices, and keeping
mask pixels aligned with image pixels through the resize and centre crop."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shiftlab.data.images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocess
from shiftlab.data.masks import (IGNORE_INDEX, MaskedDataset, MaskedImages, MaskPreprocess,
                                 check_mask_values, mask_batches, read_mask, read_mask_pairs,
                                 write_demo_masks)
from shiftlab.errors import UsageError


def write_image(path: Path, height: int = 12, width: int = 12, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_mask(path: Path, array: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint16 if mode == "I;16" else np.uint8)).save(path)
    return path


def dataset(root: Path, names: list[str], image_dir: str = "images", mask_dir: str = "masks",
            masks: list[str] | None = None) -> Path:
    for k, name in enumerate(names):
        write_image(root / image_dir / name, seed=k)
    for name in (masks if masks is not None else [Path(n).stem + ".png" for n in names]):
        write_mask(root / mask_dir / name, np.zeros((12, 12)))
    return root


# -- pairing -------------------------------------------------------------------------------
def test_images_pair_with_same_stem_masks_sorted_by_name_and_extra_masks_are_ignored(tmp_path):
    dataset(tmp_path, ["b.jpg", "a.png", "c.jpeg"], masks=["a.png", "b.png", "c.png", "zz.png"])
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    pairs = read_mask_pairs(tmp_path)
    assert [p.name for p in pairs.images] == ["a.png", "b.jpg", "c.jpeg"]
    assert [p.name for p in pairs.masks] == ["a.png", "b.png", "c.png"]
    assert all(m.parent == tmp_path / "masks" for m in pairs.masks)
    assert len(pairs) == 3 and pairs.source == tmp_path


def test_voc_layout_pairs_jpegimages_with_segmentationclass_keeping_images_with_a_mask(tmp_path):
    # VOC's JPEGImages also holds the detection-only images, which have no segmentation mask.
    dataset(tmp_path, ["2007_000032.jpg", "2007_000033.jpg", "2007_000039.jpg"], "JPEGImages",
            "SegmentationClass", masks=["2007_000033.png", "2007_000039.png"])
    pairs = read_mask_pairs(tmp_path)
    assert [p.stem for p in pairs.images] == ["2007_000033", "2007_000039"]
    assert [p.parent.name for p in pairs.masks] == ["SegmentationClass"] * 2


def test_missing_folder_and_wrong_layout_are_refused_with_the_layout_to_use(tmp_path):
    with pytest.raises(UsageError, match="does not exist.*ROOT/images/NAME.jpg with ROOT/masks/NAME.png"):
        read_mask_pairs(tmp_path / "nowhere")
    write_image(tmp_path / "flat" / "a.png")
    for wrong in (tmp_path / "flat", tmp_path / "flat" / "a.png"):
        with pytest.raises(UsageError, match="not a folder with images/ and masks/.*ROOT/masks/NAME.png"):
            read_mask_pairs(wrong)


def test_a_folder_without_images_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    write_mask(tmp_path / "masks" / "a.png", np.zeros((12, 12)))
    with pytest.raises(UsageError, match="no .* images with a mask"):
        read_mask_pairs(tmp_path)


def test_images_without_a_mask_are_refused_with_their_count_and_first_names(tmp_path):
    dataset(tmp_path, [f"im{k}.png" for k in range(6)], masks=["im0.png"])
    with pytest.raises(UsageError, match=r"^5 images .* have no mask .*: im1.png, im2.png, im3.png, \.\.\.;") as info:
        read_mask_pairs(tmp_path)
    assert "\n" not in str(info.value)


def test_max_images_keeps_the_first_pairs_and_must_be_positive(tmp_path):
    dataset(tmp_path, ["c.png", "a.png", "b.png"])
    pairs = read_mask_pairs(tmp_path, max_images=2)
    assert [p.name for p in pairs.images] == ["a.png", "b.png"] == [p.name for p in pairs.masks]
    assert len(read_mask_pairs(tmp_path, max_images=10)) == 3
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match="max_images must be an integer >= 1"):
            read_mask_pairs(tmp_path, max_images=bad)


def test_masked_images_with_different_lengths_are_refused(tmp_path):
    with pytest.raises(UsageError, match="2 images but 1 masks"):
        MaskedImages((tmp_path / "a.png", tmp_path / "b.png"), (tmp_path / "a.png",), tmp_path)


# -- reading one mask ----------------------------------------------------------------------
def test_palette_png_is_read_as_its_indices_not_its_colours(tmp_path):
    indices = np.array([[0, 1, 2], [15, 255, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    palette = np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)  # VOC-like colours
    image.putpalette(palette.tolist())
    image.save(tmp_path / "voc.png")
    with Image.open(tmp_path / "voc.png") as check:
        assert check.mode == "P"
    mask = read_mask(tmp_path / "voc.png")
    assert mask.dtype == np.int64 and mask.shape == (2, 3)
    np.testing.assert_array_equal(mask, indices)


def test_greyscale_8_and_16_bit_masks_are_read_as_values(tmp_path):
    values = np.array([[0, 3], [255, 7]])
    np.testing.assert_array_equal(read_mask(write_mask(tmp_path / "l.png", values)), values)
    wide = np.array([[0, 300], [1000, 65535]])
    np.testing.assert_array_equal(read_mask(write_mask(tmp_path / "i16.png", wide, "I;16")), wide)


def test_rgb_mask_with_equal_channels_is_accepted_as_greyscale(tmp_path):
    values = np.array([[0, 1, 2], [3, 4, 255]], dtype=np.uint8)
    Image.fromarray(np.repeat(values[..., None], 3, axis=-1)).save(tmp_path / "rgb.png")
    rgba = np.concatenate([np.repeat(values[..., None], 3, axis=-1), np.full((2, 3, 1), 9, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), values)
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png"), values)  # alpha is no class


def test_colour_coded_mask_is_refused_with_how_to_save_it(tmp_path):
    colours = np.zeros((4, 4, 3), dtype=np.uint8)
    colours[:, 2:] = (128, 0, 0)  # VOC's colour for class 1, saved as RGB
    Image.fromarray(colours).save(tmp_path / "colour.png")
    with pytest.raises(UsageError, match="colour.png is a colour-coded mask; save class indices as a"
                                         " greyscale or palette PNG"):
        read_mask(tmp_path / "colour.png")


def test_corrupt_missing_or_non_png_mask_is_refused_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "jpeg.png", format="JPEG")
    for name in ("broken.png", "jpeg.png", "missing.png"):
        with pytest.raises(UsageError, match=f"cannot read mask .*{name}") as info:
            read_mask(tmp_path / name)
        assert "\n" not in str(info.value)


# -- geometry ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 48])  # downscaled (resize 18) and upscaled (resize 55)
@pytest.mark.parametrize("height,width", [(37, 53), (53, 37)])
@pytest.mark.parametrize("cut", [0.3, 0.5, 0.7])
def test_mask_pixels_line_up_with_the_image_pixels_after_resize_and_crop(tmp_path, size, height, width, cut):
    """Red left of a column and green above a row; the mask has the same four quadrants as
    classes 0..3. After both preprocessors, every pixel's mask class must be the class its
    colour shows, except pixels the image blends half-and-half (right on a boundary)."""
    column, row = round(width * cut), round(height * (1 - cut))
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:, :column, 0] = 255
    rgb[:row, :, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "image.png")
    classes = (np.arange(width)[None, :] >= column) + 2 * (np.arange(height)[:, None] >= row)
    write_mask(tmp_path / "mask.png", classes)

    image = ImagePreprocess(size=size)(tmp_path / "image.png")
    mask = MaskPreprocess(size=size)(tmp_path / "mask.png")
    assert image.shape == (3, size, size) and mask.shape == (size, size) and mask.dtype == torch.long
    pixels = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    red, green = pixels[0], pixels[1]
    shown = (red < 0.5).long() + 2 * (green < 0.5).long()
    clear = ((red - 0.5).abs() > 0.02) & ((green - 0.5).abs() > 0.02)
    assert clear.sum() >= size * size - 2 * size  # only a boundary row and column are left out
    assert torch.equal(mask[clear], shown[clear])
    assert len(torch.unique(mask)) > 1  # the crop holds a boundary: the check has teeth


def test_mask_preprocess_mirrors_image_preprocess_geometry():
    for kwargs in ({"size": 224}, {"size": 32, "margin": 4}, {"size": 32, "resize": 64}, {"size": 30, "resize": 10}):
        if kwargs.get("resize", 10**6) < kwargs["size"]:
            with pytest.raises(UsageError, match="resize=10 is smaller than the crop"):
                MaskPreprocess(**kwargs)
            continue
        image, mask = ImagePreprocess(**kwargs), MaskPreprocess(**kwargs)
        assert (mask.crop, mask.resize) == (image.crop, image.resize)


def test_image_and_mask_of_different_sizes_are_refused_naming_both(tmp_path):
    write_image(tmp_path / "images" / "a.png", height=20, width=30)
    write_mask(tmp_path / "masks" / "a.png", np.zeros((30, 20)))
    data = MaskedDataset(read_mask_pairs(tmp_path), ImagePreprocess(size=8), MaskPreprocess(size=8))
    with pytest.raises(UsageError, match=r"image a.png is 30x20 px but its mask a.png is 20x30 px"):
        data[0]
    with pytest.raises(UsageError, match="is 30x20 px but its mask"):
        next(mask_batches(read_mask_pairs(tmp_path), size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          batch_size=1))


def test_error_in_a_dataloader_worker_reaches_the_caller_as_the_same_one_line_error(tmp_path):
    write_image(tmp_path / "images" / "a.png", height=20, width=30)
    write_mask(tmp_path / "masks" / "a.png", np.zeros((30, 20)))
    with pytest.raises(UsageError, match=r"^image a.png is 30x20 px but its mask a.png is 20x30 px;") as info:
        list(mask_batches(read_mask_pairs(tmp_path), size=8, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          batch_size=1, workers=1))
    assert "\n" not in str(info.value)


# -- batches -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> MaskedImages:
    return write_demo_masks(tmp_path_factory.mktemp("demo") / "demo", size=40)


def test_batches_have_image_and_mask_shapes_and_dtypes(demo):
    batches = list(mask_batches(demo, size=24, margin=4, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=4))
    assert [len(images) for images, _ in batches] == [4, 2]
    for images, masks in batches:
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert masks.dtype == torch.long and masks.shape == (len(images), 32, 32)


def test_batch_size_does_not_change_the_content(demo):
    def everything(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        batches = list(mask_batches(demo, size=24, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                    batch_size=batch_size))
        return torch.cat([i for i, _ in batches]), torch.cat([m for _, m in batches])

    one, five = everything(1), everything(5)
    assert torch.equal(one[0], five[0]) and torch.equal(one[1], five[1])
    # and the k-th item is pair k, preprocessed on its own
    image, mask = MaskedDataset(demo, ImagePreprocess(size=24), MaskPreprocess(size=24))[3]
    assert torch.equal(one[0][3], image) and torch.equal(one[1][3], mask)


def test_bad_batch_size_or_workers_is_refused_before_iterating(demo):
    for bad in ({"batch_size": 0}, {"batch_size": 2, "workers": -1}):
        with pytest.raises(UsageError, match="must be an integer"):
            mask_batches(demo, size=24, mean=IMAGENET_MEAN, std=IMAGENET_STD, **{"batch_size": 1, **bad})


# -- mask values ---------------------------------------------------------------------------
def test_mask_values_outside_the_classes_are_refused_with_value_classes_and_ignore_index():
    with pytest.raises(UsageError, match=r"^mask value 40 in masks/a.png is not a class of the model"
                                         r" \(0..20\) nor the ignore index 255; pass --ignore-index"):
        check_mask_values(torch.tensor([[0, 40], [20, 255]]), 21, 255, "masks/a.png")
    with pytest.raises(UsageError, match=r"^mask value -1 \(and 2 other values\) is not a class"):
        check_mask_values(torch.tensor([-1, 3, 7]), 3, 255)
    with pytest.raises(UsageError, match="nor the ignore index -100"):
        check_mask_values(torch.tensor([255]), 21, -100)


def test_mask_values_within_classes_or_equal_to_the_ignore_index_are_accepted():
    assert check_mask_values(torch.tensor([[0, 20], [255, 7]]), 21, 255) is None
    assert check_mask_values(torch.tensor([0, 1, -1]), 2, -1) is None  # torch's ignore_index style


def test_without_an_ignore_index_every_mask_value_must_be_a_class():
    assert check_mask_values(torch.tensor([0, 1, 2]), 3, None) is None
    with pytest.raises(UsageError, match=r"^mask value 255 is not a class of the model \(0..2\);") as info:
        check_mask_values(torch.tensor([0, 255]), 3, None)
    assert "ignore index" not in str(info.value)
    with pytest.raises(UsageError, match="n_classes must be an integer >= 1"):
        check_mask_values(torch.tensor([0]), 0, 255)


# -- demo dataset --------------------------------------------------------------------------
def test_demo_masks_hold_two_classes_and_an_ignore_band_along_their_boundary(demo):
    assert len(demo) == 6 and [p.name for p in demo.images] == [p.name for p in demo.masks]
    for image_path, mask_path in zip(demo.images, demo.masks):
        with Image.open(image_path) as image, Image.open(mask_path) as raw:
            assert image.mode == "RGB" and min(image.size) == 40
            assert raw.mode == "L" and raw.size == image.size
        mask = read_mask(mask_path)
        assert set(np.unique(mask).tolist()) == {0, 1, IGNORE_INDEX}
        # Within 2 px (Chebyshev) of a class-0 pixel there is no class-1 pixel: the band separates them.
        padded = np.pad(mask, 2, constant_values=IGNORE_INDEX)
        h, w = mask.shape
        near_0 = np.zeros_like(mask, dtype=bool)
        for dy in range(5):
            for dx in range(5):
                near_0 |= padded[dy:dy + h, dx:dx + w] == 0
        assert not (near_0 & (mask == 1)).any()
    assert not list(demo.source.rglob("*.tmp"))  # no temporary file is left behind


def test_demo_refuses_a_folder_that_is_not_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        write_demo_masks(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(write_demo_masks(empty, size=16)) == 6


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHIFTLAB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "shiftlab.data.masks", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def test_cli_writes_the_demo_and_says_so_in_one_line(tmp_path):
    done = run_cli(str(tmp_path / "demo"), "--size", "24")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote 6 images and masks to {tmp_path / 'demo'} (classes 0 and 1, 255 = ignore)\n"
    assert len(read_mask_pairs(tmp_path / "demo")) == 6


def test_cli_error_is_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = run_cli(str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and "exists and is not an empty folder" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr and done.stdout == ""
