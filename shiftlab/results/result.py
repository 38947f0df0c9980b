"""Result: per-layer distance maps plus every setting that produced them; save/load as one .npz."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from ..errors import ShiftlabError, UsageError, one_line
from .files import read_archive, write_archive
from ..equivariance.geometry import LayerInfo
from .provenance import Provenance
from ..equivariance.shifts import ShiftGrid

if TYPE_CHECKING:  # pandas and matplotlib are imported lazily: only tables/figures need them
    import pandas
    from matplotlib.figure import Figure

FORMAT_VERSION = 2
#: format-1 files (an untyped ``meta`` dict instead of a typed provenance) are still read
READABLE_FORMATS = (1, 2)
_ARRAYS = ("mean", "std", "n", "n_inf", "n_nan")
_FRAME_COLUMNS = ("layer", "depth", "module", "kind", "stride", "dh", "dw", "mean", "std", "n")
_SUMMARY_COLUMNS = ("layer", "depth", "module", "kind", "layout", "stride", "shape", "mean", "max",
                    "defined_shifts")


@dataclass(frozen=True)
class Settings:
    """What defines a measurement; two results are comparable only when these agree."""

    grid: ShiftGrid
    mode: str = "circular"
    align: str = "bilinear"
    metric: str = "cosine"
    size: tuple[int, int] = (224, 224)
    margin: int = 0
    border: int = 0
    layers: Optional[tuple[str, ...]] = None
    padding: str = "as-trained"
    dtype: str = "float32"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["grid"] = self.grid.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        return cls(
            grid=ShiftGrid.from_dict(data["grid"]), mode=data["mode"], align=data["align"],
            metric=data["metric"], size=tuple(data["size"]), margin=int(data["margin"]),
            border=int(data["border"]),
            layers=tuple(data["layers"]) if data.get("layers") is not None else None,
            padding=str(data.get("padding", "as-trained")), dtype=str(data.get("dtype", "float32")))

    def differences(self, other: "Settings") -> list[str]:
        """Human-readable list of the settings that differ (empty when comparable)."""
        out = []
        for item in fields(self):
            mine, theirs = getattr(self, item.name), getattr(other, item.name)
            if item.name == "grid":
                mine, theirs = mine.shifts, theirs.shifts
                if mine != theirs:
                    out.append(f"grid ({len(mine)} vs {len(theirs)} shifts)" if len(mine) != len(theirs)
                               else "grid (different shifts)")
                continue
            if item.name == "layers":
                continue  # different layer filters are fine: layers are matched by name
            if mine != theirs:
                out.append(f"{item.name} ({mine} vs {theirs})")
        return out


@dataclass
class Result:
    """Per-layer equivariance distances for every shift of a grid.

    Arrays are (L, S): layers in network order × shifts in grid order. ``mean``/``std`` are over
    images; ``n`` counts finite values, ``n_inf`` +inf values (PSNR of identical maps) and
    ``n_nan`` NaN ones (broken features). A shift the alignment leaves undefined has n = 0 and
    a NaN mean.

    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> circular = dict(padding=1, padding_mode="circular")
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
    >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(8))
    >>> result
    Result(result: 4 layers x 64 shifts, circular/bilinear/cosine, 2 images)
    >>> result.map("2").shape                  # the max-pool: (dh, dw) = 0..7 x 0..7
    (8, 8)
    >>> result.map("2")[:2, :4].round(3)       # exact at even shifts only
    array([[0.   , 0.072, 0.   , 0.072],
           [0.087, 0.115, 0.087, 0.115]])
    >>> print(result)
    Result(result: 4 layers x 64 shifts, circular/bilinear/cosine, 2 images)
    model ? (weights ?), 16x16 px, padding as-trained
    least equivariant spatial layers (mean over shifts):
      2                            MaxPool2d      s=2  0.06952
      3                            Conv2d         s=2  0.06412
      1                            ReLU           s=1  0
      0                            Conv2d         s=1  0
    result.summary() for every layer, result.map(layer) for one map
    """

    settings: Settings
    layers: list[LayerInfo]
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray
    n_inf: np.ndarray
    n_nan: np.ndarray
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def meta(self) -> dict:
        """The provenance as a plain dict (read-only view; use ``result.provenance``)."""
        return {**self.provenance.extra, **self.provenance.to_dict()}

    @property
    def label(self) -> str:
        """The name of this result in tables and figures (``provenance.name``)."""
        return self.provenance.name

    def with_label(self, label: str) -> "Result":
        """The same result under another name in tables and figures."""
        import dataclasses

        return dataclasses.replace(self, provenance=self.provenance.replace(label=label))

    def __repr__(self) -> str:
        return (f"Result({self.label}: {len(self.layers)} layers x {len(self.grid)} shifts,"
                f" {self.settings.mode}/{self.settings.align}/{self.settings.metric},"
                f" {self.provenance.n_images} images)")

    def __str__(self) -> str:
        """A short summary (a dozen lines): what was measured and the least equivariant layers."""
        summary = self.summary()
        spatial = summary[summary["kind"] == "spatial"].dropna(subset=["mean"])
        worst = spatial.sort_values("mean", ascending=self.settings.metric == "psnr").head(5)
        lines = [repr(self),
                 f"model {self.provenance.model or '?'} ({self.provenance.weights or 'weights ?'}),"
                 f" {self.settings.size[0]}x{self.settings.size[1]} px, padding {self.settings.padding}",
                 "least equivariant spatial layers (mean over shifts):"]
        lines += [f"  {row.layer:<28} {row.module:<14} s={row.stride:g}  {row.mean:.4g}"
                  for row in worst.itertuples()]
        if not self.layers:
            lines.append("  (none: this result has no layers)")
        lines.append("result.summary() for every layer, result.map(layer) for one map")
        return "\n".join(lines)

    # -- access ----------------------------------------------------------------------
    @property
    def grid(self) -> ShiftGrid:
        return self.settings.grid

    @property
    def layer_names(self) -> list[str]:
        return [info.name for info in self.layers]

    def layer(self, name: str) -> LayerInfo:
        return self.layers[self._index(name)]

    def _index(self, name: str) -> int:
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise UsageError(f"no layer named {name!r} in this result; see result.layer_names") from None

    def values(self, layer: str, stat: str = "mean") -> np.ndarray:
        """Per-shift values (S,) of ``stat`` ('mean', 'std', 'n') for one layer, grid order."""
        if stat not in ("mean", "std", "n", "n_inf", "n_nan"):
            raise UsageError(f"unknown statistic {stat!r}; use mean, std or n")
        return getattr(self, stat)[self._index(layer)]

    def map(self, layer: str, stat: str = "mean") -> np.ndarray:
        """(len(dh_values), len(dw_values)) map of ``stat``; NaN where a shift is undefined or absent."""
        rows, cols = self.grid.map_index()
        out = np.full(self.grid.map_shape, np.nan)
        out[rows, cols] = self.values(layer, stat)
        return out

    def measured(self, layer: str) -> np.ndarray:
        """The layer's mean distance at every measured shift: defined, finite, not (0, 0).

        The identity shift is left out of every summary: its distance is 0 (PSNR +inf) by
        construction and says nothing about the layer. A layer whose grid holds no other defined
        shift (stride 4, exact alignment, shifts 0..3) gives an empty array: it is undefined.
        """
        values = self.values(layer)
        return values[np.isfinite(values) & ~self._identity]

    @property
    def _identity(self) -> np.ndarray:
        """(S,) True at the zero shift of the grid."""
        return np.all(np.asarray(self.grid.shifts, dtype=float).reshape(-1, 2) == 0, axis=1)

    def layer_mean(self, layer: str) -> float:
        """Mean distance over the measured shifts (``measured``); NaN when there is none.

        >>> import torch
        >>> from shiftlab import ShiftGrid, measure
        >>> net = torch.nn.Sequential(torch.nn.MaxPool2d(4)).eval()
        >>> x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> result = measure(net, x, ShiftGrid.square(4), align="exact", progress=False)
        >>> result.layer_mean("0")   # stride 4: no shift of 0..3 but (0, 0) is defined
        nan
        """
        values = self.measured(layer)
        return float(values.mean()) if values.size else math.nan

    def undefined_layers(self) -> list[str]:
        """Layers that the alignment leaves no shift but (0, 0): no image at any other shift
        (``n``, ``n_inf`` and ``n_nan`` all 0). Reported as undefined, never 0; a layer whose
        values are all non-finite is reported as such instead (``nonfinite_layers``)."""
        others = ~self._identity
        return [info.name for info, n, inf, nan in zip(self.layers, self.n, self.n_inf, self.n_nan)
                if not (n + inf + nan)[others].sum()]

    def nonfinite_layers(self) -> list[str]:
        """Layers where some image gave a non-finite value for a shift the alignment defines."""
        return [info.name for info, bad in zip(self.layers, self.n_nan) if bad.sum() > 0]

    # -- figures (thin wrappers: plots.py does the drawing) ---------------------------
    def plot(self, **kwargs) -> "Figure":
        """The layer grid (``shiftlab.figures.plots.layer_grid``) of this result."""
        from ..figures.plots import layer_grid

        return layer_grid(self, **kwargs)

    def plot_profile(self, **kwargs) -> "Figure":
        """Mean distance per layer vs. depth (``shiftlab.figures.plots.layer_profile``)."""
        from ..figures.plots import layer_profile

        return layer_profile(self, **kwargs)

    # -- tables ----------------------------------------------------------------------
    def to_frame(self) -> "pandas.DataFrame":
        """Tidy table: one row per (layer, shift) with layer, kind, stride, dh, dw, mean, std, n."""
        import pandas as pd

        shifts = np.asarray(self.grid.shifts)
        frames = [pd.DataFrame(columns=_FRAME_COLUMNS)]  # the columns, also for no layers
        for depth, info in enumerate(self.layers):
            frames.append(pd.DataFrame({
                "layer": info.name, "depth": depth, "module": info.module, "kind": info.kind,
                "stride": info.stride[0], "dh": shifts[:, 0], "dw": shifts[:, 1],
                "mean": self.mean[depth], "std": self.std[depth], "n": self.n[depth],
            }))
        return pd.concat(frames[1:] or frames, ignore_index=True)

    def summary(self) -> "pandas.DataFrame":
        """One row per layer: module, kind, stride, shape, mean and max distance over the measured
        shifts (``measured``: not the identity), and how many shifts that is; NaN where none."""
        import pandas as pd

        rows = []
        for depth, info in enumerate(self.layers):
            measured = self.measured(info.name)
            rows.append({
                "layer": info.name, "depth": depth, "module": info.module, "kind": info.kind,
                "layout": info.layout if info.is_spatial else "",
                "stride": info.stride[0], "shape": "x".join(map(str, info.shape)),
                "mean": self.layer_mean(info.name),
                "max": float(measured.max()) if measured.size else math.nan,
                "defined_shifts": int(measured.size),
            })
        return pd.DataFrame(rows, columns=_SUMMARY_COLUMNS)  # the columns also for no layers

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON metadata) atomically: temp file, then rename."""
        header = {
            "format": FORMAT_VERSION, "settings": self.settings.to_dict(),
            "layers": [info.to_dict() for info in self.layers],
            "provenance": self.provenance.to_dict(),
        }
        return write_archive(path, header, {name: getattr(self, name) for name in _ARRAYS})


