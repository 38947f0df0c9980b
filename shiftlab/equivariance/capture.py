"""The hook owner: which layers are watched, how often each runs, and hooks always removed.

A layer is a (module, call number, output element): ``features.3``, ``relu#2`` (second call of a
shared module in one forward), ``block[0]`` (first tensor of a tuple output). With the default
selection the model's own output is a layer too when it holds maps (N, C, H, W) that no watched
module returned: ``output[out]`` of a segmentation model that upsamples with ``F.interpolate``
inside ``forward``.
"""
from __future__ import annotations

import fnmatch
import weakref
from collections import defaultdict
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import UsageError

LayerSelection = Union[None, str, Sequence[Union[str, type]]]
OnOutput = Callable[[str, torch.Tensor], None]

#: The layer name of the model's own output (``output``, ``output[out]`` for a dict).
OUTPUT = "output"


def select_modules(model: nn.Module, layers: LayerSelection = None) -> dict[str, nn.Module]:
    """The modules to watch, by qualified name, in registration order.

    ``layers`` is None (every leaf module; a BlurPool, or any module with a true
    ``shiftlab_layer`` attribute, counts as one leaf), or glob patterns on qualified names and/or module
    types (e.g. ``["features.*", nn.MaxPool2d]``, or by class name ``"type:MaxPool2d,BlurPool"``);
    a string may hold a comma list; patterns may select non-leaf modules.

    >>> list(select_modules(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())))
    ['0', '1']
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if layers is None:
        atomic = [name for name, m in named if _is_atomic(m)]
        chosen = {
            name: m for name, m in named
            if (_is_atomic(m) or not any(True for _ in m.children()))
            and not any(name.startswith(parent + ".") for parent in atomic)
        }
        if not chosen and not named:
            chosen = {OUTPUT: model}  # the model itself is a single leaf module
        return chosen
    if isinstance(layers, (str, type)):
        layers = [layers]
    bad = [p for p in layers if not isinstance(p, (str, type))]
    if bad:
        raise UsageError(f"a layer filter is a glob pattern or a module type, got {bad[0]!r}")
    patterns, type_names = split_filters([p for p in layers if isinstance(p, str)])
    types = tuple(t for t in layers if isinstance(t, type))
    chosen = {
        name: m for name, m in named
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) or (types and isinstance(m, types))
        or any(cls.__name__ in type_names for cls in type(m).__mro__)
    }
    if not chosen:
        sample = ", ".join(name for name, _ in named[:6])
        raise UsageError(
            f"layer filter {list(map(_describe, layers))} matches no module; names look like: {sample}")
    return chosen


def split_filters(items: Sequence[str]) -> tuple[list[str], set[str]]:
    """Name globs and type names (``type:A,B``; comma lists in either) of string filters."""
    patterns: list[str] = []
    type_names: set[str] = set()
    for item in items:
        if item.startswith("type:"):
            type_names.update(t.strip() for t in item[len("type:"):].split(",") if t.strip())
        else:
            patterns += [p.strip() for p in item.split(",") if p.strip()]
    return patterns, type_names


def _is_atomic(module: nn.Module) -> bool:
    """Composite modules watched as one layer by default (a BlurPool owns its padding child)."""
    return bool(getattr(module, "shiftlab_layer", False))


def _describe(item: Union[str, type]) -> str:
    return item if isinstance(item, str) else item.__name__


def flatten_output(name: str, output: object) -> Iterator[tuple[str, torch.Tensor]]:
    """(layer name, tensor) for every tensor in a module output (tuples, lists and dicts too)."""
    if isinstance(output, torch.Tensor):
        yield name, output
    elif isinstance(output, (tuple, list)):
        for index, item in enumerate(output):
            yield from flatten_output(f"{name}[{index}]", item)
    elif isinstance(output, dict):
        for key, item in output.items():
            yield from flatten_output(f"{name}[{key}]", item)
    elif hasattr(output, "_fields"):  # namedtuple-like (e.g. GoogLeNet outputs)
        for key in output._fields:
            yield from flatten_output(f"{name}[{key}]", getattr(output, key))


class LayerCapture:
    """Context manager that calls ``on_output(layer, tensor)`` for every watched output.

    The callback runs inside the forward hook, before any later in-place op (a ReLU with
    ``inplace=True``) can overwrite the tensor: reduce or clone there, never keep a reference.
    Hooks are removed in ``__exit__`` even when the forward raised.

    With ``layers=None`` the model's own output is watched too, as the layer ``output``
    (``output[out]``, ``output[aux]`` for a dict): each of its 4-D tensors (N, C, H, W) that is
    not the very tensor a watched module returned in the same forward. So a segmentation
    model's final ``F.interpolate`` is measured, and a classifier's logits are not counted twice.

    >>> seen = []
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    >>> with LayerCapture(net, on_output=lambda name, t: seen.append(name)):
    ...     _ = net(torch.zeros(1, 1, 8, 8))
    >>> seen
    ['0', '1']
    """

    def __init__(self, model: nn.Module, layers: LayerSelection = None,
                 on_output: Optional[OnOutput] = None) -> None:
        self.model = model
        self.modules = select_modules(model, layers)
        self.on_output = on_output
        self._handles: list = []
        self._calls: dict[str, int] = defaultdict(int)
        self.watch_output = layers is None and OUTPUT not in self.modules
        # the tensors watched modules returned in this forward, without keeping them alive
        self._returned: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def __enter__(self) -> "LayerCapture":
        try:
            # Call counts restart at every forward of the root, so `relu#2` means the same
            # thing in every pass.
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook_for(name)))
            if self.watch_output:
                self._handles.append(self.model.register_forward_hook(self._output_hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, *_: object) -> None:
        self._calls.clear()
        self._returned.clear()

    def _hook_for(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            self._calls[name] += 1
            count = self._calls[name]
            layer = name if count == 1 else f"{name}#{count}"
            for element, tensor in flatten_output(layer, output):
                if self.watch_output:
                    self._returned[id(tensor)] = tensor
                if self.on_output is not None:
                    self.on_output(element, tensor)
        return hook

    def _output_hook(self, model: nn.Module, inputs: object, output: object) -> None:
        """The model's own output maps that no watched module returned (see the class doc)."""
        if self.on_output is None:
            return
        for element, tensor in flatten_output(OUTPUT, output):
            if tensor.dim() == 4 and self._returned.get(id(tensor)) is not tensor:
                self.on_output(element, tensor)


def module_name(layer: str) -> str:
    """The qualified module name of a layer name: ``name#k[i]`` -> ``name``.

    The one reader of the layer-name grammar (``#k`` = k-th call in a forward, ``[i]`` = i-th
    tensor of the output) that ``LayerCapture`` writes.

    >>> module_name("layer1.0.relu#2[0]")
    'layer1.0.relu'
    """
    return layer.split("#")[0].split("[")[0]


def layer_module(model: nn.Module, layer: str) -> nn.Module:
    """The module that produced ``layer`` (strips ``#k`` and ``[i]`` suffixes)."""
    name = module_name(layer)
    if name == OUTPUT:
        return model
    return model.get_submodule(name)
