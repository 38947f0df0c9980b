"""Writes a run's folder (result files, tables, figures) as one set.

Every file is first written into a hidden staging folder inside ``--out``; only when all are
written does the set replace the folder's previous outputs, and a failed move puts the earlier
files back. So a folder is never a mix of two runs, and an interrupted run changes nothing.
Stale staging folders of a killed run are cleaned at the next run into the same folder.

Result numbers are saved before any figure is drawn: a figure that fails never loses them.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..errors import ShiftlabError, UsageError, one_line
from ..results.files import atomic_write

if TYPE_CHECKING:
    from ..figures.options import FigureOptions

#: progress checkpoint of an interrupted ``heatmap`` run, kept until every output is in place
PROGRESS_FILE = ".shiftlab-progress.npz"
#: names of the files shiftlab writes into --out (any command): a folder holding one of these
#: holds another run's results
OUTPUT_PATTERNS = ("result.npz", "result-*.npz", "invariance-*.npz", "protocol-*.npz",
                   "attribution-*.npz", "summary.csv", "consistency.csv", "models.csv",
                   "heatmap.*", "heatmap-*.*", "profile.*", "profile-*.*", "paper.*", "grids.*",
                   "difference*.*", "probability.*", "padding.*", "scatter.*", "diagonal.*",
                   "attribution.*", "dense-*.npz", "agreement.*", "shift-size.*")
#: the figures of one result (``shiftlab plot`` replaces only these)
FIGURE_PATTERNS = ("heatmap.*", "profile.*", "paper.*")
_STAGING = ".shiftlab-"


def is_output(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OUTPUT_PATTERNS)


def safe_name(text: str) -> str:
    """A model name or label as a file-name part: letters, digits, '-', '_', '.'.

    >>> safe_name("resnet50+aa4@x.pth")
    'resnet50_aa4_x.pth'
    """
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def default_out(name: str) -> Path:
    """runs/<name>-<timestamp>, with -2, -3, ... when a run in the same second took it."""
    base = Path("runs") / f"{safe_name(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, index = base, 2
    while candidate.exists():
        candidate, index = Path(f"{base}-{index}"), index + 1
    return candidate


def check_out(folder: Path, *, overwrite: bool = False, resume: bool = False,
              progress: Sequence[str] = (PROGRESS_FILE,)) -> None:
    """Fail before a long run if ``folder`` cannot be written, or holds another run's results
    (unless ``overwrite``). ``resume`` continues only the run whose progress file (one of
    ``progress``) is in ``folder``: it never replaces a finished set. Creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ShiftlabError(f"cannot create output folder {folder}: {existing} is not a folder;"
                            " choose another --out")
    if not os.access(existing, os.W_OK):
        raise ShiftlabError(f"cannot create output folder {folder}: {existing} is not writable;"
                            " choose another --out")
    if resume and progress and not overwrite and folder.is_dir() and \
            not any((folder / name).is_file() for name in progress):
        others = sorted(p.name for p in folder.iterdir()
                        if p.name.startswith(PROGRESS_FILE[:-4]) or is_output(p.name))
        if others:
            listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4
                                              else "")
            raise UsageError(f"--resume: {folder} holds no progress of this run, only {listed};"
                             " a finished or different run is not continued: pass --overwrite"
                             " to replace it, or choose a fresh --out")
    if folder.is_dir() and not (overwrite or resume):
        found = sorted(p.name for p in folder.iterdir() if is_output(p.name))
        if found:
            listed = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
            raise UsageError(f"--out {folder} already holds another run's results ({listed}); pass"
                             " --overwrite to replace them as a set, or choose a fresh --out")


class DrawingFailed(ShiftlabError):
    """The numbers of a run are in place but a figure could not be drawn or saved."""


