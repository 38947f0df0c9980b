"""The pipeline the CLI, the notebooks and API users share: spec → model → images → result.

Each step is a public function, so a notebook does exactly what ``shiftlab heatmap`` does:

>>> loaded = build_model("vgg16", weights="none", seed=0)            # doctest: +SKIP
>>> grid, margin = shift_plan(max_shift=8, mode="circular", size=112)  # doctest: +SKIP
>>> inputs = load_inputs(loaded, size=112, margin=margin)           # doctest: +SKIP
>>> result = heatmap("vgg16", weights="none")                        # doctest: +SKIP

``heatmap`` and ``consistency`` chain the steps and fill the result's typed ``Provenance``
(model spec, weights, seed, padding, antialiasing, image names and content hashes, versions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .checks import check_choice, resolve_margin
from .data.images import LoadedImages, find_images, image_digest, load_images, sample_image_paths
from .defaults import (BATCH_SIZE, MAX_SHIFT, PADDINGS, PAIRS, PROTOCOLS, SIZE, default_resize,
                       make_grid)
from .errors import UsageError
from .models.zoo import LoadedModel
from .models.padding import has_zero_padding
from .models.checkpoints import state_dict_fingerprint
from .results.provenance import Provenance, as_tuple
from .results.result import Result
from .measure.shifts import MODES, ShiftGrid

#: the largest canvas side (input + 2 × crop margin) the pipeline decodes images to
MAX_CANVAS = 4096

PathLike = Union[str, Path]


def build_model(spec: str, weights: str = "auto", *, seed: int = 0, antialias: Optional[int] = None,
                padding: str = "as-trained", num_classes: Optional[int] = None,
                trust_checkpoint: bool = False, weights_key: Optional[str] = None,
                mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> LoadedModel:
    """Load ``NAME[+aaK][@WEIGHTS]`` with seeded random init, then antialias and pad as asked.

    Args:
        spec: torchvision name, ``file.py:factory``, ``package.module:factory`` or
            ``timm:NAME``, optionally ``+aaK`` (BlurPool version) and ``@WEIGHTS``.
        weights: 'auto', 'none', a torchvision weights name or a checkpoint file (when the spec
            has no ``@WEIGHTS``).
        seed: seeds random-init weights, so a figure is reproducible.
        antialias: filter size K: also convert to the BlurPool version (weights copied).
        padding: 'as-trained' or 'circular' (every zero padding made circular: the diagnostic
            that separates boundary effects from aliasing under circular shifts).
        mean, std: the input normalisation, when the weights were not trained with ImageNet's.

    Example:
        >>> build_model("resnet18", weights="none", padding="circular").name   # doctest: +SKIP
        'resnet18'
    """
    from .models.variants import load_variant

    check_choice("padding", padding, PADDINGS)
    if isinstance(seed, bool) or not isinstance(seed, int) or abs(seed) >= 2**63:
        raise UsageError(f"seed must be a whole number below 2**63, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random-init weights are the same in every run
        kwargs = {"weights_key": weights_key} if weights_key else {}
        loaded = load_variant(spec, weights, filt_size=antialias, trust_checkpoint=trust_checkpoint,
                              num_classes=num_classes, **kwargs)
    if padding == "circular":
        from .models.padding import circular_padding

        model = circular_padding(loaded.model)
        model.shiftlab_padding = "circular"  # measure() records it in the Settings
        loaded = dataclasses.replace(loaded, model=model)
    if mean is not None or std is not None:
        loaded = dataclasses.replace(loaded, mean=_channels(mean, loaded.mean, "mean"),
                                     std=_channels(std, loaded.std, "std"))
    return loaded


def _channels(values: Optional[Sequence[float]], default: Sequence[float], name: str) -> tuple:
    if values is None:
        return tuple(default)
    values = tuple(float(v) for v in values)
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values) or \
            (name == "std" and any(v <= 0 for v in values)):
        raise UsageError(f"--{name} takes 1 or 3 finite numbers{' > 0' if name == 'std' else ''},"
                         f" got {values}")
    return values * 3 if len(values) == 1 else values


def shift_plan(*, grid: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1,
               mode: str = "circular", size: int = SIZE,
               resize: Optional[int] = None) -> tuple[ShiftGrid, int]:
    """The shift grid and crop margin of a request, checked before anything is loaded.

    Circular shifts must stay below the image size (a shift by the size is no shift); crop
    mode needs ``resize`` to leave a margin of the largest |shift| around the window.

    >>> shift_plan(grid="symmetric", max_shift=2, mode="crop", size=32, resize=40)[1]
    2
    """
    check_choice("mode", mode, MODES)
    if mode == "crop" and size + 2 * max_shift > MAX_CANVAS:
        raise UsageError(f"--max-shift {max_shift} in crop mode needs a canvas of"
                         f" {size + 2 * max_shift} px, above the limit of {MAX_CANVAS} px; use a"
                         " smaller --max-shift")
    shifts = make_grid(grid, max_shift, subpixel)
    if mode != "crop":
        if shifts.max_abs >= size:
            raise UsageError(
                f"--max-shift {max_shift} gives shifts up to {shifts.max_abs:g} px, but circular"
                f" shifts of a {size} px image repeat every {size} px; use a --max-shift below"
                f" {size} (or --size above {shifts.max_abs:g})")
        return shifts, 0
    margin = resolve_margin(shifts.max_abs, mode, None)
    available = ((resize or default_resize(size)) - size) // 2
    if resize is None:
        return shifts, margin  # the default resize grows to fit the margin
    if margin > available:
        raise UsageError(
            f"--max-shift {max_shift} needs a crop margin of {margin} px but resizing to {resize}"
            f" leaves {available} px around the {size} px window; use --resize {size + 2 * margin}"
            " or a smaller --max-shift")
    return shifts, margin


def image_paths(sources: Sequence[PathLike] = (), max_images: Optional[int] = None) -> list[Path]:
    """The image files of ``sources`` (files or folders; default the shipped sample photos)."""
    paths: list[Path] = []
    for source in (list(sources) or sample_image_paths()):
        paths += find_images(source)
    return paths[:max_images] if max_images else paths


def load_inputs(loaded: LoadedModel, *, images: Sequence[PathLike] = (),
                max_images: Optional[int] = None, size: int = SIZE, resize: Optional[int] = None,
                margin: int = 0) -> LoadedImages:
    """The images as one normalised (N, 3, size + 2·margin, ...) tensor, with the model's mean
    and std; unreadable files are skipped with a warning naming each."""
    if loaded.min_size and size < loaded.min_size:
        raise UsageError(f"{loaded.name} needs inputs of at least {loaded.min_size} px; use --size"
                         f" {loaded.min_size} or more")
    if resize is not None and resize > MAX_CANVAS:
        raise UsageError(f"--resize {resize} is above the limit of {MAX_CANVAS} px")
    paths = image_paths(images, max_images)
    loaded_images = load_images(paths, size, margin=margin, mean=loaded.mean, std=loaded.std,
                                resize=resize or default_resize(size, margin))
    for path, reason in loaded_images.skipped:
        warnings.warn(f"skipped {path}: {reason}", stacklevel=2)
    return loaded_images


def provenance_for(loaded: LoadedModel, spec: str, inputs: Optional[LoadedImages] = None, *,
                   seed: int = 0, antialias: Optional[int] = None, resize: Optional[int] = None,
                   label: Optional[str] = None, labels: Optional[str] = None) -> Provenance:
    """The typed provenance of a pipeline run (the engine adds timing, device, versions)."""
    paths = list(inputs.paths) if inputs is not None else []
    return Provenance(
        model=loaded.name, label=label or loaded.name, weights=str(loaded.weights),
        pretrained=bool(loaded.pretrained), seed=seed, antialias=antialias,
        model_fingerprint=state_dict_fingerprint(loaded.model),
        images=tuple(p.name for p in paths), image_digests=tuple(image_digest(p) for p in paths),
        resize=resize, mean=as_tuple(loaded.mean), std=as_tuple(loaded.std), labels=labels,
        extra={"spec": spec, "zero_padded": has_zero_padding(loaded.model)})


def resume_identity(provenance: Provenance, padding: str, dtype: str) -> dict:
    """What a resumed run must share with the interrupted one, beyond settings and images."""
    return {"model": provenance.model, "weights": provenance.weights, "seed": provenance.seed,
            "antialias": provenance.antialias, "padding": padding, "dtype": dtype,
            "normalisation": [provenance.mean, provenance.std]}


def heatmap(model: str = "vgg16", *, weights: str = "auto", seed: int = 0,
            antialias: Optional[int] = None, padding: str = "as-trained",
            num_classes: Optional[int] = None, trust_checkpoint: bool = False,
            weights_key: Optional[str] = None, images: Sequence[PathLike] = (),
            max_images: Optional[int] = None, size: int = SIZE, resize: Optional[int] = None,
            grid: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1,
            mode: str = "circular", label: Optional[str] = None, dtype: str = "float32",
            checkpoint: Optional[PathLike] = None, resume: bool = False,
            keep_checkpoint: bool = False, on_ready: Optional[Callable] = None,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
            **measure_options) -> Result:
    """What ``shiftlab heatmap`` measures, as one call: returns the ``Result``.

    ``measure_options`` go to :func:`shiftlab.measure` (align, metric, layers, border,
    batch_size, device, progress). ``on_ready(loaded, inputs, grid, options)`` is called once
    the model and images are loaded, before the measurement (the CLI prints a line there).

    Example:
        >>> result = heatmap("vgg11", weights="none", size=64, max_shift=4)   # doctest: +SKIP
        >>> result.provenance.images[:2]                                       # doctest: +SKIP
        ('astronaut.jpg', 'camera.jpg')
    """
    from .measure.engine import measure

    shifts, margin = shift_plan(grid=grid, max_shift=max_shift, subpixel=subpixel, mode=mode,
                                size=size, resize=resize)
    loaded = build_model(model, weights, seed=seed, antialias=antialias, padding=padding,
                         num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                         weights_key=weights_key, mean=mean, std=std)
    inputs = load_inputs(loaded, images=images, max_images=max_images, size=size, resize=resize,
                         margin=margin)
    provenance = provenance_for(loaded, model, inputs, seed=seed, antialias=antialias,
                                resize=resize or default_resize(size, margin), label=label)
    if on_ready is not None:
        on_ready(loaded, inputs, shifts, {"size": size, "mode": mode, **measure_options})
    return measure(loaded.model, inputs.tensor, shifts, mode=mode, margin=margin,
                   dtype=None if dtype == "float32" else dtype, provenance=provenance,
                   checkpoint=checkpoint, resume=resume,
                   resume_key=resume_identity(provenance, padding, dtype),
                   keep_checkpoint=keep_checkpoint, **measure_options)


def categories(loaded: LoadedModel) -> Optional[list]:
    """The model's class names: its weights' categories, else torchvision's for that name."""
    if loaded.categories:
        return list(loaded.categories)
    from torchvision.models import get_model_weights

    from .models.variants import parse_variant

    try:
        return list(get_model_weights(parse_variant(loaded.name)[0]).DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError, TypeError):
        return None  # not a torchvision classifier: labels must be class indices


