"""measure(): one reference pass per image batch, then the shifted copies in batches.

Each layer is reduced to a few sums per (shift, image) inside its forward hook, so nothing but
the reference features of the current image batch is kept: peak memory depends on the batch
size and the model, never on the number of shifts. The sums of all layers become distances in
one step when the pass ends, and accumulate on the device: on a GPU nothing in a pass waits for
the device (images come through pinned memory), and results reach the host once, at the end.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm  # plain bar: tqdm.auto warns in notebooks without ipywidgets

from . import __version__, distributed
from .align import ALIGNMENTS, Plan, compare_global, make_plan
from .capture import LayerCapture, LayerSelection
from .errors import ModelError, UsageError
from .geometry import LayerInfo, as_feature_map, probe_layers
from .metrics import METRICS, ComparisonStats, DistanceAccumulator, concat, distance
from .result import Result, Settings
from .shifts import MODES, ShiftGrid, apply_shifts, centre_window
from .stencil import Workspace


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return resolved


def batch_layout(n_images: int, batch_size: int) -> tuple[int, int]:
    """(images per batch, shifts per forward pass): at most ``batch_size`` inputs per forward.

    >>> batch_layout(6, 16)
    (6, 2)
    """
    images_per_batch = max(1, min(n_images, batch_size))
    return images_per_batch, max(1, batch_size // images_per_batch)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def measure(model: nn.Module, images: torch.Tensor, grid: Optional[ShiftGrid] = None, *,
            mode: str = "circular", align: str = "bilinear", metric: str = "cosine",
            layers: LayerSelection = None, margin: Optional[int] = None, border: int = 0,
            batch_size: int = 16, device: Union[str, torch.device, None] = "auto",
            dtype: Optional[str] = None, progress: Optional[bool] = None,
            meta: Optional[dict] = None, checkpoint: Union[str, "os.PathLike", None] = None,
            resume: bool = False) -> Result:
    """Equivariance distance of every layer for every shift of ``grid``.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W); put it in eval mode first. It is moved
            to ``device``.
        images: (N, C, H, W) in circular mode; in crop mode the canvases (N, C, H+2m, W+2m)
            whose centre window is the unshifted image (``margin`` m defaults to the grid's
            largest |shift|, rounded up).
        grid: the shifts; default ``ShiftGrid.square(8)`` (circular) or ``symmetric(4)`` (crop).
        mode: 'circular' (torch.roll, the paper's per-layer protocol) or 'crop' (no wrap-around).
        align: 'bilinear' (default, the paper's), 'exact' (NaN where the stride does not divide
            the shift) or 'fourier'.
        metric: 'cosine' (default), 'l2' (relative) or 'psnr' (dB).
        layers: None (every leaf module) or glob patterns / module types.
        border: crop mode: input pixels excluded at every edge of the compared region.
        batch_size: inputs per forward pass (images × shifts).
        device: 'auto', 'cpu', 'cuda', ...; progress: tqdm bar (None: only on a terminal).
        dtype: None (float32) or 'bfloat16' / 'float16': autocast for the forward passes only;
            feature maps are compared in float32 and accumulated in float64.
        meta: extra metadata stored in the result (model name, weights, ...).
        checkpoint: a file where progress is saved atomically after every image batch; with
            ``resume=True`` a run continues from it (same settings and images required) and
            gives the same numbers as an uninterrupted run. Removed when the run completes.

    Returns:
        A ``Result`` with per-layer mean/std maps over images.

    Example:
        >>> net = torchvision.models.vgg16().eval()                    # doctest: +SKIP
        >>> result = shiftlab.measure(net, images, ShiftGrid.square(8)) # doctest: +SKIP
        >>> result.map("features.4")                                    # doctest: +SKIP
    """
    _check_choice("mode", mode, MODES)
    _check_choice("alignment", align, ALIGNMENTS)
    _check_choice("metric", metric, METRICS)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise UsageError("images must be a tensor of shape (N, C, H, W)")
    if images.shape[0] == 0:
        raise UsageError("no images to measure")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if border < 0:
        raise UsageError(f"border must be >= 0, got {border}")
    if grid is None:
        grid = ShiftGrid.square(8) if mode == "circular" else ShiftGrid.symmetric(4)
    if mode == "crop":
        margin = int(math.ceil(grid.max_abs)) if margin is None else int(margin)
        if grid.max_abs > margin:
            raise UsageError(f"the grid shifts up to {grid.max_abs:g} px but the crop margin is"
                             f" {margin} px; use a smaller grid or load images with a larger margin")
    else:
        margin = 0
    height, width = images.shape[-2] - 2 * margin, images.shape[-1] - 2 * margin
    if height < 1 or width < 1:
        raise UsageError(f"images of {images.shape[-2]} px cannot hold a crop margin of {margin} px")

    if distributed.active() and (device is None or str(device) == "auto"):
        device = distributed.local_device()
    device = resolve_device(device)
    autocast = _autocast(dtype, device)
    model = model.to(device)
    infos = probe_layers(model, (height, width), layers, channels=images.shape[1], device=device)
    if not infos:
        raise UsageError("no layer produced a tensor output; check the layer filter")
    settings = Settings(grid=grid, mode=mode, align=align, metric=metric, size=(height, width),
                        margin=margin, border=border,
                        layers=_describe_selection(layers))
    run = _Run(model, infos, settings, layers, device, autocast)
    started = time.perf_counter()
    n_total = len(images)
    # under torchrun each rank takes every world_size-th image; sums are all-reduced below
    mine = images[distributed.shard(n_total)] if distributed.active() else images
    images_per_batch, shifts_per_pass = batch_layout(len(mine), batch_size)
    progress_file = _Progress(checkpoint, settings, infos, images, images_per_batch) if checkpoint else None
    if progress_file is not None and distributed.active():
        raise UsageError("checkpoint/resume is not supported under torchrun; run single-process")
    done = progress_file.restore(run) if (progress_file is not None and resume) else 0
    n_batches = math.ceil(len(mine) / images_per_batch)
    n_passes = n_batches * math.ceil(len(run.forward_shifts) / shifts_per_pass)
    show = (None if progress is None else progress) if distributed.is_main() else False
    bar = tqdm(total=n_passes, desc="measuring", unit="pass", disable=None if show is None
               else not show, leave=False)
    with bar:
        bar.update(done // images_per_batch * math.ceil(len(run.forward_shifts) / shifts_per_pass))
        for start in range(done, len(mine), images_per_batch):
            run.image_batch(mine[start:start + images_per_batch], shifts_per_pass, bar)
            if progress_file is not None:
                progress_file.save(run, start + images_per_batch)
    run.all_reduce()
    if progress_file is not None:
        progress_file.remove()
    meta = {**(meta or {}), **({"dtype": dtype} if dtype else {})}
    return run.result(n_total, time.perf_counter() - started, meta)


def _autocast(dtype: Optional[str], device: torch.device):
    """A factory of autocast contexts for the forward passes (or of no-ops for float32)."""
    if dtype in (None, "float32"):
        return contextlib.nullcontext
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in choices:
        raise UsageError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if device.type == "cpu" and dtype == "float16":
        raise UsageError("float16 autocast needs a GPU; use --dtype bfloat16 on CPU")
    return lambda: torch.autocast(device.type, dtype=choices[dtype])


def _describe_selection(layers: LayerSelection) -> Optional[tuple[str, ...]]:
    if layers is None:
        return None
    if isinstance(layers, (str, type)):
        layers = [layers]
    return tuple(item if isinstance(item, str) else item.__name__ for item in layers)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Images (B, C, H, W) on ``device``; to a GPU through pinned memory, without waiting.

    A copy from pageable memory makes the host wait for it; from pinned memory it is queued and
    the host goes on preparing the next inputs.
    """
    if device.type == "cuda" and images.device.type == "cpu":
        if not images.is_pinned():
            images = images.pin_memory()
        return images.to(device, non_blocking=True)
    return images.to(device)


class _Run:
    """State of one measurement: hooks' targets, per-layer plans and accumulators."""

    def __init__(self, model: nn.Module, infos: list[LayerInfo], settings: Settings,
                 layers: LayerSelection, device: torch.device, autocast: Callable) -> None:
        self.model, self.infos, self.settings, self.device = model, infos, settings, device
        self.autocast = autocast
        # comparisons run in float32 even when the forward runs under autocast
        self.full_precision = contextlib.nullcontext if autocast is contextlib.nullcontext \
            else (lambda: torch.autocast(device.type, enabled=False))
        self.selection = layers
        self.info = {info.name: info for info in infos}
        shifts = torch.tensor(settings.grid.shifts, dtype=torch.float64)
        self.shifts = shifts
        is_zero = (shifts == 0).all(1)
        # T_0 is the identity: the zero shift reuses the reference features instead of a
        # forward that could differ from them only by batch-size-dependent rounding.
        self.zero_index = torch.nonzero(is_zero).flatten()
        self.forward_index = torch.nonzero(~is_zero).flatten()
        self.forward_shifts = shifts[self.forward_index]
        # sums stay on the device; they reach the host only for the result and checkpoints
        self.sums = DistanceAccumulator(len(shifts), device, n_layers=len(infos))
        self.position = {info.name: i for i, info in enumerate(infos)}
        # one forward pass's statistics, reduced to distances together when the pass ends
        self.pending: list[tuple[str, ComparisonStats]] = []
        self.pending_key: object = None
        self.flat_index: dict[tuple, torch.Tensor] = {}
        self.plans: dict[tuple, Plan] = {}
        self.workspace = Workspace()  # scratch shared by every layer's comparisons
        self.need_peak = settings.metric == "psnr"
        self.references: dict[str, torch.Tensor] = {}
        # per-layer values derived from the reference (filtered maps, norms), per image batch
        self.caches: dict[str, dict] = {}
        self._phase: Callable[[str, torch.Tensor], None] = self._ignore
        self._batch = 0  # inputs in the forward pass under way

    # -- hooks -----------------------------------------------------------------------
    @staticmethod
    def _ignore(layer: str, tensor: torch.Tensor) -> None:
        return None

    def _on_output(self, layer: str, tensor: torch.Tensor) -> None:
        if layer in self.info and tensor.is_floating_point():
            if tensor.dim() == 0 or tensor.shape[0] != self._batch:
                raise ModelError(f"layer {layer} gave a first dimension of {tuple(tensor.shape)[:1]}"
                                 f" for a batch of {self._batch}; its output is not per image:"
                                 " leave it out with --layers")
            with self.full_precision():
                self._phase(layer, as_feature_map(tensor, self.info[layer]))

    def _store_reference(self, layer: str, tensor: torch.Tensor) -> None:
        # clone: a later in-place op (ReLU(inplace=True)) would overwrite this very tensor
        reference = tensor.detach().float().clone()
        expected = self.info[layer].shape
        if tuple(reference.shape[1:]) != expected:
            raise ModelError(f"layer {layer} gave shape {tuple(reference.shape[1:])} but"
                             f" {expected} when probed; shiftlab needs a deterministic architecture")
        self.references[layer] = reference
        if len(self.zero_index):
            self._compare(layer, reference[None], self.zero_index, "zero")

    def _compare(self, layer: str, shifted: torch.Tensor, index: torch.Tensor, key: object) -> None:
        """Reduce one layer's shifted run (S, B, C, h, w) to statistics, kept until the pass ends.

        ``index`` (S,) on the CPU: the shifts of this pass. Nothing here waits for the device.
        """
        info = self.info[layer]
        reference = self.references[layer]
        if info.is_spatial:
            # a plan depends on the stride, the map size and the shifts only: layers of the same
            # geometry share one (ResNet-50: 158 layers, a handful of plans per chunk)
            plan_key = (info.stride, info.shape[1:], key)
            plan = self.plans.get(plan_key)
            if plan is None:
                plan = make_plan(info, self.shifts[index], self.settings.mode, self.settings.align,
                                 self.settings.border, self.need_peak)
                self.plans[plan_key] = plan
            stats = plan.compare(reference, shifted, self.caches.setdefault(layer, {}), self.workspace)
        else:
            stats = compare_global(reference, shifted, self.need_peak)
        self.pending.append((layer, stats))
        self.pending_key = (key, index)

    def _flush(self) -> None:
        """Distances of every layer of the pass that just ended, into the sums: a few operations
        per pass instead of per layer."""
        if not self.pending:
            return
        layers = tuple(layer for layer, _ in self.pending)
        key, index = self.pending_key
        flat = self.flat_index.get((key, layers))
        if flat is None:  # the sums' flat positions of (layer, shift), built once per pass kind
            n_shifts = len(self.shifts)
            flat = torch.cat([index + self.position[layer] * n_shifts for layer in layers])
            flat = self.flat_index[(key, layers)] = flat.to(self.device, non_blocking=True)
        stats = concat([item for _, item in self.pending])
        self.pending.clear()
        self.sums.add(flat, distance(stats, self.settings.metric), stats.valid)

    # -- passes ----------------------------------------------------------------------
    def image_batch(self, images: torch.Tensor, shifts_per_pass: int, bar: tqdm) -> None:
        """Reference pass and shifted passes of one batch of images (B, C, H, W)."""
        images = to_device(images, self.device)
        margin = self.settings.margin
        capture = LayerCapture(self.model, self.selection, self._on_output)
        with capture, torch.inference_mode(), self.autocast():
            self._phase = self._store_reference
            self._batch = len(images)
            try:
                self.model(centre_window(images, margin) if self.settings.mode == "crop" else images)
                self._flush()
                for chunk, start in enumerate(range(0, len(self.forward_shifts), shifts_per_pass)):
                    window = slice(start, start + shifts_per_pass)
                    shifts, index = self.forward_shifts[window], self.forward_index[window]
                    batch = apply_shifts(images, shifts, self.settings.mode, margin)
                    count = batch.shape[0]
                    self._phase = self._shifted_phase(index, count, chunk)
                    self._batch = count * len(images)
                    self.model(batch.reshape(-1, *batch.shape[2:]))
                    self._flush()
                    bar.update(1)
            finally:
                self._phase = self._ignore
                self.pending.clear()
                self.references.clear()
                self.caches.clear()

    def _shifted_phase(self, index: torch.Tensor, count: int, chunk: int) -> Callable:
        def on_shifted(layer: str, tensor: torch.Tensor) -> None:
            shifted = tensor.detach().float()
            shifted = shifted.reshape(count, -1, *shifted.shape[1:])
            self._compare(layer, shifted, index, chunk)
        return on_shifted

    def all_reduce(self) -> None:
        """Sum every accumulator over the ranks of a torchrun job (no-op otherwise)."""
        if distributed.active():
            distributed.all_reduce_sum([getattr(self.sums, name) for name in self.sums.FIELDS])

    def result(self, n_images: int, seconds: float, meta: dict) -> Result:
        sums = self.sums  # (layers, shifts), in the order of self.infos
        stack = lambda name: (getattr(sums, name)() if name in ("mean", "std")  # noqa: E731
                              else getattr(sums, name)).cpu().numpy()
        meta = {
            **meta, "n_images": n_images, "seconds": round(seconds, 3),
            "device": str(self.device), "shiftlab": __version__, "torch": torch.__version__,
            "python": platform.python_version(),
        }
        return Result(self.settings, list(self.infos), stack("mean"), stack("std"), stack("n"),
                      stack("n_inf"), stack("n_nan"), meta)


class _Progress:
    """Atomic progress checkpoints of a run: accumulators after each completed image batch."""

    def __init__(self, path, settings: Settings, infos: list[LayerInfo], images: torch.Tensor,
                 images_per_batch: int) -> None:
        import hashlib
        import json
        from pathlib import Path

        self.path = Path(path)
        digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        self.key = json.dumps({"settings": settings.to_dict(), "layers": [i.name for i in infos],
                               "images": digest, "batch": images_per_batch}, sort_keys=True)

    def save(self, run: "_Run", n_done: int) -> None:
        import numpy as np

        from .files import atomic_write

        arrays = {"key": np.array(self.key), "done": np.array(n_done)}
        sums = {name: getattr(run.sums, name).cpu().numpy() for name in run.sums.FIELDS}  # one copy
        for index in range(len(run.infos)):
            for name in run.sums.FIELDS:
                arrays[f"{index}.{name}"] = sums[name][index]
        atomic_write(self.path, lambda handle: np.savez(handle, **arrays))

    def restore(self, run: "_Run") -> int:
        """Load the accumulators; returns how many images were already done (0 if no file)."""
        import numpy as np

        if not self.path.is_file():
            return 0
        try:
            with np.load(self.path, allow_pickle=False) as data:
                if str(data["key"]) != self.key:
                    raise UsageError(f"{self.path} belongs to a run with other settings or images;"
                                     " delete it or rerun without --resume")
                for index in range(len(run.infos)):
                    for name in run.sums.FIELDS:
                        getattr(run.sums, name)[index].copy_(torch.from_numpy(data[f"{index}.{name}"]))
                return int(data["done"])
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot resume from {self.path} ({type(exc).__name__}); delete it and"
                             " start again") from exc

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
