"""What each CLI command does once its options are parsed: pipeline calls, files, messages.

Kept apart from ``cli.py`` (the click definitions) so the commands stay short; nothing here
parses options or measures by itself: ``shiftlab.runs`` measures, ``shiftlab.cli.reports`` writes.
"""
from __future__ import annotations

import dataclasses
import warnings
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path
from typing import Optional, Sequence

import click

from .. import runs
from .console import warn_line
from ..defaults import PADDINGS
from ..errors import UsageError
from ..figures.options import FigureOptions
from ..requests import CompareRequest, ConsistencyRequest, HeatmapRequest
from ..results.progress import check_progress_path
from .reports import (FIGURE_PATTERNS, PROGRESS_FILE, DrawingFailed, check_out, default_out,
                      is_dense_result, is_output, result_figures, safe_name, write_comparison,
                      write_consistency, write_heatmap, write_padding_pair, write_set)

#: the most cells one panel of a layer grid may hold (the map of a 2-D grid, or a strip's
#: length): every square or symmetric grid within ``shifts.MAX_SHIFTS`` fits, while the map of an
#: irregular grid (one row and column per distinct dh and dw) is refused before it is drawn
MAX_PANEL_CELLS = 128 * 128


def _announce(quiet: bool) -> runs.OnReady:
    def say(loaded, inputs, grid, request) -> None:
        if quiet:
            return
        if grid is None:  # a protocol: images are streamed, counted as they come
            click.echo(f"{loaded.name} ({loaded.weights}): --protocol {request.protocol},"
                       f" {request.inputs.size} px windows of {request.crop} px centre crops,"
                       " images streamed", err=True)
            return
        if inputs is None:  # a dense model's image/mask pairs, streamed
            click.echo(f"{loaded.name} ({loaded.weights}): segmentation output, image/mask pairs"
                       f" of {request.labels} at {request.inputs.size} px, {len(grid)} shifts"
                       f" ({grid.kind}, {request.shifts.mode})", err=True)
            return
        comparison = getattr(request, "comparison", None)  # consistency compares no layers
        align, metric = (comparison.align, comparison.metric) if comparison else ("-", "-")
        click.echo(f"{loaded.name} ({loaded.weights}): {len(inputs.paths)} images at"
                   f" {request.inputs.size} px, {len(grid)} shifts ({grid.kind},"
                   f" {request.shifts.mode}, {align}, {metric})", err=True)
    return say


# -- heatmap -------------------------------------------------------------------------------
def run_heatmap(request: HeatmapRequest, figures: FigureOptions, *,
                padding_both: bool, out: Optional[Path], overwrite: bool, quiet: bool,
                resume: bool, dry_run: bool, distributed_run: bool) -> None:
    """Measure ``request`` (with ``padding_both``, as trained and with circular padding) and
    write the run's folder."""
    from .. import distributed
    from ..equivariance.engine import resolve_device

    if resume and distributed_run:
        raise UsageError("--resume is not available under torchrun (progress is kept by single"
                         " processes only); run the interrupted measurement again without it")
    if out is not None:
        check_out(out, overwrite=overwrite, resume=resume)
    resolve_device(request.device)  # a missing GPU is refused before anything is loaded
    if dry_run:
        _dry_run(request, figures, quiet, grids=2 if padding_both else 1)
        return
    if resume and padding_both:
        raise UsageError("--resume continues one measurement; it does not combine with --padding both")
    requests = [request.for_model(dataclasses.replace(request.model, padding=padding))
                for padding in PADDINGS] if padding_both else [request]
    checkpoint = out / PROGRESS_FILE if (out is not None and not distributed_run) else None
    if checkpoint is not None and len(requests) == 1:
        check_progress_path(checkpoint)  # before the model and images are loaded
    results = []
    for each in requests:
        results.append(runs.measure_heatmap(
            each, checkpoint=checkpoint if len(requests) == 1 else None, resume=resume,
            keep_checkpoint=True, progress=None if not quiet else False,
            on_ready=_announce(quiet)))
    if not distributed.is_main():
        return
    folder = out if out is not None else default_out(results[0].provenance.model)
    try:
        if len(results) == 1:
            written = write_heatmap(results[0], folder, figures)
        else:
            written = write_padding_pair(results, folder, figures)
    except DrawingFailed:
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # the numbers are in place: nothing to resume
        raise
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # only now: every output is in place
    for result in results:
        warn_nonfinite(result, result.settings.padding if len(results) > 1 else "")
        warn_undefined(result)
    if not padding_both and request.model.padding == "as-trained" and \
            request.shifts.mode == "circular" and results[0].provenance.extra.get("zero_padded"):
        warn_line("this model pads with zeros: under circular shifts the wrap seam meets the zero"
                  " border, which adds a boundary effect to every layer; to isolate aliasing use"
                  " --padding circular (or both), or --mode crop --border B")
    if not quiet:
        report(results[-1])
        for path in written:
            click.echo(str(path))


