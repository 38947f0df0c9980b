"""What a job is asked to do, as frozen dataclasses validated once, when they are built.

The CLI builds one request per command from its options; ``shiftlab.runs`` takes it whole and
hands each part to the step that uses it (the model to ``build_model``, the shifts to
``shift_plan``, the comparison settings to ``measure``). Nothing below re-validates a request.

>>> spec = ModelSpec("resnet18+aa4", weights="none")
>>> spec.base, spec.filter_size, spec.label
('resnet18', 4, 'resnet18+aa4')
>>> request = HeatmapRequest(spec, inputs=Inputs(size=32), shifts=Shifts(max_shift=4))
>>> request.comparison.align, request.shifts.mode
('bilinear', 'circular')
>>> HeatmapRequest(spec, comparison=LayerComparison(align="nearest"))
Traceback (most recent call last):
...
shiftlab.errors.UsageError: unknown alignment 'nearest'; choose one of exact, bilinear, fourier
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .checks import (check_alignment, check_choice, check_count, check_dtype, check_filter_size,
                     check_metric, check_mode, check_seed)
from .data.labels import check_class_order
from .defaults import (BATCH_SIZE, MAX_PAIRS, GRID_KINDS, MAX_SHIFT, PADDINGS, PAIRS, PROTOCOLS,
                       SIZE, default_resize)
from .errors import UsageError
from .models.variants import parse_variant

PathLike = Union[str, Path]


def _channels(values: Optional[Sequence[float]], name: str) -> Optional[tuple[float, ...]]:
    """1 or 3 finite numbers (std > 0) as a 3-tuple, or None for the weights' own."""
    if values is None:
        return None
    values = tuple(float(v) for v in values)
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values) or \
            (name == "std" and any(v <= 0 for v in values)):
        raise UsageError(f"--{name} takes 1 or 3 finite numbers{' > 0' if name == 'std' else ''},"
                         f" got {values}")
    return values * 3 if len(values) == 1 else values


@dataclass(frozen=True)
class ModelSpec:
    """A model to load: ``NAME[+aaK][@WEIGHTS]`` plus the options that shape it.

    Attributes:
        name: a torchvision name, ``file.py:factory``, ``package.module:factory`` or
            ``timm:NAME``, optionally with ``+aaK`` (its BlurPool version) and ``@WEIGHTS``.
        weights: 'auto', 'none', a torchvision weights name or a checkpoint file; ``@WEIGHTS``
            in ``name`` wins.
        antialias: BlurPool filter size 1..7 (None: the model as it is); ``+aaK`` in ``name``
            wins.
        padding: 'as-trained' or 'circular' (every zero padding made circular).
        seed: seeds random-init weights, so figures are reproducible.
        num_classes, weights_key, trust_checkpoint: see :func:`shiftlab.load_model`.
        mean, std: input normalisation (None: the weights' own, else ImageNet's).
    """

    name: str
    weights: str = "auto"
    antialias: Optional[int] = None
    padding: str = "as-trained"
    seed: int = 0
    num_classes: Optional[int] = None
    weights_key: Optional[str] = None
    trust_checkpoint: bool = False
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        base, filt, weights = parse_variant(self.name)
        if filt is not None and self.antialias is not None and filt != self.antialias:
            raise UsageError(f"{self.name!r} asks for filter size {filt} but antialias is"
                             f" {self.antialias}; give one")
        if self.antialias is not None:
            check_filter_size(self.antialias)
        check_choice("padding", self.padding, PADDINGS)
        check_seed(self.seed)
        if self.num_classes is not None:
            check_count("num_classes", self.num_classes)
        if not isinstance(self.weights, str) or not self.weights.strip():
            raise UsageError(f"weights must be 'auto', 'none', a weights name or a file, got"
                             f" {self.weights!r}")
        object.__setattr__(self, "mean", _channels(self.mean, "mean"))
        object.__setattr__(self, "std", _channels(self.std, "std"))

    @property
    def base(self) -> str:
        """The model name without ``+aaK`` and ``@WEIGHTS``."""
        return parse_variant(self.name)[0]

    @property
    def filter_size(self) -> Optional[int]:
        """The BlurPool filter size asked for, by ``+aaK`` or ``antialias``."""
        return parse_variant(self.name)[1] or self.antialias

    @property
    def label(self) -> str:
        """The name a figure or table shows: ``NAME`` or ``NAME+aaK``."""
        filt = self.filter_size
        return self.base + (f"+aa{filt}" if filt else "")

    def antialiased(self, filter_size: int) -> "ModelSpec":
        """This model's BlurPool version (the baseline's weights are copied over)."""
        return dataclasses.replace(self, antialias=filter_size)


