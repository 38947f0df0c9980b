"""shiftlab: see where shift-equivariance is lost inside a convolutional network.

>>> import shiftlab, torchvision
>>> result = shiftlab.measure(torchvision.models.vgg16().eval(), images)   # doctest: +SKIP
>>> result.map("features.4")                                               # doctest: +SKIP
"""
__version__ = "0.1.0"

from .errors import ShiftlabError, UsageError  # noqa: E402
from .shifts import ShiftGrid  # noqa: E402
from .geometry import LayerInfo, probe_layers  # noqa: E402
from .capture import LayerCapture  # noqa: E402
from .result import Result, Settings, load  # noqa: E402
from .engine import measure  # noqa: E402
from .invariance import InvarianceResult, load_invariance, measure_invariance  # noqa: E402
from .antialias import BlurPool, antialias  # noqa: E402
from .comparison import Comparison, compare  # noqa: E402
from .models import load_model  # noqa: E402
from .data import load_images, sample_image_paths  # noqa: E402

__all__ = [
    "__version__", "ShiftlabError", "UsageError", "ShiftGrid", "LayerInfo", "probe_layers",
    "LayerCapture", "Result", "Settings", "load", "measure", "BlurPool", "antialias",
    "Comparison", "compare", "load_model", "load_images", "sample_image_paths",
    "measure_invariance", "InvarianceResult", "load_invariance",
]
