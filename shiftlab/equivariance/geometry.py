"""Per-layer geometry by probing: output shape, layout, spatial vs. global, and stride.

The stride is measured, not guessed from names (docs/semantics.md): the model runs at two input sizes and
s = ΔH / Δh per axis. Layers whose output does not grow with the input are *global*.

Three layouts of spatial outputs are recognised and compared as (N, C, h, w) feature maps
(:func:`as_feature_map`):

- ``nchw``: convolutional maps (N, C, h, w);
- ``nhwc``: channels-last maps (N, h, w, C) (Swin, the LayerNorm/Linear half of ConvNeXt
  blocks), told apart from nchw by which dimensions grow with the input;
- ``tokens``: token sequences (N, L, D) of vision transformers whose L = k + h·w (k leading
  class/register tokens, k ≤ 8) matches a patch grid of the input: the k extra tokens are left
  out and the patch tokens reshaped to (N, D, h, w). Other (N, L, D) outputs are global.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .capture import LayerCapture, LayerSelection, module_name
from ..errors import ModelError, ShiftlabError


@dataclass(frozen=True, eq=False)
class LayerInfo:
    """What a layer is: its name, module type, kind, stride (rows, cols) and output shape.

    ``shape`` is one image's output at the measured input size, e.g. (C, h, w) or (classes,);
    for ``nhwc`` and ``tokens`` layouts it is the shape after :func:`as_feature_map`, (C, h, w).
    ``stride`` is NaN for global layers; a stride below 1 means the layer upsamples (1/k).
    """

    name: str
    module: str
    kind: str
    stride: tuple[float, float]
    measured_stride: tuple[float, float]
    shape: tuple[int, ...]
    layout: str = "nchw"  # how the raw output holds the map: nchw, nhwc or tokens
    extra_tokens: int = 0  # tokens layout: leading class/register tokens left out

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
            layout=data.get("layout", "nchw"), extra_tokens=int(data.get("extra_tokens", 0)),
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
               device: torch.device, dtype: torch.dtype, batch: int = 2,
               only: Optional[dict] = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Per-image output shape of every layer at ``size``. A batch of two finds the layers: a
    tensor that does not follow the batch (Swin V2's relative-position tables, constants) is
    not a per-image feature map. ``only``: layers already found, measured with ``batch`` (1)."""
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    capture = LayerCapture(model, layers)

    def record(layer: str, tensor: torch.Tensor) -> None:
        if layer not in shapes and tensor.is_floating_point() and tensor.dim() > 0 \
                and tensor.shape[0] == batch and (only is None or layer in only):
            module = type(_module_of(capture, layer)).__name__
            shapes[layer] = (module, tuple(tensor.shape[1:]))

    capture.on_output = record
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((batch, channels, *size), generator=generator).to(device=device, dtype=dtype)
    with capture, torch.inference_mode():
        model(probe)
    return shapes


def _other_size(model: nn.Module, layers: LayerSelection, size: tuple[int, int], step: int,
                channels: int, device: torch.device, dtype: torch.dtype, batch: int,
                only: Optional[dict] = None) -> Optional[dict]:
    """Shapes at ``size`` + ``step``, or None when the model refuses that size."""
    try:
        return _shapes_at(model, layers, (size[0] + step, size[1] + step), channels, device,
                          dtype, batch=batch, only=only)
    except ShiftlabError:
        raise  # already says what to fix (e.g. a layer filter that matches nothing)
    except Exception:  # noqa: BLE001  a size the model refuses
        return None


def _base_shapes(model: nn.Module, layers: LayerSelection, size: tuple[int, int], channels: int,
                 device: torch.device, dtype: torch.dtype, found: Optional[dict]) -> dict:
    """Shapes at ``size``: of the layers ``found`` at another size (one image), or found here
    (two images)."""
    try:
        return _shapes_at(model, layers, size, channels, device, dtype,
                          batch=1 if found is not None else 2, only=found)
    except ShiftlabError:
        raise
    except Exception as exc:  # the model's own error says what it needs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"the model cannot take a {channels}x{size[0]}x{size[1]} input ({first}); "
            "try a larger --size or the size the model was built for") from exc


def _module_of(capture: LayerCapture, layer: str) -> nn.Module:
    return capture.modules.get(module_name(layer), capture.model)


