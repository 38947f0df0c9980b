"""Command line: parse, call the API, write files, report. No measurement logic lives here.

Every ShiftlabError becomes one line on stderr and its exit code (2 usage, 1 runtime); Ctrl-C
exits 130; nothing is ever half-written (outputs go to a temp file, then are renamed).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import click

from . import __version__
from .errors import ShiftlabError, UsageError

DEFAULT_SIZE = 112
DEFAULT_MAX_SHIFT = 8
FORMATS = ("png", "pdf", "svg")


# -- error handling ----------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn every failure into one line and an exit code; a traceback only with SHIFTLAB_DEBUG."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        try:
            yield
        except ShiftlabError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was changed by this run (outputs are moved into"
                       " place only when all are written)", err=True)
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as exc:  # noqa: BLE001
            if not _is_out_of_memory(exc):
                _unexpected(exc)
            click.echo("error: out of memory; lower --batch-size or --size", err=True)
            sys.exit(1)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _unexpected(exc: BaseException) -> None:
    if os.environ.get("SHIFTLAB_DEBUG"):
        raise exc
    click.echo(f"error: {type(exc).__name__}: {_one_line(exc)} (set SHIFTLAB_DEBUG=1 for a"
               " traceback and please report it)", err=True)
    sys.exit(1)


@contextmanager
def _staged(folder: Path) -> Iterator[Path]:
    """A hidden folder inside ``folder`` for this run's outputs; they are moved into ``folder``
    only once every one is written, so an interrupted run changes nothing."""
    import shutil
    import tempfile

    _check_writable(folder)
    staging = Path(tempfile.mkdtemp(prefix=".shiftlab-", dir=folder))
    try:
        yield staging
        for item in sorted(staging.iterdir()):
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    click.echo(f"warning: {_one_line(message)}", err=True)


# -- shared options ----------------------------------------------------------------------
def _model_options(func):
    func = click.option("--model", "-m", "model_spec", required=True, metavar="MODEL",
                        help="torchvision name (vgg16, resnet50, ...), path/to/file.py:factory,"
                             " package.module:factory, or timm:NAME.")(func)
    func = click.option("--weights", "-w", default="auto", show_default=True, metavar="WEIGHTS",
                        help="auto (pretrained if cached or downloadable, else random init with a"
                             " warning), none, a torchvision weights name (DEFAULT, IMAGENET1K_V1,"
                             " ...), or a checkpoint file (.pth/.pt).")(func)
    func = click.option("--trust-checkpoint", is_flag=True,
                        help="Allow full unpickling of the checkpoint (runs code inside it). Only"
                             " for files you trust; by default torch.load(weights_only=True).")(func)
    func = click.option("--seed", default=0, show_default=True, type=int,
                        help="Seed for random-init weights, so figures are reproducible.")(func)
    func = click.option("--num-classes", type=click.IntRange(1), default=None,
                        help="Classifier size, for checkpoints trained on other classes"
                             " (default: the model's own).")(func)
    return func


def _measure_options(func):
    return _apply_options(func, _measure_option_list())


def _shift_options(func):
    """The image and shift options of ``_measure_options``, without the per-layer ones."""
    per_layer = ("--align", "--metric", "--layers", "--border")
    return _apply_options(func, [(flag, option) for flag, option in _measure_option_list()
                                 if flag not in per_layer])


def _apply_options(func, options):
    for _, option in reversed(options):
        func = option(func)
    return func


def _measure_option_list() -> list:
    """(first flag, click option decorator) for every image, shift and measurement option."""
    options = [
        click.option("--images", "-i", "image_sources", multiple=True, metavar="PATH",
                     help="Image folder or files (PNG/JPEG); repeatable. Default: the sample"
                          " photographs shipped with shiftlab."),
        click.option("--max-images", type=click.IntRange(1), default=None,
                     help="Use at most this many images (first in sorted order)."),
        click.option("--size", type=click.IntRange(8), default=DEFAULT_SIZE, show_default=True,
                     help="Input size: images are resized (shorter side to size/0.875) and"
                          " centre-cropped to size x size."),
        click.option("--resize", type=click.IntRange(8), default=None,
                     help="Shorter side before cropping. Default: round(size / 0.875)."),
        click.option("--max-shift", "-k", type=click.IntRange(1), default=DEFAULT_MAX_SHIFT,
                     show_default=True,
                     help="Grid extent K: shifts 0..K-1 per axis (square, K x K), -K..K"
                          " (symmetric) or (t, t) for t in 0..K-1 (diagonal)."),
        click.option("--grid", type=click.Choice(["square", "symmetric", "diagonal"]),
                     default="square", show_default=True, help="Shape of the shift grid."),
        click.option("--subpixel", type=click.IntRange(1), default=1, show_default=True,
                     help="Steps of 1/P pixel (band-limited FFT shifts), e.g. 2 for 0.5 px."),
        click.option("--mode", type=click.Choice(["circular", "crop"]), default="circular",
                     show_default=True,
                     help="circular: torch.roll (the paper's per-layer protocol); crop: shifted"
                          " windows of a larger image, no wrap-around."),
        click.option("--align", type=click.Choice(["bilinear", "exact", "fourier"]),
                     default="bilinear", show_default=True,
                     help="How feature maps of stride s are aligned with an input shift:"
                          " bilinear upsampling (paper), exact (only where s divides the shift;"
                          " masked elsewhere) or fourier (fractional shift)."),
        click.option("--metric", type=click.Choice(["cosine", "l2", "psnr"]), default="cosine",
                     show_default=True, help="Distance: cosine (paper), relative l2, psnr (dB)."),
        click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB",
                     help="Only layers whose module name matches (repeatable), e.g. 'features.*'."
                          " Default: every leaf module."),
        click.option("--border", type=click.IntRange(0), default=0, show_default=True,
                     help="crop mode: input pixels ignored at each edge of the compared region."),
        click.option("--batch-size", "-b", type=click.IntRange(1), default=16, show_default=True,
                     help="Inputs per forward pass (images x shifts)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA if available), cpu, cuda or cuda:N."),
    ]
    return [(_first_flag(option), option) for option in options]


def _first_flag(decorator) -> str:
    """The first flag of a ``click.option(...)`` decorator, read by applying it to a dummy."""
    return decorator(lambda: None).__click_params__[0].opts[0]


def _variant_options(func):
    """--antialias, --weights and --trust-checkpoint of the multi-model commands."""
    func = click.option("--trust-checkpoint", is_flag=True,
                        help="Allow full unpickling of checkpoints (only for files you trust).")(func)
    func = click.option("--weights", "-w", default="auto", show_default=True, metavar="WEIGHTS",
                        help="Weights for models whose spec has no @WEIGHTS (see 'heatmap --help').")(func)
    func = click.option("--antialias", "filt_size", type=click.IntRange(1, 7), default=None,
                        help="Also measure the BlurPool version of each --model with this filter"
                             " size (weights copied from the baseline).")(func)
    return func


def _figure_options(func):
    func = click.option("--scale", "--metric-scale", "scale", type=click.Choice(["linear", "log"]),
                        default="linear", show_default=True, help="Colour scale of the heatmaps.")(func)
    func = click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS),
                        default=("png", "pdf"), show_default=True,
                        help="Figure formats to write (repeatable).")(func)
    func = click.option("--dpi", type=click.IntRange(30, 1200), default=150, show_default=True,
                        help="Resolution of PNG figures.")(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="shiftlab")
def main() -> None:
    """See where shift-equivariance is lost inside a convolutional network.

    \b
    shiftlab heatmap --model vgg16            layer-by-layer heatmaps on the sample images
    shiftlab layers --model resnet50          the layers, their stride and output shape
    shiftlab plot runs/x/result.npz           re-draw figures without recomputing
    shiftlab compare --model vgg16 --antialias 4   baseline vs. antialiased (BlurPool)
    shiftlab consistency --model resnet18 --antialias 4   output-level consistency, flips, MAC
    """


# -- heatmap -----------------------------------------------------------------------------
@main.command()
@_model_options
@_measure_options
@_figure_options
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: runs/<model>-<timestamp>/.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out from its last completed image batch"
                   " (progress is checkpointed there after every batch).")
@click.option("--dry-run", is_flag=True,
              help="Print the number of forward passes and an estimate of time and memory from a"
                   " short calibration, then exit.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True,
              help="Autocast dtype of the forward passes (float16 needs a GPU); distances are"
                   " always computed in float32 and accumulated in float64.")
def heatmap(model_spec: str, weights: str, trust_checkpoint: bool, seed: int, num_classes: Optional[int],
            out: Optional[str], quiet: bool, resume: bool, dry_run: bool, dtype: str, scale: str,
            formats: Sequence[str], dpi: int, **measure_args) -> None:
    """Measure every layer's equivariance over a grid of shifts and draw the layer grid.

    Writes result.npz, heatmap.{png,pdf}, profile.{png,pdf} and summary.csv into --out. The
    default (size 112, 8 x 8 circular shifts, 6 sample images) takes under a minute for vgg16
    on a 2-core CPU; --device auto uses a GPU when there is one.
    """
    with _user_errors():
        from . import distributed

        if resume and not out:
            raise UsageError("--resume needs the --out folder of the interrupted run")
        if out:
            _check_out_path(Path(out))
        running_distributed = distributed.init_from_env()
        main_rank = distributed.is_main()
        quiet = quiet or not main_rank  # under torchrun only rank 0 talks and writes
        if dry_run:
            _dry_run(model_spec, weights, trust_checkpoint, seed, num_classes, dtype, quiet,
                     **measure_args)
            return
        checkpoint = None
        if out and not running_distributed:  # created with the first completed image batch
            checkpoint = Path(out) / ".shiftlab-progress.npz"
        try:
            result, loaded = _run_measurement(model_spec, weights, trust_checkpoint, seed, quiet,
                                              num_classes=num_classes, dtype=dtype,
                                              checkpoint=checkpoint, resume=resume, **measure_args)
            if main_rank:
                folder = Path(out) if out else _default_out(loaded.name)
                written = _write_outputs(result, folder, scale, formats, dpi)
                _warn_nonfinite(result)  # a warning, so --quiet does not hide it
                if not quiet:
                    _report(result, written)
            distributed.finish()  # every rank waits for rank 0's files, then leaves together
        finally:
            distributed.shutdown()


def _dry_run(model_spec: str, weights: str, trust_checkpoint: bool, seed: int,
             num_classes: Optional[int], dtype: str, quiet: bool, **options) -> None:
    """Calibrate on a few shifts of the first image batch and print what the run would cost."""
    from .engine import resolve_device
    from .estimate import estimate_run

    loaded = _load(model_spec, weights, trust_checkpoint, seed, num_classes=num_classes)
    shift_grid, margin = _grid_and_margin(options)
    images = _images_for(loaded, options, margin)
    if not quiet:  # a big model on a CPU calibrates for minutes: say what is happening
        click.echo(f"calibrating {loaded.name} on a few batched passes of the first images"
                   f" (batch size {options['batch_size']})...", err=True)
    estimate = estimate_run(
        loaded.model, images.tensor, shift_grid, batch_size=options["batch_size"],
        mode=options["mode"], align=options["align"], metric=options["metric"],
        layers=list(options["layer_patterns"]) or None, margin=margin, border=options["border"],
        device=resolve_device(options["device"]), dtype=None if dtype == "float32" else dtype,
        progress=False)
    click.echo(f"{loaded.name}: {len(images.paths)} images x {len(shift_grid)} shifts at"
               f" {options['size']} px: {estimate.describe()}")


def _run_measurement(model_spec: str, weights: str, trust_checkpoint: bool, seed: int, quiet: bool,
                     num_classes: Optional[int] = None, **options):
    """Load one model (a ``NAME[+aaK][@WEIGHTS]`` spec), its images, and measure it."""
    shift_grid, margin = _grid_and_margin(options)  # cheap checks first (device, crop margin)
    loaded = _load(model_spec, weights, trust_checkpoint, seed, num_classes=num_classes)
    images = _images_for(loaded, options, margin)
    return _measure(loaded, images, shift_grid, margin, quiet, **options), loaded


def _load(model_spec: str, weights: str, trust_checkpoint: bool, seed: int,
          filt_size: Optional[int] = None, num_classes: Optional[int] = None):
    import torch

    from .variants import load_variant

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # random-init weights are the same in every run
        return load_variant(model_spec, weights, filt_size=filt_size,
                            trust_checkpoint=trust_checkpoint, num_classes=num_classes)


def _grid_and_margin(options: dict):
    """The shift grid and crop margin; also fails fast on a device that is not there."""
    from .engine import resolve_device

    resolve_device(options["device"])
    grid = _make_grid(options["grid"], options["max_shift"], options["subpixel"])
    if options["mode"] != "crop":
        if grid.max_abs >= options["size"]:  # a circular shift by the image size is no shift
            raise UsageError(
                f"--max-shift {options['max_shift']} gives shifts up to {grid.max_abs:g} px, but"
                f" circular shifts of a {options['size']} px image repeat every {options['size']} px;"
                f" use a --max-shift below {options['size']} (or --size above {grid.max_abs:g})")
        return grid, 0
    margin = int(math.ceil(grid.max_abs))
    size, resize = options["size"], options["resize"]
    available = ((resize or round(size / 0.875)) - size) // 2
    if margin > available:
        raise UsageError(
            f"--max-shift {options['max_shift']} needs a crop margin of {margin} px but resizing to"
            f" {resize or round(size / 0.875)} leaves {available} px around the {size} px window;"
            f" use --resize {size + 2 * margin} or a smaller --max-shift")
    return grid, margin


def _images_for(loaded, options: dict, margin: int):
    from .data import load_images, sample_image_paths

    size, resize = options["size"], options["resize"]
    if loaded.min_size and size < loaded.min_size:
        raise UsageError(f"{loaded.name} needs inputs of at least {loaded.min_size} px; use --size"
                         f" {loaded.min_size} or more")
    paths = _expand_sources(list(options["image_sources"]) or sample_image_paths())
    if options["max_images"]:
        paths = paths[:options["max_images"]]
    images = load_images(paths, size, margin=margin, mean=loaded.mean, std=loaded.std,
                         resize=resize or max(round(size / 0.875), size + 2 * margin))
    for path, reason in images.skipped:
        click.echo(f"warning: skipped {path}: {reason}", err=True)
    return images


def _measure(loaded, images, shift_grid, margin: int, quiet: bool, mode: str, align: str, metric: str,
             layer_patterns: Sequence[str], border: int, batch_size: int, device: str,
             label: Optional[str] = None, dtype: str = "float32", checkpoint=None,
             resume: bool = False, **_):
    from .engine import measure

    if not quiet:
        click.echo(f"{loaded.name} ({loaded.weights}): {len(images.paths)} images at"
                   f" {images.tensor.shape[-1] - 2 * margin} px, {len(shift_grid)} shifts ({shift_grid.kind},"
                   f" {mode}, {align}, {metric})", err=True)
    meta = {"model": loaded.name, "weights": loaded.weights, "pretrained": loaded.pretrained,
            "images": [p.name for p in images.paths], "label": label or loaded.name}
    return measure(loaded.model, images.tensor, shift_grid, mode=mode, align=align, metric=metric,
                   layers=list(layer_patterns) or None, margin=margin, border=border,
                   batch_size=batch_size, device=device, progress=None if not quiet else False,
                   meta=meta, dtype=None if dtype == "float32" else dtype, checkpoint=checkpoint,
                   resume=resume)


def _expand_sources(sources: Sequence) -> list[Path]:
    from .data import find_images

    paths: list[Path] = []
    for source in sources:
        paths += find_images(source)
    return paths


def _make_grid(kind: str, k: int, subpixel: int):
    from .shifts import ShiftGrid

    if kind == "square":
        return ShiftGrid.square(k, subpixel)
    if kind == "symmetric":
        return ShiftGrid.symmetric(k, subpixel)
    return ShiftGrid.diagonal(k * subpixel, subpixel=subpixel)


def _safe_name(text: str) -> str:
    """A model name or label as a file-name part: letters, digits, '-', '_', '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _default_out(model_name: str) -> Path:
    """runs/<model>-<timestamp>, with -2, -3, ... when a run in the same second took it."""
    base = Path("runs") / f"{_safe_name(model_name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, index = base, 2
    while candidate.exists():
        candidate, index = Path(f"{base}-{index}"), index + 1
    return candidate


