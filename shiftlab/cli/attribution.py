"""What ``shiftlab attribute`` does once its options are parsed: run each model's attribution,
write the folder (result npz, summary.csv, attribution.*) as one set, say what it found."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from .. import runs
from ..figures.options import FigureOptions
from ..requests import AttributionRequest
from .jobs import unique_label
from .reports import check_out, default_out, safe_name, save_figures, write_set, write_table

#: the attribution figure's stem (``shiftlab plot`` redraws it under the same name)
FIGURE = "attribution"


def run_attribute(requests: Sequence[AttributionRequest], figures: FigureOptions, *,
                  out: Optional[Path], overwrite: bool, quiet: bool, dry_run: bool) -> None:
    """Attribute every model of ``requests`` (baseline, antialiased, ...) and write the folder."""
    from ..equivariance.engine import resolve_device

    if out is not None and not dry_run:
        check_out(out, overwrite=overwrite)
    resolve_device(requests[0].device)  # a missing GPU is refused before anything is loaded
    if dry_run:
        for request in requests:
            _dry_run(request)
        return
    results, labels = [], []
    for request in requests:
        result = runs.measure_attribution(request, progress=None if not quiet else False,
                                          on_ready=_announce(quiet))
        label = unique_label(result.provenance.model or request.model.name, labels)
        labels.append(label)
        results.append(result.with_label(label))
    folder = out if out is not None else default_out(f"attribute-{results[0].label}")
    written = write_attribution(results, folder, figures)
    if not quiet:
        for result in results:
            _report(result)
        for path in written:
            click.echo(str(path))


def write_attribution(results: Sequence, folder: Path, figures: FigureOptions) -> list[Path]:
    """result.npz (one model) or attribution-<label>.npz (several), summary.csv, attribution.*."""
    import pandas as pd

    def write(stage: Path) -> list[Path]:
        if len(results) == 1:
            written = [results[0].save(stage / "result.npz")]
            table = results[0].summary()
        else:
            written = [r.save(stage / f"attribution-{safe_name(r.label)}.npz") for r in results]
            table = pd.concat([r.summary().assign(model=r.label) for r in results],
                              ignore_index=True)
            table = table[["model"] + [c for c in table.columns if c != "model"]]
        return written + [write_table(stage / "summary.csv", table)]

    return write_set(folder, write, lambda stage: _draw(results, stage, figures),
                     redraw="draw it with 'shiftlab plot' on the saved npz")


def attribution_figures(path: Path, folder: Path, figures: FigureOptions) -> list[Path]:
    """``shiftlab plot`` of a saved attribution: attribution.* into ``folder``."""
    from ..attribution.result import load_attribution

    result = load_attribution(path)
    return write_set(folder, lambda stage: _draw([result], stage, figures),
                     replaces=(f"{FIGURE}.*",))


def _draw(results: Sequence, stage: Path, figures: FigureOptions) -> list[Path]:
    """attribution.* of ``results`` (one row of bars each) into ``stage``."""
    from ..figures.attribution import attribution_chart

    return save_figures([(FIGURE, lambda: attribution_chart(list(results), title=figures.title))],
                        stage, figures)


def _report(result) -> None:
    """Where the output's change comes from: the largest shares, and what is left over."""
    summary = result.summary()
    layers = summary.iloc[:-1]
    top = layers.reindex(layers["mean_share"].abs().sort_values(ascending=False).index).head(3)
    named = ", ".join(f"{row.layer} ({row.module}, s={row.stride:g}) {row.mean_share:+.3f}"
                      for row in top.itertuples() if row.mean_share == row.mean_share)
    rest = summary.iloc[-1]["mean_share"]
    click.echo(f"{result.label}: largest shares of L F: {named or 'none (L F = 0)'};"
               f" remainder (non-module ops) {rest:+.3f}", err=True)


def _dry_run(request: AttributionRequest) -> None:
    """Calibrate on the first images and print what the attribution would cost."""
    from ..attribution.estimate import estimate_attribution

    loaded = runs.load_spec(request.model)
    inputs = runs.load_inputs(loaded, request.inputs)
    estimate = estimate_attribution(loaded.model, inputs.tensor, axis=request.axis,
                                    layers=request.selection, batch_size=request.batch_size,
                                    device=request.device, dtype=request.dtype)
    click.echo(f"{loaded.name}: {len(inputs.paths)} images at {request.inputs.size} px:"
               f" {estimate.describe()}")


def _announce(quiet: bool) -> runs.OnReady:
    def say(loaded, inputs, grid, request) -> None:
        if not quiet:
            click.echo(f"{loaded.name} ({loaded.weights}): {len(inputs.paths)} images at"
                       f" {request.inputs.size} px, axis {request.axis}, {request.output}",
                       err=True)
    return say