def load(path: Union[str, os.PathLike]) -> Result:
    """Read a result written by ``Result.save`` (no pickle involved), validating every array.

    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> circular = dict(padding=1, padding_mode="circular")
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
    >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(8))
    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = result.save(f"{tmp.name}/result.npz")
    >>> loaded = shiftlab.load(path)
    >>> loaded.layer_names, bool((loaded.mean == result.mean).all())
    (['0', '1', '2', '3'], True)
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no result file at {path}; pass the result.npz written by 'shiftlab heatmap'")
    header, arrays = read_archive(path, _ARRAYS)
    if header.get("format") not in READABLE_FORMATS:
        found = header.get("format")
        raise ShiftlabError(f"{path} has result format {found}, this shiftlab reads"
                            f" {', '.join(map(str, READABLE_FORMATS))}; re-run the measurement")
    try:
        settings = Settings.from_dict(header["settings"])
        layers = [LayerInfo.from_dict(item) for item in header["layers"]]
        provenance = (Provenance.from_dict(header["provenance"]) if header["format"] >= 2
                      else Provenance.from_meta(header.get("meta", {})))
    except ShiftlabError as exc:
        raise ShiftlabError(f"{path}: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShiftlabError(f"{path} has an incomplete or damaged header ({type(exc).__name__}:"
                            f" {one_line(exc)}); re-run the measurement") from exc
    _check_layers(layers, path)
    _check_arrays(arrays, (len(layers), len(settings.grid)), path)
    return Result(settings=settings, layers=layers, provenance=provenance, **arrays)


_KINDS = ("spatial", "global")
_LAYOUTS = ("nchw", "nhwc", "tokens")


def _check_layers(layers: list[LayerInfo], path: Path) -> None:
    """Every layer of the header as ``Result.save`` writes it: text names, known kinds and
    layouts, (rows, cols) strides; else one line naming the file and the layer."""
    for number, info in enumerate(layers):
        problem = _layer_problem(info)
        if problem:
            raise ShiftlabError(f"{path}: layer {number} of the header {problem}; the file is"
                                " damaged or was not written by shiftlab: re-run the measurement")


def _layer_problem(info: LayerInfo) -> Optional[str]:
    for key in ("name", "module"):
        value = getattr(info, key)
        if not isinstance(value, str):
            return f"has {key} {value!r}, not text"
    if info.kind not in _KINDS:
        return f"has kind {info.kind!r}, not one of {', '.join(_KINDS)}"
    if info.layout not in _LAYOUTS:
        return f"has layout {info.layout!r}, not one of {', '.join(_LAYOUTS)}"
    for key in ("stride", "measured_stride"):
        value = getattr(info, key)
        if len(value) != 2:
            return f"has {key} {list(value)}: {len(value)} values, not 2 (rows, cols)"
        if any(v <= 0 for v in value):  # NaN (a global layer's, or unknown) compares False
            return f"has {key} {list(value)}, not positive"
    if any(v < 0 for v in info.shape) or info.extra_tokens < 0:
        return f"has a negative shape {list(info.shape)} or extra_tokens {info.extra_tokens}"
    return None


def _check_arrays(arrays: dict, shape: tuple[int, int], path: Path) -> None:
    """Every array (layers, shifts), numeric, with counts that are whole and non-negative."""
    for name, array in arrays.items():
        if array.shape != shape:
            raise ShiftlabError(f"{path}: array {name!r} has shape {array.shape} but the header"
                                f" describes {shape[0]} layers x {shape[1]} shifts; the file is damaged")
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise ShiftlabError(f"{path}: array {name!r} has dtype {array.dtype}, not a number type;"
                                " the file is damaged")
    for name in ("n", "n_inf", "n_nan"):
        counts = arrays[name]
        if not np.all(np.isfinite(counts)) or np.any(counts < 0) or np.any(counts != np.round(counts)):
            raise ShiftlabError(f"{path}: counts {name!r} must be whole numbers >= 0; the file is damaged")
    if np.any(np.isinf(arrays["std"])):
        raise ShiftlabError(f"{path}: array 'std' holds infinite values; the file is damaged")


def layer_indices(result: Result, layers) -> list[int]:
    """Positions (network order) of the layers matching any of ``layers``: name globs (also
    against the module name, without ``#k[i]``), comma lists, ``type:Name``. None: all.

    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> circular = dict(padding=1, padding_mode="circular")
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
    >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(8))
    >>> [result.layer_names[i] for i in layer_indices(result, ["type:Conv2d"])]
    ['0', '3']
    >>> layer_indices(result, "0,2")
    [0, 2]
    """
    import fnmatch

    from ..equivariance.capture import module_name, split_filters

    if layers is None:
        return list(range(len(result.layers)))
    items = [layers] if isinstance(layers, str) else list(layers)
    patterns, types = split_filters(items)
    keep = [i for i, info in enumerate(result.layers)
            if info.module in types or any(fnmatch.fnmatchcase(info.name, p)
                                           or fnmatch.fnmatchcase(module_name(info.name), p)
                                           for p in patterns)]
    if not keep:
        raise UsageError(f"no layer matches {' '.join(items)}; names look like"
                         f" {', '.join(result.layer_names[:4])} (result.layer_names)")
    return keep


def select_layers(result: Result, layers) -> Result:
    """A copy of ``result`` with only the layers matching ``layers`` (see :func:`layer_indices`),
    for re-plotting a subset (``shiftlab plot --layers``).

    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> circular = dict(padding=1, padding_mode="circular")
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
    ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
    >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.measure(net, images, shiftlab.ShiftGrid.square(8))
    >>> select_layers(result, ["type:MaxPool2d", "3"]).layer_names
    ['2', '3']
    """
    import dataclasses

    keep = layer_indices(result, layers)
    return dataclasses.replace(
        result, layers=[result.layers[i] for i in keep],
        **{name: getattr(result, name)[keep] for name in _ARRAYS})
