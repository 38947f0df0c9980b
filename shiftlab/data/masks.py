"""Segmentation masks (per-pixel class indices) for the dense-output consistency measurement.

A mask dataset is a folder ``ROOT/images/NAME.jpg`` + ``ROOT/masks/NAME.png`` (or Pascal VOC's
``JPEGImages/`` + ``SegmentationClass/``). :class:`MaskPreprocess` resizes and crops a mask with
the geometry of :class:`~shiftlab.data.images.ImagePreprocess`, so mask pixel (i, j) labels image
pixel (i, j). ``python -m shiftlab.data.masks FOLDER`` writes a small demo dataset.

Example:
    >>> import tempfile
    >>> from shiftlab.data.images import IMAGENET_MEAN, IMAGENET_STD
    >>> tmp = tempfile.TemporaryDirectory()
    >>> pairs = write_demo_masks(Path(tmp.name) / "demo", size=48)
    >>> len(pairs), pairs.images[0].name, pairs.masks[0].name
    (6, 'astronaut.png', 'astronaut.png')
    >>> images, masks = next(mask_batches(pairs, size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    ...                                   batch_size=4))
    >>> tuple(images.shape), tuple(masks.shape), masks.dtype
    ((4, 3, 32, 32), (4, 32, 32), torch.int64)
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..defaults import default_resize
from ..errors import ShiftlabError, UsageError, one_line
from .images import (IMAGE_SUFFIXES, MAX_PIXELS, MIN_IMAGE_SIDE, SUFFIX_FORMATS, ImagePreprocess,
                     UnreadableImageError, _check_geometry, _check_pixels, sample_image_paths,
                     unreadable_folder_error)

__all__ = ["IGNORE_INDEX", "MaskPreprocess", "MaskedDataset", "MaskedImages", "check_mask_values",
           "main", "mask_batches", "read_mask", "read_mask_pairs", "write_demo_masks"]

PathLike = Union[str, "os.PathLike[str]"]

#: The "no class" value of Pascal VOC masks (object outlines), which the demo masks use too.
IGNORE_INDEX: int = 255

# (images folder, masks folder), in the order they are looked for.
_LAYOUTS = (("images", "masks"), ("JPEGImages", "SegmentationClass"))
_LAYOUT_HINT = "lay masks out as ROOT/images/NAME.jpg with ROOT/masks/NAME.png (class indices)"
_INDEX_MODES = ("P", "L", "I;16", "I", "1")


@dataclass(frozen=True)
class MaskedImages:
    """Image files and their mask files, pair k = ``(images[k], masks[k])``; see :func:`read_mask_pairs`."""

    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    source: Path

    def __post_init__(self) -> None:
        if len(self.images) != len(self.masks):
            raise UsageError(f"{len(self.images)} images but {len(self.masks)} masks; pass one mask"
                             " per image")
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        object.__setattr__(self, "masks", tuple(Path(p) for p in self.masks))
        object.__setattr__(self, "source", Path(self.source))

    def __len__(self) -> int:
        return len(self.images)


def read_mask_pairs(source: PathLike, max_images: Optional[int] = None) -> MaskedImages:
    """Pair each image in ``source/images`` with ``source/masks/<its stem>.png``, sorted by name.

    Pascal VOC's ``JPEGImages/`` + ``SegmentationClass/`` is read too; there only images that have
    a mask are kept, because VOC's ``JPEGImages`` also holds the detection-only images. Masks
    without an image are ignored. ``max_images`` keeps the first N pairs.

    Raises:
        UsageError: no such folder, neither layout, no images, or images without a mask.
    """
    if max_images is not None:
        _check_int("max_images", max_images, 1)
    root = Path(source)
    if not root.exists():
        raise UsageError(f"mask dataset folder {root} does not exist; {_LAYOUT_HINT}")
    found = [(root / i, root / m) for i, m in _LAYOUTS if (root / i).is_dir() and (root / m).is_dir()]
    if not found:
        raise UsageError(f"{root} is not a folder with images/ and masks/ subfolders; {_LAYOUT_HINT}")
    image_dir, mask_dir = found[0]
    listing = image_dir
    try:
        images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        listing = mask_dir
        masks = {p.stem: p for p in mask_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"}
    except OSError as exc:  # PermissionError: a folder that may not be listed
        raise unreadable_folder_error(listing, exc) from None
    if image_dir.name == "JPEGImages":
        images = [p for p in images if p.stem in masks]
    if not images:
        raise UsageError(f"no {'/'.join(IMAGE_SUFFIXES)} images with a mask in {image_dir}; {_LAYOUT_HINT}")
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise UsageError(f"{len(missing)} images in {image_dir} have no mask {mask_dir}/NAME.png:"
                         f" {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''};"
                         " add their masks or remove the images")
    images = images[:max_images]
    return MaskedImages(tuple(images), tuple(masks[p.stem] for p in images), root)


def read_mask(path: PathLike) -> np.ndarray:
    """The class indices of a PNG mask as an int64 ``(H, W)`` array.

    Palette PNGs give their palette indices (as VOC's masks); greyscale (8/16/32-bit) PNGs their
    values; RGB(A) PNGs only when R = G = B (greyscale saved as colour).

    Raises:
        UsageError: the file is missing, corrupt, not a PNG, or a colour-coded mask.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked just below
            with Image.open(path, formats=("PNG",)) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise UsageError(f"mask {path} is {image.width}x{image.height} px, over the"
                                     f" {MAX_PIXELS:,}-pixel limit; downscale it (nearest) with its image")
                image.load()
                mode, array = image.mode, np.asarray(image)
    except ShiftlabError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        # Pillow reports missing, non-PNG or corrupt files with all of these, depending on the codec.
        raise UsageError(f"cannot read mask {path} ({one_line(exc) or type(exc).__name__}); masks must"
                         " be PNG files of class indices") from None
    if mode in _INDEX_MODES or mode.startswith("I;16"):
        return array.astype(np.int64)
    if mode in ("RGB", "RGBA", "LA"):
        colour = array[..., :-1] if mode in ("RGBA", "LA") else array  # the alpha channel is not a class
        if (colour == colour[..., :1]).all():
            return colour[..., 0].astype(np.int64)
        raise UsageError(f"{path} is a colour-coded mask; save class indices as a greyscale or palette PNG")
    raise UsageError(f"mask {path} has pixel mode {mode!r}; save class indices as a greyscale or palette PNG")


@dataclass(frozen=True)
class MaskPreprocess:
    """The mask counterpart of :class:`ImagePreprocess`: same resize and centre crop, nearest.

    Calling it on a mask file (or an ``(H, W)`` array) returns a ``torch.long`` ``(crop, crop)``
    tensor, ``crop = size + 2 * margin``.

    Example:
        Halving an 8 px wide mask takes the right-hand pixel of each pair, nearest to its centre:

        >>> prep = MaskPreprocess(size=4, resize=4)
        >>> prep(np.arange(8)[None, :].repeat(8, axis=0)).tolist()[0]
        [1, 3, 5, 7]
    """

    size: int
    margin: int = 0
    resize: Optional[int] = None

    def __post_init__(self) -> None:
        crop = _check_geometry(self.size, self.margin, self.resize)
        resize = default_resize(int(self.size), int(self.margin)) if self.resize is None else self.resize
        object.__setattr__(self, "resize", max(int(resize), crop))

    @property
    def crop(self) -> int:
        """Side of the returned square: ``size + 2 * margin``."""
        return int(self.size) + 2 * int(self.margin)

    def __call__(self, mask: Union[PathLike, np.ndarray]) -> torch.Tensor:
        is_array = isinstance(mask, np.ndarray)
        array = mask if is_array else read_mask(mask)
        try:
            _check_pixels(None if is_array else Path(mask), array.shape[::-1], self.resize)
        except UnreadableImageError as exc:
            raise UsageError(f"mask {exc}") from None
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))[None]
        # NEAREST_EXACT samples at pixel centres, as the image's bilinear resize does; torch's plain
        # 'nearest' samples at top-left corners and shifts the mask by up to half a source pixel.
        tensor = TF.resize(tensor, [self.resize], interpolation=InterpolationMode.NEAREST_EXACT,
                           antialias=False)
        return TF.center_crop(tensor, [self.crop, self.crop])[0]


