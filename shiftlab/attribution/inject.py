"""Forward-mode passes: the output's total Lie derivative, and each layer call's share v_i.

For a layer call f_i (input x_i, output y_i) its own Lie derivative is
L f_i = A(y_i) − J_{f_i}(x_i)[A(x_i)], and v_i = J_{>i}[L f_i] is the tangent of the model's
output when L f_i is injected at that call's output and nowhere else. One dual forward per
layer call: a forward pre-hook copies the call's inputs (an in-place op may overwrite them), the
forward hook calls the module again on make_dual(x, A(x)) for J·A(x) and returns the output as
make_dual(y, L f_i). The total L F = A(F(x)) − J_F(x)[A(x)] is one more dual forward, with
make_dual(x, A(x)) at the input. Hooks are removed in ``finally``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import defaultdict
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils import _pytree as pytree

from ..equivariance.capture import LayerSelection, select_modules
from ..equivariance.geometry import LayerInfo
from ..errors import ModelError, UsageError, one_line
from .lie import ShiftField, model_output


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a watched module: ``info.name`` is ``name`` or ``name#k`` (k-th call in a
    forward). ``active`` is False when no input or output tensor is spatial: then
    L f_i = 0 exactly and no pass is run."""

    info: LayerInfo
    module_name: str
    call: int
    active: bool
    module: nn.Module = dataclasses.field(repr=False, compare=False)


def check_not_nested(modules: dict[str, nn.Module]) -> None:
    """Refuse a selection where one module contains another (its share would count twice).

    >>> check_not_nested({"block": nn.Identity(), "block.conv": nn.Identity()})
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: layers 'block' and 'block.conv' are nested: the inner one's share would be counted twice; select one of them ...
    """
    chosen = set(modules)
    for name in modules:
        parts = name.split(".")
        for end in range(1, len(parts)):
            parent = ".".join(parts[:end])
            if parent in chosen:
                raise UsageError(f"layers {parent!r} and {name!r} are nested: the inner one's"
                                 " share would be counted twice; select one of them (a glob's *"
                                 " also matches '.': 'block.*' selects 'block.0' and"
                                 " 'block.0.conv')")


def _tensors(tree: object) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)
            and leaf.is_floating_point()]


