"""Output-level shift invariance of a dense model (segmentation, image-to-image): per-pixel
agreement (mASSC), output distances, EQ-T, and mIoU / pixel accuracy with masks.

A dense model returns a map at the input's size: a tensor (N, C, H, W), or a dict of such maps
(torchvision's segmentation models: ``out``, ``aux``), of which ``output`` is measured. Each
pixel's class is the argmax over C (for C = 1, a positive logit is class 1). The shifted output
is brought back to the unshifted image's frame before anything is compared: rolled back in
circular mode; in crop mode only the pixels that both windows see are compared, so a pixel that
entered the window with the shift never counts (docs/semantics.md, "Dense outputs").

:func:`measure_dense` runs the model once per (image, shift), batch by batch; what it keeps is
per-image counts, the (H, W) agreement map and, with masks, confusion matrices, so memory does
not grow with the number of images. :class:`~shiftlab.invariance.dense_result.DenseResult`
holds the numbers.

A circular-padded net without striding is exactly equivariant, so every pixel agrees at every
shift:

>>> _ = torch.manual_seed(0)
>>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"), nn.ReLU(),
...                     nn.Conv2d(8, 5, 3, padding=1, padding_mode="circular")).eval()
>>> result = measure_dense(net, torch.randn(2, 3, 16, 16), ShiftGrid.square(4), progress=False)
>>> result.summary()["massc"], float(result.agreement.min())
(1.0, 1.0)
"""
from __future__ import annotations

import itertools
import time
import warnings
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..data.masks import check_mask_values
from ..checks import batch_layout, check_count, check_model_has_data, check_request, window_size
from ..equivariance.engine import evaluation_mode, resolve_device
from ..equivariance.shifts import ShiftGrid, apply_shifts, centre_window
from ..errors import ModelError, UsageError
from ..results.provenance import Provenance
from .dense_result import DenseResult, DenseSettings
from .dense_tally import Tally, tally_pairs, tally_shift
from .grid import check_pair_options, draw_pairs, measured_provenance, model_name
from .grid_result import INVALID

__all__ = ["dense_output", "is_dense", "measure_dense", "pixel_classes"]

Batches = Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]]


# -- the model's output map -------------------------------------------------------------
def dense_output(output: object, batch: torch.Tensor, key: str = "out") -> torch.Tensor:
    """The output map (B, C, H, W) of a model's ``output`` for ``batch`` (B, 3, H, W): the
    tensor itself, ``output[key]`` of a dict, or the first element of a tuple/list; a
    :class:`ModelError` when it is not a map at the input's size.

    >>> dense_output({"out": torch.zeros(2, 5, 8, 8)}, torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 5, 8, 8])
    """
    if isinstance(output, dict):
        if key not in output:
            raise ModelError(f"the model returned a dict with keys {sorted(output)}; dense"
                             f" consistency reads its {key!r} map")
        output = output[key]
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 4 \
            or output.shape[0] != batch.shape[0]:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(f"the model's output is {shape}; dense consistency needs a map"
                         " (N, classes, H, W)")
    if output.shape[-2:] != batch.shape[-2:]:
        raise ModelError(f"the model's output map is {output.shape[-2]}x{output.shape[-1]} for a"
                         f" {batch.shape[-2]}x{batch.shape[-1]} input; dense consistency compares"
                         " pixels, so the map must be upsampled to the input's size in forward")
    return output


