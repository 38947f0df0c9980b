"""One validation of a measurement request, shared by ``measure``, ``measure_invariance`` and
the ``--dry-run`` estimate, and the one place that counts forward passes."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence

import torch

from .defaults import default_grid
from .errors import ModelError, UsageError
from .equivariance.shifts import MODES, ShiftGrid


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a UsageError listing them.

    >>> check_choice("mode", "crop", ("circular", "crop"))
    'crop'
    """
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_mode(mode: object) -> str:
    """'circular' or 'crop' (``shiftlab.equivariance.shifts.MODES``)."""
    return check_choice("mode", mode, MODES)


def check_alignment(align: object) -> str:
    """'exact', 'bilinear' or 'fourier' (``shiftlab.equivariance.align.ALIGNMENTS``)."""
    from .equivariance.align import ALIGNMENTS  # align builds on the checks: import when used

    return check_choice("alignment", align, ALIGNMENTS)


def check_metric(metric: object) -> str:
    """'cosine', 'l2' or 'psnr' (``shiftlab.equivariance.metrics.METRICS``)."""
    from .equivariance.metrics import METRICS

    return check_choice("metric", metric, METRICS)


def check_dtype(dtype: object) -> str:
    """The forward passes' dtype: 'float32', 'bfloat16' or 'float16'."""
    from .defaults import DTYPES

    return check_choice("dtype", dtype, DTYPES)


def check_count(name: str, value: object, minimum: int = 1,
                maximum: Optional[int] = None) -> int:
    """A whole number >= ``minimum`` (and <= ``maximum``, a cost's bound checked before
    anything is allocated); bools and floats like 2.5 are refused.

    >>> check_count("pairs", 10**9, 1, 10**7)
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: pairs must be a whole number in 1..10,000,000, got 1000000000
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or abs(value) == float("inf") or int(value) != value or value < minimum:
        raise UsageError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be a whole number in {minimum}..{maximum:,}, got {value!r}")
    return int(value)


def check_filter_size(value: object) -> int:
    """A BlurPool filter size: a whole number 1..7 (the binomial filters antialias knows).

    >>> check_filter_size(4)
    4
    """
    from .defaults import FILTER_SIZES

    if isinstance(value, bool) or not isinstance(value, int) or value not in FILTER_SIZES:
        raise UsageError(f"antialiasing filter size must be {FILTER_SIZES[0]}..{FILTER_SIZES[-1]},"
                         f" got {value!r}")
    return value


def check_seed(value: object) -> int:
    """A seed: a whole number of magnitude below 2**63 (what torch.manual_seed takes)."""
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) >= 2**63:
        raise UsageError(f"seed must be a whole number below 2**63, got {value!r}")
    return value


def resolve_grid(grid: Optional[ShiftGrid], mode: str) -> ShiftGrid:
    """``grid`` or the default grid of ``mode``."""
    return grid if grid is not None else default_grid(mode)


def resolve_margin(extent: float, mode: str, margin: Optional[int]) -> int:
    """The crop margin (0 in circular mode): ``margin`` or the largest |shift| rounded up;
    refused when the shifts reach beyond it."""
    if mode != "crop":
        return 0
    margin = int(math.ceil(extent)) if margin is None else check_count("margin", margin, 0)
    if extent > margin:
        raise UsageError(f"the shifts reach {extent:g} px but the crop margin is {margin} px;"
                         " use a smaller grid or load images with a larger margin")
    return margin


def window_size(image_shape: Sequence[int], margin: int) -> tuple[int, int]:
    """(H, W) of the measured window: the image (circular) or the canvas less 2·margin (crop)."""
    height, width = int(image_shape[-2]) - 2 * margin, int(image_shape[-1]) - 2 * margin
    if height < 1 or width < 1:
        raise UsageError(f"images of {image_shape[-2]} px cannot hold a crop margin of {margin} px")
    return height, width


def check_model_has_data(model: torch.nn.Module, name: Optional[str] = None) -> None:
    """Refuse a model whose parameters or buffers are meta tensors (shapes, no data), which
    cannot be moved to a device or run; one line naming the model, the first such tensor and
    the fix.

    >>> check_model_has_data(torch.nn.Linear(2, 2, device="meta"), "net")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    shiftlab.errors.ModelError: net has no data: its tensors are on the meta device ('weight' ...
    """
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    meta = [key for key, tensor in tensors if tensor.is_meta]
    if meta:
        more = f" and {len(meta) - 1} more" if len(meta) > 1 else ""
        raise ModelError(f"{name or type(model).__name__} has no data: its tensors are on the meta"
                         f" device ({meta[0]!r}{more}); build the model on a real device (drop"
                         " device='meta' or torch.device('meta') where it is built), or"
                         " materialise it with model.to_empty(device='cpu') and load its weights")


def check_image_tensor(images: object) -> torch.Tensor:
    """An (N, C, H, W) floating tensor with N >= 1."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UsageError("images must be a tensor of shape (N, C, H, W) or an iterable of such batches")
    if images.shape[0] == 0:
        raise UsageError("no images to measure")
    if not images.is_floating_point():
        raise UsageError(f"images must be floating point (normalised), got {images.dtype}")
    return images


def split_batch(item: object) -> tuple[object, Optional[object]]:
    """(images, labels or None) of one batch of a stream, unchecked: a tensor, an (images,
    labels, ...) tuple/list, a dict with an 'images'/'image' key (and 'labels'/'label'), or
    shiftlab's ``ImageBatch`` (``.tensor``, ``.labels``)."""
    if hasattr(item, "tensor"):
        return item.tensor, getattr(item, "labels", None)
    if isinstance(item, (tuple, list)) and item:
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, dict):
        return item.get("images", item.get("image")), item.get("labels", item.get("label"))
    return item, None


