"""Output-level shift invariance of a classifier: consistency, flip rate, MAC, accuracy.

Everything here is computed from the model's output f(x) (the logits, (N, classes)) under the
shifts of a grid (SPEC.md, "Output-level invariance"):

* consistency vs. reference per shift: P[argmax f(T_δ x) = argmax f(x)];
* pairwise consistency (Zhang 2019): P[argmax f(T_δ1 x) = argmax f(T_δ2 x)] for random pairs
  of shifts drawn from the grid, with the number of pairs and a Wilson 95% interval;
* along a diagonal sweep (t, t): the softmax probability of the unshifted image's top class,
  the flip rate (fraction of consecutive steps whose argmax differs, Azulay & Weiss) and the
  mean absolute change (MAC) of that probability between consecutive steps;
* accuracy per shift when labels are given (:func:`shiftlab.labels.read_labels` reads class
  folders or a CSV).

:func:`measure_invariance` runs the model once per (image, shift) and keeps only the argmax and
the reference-class probability, so an :class:`InvarianceResult` holds every number, small
enough to save as one ``.npz`` (:meth:`InvarianceResult.save`, :func:`load_invariance`).

>>> result = measure_invariance(model, images, ShiftGrid.square(8))   # doctest: +SKIP
>>> result.summary()["pairwise_consistency"]                          # doctest: +SKIP
0.87
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # plain bar: tqdm.auto warns in notebooks without ipywidgets

from . import __version__
from .engine import batch_layout, resolve_device
from .errors import ModelError, ShiftlabError, UsageError
from .labels import LabelledImages, read_labels  # noqa: F401  (public here too)
from .files import atomic_write, to_jsonable
from .shifts import MODES, ShiftGrid, apply_shifts, centre_window

if TYPE_CHECKING:  # pandas is imported lazily: only tables need it
    import pandas

__all__ = ["InvarianceResult", "InvarianceSettings", "LabelledImages", "default_diagonal",
           "load_invariance", "measure_invariance", "read_labels", "wilson_interval"]

FORMAT_VERSION = 1
_KIND = "shiftlab.invariance"
_ARRAYS = ("reference_argmax", "grid_argmax", "grid_prob", "diagonal_argmax", "diagonal_prob",
           "pairs")


# -- statistics --------------------------------------------------------------------------
def wilson_interval(successes, n, confidence: float = 0.95):
    """Wilson score interval for a binomial proportion: (low, high), NaN where n = 0.

    Works elementwise on arrays; scalars in, floats out.

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be between 0 and 1, got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    k = np.asarray(successes, dtype=np.float64)
    total = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / total
        denominator = 1 + z * z / total
        centre = (p + z * z / (2 * total)) / denominator
        half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
        low, high = np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)
    low = np.where(k <= 0, 0.0, low)  # exact ends: rounding must not move them off 0 and 1
    high = np.where(k >= total, 1.0, high)
    low, high = np.where(total > 0, low, np.nan), np.where(total > 0, high, np.nan)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


# -- settings and result -----------------------------------------------------------------
@dataclass(frozen=True)
class InvarianceSettings:
    """What defines an output-level measurement (saved with the result)."""

    grid: ShiftGrid
    diagonal: ShiftGrid
    mode: str = "circular"
    size: tuple[int, int] = (224, 224)
    margin: int = 0
    n_pairs: int = 1000
    seed: int = 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["grid"], data["diagonal"] = self.grid.to_dict(), self.diagonal.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "InvarianceSettings":
        return cls(grid=ShiftGrid.from_dict(data["grid"]),
                   diagonal=ShiftGrid.from_dict(data["diagonal"]), mode=data["mode"],
                   size=tuple(data["size"]), margin=int(data["margin"]),
                   n_pairs=int(data["n_pairs"]), seed=int(data["seed"]))