def _write_outputs(result, folder: Path, scale: str, formats: Sequence[str], dpi: int) -> list[Path]:
    """result.npz, summary.csv, heatmap.*, profile.* — each written to a temp file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    from .files import atomic_write

    with _staged(folder) as stage:
        written = [result.save(stage / "result.npz")]
        summary = result.summary().to_csv(index=False).encode()
        written.append(atomic_write(stage / "summary.csv", lambda handle: handle.write(summary)))
        written += _result_figures(result, stage, scale, formats, dpi)
    return [folder / path.name for path in written]


def _result_figures(result, folder: Path, scale: str, formats: Sequence[str], dpi: int) -> list[Path]:
    """heatmap.* and profile.* of one result, written into ``folder``."""
    from .plots import layer_grid, layer_profile

    return _save_figures([("heatmap", lambda: layer_grid(result, scale=scale)),
                          ("profile", lambda: layer_profile(result, scale=scale))],
                         folder, formats, dpi)


def _save_figures(figures: list, folder: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """Draw each (stem, draw) figure, save it in every format, and close it."""
    from matplotlib import pyplot as plt

    from .plots import save_figure

    written: list[Path] = []
    for name, draw in figures:
        figure = draw()
        try:
            written += save_figure(figure, folder / name, formats=formats, dpi=dpi)
        finally:
            plt.close(figure)
    return written


def _check_out_path(folder: Path) -> None:
    """Fail before a long run if --out can never be created or written; creates nothing."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ShiftlabError(f"cannot create output folder {folder}: {existing} is not a folder;"
                            " choose another --out")
    if not os.access(existing, os.W_OK):
        raise ShiftlabError(f"cannot create output folder {folder}: {existing} is not writable;"
                            " choose another --out")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShiftlabError(f"cannot create output folder {folder}: {exc.strerror}; choose another"
                            " --out") from exc
    if not os.access(folder, os.W_OK):
        raise ShiftlabError(f"output folder {folder} is not writable; choose another --out")