def probe_layers(model: nn.Module, size: tuple[int, int], layers: LayerSelection = None,
                 channels: int = 3, device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> list[LayerInfo]:
    """Every watched layer in execution order, with kind and measured stride.

    Runs two small forwards of random images: at a second size ``size`` − 128 or − 64 (at least
    64 px; two images: only outputs whose first dimension follows the batch are layers) and at
    ``size`` (one image), or, below 128 px or when the model refuses smaller sizes, two images
    at ``size`` and one at ``size`` + 64. The stride is the change of the input size over the
    change of the map size. When the model takes one size only (fixed-size models), strides
    fall back to H / h with a warning.

    Example::

        info = probe_layers(torchvision.models.vgg16().eval(), (224, 224))
        [(i.name, i.stride) for i in info if i.module == "MaxPool2d"][:2]
        # [('features.4', (2.0, 2.0)), ('features.9', (4.0, 4.0))]
    """
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    height, width = size
    # ΔH a multiple of 64: floor/ceil effects of any power-of-two stride up to 64 cancel
    # (an antialiased VGG's last pool is ceil(H/32), the baseline's floor(H/32)). Smaller
    # sizes first: at 224 px, two images at 96 px and one at 224 px cost 1.4 image-forwards
    # (two at 224 and two at 288 cost 5.3).
    smaller = [step for step in (-128, -64) if min(height, width) + step >= 64]
    other, grow = None, (64, 64)
    for step in smaller:
        other = _other_size(model, layers, size, step, channels, device, dtype, batch=2)
        if other is not None:
            grow = (step, step)
            break
    base = _base_shapes(model, layers, size, channels, device, dtype, other)
    if other is None:
        other = _other_size(model, layers, size, 64, channels, device, dtype, batch=1, only=base)
    if other is None:
        warnings.warn("the model does not accept a second input size; strides are estimated as"
                      " input size / feature size", stacklevel=2)
    large = other
    infos = []
    previous = None
    for name, (module, shape) in base.items():
        other = large.get(name, (module, None))[1] if large is not None else None
        infos.append(_describe(name, module, shape, other, size, grow, previous))
        if infos[-1].is_spatial:
            previous = infos[-1].stride
    return infos


_MAX_EXTRA_TOKENS = 8  # class token, distillation token, register tokens


def _describe(name: str, module: str, shape: tuple[int, ...], large: Optional[tuple[int, ...]],
              size: tuple[int, int], grow: tuple[int, int],
              previous: Optional[tuple[float, float]] = None) -> LayerInfo:
    """A layer's kind, layout and stride from its per-image shape at ``size`` and at ``size`` +
    ``grow`` (``large``; None when the model takes one size only)."""
    if len(shape) == 2:
        return _describe_tokens(name, module, shape, large, size, grow)
    if len(shape) != 3:
        return _global(name, module, shape)
    if large is None:  # fixed-size model: only the ratio input / feature size is known
        for layout, (channels, h, w) in (("nchw", shape), ("nhwc", (shape[2], *shape[:2]))):
            stride = _fixed_size_stride((h, w), size, previous)
            if stride is not None:
                return LayerInfo(name, module, "spatial", stride, (size[0] / h, size[1] / w),
                                 (channels, h, w), layout)
        return _global(name, module, shape)
    if len(large) != 3:
        return _global(name, module, shape)
    sign = 1 if grow[0] > 0 else -1  # the second size may be the smaller one
    growth = [(after - before) * sign for before, after in zip(shape, large)]
    if growth[0] == 0 and growth[1] > 0 and growth[2] > 0:
        layout, converted, grid_growth = "nchw", shape, growth[1:]
    elif growth[2] == 0 and growth[0] > 0 and growth[1] > 0:  # (h, w, C): channels-last
        layout, converted, grid_growth = "nhwc", (shape[2], *shape[:2]), growth[:2]
    else:
        return _global(name, module, shape)
    raw = (abs(grow[0]) / grid_growth[0], abs(grow[1]) / grid_growth[1])
    return LayerInfo(name, module, "spatial", tuple(map(_round_stride, raw)), raw, converted, layout)


def _global(name: str, module: str, shape: tuple[int, ...]) -> LayerInfo:
    return LayerInfo(name, module, "global", (math.nan, math.nan), (math.nan, math.nan), shape)


def _fixed_size_stride(grid: tuple[int, int], size: tuple[int, int],
                       previous: Optional[tuple[float, float]] = None) -> Optional[tuple[float, float]]:
    """Stride H/h per axis when it is believable: the same whole stride (or 1/k) on both axes,
    whose map covers the input (|H − s·h| ≤ 2s).

    The previous spatial layer's stride wins when it also covers the map: an antialiased
    model's MaxPool(2, stride=1) after stride 4 on 32 px gives 7×7 (32/7 = 4.6, rounded 5),
    but its stride is still 4.

    MaxViT's window-partitioned tensors (N, windows, tokens, C) fail this test, so they are not
    taken for (N, C, h, w) maps with strides such as (5, 3.5).
    """
    if min(grid) <= 1:
        return None
    if previous is not None and previous[0] == previous[1] and all(
            abs(length - previous[0] * cells) <= max(2 * previous[0], 1)
            for length, cells in zip(size, grid)):
        return previous
    stride = tuple(_round_stride(length / cells) for length, cells in zip(size, grid))
    if stride[0] != stride[1]:  # attention tensors (heads, tokens, dim) of timm's ViT at 64 px
        return None
    for length, cells, step in zip(size, grid, stride):
        whole = float(step).is_integer() or float(1 / step).is_integer()
        if not whole or abs(length - step * cells) > max(2 * step, 1):
            return None
    return stride  # type: ignore[return-value]


def _token_grid(length: int, size: tuple[int, int]) -> Optional[tuple[int, int, int]]:
    """(extra tokens k, h, w) with length = k + h·w, h·w ≥ 4k, and a patch grid of the same
    stride on both axes; the fewest extra tokens win (ViT-B/16 at 224: 197 = 1 + 14·14)."""
    for extra in range(0, min(_MAX_EXTRA_TOKENS, length // 5) + 1):
        cells = length - extra  # at least 4 patch tokens per extra token: (7, D) is no 2x2 grid
        best = None
        for rows in range(2, cells // 2 + 1):
            if cells % rows:
                continue
            cols = cells // rows
            step_h, step_w = size[0] / rows, size[1] / cols
            mismatch = abs(step_h - step_w) / max(step_h, step_w)
            if step_h >= 1 and step_w >= 1 and mismatch <= 0.1 and (best is None or mismatch < best[0]):
                best = (mismatch, rows, cols)
        if best is not None:
            return extra, best[1], best[2]
    return None


def _describe_tokens(name: str, module: str, shape: tuple[int, ...],
                     large: Optional[tuple[int, ...]], size: tuple[int, int],
                     grow: tuple[int, int]) -> LayerInfo:
    """(L, D) token sequences: a spatial map when L matches a patch grid, global otherwise."""
    length, dim = shape
    found = _token_grid(length, size)
    if found is None:
        return _global(name, module, shape)
    extra, rows, cols = found
    if large is None:  # fixed-size model (torchvision's ViT checks the image size)
        stride = _fixed_size_stride((rows, cols), size)
        if stride is None:
            return _global(name, module, shape)
        return LayerInfo(name, module, "spatial", stride, (size[0] / rows, size[1] / cols),
                         (dim, rows, cols), "tokens", extra)
    other = _token_grid(large[0], (size[0] + grow[0], size[1] + grow[1])) if len(large) == 2 else None
    sign = 1 if grow[0] > 0 else -1
    if other is None or large[1] != dim or other[0] != extra or (other[1] - rows) * sign <= 0 \
            or (other[2] - cols) * sign <= 0:
        return _global(name, module, shape)
    raw = (grow[0] / (other[1] - rows), grow[1] / (other[2] - cols))
    return LayerInfo(name, module, "spatial", tuple(map(_round_stride, raw)), raw,
                     (dim, rows, cols), "tokens", extra)


def as_feature_map(tensor: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A spatial layer's raw output as an (N, C, h, w) map (global layers: unchanged).

    ``nhwc`` (N, h, w, C) is permuted; ``tokens`` (N, k + h·w, D) loses its k leading
    class/register tokens and is reshaped, row-major like a patch embedding, to (N, D, h, w).

    >>> info = LayerInfo("enc", "LayerNorm", "spatial", (16., 16.), (16., 16.), (8, 2, 2), "tokens", 1)
    >>> tuple(as_feature_map(torch.zeros(3, 5, 8), info).shape)
    (3, 8, 2, 2)
    """
    if not info.is_spatial or info.layout == "nchw":
        return tensor
    if info.layout == "nhwc":
        return tensor.permute(0, 3, 1, 2).contiguous()
    _, rows, cols = info.shape
    patches = tensor[:, info.extra_tokens:]
    return patches.reshape(tensor.shape[0], rows, cols, -1).permute(0, 3, 1, 2).contiguous()