def write_set(folder: Path, write: Callable[[Path], list[Path]],
              draw: Optional[Callable[[Path], list[Path]]] = None, *,
              replaces: Sequence[str] = OUTPUT_PATTERNS, redraw: str = "") -> list[Path]:
    """Call ``write(stage)`` and then ``draw(stage)`` to write every output into a staging
    folder, then replace the folder's previous outputs (the files matching ``replaces``) with
    them as one set. Returns the final paths.

    When ``draw`` fails (any Exception), the numbers that ``write`` wrote still replace the
    previous set, without figures, and :class:`DrawingFailed` names them and ``redraw`` (how to
    draw them again). An interrupt (Ctrl-C, SIGTERM) changes nothing.

    >>> import tempfile, pandas as pd
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     written = write_set(Path(tmp) / "run", lambda stage: [
    ...         write_table(stage / "summary.csv", pd.DataFrame({"layer": ["conv1"]}))])
    ...     [path.name for path in written], sorted(p.name for p in (Path(tmp) / "run").iterdir())
    (['summary.csv'], ['summary.csv'])
    """
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShiftlabError(f"cannot create output folder {folder}: {exc.strerror}; choose another"
                            " --out") from exc
    if not os.access(folder, os.W_OK):
        raise ShiftlabError(f"output folder {folder} is not writable; choose another --out")
    clean_stale(folder)
    stage = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-new-", dir=folder))
    failure: Optional[Exception] = None
    try:
        written = write(stage)
        if draw is not None:
            try:
                written = written + draw(stage)
            except Exception as exc:  # noqa: BLE001  the numbers are kept; reported below
                failure = exc
                keep = {path.name for path in written}
                for item in stage.iterdir():  # no half-drawn set of figures
                    if item.name not in keep:
                        item.unlink()
        with signals_deferred():
            _swap_in(folder, stage, replaces)
    finally:
        with signals_deferred():  # a second Ctrl-C must not leave the staging folder behind
            shutil.rmtree(stage, ignore_errors=True)
            if created and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()  # a failed run leaves no new empty folder
    if failure is not None:
        names = ", ".join(path.name for path in written)
        reason = one_line(failure) if isinstance(failure, ShiftlabError) else \
            f"{type(failure).__name__}: {one_line(failure)}"
        raise DrawingFailed(f"drawing the figures failed ({reason}); the numbers are saved in"
                            f" {folder} ({names}){'; ' + redraw if redraw else ''}") from failure
    return [folder / path.name for path in written]


