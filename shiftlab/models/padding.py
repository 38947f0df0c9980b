"""Make every padding of a model circular: ``circular_padding()`` and ``CircularPool``.

Under circular shifts (``torch.roll``) the image's wrap seam moves, while a zero border stays
at the edge of every feature map: the two no longer match, and every layer shows a boundary
distance as large as the aliasing shiftlab measures. With every padding circular, a network of
convolutions, pointwise layers and pools is exactly equivariant to the circular shifts its
strides divide, so what remains in a measurement is aliasing alone.

>>> import torchvision
>>> circ = circular_padding(torchvision.models.resnet18())
>>> circ.conv1.padding_mode, type(circ.maxpool).__name__
('circular', 'CircularPool')
"""
from __future__ import annotations

import copy
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .antialias import BlurPool

__all__ = ["CircularPool", "circular_padding"]

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CIRCULAR_PADS = {1: nn.CircularPad1d, 2: nn.CircularPad2d, 3: nn.CircularPad3d}
_OTHER_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,  # ZeroPad*d subclass these
               nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
               nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)
# Attributes that announce padding logic of a module this file does not know.
_PADDING_ATTRS = ("padding", "pad", "pad_type", "padding_mode", "ceil_mode")
_GRID_PROBE = 64  # the output-size check evaluates sizes n = 64 * stride


