"""Model specs: torchvision names, user factories, timm names, and where the weights come from.

:func:`load_model` is the one public verb. It turns a spec string and a weights string into a
:class:`LoadedModel`: a model in eval mode on the CPU, plus what the measurement needs to know
about it (input normalisation, minimum input size, class names).

Model specs:

* ``resnet18`` or ``torchvision:resnet18``: a torchvision classification model.
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
* a ``.pth``/``.pt`` path: a state dict, or a checkpoint dict that holds one.

Example:
    >>> loaded = load_model("squeezenet1_0", weights="none")
    >>> loaded.name, loaded.weights, loaded.pretrained, loaded.min_size
    ('squeezenet1_0', 'random init', False, 21)
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import importlib
import importlib.util
import os
import pickle
import re
import socket
import sys
import threading
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import get_model_weights

from shiftlab.errors import ModelError, UsageError, WeightsError

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "OFFLINE_ENV",
    "LoadedModel",
    "PretrainedUnavailableWarning",
    "list_model_names",
    "load_model",
]

#: Seconds allowed to reach the download server, and for each socket operation during a
#: download. On a machine without internet, ``weights='auto'`` gives up after at most this long.
DOWNLOAD_TIMEOUT_S: float = 5.0

#: Set this environment variable to ``1`` to never try to download weights.
OFFLINE_ENV: str = "SHIFTLAB_OFFLINE"

# Copied here instead of importing shiftlab.data: models and data are siblings, neither above
# the other.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_RANDOM_INIT = "random init"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".tar")
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
# Wrappers that rename every key: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class PretrainedUnavailableWarning(UserWarning):
    """``weights='auto'`` could not get pretrained weights and fell back to random init."""


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
    """Return the names of torchvision's classification models, sorted.

    Example:
        >>> "resnet18" in list_model_names()
        True
    """
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(
    spec: str,
    weights: str = "auto",
    trust_checkpoint: bool = False,
    num_classes: int | None = None,
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

    Returns:
        A :class:`LoadedModel` in eval mode, on the CPU. Nothing is seeded here, so random
        init follows torch's global RNG: seed it before the call for reproducible weights.

    Raises:
        UsageError: unknown model or weights name, or timm is not installed.
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
    bad_count = isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    if num_classes is not None and bad_count:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec, weights = spec.strip(), weights.strip()

    if spec.startswith("torchvision:"):
        loaded = _load_torchvision(spec[len("torchvision:"):], weights, trust_checkpoint, num_classes)
    elif spec.startswith("timm:"):
        loaded = _load_timm(spec[len("timm:"):], weights, trust_checkpoint, num_classes)
    elif ":" in spec:
        loaded = _load_factory(spec, weights, trust_checkpoint, num_classes)
    else:
        loaded = _load_torchvision(spec, weights, trust_checkpoint, num_classes)
    loaded.model.eval()
    loaded.model.to("cpu")
    return loaded


# --- torchvision -------------------------------------------------------------------------------


def _load_torchvision(name: str, weights: str, trust: bool, num_classes: int | None) -> LoadedModel:
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
            return _random_fallback(name, enum, reason, "drop num_classes for pretrained weights", extra)
        try:
            return _pretrained(name, default, allow_download=not _offline())
        except _Unavailable as exc:
            fix = f"download {default.url} and put it at {_cache_file(default)} for pretrained weights"
            return _random_fallback(name, enum, str(exc), fix, extra)

    chosen = _weights_member(enum, weights)
    if chosen is not None:
        if num_classes is not None and num_classes != len(chosen.meta["categories"]):
            raise UsageError(
                f"num_classes={num_classes} conflicts with {chosen} ({len(chosen.meta['categories'])} classes); "
                "drop num_classes, or use weights='none' or a checkpoint"
            )
        try:
            return _pretrained(name, chosen, allow_download=not _offline())
        except _Unavailable as exc:
            raise WeightsError(
                f"cannot get {chosen} ({exc}); download {chosen.url} on a machine with internet "
                f"and put it at {_cache_file(chosen)}"
            ) from None
    if not _looks_like_path(weights):
        members = ", ".join(enum.__members__)
        raise UsageError(
            f"unknown weights {weights!r} for {name}; use 'auto', 'none', one of {members}, "
            "or a path to a .pth/.pt checkpoint"
        )
    model = torchvision.models.get_model(name, weights=None, **extra)
    _load_checkpoint(model, Path(weights), trust, name)
    return LoadedModel(model, name, weights, True, min_size=_min_size(model, enum))


def _random_init(name: str, enum: Any, extra: dict[str, int]) -> LoadedModel:
    model = torchvision.models.get_model(name, weights=None, **extra)
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
        f"unknown model {name!r}; {hint}list_model_names() lists torchvision's classification models, "
        "or use path/to/file.py:factory, package.module:factory or timm:name"
    )


def _weights_member(enum: Any, text: str) -> Any | None:
    """The member of ``enum`` that ``text`` names (``IMAGENET1K_V1``, ``ResNet18_Weights.DEFAULT``)."""
    key = text
    prefix = enum.__name__ + "."
    if key.lower().startswith(prefix.lower()):
        key = key[len(prefix):]
    return enum.__members__.get(key.upper())


def _pretrained(name: str, chosen: Any, allow_download: bool) -> LoadedModel:
    cache_file = _cache_file(chosen)
    cached = cache_file.is_file()
    if not cached:
        if not allow_download:
            raise _Unavailable(f"{cache_file} is not cached and {OFFLINE_ENV}=1 forbids downloading")
        reason = _unreachable_reason(chosen.url, DOWNLOAD_TIMEOUT_S)
        if reason is not None:
            raise _Unavailable(f"{cache_file} is not cached and the download failed: {reason}")
    try:
        model = _download_pretrained(name, chosen)
    except (OSError, http.client.HTTPException) as exc:
        if cached:
            raise WeightsError(
                f"cannot read cached weights {cache_file} ({_one_line(exc)}); check its permissions"
            ) from None
        raise _Unavailable(f"{cache_file} is not cached and the download failed: {_one_line(exc)}") from None
    except Exception as exc:  # torch.load raises many types for a broken file
        if cached:
            raise WeightsError(
                f"cached weights {cache_file} cannot be loaded ({_one_line(exc)}); delete it so it is "
                "downloaded again, or replace it with a good copy"
            ) from None
        if "hash" in str(exc).lower():
            raise _Unavailable(f"the download of {chosen.url} was corrupt ({_one_line(exc)})") from None
        raise WeightsError(f"building {name} with {chosen} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
    transforms = chosen.transforms()
    mean = tuple(float(v) for v in getattr(transforms, "mean", _IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transforms, "std", _IMAGENET_STD))
    categories = list(chosen.meta["categories"]) if chosen.meta.get("categories") else None
    min_size = _min_size(model, None, chosen)
    return LoadedModel(model, name, chosen.name, True, mean, std, min_size, categories)  # type: ignore[arg-type]


def _download_pretrained(name: str, chosen: Any) -> nn.Module:
    """Build ``name`` with ``chosen`` weights; torch hub takes them from its cache or downloads them."""
    # The builder knows per-weights settings (inception's transform_input, ViT's image size),
    # so it loads the weights rather than us calling load_state_dict.
    with _socket_timeout(DOWNLOAD_TIMEOUT_S):
        return torchvision.models.get_model(name, weights=chosen)


def _random_fallback(name: str, enum: Any, reason: str, fix: str, extra: dict[str, int]) -> LoadedModel:
    warnings.warn(
        f"{name}: random init, because the pretrained weights cannot be used: {reason}; {fix}, "
        "or pass weights='none' to silence this",
        PretrainedUnavailableWarning,
        stacklevel=4,
    )
    return _random_init(name, enum, extra)


class _Unavailable(Exception):
    """Pretrained weights are not cached and cannot be downloaded; the message says why."""


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _cache_file(chosen: Any) -> Path:
    # The same path torch.hub.load_state_dict_from_url reads and writes.
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(chosen.url).path)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every socket operation in the block; torch.hub's download has no timeout parameter."""
    previous = socket.getdefaulttimeout()
    if previous is None or previous > seconds:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unreachable_reason(url: str, timeout: float) -> str | None:
    """Return why ``url``'s server (or its proxy) cannot be reached within ``timeout``, else None.

    A socket timeout alone does not bound the wait: name lookup ignores it, and a connection
    tries every address of the host in turn. So the probe runs in a daemon thread and we wait
    ``timeout`` seconds at most.
    """
    parts = urlparse(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = proxy_parts.hostname or host, proxy_parts.port or 80
    outcome: dict[str, str] = {}

    def probe() -> None:
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            if not addresses:
                raise OSError(f"no address found for {host}")
            family, kind, proto, _, address = addresses[0]
            with socket.socket(family, kind, proto) as connection:
                connection.settimeout(timeout)
                connection.connect(address)
        except Exception as exc:  # any failure here means "cannot download", never a crash
            outcome["error"] = _one_line(exc)
        else:
            outcome["ok"] = ""

    thread = threading.Thread(target=probe, name="shiftlab-download-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if "ok" in outcome:
        return None
    return f"cannot reach {host}:{port} ({outcome.get('error', f'no answer within {timeout:g} s')})"


# --- user factories and timm -------------------------------------------------------------------


def _load_factory(spec: str, weights: str, trust: bool, num_classes: int | None) -> LoadedModel:
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
        raise ModelError(f"factory {spec} raised {type(exc).__name__}: {_one_line(exc)}{hint}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec} returned {type(model).__name__}; it must return a torch.nn.Module")
    return _finish_external(model, name, weights, trust, "from factory", warn_random=False)


def _resolve_factory(target: str, attr: str, is_file: bool) -> tuple[Callable[..., Any], str]:
    if is_file:
        module = _import_file(Path(target))
        name = f"{Path(target).stem}:{attr}"
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise ModelError(
                f"cannot import module {target!r}: {type(exc).__name__}: {_one_line(exc)}; "
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
        raise ModelError(f"importing {path} failed: {type(exc).__name__}: {_one_line(exc)}") from exc
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


def _load_timm(name: str, weights: str, trust: bool, num_classes: int | None) -> LoadedModel:
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
        raise ModelError(f"timm cannot build {name!r}: {type(exc).__name__}: {_one_line(exc)}") from exc
    return _finish_external(model, f"timm:{name}", weights, trust, _RANDOM_INIT, warn_random=True)


def _finish_external(
    model: nn.Module, name: str, weights: str, trust: bool, built: str, warn_random: bool
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
            warnings.warn(
                f"{name}: built with random init (timm models are created with pretrained=False); "
                "pass a checkpoint path as weights for trained weights, or weights='none' to silence this",
                PretrainedUnavailableWarning,
                stacklevel=4,
            )
        return LoadedModel(model, name, built, False, mean, std, min_size)  # type: ignore[arg-type]
    if not _looks_like_path(weights):
        raise UsageError(
            f"weights {weights!r} is not a file; for {name} use 'auto', 'none' or a path to a .pth/.pt "
            "checkpoint (torchvision weights names apply to torchvision models only)"
        )
    _load_checkpoint(model, Path(weights), trust, name)
    return LoadedModel(model, name, weights, True, mean, std, min_size)  # type: ignore[arg-type]


# --- checkpoints -------------------------------------------------------------------------------


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or Path(text).suffix.lower() in _CHECKPOINT_SUFFIXES
        or Path(text).exists()
    )


def _load_checkpoint(model: nn.Module, path: Path, trust: bool, name: str) -> None:
    """Load the state dict in ``path`` into ``model`` with strict key and shape checking."""
    state = _state_dict_from(_read_checkpoint(path, trust), path)
    for prefix in _WRAPPER_PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        (key, tuple(state[key].shape), tuple(expected[key].shape))
        for key in expected
        if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(_mismatch_message(path, name, missing, unexpected, shapes))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit {name}: {_one_line(exc)}") from None


def _read_checkpoint(path: Path, trust: bool) -> Any:
    if not path.exists():
        raise WeightsError(f"checkpoint file {path} does not exist; check the weights path")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} is not a file; pass the .pth/.pt file itself")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        # "Unsupported operand N": the bytes are no pickle at all (an HTML error page, text);
        # only a real pickle of disallowed objects is worth --trust-checkpoint
        not_a_pickle = re.search(r"Unsupported operand \d+", str(exc))
        if not trust and "weights only load failed" in str(exc).lower() and not not_a_pickle:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f"it pickles {found.group(1)}, which" if found else "it holds Python objects that"
            raise WeightsError(
                f"{path} was refused for safety: {what} loading with weights_only=True does not allow, "
                "and unpickling could run code. If you trust the file, pass --trust-checkpoint "
                "(trust_checkpoint=True) to load it with full unpickling"
            ) from None
        if not_a_pickle:
            raise WeightsError(f"{path} is not a readable PyTorch checkpoint (its bytes are no"
                               f" pickle: {not_a_pickle.group(0)}); it may be an error page or text"
                               " saved under a checkpoint name, or not written by torch.save:"
                               " download or save it again") from None
        raise WeightsError(_unreadable_message(path, exc)) from None
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {_one_line(exc)}") from None
    except Exception as exc:  # corrupt files raise RuntimeError, EOFError, KeyError, ...
        raise WeightsError(_unreadable_message(path, exc)) from None


def _unreadable_message(path: Path, exc: BaseException) -> str:
    return (
        f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {_one_line(exc)}); "
        "it may be truncated or corrupt, or not written by torch.save: download or save it again"
    )


def _state_dict_from(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, nn.Module)):
                return _state_dict_from(inner, path)
        if obj and all(
            isinstance(key, str) and (isinstance(value, torch.Tensor) or key.endswith("_extra_state"))
            for key, value in obj.items()
        ):
            return dict(obj)
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise WeightsError(
            f"{path} holds a dict that is not a state dict (keys: {keys}); save model.state_dict(), "
            f"or a dict with one of {', '.join(map(repr, _STATE_DICT_KEYS))}"
        )
    raise WeightsError(
        f"{path} holds a {type(obj).__name__}, not a state dict; save it with "
        "torch.save(model.state_dict(), path)"
    )


