"""Class labels for images: class folders or a ``file,label`` CSV, mapped to class indices.

Used by the accuracy-under-shift part of :mod:`shiftlab.invariance` (``--labels``) and by
:func:`shiftlab.data.sources.image_batches`. Class names are matched to the model's categories; folders
named by ImageNet WNIDs (``n01440764``) follow torchvision's ``ImageFolder`` convention instead:
the k-th folder in sorted order is class k (see :func:`read_labels` for when).

Two of the shipped sample photos in class folders named by ImageNet class names:

>>> import shutil, tempfile
>>> from pathlib import Path
>>> from torchvision.models import ResNet18_Weights
>>> from shiftlab.data import sample_image_paths
>>> photos = {path.stem: path for path in sample_image_paths()}
>>> tmp = tempfile.TemporaryDirectory()
>>> val = Path(tmp.name)
>>> for folder, photo in [("tabby", "chelsea"), ("espresso", "coffee")]:
...     (val / folder).mkdir()
...     _ = shutil.copy(photos[photo], val / folder)
>>> labelled = read_labels(val, categories=ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
>>> [path.name for path in labelled.paths], labelled.labels, labelled.order
(['coffee.jpg', 'chelsea.jpg'], [967, 281], 'names')
"""
from __future__ import annotations

import csv
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import ImageError, UsageError

__all__ = ["CLASS_ORDERS", "LabelledImages", "read_labels"]

#: How class names become indices: 'auto' (names or indices; WNID folders in sorted order),
#: 'names' (never sorted order), 'sorted' (torchvision ImageFolder: k-th sorted name is class k).
CLASS_ORDERS = ("auto", "names", "sorted")

# An ImageNet synset id, the folder names of ImageNet's train/val layout.
_WNID = re.compile(r"n\d{8}")


# -- labels ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelledImages:
    """Image files and their class indices, from :func:`read_labels`.

    ``order`` says how names became indices: ``'names'`` (matched to the model's categories or
    read as indices) or ``'sorted'`` (the k-th class name in sorted order is class k).
    """

    paths: list[Path]
    labels: list[int]
    order: str = "names"

    def for_paths(self, paths: Sequence[Path]) -> list[int]:
        """The labels of ``paths`` (a subset, e.g. the images that could be decoded), in order."""
        lookup = {Path(p).resolve(): label for p, label in zip(self.paths, self.labels)}
        return [lookup[Path(p).resolve()] for p in paths]


def check_class_order(class_order: object) -> str:
    """One of :data:`CLASS_ORDERS`, else a UsageError listing them."""
    if class_order not in CLASS_ORDERS:
        raise UsageError(f"class_order={class_order!r} is unknown; choose one of"
                         f" {', '.join(CLASS_ORDERS)}")
    return class_order


def read_labels(source: Union[str, os.PathLike], categories: Optional[Sequence[str]] = None,
                class_order: str = "auto") -> LabelledImages:
    """Image files with class indices, from class folders or a CSV.

    Args:
        source: a folder laid out as ``class_name/*.jpg`` (PNG/JPEG; sorted by folder, then
            file), or a CSV with rows ``file,label`` (an optional header ``file,label``; files
            relative to the CSV's folder). A label or folder name is a class name of
            ``categories`` (case-insensitive, '_' counts as a space: ``great_white_shark``) or a
            class index (``0``, ``417``).
        categories: the model's class names in output order (``LoadedModel.categories``;
            ImageNet's for torchvision weights); None allows class indices only.
        class_order: ``'auto'`` matches names and indices as above; when they do not all match
            and every class name is an ImageNet WNID (``n01440764``), the k-th name in sorted
            order is class k (torchvision's ``ImageFolder``; for folders, every subfolder counts,
            as there). That is right only for the full class set, so with categories the number
            of WNIDs must equal the number of categories. ``'sorted'`` uses sorted order for any
            names (a model trained with ``ImageFolder`` on these classes); ``'names'`` never does.

    Raises:
        UsageError: the source is missing or malformed, names unknown classes (all listed), or
            has WNIDs for a subset of the model's classes.
        ImageError: a file named in the CSV does not exist.

    Example:
        A CSV of class indices (no categories needed), files relative to its folder:

        >>> import shutil, tempfile
        >>> from pathlib import Path
        >>> from shiftlab.data import sample_image_paths
        >>> tmp = tempfile.TemporaryDirectory()
        >>> folder = Path(tmp.name)
        >>> for photo in sample_image_paths()[:3]:
        ...     _ = shutil.copy(photo, folder)
        >>> _ = (folder / "labels.csv").write_text(
        ...     "file,label\\nastronaut.jpg,0\\ncamera.jpg,0\\nchelsea.jpg,1\\n")
        >>> read_labels(folder / "labels.csv").labels
        [0, 0, 1]
        >>> read_labels(folder / "labels.csv", categories=["person"])   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        shiftlab.errors.UsageError: 1 unknown class names in .../labels.csv: '1'; use ...
    """
    from .images import IMAGE_SUFFIXES, unreadable_folder_error, unsearchable_path_error

    check_class_order(class_order)
    source = Path(source)
    try:
        is_dir, is_file = source.is_dir(), source.is_file()
    except OSError as exc:  # PermissionError: a parent folder that may not be searched
        raise unsearchable_path_error(source, exc) from None
    if is_dir:
        listing = source
        try:
            # Hidden folders (.ipynb_checkpoints) are never classes.
            folders = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
            pairs = []
            for listing in folders:
                pairs += [(image, listing.name) for image in sorted(listing.iterdir())
                          if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES]
        except OSError as exc:  # PermissionError: a (class) folder that may not be listed
            raise unreadable_folder_error(listing, exc) from None
        every_name = [folder.name for folder in folders]
        if not pairs:
            raise UsageError(f"no images in class folders under {source}; lay labels out as"
                             " ROOT/class_name/*.jpg or pass a CSV file,label")
    elif is_file:
        pairs = _read_label_csv(source)
        every_name = sorted({name for _, name in pairs})
    else:
        raise UsageError(f"labels path {source} does not exist; pass a folder of class folders or"
                         " a CSV file with rows file,label")
    _refuse_conflicting_labels(pairs, source)
    names = sorted({name for _, name in pairs})
    if class_order == "sorted" or (class_order == "auto" and _use_sorted_order(names, every_name,
                                                                               categories, source)):
        if categories and len(every_name) > len(categories):
            raise UsageError(f"{len(every_name)} classes in {source} but the model has"
                             f" {len(categories)}; pass at most {len(categories)} class folders")
        index, order = {name: k for k, name in enumerate(every_name)}, "sorted"
    else:
        index, order = _class_indices(names, categories, source), "names"
    return LabelledImages([path for path, _ in pairs], [index[name] for _, name in pairs], order)