def plan_calls(model: nn.Module, image: torch.Tensor, field: ShiftField,
               layers: LayerSelection = None) -> list[LayerCall]:
    """Every call of the watched modules in one forward of ``image`` (1, C, H, W), in execution
    order. Watched: every leaf module (a BlurPool counts as one), or ``layers`` (globs, types)."""
    modules = select_modules(model, layers)
    check_not_nested(modules)
    counts: dict[str, int] = defaultdict(int)
    calls: list[LayerCall] = []
    spatial_input: dict[str, bool] = {}

    def reset(*_: object) -> None:
        counts.clear()
        calls.clear()

    def before(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            spatial_input[name] = any(map(field.is_spatial, _tensors((args, kwargs))))
        return hook

    def after(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            counts[name] += 1  # every call counts, as in LayerCapture: `name#k` is the k-th
            k = counts[name]
            outputs = _tensors(output)
            if not outputs:
                return  # no floating tensor: not a layer
            info = field.describe(name if k == 1 else f"{name}#{k}", type(module).__name__,
                                  outputs[0])
            active = spatial_input.get(name, False) or any(map(field.is_spatial, outputs))
            calls.append(LayerCall(info, name, k, active, module))
        return hook

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(module.register_forward_hook(after(name)))
        with torch.no_grad():
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return list(calls)


class _Injection:
    """Hooks that inject L f_i at one layer call, as a context manager (removed on exit)."""

    def __init__(self, model: nn.Module, call: LayerCall, field: ShiftField, axis: str) -> None:
        self.model, self.call, self.field, self.axis = model, call, field, axis
        self.count = 0
        self.inside = False  # the module's second call (for J·A(x)) must not re-enter the hooks
        self.saved: Optional[tuple] = None
        self.injected = False
        self._handles: list = []

    def __enter__(self) -> "_Injection":
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._reset))
            module = self.call.module
            self._handles.append(module.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._after))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _reset(self, *_: object) -> None:
        if not self.inside:
            self.count, self.saved = 0, None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inside:
            return
        self.count += 1
        if self.count == self.call.call:
            self.saved = pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(),
                                              (args, kwargs))

    def _after(self, module: nn.Module, args: tuple, output: object) -> object:
        if self.inside or self.saved is None:
            return None
        saved, self.saved = self.saved, None
        self.injected = True
        pushed = self._jvp(module, saved)
        leaves, spec = pytree.tree_flatten(output)
        position = 0
        for index, leaf in enumerate(leaves):
            if not (isinstance(leaf, torch.Tensor) and leaf.is_floating_point()):
                continue
            primal = fwAD.unpack_dual(leaf).primal
            moved = self.field(primal, self.axis)
            tangent = pushed[position] if pushed is not None else None
            position += 1
            if moved is None and tangent is None:
                continue  # L f_i = 0 on this element
            own = (moved if moved is not None else 0) - (tangent if tangent is not None else 0)
            leaves[index] = fwAD.make_dual(primal, own)
        return pytree.tree_unflatten(leaves, spec)

    def _jvp(self, module: nn.Module, saved: tuple) -> Optional[list]:
        """J_{f_i}(x_i)[A(x_i)] per floating output tensor (None: every A(x_i) is 0)."""
        moved = False

        def dual(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal moved
            direction = self.field(tensor, self.axis)
            if direction is None:
                return tensor
            moved = True
            return fwAD.make_dual(tensor, direction)

        args, kwargs = pytree.tree_map_only(torch.Tensor, dual, saved)
        if not moved:
            return None
        self.inside = True
        try:
            output = module(*args, **kwargs)
        finally:
            self.inside = False
        return [fwAD.unpack_dual(t).tangent for t in _tensors(output)]


def tangent_of(output: object) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, dF) of a dual forward's output (F in the sense of :func:`model_output`); a missing
    tangent (the injected call does not reach the output) is zero."""
    primal, tangent = fwAD.unpack_dual(model_output(output))
    return primal, (torch.zeros_like(primal) if tangent is None else tangent)


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """The mode every pass runs in: no autograd graph, not inference mode (it drops tangents
    silently), attention on paths that have forward-mode formulas (the math kernel of
    scaled_dot_product_attention; no fused multi-head-attention fast path), and full float32
    convolutions and matrix products on a GPU (TF32's 1e-3 rounding would show as a remainder
    that no op made); every switch restored after."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.mha.set_fastpath_enabled(False)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(False), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), \
                warnings.catch_warnings():
            # torch's first make_dual loads its jvp decompositions through torch.jit.script,
            # which warns that it is deprecated: torch's own business, not the user's
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def total_pass(model: nn.Module, images: torch.Tensor, field: ShiftField,
               axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(F(x), L F) for images (B, C, H, W): one dual forward with A(x) = D x at the input."""
    with fwAD.dual_level(), _named_failure(model, "the total derivative"):
        inputs = images.clone()
        output, tangent = tangent_of(model(fwAD.make_dual(inputs, field(inputs, axis))))
        moved = field(output, axis)
        total = -tangent if moved is None else moved - tangent
        return output.detach().clone(), total


def layer_pass(model: nn.Module, images: torch.Tensor, call: LayerCall, field: ShiftField,
               axis: str) -> torch.Tensor:
    """v_i (the shape of the model's output) for one layer call: one dual forward with L f_i
    injected at that call."""
    with fwAD.dual_level(), _named_failure(model, call.info.name):
        with _Injection(model, call, field, axis) as injection:
            output = model(images.clone())
        if not injection.injected:
            raise ModelError(f"layer {call.info.name} was not called in this forward pass;"
                             " attribution needs the same layer calls for every input")
        return tangent_of(output)[1].clone()


@contextlib.contextmanager
def _named_failure(model: nn.Module, what: str) -> Iterator[None]:
    """A missing forward-mode formula, as one UsageError line naming the module that ran it."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as exc:
        text = one_line(exc)
        if "forward AD" not in text and "forward mode" not in text and "jvp" not in text:
            raise
        culprit = _innermost_module(model, exc)
        raise UsageError(f"{culprit} has no forward-mode derivative ({text[:160]}), needed for"
                         f" {what}; replace that op or module to attribute this model") from exc


def _innermost_module(model: nn.Module, exc: BaseException) -> str:
    """'module NAME (Type)' whose forward raised ``exc``: the innermost frame of the traceback
    whose ``self`` is one of the model's modules."""
    names = {id(module): name for name, module in model.named_modules()}
    found = None
    trace = exc.__traceback__
    while trace is not None:
        owner = trace.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        trace = trace.tb_next
    if found is None:
        return "an op of the model"
    name = names[id(found)]
    kind = type(found).__name__
    return f"module {name} ({kind})" if name else f"the model's own forward ({kind})"