def _report(result, written: list[Path]) -> None:
    summary = result.summary()
    spatial = summary[summary["kind"] == "spatial"]
    if len(spatial):
        means = spatial["mean"]
        # PSNR: higher is more equivariant, so the least equivariant layer has the lowest value
        pick = means.idxmin if result.settings.metric == "psnr" else means.idxmax
        worst = spatial.loc[pick()] if means.notna().any() else None
        if worst is not None:
            click.echo(f"least equivariant spatial layer: {worst['layer']} (stride"
                       f" {worst['stride']:g}, mean {result.settings.metric} {worst['mean']:.4g})",
                       err=True)
    click.echo(f"measured in {result.meta.get('seconds', float('nan')):.1f} s", err=True)
    for path in written:
        click.echo(str(path))


def _warn_nonfinite(result, label: str = "") -> None:
    """One warning line naming every layer with NaN/Inf features (up to 5) and how many values."""
    bad = result.nonfinite_layers()
    if not bad:
        return
    total = {info.name: (int(nan.sum()), int(nan.sum() + n.sum() + inf.sum()))
             for info, nan, n, inf in zip(result.layers, result.n_nan, result.n, result.n_inf)}
    listed = ", ".join(f"{name} ({total[name][0]} of {total[name][1]} image-shifts)" for name in bad[:5])
    more = f" and {len(bad) - 5} more (Result.n_nan)" if len(bad) > 5 else ""
    layers = "layer" if len(bad) == 1 else "layers"
    click.echo(f"warning: {label + ': ' if label else ''}non-finite values (NaN/Inf) in {len(bad)}"
               f" {layers}, left out of the means: {listed}{more}", err=True)


