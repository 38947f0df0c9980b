"""AttributionResult: per image and layer call, the share of the output's Lie derivative; the
settings and provenance that produced it; tables; save/load as one validated .npz."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from ..equivariance.geometry import LayerInfo
from ..errors import ShiftlabError, one_line
from ..results.files import read_archive, write_archive
from ..results.provenance import Provenance, WithProvenance
from .settings import AttributionSettings

if TYPE_CHECKING:  # pandas is imported lazily: only tables need it
    import pandas

FORMAT_VERSION = 1
_KIND = "shiftlab.attribution"
#: the name of the remainder's row in tables: what non-module ops and unselected modules add
REMAINDER = "(remainder: non-module ops)"
_PER_LAYER = ("norms", "shares")
_PER_IMAGE = ("total", "remainder_norm", "remainder_share", "lee")
_FRAME_COLUMNS = ("image", "layer", "depth", "module", "kind", "stride", "norm", "share", "total")
_SUMMARY_COLUMNS = ("layer", "depth", "module", "kind", "stride", "mean_norm", "mean_share",
                    "cumulative_share")


@dataclass(frozen=True, eq=False)
class AttributionResult(WithProvenance):
    """Each layer call's share of the change of the output under input translation.

    Arrays, N images × L layer calls in network order (float64):

    * ``norms`` (N, L): ‖v_i‖, the norm of the layer's Lie derivative carried to the output
      (Gruver et al.'s layer-wise quantity, without probe noise);
    * ``shares`` (N, L): c_i = ⟨v_i, L F⟩ / ‖L F‖², signed (a layer can cancel another);
    * ``total`` (N,): ‖L F‖; ``remainder_norm``, ``remainder_share`` (N,): the same for
      r = L F − Σ v_i, what the non-module ops and unselected modules add. Per image,
      Σ_i c_i + remainder_share = 1; an exactly invariant image (‖L F‖ = 0) has NaN shares;
    * ``lee`` (N,): the end-to-end LEE, the mean over output elements (classes) of
      |L softmax(F)| (NaN for a 1-D output).

    With ``axis='both'`` squared norms and inner products of the two axes are added.
    ``layers`` holds each call's :class:`~shiftlab.LayerInfo` (name, module type, kind, stride,
    output shape). Definitions: docs/semantics.md, section 10.
    """

    settings: AttributionSettings
    layers: list[LayerInfo]
    norms: np.ndarray
    shares: np.ndarray
    total: np.ndarray
    remainder_norm: np.ndarray
    remainder_share: np.ndarray
    lee: np.ndarray
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    @property
    def n_images(self) -> int:
        return int(self.total.shape[0])

    def __repr__(self) -> str:
        return (f"AttributionResult({self.label}: {len(self.layers)} layers, axis"
                f" {self.settings.axis}, {self.settings.output}, {self.n_images} images)")

    # -- tables ----------------------------------------------------------------------
    def to_frame(self) -> "pandas.DataFrame":
        """Tidy table, one row per image × layer call: image (index), layer, depth, module,
        kind, stride (rows), norm, share, total (‖L F‖ of the image); then one row per image
        for the remainder (layer ``REMAINDER``, kind 'remainder'), so shares sum to 1 per image."""
        import pandas as pd

        n_images, n_layers = self.norms.shape
        image = np.repeat(np.arange(n_images), n_layers)
        frame = pd.DataFrame({
            "image": image, "layer": np.tile(self.layer_names, n_images).astype(object),
            "depth": np.tile(np.arange(n_layers), n_images),
            "module": np.tile([i.module for i in self.layers], n_images).astype(object),
            "kind": np.tile([i.kind for i in self.layers], n_images).astype(object),
            "stride": np.tile([i.stride[0] for i in self.layers], n_images).astype(float),
            "norm": self.norms.ravel(), "share": self.shares.ravel(), "total": self.total[image],
        }, columns=_FRAME_COLUMNS)
        rest = pd.DataFrame({
            "image": np.arange(n_images), "layer": REMAINDER, "depth": n_layers, "module": "",
            "kind": "remainder", "stride": math.nan, "norm": self.remainder_norm,
            "share": self.remainder_share, "total": self.total}, columns=_FRAME_COLUMNS)
        return pd.concat([frame, rest], ignore_index=True)

    def summary(self) -> "pandas.DataFrame":
        """One row per layer call in network order: layer, depth, module, kind, stride (rows),
        mean_norm, mean_share (over the images where the share is defined) and the
        cumulative share; then the remainder's row (``REMAINDER``), where the cumulative share
        reaches 1."""
        import pandas as pd

        mean_norm = _mean(np.column_stack([self.norms, self.remainder_norm]))
        mean_share = _mean(np.column_stack([self.shares, self.remainder_share]))
        rows = [{"layer": info.name, "depth": depth, "module": info.module, "kind": info.kind,
                 "stride": info.stride[0]} for depth, info in enumerate(self.layers)]
        rows.append({"layer": REMAINDER, "depth": len(self.layers), "module": "",
                     "kind": "remainder", "stride": math.nan})
        frame = pd.DataFrame(rows)
        frame["mean_norm"], frame["mean_share"] = mean_norm, mean_share
        frame["cumulative_share"] = np.cumsum(mean_share)
        return frame[list(_SUMMARY_COLUMNS)]

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON header, no pickle) atomically."""
        header = {"format": FORMAT_VERSION, "kind": _KIND, "settings": self.settings.to_dict(),
                  "layers": [info.to_dict() for info in self.layers],
                  "provenance": self.provenance.to_dict()}
        return write_archive(path, header, {name: getattr(self, name)
                                            for name in _PER_LAYER + _PER_IMAGE})


