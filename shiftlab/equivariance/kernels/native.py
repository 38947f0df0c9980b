"""Compiled CPU kernels, built on first use with the machine's C compiler and cached.

Why: on a CPU each eager PyTorch operation is one pass over a feature map, and the circular
bilinear comparison needs about ten of them per shifted map (a 3-tap norm, a filtered and
rolled reference, an inner product), where the forward pass that made the map read it once. The
kernel in ``csrc/bilinear.c`` does all of it in one read (see there). ``torch.compile`` would be
the library route; on this kind of CPU its code for these reductions was ~100× slower than a BLAS
dot (measured for #17), so this is a small hand-written C file instead, called through ctypes.

It is an accelerator, never a requirement: without a compiler, on a GPU, for float64 maps or with
``SHIFTLAB_NATIVE=0`` the eager code runs and gives the same numbers (to float rounding; tested).
``SHIFTLAB_NATIVE=1`` makes a failed build an error (benchmarks use it). The plans reach this module
only through :mod:`~shiftlab.equivariance.kernels.differences`, which makes that choice. The shared
object is built and cached by :mod:`~shiftlab.equivariance.kernels.build` (under
``$SHIFTLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/shiftlab``, else ``~/.cache/shiftlab``; checked
against a recorded hash before it is loaded; a compiler that hangs is not run again). Every entry
point's C signature is declared to ctypes (``_ARGUMENTS``).

OpenMP: ``-fopenmp`` links ``libgomp.so.1``; PyTorch is imported first and its bundled runtime
(``torch/lib/libgomp.so.1``) has that soname, so the loader binds the kernel to it: one OpenMP
runtime and thread pool per process. A PyTorch whose runtime has another name would map the
system's as a second copy; tests/test_native.py checks ``/proc/self/maps`` for that.
"""
from __future__ import annotations

import ctypes
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ... import config
from ...errors import ShiftlabError, one_line
from . import build

SOURCE = build.SOURCE
_build, _compiler = build.build, build.compiler  # looked up here at each use: tests replace them
_lock = threading.Lock()
_state: dict = {}


