"""Files: atomic writes, JSON headers inside .npz files, and the size limits checked on reading.

Every output of shiftlab is written to a temp file next to its destination and renamed into
place, so an interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import numpy as np

from ..errors import ShiftlabError, one_line


def to_jsonable(value: object) -> object:
    """``json.dumps(..., default=to_jsonable)``: numpy scalars, tuples and sets, else ``str``.

    >>> to_jsonable((1, 2))
    [1, 2]
    """
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    return str(value)


def atomic_write(path: Union[str, os.PathLike], write: Callable) -> Path:
    """Call ``write(handle)`` on a temp file next to ``path``, then rename it into place.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> folder = Path(tmp.name)
    >>> path = atomic_write(folder / "out" / "table.csv", lambda handle: handle.write(b"a,b\\n"))
    >>> path.read_text(), [p.name for p in path.parent.iterdir()]   # no temp file left behind
    ('a,b\\n', ['table.csv'])
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ShiftlabError(f"cannot write to {path.parent}: {exc.strerror}; choose a writable --out") from exc
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
        # mkstemp makes 0600 files; outputs get the usual permissions of the user's umask
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def read_members(data: "np.lib.npyio.NpzFile", names, max_values: int, path,
                 what: str = "result") -> dict:
    """The named arrays of an open ``np.load`` archive, each refused before it is expanded when
    its header declares more than ``max_values`` values, more than 8 bytes a value, or text
    (the JSON header, names) above ``MAX_TEXT_BYTES`` (a 1.5 MB npz can hold 1.3 GB; one
    ``<U250000000`` value is 1 GB).

    Missing names raise ``ShiftlabError`` naming the first one.
    """
    from numpy.lib import format as npformat

    out = {}
    for name in names:
        if name not in data.files:
            raise ShiftlabError(f"{path} is not a shiftlab {what} file: it has no {name!r} array")
        with data.zip.open(f"{name}.npy") as handle:
            version = npformat.read_magic(handle)
            read_header = (npformat.read_array_header_1_0 if version == (1, 0)
                           else npformat.read_array_header_2_0)
            shape, _, dtype = read_header(handle)  # the header only: nothing is expanded yet
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if count > max_values or dtype.hasobject:
            raise ShiftlabError(f"{path}: array {name!r} declares {count:,} values ({dtype}), above"
                                f" the limit of {max_values:,}; refusing to expand it")
        size = count * dtype.itemsize
        limit = MAX_TEXT_BYTES if dtype.kind in "SU" else max_values * 8
        if size > limit:
            raise ShiftlabError(f"{path}: array {name!r} declares {size:,} bytes ({count:,} x"
                                f" {dtype}), above the limit of {limit:,}; refusing to expand it")
        out[name] = data[name]
    return out


#: the most values one array of a shiftlab file may declare (checked before it is expanded)
MAX_ARRAY_VALUES = 64 * 2**20
#: the most bytes a text array (the JSON header, layer names) may declare
MAX_TEXT_BYTES = 16 * 2**20


def write_archive(path, header: dict, arrays: dict) -> Path:
    """Write ``arrays`` and the JSON ``header`` as one compressed ``.npz`` (no pickle),
    atomically; the counterpart of :func:`read_archive`. ``None`` arrays are left out."""
    import json

    members = {name: array for name, array in arrays.items() if array is not None}
    members["header"] = np.array(json.dumps(header, default=to_jsonable))
    return atomic_write(Path(path), lambda handle: np.savez_compressed(handle, **members))


def read_archive(path, required, optional=(), max_values: int = MAX_ARRAY_VALUES,
                 what: str = "result"):
    """(JSON header, arrays) of a shiftlab ``.npz``: ``required`` arrays must be there,
    ``optional`` ones may be; each is refused before expansion above ``max_values`` values.
    Raises ``ShiftlabError`` for a file that is not such an archive.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "x.npz"
    >>> _ = write_archive(path, {"format": 2}, {"grid_argmax": np.arange(6).reshape(2, 3)})
    >>> header, arrays = read_archive(path, ("grid_argmax",), optional=("labels",))
    >>> header, arrays["grid_argmax"].tolist(), "labels" in arrays
    ({'format': 2}, [[0, 1, 2], [3, 4, 5]], False)
    >>> read_archive(path, ("grid_prob",))                   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    shiftlab.errors.ShiftlabError: .../x.npz is not a shiftlab result file: it has no 'grid_prob' ...
    """
    import json

    try:
        with np.load(path, allow_pickle=False) as data:
            present = tuple(name for name in optional if name in data.files)
            arrays = read_members(data, ("header",) + tuple(required) + present, max_values, path,
                                  what)
    except ShiftlabError:
        raise
    except Exception as exc:  # noqa: BLE001  (zip, npy or pickle-refusal errors)
        raise ShiftlabError(f"{path} is not a shiftlab {what} file ({type(exc).__name__}:"
                            f" {one_line(exc)})") from exc
    try:
        header = json.loads(str(arrays.pop("header")))
    except ValueError as exc:
        raise ShiftlabError(f"{path} has a damaged header ({one_line(exc)})") from exc
    if not isinstance(header, dict):
        raise ShiftlabError(f"{path} has a damaged header (not a JSON object)")
    return header, arrays
