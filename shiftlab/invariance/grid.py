"""Output-level shift invariance of a classifier: consistency, flip rate, MAC, accuracy.

Everything here is computed from the model's output f(x) (the logits, (N, classes)) under the
shifts of a grid (docs/semantics.md, "Output-level invariance"):

* consistency vs. reference per shift: P[argmax f(T_δ x) = argmax f(x)];
* pairwise consistency (Zhang 2019): P[argmax f(T_δ1 x) = argmax f(T_δ2 x)] for random pairs
  of shifts drawn from the grid, with a bootstrap-over-images interval;
* the worst case over the grid (Michaeli et al. 2023): the share of images consistent, and
  correct, under every shift;
* along a diagonal sweep (t, t): the softmax probability of the unshifted image's top class,
  the flip rate (fraction of consecutive steps whose argmax differs, Azulay & Weiss) and the
  mean absolute change (MAC) of that probability between consecutive steps;
* accuracy per shift when labels are given (:func:`shiftlab.data.labels.read_labels` reads class
  folders or a CSV).

:func:`measure_invariance` runs the model (in eval mode) once per (image, shift) and keeps only
the argmax and the reference-class probability; the :class:`InvarianceResult` it returns (module
:mod:`shiftlab.invariance.grid_result`) holds every number and saves as one ``.npz``. The seed
paper's own ImageNet protocols (two random 224 crops, the diagonal) are in
:mod:`shiftlab.invariance.protocols`.

A tiny classifier that flattens its feature map (so its output depends on where things are)
on the six shipped sample photos at 32 px:

>>> from shiftlab.data import load_images, sample_image_paths
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
...                       nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
>>> images = load_images(sample_image_paths(), size=32).tensor
>>> result = measure_invariance(model, images, ShiftGrid.square(8))
>>> round(result.summary()["pairwise_consistency"], 3)
0.706
"""
from __future__ import annotations

import itertools
import math
import time
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # plain bar: tqdm.auto warns in notebooks without ipywidgets

from .. import distributed
from ..defaults import MAX_PAIRS
from ..checks import (batch_layout, check_count, check_model_has_data, check_request,
                     labelled_batches, resolve_grid, window_size)
from ..equivariance.engine import evaluation_mode, resolve_device
from ..errors import ModelError, ShiftlabError, UsageError
from ..results.provenance import Provenance, versions
from .grid_result import INVALID, InvarianceResult, InvarianceSettings
from ..equivariance.shifts import MODES, ShiftGrid, apply_shifts, centre_window

__all__ = ["classifier_logits", "default_diagonal", "evaluation_mode", "measure_invariance"]


# -- model handling shared with shiftlab.invariance.protocols ---------------------------------------
def classifier_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's output for ``batch`` (B, C, H, W) as (B, classes) float64 logits; an output
    (B, classes, 1, 1) is flattened, anything else is a :class:`ModelError`.

    >>> images = torch.zeros(4, 3, 8, 8)
    >>> classifier_logits(nn.Sequential(nn.Flatten(), nn.Linear(192, 10)), images).shape
    torch.Size([4, 10])
    >>> head = nn.Sequential(nn.Conv2d(3, 5, 1), nn.AdaptiveAvgPool2d(1))
    >>> logits = classifier_logits(head, images)
    >>> logits.shape, logits.dtype                      # (4, 5, 1, 1) flattened, float64
    (torch.Size([4, 5]), torch.float64)
    """
    out = model(batch)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}; output-level invariance needs a"
                         " classifier that returns a (N, classes) tensor of logits")
    if out.dim() > 2 and all(size == 1 for size in out.shape[2:]):
        out = out.flatten(1)
    if out.dim() != 2 or out.shape[0] != batch.shape[0]:
        raise ModelError(f"the model's output has shape {tuple(out.shape)}; output-level invariance"
                         " needs (N, classes) logits from a classifier")
    return out.detach().double()


def top_class(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the last axis, with -1 where a row holds NaN or Inf (never an agreement).

    >>> top_class(torch.tensor([[0.0, 2.0], [float("nan"), 1.0]])).tolist()
    [1, -1]
    """
    return torch.where(torch.isfinite(logits).all(-1), logits.argmax(-1),
                       torch.full_like(logits[..., 0], INVALID, dtype=torch.long))