class MaskedDataset(Dataset):
    """Item k of a :class:`MaskedImages`: ``(image float32 (3, crop, crop), mask long (crop, crop))``."""

    def __init__(self, pairs: MaskedImages, image_prep: ImagePreprocess, mask_prep: MaskPreprocess) -> None:
        if (image_prep.crop, image_prep.resize) != (mask_prep.crop, mask_prep.resize):
            raise UsageError(f"image and mask preprocessing differ (crop {image_prep.crop} vs"
                             f" {mask_prep.crop}, resize {image_prep.resize} vs {mask_prep.resize});"
                             " build both with the same size, margin and resize")
        self.pairs, self.image_prep, self.mask_prep = pairs, image_prep, mask_prep

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs.images[index], self.pairs.masks[index]
        image = self.image_prep(image_path)  # first: an unreadable image raises its own error
        mask = read_mask(mask_path)
        width, height = _upright_size(image_path)
        if (height, width) != mask.shape:
            raise UsageError(f"image {image_path.name} is {width}x{height} px but its mask {mask_path.name}"
                             f" is {mask.shape[1]}x{mask.shape[0]} px; masks must match their image's size")
        return image, self.mask_prep(mask)


def mask_batches(pairs: MaskedImages, *, size: int, margin: int = 0, resize: Optional[int] = None,
                 mean: Sequence[float], std: Sequence[float], batch_size: int,
                 workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream ``(images (B, 3, crop, crop), masks (B, crop, crop))`` in order, one batch in memory.

    An error in a DataLoader worker reaches the caller as the same one-line error.
    """
    _check_int("batch_size", batch_size, 1)
    _check_int("workers", workers, 0)
    image_prep = ImagePreprocess(size=size, margin=margin, mean=mean, std=std, resize=resize)
    dataset = _Guarded(pairs, image_prep, MaskPreprocess(size=size, margin=margin, resize=resize))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate)
    return _stream(loader)


def _stream(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if isinstance(batch, ShiftlabError):
            raise batch
        yield batch


class _Guarded(MaskedDataset):
    """Returns an item's error instead of raising it: DataLoader would wrap a raised one (from a
    worker) in a multi-line traceback text."""

    def __getitem__(self, index: int) -> Union[tuple[torch.Tensor, torch.Tensor], ShiftlabError]:
        try:
            return super().__getitem__(index)
        except ShiftlabError as exc:
            return exc


def _collate(items: list) -> Union[tuple[torch.Tensor, torch.Tensor], ShiftlabError]:
    for item in items:
        if isinstance(item, ShiftlabError):
            return item
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])


def _check_int(name: str, value: object, low: int) -> None:
    # bool is an int subclass, but True as a count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def _upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image after its EXIF rotation, as ImagePreprocess sees it."""
    with Image.open(path, formats=SUFFIX_FORMATS.get(path.suffix.lower(), ())) as image:
        width, height = image.size
        turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # orientations that swap the sides
    return (height, width) if turned else (width, height)