def _tuple(value: Union[int, Sequence[int]], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _pool_dims(pool: nn.Module) -> int:
    return {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool3d: 3, nn.AvgPool3d: 3}.get(
        next(c for c in type(pool).__mro__ if c in _POOLS), 2)


def _pool_out(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """PyTorch's pooling output size (``pooling_output_shape`` in ATen)."""
    span = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = span // s + 1
    if ceil and (out - 1) * s >= n + p:  # the last window must start inside the input
        out -= 1
    return out


class CircularPool(nn.Module):
    """A max- or average-pool whose padding (and ``ceil_mode`` overhang) wraps around.

    The wrapped pool runs with ``padding=0, ceil_mode=False`` on an input padded circularly by
    its ``padding`` on the left/top and by whatever its original output size needs on the
    right/bottom, so output sizes are those of the original pool. Where the original took
    ``-inf`` (max) or zeros (average, ``count_include_pad=True``) or left positions out
    (``count_include_pad=False``, ``ceil_mode`` overhang), it now sees the wrapped values:
    every window is full and an average divides by the kernel size (or ``divisor_override``).
    Counted as one layer by :class:`shiftlab.LayerCapture` (``shiftlab_layer``); it has no
    parameters, so state dicts are unchanged.

    Shapes: input ``(N, C, *spatial)`` as the original pool; output as the original pool.

    Example:
        >>> pool = CircularPool(nn.MaxPool2d(3, stride=2, padding=1))
        >>> pool(torch.zeros(1, 4, 32, 32)).shape
        torch.Size([1, 4, 16, 16])
    """

    shiftlab_layer = True  # shiftlab.equivariance.capture records it as one layer, not its pool child

    def __init__(self, pool: nn.Module, keep_size: bool = False) -> None:
        super().__init__()
        # keep_size: a stride-1 pool without padding (antialiased-cnns' MaxPool(2, stride=1)
        # before a BlurPool) shrinks the map by k - 1, a window that cannot wrap; wrapping k - 1
        # extra rows/columns at the bottom/right keeps it h x w (the BlurPool after it gives the
        # same output size for even inputs)
        self.keep_size = bool(keep_size)
        if not isinstance(pool, _POOLS):
            raise TypeError(f"CircularPool wraps a max- or average-pool, got {type(pool).__name__}")
        self.dims = dims = _pool_dims(pool)
        self.kernel_size = _tuple(pool.kernel_size, dims)
        self.stride = _tuple(pool.stride, dims)
        self.padding = _tuple(pool.padding, dims)
        self.dilation = _tuple(getattr(pool, "dilation", 1), dims)
        self.ceil_mode = bool(pool.ceil_mode)
        inner = copy.deepcopy(pool)
        inner.padding = 0 if isinstance(pool.padding, int) else (0,) * dims
        inner.ceil_mode = False
        self.pool = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` circularly and pool it; output shape that of the original pool."""
        pads: list[int] = []
        for n, k, s, p, d in reversed(list(zip(x.shape[-self.dims:], self.kernel_size,
                                               self.stride, self.padding, self.dilation))):
            if self.keep_size:
                pads += [0, d * (k - 1)]
                continue
            out = _pool_out(n, k, s, p, d, self.ceil_mode)
            pads += [p, max((out - 1) * s + d * (k - 1) + 1 - n - p, 0)]
        if any(pads):
            x = F.pad(x, pads, mode="circular")
        return self.pool(x)

    def extra_repr(self) -> str:
        return (f"padding={self.padding}, ceil_mode={self.ceil_mode} (circular); "
                f"pool with padding 0 below")


def circular_padding(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` in which every padding is circular; ``model`` is not modified.

    Converted (state-dict keys and output shapes unchanged):

    * ``Conv1d/2d/3d`` with ``padding_mode`` 'zeros', 'reflect' or 'replicate' (int, tuple or
      'same' padding, also the asymmetric 'same' of even kernels): ``padding_mode='circular'``.
    * ``MaxPool``/``AvgPool`` 1d-3d with ``padding > 0`` or ``ceil_mode=True``: wrapped in a
      :class:`CircularPool` (one layer; wrapped values replace MaxPool's ``-inf`` and AvgPool's
      zeros / ``count_include_pad`` rule, see there).
    * ``ZeroPad``/``ConstantPad``/``ReflectionPad``/``ReplicationPad`` 1d-3d: ``CircularPad``.
    * ``BlurPool``: ``pad_type='circular'``.

    Reflect and replicate padding are converted too: they are not zero padding, but they break
    circular equivariance in the same way. Listed in ``shiftlab_unconverted`` (qualified names
    in the returned model) and reported once with a ``UserWarning``: transposed convolutions
    (their implicit zero border has no circular mode), subclasses of these modules with their
    own ``forward``, pools with ``return_indices``, other modules with padding attributes, and
    window layers whose output is not ``input / stride`` in size (a "valid" window such as the
    ``MaxPool2d(2, stride=1)`` of ``antialias()`` drops the wrapped positions, which no padding
    mode can restore). Padding done inside a ``forward`` (``F.pad``, ``F.conv2d(padding=...)``,
    ``F.interpolate`` borders) cannot be seen from the modules and is neither converted nor
    listed. Circular padding needs every padded map at least as large as its padding.

    Args:
        model: any ``nn.Module``.

    Returns:
        The converted copy, with attributes ``shiftlab_unconverted: list[str]`` and
        ``shiftlab_padding = 'circular'`` (which :func:`shiftlab.measure` records in the result's
        settings, so results of the two versions are not compared by mistake).

    Example:
        >>> circ = circular_padding(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
        ...                                       nn.MaxPool2d(3, stride=2, padding=1)))
        >>> circ        # doctest: +NORMALIZE_WHITESPACE
        Sequential(
          (0): Conv2d(3, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), padding_mode=circular)
          (1): CircularPool(
            padding=(1, 1), ceil_mode=False (circular); pool with padding 0 below
            (pool): MaxPool2d(kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=False)
          )
        )
    """
    new = copy.deepcopy(model)
    notes: dict[int, tuple[nn.Module, str]] = {}  # the module is kept so its id stays unique
    replaced: dict[int, nn.Module] = {}  # a module shared by two parents gets one replacement
    for parent in list(new.modules()):
        if isinstance(parent, CircularPool):
            continue
        for name, child in list(parent.named_children()):
            if id(child) not in replaced:
                replaced[id(child)] = _convert_noted(child, notes)
            if replaced[id(child)] is not child:
                setattr(parent, name, replaced[id(child)])
    new = _convert_noted(new, notes)  # the model itself may be a single pool or pad layer
    names = {id(m): name or type(m).__name__ for name, m in new.named_modules()}
    unconverted = [(names[key], why) for key, (_, why) in notes.items() if key in names]
    new.shiftlab_unconverted = [name for name, _ in unconverted]
    new.shiftlab_padding = "circular"  # measure() records it in the result's Settings
    if unconverted:
        listing = "; ".join(f"{name} ({why})" for name, why in unconverted)
        warnings.warn(f"circular_padding: not made circular: {listing}", UserWarning, stacklevel=2)
    return new


# ---------------------------------------------------------------------------------------------
# machinery

def _convert_noted(module: nn.Module, notes: dict[int, tuple[nn.Module, str]]) -> nn.Module:
    new, why = _convert(module)
    if why:
        notes[id(new)] = (new, why)
    return new


def _convert(module: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The circular replacement of one module (itself, changed in place, or a new module), and
    why it is not (fully) circular, or None."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        if any(k > 1 for k in module.kernel_size) or any(_tuple(module.padding, 1)):
            return module, "transposed conv: its implicit zero border has no circular mode"
        return module, None
    if isinstance(module, _CONVS):
        if _custom_forward(module, _CONVS, ("forward", "_conv_forward")):
            return module, f"{type(module).__name__} has its own forward"
        _circular_conv(module)
        return module, _grid_change(module)
    if isinstance(module, _POOLS):
        if _custom_forward(module, _POOLS, ("forward",)):
            return module, f"{type(module).__name__} has its own forward"
        pads = any(_tuple(module.padding, 1)) or module.ceil_mode
        if pads and getattr(module, "return_indices", False):
            return module, "returns indices, which would index the padded input"
        dims = _pool_dims(module)
        sliding = (not pads and all(s == 1 for s in _tuple(module.stride, dims))
                   and any(k > 1 for k in _tuple(module.kernel_size, dims))
                   and not getattr(module, "return_indices", False))
        if sliding:  # MaxPool(k, stride=1) of an antialiased model: wrap to keep h x w
            return CircularPool(module, keep_size=True), None
        return (CircularPool(module) if pads else module), _grid_change(module)
    if isinstance(module, BlurPool):
        if module.pad_type != "circular":
            module.pad_type = "circular"
            module.pad = nn.CircularPad2d(module.pad_sizes)
        return module, (f"pad_off={module.pad_off}: output is not input / stride"
                        if module.pad_off else None)
    if isinstance(module, _OTHER_PADS):
        if min(module.padding) < 0:
            return module, "negative padding crops the map"
        return _CIRCULAR_PADS[len(module.padding) // 2](module.padding), None
    if isinstance(module, (CircularPool,) + tuple(_CIRCULAR_PADS.values())):
        return module, None
    own = [a for a in _PADDING_ATTRS if a in vars(module) and _pads(getattr(module, a))]
    if own:
        value = getattr(module, own[0])
        return module, f"{type(module).__name__} pads by itself ({own[0]}={value!r})"
    return module, None


def _pads(value: object) -> bool:
    """Whether an attribute value asks for padding (0, False, None, 'valid', 'circular' do not)."""
    if isinstance(value, str):
        return value not in ("valid", "circular")
    if isinstance(value, (tuple, list)):
        return any(_pads(v) for v in value)
    return bool(value) if isinstance(value, (int, float)) else value is not None


def _custom_forward(module: nn.Module, bases: tuple, methods: Sequence[str]) -> bool:
    """Whether ``module``'s class overrides any of ``methods`` of the torch class it extends."""
    base = next(c for c in type(module).__mro__ if c in bases)
    return any(getattr(type(module), m) is not getattr(base, m) for m in methods)


