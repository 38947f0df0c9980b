"""Sample images, image folders, and the preprocessing that turns them into a batch.

One public verb does the work: :func:`load_images` reads files, converts any pixel format to RGB,
resizes and centre-crops them, and returns a normalised ``(N, 3, S, S)`` tensor with
``S = size + 2 * margin``. The margin is real image content. The ``crop`` shift mode slides a
``size`` window inside it, so a shift brings in new pixels and never wraps around or pads.

Example:
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> batch = load_images(sample_image_paths(), size=224, margin=16)
    >>> tuple(batch.tensor.shape)
    (6, 3, 256, 256)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .errors import ImageError, UsageError, one_line

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MIN_IMAGE_SIDE",
    "LoadedImages",
    "find_images",
    "load_images",
    "sample_image_paths",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Per-channel RGB mean and std of ImageNet, the normalisation torchvision's weights expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File endings (lower case) that :func:`find_images` accepts.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: Images with a side shorter than this are skipped. Upsampling them would make a blurry
#: image, and the equivariance measured on it would say nothing about natural images.
MIN_IMAGE_SIDE: int = 8

# torchvision's convention: resize to 256 and crop 224, so the crop covers 87.5% of the short side.
_CROP_FRACTION = 0.875

_ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class LoadedImages:
    """A preprocessed batch of images and a record of what was left out.

    Attributes:
        tensor: float32 tensor of shape ``(N, 3, S, S)``, normalised with the requested mean
            and std, where ``S = size + 2 * margin``.
        paths: the files in ``tensor``, in batch order.
        skipped: ``(path, reason)`` for each file that could not be used.

    Example:
        >>> batch = load_images(sample_image_paths()[:2], size=32)
        >>> len(batch.paths), tuple(batch.tensor.shape), batch.skipped
        (2, (2, 3, 32, 32), [])
    """

    tensor: torch.Tensor
    paths: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def sample_image_paths() -> list[Path]:
    """Return the sample photographs shipped with shiftlab, sorted by file name.

    They are public-domain or CC0 images from scikit-image. ``assets/SOURCES.md`` gives each
    image's source and licence.

    Example:
        >>> [p.name for p in sample_image_paths()][:2]
        ['astronaut.jpg', 'camera.jpg']
    """
    paths = sorted(p for p in _ASSETS.glob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageError(
            f"no sample images found in {_ASSETS}; the installation is incomplete, "
            "reinstall shiftlab (pip install --force-reinstall shiftlab)"
        )
    return paths


def find_images(source: PathLike | Sequence[PathLike]) -> list[Path]:
    """List the image files that ``source`` names.

    Args:
        source: a folder, a single image file, or a list of image files. A folder is searched
            without descending into subfolders, for files ending in ``.png``, ``.jpg`` or
            ``.jpeg`` (any case), and the result is sorted. A list keeps its order.

    Returns:
        The image paths. Whether a file can be decoded is checked later, by :func:`load_images`.

    Raises:
        ImageError: a path does not exist, a folder has no images, or a file is not an image.

    Example:
        >>> folder = sample_image_paths()[0].parent
        >>> [p.name for p in find_images(folder)] == [p.name for p in sample_image_paths()]
        True
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ImageError(
                    f"no {_suffix_list()} files in folder {path} (subfolders are not searched); "
                    "point to a folder that holds images directly, or pass the image files"
                )
            return found
        return [_checked_file(path)]
    files = [_checked_file(Path(p)) for p in source]
    if not files:
        raise ImageError("the list of images is empty; pass at least one image file or a folder")
    return files