# The C signatures (csrc/bilinear.c), declared so that ctypes converts and checks every argument:
# without them a slip in the order of ~27 positional arguments corrupts memory silently.
_F32, _F64, _I32 = (ctypes.POINTER(t) for t in (ctypes.c_float, ctypes.c_double, ctypes.c_int))
_INT, _LONG = ctypes.c_int, ctypes.c_long
_MAPS = [_F32, _F32, _LONG, _LONG, _INT, _INT, _INT, _INT, _INT]
"""Every kernel's first arguments: ref, shifted, stride_s, stride_b, n_shifts, n_images, channels,
H, W."""
_WORK = {"": [_INT, _INT], "_parallel": [_INT]}
"""Then (first_bc, last_bc), the (image, channel) range of one call, or n_threads for the OpenMP
entry point (``_parallel``, only in a build with OpenMP)."""
_ARGUMENTS = {
    # n_lags, lags_in, mode, roll, row_start, row_count, row_off, row_w, col_set, n_sets,
    # set_start, set_count, col_off_in, col_w, out_lags, out_diff, out_cross
    "shiftlab_bilinear": [_INT, _I32, _I32, _I32, _I32, _I32, _I32, _F64, _I32, _INT, _I32, _I32,
                          _I32, _F32, _F64, _F64, _F64],
    # ref_b, ref_c, ref_row, index, roll, out_sq, out_diff
    "shiftlab_difference": [_LONG, _LONG, _LONG, _I32, _I32, _F64, _F64],
}
_POINTERS = {np.dtype(np.int32): _I32, np.dtype(np.float32): _F32, np.dtype(np.float64): _F64}


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with every entry point's signature declared (AttributeError when
    one is missing: a damaged or stale file)."""
    library = ctypes.CDLL(str(path))
    for name, arguments in _ARGUMENTS.items():
        for suffix, work in _WORK.items():
            function = getattr(library, name + suffix, None) if suffix else getattr(library, name)
            if function is not None:
                function.argtypes = [*_MAPS, *work, *arguments]
                function.restype = ctypes.c_int
    return library


def _library(warn: bool) -> Optional[ctypes.CDLL]:
    """The library, built or loaded once per process, or None when that fails (``warn``: say so
    in a RuntimeWarning, the first time)."""
    with _lock:
        if "library" not in _state:
            library, reason = None, ""
            compiler = _compiler()
            if compiler is None:
                reason = "no C compiler found (set CC)"
            else:
                try:
                    try:
                        library = _open(_build(compiler))
                    except build.GaveUp:  # a compiler that hangs is not run again
                        raise
                    except (OSError, AttributeError):  # a cached file that will not load
                        library = _open(_build(compiler, rebuild=True))
                except (OSError, AttributeError) as exc:
                    library, reason = None, one_line(exc)
            _state["library"], _state["reason"] = library, reason
            if library is None and warn:  # once per process: the numbers are the same
                warnings.warn(f"shiftlab's compiled CPU kernel is not available ({reason}); the "
                              "bilinear alignment runs slower on the CPU (ResNet-50: about 1.7x; "
                              "SHIFTLAB_NATIVE=0 silences this)", RuntimeWarning, stacklevel=3)
        return _state["library"]


def load(required: bool = False) -> Optional[ctypes.CDLL]:
    """The kernel library, or None when it cannot be built: a RuntimeWarning the first time, or
    a ShiftlabError when ``required`` (``SHIFTLAB_NATIVE=1``)."""
    library = _library(warn=not required)
    if library is None and required:
        raise ShiftlabError(f"SHIFTLAB_NATIVE=1 but the kernel cannot be built: {_state['reason']}")
    return library


def status() -> str:
    """'native' when the kernel is in use, else 'eager (<why>)'."""
    mode = config.native_mode()
    if mode == "off":
        return "eager (SHIFTLAB_NATIVE=0)"
    if _library(warn=mode == "auto") is None:
        return f"eager (kernel not built: {_state['reason']})"
    return "native"


def fits(ref: torch.Tensor, shifted: torch.Tensor) -> bool:
    """The kernel can read these maps: CPU float32 with contiguous (C, h, w) planes (any shift
    and image strides), a contiguous reference."""
    if ref.device.type != "cpu" or ref.dtype != torch.float32 \
            or shifted.dtype != torch.float32 or not ref.is_contiguous():
        return False
    channels, height, width = shifted.shape[2:]
    expected = (height * width, width, 1)  # the strides of size-1 dims do not matter
    return not any(size > 1 and stride != want for size, stride, want
                   in zip(shifted.shape[2:], shifted.stride()[2:], expected))


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, kept for the process: pools are never shut down, so
    callers on several threads cannot close each other's."""
    with _lock:
        pools = _state.setdefault("pools", {})
        if workers not in pools:
            pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="shiftlab")
        return pools[workers]


def _ints(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values) or [0], dtype=np.int32)


def _pointer(array: np.ndarray):  # noqa: ANN202  (a ctypes pointer type made at run time)
    """A typed pointer to ``array``'s data: a dtype that does not match the C parameter is a
    ctypes TypeError at the call, not a misread."""
    return array.ctypes.data_as(_POINTERS[array.dtype])