def consistency(model: str = "resnet18", *, weights: str = "auto", seed: int = 0,
                antialias: Optional[int] = None, padding: str = "as-trained",
                num_classes: Optional[int] = None, trust_checkpoint: bool = False,
                weights_key: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None, images: Sequence[PathLike] = (),
                max_images: Optional[int] = None, size: int = SIZE, resize: Optional[int] = None,
                grid: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1,
                mode: str = "circular", labels_path: Optional[PathLike] = None,
                n_pairs: int = PAIRS, protocol: str = "grid", epochs: int = 1, workers: int = 0,
                class_order: str = "auto", batch_size: int = BATCH_SIZE, device: str = "auto",
                progress: Optional[bool] = None, on_ready: Optional[Callable] = None,
                label: Optional[str] = None, checkpoint: Optional[PathLike] = None,
                resume: bool = False, **_per_layer_options):
    """What ``shiftlab consistency`` measures for one model: an ``InvarianceResult`` (protocol
    'grid': every shift of the grid on every image) or a protocol result ('zhang2019': two
    random ``size`` windows of the ``resize`` centre crop per image and epoch; 'diagonal').

    Protocols stream the images (DataLoader ``workers``), so memory does not grow with them;
    with ``checkpoint`` they save each completed epoch there and ``resume`` continues from it.
    Under ``torchrun`` every rank measures its share of the images (protocols decode only
    theirs) and every rank returns the single-process result.

    Example:
        >>> result = consistency("resnet18", weights="none", size=64, max_shift=4)  # doctest: +SKIP
        >>> result.summary()["pairwise_consistency"]                               # doctest: +SKIP
    """
    from .invariance.grid import measure_invariance
    from .data.labels import read_labels

    check_choice("protocol", protocol, PROTOCOLS)
    if protocol == "grid" and (checkpoint is not None or resume):
        raise UsageError("--resume continues the zhang2019 and diagonal protocols per epoch; the"
                         " grid protocol runs in one pass (use fewer --images per run instead)")
    loaded = build_model(model, weights, seed=seed, antialias=antialias, padding=padding,
                         num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                         weights_key=weights_key, mean=mean, std=std)
    labelled = None
    if labels_path is not None:
        # a model built with its own --num-classes has no ImageNet category names
        names = categories(loaded) if num_classes is None else None
        labelled = read_labels(labels_path, names, class_order=class_order)
        images = labelled.paths
    if protocol != "grid":
        return _protocol(loaded, model, protocol, images, labelled, size=size, resize=resize,
                         max_images=max_images, epochs=epochs, seed=seed, workers=workers,
                         batch_size=batch_size, device=device, progress=progress,
                         antialias=antialias, padding=padding, label=label, on_ready=on_ready,
                         checkpoint=checkpoint, resume=resume)
    shifts, margin = shift_plan(grid=grid, max_shift=max_shift, subpixel=subpixel, mode=mode,
                                size=size, resize=resize)
    inputs = load_inputs(loaded, images=images, max_images=max_images, size=size, resize=resize,
                         margin=margin)
    provenance = provenance_for(loaded, model, inputs, seed=seed, antialias=antialias,
                                resize=resize or default_resize(size, margin), label=label,
                                labels=str(labels_path) if labels_path else None)
    if on_ready is not None:
        on_ready(loaded, inputs, shifts, {"size": size, "mode": mode})
    return measure_invariance(
        loaded.model, inputs.tensor, shifts, mode=mode, margin=margin,
        labels=labelled.for_paths(inputs.paths) if labelled is not None else None,
        n_pairs=n_pairs, seed=seed, batch_size=batch_size, device=device, progress=progress,
        meta={**provenance.to_dict(), "padding": padding})


