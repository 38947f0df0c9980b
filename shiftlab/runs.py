"""The pipeline the CLI, the notebooks and API users share: request → model → images → result.

A command builds one request (``shiftlab.requests``) and runs it whole with
:func:`measure_heatmap` or :func:`measure_consistency`; :func:`heatmap` and
:func:`consistency` build that request from keywords, for notebooks. Each step is public too,
so a notebook can run them one by one:

>>> loaded = build_model("vgg11", weights="none", seed=0)
>>> grid, margin = shift_plan(max_shift=2, mode="circular", size=32)
>>> inputs = load_inputs(loaded, size=32, max_images=2, margin=margin)
>>> tuple(inputs.tensor.shape), len(grid)
((2, 3, 32, 32), 4)

The runs fill the result's typed ``Provenance`` (model spec, weights, seed, padding,
antialiasing, image names and content hashes, versions).
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

from .checks import resolve_margin
from .data.images import LoadedImages, find_images, image_digest, load_images, sample_image_paths
from .defaults import BATCH_SIZE, MAX_SHIFT, PAIRS, SIZE, default_resize, make_grid
from .errors import UsageError
from .equivariance.shifts import ShiftGrid
from .models.checkpoints import state_dict_fingerprint
from .models.padding import has_zero_padding
from .models.zoo import LoadedModel
from .requests import (AttributionRequest, ConsistencyRequest, HeatmapRequest, Inputs,
                       LayerComparison, ModelSpec, Shifts)
from .results.provenance import Provenance, as_tuple
from .results.result import Result

if TYPE_CHECKING:  # the attribution engine is imported when a run needs it
    from .attribution.result import AttributionResult

#: the largest canvas side (input + 2 × crop margin) the pipeline decodes images to
MAX_CANVAS = 4096

PathLike = Union[str, Path]


def build_model(spec: Union[str, ModelSpec], weights: str = "auto", *, seed: int = 0,
                antialias: Optional[int] = None, padding: str = "as-trained",
                num_classes: Optional[int] = None, trust_checkpoint: bool = False,
                weights_key: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None) -> LoadedModel:
    """Load ``NAME[+aaK][@WEIGHTS]`` with seeded random init, then antialias and pad as asked.

    ``spec`` is a :class:`~shiftlab.requests.ModelSpec`, or its name with the other fields as
    keywords (see ``ModelSpec`` for each).

    Example:
        >>> build_model("resnet18", weights="none", padding="circular").name
        'resnet18'
    """
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec(spec, weights=weights, antialias=antialias, padding=padding, seed=seed,
                         num_classes=num_classes, weights_key=weights_key,
                         trust_checkpoint=trust_checkpoint, mean=mean, std=std)
    return load_spec(spec)


def load_spec(spec: ModelSpec) -> LoadedModel:
    """The model of a validated ``ModelSpec``, on the CPU in eval mode."""
    from .models.variants import load_variant

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)  # random-init weights are the same in every run
        loaded = load_variant(spec.name, spec.weights, antialias=spec.antialias,
                              trust_checkpoint=spec.trust_checkpoint,
                              num_classes=spec.num_classes, weights_key=spec.weights_key)
    if spec.padding == "circular":
        from .models.padding import circular_padding

        model = circular_padding(loaded.model)
        model.shiftlab_padding = "circular"  # measure() records it in the Settings
        loaded = dataclasses.replace(loaded, model=model)
    if spec.mean is not None or spec.std is not None:
        loaded = dataclasses.replace(loaded, mean=spec.mean or tuple(loaded.mean),
                                     std=spec.std or tuple(loaded.std))
    return loaded


def shift_plan(shifts: Optional[Shifts] = None, inputs: Optional[Inputs] = None, *,
               grid: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1,
               mode: str = "circular", size: int = SIZE,
               resize: Optional[int] = None) -> tuple[ShiftGrid, int]:
    """The shift grid and crop margin of a request, checked before anything is loaded.

    Circular shifts must stay below the image size (a shift by the size is no shift); crop
    mode needs ``resize`` to leave a margin of the largest |shift| around the window. Give the
    request's ``Shifts`` and ``Inputs``, or their fields as keywords.

    >>> shift_plan(grid="symmetric", max_shift=2, mode="crop", size=32, resize=40)[1]
    2
    """
    shifts = shifts or Shifts(grid=grid, max_shift=max_shift, subpixel=subpixel, mode=mode)
    inputs = inputs or Inputs(size=size, resize=resize)
    size, resize, max_shift = inputs.size, inputs.resize, shifts.max_shift
    if shifts.mode == "crop" and size + 2 * max_shift > MAX_CANVAS:
        raise UsageError(f"--max-shift {max_shift} in crop mode needs a canvas of"
                         f" {size + 2 * max_shift} px, above the limit of {MAX_CANVAS} px; use a"
                         " smaller --max-shift")
    grid = make_grid(shifts.grid, max_shift, shifts.subpixel)
    if shifts.mode != "crop":
        if grid.max_abs >= size:
            raise UsageError(
                f"--max-shift {max_shift} gives shifts up to {grid.max_abs:g} px, but circular"
                f" shifts of a {size} px image repeat every {size} px; use a --max-shift below"
                f" {size} (or --size above {grid.max_abs:g})")
        return grid, 0
    margin = resolve_margin(grid.max_abs, shifts.mode, None)
    available = ((resize or default_resize(size)) - size) // 2
    if resize is None:
        return grid, margin  # the default resize grows to fit the margin
    if margin > available:
        raise UsageError(
            f"--max-shift {max_shift} needs a crop margin of {margin} px but resizing to {resize}"
            f" leaves {available} px around the {size} px window; use --resize {size + 2 * margin}"
            " or a smaller --max-shift")
    return grid, margin


def image_paths(sources: Sequence[PathLike] = (), max_images: Optional[int] = None) -> list[Path]:
    """The image files of ``sources`` (files or folders; default the shipped sample photos)."""
    paths: list[Path] = []
    for source in (list(sources) or sample_image_paths()):
        paths += find_images(source)
    return paths[:max_images] if max_images else paths


def load_inputs(loaded: LoadedModel, inputs: Optional[Inputs] = None, *,
                images: Sequence[PathLike] = (), max_images: Optional[int] = None,
                size: int = SIZE, resize: Optional[int] = None, margin: int = 0) -> LoadedImages:
    """The images as one normalised (N, 3, size + 2·margin, ...) tensor, with the model's mean
    and std; unreadable files are skipped with a warning naming each. Give the request's
    ``Inputs``, or its fields as keywords."""
    inputs = inputs or Inputs(images=tuple(images), max_images=max_images, size=size,
                              resize=resize)
    size, resize = inputs.size, inputs.resize
    if loaded.min_size and size < loaded.min_size:
        raise UsageError(f"{loaded.name} needs inputs of at least {loaded.min_size} px; use --size"
                         f" {loaded.min_size} or more")
    if resize is not None and resize > MAX_CANVAS:
        raise UsageError(f"--resize {resize} is above the limit of {MAX_CANVAS} px")
    paths = image_paths(inputs.images, inputs.max_images)
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


#: ``on_ready(loaded, inputs, grid, request)``: called once the model and images are loaded,
#: before the measurement (the CLI prints a line there); ``inputs`` and ``grid`` are None for
#: the streamed protocols
OnReady = Callable[[LoadedModel, Optional[LoadedImages], Optional[ShiftGrid], object], None]


def heatmap(model: str = "vgg16", *, weights: str = "auto", seed: int = 0,
            antialias: Optional[int] = None, padding: str = "as-trained",
            num_classes: Optional[int] = None, trust_checkpoint: bool = False,
            weights_key: Optional[str] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, images: Sequence[PathLike] = (),
            max_images: Optional[int] = None, size: int = SIZE, resize: Optional[int] = None,
            grid: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1,
            mode: str = "circular", align: str = "bilinear", metric: str = "cosine",
            layers: Union[str, Sequence[str], None] = None, border: int = 0,
            batch_size: int = BATCH_SIZE, device: str = "auto", dtype: str = "float32",
            label: Optional[str] = None, progress: Optional[bool] = None) -> Result:
    """What ``shiftlab heatmap`` measures, as one call: returns the ``Result``.

    A convenience for notebooks: the keywords build a
    :class:`~shiftlab.requests.HeatmapRequest` (validated there), which
    :func:`measure_heatmap` runs. ``layers``: one glob or 'type:Name' item, or several.

    Example:
        >>> result = heatmap("vgg11", weights="none", size=32, max_shift=2, max_images=2,
        ...                  layers="features.[0-2]", progress=False)
        >>> result.provenance.images
        ('astronaut.jpg', 'camera.jpg')
        >>> [layer.name for layer in result.layers]
        ['features.0', 'features.1', 'features.2']
    """
    request = HeatmapRequest(
        ModelSpec(model, weights=weights, antialias=antialias, padding=padding, seed=seed,
                  num_classes=num_classes, weights_key=weights_key,
                  trust_checkpoint=trust_checkpoint, mean=mean, std=std),
        inputs=Inputs(images=tuple(images), max_images=max_images, size=size, resize=resize),
        shifts=Shifts(grid=grid, max_shift=max_shift, subpixel=subpixel, mode=mode),
        comparison=LayerComparison(align=align, metric=metric, layers=_layer_items(layers),
                                   border=border),
        batch_size=batch_size, device=device, dtype=dtype)
    return measure_heatmap(request, label=label, progress=progress)


def measure_heatmap(request: HeatmapRequest, *, label: Optional[str] = None,
                    progress: Optional[bool] = None, on_ready: Optional[OnReady] = None,
                    checkpoint: Optional[PathLike] = None, resume: bool = False,
                    keep_checkpoint: bool = False) -> Result:
    """Run a heatmap request: model, images, then :func:`shiftlab.measure` on the grid.

    ``checkpoint``/``resume``/``keep_checkpoint``: see :func:`shiftlab.measure`.
    """
    from .equivariance.engine import measure

    shifts, margin = shift_plan(request.shifts, request.inputs)
    loaded = load_spec(request.model)
    inputs = load_inputs(loaded, request.inputs, margin=margin)
    provenance = provenance_for(
        loaded, request.model.name, inputs, seed=request.model.seed,
        antialias=request.model.antialias,
        resize=request.inputs.resize or default_resize(request.inputs.size, margin), label=label)
    if on_ready is not None:
        on_ready(loaded, inputs, shifts, request)
    comparison = request.comparison
    return measure(loaded.model, inputs.tensor, shifts, mode=request.shifts.mode, margin=margin,
                   align=comparison.align, metric=comparison.metric,
                   layers=comparison.selection,
                   border=comparison.border, batch_size=request.batch_size,
                   device=request.device,
                   dtype=request.autocast,
                   progress=progress, provenance=provenance, checkpoint=checkpoint,
                   resume=resume,
                   resume_key=resume_identity(provenance, request.model.padding, request.dtype),
                   keep_checkpoint=keep_checkpoint)


def _layer_items(layers: Union[str, Sequence[str], None]) -> Optional[tuple[str, ...]]:
    if layers is None:
        return None
    return (layers,) if isinstance(layers, str) else tuple(layers)


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
                ignore_index: int = 255, progress: Optional[bool] = None,
                label: Optional[str] = None):
    """What ``shiftlab consistency`` measures for one model: an ``InvarianceResult`` (protocol
    'grid': every shift of the grid on every image) or a protocol result ('zhang2019': two
    random ``size`` windows of the ``resize`` centre crop per image and epoch; 'diagonal').
    A model whose output is a map (segmentation) gives a ``DenseResult`` on the grid, with
    ``labels_path`` a folder of image/mask pairs (``ignore_index``: unlabelled pixels).

    A convenience for notebooks: the keywords build a
    :class:`~shiftlab.requests.ConsistencyRequest`, which :func:`measure_consistency` runs.

    Example:
        >>> result = consistency("resnet18", weights="none", size=32, max_shift=2,
        ...                      max_images=2, progress=False)
        >>> result.summary()["n_images"]
        2
    """
    request = ConsistencyRequest(
        ModelSpec(model, weights=weights, antialias=antialias, padding=padding, seed=seed,
                  num_classes=num_classes, weights_key=weights_key,
                  trust_checkpoint=trust_checkpoint, mean=mean, std=std),
        inputs=Inputs(images=tuple(images), max_images=max_images, size=size, resize=resize),
        shifts=Shifts(grid=grid, max_shift=max_shift, subpixel=subpixel, mode=mode),
        protocol=protocol, pairs=n_pairs,
        labels=str(labels_path) if labels_path is not None else None, epochs=epochs,
        workers=workers, class_order=class_order, batch_size=batch_size, device=device,
        ignore_index=ignore_index)
    return measure_consistency(request, label=label, progress=progress)


def measure_consistency(request: ConsistencyRequest, *, label: Optional[str] = None,
                        progress: Optional[bool] = None, on_ready: Optional[OnReady] = None,
                        checkpoint: Optional[PathLike] = None, resume: bool = False):
    """Run a consistency request (see :func:`consistency`).

    Protocols stream the images (DataLoader ``workers``), so memory does not grow with them;
    with ``checkpoint`` they save each completed epoch there and ``resume`` continues from it.
    Under ``torchrun`` every rank measures its share of the images (protocols decode only
    theirs) and every rank returns the single-process result.
    """
    from .data.labels import read_labels
    from .invariance.grid import measure_invariance

    if request.protocol == "grid" and (checkpoint is not None or resume):
        raise UsageError("--resume continues the zhang2019 and diagonal protocols per epoch; the"
                         " grid protocol runs in one pass (use fewer --images per run instead)")
    loaded = load_spec(request.model)
    if _returns_map(loaded, request.inputs.size):
        return _dense(loaded, request, label=label, progress=progress, on_ready=on_ready)
    labelled = None
    images = request.inputs.images
    if request.labels is not None:
        # a model built with its own --num-classes has no ImageNet category names
        names = categories(loaded) if request.model.num_classes is None else None
        labelled = read_labels(request.labels, names, class_order=request.class_order)
        images = labelled.paths
    if request.protocol != "grid":
        return _protocol(loaded, request, images, labelled, label=label, progress=progress,
                         on_ready=on_ready, checkpoint=checkpoint, resume=resume)
    shifts, margin = shift_plan(request.shifts, request.inputs)
    inputs = load_inputs(loaded, dataclasses.replace(request.inputs, images=tuple(images)),
                         margin=margin)
    provenance = provenance_for(
        loaded, request.model.name, inputs, seed=request.model.seed,
        antialias=request.model.antialias,
        resize=request.inputs.resize or default_resize(request.inputs.size, margin), label=label,
        labels=request.labels)
    if on_ready is not None:
        on_ready(loaded, inputs, shifts, request)
    return measure_invariance(
        loaded.model, inputs.tensor, shifts, mode=request.shifts.mode, margin=margin,
        labels=labelled.for_paths(inputs.paths) if labelled is not None else None,
        n_pairs=request.pairs, seed=request.model.seed, batch_size=request.batch_size,
        device=request.device, progress=progress, provenance=provenance)


def _returns_map(loaded: LoadedModel, size: int) -> bool:
    """Whether the model's output is a map: known for torchvision's models by name; any other
    model is probed with one forward (:func:`shiftlab.invariance.dense.is_dense`), which a
    large classifier on the CPU would otherwise pay on every run."""
    import torchvision

    from .invariance.dense import is_dense
    from .models.segmentation import is_segmentation_model
    from .models.variants import parse_variant

    base = parse_variant(loaded.name)[0]
    if is_segmentation_model(base):
        return True
    if base in torchvision.models.list_models(module=torchvision.models):
        return False
    return is_dense(loaded.model, size)


def _dense(loaded: LoadedModel, request: ConsistencyRequest, *, label: Optional[str],
           progress: Optional[bool], on_ready: Optional[OnReady]):
    """A dense model (its output is a map) on the grid: images, or image/mask pairs streamed
    from the ``labels`` folder."""
    from .data.masks import mask_batches, read_mask_pairs
    from .invariance.dense import measure_dense

    if request.protocol != "grid":
        raise UsageError(f"--protocol {request.protocol} draws windows for classifiers;"
                         f" {loaded.name} returns a map, so measure it on the grid (drop"
                         " --protocol)")
    if request.class_order != "auto":
        raise UsageError("--class-order reads class folders; masks hold class indices")
    shifts, margin = shift_plan(request.shifts, request.inputs)
    inputs, pairs = None, None
    size, resize = request.inputs.size, request.inputs.resize or default_resize(
        request.inputs.size, margin)
    if request.labels is not None:
        pairs = read_mask_pairs(request.labels, request.inputs.max_images)
        images = mask_batches(pairs, size=size, margin=margin, resize=resize, mean=loaded.mean,
                              std=loaded.std, batch_size=min(len(pairs), request.batch_size),
                              workers=request.workers)
    else:
        inputs = load_inputs(loaded, request.inputs, margin=margin)
        images = inputs.tensor
    provenance = provenance_for(loaded, request.model.name, inputs, seed=request.model.seed,
                                antialias=request.model.antialias, resize=resize, label=label,
                                labels=request.labels)
    if pairs is not None:
        provenance = provenance.replace(images=tuple(p.name for p in pairs.images))
    if on_ready is not None:
        on_ready(loaded, inputs, shifts, request)
    return measure_dense(loaded.model, images, shifts, n_images=None if pairs is None
                         else len(pairs), mode=request.shifts.mode, margin=margin,
                         ignore_index=request.ignore_index, n_pairs=request.pairs,
                         seed=request.model.seed, batch_size=request.batch_size,
                         device=request.device, progress=progress, provenance=provenance)


def _protocol(loaded: LoadedModel, request: ConsistencyRequest, images, labelled, *,
              label: Optional[str], progress: Optional[bool], on_ready: Optional[OnReady],
              checkpoint: Optional[PathLike], resume: bool):
    """The paper's ImageNet protocols on a streamed source: R×R centre crops, R = resize."""
    from .invariance.protocols import consistency_protocol, diagonal_protocol
    from .data.sources import image_batches

    crop = request.crop
    source = labelled if labelled is not None else image_paths(images)
    stream = image_batches(source, size=crop, resize=crop, mean=loaded.mean, std=loaded.std,
                           batch_size=request.batch_size, workers=request.workers,
                           max_images=request.inputs.max_images,
                           on_skip=lambda path, reason: warnings.warn(f"skipped {path}: {reason}"),
                           shard=True)
    provenance = provenance_for(loaded, request.model.name, seed=request.model.seed,
                                antialias=request.model.antialias, resize=crop, label=label)
    if on_ready is not None:
        on_ready(loaded, None, None, request)
    source_digest = _source_digest(source, request.inputs.max_images)
    # what --resume checks (beyond the weights and the protocol's settings); the protocol in
    # the provenance's extra and the padding and source at the top, as checkpoints always had
    identity = provenance.replace(
        extra={**provenance.extra, "protocol": request.protocol}).identity()
    identity.update(padding=request.model.padding, source=source_digest)
    provenance = provenance.replace(extra={**provenance.extra, "source": source_digest})
    size = request.inputs.size
    if request.protocol == "zhang2019":
        return consistency_protocol(loaded.model, stream, epochs=request.epochs, size=size,
                                    device=request.device, progress=progress,
                                    provenance=provenance, seed=request.model.seed,
                                    checkpoint=checkpoint, resume=resume, resume_key=identity)
    return diagonal_protocol(loaded.model, stream, max_offset=min(32, crop - size), size=size,
                             device=request.device, progress=progress, provenance=provenance,
                             seed=request.model.seed, checkpoint=checkpoint, resume=resume,
                             resume_key=identity)


