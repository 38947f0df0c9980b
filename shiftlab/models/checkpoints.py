"""Checkpoint files: safe reading, finding the state dict inside, strict loading, fingerprints.

:func:`load_checkpoint` reads a file written by ``torch.save`` (with ``weights_only=True``
unless the file is trusted) or a ``.safetensors`` file, finds the state dict inside the usual
wrappers, and loads it into a model with strict key, shape and dtype checks. Every failure is a
one-line :class:`~shiftlab.errors.WeightsError` that says what to do.

Where the state dict may sit in a checkpoint:

* the whole file (``torch.save(model.state_dict(), path)``, or any ``.safetensors`` file);
* under one of :data:`STATE_DICT_KEYS` (``state_dict``, ``model``, ``model_ema``, ``ema``,
  ``module``, ...), at most a few levels deep (``{'model': {'module': ...}}``);
* under a key chosen with ``weights_key`` (``--weights-key``), which a file holding several
  candidates (``model`` and ``model_ema``) needs;
* with every key prefixed by ``module.`` (DataParallel) or ``_orig_mod.`` (``torch.compile``).

Example:
    >>> import tempfile
    >>> from torch import nn
    >>> tmp = tempfile.TemporaryDirectory()
    >>> model = nn.Linear(2, 2)
    >>> torch.save({"model": model.state_dict(), "epoch": 3}, f"{tmp.name}/ckpt.pth")
    >>> load_checkpoint(nn.Linear(2, 2), f"{tmp.name}/ckpt.pth")
    Linear(in_features=2, out_features=2, bias=True)
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import WeightsError, one_line

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "STATE_DICT_KEYS",
    "is_checkpoint_path",
    "load_checkpoint",
    "state_dict_fingerprint",
]

#: File endings that make a weights string a checkpoint path (``.pth.tar`` ends in ``.tar``).
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pth.tar", ".safetensors")

#: Keys under which training scripts nest the state dict (torchvision references, timm, DeiT,
#: Lightning, DataParallel-wrapped EMA copies).
STATE_DICT_KEYS: tuple[str, ...] = (
    "state_dict", "model", "model_state_dict", "model_ema", "state_dict_ema", "ema", "module",
)

# Wrappers that rename every key: DataParallel/DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_DEPTH = 4  # how deep candidate keys are followed: {'model_ema': {'module': {...}}} is 2
_ZIP_MAGIC = b"PK\x03\x04"
# The pickled magic number (LONG1 opcode and its 10 bytes) that starts torch.save's legacy
# (non-zip) format, after the PROTO opcode and, from pickle protocol 4 on, a FRAME opcode.
_LEGACY_TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def is_checkpoint_path(weights: str) -> bool:
    """True when a weights string names a checkpoint file rather than a weights name.

    It does when it ends in one of :data:`CHECKPOINT_SUFFIXES`, contains a path separator, or
    is an existing path. This is the one definition shared by :mod:`shiftlab.models` and
    :mod:`shiftlab.models.variants`.

    Example:
        >>> is_checkpoint_path("resnet50_lpf4.pth.tar"), is_checkpoint_path("IMAGENET1K_V1")
        (True, False)
    """
    text = weights.strip()
    if not text:
        return False
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        text.lower().endswith(CHECKPOINT_SUFFIXES)
        or any(sep in text for sep in separators)
        or Path(text).exists()
    )


def load_checkpoint(
    model: nn.Module,
    path: Union[str, os.PathLike],
    trust_checkpoint: bool = False,
    name: Optional[str] = None,
    weights_key: Optional[str] = None,
) -> nn.Module:
    """Load a checkpoint file into ``model`` strictly and return the model.

    Args:
        model: the network to fill; its state dict defines the keys, shapes and dtypes.
        path: a ``torch.save`` file (``.pth``, ``.pt``, ``.tar``, ...) or a ``.safetensors`` file.
        trust_checkpoint: unpickle in full (``torch.load(weights_only=False)``). This can run
            arbitrary code, so use it only for files you trust. ``.safetensors`` never needs it.
        name: the model's name in error messages (default: its class name).
        weights_key: the entry of a checkpoint dict that holds the weights (``'model_ema'``);
            needed when the file holds several candidates.

    Raises:
        WeightsError: the file is missing, unreadable, refused for safety, holds no (or more
            than one) state dict, or its keys, shapes or dtypes do not fit ``model``.

    Example:
        An antialiased network saved from DataParallel (keys ``module.*``) inside
        ``{'state_dict': ...}``, as antialiased-cnns' files are:

        >>> import tempfile
        >>> from shiftlab.models.antialias import antialias
        >>> tmp = tempfile.TemporaryDirectory()
        >>> def tiny():
        ...     return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                          nn.Conv2d(4, 8, 3, stride=2, padding=1))
        >>> trained = antialias(tiny(), 4)
        >>> state = {f"module.{key}": value for key, value in trained.state_dict().items()}
        >>> torch.save({"state_dict": state}, f"{tmp.name}/tiny_lpf4.pth.tar")
        >>> model = load_checkpoint(antialias(tiny(), 4), f"{tmp.name}/tiny_lpf4.pth.tar")
        >>> torch.equal(model[0].weight, trained[0].weight)
        True
        >>> load_checkpoint(tiny(), f"{tmp.name}/tiny_lpf4.pth.tar")
        ... # doctest: +ELLIPSIS, +NORMALIZE_WHITESPACE
        Traceback (most recent call last):
        ...
        shiftlab.errors.WeightsError: .../tiny_lpf4.pth.tar does not fit Sequential: 2 missing keys
        (3.weight, 3.bias); 4 unexpected keys (3.filt, 4.weight, 4.bias, 5.filt); ...
    """
    path = Path(path)
    name = name or type(model).__name__
    state = _state_dict_from(_read_file(path, trust_checkpoint), path, weights_key)
    expected = model.state_dict()
    state = _strip_wrapper_prefixes(state, expected)
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [
        (key, tuple(state[key].shape), tuple(expected[key].shape))
        for key in expected
        if key in state and isinstance(state[key], torch.Tensor) and isinstance(expected[key], torch.Tensor)
        and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        raise WeightsError(_mismatch_message(path, name, missing, unexpected, shapes))
    _check_dtypes(state, expected, path, name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not fit {name}: {one_line(exc)}") from None
    return model


def state_dict_fingerprint(model: nn.Module) -> str:
    """A short sha256 hex of the model's state dict: each entry's name, dtype, shape and bytes.

    Deterministic across runs and devices (tensors are hashed from a CPU copy), so two builds
    with the same weights give the same fingerprint and any changed value changes it.

    Example:
        >>> from torch import nn
        >>> _ = torch.manual_seed(0); a = nn.Linear(2, 2)
        >>> _ = torch.manual_seed(0); b = nn.Linear(2, 2)
        >>> state_dict_fingerprint(a) == state_dict_fingerprint(b), len(state_dict_fingerprint(a))
        (True, 16)
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(f"{key}\0".encode())
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
            digest.update(f"{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        else:  # an _extra_state object: its type, not its (maybe unstable) repr
            digest.update(f"{type(value).__qualname__}\0".encode())
    return digest.hexdigest()[:16]


# --- reading --------------------------------------------------------------------------------------


def _read_file(path: Path, trust: bool) -> Any:
    if not path.exists():
        raise WeightsError(f"checkpoint file {path} does not exist; check the weights path")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} is not a file; pass the checkpoint file itself")
    try:
        with path.open("rb") as handle:
            head = handle.read(32)
    except OSError as exc:
        raise WeightsError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
    if path.name.lower().endswith(".safetensors") or _looks_like_safetensors(head):
        return _read_safetensors(path)
    protocol = head[1] if len(head) >= 2 and head[0] == 0x80 else None  # pickle protocol 2+
    if protocol is not None and _LEGACY_TORCH_MAGIC not in head:
        raise WeightsError(_plain_pickle_message(path))
    if protocol is not None and protocol >= 4 and not trust:  # torch's weights_only reader stops at FRAME
        raise WeightsError(
            f"{path} is in torch.save's legacy format with pickle protocol {protocol}, which loading with "
            "weights_only=True cannot read; if you trust the file pass --trust-checkpoint "
            "(trust_checkpoint=True), or save it again with torch.save(model.state_dict(), path)"
        )
    return _read_torch(path, trust)


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header itself
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _plain_pickle_message(path: Path) -> str:
    return (
        f"{path} is a plain Python pickle (pickle.dump), not a PyTorch checkpoint; load it with "
        "pickle in a session you trust and save the weights with torch.save(model.state_dict(), path)"
    )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file  # optional dependency
    except ImportError:
        raise WeightsError(
            f"{path} is a safetensors file, which needs the safetensors package: pip install safetensors"
        ) from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError for a corrupt header, OSError, ...
        raise WeightsError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {one_line(exc)}); "
            "it may be truncated or corrupt: download or save it again"
        ) from None