def _protocol(loaded: LoadedModel, spec: str, protocol: str, images, labelled, *, size: int,
              resize: Optional[int], max_images: Optional[int], epochs: int, seed: int,
              workers: int, batch_size: int, device: str, progress: Optional[bool],
              antialias: Optional[int], padding: str, label: Optional[str],
              on_ready: Optional[Callable], checkpoint: Optional[PathLike], resume: bool):
    """The paper's ImageNet protocols on a streamed source: R×R centre crops, R = resize."""
    from .invariance.protocols import consistency_protocol, diagonal_protocol
    from .data.sources import image_batches

    crop = resize or default_resize(size)
    if crop <= size:
        raise UsageError(f"--protocol {protocol} draws {size} px windows from a --resize {crop} px"
                         f" centre crop; use a --resize above --size")
    if protocol == "diagonal" and labelled is None:
        raise UsageError("--protocol diagonal plots the ground-truth class probability; pass --labels")
    source = labelled if labelled is not None else image_paths(images)
    stream = image_batches(source, size=crop, resize=crop, mean=loaded.mean, std=loaded.std,
                           batch_size=batch_size, workers=workers, max_images=max_images,
                           on_skip=lambda path, reason: warnings.warn(f"skipped {path}: {reason}"),
                           shard=True)
    provenance = provenance_for(loaded, spec, seed=seed, antialias=antialias, resize=crop,
                                label=label)
    provenance = provenance.replace(extra={**provenance.extra, "protocol": protocol})
    if on_ready is not None:
        on_ready(loaded, None, None, {"size": size, "protocol": protocol, "resize": crop})
    identity = {k: v for k, v in provenance.to_dict().items()
                if k not in ("n_images", "seconds", "device", "versions", "input_digest")}
    identity.update(padding=padding, source=_source_digest(source, max_images))
    keywords = {"size": size, "device": device, "progress": progress, "meta": identity,
                "seed": seed, "checkpoint": checkpoint, "resume": resume}
    if protocol == "zhang2019":
        return consistency_protocol(loaded.model, stream, epochs=epochs, **keywords)
    return diagonal_protocol(loaded.model, stream, max_offset=min(32, crop - size), **keywords)


def _source_digest(source, max_images: Optional[int]) -> str:
    """sha256 of the file list (and labels) a protocol reads: a resumed run must read the same
    files in the same order. File contents are not read (50,000 files would take minutes)."""
    paths = list(getattr(source, "paths", source))[:max_images]
    labels = list(getattr(source, "labels", []))[:max_images]
    text = "\n".join(str(Path(p).resolve()) for p in paths) + "\n" + ",".join(map(str, labels))
    return hashlib.sha256(text.encode()).hexdigest()