def _circular_conv(conv: nn.Module) -> None:
    # Recompute the F.pad amounts from `padding`, which callers may have changed after
    # construction; torch's 'same' puts the extra pad of an even kernel right/bottom.
    dims = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        pads = [0] * (2 * dims)
        if conv.padding == "same":
            for i, (d, k) in enumerate(zip(reversed(conv.dilation), reversed(conv.kernel_size))):
                total = d * (k - 1)
                pads[2 * i], pads[2 * i + 1] = total // 2, total - total // 2
    else:
        pads = [p for p in reversed(_tuple(conv.padding, dims)) for _ in range(2)]
    if any(pads):
        conv._reversed_padding_repeated_twice = pads
        conv.padding_mode = "circular"


def _grid_change(module: nn.Module) -> Optional[str]:
    """Why a window layer's output is not ``n / stride`` for n divisible by its stride, or None."""
    conv = isinstance(module, _CONVS)
    dims = len(module.kernel_size) if conv else _pool_dims(module)
    kernel, stride = _tuple(module.kernel_size, dims), _tuple(module.stride, dims)
    dilation = _tuple(getattr(module, "dilation", 1), dims)
    if conv and isinstance(module.padding, str):
        padding: Optional[tuple[int, ...]] = None if module.padding == "same" else (0,) * dims
    else:
        padding = _tuple(module.padding, dims)
    if padding is None:
        return None  # 'same' (stride 1 only) keeps the size by definition
    ceil = bool(getattr(module, "ceil_mode", False))
    for k, s, p, d in zip(kernel, stride, padding, dilation):
        n = _GRID_PROBE * s
        if _pool_out(n, k, s, p, d, ceil) != n // s:
            return (f"output is not input / stride (kernel {k}, stride {s}, padding {p}):"
                    " a window that shrinks or grows the map")
    return None


def has_zero_padding(model: nn.Module) -> bool:
    """True when a convolution or pool pads with zeros (or -inf): circular shifts then move the
    wrap seam against a fixed border, a boundary effect on top of aliasing."""
    return any((isinstance(module, nn.modules.conv._ConvNd) and module.padding_mode == "zeros"
                or isinstance(module, _POOLS)) and _pads(module.padding)
               for module in model.modules())