# -- compare -----------------------------------------------------------------------------
@main.command()
@click.argument("result_files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_specs", multiple=True, metavar="MODEL",
              help="A model to measure (repeatable): NAME[+aaK][@WEIGHTS], e.g. vgg16,"
                   " resnet50@base.pth, resnet50+aa4@resnet50_lpf4.pth.")
@_variant_options
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random-init weights.")
@_measure_options
@_figure_options
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: runs/compare-<timestamp>/.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def compare(result_files: Sequence[str], model_specs: Sequence[str], filt_size: Optional[int],
            weights: str, trust_checkpoint: bool, seed: int, scale: str, formats: Sequence[str],
            dpi: int, out: Optional[str], quiet: bool, **options) -> None:
    """Compare models (or saved results) measured with the same settings.

    \b
    shiftlab compare --model vgg16 --antialias 4            baseline vs. its BlurPool version
    shiftlab compare -m resnet50@base.pth -m resnet50+aa4@lpf4.pth
    shiftlab compare runs/a/result.npz runs/b/result.npz    from saved results

    Writes grids.*, difference.* (each model minus the first), profile.*, summary.csv and one
    result-<label>.npz per measured model.
    """
    with _user_errors():
        from .comparison import Comparison
        from .result import load

        if result_files and model_specs:
            raise UsageError("give either result files or --model options, not both")
        if result_files:
            if filt_size:
                raise UsageError("--antialias needs --model; saved results are compared as they are")
            results = [load(path) for path in result_files]
        else:
            specs = list(model_specs)
            if not specs:
                raise UsageError("nothing to compare: pass result files or --model (with --antialias"
                                 " for a baseline-vs-antialiased comparison)")
            variants = [(spec, None) for spec in specs]
            if filt_size:
                variants += [(spec, filt_size) for spec in specs]
            if len(variants) < 2:
                raise UsageError("a comparison needs two models: repeat --model or add --antialias K")
            shift_grid, margin = _grid_and_margin(options)
            results, images = [], None
            for spec, filt in variants:
                loaded = _load(spec, weights, trust_checkpoint, seed, filt)
                if images is None:
                    images = _images_for(loaded, options, margin)
                results.append(_measure(loaded, images, shift_grid, margin, quiet, **options))
        comparison = Comparison(results)
        folder = Path(out) if out else _default_out("compare")
        written = _write_comparison(comparison, folder, bool(model_specs), scale, formats, dpi)
        for result, label in zip(comparison.results, comparison.labels):
            _warn_nonfinite(result, label)
        if not quiet:
            table = comparison.summary()
            means = [c for c in table.columns if c.startswith("mean[")]
            click.echo(table[[table.columns[1]] + means].to_string(index=False, float_format="%.4g"),
                       err=True)
        for path in written:
            click.echo(str(path))


