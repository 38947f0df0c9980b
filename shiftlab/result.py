"""Result: per-layer distance maps plus every setting that produced them; save/load as one .npz."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from .errors import ShiftlabError, UsageError
from .files import atomic_write, to_jsonable
from .geometry import LayerInfo
from .shifts import ShiftGrid

if TYPE_CHECKING:  # pandas and matplotlib are imported lazily: only tables/figures need them
    import pandas
    from matplotlib.figure import Figure

FORMAT_VERSION = 1


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
            layers=tuple(data["layers"]) if data.get("layers") is not None else None)

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

    >>> result.map("features.4").shape         # doctest: +SKIP
    (8, 8)
    """

    settings: Settings
    layers: list[LayerInfo]
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray
    n_inf: np.ndarray
    n_nan: np.ndarray
    meta: dict = field(default_factory=dict)

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

    def layer_mean(self, layer: str) -> float:
        """Mean distance over the shifts with a finite value (NaN when there is none).

        For PSNR the +inf of identical maps (always the zero shift) is left out, so the mean
        ranks layers; for cosine and l2 every defined value is finite.
        """
        values = self.values(layer)
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else math.nan

    def nonfinite_layers(self) -> list[str]:
        """Layers where some image gave a non-finite value for a shift the alignment defines."""
        return [info.name for info, bad in zip(self.layers, self.n_nan) if bad.sum() > 0]

    # -- figures (thin wrappers: plots.py does the drawing) ---------------------------
    def plot(self, **kwargs) -> "Figure":
        """The layer grid (``shiftlab.plots.layer_grid``) of this result."""
        from .plots import layer_grid

        return layer_grid(self, **kwargs)

    def plot_profile(self, **kwargs) -> "Figure":
        """Mean distance per layer vs. depth (``shiftlab.plots.layer_profile``)."""
        from .plots import layer_profile

        return layer_profile(self, **kwargs)

    # -- tables ----------------------------------------------------------------------
    def to_frame(self) -> "pandas.DataFrame":
        """Tidy table: one row per (layer, shift) with layer, kind, stride, dh, dw, mean, std, n."""
        import pandas as pd

        shifts = np.asarray(self.grid.shifts)
        frames = []
        for depth, info in enumerate(self.layers):
            frames.append(pd.DataFrame({
                "layer": info.name, "depth": depth, "module": info.module, "kind": info.kind,
                "stride": info.stride[0], "dh": shifts[:, 0], "dw": shifts[:, 1],
                "mean": self.mean[depth], "std": self.std[depth], "n": self.n[depth],
            }))
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> "pandas.DataFrame":
        """One row per layer: module, kind, stride, shape, mean and max distance over shifts."""
        import pandas as pd

        rows = []
        for depth, info in enumerate(self.layers):
            values = self.mean[depth]
            finite = values[np.isfinite(values)]
            rows.append({
                "layer": info.name, "depth": depth, "module": info.module, "kind": info.kind,
                "layout": info.layout if info.is_spatial else "",
                "stride": info.stride[0], "shape": "x".join(map(str, info.shape)),
                "mean": self.layer_mean(info.name),
                "max": float(finite.max()) if finite.size else math.nan,
                "defined_shifts": int((~np.isnan(values)).sum()),
            })
        return pd.DataFrame(rows)

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write one ``.npz`` (arrays + JSON metadata) atomically: temp file, then rename."""
        path = Path(path)
        header = {
            "format": FORMAT_VERSION, "settings": self.settings.to_dict(),
            "layers": [info.to_dict() for info in self.layers], "meta": self.meta,
        }
        arrays = {"mean": self.mean, "std": self.std, "n": self.n, "n_inf": self.n_inf,
                  "n_nan": self.n_nan, "header": np.array(json.dumps(header, default=to_jsonable))}
        return atomic_write(path, lambda handle: np.savez_compressed(handle, **arrays))


def load(path: Union[str, os.PathLike]) -> Result:
    """Read a result written by ``Result.save`` (no pickle involved).

    >>> result = shiftlab.load("runs/vgg16/result.npz")   # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ShiftlabError(f"no result file at {path}; pass the result.npz written by 'shiftlab heatmap'")
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            arrays = {k: data[k] for k in ("mean", "std", "n", "n_inf", "n_nan")}
    except Exception as exc:
        raise ShiftlabError(f"{path} is not a shiftlab result file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise ShiftlabError(f"{path} has result format {found}, this shiftlab reads"
                            f" {FORMAT_VERSION}; re-run the measurement")
    try:
        return Result(
            settings=Settings.from_dict(header["settings"]),
            layers=[LayerInfo.from_dict(item) for item in header["layers"]],
            meta=header.get("meta", {}), **arrays)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ShiftlabError(f"{path} has an incomplete or damaged header ({type(exc).__name__}:"
                            f" {exc}); re-run the measurement") from exc