def _read_torch(path: Path, trust: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # torch warns in several lines about pickle protocols it did not write itself
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
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
        raise WeightsError(f"cannot read checkpoint {path}: {one_line(exc)}") from None
    except Exception as exc:  # corrupt files raise RuntimeError, EOFError, KeyError, ...
        if "invalid magic number" in str(exc).lower():  # a protocol-1 pickle.dump file
            raise WeightsError(_plain_pickle_message(path)) from None
        raise WeightsError(_unreadable_message(path, exc)) from None


def _unreadable_message(path: Path, exc: BaseException) -> str:
    return (
        f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {one_line(exc)}); "
        "it may be truncated or corrupt, or not written by torch.save: download or save it again"
    )


# --- finding the state dict -----------------------------------------------------------------------


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(
        isinstance(key, str) and (isinstance(value, torch.Tensor) or key.endswith("_extra_state"))
        for key, value in obj.items()
    )


def _keys(obj: Mapping, count: int = 8) -> str:
    keys = [repr(key) for key in obj]
    more = f", ... {len(keys) - count} more" if len(keys) > count else ""
    return (", ".join(keys[:count]) + more) or "none"


def _state_dict_from(
    obj: Any, path: Path, weights_key: Optional[str], depth: int = 0
) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: itself, under ``weights_key``, or under one candidate key."""
    if isinstance(obj, nn.Module):  # a whole pickled model (trusted files only)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        where = f"{path} holds" if depth == 0 else f"{path}: the chosen entry holds"
        raise WeightsError(
            f"{where} a {type(obj).__name__}, not a state dict; save it with "
            "torch.save(model.state_dict(), path)"
        )
    if weights_key is not None and weights_key in obj:
        return _state_dict_from(obj[weights_key], path, None, depth + 1)
    if _is_state_dict(obj):
        if weights_key is not None:
            raise WeightsError(
                f"{path} has no entry {weights_key!r}: it is a plain state dict (keys: {_keys(obj, 3)}); "
                "drop weights_key (--weights-key)"
            )
        return dict(obj)
    candidates = [key for key in STATE_DICT_KEYS if isinstance(obj.get(key), (Mapping, nn.Module))]
    if weights_key is not None and len(candidates) != 1:
        raise WeightsError(
            f"{path} has no entry {weights_key!r} (its keys: {_keys(obj)}); "
            "pass one of those as weights_key (--weights-key)"
        )
    if len(candidates) > 1:
        listed = ", ".join(map(repr, candidates))
        raise WeightsError(
            f"{path} holds several candidate state dicts ({listed}); choose one with weights_key "
            f"(--weights-key {candidates[0]})"
        )
    if not candidates or depth >= _MAX_DEPTH:
        raise WeightsError(
            f"{path} holds a dict that is not a state dict (keys: {_keys(obj)}); save model.state_dict(), "
            f"or a dict with one of {', '.join(map(repr, STATE_DICT_KEYS))}, or name the entry with "
            "weights_key (--weights-key)"
        )
    return _state_dict_from(obj[candidates[0]], path, weights_key, depth + 1)


def _strip_wrapper_prefixes(state: dict[str, Any], expected: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``module.``/``_orig_mod.`` from every key, unless the model's own keys have it."""
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state) and not all(key.startswith(prefix) for key in expected):
                state = {key[len(prefix):]: value for key, value in state.items()}
                stripped = True
    return state