def _write_comparison(comparison, folder: Path, save_results: bool, scale: str,
                      formats: Sequence[str], dpi: int) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    with _staged(folder) as stage:
        written = _write_comparison_files(comparison, stage, save_results, scale, formats, dpi)
    return [folder / path.name for path in written]


def _write_comparison_files(comparison, folder: Path, save_results: bool, scale: str,
                            formats: Sequence[str], dpi: int) -> list[Path]:
    from .files import atomic_write

    written: list[Path] = []
    if save_results:
        for label, result in zip(comparison.labels, comparison.results):
            written.append(result.save(folder / f"result-{_safe_name(label)}.npz"))
    table = comparison.summary().to_csv(index=False).encode()
    written.append(atomic_write(folder / "summary.csv", lambda handle: handle.write(table)))
    figures = [("grids", lambda: comparison.plot_grids(scale=scale)),
               ("profile", lambda: comparison.plot_profile(scale=scale))]
    for index in range(1, len(comparison.results)):
        stem = "difference" if len(comparison.results) == 2 else f"difference-{index}"
        figures.append((stem, lambda index=index: comparison.plot_difference(0, index)))
    return written + _save_figures(figures, folder, formats, dpi)


# -- consistency -------------------------------------------------------------------------
DEFAULT_PAIRS = 1000