def _dry_run(request: HeatmapRequest, figures: FigureOptions, quiet: bool, grids: int = 1) -> None:
    """Calibrate on a few shifts of the first image batch and print what the run (and its
    figures) would cost."""
    from ..equivariance.capture import select_modules
    from ..equivariance.engine import resolve_device
    from ..equivariance.estimate import estimate_run

    grid, margin = runs.shift_plan(request.shifts, request.inputs)
    loaded = runs.load_spec(request.model)
    inputs = runs.load_inputs(loaded, request.inputs, margin=margin)
    if not quiet:  # a big model on a CPU calibrates for minutes: say what is happening
        click.echo(f"calibrating {loaded.name} on a few batched passes of the first images"
                   f" (batch size {request.batch_size})...", err=True)
    comparison = request.comparison
    estimate = estimate_run(
        loaded.model, inputs.tensor, grid, batch_size=request.batch_size,
        mode=request.shifts.mode, align=comparison.align, metric=comparison.metric,
        layers=comparison.selection, margin=margin,
        border=comparison.border, device=resolve_device(request.device),
        dtype=request.autocast, progress=False)
    click.echo(f"{loaded.name}: {len(inputs.paths)} images x {len(grid)} shifts at"
               f" {request.inputs.size} px: {estimate.describe()}")
    panels = len(select_modules(loaded.model, comparison.selection))
    click.echo(f"figures: {grids} x {figures.cost(panels)} (drawn after the measurement, one at"
               " a time)")


def report(result) -> None:
    summary = result.summary()
    spatial = summary[(summary["kind"] == "spatial") & summary["mean"].notna()]
    if len(spatial):
        means = spatial["mean"]
        # PSNR: higher is more equivariant, so the least equivariant layer has the lowest value
        worst = spatial.loc[means.idxmin() if result.settings.metric == "psnr" else means.idxmax()]
        click.echo(f"least equivariant spatial layer: {worst['layer']} (stride"
                   f" {worst['stride']:g}, mean {result.settings.metric} {worst['mean']:.4g})",
                   err=True)
    click.echo(f"measured in {result.provenance.seconds:.1f} s", err=True)


def warn_nonfinite(result, label: str = "") -> None:
    """One warning line naming every layer with NaN/Inf features (up to 5) and how many values."""
    bad = result.nonfinite_layers()
    if not bad:
        return
    total = {info.name: (int(nan.sum()), int(nan.sum() + n.sum() + inf.sum()))
             for info, nan, n, inf in zip(result.layers, result.n_nan, result.n, result.n_inf)}
    listed = ", ".join(f"{name} ({total[name][0]} of {total[name][1]} image-shifts)" for name in bad[:5])
    more = f" and {len(bad) - 5} more (Result.n_nan)" if len(bad) > 5 else ""
    layers = "layer" if len(bad) == 1 else "layers"
    warn_line(f"{label + ': ' if label else ''}non-finite values (NaN/Inf) in {len(bad)} {layers},"
              f" left out of the means: {listed}{more}")


def warn_undefined(result) -> None:
    """Layers without a measured shift (named, once); crop mode with a border that leaves no
    compared region in any spatial layer."""
    undefined = result.undefined_layers()
    if undefined:
        shown = ", ".join(undefined[:4]) + (f" and {len(undefined) - 4} more" if len(undefined) > 4 else "")
        warn_line(f"undefined (no shift of the grid but (0, 0) is defined at their stride under"
                  f" --align {result.settings.align}; NaN in summary.csv, not 0): {shown}")
    spatial = [i for i, info in enumerate(result.layers) if info.is_spatial]
    if result.settings.mode == "crop" and spatial and \
            all(result.n[i].sum() + result.n_inf[i].sum() == 0 for i in spatial):
        warn_line(f"--border {result.settings.border} leaves no valid region in any spatial layer:"
                  " every spatial value is undefined; use a smaller --border or a larger --size")


