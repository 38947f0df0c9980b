"""attribute(): each layer call's share of the change of a model's output under a continuous
translation of its input, streamed over image batches.

Per image batch and axis: one dual forward for the total L F, then one per layer call whose
input or output is spatial (the others have L f_i = 0 exactly). Each pass is reduced at once to
per-image sums (‖v_i‖², ⟨v_i, L F⟩, Σ v_i) on the model's device, in float64; they reach the
host once per batch. Memory depends on the batch and the model, never on the number of images.
"""
from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import numpy as np
import torch
from torch import nn
from tqdm import tqdm  # plain bar, as the heatmap engine's

from ..checks import check_choice, check_count, check_model_has_data, labelled_batches
from ..defaults import BATCH_SIZE
from ..equivariance.capture import LayerSelection
from ..equivariance.engine import evaluation_mode, resolve_device, to_device
from ..equivariance.geometry import LayerInfo
from ..errors import ModelError, UsageError
from ..results.provenance import InputDigest, Provenance, versions
from .inject import LayerCall, forward_mode, layer_pass, plan_calls, total_pass
from .lie import ShiftField, probability_derivative, softmax_jvp
from .result import AttributionResult
from .settings import AXES, DTYPES, OUTPUT_SPACES, AttributionSettings

Images = Union[torch.Tensor, Iterable]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def attribute(model: nn.Module, images: Images, *, axis: str = "both", output: str = "logits",
              layers: LayerSelection = None, batch_size: int = BATCH_SIZE,
              device: Union[str, torch.device, None] = "auto", dtype: str = "float32",
              progress: Optional[bool] = None,
              provenance: Optional[Provenance] = None) -> AttributionResult:
    """Each layer call's share of the output's Lie derivative under input translation.

    L F = A(F(x)) − J_F(x)[D x] is the derivative of the output under a band-limited
    translation of the input (for a classifier: d/dt F(T_t x) at 0). Each layer call f_i adds
    v_i = J_{>i}[L f_i], its own Lie derivative carried to the output; the v_i of every module
    call and op add up to L F exactly, and what the non-module ops (``torch.flatten``, ``+``,
    ``F.relu`` in a forward) and unselected modules add is reported as the remainder.
    Definitions: docs/semantics.md, section 10.

    Args:
        model: any ``nn.Module`` taking (N, C, H, W); run in eval mode (its modes restored
            after), moved to ``device`` (a float64 run works on a float64 copy).
        images: (N, C, H, W), or an iterable of such batches (``shiftlab.image_batches``, a
            DataLoader): streamed, never all in memory.
        axis: 'horizontal' (along W), 'vertical' (along H) or 'both' (squared norms added).
        output: 'logits' (the model's output) or 'probabilities' (its softmax over dim 1).
        layers: None (every leaf module call; a BlurPool counts as one) or globs / module types,
            as :func:`shiftlab.measure` takes them; nested modules are refused.
        batch_size: images per forward pass; device: 'auto', 'cpu', 'cuda', ...
        dtype: 'float32' or 'float64' (for checks to 1e-10).
        progress: tqdm bar (None: only on a terminal).
        provenance: where the model and images came from (``shiftlab.runs`` fills it).

    Returns:
        An :class:`~shiftlab.attribution.result.AttributionResult`: per image and layer call
        ‖v_i‖ and the share ⟨v_i, L F⟩ / ‖L F‖²; per image ‖L F‖, the remainder and the LEE.

    Example:
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 4, 3, **circular), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(4, 3)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> result = shiftlab.attribute(net, images, dtype="float64", progress=False)
        >>> result
        AttributionResult(result: 7 layers, axis both, logits, 2 images)
        >>> summary = result.summary().set_index("layer")
        >>> summary.loc[["1", "2"], ["module", "stride", "mean_share"]].round(3)
                  module  stride  mean_share
        layer
        1           ReLU     1.0       0.972
        2      MaxPool2d     2.0       0.028
        >>> float(summary.loc[["0", "3", "4"], "mean_share"].abs().max()) < 1e-12  # convs, pool
        True
        >>> (result.shares.sum(1) + result.remainder_share).round(12).tolist()  # exactly 1
        [1.0, 1.0]
    """
    check_choice("axis", axis, AXES)
    check_choice("output space", output, OUTPUT_SPACES)
    check_choice("dtype", dtype, DTYPES)
    check_count("batch_size", batch_size)
    batches = (tensor for tensor, _ in labelled_batches(images))
    first = next(batches, None)
    if first is None:
        raise UsageError("no images to attribute")
    device = resolve_device(device)
    name = (provenance.label or provenance.model or None) if provenance is not None else None
    check_model_has_data(model, name)
    started = time.perf_counter()
    digest = InputDigest()
    with evaluation_mode(model, name):
        work = _prepared(model, device, _DTYPES[dtype])
        run = _Run(work, first, layers, output, device, _DTYPES[dtype])
        settings = AttributionSettings(axis=axis, output=output, dtype=dtype,
                                       size=tuple(first.shape[-2:]), layers=_selection(layers),
                                       padding=getattr(model, "shiftlab_padding", "as-trained"))
        rows = []
        streamed = not isinstance(images, torch.Tensor)
        per_batch = len(settings.axes) * (1 + sum(call.active for call in run.calls))
        total = None if streamed else -(-len(first) // batch_size) * per_batch
        with _bar(total, progress) as bar:
            for batch in itertools.chain([first], batches):
                if tuple(batch.shape[1:]) != tuple(first.shape[1:]):
                    raise UsageError(f"a batch has images of shape {tuple(batch.shape[1:])}, the"
                                     f" first had {tuple(first.shape[1:])}; every image must have"
                                     " the same size")
                digest.update(batch)
                for start in range(0, len(batch), batch_size):
                    rows.append(run.batch(batch[start:start + batch_size], settings.axes, bar))
    provenance = (provenance or Provenance()).replace(
        n_images=sum(len(r) for r in rows), seconds=round(time.perf_counter() - started, 3),
        device=str(device), versions=versions(), input_digest=digest.hexdigest())
    return _result(settings, [call.info for call in run.calls], np.concatenate(rows), provenance)


@dataclass(frozen=True)
class LayerTangents:
    """One batch's tangents along one axis, each shaped like the model's output (B, ...):
    ``output`` F(x), ``total`` L F and ``layers`` each call's v_i (in network order), in the
    output space asked for; ``remainder`` = total − Σ v_i (the non-module ops' part)."""

    output: torch.Tensor
    total: torch.Tensor
    layers: dict[str, torch.Tensor]
    infos: list[LayerInfo]

    @property
    def remainder(self) -> torch.Tensor:
        return self.total - sum(self.layers.values(), torch.zeros_like(self.total))


def layer_tangents(model: nn.Module, images: torch.Tensor, *, axis: str = "horizontal",
                   output: str = "logits", layers: LayerSelection = None) -> LayerTangents:
    """The tangent vectors behind :func:`attribute` for one batch (B, C, H, W) along one axis,
    on the model's device and in the images' dtype (checks and figures of single images).

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten()).double().eval()
    >>> tangents = layer_tangents(net, torch.randn(1, 1, 8, 8, dtype=torch.float64))
    >>> list(tangents.layers), float(tangents.remainder.abs().max()) < 1e-12
    (['0', '1', '2'], True)
    """
    check_choice("axis", axis, AXES[:2])
    check_choice("output space", output, OUTPUT_SPACES)
    with evaluation_mode(model):
        run = _Run(model, images, layers, output, images.device, images.dtype)
        with forward_mode():
            out, total, _ = run.total(images, axis)
            found = {call.info.name: run.tangent(images, call, axis, out) for call in run.calls}
    return LayerTangents(out, total, found, [call.info for call in run.calls])


class _Run:
    """The model's field (A of every tensor), its layer calls, and the per-batch reduction."""

    def __init__(self, model: nn.Module, first: torch.Tensor, layers: LayerSelection,
                 output: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model, self.output, self.device, self.dtype = model, output, device, dtype
        self.field = ShiftField.probe(model, first.shape[1:], device, dtype)
        sample = first[:1].to(device=device, dtype=dtype)
        self.calls: list[LayerCall] = plan_calls(model, sample, self.field, layers)
        if not self.calls:
            raise UsageError("no layer call produced a tensor; check the layer filter")

    def total(self, images: torch.Tensor, axis: str):
        """(F, total in the output space, L softmax(F) or None for a 1-D output)."""
        out, logits = total_pass(self.model, images, self.field, axis)
        if out.dim() == 0 or out.shape[0] != len(images):
            raise ModelError(f"the model's output has shape {tuple(out.shape)} for a batch of"
                             f" {len(images)}; attribution needs one output per image")
        if out.dim() < 2:
            if self.output == "probabilities":
                raise UsageError("output='probabilities' takes a softmax over dim 1, but the"
                                 f" model's output has shape {tuple(out.shape)}; use 'logits'")
            return out, logits, None
        probabilities = probability_derivative(out, logits, self.field, axis)
        return out, (logits if self.output == "logits" else probabilities), probabilities

    def tangent(self, images: torch.Tensor, call: LayerCall, axis: str,
                out: torch.Tensor) -> torch.Tensor:
        """v_i of one call in the output space (zero without a pass for an inactive call)."""
        if not call.active:
            return torch.zeros_like(out)
        tangent = layer_pass(self.model, images, call, self.field, axis)
        if self.output == "probabilities":
            tangent = softmax_jvp(torch.softmax(out, dim=1), tangent)
        return tangent

    def batch(self, images: torch.Tensor, axes: tuple[str, ...], bar: tqdm) -> np.ndarray:
        """(B, 2L + 4) float64 rows: ‖v_i‖², ⟨v_i, L F⟩, ‖L F‖², ‖r‖², ⟨r, L F⟩, LEE."""
        images = to_device(images, self.device).to(self.dtype)
        size, n_layers = len(images), len(self.calls)
        sums = torch.zeros(size, 2 * n_layers + 3, dtype=torch.float64, device=self.device)
        lee = None
        with forward_mode():
            for axis in axes:
                out, total, probabilities = self.total(images, axis)
                bar.update(1)
                target = total.reshape(size, -1).double()
                summed = torch.zeros_like(target)
                for j, call in enumerate(self.calls):
                    if not call.active:
                        continue
                    v = self.tangent(images, call, axis, out).reshape(size, -1).double()
                    sums[:, j] += (v * v).sum(1)
                    sums[:, n_layers + j] += (v * target).sum(1)
                    summed += v
                    bar.update(1)
                rest = target - summed
                sums[:, 2 * n_layers] += (target * target).sum(1)
                sums[:, 2 * n_layers + 1] += (rest * rest).sum(1)
                sums[:, 2 * n_layers + 2] += (rest * target).sum(1)
                if probabilities is not None:
                    square = probabilities.reshape(size, -1).double() ** 2
                    lee = square if lee is None else lee + square
        lee = (lee.sqrt().mean(1) if lee is not None
               else torch.full((size,), float("nan"), dtype=torch.float64, device=self.device))
        return torch.cat([sums, lee[:, None]], 1).cpu().numpy()


def _result(settings: AttributionSettings, infos: list[LayerInfo], rows: np.ndarray,
            provenance: Provenance) -> AttributionResult:
    n = len(infos)
    norm_sq, inner = rows[:, :n], rows[:, n:2 * n]
    total_sq, rest_sq, rest_inner, lee = (rows[:, 2 * n + k] for k in range(4))
    defined = total_sq > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.where(defined[:, None], inner / np.where(defined, total_sq, 1.0)[:, None], np.nan)
        rest_share = np.where(defined, rest_inner / np.where(defined, total_sq, 1.0), np.nan)
    return AttributionResult(settings=settings, layers=infos, norms=np.sqrt(norm_sq),
                             shares=shares, total=np.sqrt(total_sq),
                             remainder_norm=np.sqrt(rest_sq), remainder_share=rest_share,
                             lee=lee, provenance=provenance)


def _prepared(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model on ``device`` in ``dtype``: moved in place, as the heatmap engine does; a copy
    when its floating tensors have another dtype (the caller's model keeps its own)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        model = copy.deepcopy(model).to(dtype)
    return model.to(device)


def _selection(layers: LayerSelection) -> Optional[tuple[str, ...]]:
    if layers is None:
        return None
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    return tuple(item if isinstance(item, str) else item.__name__ for item in items)


def _bar(total: Optional[int], progress: Optional[bool]) -> tqdm:
    return tqdm(total=total, desc="attributing", unit="pass",
                disable=None if progress is None else not progress, leave=False)
