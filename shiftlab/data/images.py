"""Sample images, image folders, and the preprocessing that turns one image into a tensor.

:class:`ImagePreprocess` does the per-image work: it reads a file (or takes a PIL image),
converts any pixel format to RGB, resizes and centre-crops it, and returns a normalised
``(3, S, S)`` tensor with ``S = size + 2 * margin``. The margin is real image content. The
``crop`` shift mode slides a ``size`` window inside it, so a shift brings in new pixels and never
wraps around or pads. :func:`load_images` stacks a few images into one batch (small runs,
notebooks); :func:`shiftlab.data.sources.image_batches` streams a dataset with the same per-image
work, so both give the same tensors bit for bit.

Example:
    >>> from shiftlab.data import load_images, sample_image_paths
    >>> batch = load_images(sample_image_paths(), size=224, margin=16)
    >>> tuple(batch.tensor.shape)
    (6, 3, 256, 256)
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..defaults import default_resize
from ..errors import ImageError, UsageError, one_line

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MAX_RESIZED_PIXELS",
    "MIN_IMAGE_SIDE",
    "ImagePreprocess",
    "LoadedImages",
    "UnreadableImageError",
    "find_images",
    "image_digest",
    "load_images",
    "no_images_error",
    "sample_image_paths",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Per-channel RGB mean and std of ImageNet, the normalisation torchvision's weights expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: File endings (lower case) that :func:`find_images` accepts.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")
#: the Pillow formats each suffix may hold: a file is decoded only as what its name claims, so
#: an EPS or any other format renamed to .png never reaches its decoder (EPS runs Ghostscript)
SUFFIX_FORMATS: dict[str, tuple[str, ...]] = {".png": ("PNG",), ".jpg": ("JPEG",),
                                               ".jpeg": ("JPEG",)}  # JPEG opens MPO files too

#: Images with a side shorter than this are skipped. Upsampling them would make a blurry
#: image, and the equivariance measured on it would say nothing about natural images.
MIN_IMAGE_SIDE: int = 8

#: Largest image, in pixels, that is decoded: Pillow's decompression-bomb warning threshold,
#: about 1 GiB as float32 RGB. Checked from the file header, before any pixel is allocated.
MAX_PIXELS: int = 89_478_485

#: Largest image, in pixels, after the resize and before the centre crop (4096 x 4096, 200 MB as
#: float32 RGB). Also checked from the header: an 8 x 2,000,000 px PNG is 47 KB on disk, but
#: resizing its short side to 256 would make it 64 million px long.
MAX_RESIZED_PIXELS: int = 4096 * 4096

_ASSETS = Path(__file__).resolve().parents[1] / "assets"  # shiftlab/assets, next to data/


class UnreadableImageError(ImageError):
    """One image file cannot be used (corrupt, too small, too large); ``reason`` says why.

    :func:`load_images` and :func:`shiftlab.data.sources.image_batches` skip such files and report
    ``(path, reason)``; :class:`ImagePreprocess` and :class:`shiftlab.data.sources.ImageDataset` raise it.
    """

    def __init__(self, path: Path | None, reason: str) -> None:
        self.path, self.reason = path, reason
        where = f"{path}: " if path is not None else ""
        super().__init__(f"{where}{reason}; replace or remove the file")

    def __reduce__(self):  # pickled by DataLoader workers; the default would lose ``reason``
        return type(self), (self.path, self.reason)


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


@dataclass(frozen=True)
class ImagePreprocess:
    """The per-image preprocessing, validated once and picklable (DataLoader workers use it).

    Calling it on a file or a PIL image converts to RGB (rules in :func:`load_images`), resizes
    the shorter side to ``resize`` (bilinear, antialiased), crops the centre
    ``size + 2 * margin`` square and normalises with ``(x - mean) / std``.

    Args:
        size: side of the window the model sees.
        margin: extra content kept on each side for the ``crop`` shift mode.
        mean, std: per-channel normalisation (3 numbers each; std > 0).
        resize: shorter side before cropping; None gives ``max(round(size / 0.875), size + 2 * margin)``.

    Raises:
        UsageError: a parameter is invalid.

    Example:
        >>> prep = ImagePreprocess(size=32, margin=4)
        >>> prep.crop, prep.resize, tuple(prep(sample_image_paths()[0]).shape)
        (40, 40, (3, 40, 40))
    """

    size: int
    margin: int = 0
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    resize: int | None = None

    def __post_init__(self) -> None:
        crop = _check_geometry(self.size, self.margin, self.resize)
        mean, std = _channel_values(self.mean, "mean"), _channel_values(self.std, "std")
        if any(s <= 0 for s in std):
            raise UsageError(f"std must be positive in every channel, got {tuple(std)}; pass e.g. {IMAGENET_STD}")
        object.__setattr__(self, "mean", tuple(mean))
        object.__setattr__(self, "std", tuple(std))
        resize = default_resize(int(self.size), int(self.margin)) if self.resize is None else self.resize
        object.__setattr__(self, "resize", max(int(resize), crop))

    @property
    def crop(self) -> int:
        """Side of the returned square: ``size + 2 * margin``."""
        return int(self.size) + 2 * int(self.margin)

    def __call__(self, image: PathLike | Image.Image) -> torch.Tensor:
        """One image as a float32 ``(3, crop, crop)`` tensor; raises :class:`UnreadableImageError`."""
        if isinstance(image, Image.Image):
            _check_pixels(None, image.size, self.resize)
            rgb = torch.from_numpy(
                np.ascontiguousarray(_to_rgb_array(ImageOps.exif_transpose(image)).transpose(2, 0, 1)))
            path = None
        else:
            path = Path(image)
            rgb = _read_rgb(path, self.resize)
        height, width = rgb.shape[-2:]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise UnreadableImageError(path, _too_small(width, height))
        rgb = TF.resize(rgb, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True)
        rgb = TF.center_crop(rgb, [self.crop, self.crop])
        return TF.normalize(rgb, mean=list(self.mean), std=list(self.std))


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


def find_images(source: PathLike | Sequence[PathLike], recursive: bool = False) -> list[Path]:
    """List the image files that ``source`` names.

    Args:
        source: a folder, a single image file, or a list of image files. A folder is searched
            for files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case), and the result is
            sorted. A list keeps its order.
        recursive: search a folder's subfolders too (a folder tree), sorted by relative path.

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
        if _is_dir(path):
            try:
                candidates = path.rglob("*") if recursive else path.iterdir()
                found = sorted(p for p in candidates
                               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as exc:  # PermissionError: a folder that may not be listed or searched
                raise unreadable_folder_error(path, exc) from None
            if not found:
                where = "or its subfolders" if recursive else "(subfolders are not searched)"
                raise ImageError(
                    f"no {_suffix_list()} files in folder {path} {where}; "
                    "point to a folder that holds images directly, or pass the image files"
                )
            return found
        return [_checked_file(path)]
    files = [_checked_file(Path(p)) for p in source]
    if not files:
        raise ImageError("the list of images is empty; pass at least one image file or a folder")
    return files


def image_digest(path: PathLike, length: int = 16) -> str:
    """The sha256 of a file's bytes, as the first ``length`` hex digits (read in 1 MiB chunks).

    The file's content, not its name, identifies the image in a result's provenance.

    Raises:
        ImageError: the file cannot be read.

    Example:
        >>> len(image_digest(sample_image_paths()[0]))
        16
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise ImageError(f"cannot read {path} to hash it ({one_line(exc)}); check the path") from None
    return digest.hexdigest()[:length]


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

    Files that cannot be decoded, that are smaller than 8 px on a side, or that have more than
    :data:`MAX_PIXELS` pixels (:data:`MAX_RESIZED_PIXELS` after the resize) are left out of the
    batch and listed in ``skipped``. All images are held in memory at once: for a dataset, stream it with
    :func:`shiftlab.data.sources.image_batches`, which gives the same tensors.

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
    prepare = ImagePreprocess(size=size, margin=margin, mean=mean, std=std, resize=resize)
    if isinstance(paths, (str, os.PathLike)):
        paths = find_images(paths)
    loaded: list[torch.Tensor] = []
    kept: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        try:
            loaded.append(prepare(path))
        except UnreadableImageError as exc:
            skipped.append((path, exc.reason))
            continue
        kept.append(path)
    if not loaded:
        raise no_images_error(skipped)
    return LoadedImages(tensor=torch.stack(loaded).contiguous(), paths=kept, skipped=skipped)


def no_images_error(skipped: Sequence[tuple[Path, str]]) -> ImageError:
    """The error for a source of which no image could be used, with the first reasons.

    >>> str(no_images_error([]))
    'no image could be loaded: no paths were given; pass readable PNG or JPEG files'
    """
    reasons = "; ".join(f"{p}: {why}" for p, why in skipped[:3]) or "no paths were given"
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return ImageError(f"no image could be loaded: {reasons}{more}; pass readable PNG or JPEG files")


def _suffix_list() -> str:
    return "/".join(IMAGE_SUFFIXES)


def _too_small(width: int, height: int) -> str:
    return f"too small ({width}x{height} px); images need at least {MIN_IMAGE_SIDE} px on each side"


def unreadable_folder_error(folder: Path, exc: OSError) -> ImageError:
    """The error for a folder that cannot be listed (``PermissionError``, ...), naming it.

    >>> print(unreadable_folder_error(Path("val"), PermissionError(13, "Permission denied")))
    cannot list folder val (Permission denied); check that you may read it (chmod +rx), or pass
    another folder
    """
    return ImageError(f"cannot list folder {folder} ({exc.strerror or one_line(exc)}); check that you"
                      " may read it (chmod +rx), or pass another folder")


def _is_dir(path: Path) -> bool:
    """``path.is_dir()``; a parent folder that may not be searched is one line naming the path."""
    try:
        return path.is_dir()
    except OSError as exc:
        raise unsearchable_path_error(path, exc) from None


def _exists(path: Path) -> bool:
    """``path.exists()``; a parent folder that may not be searched is one line naming the path."""
    try:
        return path.exists()
    except OSError as exc:
        raise unsearchable_path_error(path, exc) from None


def unsearchable_path_error(path: Path, exc: OSError) -> ImageError:
    return ImageError(f"cannot look at {path} ({exc.strerror or one_line(exc)}); check that you may"
                      " read its folder (chmod +rx), or pass another path")


def _checked_file(path: Path) -> Path:
    if not _exists(path):
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


def _check_pixels(path: Path | None, size: tuple[int, int], resize: int) -> None:
    """Refuse, from the header size alone, an image too large to decode or to resize."""
    width, height = size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise UnreadableImageError(path, _too_small(width, height))
    # torchvision's resize keeps the aspect ratio: the long side becomes int(resize * long / short).
    long_side = int(resize * max(width, height) / min(width, height))
    if width * height > MAX_PIXELS:
        raise UnreadableImageError(
            path, f"too large: {width}x{height} px is over the {MAX_PIXELS:,}-pixel limit"
            " (shiftlab.data.images.MAX_PIXELS); crop or downscale it")
    if resize * long_side > MAX_RESIZED_PIXELS:
        raise UnreadableImageError(
            path, f"too elongated: {width}x{height} px resized to a {resize} px short side is"
            f" {resize * long_side:,} px, over the {MAX_RESIZED_PIXELS:,}-pixel limit"
            " (shiftlab.data.images.MAX_RESIZED_PIXELS); crop it closer to square")


def _read_rgb(path: Path, resize: int) -> torch.Tensor:
    """Decode ``path`` into a float32 ``(3, H, W)`` tensor with values in 0..1."""
    try:
        with warnings.catch_warnings():
            # The pixel limit below is ours; Pillow's warning for the same files is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            formats = SUFFIX_FORMATS.get(Path(path).suffix.lower(), ())
            with Image.open(path, formats=formats) as image:
                _check_pixels(path, image.size, resize)
                image.load()
                image = ImageOps.exif_transpose(image)
                array = _to_rgb_array(image)
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except PermissionError as exc:  # not 'corrupt': the bytes were never read
        raise UnreadableImageError(path, f"cannot be read ({exc.strerror or one_line(exc)}); check"
                                         " that you may read it (chmod +r)") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, f"too large ({one_line(exc)}); crop or downscale it") from None
    except UnidentifiedImageError:
        claimed = "/".join(SUFFIX_FORMATS.get(Path(path).suffix.lower(), ())) or "PNG or JPEG"
        raise UnreadableImageError(path, f"not a readable image: not {claimed} as its name"
                                         " says (no other format is decoded)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt data with all of these, depending on the codec.
        raise UnreadableImageError(path, f"corrupt or truncated image ({one_line(exc)})") from None
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