@dataclass(frozen=True)
class Inputs:
    """The images: files or folders (default: the shipped samples), resized and centre-cropped.

    ``size``: the measured window; ``resize``: the shorter side before cropping (default
    round(size / 0.875), grown to fit a crop margin).
    """

    images: tuple[str, ...] = ()
    max_images: Optional[int] = None
    size: int = SIZE
    resize: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(str(p) for p in self.images))
        if self.max_images is not None:
            check_count("max_images", self.max_images)
        check_count("size", self.size, 8)
        if self.resize is not None:
            check_count("resize", self.resize, 8)


@dataclass(frozen=True)
class Shifts:
    """The shift grid: square 0..K-1, symmetric -K..K or diagonal (t, t), in steps of
    1/``subpixel`` px, applied circularly (torch.roll) or as crop windows."""

    grid: str = "square"
    max_shift: int = MAX_SHIFT
    subpixel: int = 1
    mode: str = "circular"

    def __post_init__(self) -> None:
        check_choice("grid", self.grid, GRID_KINDS)
        check_count("max_shift", self.max_shift)
        check_count("subpixel", self.subpixel)
        check_mode(self.mode)


@dataclass(frozen=True)
class LayerComparison:
    """How each layer's feature maps are compared with the reference's.

    ``align``: bilinear (the paper's), exact or fourier; ``metric``: cosine, l2 or psnr;
    ``layers``: None (every leaf module) or globs / 'type:Name' items; ``border``: crop mode's
    input pixels ignored at each edge of the compared region.
    """

    align: str = "bilinear"
    metric: str = "cosine"
    layers: Optional[tuple[str, ...]] = None
    border: int = 0

    def __post_init__(self) -> None:
        check_alignment(self.align)
        check_metric(self.metric)
        if self.layers is not None:
            items = tuple(str(p).strip() for p in self.layers if str(p).strip())
            object.__setattr__(self, "layers", items or None)
        check_count("border", self.border, 0)

    @property
    def selection(self) -> Optional[list[str]]:
        """``layers`` as :func:`shiftlab.measure` takes it (None: every leaf module)."""
        return list(self.layers) if self.layers else None


@dataclass(frozen=True)
class HeatmapRequest:
    """``shiftlab heatmap``: every layer's equivariance over a grid of shifts, for one model."""

    model: ModelSpec
    inputs: Inputs = field(default_factory=Inputs)
    shifts: Shifts = field(default_factory=Shifts)
    comparison: LayerComparison = field(default_factory=LayerComparison)
    batch_size: int = BATCH_SIZE
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSpec):
            raise UsageError(f"model must be a ModelSpec, got {type(self.model).__name__}")
        check_count("batch_size", self.batch_size)
        check_dtype(self.dtype)
        if self.comparison.border and self.shifts.mode != "crop":
            raise UsageError("--border applies to --mode crop (circular shifts have no border to"
                             " ignore); drop it or use --mode crop")

    @property
    def autocast(self) -> Optional[str]:
        """``dtype`` as :func:`shiftlab.measure` takes it (None: plain float32)."""
        return None if self.dtype == "float32" else self.dtype

    def for_model(self, model: ModelSpec) -> "HeatmapRequest":
        """The same measurement of another model."""
        return dataclasses.replace(self, model=model)