# -- plot ----------------------------------------------------------------------------------
def check_drawable(result, path="the result") -> None:
    """Refuse a result whose layer-grid panels would hold more than ``MAX_PANEL_CELLS`` cells
    (one line naming the limit), before any figure is allocated."""
    grid = result.grid
    strip = grid.kind == "diagonal" or (len(grid) > 1 and all(dh == dw for dh, dw in grid.shifts))
    rows, cols = (1, len(grid)) if strip else grid.map_shape
    if rows * cols > MAX_PANEL_CELLS:
        raise UsageError(f"{path}: its grid of {len(grid):,} shifts makes panels of {rows:,} x"
                         f" {cols:,} cells, above the drawing limit of {MAX_PANEL_CELLS:,} cells"
                         " per panel; read its numbers with shiftlab.load() instead")


def run_plot(result_file: Path, layers, figures: FigureOptions, *,
             out: Optional[Path], replace: bool = False) -> list[Path]:
    """Re-draw heatmap.* and profile.* of a saved result; returns the written paths.

    Into the result's own folder only its figures are replaced (the numbers stay); another
    folder that holds results is refused, so figures never sit next to another run's numbers.
    A layer selection is drawn as heatmap-selected.* and profile-selected.*, beside the full
    figures, unless ``replace``.
    """
    from ..results.result import load, select_layers

    from .attribution import attribution_figures
    from .reports import dense_figures

    # files drawn whole, by the kind their header names (read once)
    whole = {"shiftlab.attribution": ("an attribution file", attribution_figures),
             "shiftlab.dense": ("a dense consistency file", dense_figures)}
    kind = _kind(result_file)
    if kind in whole:
        what, draw = whole[kind]
        if layers or replace:
            raise UsageError(f"--layers and --replace draw layer grids; {what} is drawn whole")
        return draw(result_file, out if out is not None else result_file.parent, figures)
    result = load(result_file)
    check_drawable(result, result_file)
    if layers:
        result = select_layers(result, layers)
    folder = out if out is not None else result_file.parent
    if folder.resolve() != result_file.parent.resolve() and folder.is_dir():
        found = sorted(p.name for p in folder.iterdir()
                       if is_output(p.name) and not any(fnmatch(p.name, f) for f in FIGURE_PATTERNS))
        if found:
            raise UsageError(f"--out {folder} holds another run's results ({', '.join(found[:4])});"
                             " its figures would not match them: choose a fresh --out, or the"
                             " result's own folder")
    suffix = "-selected" if layers and not replace else ""
    return write_set(folder, lambda stage: result_figures(result, stage, figures, suffix),
                     replaces=tuple(f"{stem}{suffix}.*" for stem in ("heatmap", "profile"))
                     if suffix else FIGURE_PATTERNS)


def _kind(path: Path) -> Optional[str]:
    """The ``kind`` a saved file's header names (None: a heatmap result, or unreadable, which
    ``load`` then reports in its own words)."""
    from ..errors import ShiftlabError
    from ..results.files import read_archive

    try:
        header, _ = read_archive(path, ())
    except ShiftlabError:
        return None
    return header.get("kind")


# -- compare -------------------------------------------------------------------------------
def run_compare(result_files: list, request: Optional[CompareRequest], figures: FigureOptions,
                difference: str, *, out: Optional[Path],
                overwrite: bool, quiet: bool) -> None:
    """Compare saved ``result_files``, or measure every model of ``request``, and write the
    comparison's folder."""
    from ..results.comparison import Comparison
    from ..results.result import load
    from ..equivariance.engine import resolve_device

    if out is not None:
        check_out(out, overwrite=overwrite)
    if result_files:
        results = [load(path) for path in result_files]
        for path, result in zip(result_files, results):
            check_drawable(result, path)
    else:
        resolve_device(request.heatmaps[0].device)
        results, labels = [], []
        for heatmap in request.heatmaps:
            result = runs.measure_heatmap(heatmap, progress=None if not quiet else False,
                                          on_ready=_announce(quiet))
            label = unique_label(result.provenance.model, labels)
            labels.append(label)
            results.append(result.with_label(label))
    comparison = Comparison(results)
    folder = out if out is not None else default_out("compare")
    written = write_comparison(comparison, folder, not result_files, figures, difference)
    for result, label in zip(comparison.results, comparison.labels):
        warn_nonfinite(result, label)
    alone = {label: names for label, names in comparison.unmatched.items() if names}
    if alone:
        click.echo("layers without a partner (a row of their own): " + "; ".join(
            f"{label}: {', '.join(names)}" for label, names in alone.items()), err=True)
    if not quiet:
        table = comparison.summary()
        columns = [c for c in table.columns if c.startswith(("layer[", "mean["))]
        click.echo(table[columns].to_string(index=False, float_format="%.4g"), err=True)
    for path in written:
        click.echo(str(path))