def model_name(model: nn.Module, provenance: Optional[Provenance]) -> str:
    """How warnings name a model: its provenance's label, else its model, else its class.

    >>> model_name(nn.Linear(2, 2), Provenance(model="resnet18"))
    'resnet18'
    >>> model_name(nn.Linear(2, 2), None)
    'Linear'
    """
    named = provenance or Provenance()
    return named.label or named.model or type(model).__name__


def given_provenance(provenance: Optional[Provenance], meta: Optional[dict]) -> Optional[Provenance]:
    """The caller's provenance with the older ``meta`` keyword folded in: alone, it is read as
    :meth:`Provenance.from_header_meta` reads it; with a provenance, it goes to its ``extra``
    (as :func:`shiftlab.measure` does). None when neither is given.

    >>> given_provenance(None, {"model": "resnet18"}).model
    'resnet18'
    >>> given_provenance(Provenance(model="net"), {"tag": 1}).extra
    {'tag': 1}
    """
    if not meta:
        return provenance
    if provenance is None:
        return Provenance.from_header_meta(meta)
    return provenance.replace(extra={**provenance.extra, **meta})


def measured_provenance(provenance: Optional[Provenance], *, n_images: int, started: float,
                        device: torch.device) -> Provenance:
    """``provenance`` (or an empty one) with what the measurement fills: the number of images,
    seconds since ``started`` (``time.perf_counter``), the device and the versions."""
    return (provenance or Provenance()).replace(
        n_images=int(n_images), seconds=round(time.perf_counter() - started, 3),
        device=str(device), versions=versions())


def check_finite(name: str, n_nonfinite: int, n_total: int) -> None:
    """Warn (one line) about non-finite outputs; raise :class:`ModelError` when none is finite."""
    if n_nonfinite >= n_total:
        raise ModelError(f"{name} gave NaN or Inf logits for every input; check its weights and"
                         " the input normalisation")
    if n_nonfinite:
        warnings.warn(f"{name}: {n_nonfinite} of {n_total} outputs have NaN or Inf logits; they are"
                      " left out of every statistic", stacklevel=3)


def check_pair_options(n_pairs: int, n_bootstrap: int, confidence: float) -> None:
    """Refuse a pair count outside 1..MAX_PAIRS, fewer than one bootstrap resample, or a
    confidence outside (0, 1)."""
    check_count("n_pairs", n_pairs, 1, MAX_PAIRS)
    if isinstance(n_bootstrap, bool) or int(n_bootstrap) < 1 or not 0 < confidence < 1:
        raise UsageError(f"n_bootstrap must be >= 1 and confidence in (0, 1), got {n_bootstrap}"
                         f" and {confidence}")


def draw_pairs(n_pairs: int, n_images: int, n_shifts: int, seed: int) -> np.ndarray:
    """The random pairs of shifts (P, 3) as (image, index of δ1, index of δ2): pair k uses
    image k mod N and two grid indices drawn independently and uniformly by a
    ``torch.Generator`` seeded with ``seed`` (so a pair may repeat a shift).

    >>> draw_pairs(4, 2, 3, seed=0)[:, 0].tolist()
    [0, 1, 0, 1]
    """
    generator = torch.Generator().manual_seed(int(seed))
    return np.stack([
        np.arange(n_pairs, dtype=np.int64) % n_images,
        torch.randint(n_shifts, (n_pairs,), generator=generator).numpy(),
        torch.randint(n_shifts, (n_pairs,), generator=generator).numpy(),
    ], axis=1)


# -- measurement -------------------------------------------------------------------------
def default_diagonal(grid: ShiftGrid) -> ShiftGrid:
    """The sweep (t, t) over the grid's extent: its own diagonal shifts when it has two or more
    (``square(8)`` → t = 0..7, ``square(8, subpixel=2)`` → t = 0, 0.5, ..., 7.5), else whole
    pixels from the smallest to the largest coordinate of the grid.

    >>> default_diagonal(ShiftGrid.symmetric(2)).shifts[0]
    (-2.0, -2.0)
    """
    on_diagonal = sorted({dh for dh, dw in grid.shifts if dh == dw})
    if len(on_diagonal) >= 2:
        return ShiftGrid(tuple((t, t) for t in on_diagonal), "diagonal")
    low = math.ceil(min(min(grid.dh_values), min(grid.dw_values)))
    high = math.floor(max(max(grid.dh_values), max(grid.dw_values)))
    return ShiftGrid.diagonal(max(1, high - low + 1), start=low)