@main.command()
@click.option("--model", "-m", "model_specs", multiple=True, required=True, metavar="MODEL",
              help="A classifier to measure (repeatable): NAME[+aaK][@WEIGHTS], e.g. resnet18,"
                   " resnet50+aa4@resnet50_lpf4.pth, path/to/file.py:factory.")
@_variant_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for random-init weights and for drawing the random shift pairs.")
@click.option("--pairs", "n_pairs", type=click.IntRange(1), default=DEFAULT_PAIRS,
              show_default=True,
              help="Random pairs of shifts (d1, d2) drawn from the grid for the paper's consistency"
                   " P[argmax f(T_d1 x) = argmax f(T_d2 x)]; pair k uses image k mod N.")
@click.option("--labels", "labels_path", type=click.Path(), default=None, metavar="PATH",
              help="Class labels for accuracy under shifts: a folder ROOT/class_name/*.jpg (names"
                   " as in the weights' categories, case-insensitive, or class indices) or a CSV"
                   " with rows file,label. The images are then taken from it (no --images).")
@_shift_options
@click.option("--format", "formats", multiple=True, type=click.Choice(FORMATS),
              default=("png", "pdf"), show_default=True,
              help="Formats of the probability figure (repeatable).")
@click.option("--dpi", type=click.IntRange(30, 1200), default=150, show_default=True,
              help="Resolution of PNG figures.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: runs/consistency-<timestamp>/.")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress bar and no list of written files (the table is still printed).")
