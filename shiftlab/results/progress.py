"""Progress checkpoints: a measurement's float64 sums after each completed image batch
(:class:`RunProgress`), a protocol's per-image rows after each completed epoch
(:class:`EpochProgress`).

A file's key fingerprints everything the sums depend on: settings, layers, the images'
content, the batch layout, the model's weights (a hash of its state dict) and the pipeline's
identity of the run (model spec, seed, weights, dtype, padding, antialias). ``--resume`` with
any of them changed is refused, naming what differs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import UsageError, one_line
from .files import atomic_write
from ..equivariance.geometry import LayerInfo
from ..models.checkpoints import state_dict_fingerprint
from .result import Settings


def check_progress_path(path) -> Path:
    """``path`` as a Path when a progress file may be written there: refuses, before anything
    is measured, a folder (or other non-file) of that name, which only the first save after a
    whole batch or epoch of work would otherwise find.

    >>> import tempfile
    >>> check_progress_path(tempfile.gettempdir())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    shiftlab.errors.UsageError: progress file ... is a folder, not a file; ...
    """
    path = Path(path)
    if path.is_dir() or (path.exists() and not path.is_file()):
        what = "a folder" if path.is_dir() else "not a regular file"
        raise UsageError(f"progress file {path} is {what}, not a file; remove or rename it, or"
                         " choose another --out folder (another checkpoint path)")
    return path


class _Checkpoint:
    """One progress file: a key (what the saved state depends on) and named arrays, written
    atomically and read back only by a run with the same key."""

    def __init__(self, path, key: dict, identity: Optional[dict]) -> None:
        self.path = check_progress_path(path)
        self.key = dict(key)
        for name, value in sorted((identity or {}).items()):
            self.key[name] = json.dumps(value, sort_keys=True, default=str)

    def _write(self, arrays: dict) -> None:
        arrays = {"key": np.array(json.dumps(self.key, sort_keys=True)), **arrays}
        atomic_write(self.path, lambda handle: np.savez(handle, **arrays))

    def _read(self, required: tuple[str, ...]) -> Optional[dict]:
        """The saved arrays (without the key), None without a file; refuses an unreadable file
        (or one without the ``required`` arrays) or another run's, naming what differs."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                saved = json.loads(str(data["key"]))
                arrays = {name: data[name] for name in data.files if name != "key"}
                for name in required:
                    if name not in arrays:
                        raise KeyError(f"{name} is not a file in the archive")
        except Exception as exc:  # noqa: BLE001  any unreadable file: start again
            raise UsageError(f"cannot resume from {self.path} ({one_line(exc)}); delete it and"
                             " start again") from exc
        differ = [name for name in self.key if saved.get(name) != self.key[name]]
        differ += [name for name in saved if name not in self.key]
        if differ:
            raise UsageError(f"cannot resume: the interrupted run in {self.path.parent} used another"
                             f" {', '.join(differ)}; rerun with the same options, or without --resume"
                             " into a fresh --out")
        return arrays

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class RunProgress(_Checkpoint):
    """Atomic progress checkpoints of one run (``measure(checkpoint=...)``)."""

    def __init__(self, path, settings: Settings, infos: list[LayerInfo], images_digest: str,
                 images_per_batch: int, model: nn.Module, identity: Optional[dict] = None) -> None:
        """``images_digest``: a hash of the image tensor (the engine's ``InputDigest``)."""
        super().__init__(path, {
            "settings": json.dumps(settings.to_dict(), sort_keys=True),
            "layers": json.dumps([i.name for i in infos]),
            "images": images_digest,
            "batch layout": str(images_per_batch),
            "model weights": state_dict_fingerprint(model),
        }, identity)

    def save(self, sums, n_done: int) -> None:
        self._write({"done": np.array(n_done),
                     **{name: getattr(sums, name).cpu().numpy() for name in sums.FIELDS}})

    def restore(self, sums) -> int:
        """Load the accumulators; returns how many images were already done (0 if no file)."""
        arrays = self._read(("done", *sums.FIELDS))
        if arrays is None:
            return 0
        for name in sums.FIELDS:
            target = getattr(sums, name)
            if tuple(arrays[name].shape) != tuple(target.shape):
                raise UsageError(f"{self.path} does not match this run's layers and shifts; delete it")
            target.copy_(torch.from_numpy(arrays[name]))
        return int(arrays["done"])


class EpochProgress(_Checkpoint):
    """Atomic per-epoch checkpoints of a protocol run (``consistency_protocol(checkpoint=...)``).

    Each completed epoch is a record of per-image arrays (``ids``, ``labels``, ``offsets``,
    ``predictions``, ``probability``; the same images every epoch) and the input ``canvas``.
    The key is the model's weights and the caller's ``identity`` (protocol settings but the
    number of epochs, model spec, images, ...), so a run can be continued with more epochs.
    """

    def __init__(self, path, model: nn.Module, identity: dict) -> None:
        super().__init__(path, {"model weights": state_dict_fingerprint(model)}, identity)

    def save(self, epochs: list[dict]) -> None:
        arrays = {"n_epochs": np.array(len(epochs)), "canvas": np.asarray(epochs[0]["canvas"])}
        if epochs[0]["labels"] is not None:
            arrays["labels"] = epochs[0]["labels"]
        for name in epochs[0]:
            if name not in ("labels", "canvas"):
                arrays[name] = np.stack([record[name] for record in epochs])
        self._write(arrays)

    def restore(self) -> list[dict]:
        """The records of the completed epochs ([] without a file); refuses another run's file."""
        arrays = self._read(("n_epochs", "canvas"))
        if arrays is None:
            return []
        n_epochs = int(arrays.pop("n_epochs"))
        labels, canvas = arrays.pop("labels", None), tuple(int(v) for v in arrays.pop("canvas"))
        return [{"labels": labels, "canvas": canvas, **{name: values[e] for name, values in arrays.items()}}
                for e in range(n_epochs)]