def check_mask_values(mask: torch.Tensor, n_classes: int, ignore_index: Optional[int],
                      path_hint: str = "") -> None:
    """Refuse a mask value that is neither a class ``0..n_classes-1`` nor ``ignore_index``
    (None: every pixel must be a class).

    >>> check_mask_values(torch.tensor([[0, 20, 255]]), 21, 255)
    >>> check_mask_values(torch.tensor([[0, 40]]), 21, 255, "a.png")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: mask value 40 in a.png is not a class of the model (0..20) nor the ignore ...
    """
    _check_int("n_classes", n_classes, 1)
    wrong = (mask < 0) | (mask >= n_classes)
    if ignore_index is not None:
        wrong &= mask != ignore_index
    bad = mask[wrong]
    if bad.numel():
        values = torch.unique(bad).tolist()
        more = f" (and {len(values) - 1} other values)" if len(values) > 1 else ""
        where = f" in {path_hint}" if path_hint else ""
        ignore = f" nor the ignore index {ignore_index}" if ignore_index is not None else ""
        raise UsageError(f"mask value {values[0]}{more}{where} is not a class of the model"
                         f" (0..{n_classes - 1}){ignore}; pass --ignore-index or check the masks")


def write_demo_masks(folder: PathLike, size: int = 256) -> MaskedImages:
    """Write the sample photos as ``folder/images/NAME.png`` with masks ``folder/masks/NAME.png``.

    Images are RGB PNGs with a ``size`` px shorter side. A mask is 1 where the (lightly blurred)
    greyscale is brighter than its median, 0 elsewhere, and :data:`IGNORE_INDEX` on a 2 px band
    along the boundary between the two. Each file is written under a temporary name, then renamed.

    Raises:
        UsageError: ``folder`` exists and is not empty, ``size`` is too small, or writing fails.
    """
    _check_int("size", size, MIN_IMAGE_SIDE)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UsageError(f"{folder} exists and is not an empty folder; pass a new or empty folder")
    try:
        for sub in ("images", "masks"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for photo in sample_image_paths():
            with Image.open(photo, formats=SUFFIX_FORMATS[photo.suffix.lower()]) as raw:
                rgb = ImageOps.exif_transpose(raw).convert("RGB")
            scale = size / min(rgb.size)
            rgb = rgb.resize((max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))),
                             Image.Resampling.BILINEAR, reducing_gap=3.0)
            _save_atomic(rgb, folder / "images" / f"{photo.stem}.png")
            # Blurred first: thresholding raw pixels cuts texture (stars, fur) into specks that
            # the ignore band then swallows whole (97% of the Hubble photo).
            grey = rgb.convert("L").filter(ImageFilter.GaussianBlur(max(1.0, size / 64)))
            mask = Image.fromarray(_demo_mask(np.asarray(grey)))
            _save_atomic(mask, folder / "masks" / f"{photo.stem}.png")
    except OSError as exc:
        raise UsageError(f"cannot write the demo to {folder} ({exc.strerror or one_line(exc)});"
                         " pass a folder you may write to") from None
    return read_mask_pairs(folder)