def measure_invariance(model: nn.Module, images: torch.Tensor, grid: Optional[ShiftGrid] = None, *,
                       mode: str = "circular", margin: Optional[int] = None,
                       labels: Optional[Sequence[int]] = None, n_pairs: int = 1000, seed: int = 0,
                       diagonal: Optional[ShiftGrid] = None, batch_size: int = 16,
                       device: Union[str, torch.device, None] = "auto",
                       progress: Optional[bool] = None, provenance: Optional[Provenance] = None,
                       meta: Optional[dict] = None, n_bootstrap: int = 1000,
                       confidence: float = 0.95) -> InvarianceResult:
    """Consistency, flip rate, MAC and accuracy of a classifier's output under input shifts.

    Args:
        model: a classifier whose output is (N, classes) logits; moved to ``device`` and run
            in eval mode (its previous mode is restored afterwards; a warning if it trained).
        images: (N, C, H, W) in circular mode; in crop mode the canvases (N, C, H+2m, W+2m)
            whose centre window is the unshifted image (as for :func:`shiftlab.measure`). Or an
            iterable of batches (a DataLoader of images or (images, labels), shiftlab's
            ``image_batches``): streamed, one batch in memory at a time; their labels are used
            when ``labels`` is None.
        grid: the shifts; default ``ShiftGrid.square(8)`` (circular) or ``symmetric(4)`` (crop).
            Fractional (sub-pixel) shifts are band-limited FFT shifts.
        mode: 'circular' (torch.roll) or 'crop' (windows of a larger canvas, no wrap-around).
        margin: crop mode: the canvas margin; default the largest |shift| rounded up.
        labels: (N,) class indices for accuracy per shift, or None.
        n_pairs: random shift pairs for the pairwise consistency; pair k uses image k mod N and
            two shifts drawn independently and uniformly from the grid (as in the paper, so a
            pair may repeat a shift).
        seed: seeds the ``torch.Generator`` that draws the pairs, and the bootstrap.
        diagonal: the sweep for the probability curves, flip rate and MAC; default
            :func:`default_diagonal` of ``grid``. Shifts shared with ``grid`` run once.
        batch_size: inputs per forward pass (images × shifts); results do not depend on it.
        device: 'auto', 'cpu', 'cuda', ...; progress: tqdm bar (None: only on a terminal).
        provenance: where the model and images came from (``shiftlab.runs`` fills it); the
            measurement adds the number of images, seconds, device and versions. Its
            ``label`` (else ``model``) names the model in warnings.
        meta: older free-form metadata ({"model": ..., "label": ...}): read into the
            provenance when none is given, else kept in ``provenance.extra``.
        n_bootstrap, confidence: the bootstrap over images behind the pooled intervals.

    Returns:
        An :class:`InvarianceResult` (``n_classes``: the model's output size;
        ``settings.padding``: the model's ``shiftlab_padding``, which ``shiftlab.runs`` sets).
        Outputs with NaN or Inf logits are stored as class -1, left out of every statistic and
        counted (``n_nonfinite``, with a warning); a model with no finite output raises
        :class:`ModelError`. When every prediction is one class, a warning says consistency is
        uninformative (:attr:`InvarianceResult.uninformative`).

    Example:
        A tiny classifier that is not shift-invariant (it flattens its feature map), on the
        six shipped sample photos:

        >>> from shiftlab.data import load_images, sample_image_paths
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(8), nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> images = load_images(sample_image_paths(), size=32).tensor
        >>> result = measure_invariance(net, images, ShiftGrid.square(8), n_pairs=1000)
        >>> summary = result.summary()
        >>> round(summary["pairwise_consistency"], 3), round(result.flip_rate, 3)
        (0.706, 0.19)
        >>> round(summary["pairwise_ci_low"], 3), round(summary["pairwise_ci_high"], 3)
        (0.543, 0.881)
    """
    streamed = not isinstance(images, torch.Tensor)
    batches = labelled_batches(images)
    first = next(batches, None)
    if first is None:
        raise UsageError("no images to measure")
    check_pair_options(n_pairs, n_bootstrap, confidence)
    grid = resolve_grid(grid, mode) if mode in MODES else grid
    diagonal = diagonal if diagonal is not None else (default_diagonal(grid) if grid is not None
                                                      else None)
    extent = max(grid.max_abs, diagonal.max_abs) if grid is not None else None
    grid, margin = check_request(mode=mode, grid=grid, margin=margin, batch_size=batch_size,
                                 extent=extent)
    diagonal = diagonal if diagonal is not None else default_diagonal(grid)
    height, width = window_size(first[0].shape, margin)

    settings = InvarianceSettings(grid=grid, diagonal=diagonal, mode=mode, size=(height, width),
                                  margin=margin, n_pairs=int(n_pairs), seed=int(seed),
                                  n_bootstrap=int(n_bootstrap), confidence=float(confidence),
                                  padding=str(getattr(model, "shiftlab_padding", "as-trained")))
    union = list(dict.fromkeys(grid.shifts + diagonal.shifts))  # grid order, then new sweep steps
    device = resolve_device(device)
    check_model_has_data(model)
    model = model.to(device)
    provenance = given_provenance(provenance, meta)
    name = model_name(model, provenance)
    started = time.perf_counter()
    show = progress if distributed.is_main() else False
    with evaluation_mode(model, name):
        # one batch at a time; only the small per-image arrays are kept (and, under torchrun,
        # this rank's images r, r+N, ..., gathered afterwards)
        parts, start, failure = [], 0, None
        try:
            for tensor, batch_labels in itertools.chain([first], batches):
                ids = np.arange(start, start + len(tensor))
                start += len(tensor)
                if distributed.active():
                    keep = distributed.owned(ids)
                    ids, tensor = ids[keep], tensor[torch.from_numpy(keep)]
                    batch_labels = None if batch_labels is None else \
                        np.asarray(batch_labels).reshape(-1)[keep]
                if len(ids):
                    parts.append((ids, *_predict(model, tensor, union, settings, batch_size,
                                                 device, show if not streamed else False),
                                  batch_labels))
        except ShiftlabError as exc:  # raised on every rank by _gathered, none left waiting
            failure = exc
        argmax, prob, reference, n_classes, streamed_labels = _gathered(parts, failure)
        if labels is None and streamed and streamed_labels is not None:
            labels = streamed_labels
    n_images = int(reference.shape[0])
    label_array = _check_labels(labels, n_images)
    forwarded = [k for k, shift in enumerate(union) if tuple(shift) != (0, 0)]
    check_finite(name, int((reference == INVALID).sum() + (argmax[:, forwarded] == INVALID).sum()),
                 n_images * (1 + len(forwarded)))
    position = {shift: k for k, shift in enumerate(union)}
    grid_index = [position[s] for s in grid.shifts]
    diagonal_index = [position[s] for s in diagonal.shifts]
    if label_array is not None and (label_array.max() >= n_classes):
        raise UsageError(f"label {int(label_array.max())} is out of range: the model has"
                         f" {n_classes} classes (0..{n_classes - 1})")

    pairs = draw_pairs(n_pairs, n_images, len(grid), seed)
    provenance = measured_provenance(provenance, n_images=n_images, started=started,
                                     device=device)
    result = InvarianceResult(
        settings=settings, reference_argmax=reference,
        grid_argmax=argmax[:, grid_index], grid_prob=prob[:, grid_index],
        diagonal_argmax=argmax[:, diagonal_index], diagonal_prob=prob[:, diagonal_index],
        pairs=pairs, labels=label_array, n_classes=int(n_classes), provenance=provenance)
    if result.uninformative:
        warnings.warn(f"{name}: {result.uninformative}", stacklevel=2)
    return result