def load_images(
    paths: PathLike | Iterable[PathLike],
    size: int,
    margin: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: int | None = None,
) -> LoadedImages:
    """Read images and return them as one normalised batch of square crops.

    Each image is converted to RGB and its shorter side is resized to ``resize`` (bilinear,
    antialiased). Then the centre ``size + 2 * margin`` square is cropped and normalised with
    ``(x - mean) / std``. Conversions:

    * 16-bit and 32-bit integer images (``I;16``, ``I``) are scaled from 0..65535 to 0..1, not
      clipped at 255.
    * Float images (``F``) are taken as 0..1 if their maximum is at most 1, else as 0..255.
    * Images with transparency (``RGBA``, ``LA``, ``P`` with a transparent colour) are composited
      onto white. Dropping the alpha channel would expose whatever colour the transparent
      pixels happen to store.
    * Grayscale images are repeated over three channels, and CMYK uses Pillow's conversion.
    * The EXIF orientation is applied, so photos from phones come out upright.

    Files that cannot be decoded, or that are smaller than 8 px on a side, are left out of the
    batch and listed in ``skipped``.

    Args:
        paths: image files, or a folder or single file (passed through :func:`find_images`).
        size: side of the window the model sees.
        margin: extra content kept on each side for the ``crop`` shift mode (``|shift| <= margin``).
        mean, std: per-channel normalisation; use the model's own (``LoadedModel.mean``/``std``).
        resize: length of the shorter side before cropping. Defaults to
            ``max(round(size / 0.875), size + 2 * margin)``: 256 for 224 as in torchvision,
            and never smaller than the crop.

    Returns:
        A :class:`LoadedImages` whose ``tensor`` is float32 of shape
        ``(N, 3, size + 2 * margin, size + 2 * margin)``.

    Raises:
        UsageError: ``size``, ``margin``, ``resize``, ``mean`` or ``std`` is invalid.
        ImageError: no image could be loaded.

    Example:
        >>> batch = load_images(sample_image_paths(), size=224, margin=16)
        >>> tuple(batch.tensor.shape), batch.tensor.dtype
        ((6, 3, 256, 256), torch.float32)
    """
    crop = _check_geometry(size, margin, resize)
    if resize is None:
        resize = max(round(size / _CROP_FRACTION), crop)
    mean_t = _channel_values(mean, "mean")
    std_t = _channel_values(std, "std")
    if any(s <= 0 for s in std_t):
        raise UsageError(f"std must be positive in every channel, got {tuple(std_t)}; pass e.g. {IMAGENET_STD}")

    if isinstance(paths, (str, os.PathLike)):
        paths = find_images(paths)
    loaded: list[torch.Tensor] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        try:
            image = _read_rgb(path)
        except _Unreadable as exc:
            skipped.append((path, str(exc)))
            continue
        height, width = image.shape[-2:]
        if min(height, width) < MIN_IMAGE_SIDE:
            skipped.append(
                (path, f"too small ({width}x{height} px); images need at least {MIN_IMAGE_SIDE} px on each side")
            )
            continue
        image = TF.resize(image, [resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [crop, crop])
        loaded.append(TF.normalize(image, mean=mean_t, std=std_t))
        kept.append(path)

    if not loaded:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:3]) or "no paths were given"
        more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
        raise ImageError(f"no image could be loaded: {reasons}{more}; pass readable PNG or JPEG files")
    return LoadedImages(tensor=torch.stack(loaded).contiguous(), paths=kept, skipped=skipped)


class _Unreadable(Exception):
    """A file that exists but cannot be decoded into an RGB image; the message says why."""


def _suffix_list() -> str:
    return "/".join(IMAGE_SUFFIXES)


def _checked_file(path: Path) -> Path:
    if not path.exists():
        raise ImageError(f"image path {path} does not exist; check the path or pass a folder of images")
    if not path.is_file():
        raise ImageError(f"{path} is neither a folder nor an image file; pass a folder or {_suffix_list()} files")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(
            f"{path} is not an image file (expected {_suffix_list()}); convert it or pass a different file"
        )
    return path


def _check_geometry(size: int, margin: int, resize: int | None) -> int:
    # bool is an int subclass, but True as a size is always a mistake.
    for name, value, low in (("size", size, 1), ("margin", margin, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    crop = int(size) + 2 * int(margin)
    if resize is not None:
        if isinstance(resize, bool) or not isinstance(resize, (int, np.integer)) or resize < crop:
            raise UsageError(
                f"resize={resize!r} is smaller than the crop size + 2*margin = {crop}; "
                f"pass resize >= {crop} or leave it unset"
            )
    return crop


def _channel_values(values: Sequence[float], name: str) -> list[float]:
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3:
        raise UsageError(f"{name} must have 3 numbers (R, G, B), got {values!r}")
    return out


def _read_rgb(path: Path) -> torch.Tensor:
    """Decode ``path`` into a float32 ``(3, H, W)`` tensor with values in 0..1."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            array = _to_rgb_array(image)
    except FileNotFoundError:
        raise _Unreadable("file not found") from None
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise _Unreadable(f"not a readable image ({one_line(exc)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt data with all of these, depending on the codec.
        raise _Unreadable(f"corrupt or truncated image ({one_line(exc)})") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to a float32 ``(H, W, 3)`` array in 0..1."""
    mode = image.mode
    if mode.startswith("I"):
        # 'I;16*' is 16-bit by definition. Pillow also opens some 16-bit files as 'I' (32-bit),
        # so 'I' is read on the 16-bit scale too. A plain convert('RGB') would clip at 255
        # and turn most of the image white.
        gray = np.asarray(image).astype(np.float32) / 65535.0
        return np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    if mode == "F":
        gray = np.asarray(image, dtype=np.float32)
        scale = 1.0 if float(np.nanmax(gray, initial=0.0)) <= 1.0 else 255.0
        return np.repeat(np.clip(np.nan_to_num(gray / scale), 0.0, 1.0)[..., None], 3, axis=-1)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    return rgb / 255.0