def _mean(values: np.ndarray) -> np.ndarray:
    """Column means over the finite values (NaN for a column without any)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column's mean is NaN
        return np.nanmean(values, axis=0) if len(values) else np.full(values.shape[1], np.nan)


def load_attribution(path: Union[str, os.PathLike]) -> AttributionResult:
    """Read a result written by :meth:`AttributionResult.save` (no pickle), validating every
    array against the header; another file, or a damaged one, is one ``ShiftlabError`` line.

    >>> import tempfile
    >>> from shiftlab.attribution.settings import AttributionSettings
    >>> from shiftlab.equivariance.geometry import LayerInfo
    >>> info = LayerInfo("relu", "ReLU", "spatial", (1., 1.), (1., 1.), (4, 8, 8))
    >>> result = AttributionResult(AttributionSettings(size=(8, 8)), [info], np.ones((2, 1)),
    ...                            np.ones((2, 1)), np.ones(2), np.zeros(2), np.zeros(2), np.ones(2))
    >>> tmp = tempfile.TemporaryDirectory()
    >>> load_attribution(result.save(f"{tmp.name}/attribution.npz"))
    AttributionResult(result: 1 layers, axis both, logits, 2 images)
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no attribution file at {path}; pass the result.npz that"
                            " AttributionResult.save wrote")
    header, arrays = read_archive(path, _PER_LAYER + _PER_IMAGE, what="attribution")
    if header.get("kind") != _KIND or header.get("format") != FORMAT_VERSION:
        raise ShiftlabError(f"{path} is not an attribution file of format {FORMAT_VERSION}"
                            f" (kind {header.get('kind')!r}, format {header.get('format')!r});"
                            " re-run the attribution")
    try:
        settings = AttributionSettings.from_dict(header["settings"])
        layers = [LayerInfo.from_dict(item) for item in header["layers"]]
        provenance = Provenance.from_dict(header["provenance"])
    except ShiftlabError as exc:
        raise ShiftlabError(f"{path}: {one_line(exc)}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShiftlabError(f"{path} has an incomplete or damaged header ({type(exc).__name__}:"
                            f" {one_line(exc)}); re-run the attribution") from exc
    for number, info in enumerate(layers):
        problem = _layer_problem(info)
        if problem:
            raise ShiftlabError(f"{path}: layer {number} of the header {problem}; the file is"
                                " damaged: re-run the attribution")
    _check_arrays(arrays, len(layers), path)
    return AttributionResult(settings=settings, layers=layers, provenance=provenance, **arrays)


def _layer_problem(info: LayerInfo) -> str:
    if not isinstance(info.name, str) or not isinstance(info.module, str):
        return "has a name or module that is not text"
    if info.kind not in ("spatial", "global") or info.layout not in ("nchw", "nhwc"):
        return f"has kind {info.kind!r} / layout {info.layout!r}"
    if len(info.stride) != 2 or any(v <= 0 for v in info.stride):
        return f"has stride {list(info.stride)}, not two positive values"
    return ""


def _check_arrays(arrays: dict, n_layers: int, path: Path) -> None:
    """Every array float, (N, L) or (N,) with one N; norms not negative, shares not infinite."""
    n_images = arrays["total"].shape[0] if arrays["total"].ndim == 1 else -1
    for name, array in arrays.items():
        expected = (n_images, n_layers) if name in _PER_LAYER else (n_images,)
        if array.shape != expected or not np.issubdtype(array.dtype, np.floating):
            raise ShiftlabError(f"{path}: array {name!r} is {array.dtype} {array.shape}, the header"
                                f" describes float {expected}; the file is damaged")
    for name in ("norms", "total", "remainder_norm", "lee"):
        if np.any(arrays[name] < 0) or np.any(np.isinf(arrays[name])):
            raise ShiftlabError(f"{path}: array {name!r} holds negative or infinite norms; the"
                                " file is damaged")
    for name in ("shares", "remainder_share"):
        if np.any(np.isinf(arrays[name])):
            raise ShiftlabError(f"{path}: array {name!r} holds infinite shares; the file is damaged")