def unique_label(name: str, taken: Sequence[str]) -> str:
    label, count = name, 1
    while label in taken:
        count += 1
        label = f"{name}#{count}"
    return label


# -- consistency ---------------------------------------------------------------------------
def run_consistency(requests: Sequence[ConsistencyRequest], figures: FigureOptions, *,
                    out: Optional[Path], overwrite: bool, quiet: bool,
                    resume: bool = False) -> None:
    """Measure every request (one per model) and write one table.

    Under torchrun every rank measures its share and gets every result; rank 0 writes. With
    ``out``, the protocols keep a per-epoch checkpoint per model there until the outputs are
    written, and ``resume`` continues from them (finished models are not run again).
    """
    from .. import distributed
    from ..equivariance.engine import resolve_device

    checkpoints = [_protocol_checkpoint(out, request) for request in requests]
    if out is not None:
        check_out(out, overwrite=overwrite, resume=resume,
                  progress=[c.name for c in checkpoints if c is not None])
    for checkpoint in checkpoints:
        if checkpoint is not None:
            check_progress_path(checkpoint)  # before any model is loaded
    resolve_device(requests[0].device)
    quiet = quiet or not distributed.is_main()
    results, labels = [], []
    for request, checkpoint in zip(requests, checkpoints):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = runs.measure_consistency(
                request, progress=None if not quiet else False, on_ready=_announce(quiet),
                checkpoint=checkpoint, resume=resume)
        if results and is_dense_result(result) != is_dense_result(results[0]):
            raise UsageError(f"{result.label} and {results[0].label} differ in kind (one returns"
                             " a map, one a class per image); measure them in separate runs")
        label = unique_label(result.label, labels)
        labels.append(label)
        # every rank's warnings (skipped files are seen by the rank that decodes them), once
        messages = dict.fromkeys(m for part in distributed.gather([str(i.message) for i in caught])
                                 for m in part)
        for message in messages if distributed.is_main() else ():
            warn_line(f"{label}: {message}" if label not in message else message)
        results.append(result.with_label(label))
    failure = None
    if distributed.is_main():
        try:
            _write_consistency(results, folder=out if out is not None else default_out("consistency"),
                               checkpoints=checkpoints, figures=figures, quiet=quiet)
        except Exception as exc:  # noqa: BLE001  told to the other ranks, then raised here
            failure = exc
    distributed.broadcast_checked(None, failure)  # no rank waits in finish() for a lost one


def _write_consistency(results: list, *, folder: Path, checkpoints: list,
                       figures: FigureOptions, quiet: bool) -> None:
    from .consistency_table import consistency_table, format_consistency

    _warn_uninformative(results)
    table = consistency_table(results)
    try:
        written = write_consistency(results, table, folder, figures)
    except DrawingFailed:
        _remove(checkpoints)  # the numbers are in place: nothing to resume
        raise
    _remove(checkpoints)  # only now: every output is in place
    click.echo(format_consistency(table))
    if not quiet:
        for path in written:
            click.echo(str(path), err=True)


def _remove(checkpoints: list) -> None:
    for checkpoint in checkpoints:
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)


def _protocol_checkpoint(out: Optional[Path], request: ConsistencyRequest) -> Optional[Path]:
    """Where a protocol run of one model keeps its per-epoch progress (None: grid, or no --out)."""
    if out is None or request.protocol == "grid":
        return None
    model = request.model
    name = safe_name(model.name if model.antialias is None else f"{model.name}+aa{model.antialias}")
    return out / PROGRESS_FILE.replace(".npz", f"-{name}.npz")


def _warn_uninformative(results: list) -> None:
    from ..invariance.grid_result import uninformative_across

    if any(is_dense_result(result) for result in results):
        return  # each dense result warned for itself when it was measured
    message = uninformative_across(results) if len(results) > 1 else None
    if message:
        warn_line(message)
