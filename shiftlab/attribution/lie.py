"""The Lie derivative of a translation: the spectral derivative D, the generator A of every
tensor, and the model's output in the space where its change is measured.

T_t x(u) = x(u − t) is the band-limited translation of the input by t pixels along one axis
(a phase ramp on the periodic grid), so d/dt T_t x |₀ = −D x, with D the spectral derivative
(the Nyquist bin of an even length has derivative 0). A tensor with a spatial grid of stride s
(input pixels per cell) moves by t/s cells, so its generator is A(y) = D y / s; a tensor without
a grid has A = 0. The definitions and what follows from them: docs/semantics.md, section 10.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..equivariance.geometry import LayerInfo, probe_layers
from ..errors import UsageError


def spectral_derivative(x: torch.Tensor, dim: int) -> torch.Tensor:
    """D x along ``dim``: ifft(i·2πk/N · fft(x)), with the Nyquist bin (even N) set to 0.

    An axis of length 1 has D = 0. Same shape, dtype and device as ``x``.

    >>> n = 8
    >>> u = torch.arange(n, dtype=torch.float64)
    >>> wave = torch.sin(2 * math.pi * u / n)
    >>> torch.allclose(spectral_derivative(wave, 0), 2 * math.pi / n * torch.cos(2 * math.pi * u / n))
    True
    """
    n = x.shape[dim]
    if n == 1:
        return torch.zeros_like(x)
    spectrum = torch.fft.rfft(x, dim=dim)
    frequency = torch.arange(spectrum.shape[dim], device=x.device, dtype=x.dtype) * (2 * math.pi / n)
    if n % 2 == 0:  # the Nyquist bin: cos(π·t) under a real shift, derivative 0 at t = 0
        frequency[-1:].zero_()  # a kernel, not a scalar copied from the host (a CUDA sync)
    shape = [1] * x.dim()
    shape[dim] = -1
    return torch.fft.irfft(spectrum * (1j * frequency).reshape(shape), n=n, dim=dim)


@dataclass(frozen=True)
class Geometry:
    """How a 4-D tensor holds its grid: ``layout`` 'nchw' or 'nhwc', and its stride (rows,
    cols) in input pixels, as snapped by the probe (``measured``: the raw ratio)."""

    layout: str
    stride: tuple[float, float]
    measured: tuple[float, float]


class ShiftField:
    """The generator A of an input translation on every tensor of a model, a function of the
    tensor's per-image shape alone, so every tensor gets one A whether it is seen as a layer's
    output or as the next layer's input (what makes the layer terms add up to the total).

    A 4-D tensor is spatial unless the probe (:func:`shiftlab.probe_layers`) saw a layer of
    its per-image shape that does not grow with the input (an adaptive pool to a fixed size) and
    no spatial layer of that shape. Its layout and stride come from the probed spatial layers:
    its exact per-image shape first (channels-last maps are recognised there), else its (h, w)
    grid as an NCHW map, else the ratio (H0/h, W0/w) to the input's size. The first entry of a
    shape wins (the input's own, then network order). Other tensors (token sequences, logits)
    have A = 0.

    >>> field = ShiftField((3, 16, 16), [])
    >>> field.geometry((8, 8, 8)).stride, field.geometry((10,)) is None
    ((2.0, 2.0), True)
    """

    def __init__(self, input_shape: Sequence[int], layers: Sequence[LayerInfo] = ()) -> None:
        channels, height, width = (int(v) for v in input_shape)
        self.size = (height, width)
        self._exact: dict[tuple[int, ...], Geometry] = {}
        self._grid: dict[tuple[int, int], Geometry] = {}
        self._fixed: set[tuple[int, ...]] = set()  # 4-D outputs of a size that does not follow H
        self._add((channels, height, width), Geometry("nchw", (1.0, 1.0), (1.0, 1.0)))
        for info in layers:
            if info.is_spatial and info.layout in ("nchw", "nhwc") and len(info.shape) == 3:
                c, h, w = info.shape
                raw = (c, h, w) if info.layout == "nchw" else (h, w, c)
                self._add(raw, Geometry(info.layout, tuple(info.stride), tuple(info.measured_stride)))
            elif not info.is_spatial and len(info.shape) == 3:
                self._fixed.add(tuple(info.shape))

    def _add(self, raw: tuple[int, ...], geometry: Geometry) -> None:
        self._exact.setdefault(raw, geometry)
        grid = raw[1:] if geometry.layout == "nchw" else raw[:2]
        self._grid.setdefault(grid, Geometry("nchw", geometry.stride, geometry.measured))

    @classmethod
    def probe(cls, model: nn.Module, input_shape: Sequence[int], device: torch.device,
              dtype: torch.dtype) -> "ShiftField":
        """The field of ``model`` at per-image input shape (C, H, W): probes every leaf module."""
        channels, height, width = (int(v) for v in input_shape)
        infos = probe_layers(model, (height, width), None, channels=channels, device=device,
                             dtype=dtype)
        return cls((channels, height, width), infos)

    def geometry(self, shape: Sequence[int]) -> Optional[Geometry]:
        """The grid of a tensor of per-image ``shape`` (3 values for a 4-D tensor), or None."""
        shape = tuple(int(v) for v in shape)
        if len(shape) != 3:
            return None
        if shape in self._exact:
            return self._exact[shape]
        if shape in self._fixed:
            return None
        if shape[1:] in self._grid:
            return self._grid[shape[1:]]
        ratio = (self.size[0] / max(shape[1], 1), self.size[1] / max(shape[2], 1))
        return Geometry("nchw", ratio, ratio)

    def is_spatial(self, tensor: torch.Tensor) -> bool:
        """Whether A(tensor) can be non-zero: a floating 4-D tensor with a grid."""
        return (tensor.is_floating_point() and tensor.dim() == 4
                and self.geometry(tensor.shape[1:]) is not None)

    def __call__(self, tensor: torch.Tensor, axis: str) -> Optional[torch.Tensor]:
        """A(tensor) for the translation along ``axis`` ('horizontal' or 'vertical'); None
        where A = 0 (not a spatial tensor)."""
        if not self.is_spatial(tensor):
            return None
        geometry = self.geometry(tensor.shape[1:])
        row = 0 if axis == "vertical" else 1
        dim = (2 if geometry.layout == "nchw" else 1) + row
        return spectral_derivative(tensor, dim) / geometry.stride[row]

    def describe(self, name: str, module: str, tensor: torch.Tensor) -> LayerInfo:
        """A layer's metadata from its (first) output tensor: spatial with this field's stride
        and the (C, h, w) shape of its map, else global with NaN strides."""
        geometry = self.geometry(tensor.shape[1:]) if tensor.dim() == 4 else None
        if geometry is None or not tensor.is_floating_point():
            return LayerInfo(name, module, "global", (math.nan, math.nan), (math.nan, math.nan),
                             tuple(tensor.shape[1:]))
        a, b, c = (int(v) for v in tensor.shape[1:])
        shape = (a, b, c) if geometry.layout == "nchw" else (c, a, b)
        return LayerInfo(name, module, "spatial", geometry.stride, geometry.measured, shape,
                         geometry.layout)


def model_output(output: object) -> torch.Tensor:
    """The tensor whose change is attributed: the output itself, the first tensor of a
    tuple/namedtuple/list, or ``output['out']`` (torchvision's segmentation models)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("out"), torch.Tensor):
        return output["out"]
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise UsageError(f"the model returned {type(output).__name__}; attribution needs a tensor, a"
                     " tuple whose first tensor is the output, or a dict with 'out'")


def softmax_jvp(probabilities: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """J_softmax · tangent at ``probabilities`` = softmax(F) over dim 1: p ⊙ (v − ⟨p, v⟩)."""
    return probabilities * (tangent - (probabilities * tangent).sum(1, keepdim=True))


def probability_derivative(output: torch.Tensor, total: torch.Tensor, field: ShiftField,
                           axis: str) -> torch.Tensor:
    """L softmax(F) from F and L F: A(p) − J_s[A(F)] + J_s[L F] (the first two terms cancel
    for a non-spatial output, where A = 0; for a spatial one they are the softmax's own part).
    """
    probabilities = torch.softmax(output, dim=1)
    pushed = softmax_jvp(probabilities, total)
    moved = field(output, axis)
    if moved is None:
        return pushed
    return field(probabilities, axis) - softmax_jvp(probabilities, moved) + pushed
