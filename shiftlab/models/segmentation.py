"""torchvision's semantic segmentation models: their names, and how they are built offline.

:func:`shiftlab.models.zoo.load_model` loads ``fcn_resnet50``, ``deeplabv3_resnet50``,
``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, ... like any classifier
(``weights='auto'``, ``'none'``, ``'COCO_WITH_VOC_LABELS_V1'``, a checkpoint path); this module
holds what differs:

* their builders default to ImageNet weights for the backbone (``weights_backbone``), which
  would download; random init and checkpoints build with ``weights_backbone=None``
  (:func:`builder_arguments`);
* FCN and DeepLabV3 have an optional auxiliary head (``aux_classifier``): torchvision's COCO
  weights and its reference training (``--aux-loss``) save it, a model built without
  ``aux_loss=True`` lacks it. A checkpoint is loaded into the model with the head when it does
  not fit the one without (:func:`build_for_checkpoint`).

Their forward returns a dict of (N, classes, H, W) maps at the input size (``out``, and ``aux``
with the auxiliary head), upsampled by ``F.interpolate`` inside ``forward``;
:class:`shiftlab.equivariance.capture.LayerCapture` measures such a model's own output as the
layer ``output[out]`` (stride 1).

Example:
    >>> "lraspp_mobilenet_v3_large" in segmentation_model_names()
    True
    >>> builder_arguments("deeplabv3_resnet50"), builder_arguments("resnet18")
    ({'weights_backbone': None}, {})
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torchvision
from torch import nn

from ..errors import WeightsError

__all__ = ["build_for_checkpoint", "builder_arguments", "is_segmentation_model",
           "segmentation_model_names"]


@functools.lru_cache(maxsize=None)
def _names() -> tuple[str, ...]:
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models.segmentation)))


def segmentation_model_names() -> list[str]:
    """The names of torchvision's semantic segmentation models, sorted.

    Example:
        >>> segmentation_model_names()[:2]
        ['deeplabv3_mobilenet_v3_large', 'deeplabv3_resnet101']
    """
    return list(_names())


def is_segmentation_model(name: str) -> bool:
    """True when ``name`` is one of torchvision's semantic segmentation models.

    >>> is_segmentation_model("fcn_resnet50"), is_segmentation_model("resnet50")
    (True, False)
    """
    return name in _names()


def builder_arguments(name: str) -> dict[str, Any]:
    """Keyword arguments for ``torchvision.models.get_model(name, weights=None, ...)`` so that
    nothing is downloaded: ``weights_backbone=None`` for segmentation models, else none.

    >>> builder_arguments("lraspp_mobilenet_v3_large")
    {'weights_backbone': None}
    """
    return {"weights_backbone": None} if is_segmentation_model(name) else {}


def build_for_checkpoint(name: str, extra: dict[str, Any], load: Callable[[nn.Module], None]) -> nn.Module:
    """Build torchvision model ``name`` without weights and ``load`` a checkpoint into it.

    For FCN and DeepLabV3 a checkpoint that does not fit the model without the auxiliary head
    is tried on the model with it (``aux_loss=True``); when neither fits, the error is the one
    of the model without it.

    Args:
        name: a torchvision model name.
        extra: more builder arguments (``num_classes``).
        load: loads the checkpoint into a model, raising ``WeightsError`` when it does not fit.

    Returns:
        The model with the checkpoint's weights.

    Example:
        >>> model = build_for_checkpoint("lraspp_mobilenet_v3_large", {"num_classes": 2},
        ...                              lambda model: None)
        >>> model.classifier.low_classifier.out_channels
        2
    """
    arguments = {**extra, **builder_arguments(name)}
    model = torchvision.models.get_model(name, weights=None, **arguments)
    try:
        load(model)
        return model
    except WeightsError as without_aux:
        if not _has_aux_option(name):
            raise
        first = without_aux
    with_aux = torchvision.models.get_model(name, weights=None, aux_loss=True, **arguments)
    try:
        load(with_aux)
    except WeightsError:
        raise first from None
    return with_aux


def _has_aux_option(name: str) -> bool:
    """The builder takes ``aux_loss`` (FCN, DeepLabV3; not LRASPP)."""
    if not is_segmentation_model(name):
        return False
    builder = torchvision.models.get_model_builder(name)
    return "aux_loss" in inspect.signature(builder).parameters