def _demo_mask(grey: np.ndarray, band: int = 2) -> np.ndarray:
    """uint8 mask: 1 above the median, else 0; IGNORE_INDEX within ``band`` px of the other class."""
    classes = (grey > np.median(grey)).astype(np.uint8)
    # Edge padding: outside the image there is no other class, so the border is no boundary.
    padded = np.pad(classes, band, mode="edge")
    height, width = classes.shape
    windows = [padded[dy:dy + height, dx:dx + width]
               for dy in range(2 * band + 1) for dx in range(2 * band + 1)]
    boundary = np.maximum.reduce(windows) != np.minimum.reduce(windows)
    return np.where(boundary, np.uint8(IGNORE_INDEX), classes)


def _save_atomic(image: Image.Image, path: Path) -> None:
    # A temporary name in the same folder: os.replace is atomic there, and an interrupted run
    # leaves a .tmp file that no reader takes for an image.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m shiftlab.data.masks FOLDER [--size N]``: write the demo mask dataset."""
    parser = argparse.ArgumentParser(prog="python -m shiftlab.data.masks",
                                     description="Write a small demo dataset of images and class masks.")
    parser.add_argument("folder", help="new or empty folder to write images/ and masks/ into")
    parser.add_argument("--size", type=int, default=256, help="shorter image side in px (default 256)")
    args = parser.parse_args(argv)
    try:
        pairs = write_demo_masks(args.folder, size=args.size)
    except ShiftlabError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(exc.exit_code)
    print(f"wrote {len(pairs)} images and masks to {args.folder}"
          f" (classes 0 and 1, {IGNORE_INDEX} = ignore)")


if __name__ == "__main__":
    main()