def _swap_in(folder: Path, stage: Path, replaces: Sequence[str] = OUTPUT_PATTERNS) -> None:
    """Move the previous outputs aside, the new ones in; on any failure restore the old set."""
    backup = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{os.getpid()}-old-", dir=folder))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for item in sorted(folder.iterdir()):
            if item.is_file() and any(fnmatch.fnmatchcase(item.name, p) for p in replaces):
                os.replace(item, backup / item.name)
                moved_old.append(item.name)
        for item in sorted(stage.iterdir()):
            os.replace(item, folder / item.name)
            moved_new.append(item.name)
    except BaseException as exc:
        for name in moved_new:
            (folder / name).unlink(missing_ok=True)
        for name in moved_old:
            os.replace(backup / name, folder / name)
        shutil.rmtree(backup, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ShiftlabError(f"cannot move the new outputs into {folder} ({one_line(exc)});"
                                " its previous outputs were put back; check the disk and"
                                " permissions, then run again") from exc
        raise
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, so the folder is consistent when they land
    (each is handled right after, as it would have been). Python runs signal handlers in the
    main thread only, so the handlers are swapped there (masking the signal would not do: the
    kernel hands a process's signal to any thread that does not mask it, torch's among them)."""
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or \
            any(signal.getsignal(signum) is None for signum in held):  # set outside Python
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, _: received.append(number))
                for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


#: the file that holds an output folder for one run from its start to its end (the pid inside)
LOCK_FILE = ".shiftlab-lock"


@contextlib.contextmanager
def claim(folder: Optional[Path]):
    """Hold ``folder`` for the whole run: a second shiftlab run into it is refused in one line
    until this one ends. A lock left by a killed process is taken over. ``None``: no claim."""
    if folder is None:
        yield
        return
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # check_out names what is wrong with the folder
        return
    lock = folder / LOCK_FILE
    _take(lock)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if _lock_pid(lock) == os.getpid():
                lock.unlink()
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # a run that wrote nothing leaves no new empty folder


def _take(lock: Path) -> None:
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(3):
        try:
            handle = os.open(lock, flags, 0o644)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise UsageError(f"--out {lock.parent} is in use by another shiftlab run (process"
                                 f" {pid}); wait for it to end, or choose another --out") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # left by a killed run (a symlink is removed, never followed)
            continue
        with os.fdopen(handle, "w") as out:
            out.write(str(os.getpid()))
        return
    raise UsageError(f"--out {lock.parent} is being claimed by another shiftlab run; choose"
                     " another --out")


def _lock_pid(lock: Path) -> Optional[int]:
    try:
        if lock.is_symlink():
            return None
        text = lock.read_text()[:32].strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def clean_stale(folder: Path) -> list[Path]:
    """Remove staging folders left by a killed run (``kill -9``); a killed swap's set-aside
    outputs are put back first where no newer file took their place.

    Only what a run of this user could have made is touched: a real folder (a symlink is never
    followed), owned by this user, and in it only regular files named like outputs."""
    removed = []
    uid = os.getuid() if hasattr(os, "getuid") else None
    for item in folder.glob(f"{_STAGING}*"):
        if item.is_symlink() or not item.is_dir():
            continue
        if uid is not None and item.lstat().st_uid != uid:
            continue
        pid = _pid_of(item.name)
        if pid is not None and _alive(pid):
            continue
        if pid is None and time.time() - item.stat().st_mtime < 3600:
            continue  # an old-style name: only once surely abandoned
        if "-old-" in item.name:
            for old in item.iterdir():
                if old.is_symlink() or not old.is_file() or not is_output(old.name):
                    continue
                if not os.path.lexists(folder / old.name):
                    os.replace(old, folder / old.name)
        shutil.rmtree(item, ignore_errors=True)
        removed.append(item)
    return removed


def _pid_of(name: str) -> Optional[int]:
    part = name[len(_STAGING):].split("-", 1)[0]
    return int(part) if part.isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the files of each command ------------------------------------------------------------
def write_table(path: Path, frame) -> Path:
    data = frame.to_csv(index=False).encode()
    return atomic_write(path, lambda handle: handle.write(data))


def save_figures(figures: Sequence[tuple[str, Callable]], folder: Path,
                 options: FigureOptions) -> list[Path]:
    """Draw each (stem, draw) figure, save it in every format, and close it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from ..figures.plots import save_figure

    written: list[Path] = []
    for name, draw in figures:
        figure = draw()
        try:
            written += save_figure(figure, folder / name, formats=options.formats, dpi=options.dpi)
        finally:
            plt.close(figure)
    return written


def _grid(result, figures: FigureOptions):
    from ..figures.plots import layer_grid

    return layer_grid(result, scale=figures.scale, vmax=figures.vmax, title=figures.title,
                      color_range=figures.color_range, view=figures.view)


def result_figures(result, folder: Path, figures: FigureOptions, suffix: str = "") -> list[Path]:
    """heatmap{suffix}.* and profile{suffix}.* of one result."""
    from ..figures.plots import layer_profile

    return save_figures([(f"heatmap{suffix}", lambda: _grid(result, figures)),
                         (f"profile{suffix}", lambda: layer_profile(result, scale=figures.scale,
                                                           title=figures.title,
                                                           view=figures.view))],
                        folder, figures)


def write_heatmap(result, folder: Path, figures: FigureOptions) -> list[Path]:
    """result.npz and summary.csv first (the numbers), then heatmap.* and profile.*."""
    def write(stage: Path) -> list[Path]:
        return [result.save(stage / "result.npz"),
                write_table(stage / "summary.csv", result.summary())]
    return write_set(folder, write, lambda stage: result_figures(result, stage, figures),
                     redraw=f"draw them with 'shiftlab plot {folder / 'result.npz'}'")


def write_padding_pair(results: Sequence, folder: Path, figures: FigureOptions) -> list[Path]:
    """``--padding both``: result-<padding>.npz, summary.csv with both columns, heatmap.* of
    each, and padding.* (the two profiles, the gap shaded as boundary effect)."""
    from ..figures.boundary import padding_profile

    def write(stage: Path) -> list[Path]:
        written = [r.save(stage / f"result-{r.settings.padding}.npz") for r in results]
        return written + [write_table(stage / "summary.csv", padding_table(results))]

    def draw(stage: Path) -> list[Path]:
        drawn = [(f"heatmap-{r.settings.padding}", lambda r=r: _grid(r, figures))
                 for r in results]
        drawn.append(("padding", lambda: padding_profile(results[0], results[1],
                                                         scale=figures.scale)))
        return save_figures(drawn, stage, figures)
    return write_set(folder, write, draw, redraw="draw each with 'shiftlab plot"
                     f" {folder / 'result-as-trained.npz'}' (and result-circular.npz)")


def padding_table(results: Sequence):
    """One row per layer: the as-trained and circular-padding means and their difference."""
    trained, circular = results
    table = trained.summary()[["layer", "depth", "module", "kind", "stride", "mean"]]
    table = table.rename(columns={"mean": "mean[as-trained]"})
    other = {row.layer: row.mean for row in circular.summary().itertuples()}
    table["mean[circular]"] = [other.get(name) for name in table["layer"]]
    table["boundary_effect"] = table["mean[as-trained]"] - table["mean[circular]"]
    return table


def write_comparison(comparison, folder: Path, save_results: bool, figures: FigureOptions,
                     difference: str) -> list[Path]:
    """result-<label>.npz (when measured here), summary.csv, grids.*, profile.*, difference.*."""
    def write(stage: Path) -> list[Path]:
        written: list[Path] = []
        if save_results:
            for label, result in zip(comparison.labels, comparison.results):
                written.append(result.save(stage / f"result-{safe_name(label)}.npz"))
        return written + [write_table(stage / "summary.csv", comparison.summary())]

    def draw(stage: Path) -> list[Path]:
        f = figures
        drawn = [("grids", lambda: comparison.plot_grids(
                      scale=f.scale, vmax=f.vmax, title=f.title, color_range=f.color_range,
                      view=f.view)),
                 ("profile", lambda: comparison.plot_profile(scale=f.scale, title=f.title,
                                                             view=f.view))]
        for index in range(1, len(comparison.results)):
            stem = "difference" if len(comparison.results) == 2 else f"difference-{index}"
            drawn.append((stem, lambda index=index: comparison.plot_difference(
                0, index, difference=difference, vmax=f.vmax, title=f.title, view=f.view)))
        return save_figures(drawn, stage, figures)
    redraw = ("draw them with 'shiftlab compare' on the saved result-*.npz files" if save_results
              else "")
    return write_set(folder, write, draw, redraw=redraw)


def is_dense_result(result) -> bool:
    """A dense model's consistency result (``DenseResult``), not a classifier's."""
    return getattr(result, "kind", None) == "dense"


def write_consistency(results: Sequence, table, folder: Path,
                      figures: FigureOptions) -> list[Path]:
    """invariance-<label>.npz (protocol-<label>.npz), consistency.csv (per model and shift),
    summary.csv, probability.*, and scatter.* (accuracy vs. consistency) for several models
    measured with labels."""

    from ..figures.plots import probability_plot

    if results and all(is_dense_result(r) for r in results):
        return write_dense_consistency(results, table, folder, figures)

    def write(stage: Path) -> list[Path]:
        gridded = [r for r in results if hasattr(r, "to_frame")]  # protocols have no grid
        written = [r.save(stage / f"{'invariance' if hasattr(r, 'to_frame') else 'protocol'}-"
                                  f"{safe_name(r.label)}.npz") for r in results]
        if gridded:
            written.append(write_table(stage / "consistency.csv", per_shift_table(gridded)))
        return written + [write_table(stage / "summary.csv", table)]

    def draw(stage: Path) -> list[Path]:
        from ..figures.tradeoff import accuracy_consistency_plot, diagonal_plot

        gridded = [r for r in results if hasattr(r, "to_frame")]
        drawn = [("probability", lambda: probability_plot(gridded))] if gridded else []
        diagonal = [r for r in results if hasattr(r, "mean_curve")]
        if diagonal:
            drawn.append(("diagonal", lambda: diagonal_plot(diagonal)))
        has_consistency = any(c in table and table[c].notna().all()
                              for c in ("pairwise_consistency", "consistency"))
        if len(results) > 1 and has_consistency and "accuracy" in table \
                and table["accuracy"].notna().sum() > 1:
            drawn.append(("scatter", lambda: accuracy_consistency_plot(table)))
        return save_figures(drawn, stage, figures)
    return write_set(folder, write, draw)


def per_shift_table(results: Sequence):
    """consistency.csv: every result's ``to_frame()`` (one row per shift), a model column first."""
    import pandas as pd

    frames = [r.to_frame().assign(model=r.label) for r in results]
    per_shift = pd.concat(frames, ignore_index=True)
    return per_shift[["model"] + [c for c in per_shift.columns if c != "model"]]


def write_dense_consistency(results: Sequence, table, folder: Path,
                            figures: FigureOptions) -> list[Path]:
    """dense-<label>.npz, consistency.csv (per model and shift), summary.csv, agreement.* (the
    per-pixel agreement map) and shift-size.* (agreement, and mIoU with masks, against |δ|)."""
    def write(stage: Path) -> list[Path]:
        written = [r.save(stage / f"dense-{safe_name(r.label)}.npz") for r in results]
        written.append(write_table(stage / "consistency.csv", per_shift_table(results)))
        return written + [write_table(stage / "summary.csv", table)]

    return write_set(folder, write, lambda stage: _draw_dense(results, stage, figures))


def dense_figures(path: Path, folder: Path, figures: FigureOptions) -> list[Path]:
    """``shiftlab plot`` of a saved dense consistency result: agreement.* and shift-size.*."""
    from ..invariance.dense_result import load_dense

    result = load_dense(path)
    return write_set(folder, lambda stage: _draw_dense([result], stage, figures),
                     replaces=("agreement.*", "shift-size.*"))


def _draw_dense(results: Sequence, stage: Path, figures: FigureOptions) -> list[Path]:
    """agreement.* (the per-pixel agreement map) and shift-size.* of ``results`` into ``stage``."""
    from ..figures.dense import agreement_by_shift_plot, agreement_map_plot

    return save_figures([("agreement", lambda: agreement_map_plot(results)),
                         ("shift-size", lambda: agreement_by_shift_plot(results))],
                        stage, figures)