def consistency(model_specs: Sequence[str], filt_size: Optional[int], weights: str,
                trust_checkpoint: bool, seed: int, n_pairs: int, labels_path: Optional[str],
                formats: Sequence[str], dpi: int, out: Optional[str], quiet: bool,
                **options) -> None:
    """Output-level shift invariance: does the predicted class survive a shift?

    For each model, on the grid of shifts: consistency vs. the unshifted prediction per shift,
    the paper's pairwise consistency over --pairs random pairs of shifts (Wilson 95% interval),
    and along the diagonal (t, t): the probability of the unshifted top class, the flip rate
    (share of consecutive steps whose prediction changes) and MAC (mean absolute change of that
    probability). With --labels also accuracy per shift.

    \b
    shiftlab consistency --model resnet18 --antialias 4      baseline vs. BlurPool version
    shiftlab consistency -m resnet50 --labels val/ --subpixel 2 --mode crop

    Prints one row per model to stdout and writes consistency.csv (per model and shift),
    summary.csv (the table), invariance-<model>.npz and probability.{png,pdf} into --out.
    """
    with _user_errors():
        from .invariance import measure_invariance, read_labels

        if labels_path and options["image_sources"]:
            raise UsageError("--labels names the images (class folders or the CSV's files); drop"
                             " --images")
        variants = [(spec, None) for spec in model_specs]
        if filt_size:
            variants += [(spec, filt_size) for spec in model_specs]
        shift_grid, margin = _grid_and_margin(options)
        results, images, labelled = [], None, None
        for spec, filt in variants:
            loaded = _load(spec, weights, trust_checkpoint, seed, filt)
            labels = None
            if labels_path:
                labelled = read_labels(labels_path, _categories(loaded))
                if images is None:
                    paths = labelled.paths[:options["max_images"]] if options["max_images"] \
                        else labelled.paths
                    images = _images_for(loaded, {**options, "image_sources": tuple(paths),
                                                  "max_images": None}, margin)
                labels = labelled.for_paths(images.paths)
            elif images is None:
                images = _images_for(loaded, options, margin)
            label = _unique_label(loaded.name, [r.meta["label"] for r in results])
            if not quiet:
                click.echo(f"{label} ({loaded.weights}): {len(images.paths)} images at"
                           f" {images.tensor.shape[-1] - 2 * margin} px, {len(shift_grid)} shifts"
                           f" ({shift_grid.kind}, {options['mode']}), {n_pairs} pairs", err=True)
            meta = {"model": loaded.name, "weights": loaded.weights, "pretrained": loaded.pretrained,
                    "images": [p.name for p in images.paths], "label": label,
                    "labels": str(labels_path) if labels_path else None}
            results.append(measure_invariance(
                loaded.model, images.tensor, shift_grid, mode=options["mode"], margin=margin,
                labels=labels, n_pairs=n_pairs, seed=seed, batch_size=options["batch_size"],
                device=options["device"], progress=None if not quiet else False, meta=meta))
        folder = Path(out) if out else _default_out("consistency")
        table = _consistency_table(results)
        written = _write_consistency(results, table, folder, formats, dpi)
        click.echo(_format_consistency(table))
        if not quiet:
            for path in written:
                click.echo(str(path), err=True)


def _categories(loaded) -> Optional[list]:
    """The model's class names: its weights' categories, else torchvision's for that name."""
    if loaded.categories:
        return list(loaded.categories)
    from torchvision.models import get_model_weights

    from .variants import parse_variant

    try:
        return list(get_model_weights(parse_variant(loaded.name)[0]).DEFAULT.meta["categories"])
    except (ValueError, KeyError, AttributeError, TypeError):
        return None  # not a torchvision classifier: labels must be class indices


def _unique_label(name: str, taken: Sequence[str]) -> str:
    label, count = name, 1
    while label in taken:
        count += 1
        label = f"{name}#{count}"
    return label


def _consistency_table(results):
    import pandas as pd

    rows = []
    for result in results:
        summary = result.summary()
        rows.append({"model": result.meta["label"], "weights": result.meta.get("weights"),
                     **summary})
    return pd.DataFrame(rows)


def _format_consistency(table) -> str:
    """One row per model: pairwise consistency ± CI, pairs, vs. reference, flip rate, MAC, accuracy."""
    import pandas as pd

    shown = pd.DataFrame({
        "model": table["model"],
        "consistency (pairs)": [f"{v:.3f}" for v in table["pairwise_consistency"]],
        "95% CI": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in
                   zip(table["pairwise_ci_low"], table["pairwise_ci_high"])],
        "pairs": table["n_pairs"],
        "vs reference (mean)": [f"{v:.3f}" for v in table["consistency_vs_reference"]],
        "flip rate": [f"{v:.3f}" for v in table["flip_rate"]],
        "MAC": [f"{v:.4f}" for v in table["mac"]],
    })
    if table["accuracy"].notna().any():
        shown["accuracy (mean)"] = [f"{v:.3f}" for v in table["accuracy"]]
    return shown.to_string(index=False)


