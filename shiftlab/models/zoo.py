"""Model specs: torchvision names, user factories, timm names, and where the weights come from.

:func:`load_model` is the one public verb. It turns a spec string and a weights string into a
:class:`LoadedModel`: a model in eval mode on the CPU, plus what the measurement needs to know
about it (input normalisation, minimum input size, class names).

Model specs:

* ``resnet18`` or ``torchvision:resnet18``: a torchvision classification model.
* ``deeplabv3_resnet50``, ``lraspp_mobilenet_v3_large``, ...: a torchvision semantic
  segmentation model, whose output is a dict of (N, classes, H, W) maps
  (see :mod:`shiftlab.models.segmentation`).
* ``path/to/file.py:factory``: ``factory()`` from a Python file.
* ``package.module:factory``: ``factory()`` from an importable module.
* ``timm:resnet18``: a timm model, built without pretrained weights. Needs ``pip install timm``.
  A pretrained tag (``timm:resnet18.a1_in1k``) picks the normalisation of those weights; weights
  come from a checkpoint path. Hugging Face Hub names (``hf-hub:...``) are refused: they download.

Weights specs:

* ``auto``: pretrained weights if they are in torch hub's cache or can be downloaded, else
  random init with a :class:`PretrainedUnavailableWarning`.
* ``DEFAULT``, ``IMAGENET1K_V1``, ...: these pretrained weights, or a ``WeightsError``.
* ``none``: random init.
* a checkpoint path (``.pth``, ``.pt``, ``.tar``, ``.safetensors``, ...): a state dict, or a
  checkpoint dict that holds one; ``weights_key`` picks the entry (see :mod:`shiftlab.models.checkpoints`).
  :mod:`shiftlab.models.pretrained` gets torchvision's weights (cache, downloads, offline mode).

Example:
    >>> loaded = load_model("squeezenet1_0", weights="none")
    >>> loaded.name, loaded.weights, loaded.pretrained, loaded.min_size
    ('squeezenet1_0', 'random init', False, 21)
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torchvision
from torch import nn
from torchvision.models import get_model_weights

from .checkpoints import is_checkpoint_path, load_checkpoint, state_dict_fingerprint
from ..checks import check_count, check_model_has_data
from ..errors import ModelError, UsageError, WeightsError, one_line
from .pretrained import (
    DOWNLOAD_TIMEOUT_S,
    OFFLINE_ENV,
    PretrainedUnavailable,
    PretrainedUnavailableWarning,
    cache_file,
    load_pretrained,
)
from .segmentation import build_for_checkpoint, builder_arguments, segmentation_model_names

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFLINE_ENV",
    "LoadedModel",
    "PretrainedUnavailableWarning",
    "list_model_names",
    "load_checkpoint",
    "load_model",
    "state_dict_fingerprint",
]

# Copied here instead of importing shiftlab.data: models and data are siblings, neither above
# the other.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RANDOM_INIT = "random init"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to measure, with what the measurement needs to know about it.

    Attributes:
        model: the network in eval mode, on the CPU.
        name: the model spec without its ``torchvision:`` prefix (``'resnet18'``,
            ``'timm:resnet18'``, ``'mynet:factory'`` for ``path/to/mynet.py:factory``).
        weights: where the weights came from: a torchvision weights name such as
            ``'IMAGENET1K_V1'``, ``'random init'``, a checkpoint path, or ``'from factory'``.
        pretrained: True when trained weights were loaded (torchvision weights or a checkpoint).
        mean, std: the RGB normalisation the weights expect (ImageNet's when unknown).
        min_size: the smallest input side the model as built accepts, or None when unknown. For
            a model built for one input size (ViT) it is that size, the only one it takes.
        categories: class names of the pretrained weights, or None.

    Example:
        >>> loaded = load_model("squeezenet1_0", weights="none")
        >>> loaded.model.training, loaded.mean
        (False, (0.485, 0.456, 0.406))
    """

    model: nn.Module
    name: str
    weights: str
    pretrained: bool
    mean: tuple[float, float, float] = _IMAGENET_MEAN
    std: tuple[float, float, float] = _IMAGENET_STD
    min_size: int | None = None
    categories: list[str] | None = None


def list_model_names() -> list[str]:
    """Return the names of torchvision's classification and semantic segmentation models, sorted.

    Example:
        >>> "resnet18" in list_model_names(), "lraspp_mobilenet_v3_large" in list_model_names()
        (True, True)
    """
    return sorted(torchvision.models.list_models(module=torchvision.models)
                  + segmentation_model_names())