def _source_digest(source, max_images: Optional[int]) -> str:
    """sha256 of the file list (and labels) a protocol reads: a resumed run must read the same
    files in the same order. File contents are not read (50,000 files would take minutes)."""
    paths = list(getattr(source, "paths", source))[:max_images]
    labels = list(getattr(source, "labels", []))[:max_images]
    text = "\n".join(str(Path(p).resolve()) for p in paths) + "\n" + ",".join(map(str, labels))
    return hashlib.sha256(text.encode()).hexdigest()


def attribute(model: str = "vgg16", *, weights: str = "auto", seed: int = 0,
              antialias: Optional[int] = None, padding: str = "as-trained",
              num_classes: Optional[int] = None, trust_checkpoint: bool = False,
              weights_key: Optional[str] = None, mean: Optional[Sequence[float]] = None,
              std: Optional[Sequence[float]] = None, images: Sequence[PathLike] = (),
              max_images: Optional[int] = None, size: int = SIZE, resize: Optional[int] = None,
              axis: str = "both", output: str = "logits",
              layers: Union[str, Sequence[str], None] = None, batch_size: int = BATCH_SIZE,
              device: str = "auto", dtype: str = "float32", label: Optional[str] = None,
              progress: Optional[bool] = None) -> "AttributionResult":
    """What ``shiftlab attribute`` measures, as one call: returns the ``AttributionResult``.

    A convenience for notebooks: the keywords build an
    :class:`~shiftlab.requests.AttributionRequest` (validated there), which
    :func:`measure_attribution` runs.

    Example:
        >>> result = attribute("resnet18", weights="none", size=32, max_images=2,
        ...                    axis="horizontal", layers="layer4.1.*", progress=False)
        >>> result.provenance.images, result.layer_names[:3]
        (('astronaut.jpg', 'camera.jpg'), ['layer4.1.conv1', 'layer4.1.bn1', 'layer4.1.relu'])
    """
    request = AttributionRequest(
        ModelSpec(model, weights=weights, antialias=antialias, padding=padding, seed=seed,
                  num_classes=num_classes, weights_key=weights_key,
                  trust_checkpoint=trust_checkpoint, mean=mean, std=std),
        inputs=Inputs(images=tuple(images), max_images=max_images, size=size, resize=resize),
        axis=axis, output=output, layers=_layer_items(layers), batch_size=batch_size,
        device=device, dtype=dtype)
    return measure_attribution(request, label=label, progress=progress)


def measure_attribution(request: AttributionRequest, *, label: Optional[str] = None,
                        progress: Optional[bool] = None,
                        on_ready: Optional[OnReady] = None) -> "AttributionResult":
    """Run an attribution request: model, images, then :func:`shiftlab.attribute` (``on_ready``
    is called as ``on_ready(loaded, inputs, None, request)`` before the measurement)."""
    from .attribution.engine import attribute as attribute_layers

    loaded = load_spec(request.model)
    inputs = load_inputs(loaded, request.inputs)
    provenance = provenance_for(
        loaded, request.model.name, inputs, seed=request.model.seed,
        antialias=request.model.antialias,
        resize=request.inputs.resize or default_resize(request.inputs.size), label=label)
    if on_ready is not None:
        on_ready(loaded, inputs, None, request)
    return attribute_layers(loaded.model, inputs.tensor, axis=request.axis, output=request.output,
                            layers=request.selection, batch_size=request.batch_size,
                            device=request.device, dtype=request.dtype, progress=progress,
                            provenance=provenance)
