"""Writing a figure: every format atomically (a temporary file, then a rename)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from matplotlib.figure import Figure

from ..errors import UsageError
from ..results.files import atomic_write

__all__ = ["save_figure"]


def save_figure(fig: Figure, path_stem: Union[str, os.PathLike], formats: Sequence[str] = ("png", "pdf"),
                dpi: int = 150) -> list[Path]:
    """Write ``<path_stem>.<format>`` for each format atomically (temp file, then rename).

    The figure stays open; close it when done. Returns the written paths in ``formats`` order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> import tempfile
        >>> from shiftlab.figures.plots import layer_grid
        >>> fig = layer_grid(shiftlab.measure(net, images, shiftlab.ShiftGrid.square(4)))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> paths = save_figure(fig, f"{tmp.name}/layers", formats=("png",))
        >>> [path.name for path in paths], paths[0].read_bytes()[:4]
        (['layers.png'], b'\\x89PNG')
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise UsageError("save_figure needs at least one format, e.g. ('png', 'pdf')")
    supported = fig.canvas.get_supported_filetypes()
    paths = []
    for fmt_ in formats:
        fmt_ = fmt_.lower().lstrip(".")
        if fmt_ not in supported:
            raise UsageError(f"cannot save a figure as {fmt_!r}; use one of {', '.join(sorted(supported))}")
        path = Path(f"{os.fspath(path_stem)}.{fmt_}")
        atomic_write(path, lambda handle, f=fmt_: fig.savefig(
            handle, format=f, dpi=dpi, bbox_inches="tight", pad_inches=0.08))
        paths.append(path)
    return paths
