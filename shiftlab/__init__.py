"""shiftlab: see where shift-equivariance is lost inside a convolutional network.

One line for the whole job, the same pipeline the CLI runs (``shiftlab.runs``):

>>> result = shiftlab.runs.heatmap("vgg16", weights="none")        # doctest: +SKIP
>>> result.map("features.4")                                      # doctest: +SKIP

or the engine on your own model and images:

>>> result = shiftlab.measure(torchvision.models.vgg16().eval(), images)   # doctest: +SKIP

What every number means: docs/semantics.md.
"""
from ._version import __version__

from .errors import ShiftlabError, UsageError  # noqa: E402
from .measure.shifts import ShiftGrid  # noqa: E402
from .measure.geometry import LayerInfo, probe_layers  # noqa: E402
from .measure.capture import LayerCapture  # noqa: E402
from .results.provenance import Provenance  # noqa: E402
from .results.result import Result, Settings, load  # noqa: E402
from .measure.engine import measure  # noqa: E402
from .invariance.grid import measure_invariance  # noqa: E402
from .invariance.grid_result import InvarianceResult, load_invariance, uninformative_across  # noqa: E402
from .invariance.protocols import consistency_protocol, diagonal_protocol, load_protocol  # noqa: E402
from .models.antialias import BlurPool, antialias  # noqa: E402
from .models.padding import circular_padding  # noqa: E402
from .results.comparison import Comparison, compare  # noqa: E402
from .models.zoo import load_model  # noqa: E402
from .data.images import load_images, sample_image_paths  # noqa: E402
from .data.sources import ImageDataset, image_batches  # noqa: E402
from . import runs  # noqa: E402

__all__ = [
    "__version__", "ShiftlabError", "UsageError", "ShiftGrid", "LayerInfo", "probe_layers",
    "LayerCapture", "Provenance", "Result", "Settings", "load", "measure", "BlurPool",
    "antialias", "circular_padding", "Comparison", "compare", "load_model", "load_images",
    "sample_image_paths", "ImageDataset", "image_batches", "measure_invariance",
    "InvarianceResult", "load_invariance", "uninformative_across", "consistency_protocol",
    "diagonal_protocol", "load_protocol", "runs",
]
