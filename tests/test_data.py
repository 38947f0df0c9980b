"""Tests for shiftlab.data.images: shipped images, folder discovery, and preprocessing."""
from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from shiftlab.data.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocess,
    LoadedImages,
    UnreadableImageError,
    find_images,
    image_digest,
    load_images,
    sample_image_paths,
)
from shiftlab.errors import ImageError, ShiftlabError, UsageError

# Mean 0 and std 1 leave pixel values as they are, so tests can check them directly.
RAW = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _save(path: Path, image: Image.Image) -> Path:
    image.save(path)
    return path


def _gradient(width: int = 40, height: int = 30) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


# --- shipped sample images ----------------------------------------------------------------------


def test_sample_images_are_shipped_sorted_and_load_as_rgb():
    paths = sample_image_paths()
    assert len(paths) >= 4
    assert paths == sorted(paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert min(image.size) == 288
    batch = load_images(paths, size=224, margin=16)
    assert batch.tensor.shape == (len(paths), 3, 256, 256)
    assert batch.skipped == []
    assert torch.isfinite(batch.tensor).all()


def test_every_sample_image_has_a_public_domain_or_cc0_licence_in_sources():
    sources = (sample_image_paths()[0].parent / "SOURCES.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", sources, re.MULTILINE)}
    for path in sample_image_paths():
        assert path.name in rows, f"{path.name} has no row in SOURCES.md"
        assert re.search(r"public domain|CC0", rows[path.name], re.IGNORECASE), rows[path.name]
    assert sum(p.stat().st_size for p in sample_image_paths()) < 1_000_000


# --- find_images --------------------------------------------------------------------------------


def test_find_images_lists_folder_images_case_insensitively_and_not_recursively(tmp_path):
    for name in ["b.JPG", "a.png", "c.jpeg"]:
        _save(tmp_path / name, _gradient())
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "d.png", _gradient())
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.JPG", "c.jpeg"]


def test_find_images_accepts_a_single_file_and_a_list_in_order(tmp_path):
    first = _save(tmp_path / "z.png", _gradient())
    second = _save(tmp_path / "a.jpg", _gradient())
    assert find_images(str(first)) == [first]
    assert find_images([first, str(second)]) == [first, second]


def test_find_images_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ImageError, match="nowhere.*does not exist"):
        find_images(missing)
    with pytest.raises(ImageError, match="does not exist"):
        find_images([missing / "x.png"])


def test_find_images_empty_folder_says_what_to_pass(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ImageError, match=r"no \.png/\.jpg/\.jpeg files in folder .*pass the image files"):
        find_images(tmp_path)


def test_find_images_rejects_a_non_image_file_and_an_empty_list(tmp_path):
    text = tmp_path / "data.csv"
    text.write_text("1,2,3")
    with pytest.raises(ImageError, match="data.csv is not an image file"):
        find_images(text)
    with pytest.raises(ImageError, match="empty"):
        find_images([])


# --- load_images: geometry and normalisation -------------------------------------------------------


def test_load_images_shape_without_and_with_margin(tmp_path):
    path = _save(tmp_path / "g.png", _gradient(60, 45))
    plain = load_images([path], size=32)
    assert isinstance(plain, LoadedImages)
    assert plain.tensor.shape == (1, 3, 32, 32) and plain.tensor.dtype == torch.float32
    assert plain.paths == [path]
    padded = load_images([path], size=32, margin=4)
    assert padded.tensor.shape == (1, 3, 40, 40)


def test_margin_is_real_content_around_the_centre_window(tmp_path):
    # With resize fixed, the centre 32x32 of the 40x40 margin crop is exactly the 32x32 crop.
    path = _save(tmp_path / "g.png", _gradient(60, 45))
    plain = load_images([path], size=32, resize=45, **RAW).tensor
    padded = load_images([path], size=32, margin=4, resize=45, **RAW).tensor
    torch.testing.assert_close(padded[..., 4:-4, 4:-4], plain)
    # The margin holds image content, not a constant padding value.
    assert padded[0, 0, 0, :].std() > 0.01 and padded[0, 0, :, 0].std() < padded[0, 0, 0, :].std()


def test_default_resize_follows_the_256_for_224_convention(tmp_path):
    # A 512x512 image resized to 256 then cropped to 224 keeps the central 87.5%: a crop of the
    # input shrunk by 2 equals the library resize of the central 448 pixels.
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    path = _save(tmp_path / "n.png", image)
    default = load_images([path], size=224, **RAW).tensor
    explicit = load_images([path], size=224, resize=256, **RAW).tensor
    torch.testing.assert_close(default, explicit)
    # With a margin larger than the convention allows, resize grows so the crop still fits.
    wide = load_images([path], size=224, margin=40, **RAW).tensor
    assert wide.shape[-1] == 304


