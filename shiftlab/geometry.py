"""Per-layer geometry by probing: output shape, spatial vs. global, and stride.

The stride is measured, not guessed from names (SPEC.md): the model runs at two input sizes and
s = ΔH / Δh per axis. Layers whose output does not grow with the input are *global*.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .capture import LayerCapture, LayerSelection
from .errors import ModelError, ShiftlabError


@dataclass(frozen=True, eq=False)
class LayerInfo:
    """What a layer is: its name, module type, kind, stride (rows, cols) and output shape.

    ``shape`` is one image's output at the measured input size, e.g. (C, h, w) or (classes,).
    ``stride`` is NaN for global layers; a stride below 1 means the layer upsamples (1/k).
    """

    name: str
    module: str
    kind: str
    stride: tuple[float, float]
    measured_stride: tuple[float, float]
    shape: tuple[int, ...]

    @property
    def is_spatial(self) -> bool:
        return self.kind == "spatial"

    @property
    def integer_stride(self) -> Optional[tuple[int, int]]:
        """(sh, sw) as ints when both are whole numbers >= 1, else None."""
        if not self.is_spatial:
            return None
        sh, sw = self.stride
        if sh >= 1 and sw >= 1 and float(sh).is_integer() and float(sw).is_integer():
            return int(sh), int(sw)
        return None

    def to_dict(self) -> dict:
        """Plain JSON-safe data; the NaN strides of global layers become None."""
        data = asdict(self)
        for key in ("stride", "measured_stride"):
            data[key] = [None if math.isnan(v) else v for v in data[key]]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "LayerInfo":
        as_float = lambda values: tuple(math.nan if v is None else float(v) for v in values)  # noqa: E731
        return cls(
            name=data["name"], module=data["module"], kind=data["kind"],
            stride=as_float(data["stride"]), measured_stride=as_float(data["measured_stride"]),
            shape=tuple(int(v) for v in data["shape"]),
        )

    def __eq__(self, other: object) -> bool:  # NaN strides of global layers compare equal
        return isinstance(other, LayerInfo) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash((self.name, self.module, self.kind, self.shape))


def _round_stride(raw: float) -> float:
    """Snap a measured ratio to the stride it almost surely is (AlexNet conv1: 4.07 -> 4)."""
    if raw >= 1:
        near = round(raw)
        return float(near) if abs(raw - near) <= 0.1 * raw else raw
    factor = round(1 / raw)
    return 1.0 / factor if factor >= 1 and abs(1 / raw - factor) <= 0.1 / raw else raw


def _shapes_at(model: nn.Module, layers: LayerSelection, size: tuple[int, int], channels: int,
               device: torch.device, dtype: torch.dtype) -> dict[str, tuple[str, tuple[int, ...]]]:
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    capture = LayerCapture(model, layers)

    def record(layer: str, tensor: torch.Tensor) -> None:
        # a batch of two: tensors that do not follow the batch (Swin V2's relative-position
        # tables, constants) are not per-image feature maps and are not layers
        if layer not in shapes and tensor.is_floating_point() and tensor.dim() > 0 \
                and tensor.shape[0] == 2:
            module = type(_module_of(capture, layer)).__name__
            shapes[layer] = (module, tuple(tensor.shape[1:]))

    capture.on_output = record
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, channels, *size), generator=generator).to(device=device, dtype=dtype)
    with capture, torch.inference_mode():
        model(probe)
    return shapes


def _module_of(capture: LayerCapture, layer: str) -> nn.Module:
    return capture.modules.get(layer.split("#")[0].split("[")[0], capture.model)


def probe_layers(model: nn.Module, size: tuple[int, int], layers: LayerSelection = None,
                 channels: int = 3, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> list[LayerInfo]:
    """Every watched layer in execution order, with kind and measured stride.

    Runs two forwards of two random images: at ``size`` and at ``size`` + 64·⌈size/64⌉; only
    outputs whose first dimension follows the batch are layers. When the
    model refuses the larger size (fixed-size models), strides fall back to H / h with a warning.

    Example::

        info = probe_layers(torchvision.models.vgg16().eval(), (224, 224))
        [(i.name, i.stride) for i in info if i.module == "MaxPool2d"][:2]
        # [('features.4', (2.0, 2.0)), ('features.9', (4.0, 4.0))]
    """
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    height, width = size
    try:
        base = _shapes_at(model, layers, size, channels, device, dtype)
    except ShiftlabError:
        raise  # already says what to fix (e.g. a layer filter that matches nothing)
    except Exception as exc:  # the model's own error says what it needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"the model cannot take a {channels}x{height}x{width} input ({first}); "
            "try a larger --size or the size the model was built for") from exc
    # ΔH a multiple of 64: floor/ceil effects of any power-of-two stride up to 64 cancel
    # (an antialiased VGG's last pool is ceil(H/32), the baseline's floor(H/32))
    grow = (64 * math.ceil(height / 64), 64 * math.ceil(width / 64))
    try:
        large = _shapes_at(model, layers, (height + grow[0], width + grow[1]), channels, device, dtype)
    except Exception:
        large = None
        warnings.warn("the model does not accept a second input size; strides are estimated as"
                      " input size / feature size", stacklevel=2)
    infos = []
    for name, (module, shape) in base.items():
        other = large.get(name, (module, None))[1] if large is not None else None
        infos.append(_describe(name, module, shape, other, size, grow))
    return infos


def _describe(name: str, module: str, shape: tuple[int, ...], large: Optional[tuple[int, ...]],
              size: tuple[int, int], grow: tuple[int, int]) -> LayerInfo:
    nan = (math.nan, math.nan)
    if len(shape) != 3:
        return LayerInfo(name, module, "global", nan, nan, shape)
    _, h, w = shape
    if large is None:  # fixed-size model: only the ratio is known
        if h > 1 and w > 1:
            raw = (size[0] / h, size[1] / w)
            return LayerInfo(name, module, "spatial", tuple(map(_round_stride, raw)), raw, shape)
        return LayerInfo(name, module, "global", nan, nan, shape)
    if len(large) != 3 or large[0] != shape[0]:
        return LayerInfo(name, module, "global", nan, nan, shape)
    grow_h, grow_w = large[1] - h, large[2] - w
    if grow_h <= 0 or grow_w <= 0:
        return LayerInfo(name, module, "global", nan, nan, shape)
    raw = (grow[0] / grow_h, grow[1] / grow_w)
    return LayerInfo(name, module, "spatial", tuple(map(_round_stride, raw)), raw, shape)