def _write_consistency(results, table, folder: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    """invariance-<label>.npz, consistency.csv, summary.csv, probability.* — each atomic."""
    import matplotlib

    matplotlib.use("Agg")

    with _staged(folder) as stage:
        written = _write_consistency_files(results, table, stage, formats, dpi)
    return [folder / path.name for path in written]


def _write_consistency_files(results, table, folder: Path, formats: Sequence[str], dpi: int) -> list[Path]:
    import pandas as pd
    from matplotlib import pyplot as plt

    from .plots import probability_plot, save_figure
    from .files import atomic_write

    written: list[Path] = []
    for result in results:
        written.append(result.save(folder / f"invariance-{_safe_name(result.meta['label'])}.npz"))
    frames = [result.to_frame().assign(model=result.meta["label"]) for result in results]
    per_shift = pd.concat(frames, ignore_index=True)
    per_shift = per_shift[["model"] + [c for c in per_shift.columns if c != "model"]]
    for name, frame in (("consistency.csv", per_shift), ("summary.csv", table)):
        data = frame.to_csv(index=False).encode()
        written.append(atomic_write(folder / name, lambda handle, data=data: handle.write(data)))
    figure = probability_plot(results)
    try:
        written += save_figure(figure, folder / "probability", formats=formats, dpi=dpi)
    finally:
        plt.close(figure)
    return written


# -- layers ------------------------------------------------------------------------------
@main.command()
@_model_options
@click.option("--size", type=click.IntRange(8), default=224, show_default=True, help="Input size.")
@click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB",
              help="Only layers whose module name matches (repeatable).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
def layers(model_spec: str, weights: str, trust_checkpoint: bool, seed: int, num_classes: Optional[int],
           size: int, layer_patterns: Sequence[str], device: str) -> None:
    """List the hook points: name, module type, kind, layout, measured stride and shape.

    Layout says how a spatial output is read as a (C, h, w) map: nchw, nhwc (channels-last,
    permuted) or tokens+k (a transformer's k + h·w tokens; the k class/register tokens are left
    out, the rest reshaped to the patch grid). Shapes are after that conversion.
    """
    with _user_errors():
        from .engine import resolve_device
        from .geometry import probe_layers

        target = resolve_device(device)
        loaded = _load(model_spec, weights, trust_checkpoint, seed, num_classes=num_classes)
        infos = probe_layers(loaded.model.to(target), (size, size), list(layer_patterns) or None,
                             device=target)
        if not infos:
            raise UsageError("no layer produced a tensor output; check --layers")
        width = max(len(i.name) for i in infos)
        click.echo(f"{'#':>3}  {'layer':<{width}}  {'module':<20} {'kind':<8} {'layout':<8}"
                   f" {'stride':>6}  shape")
        for index, info in enumerate(infos):
            stride = "-" if info.kind == "global" else f"{info.stride[0]:g}" + (
                "" if info.stride[0] == info.stride[1] else f"x{info.stride[1]:g}")
            layout = "-" if info.kind == "global" else info.layout + (
                f"+{info.extra_tokens}" if info.extra_tokens else "")
            click.echo(f"{index:>3}  {info.name:<{width}}  {info.module:<20} {info.kind:<8}"
                       f" {layout:<8} {stride:>6}  {'x'.join(map(str, info.shape))}")
        click.echo(f"{len(infos)} layers of {loaded.name} at {size} px ({loaded.weights})", err=True)


# -- plot --------------------------------------------------------------------------------
@main.command()
@click.argument("result_file", type=click.Path(dir_okay=False))
@_figure_options
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: the result file's folder.")
def plot(result_file: str, scale: str, formats: Sequence[str], dpi: int, out: Optional[str]) -> None:
    """Re-draw the figures of a saved result.npz without recomputing."""
    with _user_errors():
        import matplotlib

        matplotlib.use("Agg")
        from .result import load

        result = load(result_file)
        folder = Path(out) if out else Path(result_file).parent
        with _staged(folder) as stage:
            written = _result_figures(result, stage, scale, formats, dpi)
        for path in written:
            click.echo(str(folder / path.name))


if __name__ == "__main__":
    main()
