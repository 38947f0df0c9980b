"""Provenance: where a result came from (model, weights, seed, images, versions), typed.

Saved in every result header and read as attributes (``result.provenance.model``), never as
dictionary keys. The pipeline (``shiftlab.runs``) fills the model and image fields; the engine
fills what it measured (number of images, seconds, device, versions, a digest of the inputs).
"""
from __future__ import annotations

import dataclasses
import hashlib
import platform
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from .._version import __version__
from ..errors import ShiftlabError


#: the provenance fields a measurement fills (not part of a run's identity)
MEASURED = ("n_images", "seconds", "device", "versions", "input_digest")


@dataclass(frozen=True)
class Provenance:
    """What produced a result, beyond the measurement ``Settings``.

    ``label`` names the result in tables and figures; ``input_digest`` is a sha256 over the
    exact input tensors (so two results made through the Python API can be checked for "same
    images" too); ``images`` and ``image_digests`` are file names and file-content hashes when
    the images came from files.

    >>> Provenance(model="vgg16", weights="none").random_init
    True
    """

    model: str = ""
    label: str = ""
    weights: str = ""
    pretrained: bool = False
    seed: Optional[int] = None
    antialias: Optional[int] = None
    model_fingerprint: str = ""
    images: tuple[str, ...] = ()
    image_digests: tuple[str, ...] = ()
    resize: Optional[int] = None
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    labels: Optional[str] = None
    n_images: int = 0
    input_digest: str = ""
    seconds: float = float("nan")
    device: str = ""
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The label if set, else the model spec, else 'result'."""
        return self.label or self.model or "result"

    @property
    def random_init(self) -> bool:
        """True when the weights are known to be random (figures then say "random init")."""
        text = (self.weights or "").lower()
        return not self.pretrained and (text in ("none", "random", "") or "random" in text) \
            and bool(self.model)

    def replace(self, **changes) -> "Provenance":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for key in ("images", "image_digests", "mean", "std"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Provenance":
        """Read a header's provenance; unknown keys go to ``extra`` (newer files stay readable)."""
        if not isinstance(data, dict):
            raise ShiftlabError("the provenance in the header is not a mapping; re-run the measurement")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for key in ("images", "image_digests"):
            if key in values:
                values[key] = tuple(str(v) for v in values[key] or ())
        for key in ("mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        if values.get("seconds") is None:
            values["seconds"] = float("nan")
        try:
            out = cls(**values)
        except TypeError as exc:
            raise ShiftlabError(f"the provenance in the header is damaged ({exc})") from exc
        if extra:
            out = out.replace(extra={**out.extra, **extra})
        return out

    @classmethod
    def from_meta(cls, meta: dict) -> "Provenance":
        """Provenance of a format-1 file, whose header held an untyped ``meta`` dict."""
        meta = dict(meta or {})
        images = meta.pop("images", None) or ()
        mapped = {
            "model": meta.pop("model", ""), "label": meta.pop("label", ""),
            "weights": meta.pop("weights", ""), "pretrained": bool(meta.pop("pretrained", False)),
            "images": tuple(map(str, images)), "n_images": int(meta.pop("n_images", 0) or 0),
            "device": meta.pop("device", ""),
            "seconds": float(meta.pop("seconds", float("nan")) or float("nan")),
            "labels": meta.pop("labels", None),
            "versions": {k: meta.pop(k) for k in ("shiftlab", "torch", "python") if k in meta},
        }
        return cls(**mapped, extra=meta)

    @classmethod
    def from_header_meta(cls, meta: Optional[dict]) -> "Provenance":
        """Provenance of the untyped ``meta`` dict the output-level results held before their
        provenance was typed (invariance format 1-2, protocol format 1 files, and the ``meta=``
        keyword): a Provenance dict plus what the measurement added, or free-form keys.

        Typed fields are read as such, the top-level version keys (shiftlab, torch, python) go
        to ``versions``, every other key to ``extra``.

        >>> old = Provenance.from_header_meta({"model": "resnet18", "n_classes": 1000,
        ...                                    "torch": "2.4.0", "extra": {"spec": "resnet18"}})
        >>> old.model, old.versions, old.extra
        ('resnet18', {'torch': '2.4.0'}, {'spec': 'resnet18', 'n_classes': 1000})
        """
        meta = dict(meta or {})
        found = {key: meta.pop(key) for key in ("shiftlab", "torch", "python")
                 if isinstance(meta.get(key), str)}
        try:
            out = cls.from_dict(meta)
        except Exception:  # noqa: BLE001  (free-form metadata whose keys are not typed fields)
            return cls.from_meta({**meta, **found})
        return out.replace(versions={**found, **out.versions}) if found else out

    def identity(self) -> dict:
        """The fields that say what was measured (model, weights, seed, images, ...), as a dict:
        ``to_dict`` without what the measurement itself fills (:data:`MEASURED`)."""
        return {k: v for k, v in self.to_dict().items() if k not in MEASURED}


def versions() -> dict:
    """shiftlab, torch and Python versions of this process."""
    return {"shiftlab": __version__, "torch": torch.__version__, "python": platform.python_version()}


class InputDigest:
    """A running sha256 over input batches, in order (streamed sources hash batch by batch).

    >>> digest = InputDigest(); digest.update(torch.zeros(1, 3, 4, 4)); len(digest.hexdigest())
    16
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, images: torch.Tensor) -> None:
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        self._hash.update(str(tuple(array.shape[1:])).encode())
        self._hash.update(array.tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:16]


def digest_tensors(batches: Iterable[torch.Tensor]) -> str:
    """The ``InputDigest`` of a sequence of batches."""
    digest = InputDigest()
    for batch in batches:
        digest.update(batch)
    return digest.hexdigest()


def as_tuple(values: Optional[Iterable[float]]) -> Optional[tuple[float, ...]]:
    return None if values is None else tuple(float(v) for v in np.asarray(list(values)).ravel())



class WithProvenance:
    """Mixin of the output-level results (``InvarianceResult``, ``ProtocolResult``,
    ``DiagonalResult``), which hold a typed ``provenance`` field as ``Result`` does: ``label``,
    ``with_label`` and the read-only ``meta`` view."""

    provenance: Provenance

    @property
    def label(self) -> str:
        """The name in tables, figures and warnings (``provenance.name``: label, else model,
        else 'result')."""
        return self.provenance.name

    @property
    def meta(self) -> dict:
        """The provenance as a plain dict (read-only view; use ``result.provenance``)."""
        return {**self.provenance.extra, **self.provenance.to_dict()}

    def with_label(self, label: str):
        """A copy named ``label`` (the arrays are shared)."""
        return dataclasses.replace(self, provenance=self.provenance.replace(label=label))
