"""Command line: the click group and its commands. They parse options, call the pipeline
(``shiftlab.runs``), and hand results to ``shiftlab.cli.reports``; no measurement logic lives here.

Every ShiftlabError becomes one line on stderr and its exit code (2 usage, 1 runtime); Ctrl-C
exits 130 and SIGTERM 143; a folder is never half-written (``reports.write_set``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import click

from .._version import __version__

from .. import defaults
from .console import Group, check_matplotlib_backend, import_matplotlib, user_errors

import_matplotlib()  # before cli_options imports it: an invalid MPLBACKEND must not crash here

from .options import (apply_options, dpi_option, figure_options, figure_settings,  # noqa: E402
                      heatmap_request, image_options, inputs, layer_selection, measure_options,
                      model_options, out_options, output_level_options, padding_option,
                      refuse_unused, run_options, shifts, spec_of, variant_options)
from ..attribution.settings import AXES, DTYPES as ATTRIBUTION_DTYPES, OUTPUT_SPACES  # noqa: E402
from ..checks import check_filter_size  # noqa: E402
from ..figures.panels import DEFAULT_COLOR_RANGE  # noqa: E402
from ..requests import AttributionRequest, CompareRequest, ConsistencyRequest  # noqa: E402
from .reports import claim  # noqa: E402
from ..errors import UsageError  # noqa: E402


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"],
                                          "max_content_width": 100})
@click.version_option(__version__, prog_name="shiftlab")
def main() -> None:
    """See where shift-equivariance is lost inside a convolutional network.

    \b
    shiftlab heatmap --model vgg16            layer-by-layer heatmaps on the sample images
    shiftlab heatmap --model vgg16 --padding both   aliasing vs. the zero-padding boundary effect
    shiftlab layers --model resnet50          the layers, their stride and output shape
    shiftlab plot runs/x/result.npz           re-draw figures without recomputing
    shiftlab compare --model vgg16 --antialias 4   baseline vs. antialiased (BlurPool)
    shiftlab consistency --model resnet18 --antialias 4   output-level consistency, flips, MAC
    shiftlab attribute --model vgg16          which layers make the output move under a shift
    """


# -- heatmap -----------------------------------------------------------------------------
@main.command()
@model_options
@padding_option(allow_both=True)
@measure_options
@figure_options
@click.option("--title", default=None, help="Figure title (default: model, weights, settings).")
@out_options(default="<model>")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out from its last completed image batch"
                   " (refused when the model, weights, seed, images or settings differ).")
@click.option("--dry-run", is_flag=True,
              help="Print the number of forward passes and an estimate of time and memory from a"
                   " short calibration, then exit.")
@click.option("--dtype", type=click.Choice(defaults.DTYPES), default="float32", show_default=True,
              help="Autocast dtype of the forward passes (float16 needs a GPU); distances are"
                   " always computed in float32 and accumulated in float64.")
def heatmap(model_spec: str, padding: str, scale: str, color_range, vmax: str, view: str,
            formats: Sequence[str], dpi: int, title: Optional[str], out: Optional[str],
            overwrite: bool, quiet: bool, resume: bool, dry_run: bool, **params) -> None:
    """Measure every layer's equivariance over a grid of shifts and draw the layer grid.

    Writes result.npz, summary.csv, heatmap.{png,pdf} and profile.{png,pdf} into --out. The
    default (size 112, 8 x 8 circular shifts, 6 sample images) takes about a minute for vgg16
    on a 2-core CPU; --device auto uses a GPU when there is one. --padding both measures the
    model as trained and with circular padding, and writes padding.* (the gap = boundary effect).
    """
    with user_errors():
        from .. import distributed
        from .jobs import run_heatmap

        check_matplotlib_backend()
        figures = figure_settings(scale, color_range, vmax, view, formats, dpi, title)
        padding_both = padding == "both"
        request = heatmap_request(
            spec_of(model_spec, params, "as-trained" if padding_both else padding), params)
        if resume and not out:
            raise UsageError("--resume needs the --out folder of the interrupted run")
        running_distributed = distributed.init_from_env()
        try:
            with claim(Path(out) if out and distributed.is_main() else None):
                run_heatmap(request, figures, padding_both=padding_both,
                            out=Path(out) if out else None, overwrite=overwrite,
                            quiet=quiet or not distributed.is_main(), resume=resume,
                            dry_run=dry_run, distributed_run=running_distributed)
            distributed.finish()  # every rank waits for rank 0's files, then leaves together
        finally:
            distributed.shutdown()


# -- compare -----------------------------------------------------------------------------
@main.command()
@click.argument("result_files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model_specs", multiple=True, metavar="MODEL",
              help="A model to measure (repeatable): NAME[+aaK][@WEIGHTS], e.g. vgg16,"
                   " resnet50@base.pth, resnet50+aa4@resnet50_lpf4.pth.")
@variant_options
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random-init weights.")
@padding_option(allow_both=False)
@measure_options
@figure_options
@click.option("--difference", type=click.Choice(["diff", "ratio"]), default="diff",
              show_default=True,
              help="difference.*: each model minus the first (diff), or log2 of their ratio"
                   " (ratio: changes in small-valued layers show next to large ones).")
@out_options(default="compare")
def compare(result_files: Sequence[str], model_specs: Sequence[str], antialias: Optional[int],
            padding: str, scale: str, color_range, vmax: str, view: str, formats: Sequence[str],
            dpi: int, difference: str, out: Optional[str], overwrite: bool, quiet: bool,
            **params) -> None:
    """Compare models (or saved results) measured with the same settings.

    \b
    shiftlab compare --model vgg16 --antialias 4            baseline vs. its BlurPool version
    shiftlab compare -m resnet50@base.pth -m resnet50+aa4@lpf4.pth
    shiftlab compare runs/a/result.npz runs/b/result.npz    from saved results

    Writes grids.*, difference.* (each model against the first), profile.*, summary.csv and one
    result-<label>.npz per measured model. Results that differ in settings, padding, dtype,
    resize or image content are refused, naming the difference.
    """
    with user_errors():
        from .jobs import run_compare

        check_matplotlib_backend()
        if result_files and model_specs:
            raise UsageError("give either result files or --model options, not both")
        request = None
        if result_files:
            if antialias is not None:
                raise UsageError("--antialias needs --model; saved results are compared as they are")
            refuse_unused("compare", list(params) + ["padding"],
                          "with saved results (they are compared as they are)")
        elif not model_specs:
            raise UsageError("nothing to compare: pass result files or --model (with --antialias"
                             " for a baseline-vs-antialiased comparison)")
        else:
            models = [spec_of(name, params, padding) for name in model_specs]
            request = CompareRequest.of_models(models, heatmap_request(models[0], params),
                                               antialias)
        with claim(Path(out) if out else None):
            run_compare(list(result_files), request,
                        figure_settings(scale, color_range, vmax, view, formats, dpi),
                        difference, out=Path(out) if out else None, overwrite=overwrite,
                        quiet=quiet)


# -- attribute ---------------------------------------------------------------------------
@main.command()
@click.option("--model", "-m", "model_specs", multiple=True, required=True, metavar="MODEL",
              help="A model (repeatable: one figure, the models one above the other):"
                   " NAME[+aaK][@WEIGHTS], e.g. resnet50, resnet50+aa4@lpf4.pth, file.py:factory.")
@variant_options
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for random-init weights.")
@padding_option(allow_both=False)
@apply_options(image_options())
@click.option("--axis", type=click.Choice(AXES), default="both", show_default=True,
              help="Direction of the translation: horizontal (along W), vertical (along H), or"
                   " both (their squared norms and inner products added).")
@click.option("--output", "output_space", type=click.Choice(OUTPUT_SPACES), default="logits",
              show_default=True,
              help="The output whose change is attributed: the logits, or the softmax"
                   " probabilities.")
@click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB|type:T",
              help="Only these layer calls get a share (repeatable; globs or 'type:Name'; no"
                   " module inside another); the rest of the change lands in the remainder."
                   " Default: every leaf module.")
@apply_options(run_options())
@click.option("--dtype", type=click.Choice(ATTRIBUTION_DTYPES), default="float32",
              show_default=True, help="Precision of the forward-mode passes.")
@click.option("--format", "formats", multiple=True, type=click.Choice(defaults.FIGURE_FORMATS),
              default=("png", "pdf"), show_default=True, help="Figure formats (repeatable).")
@dpi_option()
@click.option("--title", default=None, help="Figure title.")
@out_options(default="attribute-<model>")
@click.option("--dry-run", is_flag=True,
              help="Print the number of forward-mode passes and an estimate of the time from"
                   " one calibration pass, then exit.")
def attribute(model_specs: Sequence[str], antialias: Optional[int], padding: str, axis: str,
              output_space: str, layer_patterns: Sequence[str], dtype: str,
              formats: Sequence[str], dpi: int, title: Optional[str], out: Optional[str],
              overwrite: bool, quiet: bool, dry_run: bool, **params) -> None:
    """Which layers make the output move when the input is translated.

    \b
    shiftlab attribute --model vgg16                     every layer call's share
    shiftlab attribute --model resnet50 --antialias 4    baseline and BlurPool, one figure

    The output's derivative under a sub-pixel (band-limited) translation, L F, is split exactly
    into one term per layer call (its own Lie derivative carried to the output) plus a
    remainder for operations that are not modules (torch.flatten, +). Each layer's signed
    share of L F sums to 1 with the remainder. Writes result.npz (attribution-<model>.npz for
    several models), summary.csv and attribution.{png,pdf}. One forward-mode pass per layer
    call, image batch and axis: see --dry-run.
    """
    with user_errors():
        from .attribution import run_attribute

        check_matplotlib_backend()
        figures = figure_settings("linear", DEFAULT_COLOR_RANGE, "auto", "all", formats, dpi, title)
        models = [spec_of(name, params, padding) for name in model_specs]
        if antialias is not None:
            check_filter_size(antialias)
            models += [model.antialiased(antialias) for model in models]
        requests = [AttributionRequest(model, inputs=inputs(params), axis=axis,
                                       output=output_space,
                                       layers=layer_selection(layer_patterns),
                                       batch_size=params["batch_size"], device=params["device"],
                                       dtype=dtype) for model in models]
        with claim(Path(out) if out and not dry_run else None):
            run_attribute(requests, figures, out=Path(out) if out else None,
                          overwrite=overwrite, quiet=quiet, dry_run=dry_run)


# -- consistency -------------------------------------------------------------------------
@main.command()
@click.option("--model", "-m", "model_specs", multiple=True, required=True, metavar="MODEL",
              help="A classifier or segmentation model to measure (repeatable):"
                   " NAME[+aaK][@WEIGHTS], e.g. resnet18, resnet50+aa4@resnet50_lpf4.pth,"
                   " deeplabv3_mobilenet_v3_large, path/to/file.py:factory.")
@variant_options
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for random-init weights, the random shift pairs and the bootstrap.")
@padding_option(allow_both=False)
@click.option("--pairs", "n_pairs", type=click.IntRange(1), default=defaults.PAIRS,
              show_default=True,
              help="Random pairs of shifts (d1, d2) drawn from the grid for the paper's consistency"
                   " P[argmax f(T_d1 x) = argmax f(T_d2 x)].")
@click.option("--labels", "labels_path", type=click.Path(), default=None, metavar="PATH",
              help="Class labels for accuracy: class folders ROOT/<class>/*.jpg (category names,"
                   " class indices, or ImageNet WNIDs in sorted order) or a CSV with rows"
                   " file,label. The images are then taken from it (no --images). For a"
                   " segmentation model: a folder ROOT/images/NAME.jpg + ROOT/masks/NAME.png"
                   " (class indices; VOC's JPEGImages/ + SegmentationClass/ too) for mIoU and"
                   " pixel accuracy under shifts.")
@click.option("--ignore-index", type=click.IntRange(0), default=255, show_default=True,
              help="Segmentation masks: the value of pixels without a label (left out of mIoU"
                   " and pixel accuracy).")
@click.option("--protocol", type=click.Choice(defaults.PROTOCOLS), default="grid",
              show_default=True,
              help="grid: every shift of --grid on every image; zhang2019: the paper's ImageNet"
                   " protocol (two random --size windows of the --resize centre crop per image"
                   " and epoch, 2 forwards per image); diagonal: the paper's diagonal sweep.")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True,
              help="zhang2019: passes over the images (pairs = images x epochs).")
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="DataLoader processes that decode images for the protocols and for"
                   " segmentation masks, which stream them (0: decode in the main process).")
@click.option("--class-order", type=click.Choice(["auto", "names", "sorted"]), default="auto",
              show_default=True,
              help="How --labels folder/CSV names become class indices: names (category names or"
                   " indices), sorted (torchvision ImageFolder order, e.g. ImageNet WNID folders),"
                   " auto (names, or sorted for a full set of WNID folders).")
@output_level_options
@click.option("--format", "formats", multiple=True, type=click.Choice(defaults.FIGURE_FORMATS),
              default=("png", "pdf"), show_default=True,
              help="Formats of the probability figure (repeatable).")
@dpi_option()
@out_options(default="consistency")
@click.option("--resume", is_flag=True,
              help="zhang2019/diagonal: continue an interrupted run in --out after its last"
                   " completed epoch (models already finished are not run again; refused when"
                   " the model, weights, seed, settings or image files (names, order, labels;"
                   " not their contents) differ).")
def consistency(model_specs: Sequence[str], antialias: Optional[int], padding: str,
                n_pairs: int, labels_path: Optional[str], ignore_index: int, protocol: str,
                epochs: int, workers: int, class_order: str, formats: Sequence[str], dpi: int,
                out: Optional[str], overwrite: bool, quiet: bool, resume: bool,
                **params) -> None:
    """Output-level shift invariance: does the predicted class (of an image, or of each
    pixel for a segmentation model) survive a shift?

    For each model, on the grid of shifts: consistency vs. the unshifted prediction per shift,
    the paper's pairwise consistency over --pairs random pairs of shifts, the share of images
    consistent (and correct, with --labels) under every shift, and along the diagonal (t, t)
    the flip rate and MAC (mean absolute change of the top-1 probability). Intervals are 95%
    from a seeded bootstrap over images.

    \b
    shiftlab consistency --model resnet18 --antialias 4      baseline vs. BlurPool version
    shiftlab consistency -m resnet50 --labels val/ --protocol zhang2019 --size 224 --resize 256
    shiftlab consistency -m deeplabv3_mobilenet_v3_large --labels masks/ --mode crop

    Prints one row per model to stdout and writes summary.csv, consistency.csv (per model and
    shift), invariance-<model>.npz and probability.{png,pdf} into --out. A model whose output
    is a map (segmentation) is measured pixel by pixel: agreement with the unshifted
    prediction, mASSC over --pairs, output distances, EQ-T and, with masks, mIoU and pixel
    accuracy per shift; it writes dense-<model>.npz, agreement.{png,pdf} (where in the image
    predictions flip) and shift-size.{png,pdf}. Under
    torchrun --nproc_per_node=N -m shiftlab consistency ... each process measures 1/N of the
    images (the protocols decode only theirs); the numbers equal one process's.
    """
    with user_errors():
        from .. import distributed
        from ..figures.options import FigureOptions
        from .jobs import run_consistency

        check_matplotlib_backend()
        if protocol == "grid":
            refuse_unused("consistency", ["epochs"] + (["workers"] if labels_path is None else []),
                          "by --protocol grid (every image is measured in one pass)")
        else:
            refuse_unused("consistency", ["max_shift", "grid", "subpixel", "mode", "n_pairs"],
                          f"by --protocol {protocol} (it draws its own shifts)")
        if labels_path is None:
            refuse_unused("consistency", ["class_order", "ignore_index"], "without --labels")
        if resume and not out:
            raise UsageError("--resume needs the --out folder of the interrupted run")
        models = [spec_of(name, params, padding) for name in model_specs]
        if antialias is not None:
            models += [model.antialiased(antialias) for model in models]
        template = ConsistencyRequest(
            models[0], inputs=inputs(params), shifts=shifts(params), protocol=protocol,
            pairs=n_pairs, labels=labels_path, epochs=epochs, workers=workers,
            class_order=class_order, batch_size=params["batch_size"], device=params["device"],
            ignore_index=ignore_index)
        requests = [template.for_model(model) for model in models]
        distributed.init_from_env()
        try:
            with claim(Path(out) if out and distributed.is_main() else None):
                run_consistency(requests, FigureOptions(formats=tuple(formats), dpi=dpi),
                                out=Path(out) if out else None,
                                overwrite=overwrite, quiet=quiet, resume=resume)
            distributed.finish()  # every rank waits for rank 0's files, then leaves together
        finally:
            distributed.shutdown()


# -- layers ------------------------------------------------------------------------------
@main.command()
@model_options
@padding_option(allow_both=False)
@click.option("--size", type=click.IntRange(8), default=defaults.SIZE, show_default=True,
              help="Input size (the default is heatmap's: strides and shapes as heatmap measures them).")
@click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB|type:T",
              help="Only these layers (repeatable): name globs or 'type:MaxPool2d'.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
def layers(model_spec: str, padding: str, size: int, layer_patterns: Sequence[str], device: str,
           **params) -> None:
    """List the hook points: name, module type, kind, layout, measured stride and shape.

    Layout says how a spatial output is read as a (C, h, w) map: nchw, nhwc (channels-last,
    permuted) or tokens+k (a transformer's k + h·w tokens; the k class/register tokens are left
    out, the rest reshaped to the patch grid). Shapes are after that conversion.
    """
    with user_errors():
        from ..equivariance.engine import resolve_device
        from ..equivariance.geometry import probe_layers
        from ..runs import load_spec

        spec = spec_of(model_spec, params, padding)
        target = resolve_device(device)
        loaded = load_spec(spec)
        infos = probe_layers(loaded.model.to(target), (size, size),
                             layer_selection(layer_patterns), device=target)
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
@figure_options
@click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB|type:T",
              help="Only draw these layers (name globs or 'type:MaxPool2d'; repeatable).")
@click.option("--title", default=None, help="Figure title.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output folder. Default: the result file's folder (its figures are replaced).")
@click.option("--replace", is_flag=True,
              help="With --layers: replace heatmap.* and profile.* by the selection's figures"
                   " (default: write heatmap-selected.* and profile-selected.* beside them).")
def plot(result_file: str, scale: str, color_range, vmax: str, view: str, formats: Sequence[str],
         dpi: int, layer_patterns: Sequence[str], title: Optional[str], out: Optional[str],
         replace: bool) -> None:
    """Re-draw the figures of a saved result without recomputing: a heatmap's result.npz,
    an attribution-*.npz, or a segmentation model's dense-*.npz (agreement and shift-size)."""
    with user_errors():
        from .jobs import run_plot

        check_matplotlib_backend()
        figures = figure_settings(scale, color_range, vmax, view, formats, dpi, title)
        folder = Path(out) if out else Path(result_file).parent
        with claim(folder if out or folder.is_dir() else None):
            if replace and not layer_patterns:
                raise UsageError("--replace needs --layers (without a selection, plot replaces"
                                 " the figures anyway)")
            written = run_plot(Path(result_file), layer_selection(layer_patterns), figures,
                               out=Path(out) if out else None, replace=replace)
        for path in written:
            click.echo(str(path))


if __name__ == "__main__":
    main()