def test_normalisation_applies_mean_and_std_per_channel(tmp_path):
    color = (200, 100, 50)
    path = _save(tmp_path / "flat.png", Image.new("RGB", (20, 20), color))
    out = load_images([path], size=16).tensor
    expected = [(c / 255 - m) / s for c, m, s in zip(color, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5, rtol=0)
    custom = load_images([path], size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).tensor
    expected_custom = torch.tensor([(c / 255 - 0.5) / 0.5 for c in color])
    torch.testing.assert_close(custom[0, :, 0, 0], expected_custom, atol=1e-5, rtol=0)


def test_bad_geometry_and_normalisation_are_usage_errors(tmp_path):
    path = _save(tmp_path / "g.png", _gradient())
    with pytest.raises(UsageError, match="size must be an integer"):
        load_images([path], size=0)
    with pytest.raises(UsageError, match="margin"):
        load_images([path], size=16, margin=-1)
    with pytest.raises(UsageError, match="resize=20 is smaller"):
        load_images([path], size=16, margin=4, resize=20)
    with pytest.raises(UsageError, match="std must be positive"):
        load_images([path], size=16, std=(1.0, 0.0, 1.0))
    with pytest.raises(UsageError, match="mean must have 3 numbers"):
        load_images([path], size=16, mean=(0.5, 0.5))


# --- load_images: pixel formats -----------------------------------------------------------------


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # 16-bit value 32768 is mid-grey; clipping at 255 would make it white.
    path = _save(tmp_path / "g16.png", Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16)))
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_images([path], size=16, **RAW).tensor
    torch.testing.assert_close(out, torch.full((1, 3, 16, 16), 32768 / 65535), atol=1e-4, rtol=0)


def test_16_bit_gradient_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.float64)[None, :].repeat(64, 0).astype(np.uint16)
    path = _save(tmp_path / "ramp16.png", Image.fromarray(ramp))
    out = load_images([path], size=64, resize=64, **RAW).tensor
    assert out.min() < 0.05 and out.max() > 0.95
    # The ramp stays monotonic: no plateau at the top, as there would be after clipping.
    assert (out[0, 0, 0, 1:] - out[0, 0, 0, :-1] > 0).all()


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = _save(tmp_path / "l.png", Image.new("L", (20, 20), 128))
    out = load_images([path], size=16, **RAW).tensor
    assert out.shape == (1, 3, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, 128 / 255))