def _gathered(parts: list, failure: Optional[ShiftlabError] = None) -> tuple:
    """argmax, prob, reference, n_classes and labels (None unless every batch had some) of
    every rank's ``(ids, argmax, prob, reference, n_classes, labels)`` parts, in image order;
    a rank's ``failure`` is raised on every rank."""
    parts = [part for gathered in distributed.gather_checked(parts, failure) for part in gathered]
    order = np.argsort(np.concatenate([part[0] for part in parts]), kind="stable")
    argmax, prob, reference = (np.concatenate([part[k] for part in parts])[order] for k in (1, 2, 3))
    labels = None
    if all(part[5] is not None for part in parts):
        labels = np.concatenate([np.asarray(part[5]).reshape(-1) for part in parts])[order]
    return argmax, prob, reference, max(part[4] for part in parts), labels


def _check_labels(labels: Optional[Sequence[int]], n_images: int) -> Optional[np.ndarray]:
    if labels is None:
        return None
    try:
        array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    except (TypeError, ValueError):
        array = np.asarray([])
    if array.shape != (n_images,) or not np.issubdtype(array.dtype, np.integer):
        raise UsageError(f"labels must be {n_images} integer class indices (one per image), got"
                         f" shape {array.shape} of {array.dtype}")
    if (array < 0).any():
        raise UsageError(f"labels must be class indices >= 0, got {int(array.min())}")
    return array.astype(np.int64)