def is_dense(model: nn.Module, size: int, device: Union[str, torch.device] = "cpu") -> bool:
    """Whether ``model`` returns a map at the input's size (a segmentation or image-to-image
    network) rather than one vector per image: one forward of a zero (1, 3, size, size) input.

    >>> is_dense(nn.Conv2d(3, 2, 1), 8), is_dense(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), 4)
    (True, False)
    """
    probe = torch.zeros(1, 3, size, size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the train-mode warning belongs to the measurement
        try:
            with torch.inference_mode(), evaluation_mode(model):
                output = model(probe)
        except Exception:  # noqa: BLE001  a classifier's own checks say what is wrong, later
            return False
    if isinstance(output, dict):
        output = output.get("out")
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    return isinstance(output, torch.Tensor) and output.dim() == 4 \
        and tuple(output.shape[-2:]) == (size, size) and size > 1


def pixel_classes(maps: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of maps (..., C, H, W): argmax over C, or ``logit > 0`` for C = 1;
    -1 where a pixel's values are not all finite (never an agreement).

    >>> pixel_classes(torch.tensor([[[[0.1, -2.0]], [[0.3, float("nan")]]]])).tolist()
    [[[1, -1]]]
    """
    finite = torch.isfinite(maps).all(-3)
    if maps.shape[-3] == 1:
        classes = (maps[..., 0, :, :] > 0).long()
    else:
        classes = maps.argmax(-3)
    return torch.where(finite, classes, torch.full_like(classes, INVALID))


# -- measurement --------------------------------------------------------------------------
def measure_dense(model: nn.Module, images: Union[torch.Tensor, Batches],
                  grid: Optional[ShiftGrid] = None, *, masks: Optional[torch.Tensor] = None,
                  n_images: Optional[int] = None, mode: str = "circular",
                  margin: Optional[int] = None, ignore_index: Optional[int] = 255,
                  output: str = "out", n_pairs: int = 1000, seed: int = 0,
                  batch_size: int = 16, device: Union[str, torch.device, None] = "auto",
                  progress: Optional[bool] = None, provenance: Optional[Provenance] = None,
                  n_bootstrap: int = 1000, confidence: float = 0.95) -> DenseResult:
    """Agreement, mASSC, output distances, EQ-T and (with masks) mIoU of a dense model's output
    under every whole-pixel shift of ``grid``.

    Args:
        model: returns (N, C, H, W) maps at the input's size, or a dict of them (``output``
            names the one measured; torchvision's segmentation models: 'out').
        images: (N, 3, H, W); in crop mode the canvases (N, 3, H+2m, W+2m) whose centre window
            is the unshifted image. Or an iterable of (images, masks or None) batches
            (:func:`shiftlab.data.masks.mask_batches`), streamed; ``n_images`` is then required
            (it assigns the random pairs to images).
        grid: whole-pixel shifts; default ``ShiftGrid.square(8)`` (circular) or
            ``symmetric(4)`` (crop).
        masks: (N, H, W) class indices (canvases (N, H+2m, W+2m) in crop mode) for mIoU and
            pixel accuracy; pixels equal to ``ignore_index`` are left out.
        mode, margin: 'circular' (torch.roll) or 'crop' (windows of a larger canvas).
        n_pairs, seed: random pairs of shifts for mASSC (pair k uses image k mod N, as for
            classifiers); the seed also drives the bootstrap.
        batch_size: inputs per forward pass; the numbers do not depend on it.
        device, progress, provenance, n_bootstrap, confidence: as for
            :func:`shiftlab.measure_invariance`.

    Returns:
        A :class:`~shiftlab.invariance.dense_result.DenseResult`.
    """
    check_pair_options(n_pairs, n_bootstrap, confidence)
    grid, margin = check_request(mode=mode, grid=grid, margin=margin, batch_size=batch_size)
    if not grid.is_integer:
        raise UsageError("dense consistency compares pixels, so it needs whole-pixel shifts;"
                         " drop --subpixel")
    if distributed.active():
        raise UsageError("dense consistency runs in one process; run it without torchrun")
    batches, n_images = _batches(images, masks, n_images, batch_size)
    first = next(batches, None)
    if first is None:
        raise UsageError("no images to measure")
    height, width = window_size(first[0].shape, margin)
    settings = DenseSettings(grid=grid, mode=mode, size=(height, width), margin=margin,
                             n_pairs=int(n_pairs), seed=int(seed), n_bootstrap=int(n_bootstrap),
                             confidence=float(confidence),
                             padding=str(getattr(model, "shiftlab_padding", "as-trained")),
                             ignore_index=None if ignore_index is None else int(ignore_index),
                             output=output)
    pairs = draw_pairs(n_pairs, n_images, len(grid), seed)
    device = resolve_device(device)
    check_model_has_data(model)
    model = model.to(device)
    name = model_name(model, provenance)
    started = time.perf_counter()
    tally = Tally(settings, n_images, pairs)
    bar = tqdm(total=n_images, desc="dense consistency", unit="image", leave=False,
               disable=None if progress is None else not progress)
    with bar, evaluation_mode(model, name), torch.inference_mode():
        start = 0
        for tensor, mask in itertools.chain([first], batches):
            if start + len(tensor) > n_images:
                raise UsageError(f"the stream holds more than the {n_images} images it was said"
                                 " to hold (n_images)")
            _measure_batch(model, tensor.to(device), None if mask is None else mask.to(device),
                           start, tally, batch_size)
            start += len(tensor)
            bar.update(len(tensor))
    if start != n_images:
        raise UsageError(f"the stream held {start} images, not the {n_images} of n_images")
    n_pixels = n_images * (1 + sum(1 for s in grid.shifts if tuple(s) != (0, 0))) \
        * height * width
    if tally.nonfinite_pixels >= n_pixels:
        raise ModelError(f"{name} gave NaN or Inf at every output pixel; check its weights and"
                         " the input normalisation")
    if tally.nonfinite_pixels:
        warnings.warn(f"{name}: {tally.nonfinite_pixels} of {n_pixels} output pixels have NaN or"
                      " Inf values; they are left out of every statistic", stacklevel=2)
    result = tally.result(measured_provenance(provenance, n_images=n_images, started=started,
                                              device=device))
    if result.uninformative:
        warnings.warn(f"{name}: {result.uninformative}", stacklevel=2)
    return result


def _batches(images, masks, n_images: Optional[int], batch_size: int
             ) -> tuple[Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]], int]:
    """(batches of (images, masks or None), the number of images)."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or not images.is_floating_point() or len(images) == 0:
            raise UsageError("images must be a floating tensor (N, C, H, W) with N >= 1")
        if masks is not None and (not isinstance(masks, torch.Tensor) or masks.dim() != 3
                                  or masks.shape != (images.shape[0], *images.shape[-2:])):
            raise UsageError(f"masks must be a tensor (N, H, W) matching the images"
                             f" {tuple(images.shape)}, got {getattr(masks, 'shape', masks)}")
        step = max(1, min(len(images), batch_size))
        return ((images[k:k + step], None if masks is None else masks[k:k + step])
                for k in range(0, len(images), step)), len(images)
    if masks is not None:
        raise UsageError("pass masks inside the stream's (images, masks) batches")
    if n_images is None:
        raise UsageError("a stream of batches needs n_images (the random pairs are assigned to"
                         " images by index)")
    check_count("n_images", n_images)

    def stream() -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        for item in images:
            batch, mask = (item if isinstance(item, (tuple, list)) else (item, None))[:2]
            if not isinstance(batch, torch.Tensor) or batch.dim() != 4:
                raise UsageError("each batch must be (images (B, C, H, W), masks (B, H, W) or"
                                 " None)")
            yield batch, mask
    return stream(), int(n_images)


def _measure_batch(model: nn.Module, batch: torch.Tensor, masks: Optional[torch.Tensor],
                   start: int, tally: Tally, batch_size: int) -> None:
    """Every shift of the grid for one batch of images, tallied."""
    settings = tally.settings
    mode, margin, key = settings.mode, settings.margin, settings.output
    n_total = len(tally.agree)
    ids = np.arange(start, start + len(batch))
    window = centre_window(batch, margin) if mode == "crop" else batch
    reference = dense_output(model(window), window, key).double()
    n_classes = max(2, reference.shape[1])
    tally.start(n_classes, masks is not None, n_total)
    if masks is not None:
        _check_masks(masks, batch, n_classes, settings.ignore_index)
    ref_classes = pixel_classes(reference)
    tally.nonfinite_pixels += int((ref_classes == INVALID).sum())
    seen = ref_classes[ref_classes != INVALID]
    tally.reference_classes += torch.bincount(seen, minlength=n_classes).cpu().numpy()
    finite = reference[torch.isfinite(reference)]
    if finite.numel():
        tally.low = min(tally.low, float(finite.min()))
        tally.high = max(tally.high, float(finite.max()))

    shifts = [tuple(int(v) for v in s) for s in settings.grid.shifts]
    table = torch.tensor(shifts, dtype=torch.float64)
    aligned = torch.empty((len(shifts), *ref_classes.shape), dtype=torch.int32,
                          device=ref_classes.device)
    moving = [k for k, s in enumerate(shifts) if s != (0, 0)]
    for k, s in enumerate(shifts):
        if s == (0, 0):  # the identity reuses the reference pass
            tally_shift(tally, k, s, reference, ref_classes, reference, ref_classes, masks,
                         ids, aligned, moved=False)
    _, per_pass = batch_layout(len(batch), batch_size)
    for first in range(0, len(moving), per_pass):
        index = moving[first:first + per_pass]
        inputs = apply_shifts(batch, table[index], mode, margin)  # (k, B, C, H, W)
        outputs = dense_output(model(inputs.reshape(-1, *inputs.shape[2:])),
                               inputs.reshape(-1, *inputs.shape[2:]), key).double()
        outputs = outputs.reshape(len(index), len(batch), *outputs.shape[1:])
        for position, k in enumerate(index):
            out = outputs[position]
            out_classes = pixel_classes(out)
            tally.nonfinite_pixels += int((out_classes == INVALID).sum())
            tally_shift(tally, k, shifts[k], reference, ref_classes, out, out_classes, masks,
                         ids, aligned, moved=True)
    tally_pairs(tally, aligned, ids)


def _check_masks(masks: torch.Tensor, batch: torch.Tensor, n_classes: int,
                 ignore_index: Optional[int]) -> None:
    if masks.shape != (batch.shape[0], *batch.shape[-2:]):
        raise UsageError(f"masks {tuple(masks.shape)} do not match the images"
                         f" {tuple(batch.shape)}; pass one (H, W) mask per image")
    if masks.is_floating_point():
        raise UsageError(f"masks must hold class indices (integers), got {masks.dtype}")
    check_mask_values(masks, n_classes, ignore_index)