def test_rgba_transparent_pixels_become_white_and_opaque_keep_colour(tmp_path):
    rgba = np.zeros((20, 40, 4), dtype=np.uint8)
    rgba[:, :20] = (255, 0, 0, 0)  # fully transparent red: must not show as red
    rgba[:, 20:] = (0, 0, 255, 255)  # opaque blue
    path = _save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA"))
    out = load_images([path], size=20, resize=20, margin=0, **RAW).tensor[0]
    # resize=20 makes the image 40x20 then the centre 20x20 crop spans columns 10..29.
    torch.testing.assert_close(out[:, 10, 2], torch.tensor([1.0, 1.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 10, 17], torch.tensor([0.0, 0.0, 1.0]), atol=1e-4, rtol=0)


def test_palette_and_cmyk_images_are_converted(tmp_path):
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    p_path = _save(tmp_path / "p.png", palette)
    cmyk_path = tmp_path / "c.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(cmyk_path)
    out = load_images([p_path, cmyk_path], size=16, **RAW).tensor
    torch.testing.assert_close(out[0, :, 8, 8], torch.tensor([10, 200, 30]) / 255.0, atol=1e-4, rtol=0)
    # CMYK magenta is red + blue in RGB.
    assert out[1, 0, 8, 8] > 0.9 and out[1, 1, 8, 8] < 0.1 and out[1, 2, 8, 8] > 0.9


# --- load_images: skipping ----------------------------------------------------------------------


def test_corrupt_file_is_skipped_and_reported(tmp_path):
    good = _save(tmp_path / "good.png", _gradient())
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    batch = load_images([fake, good, truncated], size=16)
    assert batch.paths == [good]
    assert batch.tensor.shape == (1, 3, 16, 16)
    skipped = dict(batch.skipped)
    assert set(skipped) == {fake, truncated}
    assert "not a readable image" in skipped[fake]
    assert "truncated" in skipped[truncated] or "readable" in skipped[truncated]


def test_tiny_image_is_skipped_as_too_small(tmp_path):
    tiny = _save(tmp_path / "tiny.png", Image.new("RGB", (7, 30)))
    ok = _save(tmp_path / "ok.png", Image.new("RGB", (8, 8)))
    batch = load_images([tiny, ok], size=8)
    assert batch.paths == [ok]
    assert batch.skipped == [(tiny, "too small (7x30 px); images need at least 8 px on each side")]


def test_nothing_loadable_raises_with_the_reasons(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    with pytest.raises(ImageError, match=r"no image could be loaded: .*bad\.png: not a readable image"):
        load_images([bad], size=16)
    with pytest.raises(ShiftlabError, match="no paths were given"):
        load_images([], size=16)


def test_load_images_accepts_a_folder(tmp_path):
    _save(tmp_path / "b.png", _gradient())
    _save(tmp_path / "a.png", _gradient())
    batch = load_images(tmp_path, size=16)
    assert [p.name for p in batch.paths] == ["a.png", "b.png"]
    with pytest.raises(ImageError, match="does not exist"):
        load_images(tmp_path / "missing", size=16)


# --- size limits before allocation ------------------------------------------------------------------


def test_tall_png_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
    tall = tmp_path / "tall.png"
    Image.new("1", (8, 2_000_000)).save(tall)
    assert tall.stat().st_size < 50_000
    good = _save(tmp_path / "good.png", _gradient())

    def no_decoding(self):
        raise AssertionError(f"{self.size} px image decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(UnreadableImageError, match=r"8x2000000 px resized to a 256 px short side is"
                       r" 16,384,000,000 px, over the 16,777,216-pixel limit \(shiftlab.data.images.MAX_RESIZED_PIXELS\)"):
        ImagePreprocess(size=224)(tall)
    monkeypatch.undo()
    batch = load_images([tall, good], size=224)
    assert batch.paths == [good] and batch.skipped[0][0] == tall and "too elongated" in batch.skipped[0][1]


def test_image_over_max_pixels_is_refused_with_the_limit_named(tmp_path, monkeypatch):
    path = _save(tmp_path / "big.png", _gradient(40, 30))
    monkeypatch.setattr("shiftlab.data.images.MAX_PIXELS", 40 * 30 - 1)
    with pytest.raises(ImageError, match=r"40x30 px is over the 1,199-pixel limit \(shiftlab.data.images.MAX_PIXELS\)"):
        ImagePreprocess(size=16)(path)
    monkeypatch.setattr("shiftlab.data.images.MAX_PIXELS", 40 * 30)
    assert ImagePreprocess(size=16)(path).shape == (3, 16, 16)


def test_unreadable_image_error_survives_pickling_with_its_reason():
    error = pickle.loads(pickle.dumps(UnreadableImageError(Path("a.png"), "too small")))
    assert (error.path, error.reason) == (Path("a.png"), "too small")
    assert str(error) == "a.png: too small; replace or remove the file"


# --- content digests ------------------------------------------------------------------------------------


def test_image_digest_is_the_sha256_of_the_file_bytes(tmp_path):
    path = _save(tmp_path / "g.png", _gradient())
    data = path.read_bytes()
    assert image_digest(path) == hashlib.sha256(data).hexdigest()[:16]
    assert image_digest(path, length=64) == hashlib.sha256(data).hexdigest()
    copy = tmp_path / "renamed.png"
    copy.write_bytes(data)
    assert image_digest(copy) == image_digest(path)
    changed = tmp_path / "changed.png"
    changed.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert image_digest(changed) != image_digest(path)
    with pytest.raises(ImageError, match="cannot read .*missing.png to hash it"):
        image_digest(tmp_path / "missing.png")


def test_image_preprocess_of_a_pil_image_equals_that_of_its_file(tmp_path):
    path = _save(tmp_path / "g.png", _gradient(50, 35))
    prepare = ImagePreprocess(size=24, margin=3)
    with Image.open(path) as image:
        assert torch.equal(prepare(image), prepare(path))
    assert torch.equal(prepare(path), load_images([path], size=24, margin=3).tensor[0])


@pytest.mark.parametrize("fmt, name", [("EPS", "a.png"), ("GIF", "b.png"), ("PNG", "c.jpg"),
                                       ("BMP", "d.jpeg")])
def test_an_image_is_decoded_only_in_the_format_its_name_claims(tmp_path, fmt, name):
    from PIL import Image

    if fmt == "EPS":  # written by hand: saving EPS needs Ghostscript, and so would reading it
        (tmp_path / name).write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
                                      b"0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")
    else:
        Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / name, format=fmt)
    good = _save(tmp_path / "good.png", _gradient())
    loaded = load_images([tmp_path / name, good], size=8)
    assert [p.name for p in loaded.paths] == ["good.png"]
    (path, reason), = loaded.skipped
    assert path.name == name and "no other format is decoded" in reason