@dataclass(frozen=True)
class CompareRequest:
    """``shiftlab compare``: the same measurement of two or more models."""

    heatmaps: tuple[HeatmapRequest, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heatmaps", tuple(self.heatmaps))
        if len(self.heatmaps) < 2:
            raise UsageError("a comparison needs two models: repeat --model or add --antialias K")
        first = self.heatmaps[0]
        for other in self.heatmaps[1:]:
            if dataclasses.replace(other, model=first.model) != first:
                raise UsageError("every model of a comparison is measured with the same settings")

    @classmethod
    def of_models(cls, models: Sequence[ModelSpec], measurement: HeatmapRequest,
                  antialias: Optional[int] = None) -> "CompareRequest":
        """Each model, then (with ``antialias``) each one's BlurPool version."""
        if antialias is not None:
            check_filter_size(antialias)
        variants = list(models) + ([m.antialiased(antialias) for m in models] if antialias else [])
        return cls(tuple(measurement.for_model(model) for model in variants))


@dataclass(frozen=True)
class ConsistencyRequest:
    """``shiftlab consistency`` for one model: does the predicted class survive a shift?

    ``protocol``: 'grid' (every shift of ``shifts`` on every image), 'zhang2019' (the paper's
    two random ``size`` windows of the ``resize`` centre crop per image and epoch) or
    'diagonal'. ``labels``: class folders or a CSV (the images then come from it); for a
    dense model (segmentation), a folder of image/mask pairs whose pixels equal to
    ``ignore_index`` carry no label.
    """

    model: ModelSpec
    inputs: Inputs = field(default_factory=Inputs)
    shifts: Shifts = field(default_factory=Shifts)
    protocol: str = "grid"
    pairs: int = PAIRS
    labels: Optional[str] = None
    epochs: int = 1
    workers: int = 0
    class_order: str = "auto"
    batch_size: int = BATCH_SIZE
    device: str = "auto"
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelSpec):
            raise UsageError(f"model must be a ModelSpec, got {type(self.model).__name__}")
        check_choice("protocol", self.protocol, PROTOCOLS)
        check_count("ignore_index", self.ignore_index, 0)
        check_count("--pairs", self.pairs, 1, MAX_PAIRS)
        check_count("epochs", self.epochs)
        check_count("workers", self.workers, 0)
        check_class_order(self.class_order)
        check_count("batch_size", self.batch_size)
        if self.labels is not None:
            object.__setattr__(self, "labels", str(self.labels))
            if self.inputs.images:
                raise UsageError("--labels names the images (class folders or the CSV's files);"
                                 " drop --images")
        if self.protocol != "grid":
            crop = self.crop
            if crop <= self.inputs.size:
                raise UsageError(f"--protocol {self.protocol} draws {self.inputs.size} px windows"
                                 f" from a --resize {crop} px centre crop; use a --resize above"
                                 " --size")
            if self.protocol == "diagonal" and self.labels is None:
                raise UsageError("--protocol diagonal plots the ground-truth class probability;"
                                 " pass --labels")

    @property
    def crop(self) -> int:
        """The protocols' R x R centre crop, R = resize (default round(size / 0.875))."""
        return self.inputs.resize or default_resize(self.inputs.size)

    def for_model(self, model: ModelSpec) -> "ConsistencyRequest":
        """The same measurement of another model."""
        return dataclasses.replace(self, model=model)


@dataclass(frozen=True)
class AttributionRequest:
    """``shiftlab attribute``: each layer call's share of the output's Lie derivative under a
    continuous translation of the input, for one model (docs/semantics.md, section 10).

    ``axis``: horizontal, vertical or both; ``output``: logits or probabilities (softmax);
    ``layers``: None (every leaf module call) or globs / 'type:Name' items (nested modules are
    refused when the model is loaded); ``dtype``: float32 or float64.

    >>> AttributionRequest(ModelSpec("vgg11", weights="none"), axis="vertical").axis
    'vertical'
    >>> AttributionRequest(ModelSpec("vgg11", weights="none"), output="softmax")
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: unknown output space 'softmax'; choose one of logits, probabilities
    """

    model: ModelSpec
    inputs: Inputs = field(default_factory=Inputs)
    axis: str = "both"
    output: str = "logits"
    layers: Optional[tuple[str, ...]] = None
    batch_size: int = BATCH_SIZE
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        from .attribution.settings import AXES, DTYPES, OUTPUT_SPACES

        if not isinstance(self.model, ModelSpec):
            raise UsageError(f"model must be a ModelSpec, got {type(self.model).__name__}")
        check_choice("axis", self.axis, AXES)
        check_choice("output space", self.output, OUTPUT_SPACES)
        check_choice("dtype", self.dtype, DTYPES)
        check_count("batch_size", self.batch_size)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, str) else self.layers
            items = tuple(str(p).strip() for p in layers if str(p).strip())
            object.__setattr__(self, "layers", items or None)

    @property
    def selection(self) -> Optional[list[str]]:
        """``layers`` as :func:`shiftlab.attribute` takes it (None: every leaf module)."""
        return list(self.layers) if self.layers else None

    def for_model(self, model: ModelSpec) -> "AttributionRequest":
        """The same attribution of another model."""
        return dataclasses.replace(self, model=model)