def _mismatch_message(
    path: Path,
    name: str,
    missing: list[str],
    unexpected: list[str],
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if shapes:
        listed = [f"{key} {got} vs {want}" for key, got, want in shapes]
        parts.append(f"{len(shapes)} shape mismatches, checkpoint vs model ({_first(listed)})")
    fix = "check that the model spec is the architecture the checkpoint was saved from"
    # Only the classifier differs, in its output size: the checkpoint has other classes.
    if shapes and not missing and not unexpected:
        outputs = {got[0] for _, got, want in shapes if got[1:] == want[1:] and got[0] != want[0]}
        if len(outputs) == 1 and all(got[1:] == want[1:] for _, got, want in shapes):
            fix = f"the checkpoint has {outputs.pop()} classes: pass num_classes (--num-classes) to match"
    return f"{path} does not fit {name}: {'; '.join(parts)}; {fix}"


def _first(items: list[str], count: int = 5) -> str:
    more = f", ... {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def load_checkpoint(model: nn.Module, path: str | Path, trust_checkpoint: bool = False,
                    name: str | None = None) -> nn.Module:
    """Load a checkpoint file into ``model`` strictly (``weights_only=True`` unless trusted).

    Example:
        >>> load_checkpoint(antialias(resnet50(), 4), "resnet50_lpf4.pth")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    _load_checkpoint(model, path, trust_checkpoint, name or type(model).__name__)
    return model