def labelled_batches(images: object) -> Iterator[tuple[torch.Tensor, Optional[object]]]:
    """(images (B, C, H, W), labels or None) from a tensor (itself, once) or an iterable of
    batches (see :func:`split_batch`); a single (C, H, W) image counts as a batch of one.

    >>> [tuple(t.shape) for t, _ in labelled_batches([torch.zeros(3, 4, 4)])]
    [(1, 3, 4, 4)]
    """
    if isinstance(images, torch.Tensor):
        yield check_image_tensor(images), None
        return
    if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise UsageError("images must be a tensor (N, C, H, W) or an iterable of image batches")
    for item in images:
        batch, labels = split_batch(item)
        if isinstance(batch, torch.Tensor) and batch.dim() == 3:
            batch = batch[None]
        yield check_image_tensor(batch), labels


def check_request(*, mode: str, grid: Optional[ShiftGrid], margin: Optional[int],
                  batch_size: int, extent: Optional[float] = None, align: Optional[str] = None,
                  metric: Optional[str] = None, border: int = 0) -> tuple[ShiftGrid, int]:
    """Validate the options of a measurement; returns (grid, crop margin).

    ``extent`` is the largest |shift| the run will apply (default: the grid's).

    >>> check_request(mode="crop", grid=ShiftGrid.symmetric(2), margin=None, batch_size=4)[1]
    2
    """
    check_mode(mode)
    if align is not None:
        check_alignment(align)
    if metric is not None:
        check_metric(metric)
    check_count("batch_size", batch_size)
    check_count("border", border, 0)
    grid = resolve_grid(grid, mode)
    if not isinstance(grid, ShiftGrid):
        raise UsageError(f"grid must be a shiftlab.ShiftGrid, got {type(grid).__name__}")
    return grid, resolve_margin(grid.max_abs if extent is None else extent, mode, margin)


def batch_layout(n_images: int, batch_size: int) -> tuple[int, int]:
    """(images per batch, shifts per forward pass): at most ``batch_size`` inputs per forward.

    >>> batch_layout(6, 16)
    (6, 2)
    """
    images_per_batch = max(1, min(n_images, batch_size))
    return images_per_batch, max(1, batch_size // images_per_batch)


def count_passes(n_images: int, n_shifts: int, batch_size: int, reference: bool = True) -> int:
    """Forward passes of a run: per image batch one reference pass (when ``reference``) and the
    non-zero shifts in passes of ``batch_size`` inputs. The zero shift reuses the reference.

    >>> count_passes(6, 63, 16)   # 63 non-zero shifts (8 x 8 grid), 2 per pass, + reference
    33
    """
    images_per_batch, per_pass = batch_layout(n_images, batch_size)
    batches = math.ceil(n_images / images_per_batch)
    return batches * (int(reference) + math.ceil(n_shifts / per_pass))