def load_model(
    spec: str,
    weights: str = "auto",
    trust_checkpoint: bool = False,
    num_classes: int | None = None,
    weights_key: str | None = None,
) -> LoadedModel:
    """Build a model from a spec and load its weights.

    Args:
        spec: ``resnet18`` or ``torchvision:resnet18``, ``path/to/file.py:factory``,
            ``package.module:factory`` or ``timm:name`` (see the module docstring).
        weights: ``'auto'``, ``'none'``, a torchvision weights name (``'DEFAULT'``,
            ``'IMAGENET1K_V1'``, ...) or a checkpoint path.
        trust_checkpoint: unpickle the checkpoint in full (``torch.load(weights_only=False)``).
            This can run arbitrary code, so use it only for files you trust.
        num_classes: the classifier's output size, for random init or a checkpoint trained on
            other classes. For a factory it is passed as ``factory(num_classes=...)``.
        weights_key: the entry of a checkpoint dict that holds the weights (``'model_ema'``);
            needed when the file holds several (``model`` and ``model_ema``).

    Returns:
        A :class:`LoadedModel` in eval mode, on the CPU. Nothing is seeded here, so random
        init follows torch's global RNG: seed it before the call for reproducible weights.

    Raises:
        UsageError: unknown model or weights name, timm is not installed, or a weights_key
            without a checkpoint path.
        ModelError: a factory cannot be imported, raises, or returns something else than a module.
        WeightsError: pretrained weights cannot be obtained, or a checkpoint cannot be used.

    Example:
        >>> loaded = load_model("mobilenet_v3_small", weights="none", num_classes=10)
        >>> loaded.model.classifier[-1].out_features
        10
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"model spec must be a non-empty string, got {spec!r}; e.g. 'resnet18'")
    if not isinstance(weights, str) or not weights.strip():
        raise UsageError(f"weights must be 'auto', 'none', a weights name or a checkpoint path, got {weights!r}")
    if num_classes is not None:
        check_count("num_classes", num_classes)
    spec, weights = spec.strip(), weights.strip()
    if weights_key is not None:
        if not isinstance(weights_key, str) or not weights_key.strip():
            raise UsageError(f"weights_key must be a non-empty string, got {weights_key!r}; e.g. 'model_ema'")
        if not is_checkpoint_path(weights):
            raise UsageError(f"weights_key {weights_key!r} picks an entry of a checkpoint file, but weights "
                             f"{weights!r} is not one; pass a checkpoint path or drop weights_key")
    checkpoint = _CheckpointOptions(trust_checkpoint, weights_key)

    if spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec[len("torchvision:"):], weights, checkpoint, num_classes)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec[len("timm:"):], weights, checkpoint, num_classes)
    elif ":" in spec:
        loaded = _load_factory(spec, weights, checkpoint, num_classes)
    else:
        loaded = _load_torchvision(spec, weights, checkpoint, num_classes)
    check_model_has_data(loaded.model, f"model {spec}")
    loaded.model.eval()
    loaded.model.to("cpu")
    return loaded


@dataclass(frozen=True)
class _CheckpointOptions:
    """How a checkpoint path in ``weights`` is read: trusted unpickling, the entry to take."""

    trust: bool = False
    weights_key: str | None = None

    def load(self, model: nn.Module, path: str, name: str) -> None:
        load_checkpoint(model, path, self.trust, name, self.weights_key)


# --- torchvision -------------------------------------------------------------------------------


def _load_torchvision(name: str, weights: str, checkpoint: _CheckpointOptions,
                      num_classes: int | None) -> LoadedModel:
    name = _torchvision_name(name)
    enum = get_model_weights(name)
    default = enum.DEFAULT
    extra = {} if num_classes is None else {"num_classes": num_classes}
    kind = weights.lower()

    if kind == "none":
        return _random_init(name, enum, extra)
    if kind == "auto":
        n_categories = len(default.meta["categories"])
        if num_classes is not None and num_classes != n_categories:
            reason = f"num_classes={num_classes} differs from the {n_categories} classes of {default}"
            return _random_fallback(name, enum, PretrainedUnavailableWarning(
                name, reason, "drop num_classes", "drop --num-classes"), extra)
        try:
            return _pretrained(name, default)
        except PretrainedUnavailable as exc:
            fix = f"save {default.url} into {cache_file(default).parent}{os.sep}"
            return _random_fallback(name, enum, PretrainedUnavailableWarning(name, exc.reason, fix),
                                    extra)

    chosen = _weights_member(enum, weights)
    if chosen is not None:
        if num_classes is not None and num_classes != len(chosen.meta["categories"]):
            raise UsageError(
                f"num_classes={num_classes} conflicts with {chosen} ({len(chosen.meta['categories'])} classes); "
                "drop num_classes, or use weights='none' or a checkpoint"
            )
        try:
            return _pretrained(name, chosen)
        except PretrainedUnavailable as exc:
            raise WeightsError(
                f"cannot get {chosen} ({exc}); download {chosen.url} on a machine with internet "
                f"and put it at {cache_file(chosen)}"
            ) from None
    if not is_checkpoint_path(weights):
        members = ", ".join(enum.__members__)
        raise UsageError(
            f"unknown weights {weights!r} for {name}; use 'auto', 'none', one of {members}, "
            "or a checkpoint path (.pth, .pt, .tar, .safetensors, ...)"
        )
    model = build_for_checkpoint(name, extra, lambda model: checkpoint.load(model, weights, name))
    return LoadedModel(model, name, weights, True, min_size=_min_size(model, enum))


def _random_init(name: str, enum: Any, extra: dict[str, int]) -> LoadedModel:
    # weights_backbone=None: a segmentation builder would otherwise download its backbone's
    model = torchvision.models.get_model(name, weights=None, **extra, **builder_arguments(name))
    return LoadedModel(model, name, _RANDOM_INIT, False, min_size=_min_size(model, enum))


def _min_size(model: nn.Module, enum: Any, chosen: Any | None = None) -> int | None:
    """The smallest input side of ``model`` as built, or None when unknown.

    A model built for one input size says so (:func:`_fixed_input_size`). Otherwise it is the
    ``meta['min_size']`` of the ``chosen`` weights when they are loaded, and without them (random
    init, checkpoint) the smallest over all of the architecture's weights: a larger one is the
    resolution those weights were trained at, not a limit of the architecture (vit_h_14's
    DEFAULT weights say 518, vit_h_14 built without them takes 224).
    """
    fixed = _fixed_input_size(model)
    if fixed is not None:
        return fixed
    if chosen is not None:
        return _weights_min_size(chosen)
    sizes = [size for size in map(_weights_min_size, enum) if size]
    return min(sizes) if sizes else None


def _weights_min_size(chosen: Any) -> int | None:
    size = chosen.meta.get("min_size")
    return max(size) if size else None


def _fixed_input_size(model: nn.Module) -> int | None:
    """The one input side a model built for a fixed size takes, else None.

    torchvision's VisionTransformer checks ``image_size``; timm's patch embeddings with
    ``strict_img_size`` (ViT, DeiT, Swin built without ``dynamic_img_size=True``) check
    ``img_size``.
    """
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    for module in model.modules():
        img_size = getattr(module, "img_size", None)
        if getattr(module, "strict_img_size", False) is True and img_size is not None:
            sides = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size,)
            if sides and all(isinstance(side, int) and side > 0 for side in sides):
                return max(sides)
    return None


def _torchvision_name(name: str) -> str:
    names = list_model_names()
    if name in names:
        return name
    if name.lower() in names:
        return name.lower()
    if name.endswith(".py"):
        raise UsageError(f"model spec {name!r} names a file but no factory; write it as {name}:factory_function")
    close = difflib.get_close_matches(name.lower(), names, n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UsageError(
        f"unknown model {name!r}; {hint}list_model_names() lists torchvision's classification and "
        "segmentation models, or use path/to/file.py:factory, package.module:factory or timm:name"
    )


def _weights_member(enum: Any, text: str) -> Any | None:
    """The member of ``enum`` that ``text`` names (``IMAGENET1K_V1``, ``ResNet18_Weights.DEFAULT``)."""
    key = text
    prefix = enum.__name__ + "."
    if key.lower().startswith(prefix.lower()):
        key = key[len(prefix):]
    return enum.__members__.get(key.upper())


def _pretrained(name: str, chosen: Any) -> LoadedModel:
    model = load_pretrained(name, chosen)
    transforms = chosen.transforms()
    mean = tuple(float(v) for v in getattr(transforms, "mean", _IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transforms, "std", _IMAGENET_STD))
    categories = list(chosen.meta["categories"]) if chosen.meta.get("categories") else None
    min_size = _min_size(model, None, chosen)
    return LoadedModel(model, name, chosen.name, True, mean, std, min_size, categories)  # type: ignore[arg-type]


def _random_fallback(name: str, enum: Any, warning: PretrainedUnavailableWarning,
                     extra: dict[str, int]) -> LoadedModel:
    warnings.warn(warning, stacklevel=4)
    return _random_init(name, enum, extra)



# --- user factories and timm -------------------------------------------------------------------


def _load_factory(spec: str, weights: str, checkpoint: _CheckpointOptions, num_classes: int | None) -> LoadedModel:
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"model spec {spec!r} must look like path/to/file.py:factory or package.module:factory")
    is_file = target.endswith(".py") or os.sep in target or "/" in target
    factory, name = _resolve_factory(target, attr, is_file)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    folder = str(Path(target).resolve().parent) if is_file else None
    try:
        with _on_sys_path(folder):
            model = factory(**kwargs)
    except Exception as exc:
        hint = " (it was called with num_classes=...; accept that argument or drop num_classes)" if kwargs else ""
        raise ModelError(f"factory {spec} raised {type(exc).__name__}: {one_line(exc)}{hint}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec} returned {type(model).__name__}; it must return a torch.nn.Module")
    check_model_has_data(model, f"the model of factory {spec}")  # before any weights are copied in
    return _finish_external(model, name, weights, checkpoint, "from factory", warn_random=False)


def _resolve_factory(target: str, attr: str, is_file: bool) -> tuple[Callable[..., Any], str]:
    if is_file:
        module = _import_file(Path(target))
        name = f"{Path(target).stem}:{attr}"
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelError(
                f"cannot import module {target!r}: {type(exc).__name__}: {one_line(exc)}; "
                "check the name, and that it is installed or on PYTHONPATH"
            ) from exc
        name = f"{target}:{attr}"
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            close = difflib.get_close_matches(attr, public, n=3)
            defined = ", ".join(public[:10]) or "no callables"
            hint = f"; did you mean {', '.join(close)}?" if close else f"; it defines {defined}"
            raise ModelError(f"{target} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"{target}:{attr} is a {type(obj).__name__}, not a callable; name a function or class")
    return obj, name


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist; check the path in path/to/file.py:factory")
    resolved = path.resolve()
    # A unique name per file, so two files called model.py do not replace each other.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"_shiftlab_user_{re.sub(r'[^0-9a-zA-Z_]', '_', resolved.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path} as a Python module; give it a .py ending")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so that dataclasses and pickling inside the file can find it.
    sys.modules[module_name] = module
    try:
        with _on_sys_path(str(resolved.parent)):
            spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if not isinstance(exc, Exception):
            raise
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {one_line(exc)}") from exc
    return module


@contextlib.contextmanager
def _on_sys_path(folder: str | None) -> Iterator[None]:
    """Let a factory file import its neighbours, as it could when run as a script."""
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, folder)  # type: ignore[arg-type]
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)  # type: ignore[arg-type]


def _load_timm(name: str, weights: str, checkpoint: _CheckpointOptions, num_classes: int | None) -> LoadedModel:
    try:
        import timm  # optional dependency
    except ImportError:
        raise UsageError(f"timm:{name} needs timm, which is not installed; pip install timm") from None
    if name.lower().startswith(("hf-hub:", "hf_hub:")):
        # timm would fetch the model's config from the Hugging Face Hub, even without weights
        raise UsageError(
            f"timm:{name} names a Hugging Face Hub model, which shiftlab does not download; use the "
            "architecture name (timm:resnet18) and pass the downloaded checkpoint as weights"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.lower(), timm.list_models(), n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown timm model {name!r}; {hint}timm.list_models() lists the names")
    architecture, _, tag = name.partition(".")
    tagged = timm.list_pretrained(f"{architecture}.*")
    if tag and name not in tagged:
        known = ", ".join(t.partition(".")[2] for t in tagged) or "none"
        raise UsageError(f"timm model {architecture!r} has no pretrained tag {tag!r} (its tags: {known}); "
                         f"timm.list_pretrained('{architecture}.*') lists them")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelError(f"timm cannot build {name!r}: {type(exc).__name__}: {one_line(exc)}") from exc
    return _finish_external(model, f"timm:{name}", weights, checkpoint, _RANDOM_INIT, warn_random=True)


def _finish_external(
    model: nn.Module, name: str, weights: str, checkpoint: _CheckpointOptions, built: str, warn_random: bool
) -> LoadedModel:
    """Apply ``weights`` to a model built by a factory or timm.

    Its normalisation comes from ``model.pretrained_cfg`` (timm's convention, which a factory may
    copy), its ``min_size`` from a fixed input size it was built for (ViT), else None.
    """
    config = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in config.get("mean", _IMAGENET_MEAN))
    std = tuple(float(v) for v in config.get("std", _IMAGENET_STD))
    if len(mean) != 3 or len(std) != 3:
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
    min_size = _fixed_input_size(model)
    kind = weights.lower()
    if kind in ("auto", "none"):
        if kind == "auto" and warn_random:
            warnings.warn(PretrainedUnavailableWarning(
                name, "timm models are built with pretrained=False here",
                "pass a checkpoint path as weights", "pass --weights CHECKPOINT"), stacklevel=4)
        return LoadedModel(model, name, built, False, mean, std, min_size)  # type: ignore[arg-type]
    if not is_checkpoint_path(weights):
        raise UsageError(
            f"weights {weights!r} is not a file; for {name} use 'auto', 'none' or a path to a .pth/.pt "
            "checkpoint (torchvision weights names apply to torchvision models only)"
        )
    checkpoint.load(model, weights, name)
    return LoadedModel(model, name, weights, True, mean, std, min_size)  # type: ignore[arg-type]