# --- checking -------------------------------------------------------------------------------------


def _check_dtypes(state: Mapping[str, Any], expected: Mapping[str, Any], path: Path, name: str) -> None:
    """Refuse integer, bool or complex values for floating-point entries.

    ``load_state_dict`` would cast them silently (a quantized or integer export turns into
    garbage weights); a float of another precision (float16 weights) is a fine cast.
    """
    wrong = [
        key for key, want in expected.items()
        if isinstance(want, torch.Tensor) and want.is_floating_point()
        and isinstance(state[key], torch.Tensor) and not state[key].is_floating_point()
    ]
    if wrong:
        first = wrong[0]
        more = f" (and {len(wrong) - 1} more entries)" if len(wrong) > 1 else ""
        raise WeightsError(
            f"{path} does not fit {name}: {first} is {state[first].dtype} in the checkpoint but "
            f"{expected[first].dtype} in the model{more}; save the floating-point weights "
            "(not a quantized or integer export)"
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
    # A 0-d entry (a scalar) has no output size: it never makes this a class-count mismatch.
    if shapes and not missing and not unexpected and all(
        len(got) == len(want) >= 1 and got[1:] == want[1:] for _, got, want in shapes
    ):
        outputs = {got[0] for _, got, want in shapes if got[0] != want[0]}
        if len(outputs) == 1:
            fix = f"the checkpoint has {outputs.pop()} classes: pass num_classes (--num-classes) to match"
    return f"{path} does not fit {name}: {'; '.join(parts)}; {fix}"


def _first(items: list[str], count: int = 5) -> str:
    more = f", ... {len(items) - count} more" if len(items) > count else ""
    return ", ".join(items[:count]) + more
