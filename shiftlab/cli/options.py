"""The CLI's shared options; every default and choice list comes from the library's constants."""
from __future__ import annotations

from typing import Callable, Sequence

import click
from click.core import ParameterSource

from .. import defaults
from ..errors import UsageError
from ..requests import HeatmapRequest, Inputs, LayerComparison, ModelSpec, Shifts
from ..equivariance.align import ALIGNMENTS
from ..equivariance.metrics import METRICS
from ..equivariance.shifts import MODES

Decorator = Callable


def apply(func, options: Sequence[Decorator]):
    for option in reversed(options):
        func = option(func)
    return func


def apply_options(options: Sequence[Decorator]) -> Decorator:
    """A decorator applying a list of options (``image_options()``, ``run_options()``)."""
    return lambda func: apply(func, options)


def model_options(func):
    """--model (one), --weights, --weights-key, --trust-checkpoint, --seed, --num-classes,
    --padding, --mean/--std."""
    return apply(func, [
        click.option("--model", "-m", "model_spec", required=True, metavar="MODEL",
                     help="torchvision name (vgg16, resnet50, ...), NAME+aaK (its BlurPool version),"
                          " path/to/file.py:factory, package.module:factory, or timm:NAME;"
                          " NAME@WEIGHTS names its weights."),
        *weights_options(),
        click.option("--seed", default=0, show_default=True, type=int,
                     help="Seed for random-init weights, so figures are reproducible."),
        click.option("--num-classes", type=click.IntRange(1), default=None,
                     help="Classifier size, for checkpoints trained on other classes"
                          " (default: the model's own)."),
        *normalisation_options(),
    ])


def weights_options() -> list:
    return [
        click.option("--weights", "-w", default="auto", show_default=True, metavar="WEIGHTS",
                     help="auto (pretrained if cached or downloadable, else random init with a"
                          " warning), none, a torchvision weights name (DEFAULT, IMAGENET1K_V1,"
                          " ...), or a checkpoint file (.pth/.pt/.tar/.safetensors)."),
        click.option("--weights-key", default=None, metavar="KEY",
                     help="Which entry of a checkpoint holding several (state_dict, model,"
                          " model_ema, ema, ...); a file with several and no key is refused."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow full unpickling of checkpoints (runs code inside them). Only for"
                          " files you trust; by default torch.load(weights_only=True)."),
    ]


def normalisation_options() -> list:
    return [
        click.option("--mean", type=float, nargs=3, default=None, metavar="R G B",
                     help="Input normalisation mean, for models not trained with ImageNet"
                          " statistics (default: the weights' own, else ImageNet's)."),
        click.option("--std", type=float, nargs=3, default=None, metavar="R G B",
                     help="Input normalisation std (see --mean)."),
    ]


def padding_option(allow_both: bool):
    choices = list(defaults.PADDINGS) + (["both"] if allow_both else [])
    return click.option(
        "--padding", type=click.Choice(choices), default="as-trained", show_default=True,
        help="as-trained: the model as it is; circular: every zero padding made circular, so"
             " circular shifts isolate aliasing from the wrap-seam boundary effect"
             + ("; both: measure both and shade the gap" if allow_both else "") + ".")


def variant_options(func):
    """--antialias, --weights, --weights-key, --trust-checkpoint of multi-model commands."""
    return apply(func, [
        click.option("--antialias", type=int, default=None, metavar="K",
                     help="Also measure the BlurPool version of each --model with this filter"
                          " size K in 1..7 (weights copied from the baseline)."),
        *weights_options(),
        click.option("--num-classes", type=click.IntRange(1), default=None,
                     help="Classifier size, for checkpoints trained on other classes"
                          " (default: the model's own)."),
        *normalisation_options(),
    ])


def image_options() -> list:
    return [
        click.option("--images", "-i", "image_sources", multiple=True, metavar="PATH",
                     help="Image folder or files (PNG/JPEG); repeatable. Default: the sample"
                          " photographs shipped with shiftlab."),
        click.option("--max-images", type=click.IntRange(1), default=None,
                     help="Use at most this many images (first in sorted order)."),
        click.option("--size", type=click.IntRange(8), default=defaults.SIZE, show_default=True,
                     help=f"Input size: images are resized (shorter side to size/"
                          f"{defaults.CROP_FRACTION}) and centre-cropped to size x size."),
        click.option("--resize", type=click.IntRange(8), default=None,
                     help=f"Shorter side before cropping. Default: round(size /"
                          f" {defaults.CROP_FRACTION}), grown to fit the crop margin."),
    ]


def shift_options() -> list:
    return [
        click.option("--max-shift", "-k", type=click.IntRange(1), default=defaults.MAX_SHIFT,
                     show_default=True,
                     help="Grid extent K: shifts 0..K-1 per axis (square, K x K), -K..K"
                          " (symmetric) or (t, t) for t in 0..K-1 (diagonal)."),
        click.option("--grid", type=click.Choice(defaults.GRID_KINDS), default="square",
                     show_default=True, help="Shape of the shift grid."),
        click.option("--subpixel", type=click.IntRange(1), default=1, show_default=True,
                     help="Steps of 1/P pixel (band-limited FFT shifts), e.g. 2 for 0.5 px."),
        click.option("--mode", type=click.Choice(MODES), default="circular", show_default=True,
                     help="circular: torch.roll (the paper's per-layer protocol); crop: shifted"
                          " windows of a larger image, no wrap-around."),
    ]


