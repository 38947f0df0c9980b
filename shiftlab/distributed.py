"""Scale-out with torch.distributed (``torchrun``): shard images, all-reduce float64 sums.

Under ``torchrun --nproc_per_node=N -m shiftlab heatmap ...`` every rank measures its share of
the images (rank r takes images r, r+N, ...), the per-shift float64 sums are all-reduced, and
only rank 0 writes outputs. ``shiftlab consistency`` shards the same way and gathers its small
per-image arrays (:func:`gather`). NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .errors import ShiftlabError, one_line


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints."""
    return rank() == 0


def init_from_env() -> bool:
    """Start the process group that ``torchrun`` describes in the environment, once.

    Returns True when running distributed. Single-process runs (no WORLD_SIZE, or 1) do nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        use_nccl = torch.cuda.is_available() and dist.is_nccl_available()
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return True


def local_device() -> torch.device:
    """This rank's GPU under torchrun (LOCAL_RANK), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def shard(count: int) -> list[int]:
    """Indices of the items this rank handles: r, r + N, r + 2N, ..."""
    return list(range(rank(), count, world_size()))


def owned(positions: np.ndarray) -> np.ndarray:
    """Which of these item positions this rank handles (the rule of :func:`shard`): a mask."""
    return np.asarray(positions) % world_size() == rank()


@contextlib.contextmanager
def _collective():
    """A collective whose peer died (gloo: "Connection closed by peer", NCCL: a timeout) is
    one line naming the cause, not the backend's message asking to report a bug."""
    try:
        yield
    except RuntimeError as exc:
        raise ShiftlabError(f"another torchrun process stopped, so process {rank()} cannot go"
                            f" on ({one_line(exc)[:160]}); the failing process's own error says"
                            " why") from exc


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (moved through the backend's device)."""
    if not active():
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    for tensor in tensors:
        buffer = tensor.to(device)
        with _collective():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        tensor.copy_(buffer.to(tensor.device))


def gather(value: object) -> list:
    """Every rank's ``value`` in rank order (pickled by torch.distributed: keep it small, e.g.
    per-image arrays); ``[value]`` single-process."""
    if not active():
        return [value]
    gathered: list = [None] * world_size()
    with _collective():
        dist.all_gather_object(gathered, value)
    return gathered


def broadcast(value: object) -> object:
    """Rank 0's ``value`` on every rank (e.g. what rank 0 read from a progress file)."""
    if not active():
        return value
    box = [value]
    with _collective():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_checked(value: object, failure: Optional[BaseException] = None) -> list:
    """:func:`gather`, with this rank's ``failure`` (if any) raised on every rank: the failing
    rank raises its own, the others the lowest failing rank's (same class and message). So no
    rank is left waiting in a later collective for a peer that gave up."""
    shared = gather((value, _portable(failure)))
    if failure is not None:
        raise failure
    _raise_first([error for _, error in shared])
    return [item for item, _ in shared]


def broadcast_checked(value: object, failure: Optional[BaseException] = None) -> object:
    """:func:`broadcast` of rank 0's ``value``; rank 0's ``failure`` is raised on every rank."""
    shared, error = broadcast((value, _portable(failure)))
    if failure is not None:
        raise failure
    _raise_first([error])
    return shared


def _portable(error: Optional[BaseException]) -> Optional[tuple[type, str]]:
    """An error as (class, message), to send to the other ranks (None stays None)."""
    return None if error is None else (type(error), str(error))


def _raise_first(errors: Sequence[Optional[tuple[type, str]]]) -> None:
    for error in errors:
        if error is not None:
            kind, message = error
            try:
                failure = kind(message)
            except TypeError:  # a class whose constructor wants more than a message
                failure = ShiftlabError(message)
            raise failure


def finish() -> None:
    """Wait until every rank got here (rank 0 has written its outputs); no-op single-process.

    A rank that exits while others still use the process group can make gloo abort the process.
    """
    if active():
        with _collective():
            dist.barrier()


def shutdown() -> None:
    """Destroy the process group if one is running (after :func:`finish`, or on an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