@dataclass
class InvarianceResult:
    """Per-image predictions under every shift, and the invariance numbers derived from them.

    Arrays (N images, S grid shifts, D diagonal steps, P pairs):

    * ``reference_argmax`` (N,): argmax f(x) of the unshifted image.
    * ``grid_argmax`` (N, S), ``grid_prob`` (N, S): argmax f(T_δ x), and the softmax
      probability of the reference class, for each grid shift.
    * ``diagonal_argmax`` (N, D), ``diagonal_prob`` (N, D): the same along the diagonal sweep.
    * ``pairs`` (P, 3): the random pairs as (image, grid index of δ1, grid index of δ2).
    * ``labels`` (N,) class indices, or None.

    Everything else (consistency, intervals, flip rate, MAC, accuracy) is computed from these.

    >>> result.to_frame().head()          # doctest: +SKIP
    >>> result.summary()["flip_rate"]     # doctest: +SKIP
    """

    settings: InvarianceSettings
    reference_argmax: np.ndarray
    grid_argmax: np.ndarray
    grid_prob: np.ndarray
    diagonal_argmax: np.ndarray
    diagonal_prob: np.ndarray
    pairs: np.ndarray
    labels: Optional[np.ndarray] = None
    meta: dict = field(default_factory=dict)

    # -- per shift -------------------------------------------------------------------
    @property
    def grid(self) -> ShiftGrid:
        return self.settings.grid

    @property
    def n_images(self) -> int:
        return int(self.reference_argmax.shape[0])

    @property
    def agreement(self) -> np.ndarray:
        """(S,) number of images whose shifted argmax equals the unshifted one."""
        return (self.grid_argmax == self.reference_argmax[:, None]).sum(0)

    @property
    def consistency(self) -> np.ndarray:
        """(S,) consistency vs. reference, P[argmax f(T_δ x) = argmax f(x)], per grid shift."""
        return self.agreement / self.n_images

    @property
    def consistency_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(S,) Wilson 95% interval of :attr:`consistency` (n = number of images)."""
        return wilson_interval(self.agreement, np.full(len(self.grid), self.n_images))

    @property
    def accuracy(self) -> Optional[np.ndarray]:
        """(S,) top-1 accuracy per grid shift, or None without labels."""
        if self.labels is None:
            return None
        return (self.grid_argmax == self.labels[:, None]).mean(0)

    @property
    def reference_accuracy(self) -> Optional[float]:
        """Top-1 accuracy on the unshifted images, or None without labels."""
        return None if self.labels is None else float((self.reference_argmax == self.labels).mean())

    # -- pairs -----------------------------------------------------------------------
    @property
    def pair_agreement(self) -> np.ndarray:
        """(P,) whether the two shifts of each random pair give the same argmax."""
        image, first, second = self.pairs.T
        return self.grid_argmax[image, first] == self.grid_argmax[image, second]

    @property
    def pairwise_consistency(self) -> float:
        """The paper's consistency: fraction of the random pairs that agree."""
        agree = self.pair_agreement
        return float(agree.mean()) if agree.size else math.nan

    @property
    def pairwise_interval(self) -> tuple[float, float]:
        """Wilson 95% interval of :attr:`pairwise_consistency` (n = number of pairs)."""
        agree = self.pair_agreement
        return wilson_interval(int(agree.sum()), int(agree.size))

    @property
    def pairwise_consistency_all_pairs(self) -> float:
        """The expectation the random pairs estimate: all S² ordered pairs of every image.

        For one image whose argmax takes class c at n_c of the S shifts, the share of agreeing
        ordered pairs (δ1, δ2), both drawn uniformly, is Σ_c (n_c / S)²; this is its mean over
        images. No sampling noise.
        """
        n_shifts = self.grid_argmax.shape[1]
        values = []
        for row in self.grid_argmax:
            counts = np.unique(row, return_counts=True)[1]
            values.append(float(((counts / n_shifts) ** 2).sum()))
        return float(np.mean(values))

    # -- diagonal sweep --------------------------------------------------------------
    @property
    def diagonal_steps(self) -> np.ndarray:
        """(D,) the sweep's position: t for a diagonal (t, t), the step index otherwise."""
        shifts = np.asarray(self.settings.diagonal.shifts, dtype=np.float64)
        return shifts[:, 0] if np.all(shifts[:, 0] == shifts[:, 1]) else np.arange(len(shifts), dtype=float)

    @property
    def flips(self) -> np.ndarray:
        """(N, D-1) whether the argmax changes between consecutive steps of the sweep."""
        return self.diagonal_argmax[:, 1:] != self.diagonal_argmax[:, :-1]

    @property
    def flip_rate(self) -> float:
        """Fraction of consecutive sweep steps (all images) where the argmax changes; NaN if D = 1."""
        flips = self.flips
        return float(flips.mean()) if flips.size else math.nan

    @property
    def mac(self) -> float:
        """Mean absolute change of the reference class's probability between consecutive steps."""
        change = np.abs(np.diff(self.diagonal_prob, axis=1))
        return float(change.mean()) if change.size else math.nan

    @property
    def mean_probability(self) -> np.ndarray:
        """(D,) probability of the unshifted top class along the sweep, mean over images."""
        return self.diagonal_prob.mean(0)

    # -- tables ----------------------------------------------------------------------
    def to_frame(self) -> "pandas.DataFrame":
        """One row per grid shift: dh, dw, consistency, ci_low, ci_high, n, probability
        (mean softmax probability of the unshifted top class) and accuracy (with labels)."""
        import pandas as pd

        shifts = np.asarray(self.grid.shifts, dtype=np.float64)
        low, high = self.consistency_interval
        frame = pd.DataFrame({
            "dh": shifts[:, 0], "dw": shifts[:, 1], "consistency": self.consistency,
            "ci_low": low, "ci_high": high, "n": self.n_images,
            "probability": self.grid_prob.mean(0),
        })
        if self.labels is not None:
            frame["accuracy"] = self.accuracy
        return frame

    def summary(self) -> dict:
        """The headline numbers as a flat dict (JSON-friendly floats and ints).

        Keys: pairwise_consistency, pairwise_ci_low, pairwise_ci_high, n_pairs,
        pairwise_consistency_all_pairs, consistency_vs_reference (mean over grid shifts),
        consistency_vs_reference_min, flip_rate, mac, diagonal_steps, step_px, accuracy (mean
        over shifts), accuracy_unshifted, accuracy_min (the last three None without labels),
        n_images, n_shifts.
        """
        low, high = self.pairwise_interval
        steps = self.diagonal_steps
        accuracy = self.accuracy
        return {
            "pairwise_consistency": self.pairwise_consistency,
            "pairwise_ci_low": low, "pairwise_ci_high": high, "n_pairs": int(len(self.pairs)),
            "pairwise_consistency_all_pairs": self.pairwise_consistency_all_pairs,
            "consistency_vs_reference": float(self.consistency.mean()),
            "consistency_vs_reference_min": float(self.consistency.min()),
            "flip_rate": self.flip_rate, "mac": self.mac,
            "diagonal_steps": int(len(steps)),
            "step_px": float(np.diff(steps).min()) if len(steps) > 1 else math.nan,
            "accuracy": None if accuracy is None else float(accuracy.mean()),
            "accuracy_unshifted": self.reference_accuracy,
            "accuracy_min": None if accuracy is None else float(accuracy.min()),
            "n_images": self.n_images, "n_shifts": len(self.grid),
        }

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON header, no pickle) atomically: temp file, then rename."""
        header = {"format": FORMAT_VERSION, "kind": _KIND, "settings": self.settings.to_dict(),
                  "meta": self.meta}
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        if self.labels is not None:
            arrays["labels"] = self.labels
        arrays["header"] = np.array(json.dumps(header, default=to_jsonable))
        return atomic_write(Path(path), lambda handle: np.savez_compressed(handle, **arrays))


def load_invariance(path: Union[str, os.PathLike]) -> InvarianceResult:
    """Read a result written by :meth:`InvarianceResult.save` (no pickle involved).

    >>> result = load_invariance("runs/consistency/invariance-resnet18.npz")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no invariance file at {path}; pass an invariance-<model>.npz written"
                            " by 'shiftlab consistency'")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {name: data[name] for name in _ARRAYS}
            labels = data["labels"] if "labels" in data.files else None
    except Exception as exc:
        raise ShiftlabError(f"{path} is not a shiftlab invariance file ({type(exc).__name__}:"
                            f" {exc})") from exc
    if not isinstance(header, dict) or header.get("kind") != _KIND \
            or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise ShiftlabError(f"{path} is not an invariance file of format {FORMAT_VERSION} (found"
                            f" {found}); re-run 'shiftlab consistency'")
    try:
        settings = InvarianceSettings.from_dict(header["settings"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShiftlabError(f"{path} has an incomplete or damaged header ({type(exc).__name__}:"
                            f" {exc}); re-run the measurement") from exc
    return InvarianceResult(settings=settings, labels=labels, meta=header.get("meta", {}), **arrays)


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
                       progress: Optional[bool] = None, meta: Optional[dict] = None
                       ) -> InvarianceResult:
    """Consistency, flip rate, MAC and accuracy of a classifier's output under input shifts.

    Args:
        model: a classifier in eval mode whose output is (N, classes) logits; moved to ``device``.
        images: (N, C, H, W) in circular mode; in crop mode the canvases (N, C, H+2m, W+2m)
            whose centre window is the unshifted image (as for :func:`shiftlab.measure`).
        grid: the shifts; default ``ShiftGrid.square(8)`` (circular) or ``symmetric(4)`` (crop).
            Fractional (sub-pixel) shifts are band-limited FFT shifts.
        mode: 'circular' (torch.roll) or 'crop' (windows of a larger canvas, no wrap-around).
        margin: crop mode: the canvas margin; default the largest |shift| rounded up.
        labels: (N,) class indices for accuracy per shift, or None.
        n_pairs: random shift pairs for the pairwise consistency; pair k uses image k mod N and
            two shifts drawn independently and uniformly from the grid (as in the paper, so a
            pair may repeat a shift).
        seed: seeds the ``torch.Generator`` that draws the pairs.
        diagonal: the sweep for the probability curves, flip rate and MAC; default
            :func:`default_diagonal` of ``grid``. Shifts shared with ``grid`` run once.
        batch_size: inputs per forward pass (images × shifts); results do not depend on it.
        device: 'auto', 'cpu', 'cuda', ...; progress: tqdm bar (None: only on a terminal).
        meta: extra metadata stored in the result (model name, weights, image names, ...).

    Returns:
        An :class:`InvarianceResult`.

    Example:
        >>> net = torchvision.models.resnet18().eval()                          # doctest: +SKIP
        >>> result = measure_invariance(net, images, ShiftGrid.square(8), n_pairs=1000)  # doctest: +SKIP
        >>> result.summary()["pairwise_consistency"], result.flip_rate          # doctest: +SKIP
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UsageError("images must be a tensor of shape (N, C, H, W)")
    if images.shape[0] == 0:
        raise UsageError("no images to measure")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(n_pairs, bool) or int(n_pairs) != n_pairs or n_pairs < 1:
        raise UsageError(f"n_pairs must be a positive integer, got {n_pairs}")
    grid = grid if grid is not None else (ShiftGrid.square(8) if mode == "circular"
                                          else ShiftGrid.symmetric(4))
    diagonal = diagonal if diagonal is not None else default_diagonal(grid)
    extent = max(grid.max_abs, diagonal.max_abs)
    if mode == "crop":
        margin = int(math.ceil(extent)) if margin is None else int(margin)
        if extent > margin:
            raise UsageError(f"the shifts reach {extent:g} px but the crop margin is {margin} px;"
                             " use a smaller grid or load images with a larger margin")
    else:
        margin = 0
    height, width = images.shape[-2] - 2 * margin, images.shape[-1] - 2 * margin
    if height < 1 or width < 1:
        raise UsageError(f"images of {images.shape[-2]} px cannot hold a crop margin of {margin} px")
    n_images = images.shape[0]
    label_array = _check_labels(labels, n_images)

    settings = InvarianceSettings(grid=grid, diagonal=diagonal, mode=mode, size=(height, width),
                                  margin=margin, n_pairs=int(n_pairs), seed=int(seed))
    union = list(dict.fromkeys(grid.shifts + diagonal.shifts))  # grid order, then new sweep steps
    device = resolve_device(device)
    model = model.to(device)
    started = time.perf_counter()
    argmax, prob, reference, n_classes = _predict(model, images, union, settings, batch_size,
                                                  device, progress)
    position = {shift: k for k, shift in enumerate(union)}
    grid_index = [position[s] for s in grid.shifts]
    diagonal_index = [position[s] for s in diagonal.shifts]
    if label_array is not None and (label_array.max() >= n_classes):
        raise UsageError(f"label {int(label_array.max())} is out of range: the model has"
                         f" {n_classes} classes (0..{n_classes - 1})")

    generator = torch.Generator().manual_seed(int(seed))
    pairs = np.stack([
        np.arange(n_pairs, dtype=np.int64) % n_images,
        torch.randint(len(grid), (n_pairs,), generator=generator).numpy(),
        torch.randint(len(grid), (n_pairs,), generator=generator).numpy(),
    ], axis=1)
    meta = {**(meta or {}), "n_images": n_images, "n_classes": n_classes,
            "seconds": round(time.perf_counter() - started, 3), "device": str(device),
            "shiftlab": __version__, "torch": torch.__version__,
            "python": platform.python_version()}
    return InvarianceResult(
        settings=settings, reference_argmax=reference,
        grid_argmax=argmax[:, grid_index], grid_prob=prob[:, grid_index],
        diagonal_argmax=argmax[:, diagonal_index], diagonal_prob=prob[:, diagonal_index],
        pairs=pairs, labels=label_array, meta=meta)


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
    reference argmax (N,) and the number of classes."""
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
            logits = _logits(model, window)
            n_classes = logits.shape[1]
            top = logits.argmax(1)
            reference[rows] = top.cpu().numpy()
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
                out = _logits(model, shifted.reshape(-1, *shifted.shape[2:]))
                out = out.reshape(count, -1, out.shape[1])  # (k, B, classes)
                columns = index.tolist()
                argmax[rows, columns] = out.argmax(2).T.cpu().numpy()
                prob[rows, columns] = _probability(out, top).T.cpu().numpy()
                bar.update(1)
    return argmax, prob, reference, n_classes


def _logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The model's output as (B, classes) float64; (B, classes, 1, 1) is flattened."""
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


def _probability(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Softmax probability of class ``top`` (B,) in ``logits`` (k, B, classes): (k, B)."""
    probabilities = torch.softmax(logits, dim=-1)
    index = top.view(1, -1, 1).expand(probabilities.shape[0], -1, 1)
    return probabilities.gather(-1, index).squeeze(-1)
