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
from ._version import __version__

from .errors import ShiftlabError, UsageError  # noqa: E402
from .equivariance.shifts import ShiftGrid  # noqa: E402
from .equivariance.geometry import LayerInfo, probe_layers  # noqa: E402
from .equivariance.capture import LayerCapture  # noqa: E402
from .results.provenance import Provenance  # noqa: E402
from .results.result import Result, Settings, load  # noqa: E402
from .equivariance.engine import measure  # noqa: E402
from .invariance.grid import measure_invariance  # noqa: E402
from .invariance.grid_result import InvarianceResult, load_invariance, uninformative_across  # noqa: E402
from .invariance.protocols import consistency_protocol, diagonal_protocol, load_protocol  # noqa: E402
from .models.antialias import BlurPool, antialias  # noqa: E402
from .models.padding import circular_padding  # noqa: E402
from .results.comparison import Comparison, compare  # noqa: E402
from .models.zoo import load_model  # noqa: E402
from .data.images import load_images, sample_image_paths  # noqa: E402
from .data.sources import ImageDataset, image_batches  # noqa: E402
from .requests import (CompareRequest, ConsistencyRequest, HeatmapRequest, Inputs,  # noqa: E402
                       LayerComparison, ModelSpec, Shifts)
from . import runs  # noqa: E402

__all__ = [
    "__version__", "ShiftlabError", "UsageError", "ShiftGrid", "LayerInfo", "probe_layers",
    "LayerCapture", "Provenance", "Result", "Settings", "load", "measure", "BlurPool",
    "antialias", "circular_padding", "Comparison", "compare", "load_model", "load_images",
    "sample_image_paths", "ImageDataset", "image_batches", "measure_invariance",
    "InvarianceResult", "load_invariance", "uninformative_across", "consistency_protocol",
    "diagonal_protocol", "load_protocol", "runs", "ModelSpec", "Inputs", "Shifts",
    "LayerComparison", "HeatmapRequest", "CompareRequest", "ConsistencyRequest",
]