def layer_options() -> list:
    return [
        click.option("--align", type=click.Choice(ALIGNMENTS), default="bilinear",
                     show_default=True,
                     help="How feature maps of stride s are aligned with an input shift:"
                          " bilinear upsampling (paper), exact (only where s divides the shift;"
                          " masked elsewhere) or fourier (fractional shift)."),
        click.option("--metric", type=click.Choice(METRICS), default="cosine", show_default=True,
                     help="Distance: cosine (paper), relative l2, psnr (dB)."),
        click.option("--layers", "-l", "layer_patterns", multiple=True, metavar="GLOB|type:T",
                     help="Only these layers (repeatable; comma lists allowed): module-name globs"
                          " ('features.*') or module types ('type:MaxPool2d,BlurPool')."
                          " Default: every leaf module."),
        click.option("--border", type=click.IntRange(0), default=0, show_default=True,
                     help="crop mode: input pixels ignored at each edge of the compared region."),
    ]


def run_options() -> list:
    return [
        click.option("--batch-size", "-b", type=click.IntRange(1), default=defaults.BATCH_SIZE,
                     show_default=True, help="Inputs per forward pass (images x shifts)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA if available), cpu, cuda or cuda:N."),
    ]


def measure_options(func):
    """Images, shifts, layer comparison, batch and device: the per-layer commands."""
    return apply(func, image_options() + shift_options() + layer_options() + run_options())


def output_level_options(func):
    """Images, shifts, batch and device: ``consistency`` compares outputs, not layers."""
    return apply(func, image_options() + shift_options() + run_options())


def figure_options(func):
    from ..figures.panels import COLOR_RANGE_HELP, COLOR_RANGES, DEFAULT_COLOR_RANGE, SCALES
    from ..figures.views import VIEWS

    return apply(func, [
        click.option("--scale", "--metric-scale", "scale", type=click.Choice(SCALES),
                     default="linear", show_default=True, help="Colour scale of the heatmaps."),
        click.option("--color-range", type=click.Choice(COLOR_RANGES),
                     default=DEFAULT_COLOR_RANGE, show_default=True, help=COLOR_RANGE_HELP),
        click.option("--vmax", default="auto", show_default=True, metavar="auto|pNN|VALUE",
                     help="Top of the colour scale: auto, a percentile of the plotted values"
                          " (p99) or a number; larger values show as the bar's 'over' arrow."),
        click.option("--view", type=click.Choice(VIEWS), default="all", show_default=True,
                     help="all: every layer; paper: convolutions, pools/BlurPools and the logits,"
                          " named like the paper (conv1_1 ... pool1 ...)."),
        click.option("--format", "formats", multiple=True,
                     type=click.Choice(defaults.FIGURE_FORMATS), default=("png", "pdf"),
                     show_default=True, help="Figure formats to write (repeatable)."),
        dpi_option(),
    ])


def dpi_option():
    from ..figures.options import DPI_RANGE

    return click.option("--dpi", type=click.IntRange(*DPI_RANGE), default=150, show_default=True,
                        help="Resolution of PNG figures, and of the heatmap cells inside PDF/SVG.")


def out_options(default: str):
    """--out (default runs/<default>-<timestamp>), --overwrite, --quiet."""
    return lambda func: apply(func, [
        click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
                     help=f"Output folder. Default: runs/{default}-<timestamp>/."),
        click.option("--overwrite", is_flag=True,
                     help="Replace the results of another run in --out (as a set; by default a"
                          " folder holding results is refused)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ])


def figure_settings(scale: str, color_range, vmax: str, view: str, formats: Sequence[str],
                    dpi: int, title=None):
    """The run's ``FigureOptions`` from the figure options (validated there, before any
    measurement)."""
    from ..figures.options import FigureOptions
    return FigureOptions(scale=scale, color_range=color_range, vmax=vmax,
                         view=view, title=title or None, formats=tuple(formats), dpi=dpi)


def layer_selection(patterns: Sequence[str]):
    """--layers values as ``measure(layers=...)``: None, or globs and 'type:Name' items."""
    items = [pattern.strip() for pattern in patterns if pattern.strip()]
    return items or None


# -- requests: built here, once, from the parsed options ----------------------------------------
def spec_of(name: str, params: dict, padding: str = "as-trained") -> ModelSpec:
    """The ``ModelSpec`` of ``--model NAME`` and the model options of ``params``."""
    return ModelSpec(name, weights=params["weights"], padding=padding, seed=params["seed"],
                     num_classes=params["num_classes"], weights_key=params["weights_key"],
                     trust_checkpoint=params["trust_checkpoint"], mean=params["mean"],
                     std=params["std"])


def inputs(params: dict) -> Inputs:
    return Inputs(images=tuple(params["image_sources"]), max_images=params["max_images"],
                  size=params["size"], resize=params["resize"])


def shifts(params: dict) -> Shifts:
    return Shifts(grid=params["grid"], max_shift=params["max_shift"],
                  subpixel=params["subpixel"], mode=params["mode"])


def heatmap_request(model: ModelSpec, params: dict) -> HeatmapRequest:
    """The request of ``heatmap`` (and of each model of ``compare``)."""
    return HeatmapRequest(
        model, inputs=inputs(params), shifts=shifts(params),
        comparison=LayerComparison(align=params["align"], metric=params["metric"],
                                   layers=layer_selection(params["layer_patterns"]),
                                   border=params["border"]),
        batch_size=params["batch_size"], device=params["device"],
        dtype=params.get("dtype", "float32"))


def refuse_unused(command: str, unused: Sequence[str], why: str) -> None:
    """A usage error when an option of ``unused`` (parameter names) was given on the command
    line: a command never takes an option it would ignore."""
    context = click.get_current_context()
    given = [p for p in context.command.params if p.name in unused and
             context.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        names = ", ".join(param.opts[0] for param in given)
        raise UsageError(f"{command}: {names} {'is' if len(given) == 1 else 'are'} not used {why};"
                         " drop it")
