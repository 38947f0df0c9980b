"""measure(): one reference pass per image batch, then the shifted copies in batches.

Each layer is reduced to a few sums per (shift, image) inside its forward hook, so nothing but
the reference features of the current image batch is kept: peak memory depends on the batch
size and the model, never on the number of shifts. The sums of all layers become distances in
one step when the pass ends, and accumulate on the device: on a GPU nothing in a pass waits for
the device (images come through pinned memory), and results reach the host once, at the end.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
import warnings
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # plain bar: tqdm.auto warns in notebooks without ipywidgets

from .. import distributed
from .align import Plan, compare_global, make_plan
from .capture import LayerCapture, LayerSelection
from ..checks import (batch_layout, check_dtype, check_model_has_data, check_request, count_passes,
                     labelled_batches, window_size)
from ..defaults import BATCH_SIZE
from ..errors import ModelError, UsageError
from .geometry import LayerInfo, as_feature_map, probe_layers
from .metrics import ComparisonStats, DistanceAccumulator, concat, distance
from ..results.progress import RunProgress, check_progress_path
from ..results.provenance import InputDigest, Provenance, versions
from ..results.result import Result, Settings
from .shifts import ShiftGrid, apply_shifts, centre_window
from .stencil import Workspace


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """'auto' -> CUDA when available (under torchrun: this rank's GPU), else CPU; anything else
    is passed to ``torch.device``."""
    if device is None or str(device) == "auto":
        if distributed.active():
            return distributed.local_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r} cannot run a measurement; use auto, cpu, cuda or cuda:N")
    return resolved


Images = Union[torch.Tensor, Iterable]


def measure(model: nn.Module, images: Images, grid: Optional[ShiftGrid] = None, *,
            mode: str = "circular", align: str = "bilinear", metric: str = "cosine",
            layers: LayerSelection = None, margin: Optional[int] = None, border: int = 0,
            batch_size: int = BATCH_SIZE, device: Union[str, torch.device, None] = "auto",
            dtype: Optional[str] = None, progress: Optional[bool] = None,
            provenance: Optional[Provenance] = None, meta: Optional[dict] = None,
            checkpoint: Union[str, "os.PathLike", None] = None, resume: bool = False,
            resume_key: Optional[dict] = None, keep_checkpoint: bool = False) -> Result:
    """Equivariance distance of every layer for every shift of ``grid``.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W). It is moved to ``device`` and run in eval
            mode; its previous mode is restored afterwards (a warning says when it was training).
        images: (N, C, H, W) in circular mode; in crop mode the canvases (N, C, H+2m, W+2m)
            whose centre window is the unshifted image (``margin`` m defaults to the grid's
            largest |shift|, rounded up). Or an iterable of such batches (a DataLoader of
            images, or of (images, labels) pairs): streamed, never all in memory.
        grid: the shifts; default ``defaults.default_grid(mode)`` (8×8 circular, -4..4 crop).
        mode: 'circular' (torch.roll, the paper's per-layer protocol) or 'crop' (no wrap-around).
        align: 'bilinear' (default, the paper's), 'exact' (NaN where the stride does not divide
            the shift) or 'fourier'.
        metric: 'cosine' (default), 'l2' (relative) or 'psnr' (dB).
        layers: None (every leaf module) or glob patterns / module types ('type:MaxPool2d').
        border: crop mode: input pixels excluded at every edge of the compared region.
        batch_size: inputs per forward pass (images × shifts).
        device: 'auto', 'cpu', 'cuda', ...; progress: tqdm bar (None: only on a terminal).
        dtype: None (float32) or 'bfloat16' / 'float16': autocast for the forward passes only;
            feature maps are compared in float32 and accumulated in float64.
        provenance: where the model and images came from (``shiftlab.runs`` fills it); the
            engine adds what it measured (number of images, seconds, device, an input digest).
        meta: extra free-form metadata, kept in ``provenance.extra``.
        checkpoint: a file where progress is saved atomically after every image batch; with
            ``resume=True`` a run continues from it (same model, settings and images required,
            else UsageError naming what differs) and gives the same numbers as an
            uninterrupted run. ``resume_key``: extra identity of the run (the pipeline passes
            the model spec, seed and weights) checked on resume. Tensors only. The file is
            removed when the run completes, unless ``keep_checkpoint`` (the CLI removes it only
            once every output file is in place, so an interrupt while writing loses nothing).

    Returns:
        A ``Result`` with per-layer mean/std maps over images.

    Example:
        A circular convolution (exactly equivariant) then a max-pool (exact at even shifts):

        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
        ...                     nn.MaxPool2d(2)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> result = shiftlab.measure(net, images, ShiftGrid.square(4))
        >>> float(result.map("0").max())
        0.0
        >>> result.map("1").round(3)
        array([[0.   , 0.082, 0.   , 0.082],
               [0.102, 0.128, 0.102, 0.128],
               [0.   , 0.082, 0.   , 0.082],
               [0.102, 0.128, 0.102, 0.128]])
    """
    grid, margin = check_request(mode=mode, grid=grid, margin=margin, batch_size=batch_size,
                                 align=align, metric=metric, border=border)
    check_dtype(dtype or "float32")
    streamed = not isinstance(images, torch.Tensor)
    if streamed and checkpoint is not None:
        raise UsageError("checkpoint/resume needs the images as one tensor; streamed sources are"
                         " not resumable")
    if checkpoint is not None:
        check_progress_path(checkpoint)  # a folder of that name: refused before any work
    batches = (tensor for tensor, _ in labelled_batches(images))
    first = next(batches, None)
    if first is None:
        raise UsageError("no images to measure")
    height, width = window_size(first.shape, margin)

    device = resolve_device(device)
    autocast = _autocast(dtype, device)
    named = provenance or Provenance.from_meta(meta or {})  # names the model in the warning
    check_model_has_data(model, named.label or named.model or None)
    with evaluation_mode(model, named.label or named.model or None):
        model = model.to(device)
        infos = probe_layers(model, (height, width), layers, channels=first.shape[1], device=device)
        if not infos:
            raise UsageError("no layer produced a tensor output; check the layer filter")
        settings = Settings(grid=grid, mode=mode, align=align, metric=metric, size=(height, width),
                            margin=margin, border=border, layers=_describe_selection(layers),
                            padding=getattr(model, "shiftlab_padding", "as-trained"),
                            dtype=dtype or "float32")
        run = _Run(model, infos, settings, layers, device, autocast)
        started = time.perf_counter()
        digest = InputDigest()
        if streamed:
            n_total = _measure_stream(run, itertools.chain([first], batches), batch_size, progress,
                                      digest)
        else:
            n_total = _measure_tensor(run, images, batch_size, progress, checkpoint, resume,
                                      resume_key, digest, keep_checkpoint)
        run.all_reduce()
    if provenance is None and meta:
        provenance, meta = Provenance.from_meta(meta), None
    provenance = (provenance or Provenance()).replace(
        n_images=n_total, seconds=round(time.perf_counter() - started, 3), device=str(device),
        versions=versions(), input_digest=digest.hexdigest())
    if meta:
        provenance = provenance.replace(extra={**provenance.extra, **meta})
    return run.result(provenance)


def _measure_tensor(run: "_Run", images: torch.Tensor, batch_size: int, progress: Optional[bool],
                    checkpoint, resume: bool, resume_key: Optional[dict], digest: InputDigest,
                    keep_checkpoint: bool) -> int:
    """All image batches of one tensor, with optional progress checkpoints; returns N."""
    n_total = len(images)
    digest.update(images)
    # under torchrun each rank takes every world_size-th image; sums are all-reduced after
    mine = images[distributed.shard(n_total)] if distributed.active() else images
    images_per_batch, shifts_per_pass = batch_layout(len(mine), batch_size)
    progress_file = None
    if checkpoint is not None:
        if distributed.active():
            raise UsageError("checkpoint/resume is not supported under torchrun; run single-process")
        # the input digest of the provenance is the checkpoint's image key: one hash, not two
        progress_file = RunProgress(checkpoint, run.settings, run.infos, digest.hexdigest(),
                                    images_per_batch, run.model, resume_key)
    done = progress_file.restore(run.sums) if (progress_file is not None and resume) else 0
    per_batch = math.ceil(len(run.forward_shifts) / shifts_per_pass)
    bar = _bar(count_passes(len(mine), len(run.forward_shifts), batch_size, reference=False),
               progress)
    with bar:
        bar.update(done // images_per_batch * per_batch)
        for start in range(done, len(mine), images_per_batch):
            run.image_batch(mine[start:start + images_per_batch], shifts_per_pass, bar)
            if progress_file is not None:
                progress_file.save(run.sums, start + images_per_batch)
    if progress_file is not None and not keep_checkpoint:
        progress_file.remove()
    return n_total


def _measure_stream(run: "_Run", batches: Iterator[torch.Tensor], batch_size: int,
                    progress: Optional[bool], digest: InputDigest) -> int:
    """Image batches of any size from an iterable, re-chunked to ``batch_size``; returns N.

    The layout (images per batch, shifts per pass) is fixed by the first batch, as for a tensor:
    the passes' plans are cached by their position in the grid, so it must not change.
    """
    n_total, index, layout = 0, 0, None
    canvas = _canvas_shape(run)
    bar = _bar(None, progress, unit="image")
    with bar:
        for batch in batches:
            if tuple(batch.shape[-2:]) != canvas:
                raise UsageError(f"a streamed batch has size {tuple(batch.shape[-2:])}, the first had"
                                 f" {canvas}; every image must have the same size")
            digest.update(batch)
            n_total += len(batch)
            if distributed.active():  # every world_size-th image of the stream is this rank's
                keep = distributed.owned(np.arange(index, index + len(batch)))
                index += len(batch)
                batch = batch[torch.from_numpy(keep)]
                if not len(batch):
                    continue
            layout = layout or batch_layout(len(batch), batch_size)
            images_per_batch, shifts_per_pass = layout
            for start in range(0, len(batch), images_per_batch):
                chunk = batch[start:start + images_per_batch]
                run.image_batch(chunk, shifts_per_pass, _NoBar())
                bar.update(len(chunk))
    return n_total


def _canvas_shape(run: "_Run") -> tuple[int, int]:
    margin = run.settings.margin
    return (run.settings.size[0] + 2 * margin, run.settings.size[1] + 2 * margin)


class _NoBar:
    def update(self, _: int) -> None:
        return None


def _bar(total: Optional[int], progress: Optional[bool], unit: str = "pass") -> tqdm:
    show = progress if distributed.is_main() else False
    return tqdm(total=total, desc="measuring", unit=unit, disable=None if show is None else not show,
                leave=False)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, name: Optional[str] = None) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode inside the block and give every module its own previous mode
    back afterwards (in ``finally``, even when the block raises); warn when it was training.

    Dropout and BatchNorm's batch statistics make a training-mode output random and change the
    running statistics, so a number measured that way means nothing. The warning names the
    model ``name`` (default: its class) and points at the caller of the function whose body
    holds the ``with`` (``measure``, ``measure_invariance``, the protocols): use it directly
    there, not through a helper.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).eval()
    >>> _ = net[1].train()                                  # one module left in train mode
    >>> with evaluation_mode(net, "tiny"):
    ...     net[1].training
    False
    >>> net[1].training                                     # its own mode back afterwards
    True
    """
    modes = [(module, module.training) for module in model.modules()]
    if model.training:
        # 1: here, 2: contextlib's __enter__, 3: the with statement, 4: the user's call
        warnings.warn(f"{name or type(model).__name__} was in train mode: measured in eval mode"
                      " (no dropout, BatchNorm running statistics), train mode restored after",
                      stacklevel=4)
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


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
        self.forward_index = self._phase_order(torch.nonzero(~is_zero).flatten())
        self.forward_shifts = shifts[self.forward_index]
        # sums stay on the device; they reach the host only for the result and checkpoints
        self.sums = DistanceAccumulator(len(shifts), device, n_layers=len(infos))
        self.position = {info.name: i for i, info in enumerate(infos)}
        # one forward pass's statistics, reduced to distances together when the pass ends
        self.pending: list[tuple[str, ComparisonStats, object, torch.Tensor]] = []
        self.flat_index: dict[tuple, torch.Tensor] = {}
        self.plans: dict[tuple, Plan] = {}
        self.workspace = Workspace()  # scratch shared by every layer's comparisons
        self.need_peak = settings.metric == "psnr"
        self.references: dict[str, torch.Tensor] = {}
        # per-layer values derived from the reference (filtered maps, norms), per image batch
        self.caches: dict[str, dict] = {}
        self._phase: Callable[[str, torch.Tensor], None] = self._ignore
        self._batch = 0  # inputs in the forward pass under way

    def _phase_order(self, index: torch.Tensor) -> torch.Tensor:
        """The shifts in the order of their phase, d mod s, for each layer stride s (smallest
        first): shifts of one phase then share a forward pass, and a bilinear plan filters the
        reference once per phase and pass (for powers of two, every stride's phases are runs).
        """
        strides = sorted({round(s) for info in self.infos if info.is_spatial for s in info.stride
                          if s > 1 and abs(s - round(s)) < 1e-6})
        if not strides:
            return index
        shifts = self.shifts[index].tolist()
        key = lambda i: tuple((dh % s, dw % s) for s in strides for dh, dw in [shifts[i]])  # noqa: E731
        return index[sorted(range(len(index)), key=key)]

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
        self.pending.append((layer, stats, key, index))

    def _flush(self) -> None:
        """Distances of every layer of the pass that just ended, into the sums: a few operations
        per pass instead of per layer."""
        if not self.pending:
            return
        layers = tuple((layer, key) for layer, _, key, _ in self.pending)
        flat = self.flat_index.get(layers)
        if flat is None:  # the sums' flat positions of (layer, shift), built once per pass kind
            n_shifts = len(self.shifts)
            flat = torch.cat([index + self.position[layer] * n_shifts
                              for layer, _, _, index in self.pending])
            flat = self.flat_index[layers] = flat.to(self.device, non_blocking=True)
        stats = concat([item for _, item, _, _ in self.pending])
        self.pending.clear()
        self.sums.add(flat, distance(stats, self.settings.metric), stats.valid)

    # -- passes ----------------------------------------------------------------------
    def image_batch(self, images: torch.Tensor, shifts_per_pass: int, bar: tqdm) -> None:
        """Reference pass and shifted passes of one batch of images (B, C, H, W)."""
        images = to_device(images, self.device)
        margin = self.settings.margin
        capture = LayerCapture(self.model, self.selection, self._on_output)
        reference = centre_window(images, margin) if self.settings.mode == "crop" else images
        with capture, torch.inference_mode(), self.autocast():
            try:
                pending_reference = True
                for chunk, (start, stop) in enumerate(self._chunks(shifts_per_pass)):
                    shifts, index = self.forward_shifts[start:stop], self.forward_index[start:stop]
                    batch = apply_shifts(images, shifts, self.settings.mode, margin)
                    count = batch.shape[0]
                    batch = batch.reshape(-1, *batch.shape[2:])
                    # within the batch size only: a pass that left room for the reference
                    joined = (pending_reference and count < shifts_per_pass
                              and batch.shape[1:] == reference.shape[1:])
                    if pending_reference and not joined:
                        self._reference_pass(reference)
                    if joined:  # the reference rides with the first shifts: one pass fewer
                        batch = torch.cat([reference, batch])
                    pending_reference = False
                    self._phase = self._shifted_phase(index, count, chunk,
                                                      len(images) if joined else 0)
                    self._batch = len(batch)
                    self.model(batch)
                    self._flush()
                    bar.update(1)
                if pending_reference:
                    self._reference_pass(reference)
            finally:
                self._phase = self._ignore
                self.pending.clear()
                self.references.clear()
                self.caches.clear()

    def _chunks(self, shifts_per_pass: int) -> list[tuple[int, int]]:
        """[start, stop) of the forward shifts per pass. The first pass also carries the
        reference images, so with a zero shift it takes one shift fewer (the floor's layout:
        every batch full) unless that would add a pass."""
        total = len(self.forward_shifts)
        first = shifts_per_pass
        if len(self.zero_index) and shifts_per_pass > 1 and total >= shifts_per_pass and (
                1 + math.ceil((total - shifts_per_pass + 1) / shifts_per_pass)
                == math.ceil(total / shifts_per_pass)):
            first = shifts_per_pass - 1
        starts = [0] + list(range(first, total, shifts_per_pass)) if total else []
        return [(start, min(total, start + (first if start == 0 else shifts_per_pass)))
                for start in starts]

    def _reference_pass(self, reference: torch.Tensor) -> None:
        self._phase = self._store_reference
        self._batch = len(reference)
        self.model(reference)
        self._flush()

    def _shifted_phase(self, index: torch.Tensor, count: int, chunk: int,
                       n_reference: int = 0) -> Callable:
        def on_shifted(layer: str, tensor: torch.Tensor) -> None:
            if n_reference:  # the first n_reference maps are the reference's
                self._store_reference(layer, tensor[:n_reference])
                tensor = tensor[n_reference:]
            shifted = tensor.detach().float()
            shifted = shifted.reshape(count, -1, *shifted.shape[1:])
            self._compare(layer, shifted, index, chunk)
        return on_shifted

    def all_reduce(self) -> None:
        """Sum every accumulator over the ranks of a torchrun job (no-op otherwise)."""
        if distributed.active():
            distributed.all_reduce_sum([getattr(self.sums, name) for name in self.sums.FIELDS])

    def result(self, provenance: Provenance) -> Result:
        sums = self.sums  # (layers, shifts), in the order of self.infos
        stack = lambda name: (getattr(sums, name)() if name in ("mean", "std")  # noqa: E731
                              else getattr(sums, name)).cpu().numpy()
        return Result(self.settings, list(self.infos), stack("mean"), stack("std"), stack("n"),
                      stack("n_inf"), stack("n_nan"), provenance)
