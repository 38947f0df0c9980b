"""Anti-aliased downsampling: ``BlurPool`` and ``antialias()`` (Zhang, ICML 2019).

The paper's recipe replaces every strided operation by "evaluate densely, blur, then subsample":

- ``MaxPool(k, s)``        -> ``MaxPool(k, stride=1)`` then ``BlurPool(stride=s)``
- strided ``Conv`` (s > 1) -> ``Conv(stride=1)`` -> its norm/ReLU -> ``BlurPool(stride=s)``
- ``AvgPool(s)``           -> ``BlurPool(stride=s)``

For torchvision's VGG, AlexNet, ResNet (ResNeXt, Wide ResNet), DenseNet and MobileNetV2 the
converted model has the module layout and ``state_dict`` keys of the published antialiased-cnns
models of the same name (FCN and DeepLabV3 get that ResNet layout in their ``backbone``), so their released checkpoints load with ``strict=True`` (DenseNet ones
may first need the old ``norm.1`` -> ``norm1`` key rename that antialiased-cnns' and torchvision's
DenseNet loaders apply). The code here is our own; only the layouts follow that project.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tvm
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.segmentation import DeepLabV3, FCN

from ..checks import check_count, check_filter_size
from ..errors import ModelError, UsageError

__all__ = ["BlurPool", "antialias", "binomial_filter", "ARCHES"]

# Pad layers by pad_type; 'refl'/'repl' are the spellings antialiased-cnns also accepts.
_PAD_LAYERS = {
    "reflect": nn.ReflectionPad2d,
    "refl": nn.ReflectionPad2d,
    "replicate": nn.ReplicationPad2d,
    "repl": nn.ReplicationPad2d,
    "zero": nn.ZeroPad2d,
    "circular": nn.CircularPad2d,
}
ARCHES = ("vgg", "alexnet", "resnet", "densenet", "mobilenet_v2", "generic")


def binomial_filter(filt_size: int) -> torch.Tensor:
    """Return the normalised 2-D binomial filter of side ``filt_size``: shape ``(k, k)``, sum 1.

    Example:
        >>> binomial_filter(3) * 16
        tensor([[1., 2., 1.],
                [2., 4., 2.],
                [1., 2., 1.]])
    """
    check_filter_size(filt_size)
    row = torch.tensor([math.comb(filt_size - 1, i) for i in range(filt_size)], dtype=torch.float64)
    filt = torch.outer(row, row)
    return (filt / filt.sum()).to(torch.float32)


class BlurPool(nn.Module):
    """Depthwise binomial blur followed by subsampling (the paper's anti-aliased downsampling).

    Args:
        channels: number of input channels C (the filter is applied to each channel separately).
        filt_size: filter side k in 1..7; 1 is plain subsampling, 2 a box filter, 3+ binomial.
        stride: subsampling factor s >= 1.
        pad_type: 'reflect' (or 'refl'), 'replicate' (or 'repl'), 'zero' or 'circular'.
        pad_off: extra padding added on every side (an int, may not make any pad negative).

    Shapes: input ``(N, C, H, W)``; output ``(N, C, ceil(H'/s), ceil(W'/s))`` with
    ``H' = H + 2*pad_off`` (for k = 1 without pad_off, ``x[:, :, ::s, ::s]``).

    The filter is the registered buffer ``filt`` of shape ``(C, 1, k, k)`` and the padding is the
    child module ``pad``, as in antialiased-cnns, so state dicts of its models match.

    Example:
        >>> pool = BlurPool(64, filt_size=4, stride=2)
        >>> pool(torch.zeros(1, 64, 32, 32)).shape
        torch.Size([1, 64, 16, 16])
    """

    shiftlab_layer = True  # shiftlab.equivariance.capture records a BlurPool as one layer, not its pad child

    def __init__(self, channels: int, filt_size: int = 4, stride: int = 2,
                 pad_type: str = "reflect", pad_off: int = 0) -> None:
        super().__init__()
        check_count("channels", channels)
        check_filter_size(filt_size)
        check_count("stride", stride)
        if pad_type not in _PAD_LAYERS:
            raise UsageError(f"pad_type must be one of {sorted(_PAD_LAYERS)}, got {pad_type!r}")
        if isinstance(pad_off, bool) or not isinstance(pad_off, int):
            raise UsageError(f"pad_off must be an int, got {pad_off!r}")
        low = (filt_size - 1) // 2           # the extra pad of an even filter goes right/bottom
        high = filt_size - 1 - low
        if low + pad_off < 0:
            raise UsageError(f"pad_off must be >= {-low} for filt_size={filt_size}, got {pad_off}")
        self.channels, self.filt_size, self.stride = channels, filt_size, stride
        self.pad_type, self.pad_off = pad_type, pad_off
        self.pad_sizes = [low + pad_off, high + pad_off, low + pad_off, high + pad_off]
        self.pad = _PAD_LAYERS[pad_type](self.pad_sizes)
        filt = binomial_filter(filt_size)[None, None].repeat(channels, 1, 1, 1)
        self.register_buffer("filt", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blur and subsample ``x`` of shape ``(N, C, H, W)``."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ModelError(f"BlurPool({self.channels}) needs input (N, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        limit = max(self.pad_sizes) + (self.pad_type != "circular")  # reflect needs pad < size
        if self.pad_type in ("reflect", "refl", "circular") and min(x.shape[-2:]) < limit:
            raise ModelError(f"BlurPool with pad_type={self.pad_type!r} needs H, W >= {limit}, "
                             f"got {tuple(x.shape[-2:])}: use a larger input or pad_type='zero'")
        if self.filt_size == 1:
            # A 1x1 filter of weight 1: skip the convolution, keep exact values.
            x = self.pad(x) if self.pad_off else x
            return x[:, :, ::self.stride, ::self.stride]
        return F.conv2d(self.pad(x), self.filt, stride=self.stride, groups=self.channels)

    def extra_repr(self) -> str:
        return (f"{self.channels}, filt_size={self.filt_size}, stride={self.stride}, "
                f"pad_type={self.pad_type!r}, pad_off={self.pad_off}")


def antialias(model: nn.Module, filt_size: int = 4, copy_weights: bool = True,
              pad_type: str = "reflect", arch: Optional[str] = None) -> nn.Module:
    """Return an anti-aliased copy of ``model``; ``model`` itself is not modified.

    torchvision VGG, AlexNet, ResNet/ResNeXt/Wide ResNet, DenseNet and MobileNetV2 get the layout
    of the antialiased-cnns model of the same name (stems kept strided where that project keeps
    them: ResNet ``conv1``, DenseNet ``conv0``, MobileNetV2 ``features.0``; AlexNet's stride-4
    ``conv1`` becomes stride 2 + BlurPool(2)). FCN and DeepLabV3 with a ResNet backbone get the
    ResNet layout in ``backbone``; its dilated stages (``replace_stride_with_dilation``: layer3
    and layer4 run at stride 1 with dilation 2 and 4) have no stride to convert and keep their
    dilation. Any other module is converted by the generic rules;
    the strided modules that cannot be converted are listed in ``model.shiftlab_unconverted``
    (qualified names in the returned model) and reported with a ``UserWarning``.

    Args:
        model: any ``nn.Module``; architecture found by ``isinstance`` on torchvision classes.
        filt_size: BlurPool filter side, 1..7 (1 = plain subsampling).
        copy_weights: keep every parameter and buffer of ``model`` (True), or re-initialise each
            layer with PyTorch's default ``reset_parameters`` (False).
        pad_type: BlurPool padding: 'reflect', 'replicate', 'zero' or 'circular'.
        arch: force one of ``ARCHES`` instead of detecting it; 'generic' = rules only.

    Returns:
        The converted model, with attribute ``shiftlab_unconverted: list[str]``.

    Example:
        >>> import torchvision
        >>> aa = antialias(torchvision.models.resnet18(), filt_size=4)
        >>> aa.layer2[0].conv2[0].filt.shape
        torch.Size([128, 1, 4, 4])
    """
    BlurPool(1, filt_size=filt_size, stride=2, pad_type=pad_type)  # validates the blur arguments
    if arch is None:
        arch = _detect_arch(model)
    elif arch not in ARCHES:
        raise UsageError(f"arch must be one of {ARCHES}, got {arch!r}")
    blur = functools.partial(BlurPool, filt_size=filt_size, pad_type=pad_type)
    new = copy.deepcopy(model)
    try:
        kept = _CONVERTERS[arch](new, blur)
    except (AttributeError, TypeError, IndexError, KeyError) as err:
        raise ModelError(f"model does not have the {arch!r} layout ({err}); "
                         "pass arch='generic' to use the generic rules only") from err
    unconverted = _convert_generic(new, blur, skip={id(m) for m in kept})
    if not copy_weights:
        for module in new.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    names = {id(m): name for name, m in new.named_modules()}
    new.shiftlab_unconverted = [names.get(id(m), "") for m in unconverted]
    if unconverted:
        warnings.warn("antialias: could not convert these downsampling modules (kept as they "
                      f"are): {new.shiftlab_unconverted}", UserWarning, stacklevel=2)
    return new


# ---------------------------------------------------------------------------------------------
# machinery

_Blur = Callable[..., BlurPool]
# A BlurPool after a strided conv goes after these. GroupNorm/LayerNorm/InstanceNorm then see the
# full-resolution map, so unlike eval-mode BatchNorm they do not commute with the subsampling.
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm, nn.LocalResponseNorm)
_ACTS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
         nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
# Modules that keep the channel count, so a later pool's BlurPool can reuse the known count.
_SAME_CHANNELS = _NORMS + _ACTS + (nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d,
                                   nn.AvgPool2d, nn.ZeroPad2d, nn.ReflectionPad2d)
# Downsamplers the rules do not cover: reported, never silently kept.
_OTHER_DOWNSAMPLERS = (nn.Conv1d, nn.Conv3d, nn.MaxPool1d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool3d,
                       nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)


def _detect_arch(model: nn.Module) -> str:
    for cls, arch in ((tvm.VGG, "vgg"), (tvm.AlexNet, "alexnet"), (tvm.ResNet, "resnet"),
                      (tvm.DenseNet, "densenet"), (tvm.MobileNetV2, "mobilenet_v2")):
        if isinstance(model, cls):
            return arch
    if isinstance(model, (FCN, DeepLabV3)) and isinstance(getattr(model.backbone, "layer4", None),
                                                           nn.Sequential):
        return "resnet"  # a (dilated) ResNet backbone
    return "generic"


def _stride(module: nn.Module) -> Optional[int]:
    """The module's stride as one int, or None when it differs between H and W."""
    s = module.stride
    sh, sw = (s, s) if isinstance(s, int) else tuple(s)
    return sh if sh == sw else None


def _is_strided(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _stride(module) != 1


def _dense_maxpool(pool: nn.MaxPool2d) -> nn.MaxPool2d:
    # Same window, stride 1: sampling it every s-th position is exactly MaxPool(k, s).
    return nn.MaxPool2d(pool.kernel_size, stride=1, padding=pool.padding,
                        dilation=pool.dilation, ceil_mode=pool.ceil_mode)


def _set_children(seq: nn.Sequential, items: list[tuple[str, nn.Module]]) -> None:
    """Replace the children of ``seq`` in place (keeps its class); renumber an indexed one."""
    if all(name.isdigit() for name in seq._modules):
        items = [(str(i), m) for i, (_, m) in enumerate(items)]
    seq._modules = OrderedDict(items)


def _out_channels(module: nn.Module, current: Optional[int]) -> Optional[int]:
    """Channel count after ``module`` given ``current`` before it; None when unknown."""
    for attr in ("out_channels", "num_features", "num_channels", "channels"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    if isinstance(module, _SAME_CHANNELS):
        return current
    if type(module).forward is nn.Sequential.forward:
        for child in module.children():
            current = _out_channels(child, current)
        return current
    return None


def _convert_sequential(seq: nn.Sequential, blur: _Blur, skip: set[int],
                        failed: list[nn.Module]) -> None:
    """Apply the three rules to the direct children of a plain-forward Sequential, in place."""
    items = list(seq._modules.items())
    out: list[tuple[str, nn.Module]] = []
    channels: Optional[int] = None
    pending: Optional[tuple[int, int, str]] = None  # (stride, channels, name) of a strided conv
    for name, module in items:
        if pending and not isinstance(module, _NORMS + _ACTS):
            out.append((pending[2] + "_blurpool", blur(pending[1], stride=pending[0])))
            pending = None
        s = _stride(module) if _is_strided(module) and id(module) not in skip else 1
        if s is None:
            failed.append(module)
        elif s > 1 and isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
            pending = (s, module.out_channels, name)  # BlurPool goes after the conv's norm/act
        elif s > 1 and channels is not None and not getattr(module, "return_indices", False):
            if isinstance(module, nn.MaxPool2d):
                out += [(name, _dense_maxpool(module)),
                        (name + "_blurpool", blur(channels, stride=s))]
            else:  # AvgPool2d: the blur replaces the box filter
                out.append((name, blur(channels, stride=s)))
            continue
        elif s > 1:
            failed.append(module)  # a pool whose channel count is not known here
        out.append((name, module))
        channels = _out_channels(module, channels)
    if pending:
        out.append((pending[2] + "_blurpool", blur(pending[1], stride=pending[0])))
    _set_children(seq, out)


def _convert_generic(model: nn.Module, blur: _Blur, skip: set[int]) -> list[nn.Module]:
    """Convert what the rules cover anywhere in ``model``; return the modules left strided."""
    failed: list[nn.Module] = []
    for parent in list(model.modules()):
        if isinstance(parent, BlurPool):
            continue
        if type(parent).forward is nn.Sequential.forward:
            _convert_sequential(parent, blur, skip, failed)
            continue
        for name, child in list(parent.named_children()):
            if id(child) in skip or not _is_strided(child):
                continue
            s = _stride(child)
            if isinstance(child, nn.Conv2d) and s is not None:
                # No Sequential to insert into: the BlurPool follows the conv directly.
                child.stride = (1, 1)
                setattr(parent, name, nn.Sequential(child, blur(child.out_channels, stride=s)))
            else:
                failed.append(child)  # a pool outside a Sequential: channel count unknown
    if _is_strided(model) and id(model) not in skip:
        failed.append(model)  # the model itself is one strided layer: nothing to insert into
    for module in model.modules():
        if isinstance(module, _OTHER_DOWNSAMPLERS) and id(module) not in skip:
            stride = getattr(module, "stride", 2)
            if any(v != 1 for v in (stride if isinstance(stride, tuple) else (stride,))):
                failed.append(module)
    return list({id(m): m for m in failed}.values())  # a shared module is reported once


def _convert_vgg(model: tvm.VGG, blur: _Blur) -> list[nn.Module]:
    # antialiased-cnns vgg.py: each MaxPool(2, 2) in `features` -> MaxPool(2, 1), BlurPool(C);
    # later indices shift by one per pool (features.3 is the first BlurPool).
    _convert_sequential(model.features, blur, set(), [])
    return []


def _convert_alexnet(model: tvm.AlexNet, blur: _Blur) -> list[nn.Module]:
    # antialiased-cnns alexnet.py: conv1 stride 4 -> stride 2, ReLU, BlurPool(64, 2) (a stride-1
    # conv1 would cost 4x more); every MaxPool(3, 2) -> MaxPool(3, 1), BlurPool(C).
    conv = model.features[0]
    s = _stride(conv)
    if s is not None and s > 1 and s % 2 == 0:
        conv.stride = (s // 2, s // 2)
        items = list(model.features._modules.items())
        items.insert(2, ("2", blur(conv.out_channels, stride=2)))
        _set_children(model.features, items)
    _convert_sequential(model.features, blur, {id(conv)}, [])
    return [conv]


def _convert_resnet(model: nn.Module, blur: _Blur) -> list[nn.Module]:
    # antialiased-cnns resnet.py (pool_only=True): conv1 keeps stride 2; the stem pool becomes
    # Sequential(MaxPool(kernel 2, stride 1), BlurPool(64)) -- kernel 2 without padding, not
    # torchvision's MaxPool(3, 2, padding 1), so checkpoints see the pooling they were trained on.
    # FCN/DeepLabV3: the same in the backbone (an IntermediateLayerGetter with ResNet's children);
    # a dilated block has stride 1 everywhere, so the checks below leave it as it is.
    if isinstance(model, (FCN, DeepLabV3)):
        model = model.backbone
    model.maxpool = nn.Sequential(nn.MaxPool2d(kernel_size=2, stride=1),
                                  blur(model.bn1.num_features, stride=_stride(model.maxpool)))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            # BasicBlock strides in conv1, Bottleneck in conv2; the BlurPool is placed before the
            # next conv (conv2.0 / conv3.0): after its ReLU, as the rule says.
            if isinstance(block, BasicBlock) and _stride(block.conv1) != 1:
                s, block.conv1.stride = _stride(block.conv1), (1, 1)
                block.conv2 = nn.Sequential(blur(block.conv2.in_channels, stride=s), block.conv2)
            elif isinstance(block, Bottleneck) and _stride(block.conv2) != 1:
                s, block.conv2.stride = _stride(block.conv2), (1, 1)
                block.conv3 = nn.Sequential(blur(block.conv3.in_channels, stride=s), block.conv3)
            down = block.downsample
            if isinstance(down, nn.Sequential) and _stride(down[0]) != 1:
                # 1x1 conv then blur == blur then 1x1 conv (both linear); blurring first is cheaper.
                s, down[0].stride = _stride(down[0]), (1, 1)
                block.downsample = nn.Sequential(blur(down[0].in_channels, stride=s), *down)
    return [model.conv1]


def _convert_densenet(model: tvm.DenseNet, blur: _Blur) -> list[nn.Module]:
    # antialiased-cnns densenet.py: features.conv0 keeps stride 2; pool0 MaxPool(3, 2, 1) becomes
    # max0 = MaxPool(3, 1, 1) and pool0 = BlurPool; every transition's AvgPool `pool` -> BlurPool.
    items: list[tuple[str, nn.Module]] = []
    for name, module in model.features.named_children():
        if name == "pool0" and isinstance(module, nn.MaxPool2d):
            items += [("max0", _dense_maxpool(module)),
                      ("pool0", blur(model.features.conv0.out_channels, stride=_stride(module)))]
        else:
            items.append((name, module))
            if name.startswith("transition"):
                _convert_sequential(module, blur, set(), [])
    _set_children(model.features, items)
    return [model.features.conv0]


def _convert_mobilenet_v2(model: tvm.MobileNetV2, blur: _Blur) -> list[nn.Module]:
    # antialiased-cnns mobilenet.py: in each strided inverted residual the depthwise conv runs at
    # stride 1 and a BlurPool(hidden) follows its ConvBNReLU (conv.N+1); features.0 keeps stride 2.
    for block in model.features:
        if not isinstance(block, InvertedResidual):
            continue
        items = list(block.conv._modules.items())
        for i, (_, unit) in enumerate(items):
            if isinstance(unit, nn.Sequential) and _is_strided(unit[0]):
                s, unit[0].stride = _stride(unit[0]), (1, 1)
                items.insert(i + 1, ("blur", blur(unit[0].out_channels, stride=s)))
                break
        _set_children(block.conv, items)
    # Its classifier is Sequential(Linear) (no Dropout): key classifier.0, not classifier.1.
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    if len(linears) == 1:
        model.classifier = nn.Sequential(linears[0])
    return [model.features[0][0]]


_CONVERTERS: dict[str, Callable[[nn.Module, _Blur], list[nn.Module]]] = {
    "vgg": _convert_vgg,
    "alexnet": _convert_alexnet,
    "resnet": _convert_resnet,
    "densenet": _convert_densenet,
    "mobilenet_v2": _convert_mobilenet_v2,
    "generic": lambda model, blur: [],
}
