"""shiftlab: see where shift-equivariance is lost inside a convolutional network.

One line for the whole job, the same pipeline the CLI runs (``shiftlab.runs``); here a
randomly initialised ResNet-18 on two of the shipped sample photos at 32 px:

>>> import shiftlab
>>> result = shiftlab.runs.heatmap("resnet18", weights="none", size=32, max_shift=2,
...                                max_images=2, layers="conv1,maxpool", progress=False)
>>> result
Result(resnet18: 2 layers x 4 shifts, circular/bilinear/cosine, 2 images)
>>> result.map("maxpool").round(3)          # rows: dh = 0, 1; columns: dw = 0, 1
array([[0.   , 0.027],
       [0.027, 0.045]])

The keywords build one typed request, validated when built; a script can build it itself
and run it whole (what the CLI does):

>>> request = shiftlab.HeatmapRequest(
...     shiftlab.ModelSpec("resnet18", weights="none"),
...     inputs=shiftlab.Inputs(size=32, max_images=2), shifts=shiftlab.Shifts(max_shift=2),
...     comparison=shiftlab.LayerComparison(layers=("maxpool",)))
>>> shiftlab.runs.measure_heatmap(request, progress=False).map("maxpool").round(3)
array([[0.   , 0.027],
       [0.027, 0.045]])

or the engine on your own model and images:

>>> import torch
>>> _ = torch.manual_seed(0)
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"),
...                           torch.nn.MaxPool2d(2)).eval()
>>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
>>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4))
>>> result.map("1").round(3)                # the max-pool: exact at even shifts only
array([[0.   , 0.082, 0.   , 0.082],
       [0.102, 0.128, 0.102, 0.128],
       [0.   , 0.082, 0.   , 0.082],
       [0.102, 0.128, 0.102, 0.128]])

What every number means: docs/semantics.md.
"""
# The public names are imported on first use (PEP 562), not here: `import shiftlab` must not
# pull in torch, so the command line can start, and be interrupted, before the heavy imports.
from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__

_EXPORTS = {
    "ShiftlabError": "errors", "UsageError": "errors",
    "ShiftGrid": "equivariance.shifts",
    "LayerInfo": "equivariance.geometry", "probe_layers": "equivariance.geometry",
    "LayerCapture": "equivariance.capture",
    "Provenance": "results.provenance",
    "Result": "results.result", "Settings": "results.result", "load": "results.result",
    "measure": "equivariance.engine",
    "measure_invariance": "invariance.grid",
    "InvarianceResult": "invariance.grid_result", "load_invariance": "invariance.grid_result",
    "uninformative_across": "invariance.grid_result",
    "consistency_protocol": "invariance.protocols", "diagonal_protocol": "invariance.protocols",
    "load_protocol": "invariance.protocols",
    "BlurPool": "models.antialias", "antialias": "models.antialias",
    "circular_padding": "models.padding",
    "Comparison": "results.comparison", "compare": "results.comparison",
    "load_model": "models.zoo",
    "load_images": "data.images", "sample_image_paths": "data.images",
    "ImageDataset": "data.sources", "image_batches": "data.sources",
    "CompareRequest": "requests", "ConsistencyRequest": "requests", "HeatmapRequest": "requests",
    "Inputs": "requests", "LayerComparison": "requests", "ModelSpec": "requests",
    "Shifts": "requests",
    "attribute": "attribution.engine", "AttributionResult": "attribution.result",
    "load_attribution": "attribution.result", "AttributionRequest": "requests",
    "measure_dense": "invariance.dense", "DenseResult": "invariance.dense_result",
    "load_dense": "invariance.dense_result", "read_mask_pairs": "data.masks",
    "mask_batches": "data.masks",
}
_SUBMODULES = ("runs",)

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # imported once; later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import runs
    from .data.images import load_images, sample_image_paths
    from .data.sources import ImageDataset, image_batches
    from .equivariance.capture import LayerCapture
    from .equivariance.engine import measure
    from .equivariance.geometry import LayerInfo, probe_layers
    from .equivariance.shifts import ShiftGrid
    from .errors import ShiftlabError, UsageError
    from .invariance.grid import measure_invariance
    from .invariance.grid_result import InvarianceResult, load_invariance, uninformative_across
    from .invariance.protocols import consistency_protocol, diagonal_protocol, load_protocol
    from .models.antialias import BlurPool, antialias
    from .models.padding import circular_padding
    from .models.zoo import load_model
    from .requests import (CompareRequest, ConsistencyRequest, HeatmapRequest, Inputs,
                           LayerComparison, ModelSpec, Shifts)
    from .results.comparison import Comparison, compare
    from .results.provenance import Provenance
    from .results.result import Result, Settings, load
    from .attribution.engine import attribute
    from .attribution.result import AttributionResult, load_attribution
    from .data.masks import mask_batches, read_mask_pairs
    from .invariance.dense import measure_dense
    from .invariance.dense_result import DenseResult, load_dense
    from .requests import AttributionRequest