def _run(library: ctypes.CDLL, name: str, ref: torch.Tensor, shifted: torch.Tensor,
         count: int, arguments: list, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Call kernel ``name`` over every (image, channel) pair of ``shifted`` (S, B, C, h, w), its
    first ``count`` shift slots, with ``arguments`` after the common ones: ``name_parallel``
    on OpenMP threads when the library has it, else one call per Python thread (ctypes drops the
    GIL), each on its own output arrays of ``shapes``, then summed."""
    _, n_images, channels, height, width = shifted.shape
    steps = [step if shifted.numel() else 0 for step in shifted.stride()[:2]]
    common = [ctypes.cast(ref.data_ptr(), _F32), ctypes.cast(shifted.data_ptr(), _F32), *steps,
              count, n_images, channels, height, width]
    units = n_images * channels
    workers = max(1, min(torch.get_num_threads(), units))
    parallel = getattr(library, f"{name}_parallel", None)
    parts = 1 if parallel is not None else workers
    outputs = [[np.zeros(shape) for shape in shapes] for _ in range(parts)]

    def pointers(k: int) -> list:
        return [_pointer(array) for array in outputs[k]]

    if parallel is not None:  # OpenMP: PyTorch's own thread pool
        codes = [parallel(*common, workers, *arguments, *pointers(0))]
    else:
        bounds = [units * k // parts for k in range(parts + 1)]
        serial = getattr(library, name)
        run = lambda k: serial(*common, bounds[k], bounds[k + 1], *arguments,  # noqa: E731
                               *pointers(k))
        codes = [run(0)] if parts == 1 else list(_pool(parts).map(run, range(parts)))
    if any(codes):
        raise MemoryError(f"shiftlab's CPU kernel ({name}) could not allocate its scratch memory")
    return [sum(part[i] for part in outputs) for i in range(len(shapes))]


class BilinearKernel:
    """The arguments of ``csrc/bilinear.c`` for one plan and map size, prepared once (plans
    are shared by the layers of one geometry, so a call costs little more than the kernel).

    Per shift: ``exact`` (s divides δ), ``rolls`` (q_h, q_w) for exact shifts, ``row_taps`` /
    ``col_taps`` ((offset in [0, n), weight), ...) for the others (None for exact ones); ``lags``
    the (l_h, l_w) of the norm's lag sums (:func:`shiftlab.equivariance.stencil.quadratic_lags`).
    """

    def __init__(self, lags: Sequence[tuple[int, int]], exact: Sequence[bool],
                 rolls: Sequence[tuple[int, int]],
                 row_taps: Sequence[Optional[Sequence[tuple[int, float]]]],
                 col_taps: Sequence[Optional[Sequence[tuple[int, float]]]]) -> None:
        self.library = load()
        self.n_lags = len(lags)
        row_start, row_count, row_off, row_w, col_set = [], [], [], [], []
        sets: dict[tuple, int] = {}
        for taps_r, taps_c, flag in zip(row_taps, col_taps, exact):
            row_start.append(len(row_off))
            row_count.append(0 if flag else len(taps_r))
            col_set.append(0 if flag or not taps_r else sets.setdefault(tuple(taps_c), len(sets)))
            if not flag:
                row_off.extend(offset for offset, _ in taps_r)
                row_w.extend(weight for _, weight in taps_r)
        set_start, set_count, col_off, col_w = [], [], [], []
        for taps_c in sets:
            set_start.append(len(col_off))
            set_count.append(len(taps_c))
            col_off.extend(offset for offset, _ in taps_c)
            col_w.extend(weight for _, weight in taps_c)
        # kept as attributes: the pointers below point into them
        self._arrays = (
            _ints(value for lag in lags for value in lag), _ints(int(bool(f)) for f in exact),
            _ints(value for roll in rolls for value in roll), _ints(row_start), _ints(row_count),
            _ints(row_off), np.asarray(row_w or [0.0], dtype=np.float64), _ints(col_set),
            _ints(set_start), _ints(set_count), _ints(col_off),
            np.asarray(col_w or [0.0], dtype=np.float32))
        pointers = [_pointer(array) for array in self._arrays]
        # (lags, mode, roll, row_start, row_count, row_off, row_w, col_set), n_sets, (the rest)
        self._head = [self.n_lags, *pointers[:8]]
        self._tail = [len(sets), *pointers[8:]]

    def __call__(self, ref: torch.Tensor, shifted: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ref (B, C, h, w) contiguous, shifted (S, B, C, h, w) with contiguous planes ->
        lag sums (S, B, L), lag sums of the difference (S, B, L, exact shifts) and cross terms
        (S, B), float64."""
        n_shifts, n_images = shifted.shape[:2]
        sums = _run(self.library, "shiftlab_bilinear", ref.contiguous(), shifted, n_shifts,
                    [*self._head, *self._tail],
                    [(n_shifts, n_images, self.n_lags), (n_shifts, n_images, self.n_lags),
                     (n_shifts, n_images)])
        return tuple(torch.from_numpy(total) for total in sums)  # type: ignore[return-value]


def difference_sums(ref: torch.Tensor, shifted: torch.Tensor, index: Sequence[int],
                    rolls: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ b² and Σ (b - roll(a, q))² per (shift, image) in one read of each shifted map, for the
    shifts ``shifted[index[k]]`` rolled by ``rolls[k]`` (the exact and Fourier alignments).

    ref (B, C, h, w) with contiguous rows (any image, channel and row strides: a Fourier source
    is a slice of a wider matrix product), shifted (S, B, C, h, w) with contiguous planes -> two
    (len(index), B) float64.
    """
    if ref.shape[-1] > 1 and ref.stride(-1) != 1:
        ref = ref.contiguous()
    count, n_images = len(index), shifted.shape[1]
    arrays = (_ints(index), _ints(value for roll in rolls for value in roll))
    squares, differences = _run(load(), "shiftlab_difference", ref, shifted, count,
                                [*ref.stride()[:3], *(_pointer(array) for array in arrays)],
                                [(count, n_images), (count, n_images)])
    return torch.from_numpy(squares), torch.from_numpy(differences)