def _predict(model: nn.Module, images: torch.Tensor, shifts: list[tuple[float, float]],
             settings: InvarianceSettings, batch_size: int, device: torch.device,
             progress: Optional[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """argmax (N, U) and reference-class probability (N, U) for every shift of ``shifts``, the
    reference argmax (N,) and the number of classes; class -1 / NaN for non-finite logits."""
    n_images, n_shifts = images.shape[0], len(shifts)
    argmax = np.zeros((n_images, n_shifts), dtype=np.int64)
    prob = np.zeros((n_images, n_shifts), dtype=np.float64)
    reference = np.zeros(n_images, dtype=np.int64)
    n_classes = 0
    table = torch.tensor(shifts, dtype=torch.float64)
    is_zero = (table == 0).all(1)
    zero_index = torch.nonzero(is_zero).flatten().tolist()
    forward_index = torch.nonzero(~is_zero).flatten()
    images_per_batch, shifts_per_pass = batch_layout(n_images, int(batch_size))
    n_batches = math.ceil(n_images / images_per_batch)
    bar = tqdm(total=n_batches * (1 + math.ceil(len(forward_index) / shifts_per_pass)),
               desc="consistency", unit="pass", leave=False,
               disable=None if progress is None else not progress)
    margin = settings.margin
    with bar, torch.inference_mode():
        for start in range(0, n_images, images_per_batch):
            rows = slice(start, start + images_per_batch)
            batch = images[rows].to(device, non_blocking=True)
            window = centre_window(batch, margin) if settings.mode == "crop" else batch
            logits = classifier_logits(model, window)
            n_classes = logits.shape[1]
            top = logits.argmax(1)
            reference[rows] = top_class(logits).cpu().numpy()
            # T_0 is the identity: reuse the reference rather than a forward that could differ
            # from it by batch-size-dependent rounding.
            for k in zero_index:
                argmax[rows, k] = reference[rows]
                prob[rows, k] = _probability(logits[None], top).cpu().numpy()[0]
            bar.update(1)
            for first in range(0, len(forward_index), shifts_per_pass):
                index = forward_index[first:first + shifts_per_pass]
                shifted = apply_shifts(batch, table[index], settings.mode, margin)  # (k, B, C, H, W)
                count = shifted.shape[0]
                out = classifier_logits(model, shifted.reshape(-1, *shifted.shape[2:]))
                out = out.reshape(count, -1, out.shape[1])  # (k, B, classes)
                columns = index.tolist()
                argmax[rows, columns] = top_class(out).T.cpu().numpy()
                prob[rows, columns] = _probability(out, top).T.cpu().numpy()
                bar.update(1)
    # a non-finite output, or a non-finite reference, has no meaningful probability
    prob[(argmax == INVALID) | (reference[:, None] == INVALID)] = math.nan
    return argmax, prob, reference, n_classes


def _probability(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Softmax probability of class ``top`` (B,) in ``logits`` (k, B, classes): (k, B)."""
    probabilities = torch.softmax(logits, dim=-1)
    index = top.view(1, -1, 1).expand(probabilities.shape[0], -1, 1)
    return probabilities.gather(-1, index).squeeze(-1)