def _refuse_conflicting_labels(pairs: Sequence[tuple[Path, str]], source: Path) -> None:
    """One image (the same file, also through a symlink) given two different labels is refused,
    naming it and where: the CSV's rows, or the class folders."""
    seen: dict[str, list[tuple[int, str]]] = {}
    for number, (image, name) in enumerate(pairs, start=1):
        seen.setdefault(os.path.realpath(image), []).append((number, name))
    for real, found in seen.items():
        if len({name for _, name in found}) > 1:
            where = (f"rows {', '.join(str(n) for n, _ in found)}" if source.is_file()
                     else "class folders")
            labels = ", ".join(repr(name) for name in dict.fromkeys(n for _, n in found))
            raise UsageError(f"labels {source}: image {real} has different labels ({labels}) in"
                             f" {where}; give each image one label")


def _use_sorted_order(names: Sequence[str], every_name: Sequence[str],
                      categories: Optional[Sequence[str]], source: Path) -> bool:
    """'auto': sorted order only for WNID names that are not all matched as names or indices."""
    lookup = {_normalise(c) for c in categories} if categories else set()
    if all(_normalise(n) in lookup or _is_index(n, categories) for n in names):
        return False
    if not all(_WNID.fullmatch(n) for n in every_name):
        return False
    if categories and len(every_name) != len(categories):
        raise UsageError(
            f"{len(every_name)} WNID classes in {source} ({_listing(every_name, 3)}) but the model has"
            f" {len(categories)}: sorted order (ImageFolder) gives the right index only for the full"
            f" set; pass all {len(categories)} classes, a CSV file,label with class indices, or"
            " class_order='sorted' if the model was trained on exactly these classes")
    return True


def _is_index(name: str, categories: Optional[Sequence[str]]) -> bool:
    # isdecimal, not isdigit: '²' is a digit that int() cannot read (it is a class name then)
    key = _normalise(name)
    return key.isdecimal() and (categories is None or int(key) < len(categories))


def _read_label_csv(path: Path) -> list[tuple[Path, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read labels file {path} ({type(exc).__name__}: {exc}); pass a"
                         " UTF-8 CSV with rows file,label") from exc
    if rows and [cell.strip().lower() for cell in rows[0]] == ["file", "label"]:
        rows = rows[1:]
    if not rows:
        raise UsageError(f"labels file {path} has no rows; write one 'file,label' row per image")
    pairs = []
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise UsageError(f"labels file {path}, row {number}: expected 'file,label', got"
                             f" {','.join(row)!r}")
        image = Path(row[0].strip())
        image = image if image.is_absolute() else path.parent / image
        try:
            found = image.is_file()
        except OSError as exc:  # PermissionError: a folder on its path that may not be searched
            raise ImageError(f"labels file {path}, row {number}: cannot look at image {image}"
                             f" ({exc.strerror or exc}); check that you may read its folder"
                             " (chmod +rx)") from None
        if not found:
            raise ImageError(f"labels file {path}, row {number}: image {image} does not exist;"
                             " file paths are relative to the CSV's folder")
        pairs.append((image, row[1].strip()))
    return pairs


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def _class_indices(names: Sequence[str], categories: Optional[Sequence[str]], source: Path
                   ) -> dict[str, int]:
    lookup = {_normalise(c): i for i, c in enumerate(categories)} if categories else {}
    out, unknown = {}, []
    for name in names:
        key = _normalise(name)
        if key in lookup:
            out[name] = lookup[key]
        elif _is_index(name, categories):
            out[name] = int(key)
        else:
            unknown.append(name)
    if unknown:
        if not categories:
            raise UsageError(f"labels in {source} use class names ({_listing(unknown)}) but the model"
                             " has no class names; use class indices (0, 1, ...) or class_order='sorted'"
                             " (ImageFolder: the k-th name in sorted order is class k)")
        hints = []
        for name in unknown[:3]:
            close = difflib.get_close_matches(_normalise(name), list(lookup), n=1)
            if close:
                hints.append(f"{name!r} -> {categories[lookup[close[0]]]!r}?")
        hint = f" (did you mean {', '.join(hints)})" if hints else ""
        raise UsageError(f"{len(unknown)} unknown class names in {source}: {_listing(unknown)}{hint};"
                         f" use the model's {len(categories)} class names (e.g."
                         f" {categories[0]!r}) or class indices")
    return out


def _listing(items: Sequence[str], count: int = 8) -> str:
    more = f", ... {len(items) - count} more" if len(items) > count else ""
    return ", ".join(repr(i) for i in items[:count]) + more
