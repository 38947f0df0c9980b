"""Tests for the command line (shiftlab.cli.commands): every option path and every error path.

All in-process tests use click's CliRunner with the tiny factory model of conftest.py, 16 or 32 px
inputs and a 2 x 2 grid, so the whole file runs in well under a minute. A few tests run the
installed console script in a subprocess, as a user would.

Error-path contract (README, cli.py): exit code 2 for usage errors and 1 for runtime failures,
one line on stderr starting with 'error:', no traceback, and no output left in --out.
"""
from __future__ import annotations

import csv
import importlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import shiftlab
from shiftlab.cli.commands import main

CONFTEST = Path(__file__).resolve().with_name("conftest.py")
TINY = f"{CONFTEST}:tiny_classifier"
TINY_NAME = "conftest:tiny_classifier"  # LoadedModel.name of TINY
OUTPUTS = {"result.npz", "summary.csv", "heatmap.png", "heatmap.pdf", "profile.png", "profile.pdf"}
# The tiny classifier: conv, relu, maxpool(2), conv(stride 2), relu, global pool, flatten, linear.
TINY_LAYERS = ["0", "1", "2", "3", "4", "5", "6", "7"]
TINY_STRIDES = {"0": "1", "1": "1", "2": "2", "3": "4", "4": "4", "5": "-", "6": "-", "7": "-"}
FAST = ["--size", "16", "--max-shift", "2", "--max-images", "2", "--batch-size", "8", "--device", "cpu"]
FAST_FIGURES = ["--format", "png", "--dpi", "30"]  # drawing dominates a tiny run; PNG only, low dpi
FAST_OUTPUTS = {"result.npz", "summary.csv", "heatmap.png", "profile.png"}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# -- helpers ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path, monkeypatch):
    """Never download, never use a real torch hub cache, never re-raise for debugging."""
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("SHIFTLAB_DEBUG", raising=False)




def invoke(*args):
    """Run the CLI in-process; click >= 8.2 keeps stderr apart in ``result.stderr``."""
    return CliRunner().invoke(main, [str(a) for a in args])


def heatmap_args(images, out, *extra, figures=FAST_FIGURES):
    """Tiny, quiet heatmap run; later options in ``extra`` override FAST (click keeps the last).

    ``figures=()`` keeps the default figure formats (png and pdf) and dpi.
    """
    return ["heatmap", "--model", TINY, "--images", images, *FAST, *figures, "--quiet", "--out", out,
            *extra]


def write_images(folder: Path, count: int = 3, side: int = 40) -> Path:
    """Seeded smooth random RGB PNGs named im0.png, im1.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for index in range(count):
        coarse = rng.random((side // 4, side // 4, 3))
        image = Image.fromarray((coarse * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
        image.save(folder / f"im{index}.png")
    return folder


@pytest.fixture
def images(tmp_path) -> Path:
    return write_images(tmp_path / "images")


def write_module(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_clean_error(result, exit_code: int, *needles: str, out: Path | None = None) -> str:
    """Exit code, exactly one 'error:' line on stderr, no traceback, nothing left in ``out``."""
    everything = result.output + result.stderr
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{everything}"
    assert result.exit_code == exit_code, everything
    assert "Traceback" not in everything
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert result.stdout == ""
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    return lines[0]


def assert_click_usage_error(result, option: str, out: Path | None = None) -> None:
    """click's usage errors are one line (console.Group): the option and where to read more."""
    everything = result.output + result.stderr
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{everything}"
    assert result.exit_code == 2, everything
    assert "Traceback" not in everything
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert option in lines[0] and re.search(r"\(see '\S+ \w+ --help'\)$", lines[0]), lines
    assert result.stdout == ""
    if out is not None:
        assert not out.exists()


def leftover_temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def read_summary(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def tiny_state_dict() -> dict:
    from shiftlab.models.zoo import load_model

    return load_model(TINY, "none").model.state_dict()


# -- version and help ------------------------------------------------------------------------
def test_version_prints_program_name_and_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"shiftlab, version {shiftlab.__version__}"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_main_help_lists_the_three_commands(flag):
    result = invoke(flag)
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    for name in ("heatmap", "layers", "plot"):
        assert re.search(rf"^\s+{name}\s+\S", commands, re.M), name
    assert "--version" in result.output


def _shown_default(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def _has_default(option: click.Option) -> bool:
    default = option.default  # None, () or click's UNSET sentinel when there is none
    return (not option.is_flag and not option.required and isinstance(default, (str, int, float, tuple))
            and default != ())


@pytest.mark.parametrize("command", sorted(main.commands))
def test_command_help_documents_every_option_and_its_default(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # undo click's line wrapping
    options = [p for p in main.commands[command].params
               if isinstance(p, click.Option) and p.name != "help"]
    assert options
    for option in options:
        for name in option.opts + option.secondary_opts:
            assert name in text, name
        assert option.help and option.help.split()[0] in text, f"{option.name} has no help"
        if option.required:
            assert option.name and "[required]" in text
        if not _has_default(option):
            continue
        assert option.show_default, f"{option.opts[0]} has a default that --help does not show"
        assert f"[default: {_shown_default(option.default)}" in text, option.opts[0]


def test_heatmap_help_documents_the_implied_defaults():
    text = " ".join(invoke("heatmap", "--help").output.split())
    assert "Default: the sample photographs" in text  # --images
    assert "Default: round(size / 0.875)" in text  # --resize
    assert "Default: runs/<model>-<timestamp>" in text  # --out
    assert "Default: every leaf module" in text  # --layers
    plot_text = " ".join(invoke("plot", "--help").output.split())
    assert "Default: the result file's folder" in plot_text


# -- heatmap: happy paths --------------------------------------------------------------------
def test_heatmap_writes_every_output_lists_it_and_reports_the_worst_layer(images, tmp_path):
    out = tmp_path / "out"
    args = heatmap_args(images, out, figures=())
    args.remove("--quiet")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert leftover_temp_files(out) == []
    assert sorted(Path(line).name for line in result.stdout.splitlines()) == sorted(OUTPUTS)
    assert all(Path(line).parent == out for line in result.stdout.splitlines())
    for name in OUTPUTS - {"summary.csv"}:
        assert (out / name).stat().st_size > 1000, name
    assert "Traceback" not in result.output and "error" not in result.stderr

    loaded = shiftlab.load(out / "result.npz")
    assert loaded.layer_names == TINY_LAYERS
    assert loaded.settings.mode == "circular" and loaded.settings.align == "bilinear"
    assert loaded.settings.metric == "cosine" and loaded.settings.size == (16, 16)
    assert loaded.grid.kind == "square" and len(loaded.grid) == 4
    assert loaded.meta["model"] == TINY_NAME and loaded.meta["weights"] == "from factory"
    assert loaded.meta["pretrained"] is False
    assert loaded.meta["images"] == ["im0.png", "im1.png"] and loaded.meta["n_images"] == 2
    assert loaded.meta["device"] == "cpu"

    rows = read_summary(out)
    assert [row["layer"] for row in rows] == loaded.layer_names
    assert {row["layer"]: row["kind"] for row in rows}["3"] == "spatial"
    assert float({row["layer"]: row["stride"] for row in rows}["3"]) == 4.0
    spatial = [row for row in rows if row["kind"] == "spatial"]
    worst = max(spatial, key=lambda row: float(row["mean"]))
    assert f"{TINY_NAME} (from factory): 2 images at 16 px, 4 shifts" in result.stderr
    assert f"least equivariant spatial layer: {worst['layer']} (stride" in result.stderr


ZERO_PADDING_HINT = "warning: this model pads with zeros"


def test_heatmap_quiet_prints_only_the_zero_padding_hint(images, tmp_path):
    result = invoke(*heatmap_args(images, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    lines = error_lines(result)  # the tiny classifier pads with zeros and is shifted circularly
    assert len(lines) == 1 and lines[0].startswith(ZERO_PADDING_HINT), lines
    assert "--padding circular" in lines[0]
    assert {p.name for p in (tmp_path / "out").iterdir()} == FAST_OUTPUTS


def test_heatmap_quiet_with_circular_padding_prints_nothing(images, tmp_path):
    result = invoke(*heatmap_args(images, tmp_path / "out", "--padding", "circular"))
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and result.stderr == ""


def _layer(rows, name):
    return next(row for row in rows if row["layer"] == name)


def _check_crop_symmetric(result, rows):
    assert result.settings.mode == "crop" and result.grid.kind == "symmetric"
    assert result.settings.margin == 2 and result.settings.size == (32, 32)
    assert len(result.grid) == 25 and result.grid.max_abs == 2
    assert (-2.0, -2.0) in result.grid.shifts


def _check_exact(result, rows):
    assert result.settings.align == "exact"
    # stride 4 divides only the zero shift of 0..1 x 0..1, which is never counted: no measured
    # shift; stride 1 divides all four, three of them measured
    assert int(_layer(rows, "3")["defined_shifts"]) == 0 and _layer(rows, "3")["mean"] in ("", "nan")
    assert int(_layer(rows, "0")["defined_shifts"]) == 3
    assert np.isnan(result.values("3")[1:]).all()


def _check_fourier(result, rows):
    assert result.settings.align == "fourier"


def _check_l2(result, rows):
    assert result.settings.metric == "l2"
    assert result.values("0")[0] == 0.0


def _check_psnr(result, rows):
    assert result.settings.metric == "psnr"
    assert result.values("0")[0] == math.inf  # the zero shift is exact: +inf dB
    assert np.isfinite(result.values("3")[1:]).all()


def _check_subpixel(result, rows):
    assert len(result.grid) == 16 and (0.5, 1.5) in result.grid.shifts
    assert not result.grid.is_integer


def _check_diagonal(result, rows):
    assert result.grid.kind == "diagonal"
    assert result.grid.shifts == ((0.0, 0.0), (1.0, 1.0), (2.0, 2.0))


def _check_diagonal_subpixel(result, rows):
    assert result.grid.kind == "diagonal"  # t in 0..K-1/p, like the square grid's axes
    assert result.grid.shifts == ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0), (1.5, 1.5))


def _check_layer_filter(result, rows):
    assert result.layer_names == ["0", "3"] and result.settings.layers == ("0", "3")
    assert [row["layer"] for row in rows] == ["0", "3"]


def _check_border(result, rows):
    assert result.settings.mode == "crop" and result.settings.border == 3
    # zero-padded conv without striding is exactly equivariant away from the border
    assert float(_layer(rows, "0")["max"]) <= 1e-6


@pytest.mark.parametrize("extra, check", [
    (["--mode", "crop", "--grid", "symmetric", "--size", "32"], _check_crop_symmetric),
    (["--align", "exact"], _check_exact),
    (["--align", "fourier"], _check_fourier),
    (["--metric", "l2"], _check_l2),
    (["--metric", "psnr"], _check_psnr),
    (["--subpixel", "2"], _check_subpixel),
    (["--grid", "diagonal", "--max-shift", "3"], _check_diagonal),
    (["--grid", "diagonal", "--subpixel", "2"], _check_diagonal_subpixel),
    (["--layers", "0", "-l", "3"], _check_layer_filter),
    (["--mode", "crop", "--border", "3"], _check_border),
], ids=["crop-symmetric", "exact", "fourier", "l2", "psnr", "subpixel", "diagonal",
        "diagonal-subpixel", "layers", "border"])
def test_heatmap_settings_in_result_reflect_the_options(images, tmp_path, extra, check):
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, *extra))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == FAST_OUTPUTS
    loaded = shiftlab.load(out / "result.npz")
    rows = read_summary(out)
    assert len(rows) == len(loaded.layers)
    check(loaded, rows)


def test_heatmap_batch_size_does_not_change_the_numbers(images, tmp_path):
    results = []
    for batch in ("1", "64"):
        out = tmp_path / f"b{batch}"
        assert invoke(*heatmap_args(images, out, "--batch-size", batch)).exit_code == 0
        results.append(shiftlab.load(out / "result.npz"))
    np.testing.assert_allclose(results[0].mean, results[1].mean, atol=1e-5)


@pytest.mark.parametrize("formats, expected", [
    (["--format", "svg"], {"heatmap.svg", "profile.svg"}),
    (["--format", "png", "--format", "svg"], {"heatmap.png", "heatmap.svg", "profile.png", "profile.svg"}),
])
def test_heatmap_format_option_chooses_the_figure_files(images, tmp_path, formats, expected):
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, *formats, figures=["--dpi", "30"]))
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == expected | {"result.npz", "summary.csv"}
    if "svg" in formats:
        assert (out / "heatmap.svg").read_text().lstrip().startswith("<?xml")


@pytest.fixture
def figure_spy(monkeypatch):
    """Record the scale each figure is drawn with and the formats/dpi it is saved with."""
    from shiftlab.figures import plots

    calls = {"scale": [], "save": []}
    real_grid, real_profile, real_save = plots.layer_grid, plots.layer_profile, plots.save_figure

    def grid(result, **kwargs):
        calls["scale"].append(("heatmap", kwargs.get("scale")))
        return real_grid(result, **kwargs)

    def profile(result, **kwargs):
        calls["scale"].append(("profile", kwargs.get("scale")))
        return real_profile(result, **kwargs)

    def save(figure, stem, formats=("png", "pdf"), dpi=150):
        calls["save"].append((Path(stem).name, tuple(formats), dpi))
        return real_save(figure, stem, formats=formats, dpi=dpi)

    monkeypatch.setattr(plots, "layer_grid", grid)
    monkeypatch.setattr(plots, "layer_profile", profile)
    monkeypatch.setattr(plots, "save_figure", save)
    return calls


@pytest.mark.parametrize("flag", ["--scale", "--metric-scale"])
def test_heatmap_scale_reaches_both_figures(images, tmp_path, figure_spy, flag):
    result = invoke(*heatmap_args(images, tmp_path / "out", flag, "log"))
    assert result.exit_code == 0, result.output
    assert figure_spy["scale"] == [("heatmap", "log"), ("profile", "log")]


def test_heatmap_default_scale_and_dpi_reach_the_figure_writers(images, tmp_path, figure_spy):
    result = invoke(*heatmap_args(images, tmp_path / "out", figures=()))
    assert result.exit_code == 0, result.output
    assert figure_spy["scale"] == [("heatmap", "linear"), ("profile", "linear")]
    assert figure_spy["save"] == [("heatmap", ("png", "pdf"), 150), ("profile", ("png", "pdf"), 150)]
    result = invoke(*heatmap_args(images, tmp_path / "dpi", "--dpi", "40"))
    assert result.exit_code == 0, result.output
    assert figure_spy["save"][2:] == [("heatmap", ("png",), 40), ("profile", ("png",), 40)]


def test_heatmap_images_as_files_keep_the_given_order(images, tmp_path):
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images / "im2.png", out, "--images", images / "im0.png",
                                  "--max-images", "5"))
    assert result.exit_code == 0, result.output
    loaded = shiftlab.load(out / "result.npz")
    assert loaded.meta["images"] == ["im2.png", "im0.png"] and loaded.meta["n_images"] == 2


def test_heatmap_max_images_takes_the_first_sorted_images_of_a_folder(images, tmp_path):
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, "--max-images", "1"))
    assert result.exit_code == 0, result.output
    assert shiftlab.load(out / "result.npz").meta["images"] == ["im0.png"]


def test_heatmap_without_max_images_uses_the_whole_folder(images, tmp_path):
    out = tmp_path / "out"
    args = heatmap_args(images, out)
    index = args.index("--max-images")
    del args[index:index + 2]
    assert invoke(*args).exit_code == 0
    assert shiftlab.load(out / "result.npz").meta["images"] == ["im0.png", "im1.png", "im2.png"]


def test_heatmap_default_images_are_the_shipped_samples(tmp_path):
    out = tmp_path / "out"
    result = invoke("heatmap", "--model", TINY, *FAST, "--max-images", "1", "-q", "--out", out)
    assert result.exit_code == 0, result.output
    from shiftlab.data.images import sample_image_paths

    assert shiftlab.load(out / "result.npz").meta["images"] == [sample_image_paths()[0].name]


def test_heatmap_default_out_is_runs_model_timestamp_under_the_cwd(images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = heatmap_args(images, "unused")[:-2]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert re.fullmatch(r"conftest_tiny_classifier-\d{8}-\d{6}", runs[0].name), runs[0].name
    assert {p.name for p in runs[0].iterdir()} == FAST_OUTPUTS


def test_heatmap_loads_a_checkpoint_and_records_it_in_meta(images, tmp_path):
    state = tiny_state_dict()
    state["7.weight"].zero_()
    state["7.bias"].zero_()  # all-zero logits: the logits layer is exactly invariant (cosine 0)
    checkpoint = tmp_path / "zero_head.pth"
    torch.save(state, checkpoint)
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, "--weights", checkpoint))
    assert result.exit_code == 0, result.output
    loaded = shiftlab.load(out / "result.npz")
    assert loaded.meta["weights"] == str(checkpoint) and loaded.meta["pretrained"] is True
    assert float(_layer(read_summary(out), "7")["max"]) == 0.0

    baseline = tmp_path / "baseline"
    assert invoke(*heatmap_args(images, baseline)).exit_code == 0
    assert float(_layer(read_summary(baseline), "7")["max"]) > 1e-7


def test_heatmap_ctrl_c_exits_130_and_keeps_the_previous_result(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke(*heatmap_args(images, out)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", interrupted)
    result = invoke(*heatmap_args(images, out, "--metric", "l2", "--overwrite"))
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_heatmap_ctrl_c_while_drawing_keeps_the_previous_result(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert invoke(*heatmap_args(images, out)).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("result.npz", "summary.csv")}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("shiftlab.figures.plots.layer_grid", interrupted)
    result = invoke(*heatmap_args(images, out, "--metric", "l2", "--overwrite"))
    assert result.exit_code == 130
    assert "the output folder was not changed" in result.stderr
    # the progress file stays, so that --resume need not measure again; no staging folder
    assert leftover_temp_files(out) == [".shiftlab-progress.npz"]
    assert {name: (out / name).read_bytes() for name in before} == before


def test_heatmap_unexpected_exception_is_one_line_with_a_debug_hint(images, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", broken)
    out = tmp_path / "out"
    line = assert_clean_error(invoke(*heatmap_args(images, out)), 1, "RuntimeError: boom",
                              "SHIFTLAB_DEBUG=1", out=out)
    assert line.count("error:") == 1
    assert "second line" not in line  # third-party text: its first line (errors.one_line)

    monkeypatch.setenv("SHIFTLAB_DEBUG", "1")
    result = invoke(*heatmap_args(images, out))
    assert isinstance(result.exception, RuntimeError)  # re-raised for a traceback


@pytest.mark.parametrize("error, exit_code", [("UsageError", 2), ("ModelError", 1), ("ImageError", 1)])
def test_shiftlab_errors_become_one_line_with_their_exit_code(images, tmp_path, monkeypatch, error,
                                                              exit_code):
    from shiftlab import errors

    def failing(*args, **kwargs):
        raise getattr(errors, error)("first line\n  second line; pass --fix")

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", failing)
    out = tmp_path / "out"
    line = assert_clean_error(invoke(*heatmap_args(images, out)), exit_code, out=out)
    assert line == "error: first line second line; pass --fix"


def test_heatmap_memory_error_suggests_a_smaller_batch(images, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", exhausted)
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out)), 1, "out of memory", "--batch-size", out=out)


def test_heatmap_cuda_out_of_memory_suggests_a_smaller_batch(images, tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", exhausted)
    out = tmp_path / "out"
    line = assert_clean_error(invoke(*heatmap_args(images, out)), 1, "--batch-size", out=out)
    assert "please report" not in line


def test_heatmap_failed_figure_write_keeps_the_numbers_and_names_plot(images, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "out"
    line = assert_clean_error(invoke(*heatmap_args(images, out)), 1, "drawing the figures failed",
                              "No space left on device", "result.npz", "shiftlab plot")
    assert leftover_temp_files(out) == []  # no staging folder, no progress file
    assert {p.name for p in out.iterdir()} == {"result.npz", "summary.csv"}
    assert shiftlab.load(out / "result.npz").layer_names == TINY_LAYERS
    monkeypatch.undo()  # the redraw the message names works
    monkeypatch.setenv("MPLBACKEND", "Agg")
    redraw = re.search(r"'(shiftlab plot [^']+)'", line).group(1).split()[2:]
    assert invoke("plot", *redraw, "--format", "png", "--dpi", "30").exit_code == 0
    assert {p.name for p in out.iterdir()} == FAST_OUTPUTS


def test_heatmap_outputs_follow_the_umask(images, tmp_path):
    previous = os.umask(0o022)
    try:
        result = invoke(*heatmap_args(images, tmp_path / "out"))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()}
    assert modes == {name: oct(0o644) for name in FAST_OUTPUTS}


def test_heatmap_psnr_summary_mean_is_finite_where_the_layer_is_not_exact(images, tmp_path):
    out = tmp_path / "out"
    assert invoke(*heatmap_args(images, out, "--metric", "psnr")).exit_code == 0
    rows = read_summary(out)
    assert any(math.isfinite(float(row["max"])) for row in rows)
    for row in rows:
        if math.isfinite(float(row["max"])):
            assert math.isfinite(float(row["mean"])), row


def test_heatmap_psnr_report_names_the_layer_with_the_lowest_psnr(images, tmp_path):
    out = tmp_path / "out"
    args = heatmap_args(images, out, "--metric", "psnr")
    args.remove("--quiet")
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    loaded = shiftlab.load(out / "result.npz")
    finite_means = {}
    for info in loaded.layers:
        if info.is_spatial:
            values = loaded.values(info.name)
            finite_means[info.name] = values[np.isfinite(values)].mean()
    worst = min(finite_means, key=finite_means.get)
    assert f"least equivariant spatial layer: {worst} (stride" in result.stderr


# -- torchvision models by name --------------------------------------------------------------
TORCHVISION_FAST = ["--size", "32", "--max-shift", "2", "--max-images", "1", "--batch-size", "8",
                    "--device", "cpu", *FAST_FIGURES]


def _torchvision_run(images, out, *extra):
    return invoke("heatmap", "--model", "squeezenet1_1", "--images", images, *TORCHVISION_FAST,
                  "--quiet", "--out", out, *extra)


def test_the_random_weights_warning_is_shown_once_under_padding_both(images, tmp_path):
    result = _torchvision_run(images, tmp_path / "both", "--padding", "both")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert len(warnings) == 1, result.stderr  # the model is built twice, the warning shown once


def test_torchvision_model_with_weights_none_and_auto_offline(images, tmp_path):
    none_out, auto_out, seed_out = tmp_path / "none", tmp_path / "auto", tmp_path / "seed1"
    result = _torchvision_run(images, none_out, "--weights", "none")
    assert result.exit_code == 0, result.output
    assert [line[:35] for line in error_lines(result)] == [ZERO_PADDING_HINT]  # squeezenet pads
    loaded = shiftlab.load(none_out / "result.npz")
    assert loaded.provenance.model == "squeezenet1_1"
    assert loaded.provenance.weights == "random init" and loaded.provenance.pretrained is False
    assert "features.0" in loaded.layer_names and loaded.settings.size == (32, 32)

    result = _torchvision_run(images, auto_out)  # --weights auto is the default
    assert result.exit_code == 0, result.output
    lines = [line for line in error_lines(result) if not line.startswith(ZERO_PADDING_HINT)]
    assert len(lines) == 1 and lines[0].startswith("warning: squeezenet1_1 has random weights"), lines
    # in the command line's words, and short
    assert "--weights none" in lines[0] and "weights='none'" not in lines[0]
    assert len(lines[0].replace(str(tmp_path), "")) < 250
    auto = shiftlab.load(auto_out / "result.npz")
    assert auto.provenance.weights == "random init" and auto.provenance.pretrained is False
    # --seed (default 0) fixes the random init: auto fell back to the same weights as none
    np.testing.assert_array_equal(auto.mean, loaded.mean)

    result = _torchvision_run(images, seed_out, "--weights", "none", "--seed", "1",
                              "--layers", "features.0")
    assert result.exit_code == 0, result.output
    other = shiftlab.load(seed_out / "result.npz")
    assert other.layer_names == ["features.0"]
    assert not np.allclose(other.values("features.0")[1:], loaded.values("features.0")[1:])


def test_torchvision_weights_name_offline_is_a_runtime_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_torchvision_run(images, out, "--weights", "IMAGENET1K_V1"), 1,
                       "SHIFTLAB_OFFLINE", "download", out=out)


def test_torchvision_unknown_weights_name_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_torchvision_run(images, out, "--weights", "IMAGENET9K"), 2,
                       "unknown weights 'IMAGENET9K'", "IMAGENET1K_V1", out=out)


def test_torchvision_model_below_its_minimum_size_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_torchvision_run(images, out, "--weights", "none", "--size", "16"), 2,
                       "at least 17 px", "--size 17", out=out)


@pytest.fixture
def ten_class_squeezenet(tmp_path) -> Path:
    import torchvision

    path = tmp_path / "squeezenet_10.pth"
    torch.save(torchvision.models.squeezenet1_1(num_classes=10).state_dict(), path)
    return path


def test_checkpoint_with_other_classes_lists_the_shape_mismatch(images, tmp_path, ten_class_squeezenet):
    out = tmp_path / "out"
    assert_clean_error(_torchvision_run(images, out, "--weights", ten_class_squeezenet), 1,
                       "does not fit squeezenet1_1", "classifier.1.weight", "10 classes", out=out)


def test_checkpoint_with_other_classes_fix_named_in_the_message_works(images, tmp_path,
                                                                     ten_class_squeezenet):
    line = error_lines(_torchvision_run(images, tmp_path / "a", "--weights", ten_class_squeezenet))[0]
    assert "--num-classes" in line
    result = _torchvision_run(images, tmp_path / "b", "--weights", ten_class_squeezenet,
                              "--num-classes", "10")
    assert result.exit_code == 0, result.output


# -- layers ----------------------------------------------------------------------------------
def _layer_rows(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    assert lines[0].split() == ["#", "layer", "module", "kind", "layout", "stride", "shape"]
    rows = [line.split() for line in lines[1:]]
    assert [int(row[0]) for row in rows] == list(range(len(rows)))
    return {row[1]: row[2:] for row in rows}


def test_layers_prints_one_row_per_layer_with_stride_and_shape():
    result = invoke("layers", "--model", TINY, "--size", "16")
    assert result.exit_code == 0, result.output
    rows = _layer_rows(result.stdout)
    assert list(rows) == TINY_LAYERS
    assert {name: row[3] for name, row in rows.items()} == TINY_STRIDES
    assert rows["0"] == ["Conv2d", "spatial", "nchw", "1", "8x16x16"]
    assert rows["3"] == ["Conv2d", "spatial", "nchw", "4", "8x4x4"]
    assert rows["7"] == ["Linear", "global", "-", "-", "10"]
    assert result.stderr.strip() == f"8 layers of {TINY_NAME} at 16 px (from factory)"


def test_layers_size_changes_the_shapes_not_the_strides():
    rows = _layer_rows(invoke("layers", "--model", TINY, "--size", "32").stdout)
    assert rows["3"][3:] == ["4", "8x8x8"]


def test_layers_filter_is_repeatable():
    result = invoke("layers", "--model", TINY, "--size", "16", "--layers", "0", "-l", "3")
    assert result.exit_code == 0, result.output
    assert list(_layer_rows(result.stdout)) == ["0", "3"]
    assert result.stderr.startswith("2 layers of")


def test_layers_filter_glob_matches_by_name():
    result = invoke("layers", "--model", TINY, "--size", "16", "--layers", "[5-7]")
    assert list(_layer_rows(result.stdout)) == ["5", "6", "7"]


def test_layers_of_a_torchvision_model_with_weights_none():
    result = invoke("layers", "--model", "squeezenet1_1", "--weights", "none", "--size", "32",
                    "--layers", "features.[0-2]")
    assert result.exit_code == 0, result.output
    rows = _layer_rows(result.stdout)
    assert list(rows) == ["features.0", "features.1", "features.2"]
    assert rows["features.0"][3] == "2" and rows["features.2"][3] == "4"
    assert "(random init)" in result.stderr


def test_layers_unknown_model_is_a_usage_error():
    assert_clean_error(invoke("layers", "--model", "resnet19"), 2, "unknown model", "resnet18")


def test_layers_filter_matching_nothing_is_a_usage_error():
    assert_clean_error(invoke("layers", "--model", TINY, "--size", "16", "--layers", "nomatch"), 2,
                       "matches no module")


@NO_CUDA
def test_layers_device_cuda_without_cuda_is_a_usage_error():
    assert_clean_error(invoke("layers", "--model", TINY, "--size", "16", "--device", "cuda"), 2,
                       "no CUDA")


def test_layers_ctrl_c_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("shiftlab.equivariance.geometry.probe_layers", interrupted)
    result = invoke("layers", "--model", TINY, "--size", "16")
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert "Traceback" not in result.output


ARGMAX_MODEL = """
    from torch import nn

    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(1)  # an integer tensor: not a measurable layer

    def factory():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Argmax())
    """


def test_layers_with_no_measurable_layer_is_a_usage_error(tmp_path):
    model = write_module(tmp_path, "argmax_model", ARGMAX_MODEL)
    assert_clean_error(invoke("layers", "--model", f"{model}:factory", "--size", "16",
                              "--layers", "1"), 2)


def test_heatmap_with_no_measurable_layer_is_a_usage_error(images, tmp_path):
    model = write_module(tmp_path, "argmax_model", ARGMAX_MODEL)
    out = tmp_path / "out"
    args = heatmap_args(images, out, "--layers", "1")
    args[args.index(TINY)] = f"{model}:factory"
    assert_clean_error(invoke(*args), 2, "no layer produced a tensor", out=out)


# -- plot ------------------------------------------------------------------------------------
@pytest.fixture
def saved_result(images, tmp_path) -> Path:
    out = tmp_path / "run"
    assert invoke(*heatmap_args(images, out)).exit_code == 0
    return out / "result.npz"


def _forbid_measuring(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("plot must not measure or load a model")

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", forbidden)
    monkeypatch.setattr("shiftlab.models.zoo.load_model", forbidden)
    monkeypatch.setattr("shiftlab.equivariance.geometry.probe_layers", forbidden)


@pytest.mark.parametrize("scale_flag", ["--scale", "--metric-scale"])
def test_plot_redraws_into_another_folder_without_recomputing(saved_result, tmp_path, monkeypatch,
                                                              figure_spy, scale_flag):
    _forbid_measuring(monkeypatch)
    other = tmp_path / "other"
    result = invoke("plot", saved_result, "--out", other, scale_flag, "log", "--format", "png")
    assert result.exit_code == 0, result.output
    assert {p.name for p in other.iterdir()} == {"heatmap.png", "profile.png"}
    assert [Path(line) for line in result.stdout.splitlines()] == [other / "heatmap.png",
                                                                  other / "profile.png"]
    assert figure_spy["scale"] == [("heatmap", "log"), ("profile", "log")]
    assert result.stderr == ""


def test_plot_defaults_to_the_result_folder_and_png_pdf(saved_result, monkeypatch):
    _forbid_measuring(monkeypatch)
    folder = saved_result.parent
    for figure in list(folder.glob("heatmap.*")) + list(folder.glob("profile.*")):
        figure.unlink()
    before = saved_result.read_bytes()
    result = invoke("plot", saved_result, "--format", "svg", "--format", "pdf")
    assert result.exit_code == 0, result.output
    assert {p.name for p in folder.iterdir()} == {"result.npz", "summary.csv", "heatmap.svg",
                                                  "heatmap.pdf", "profile.svg", "profile.pdf"}
    assert saved_result.read_bytes() == before
    assert leftover_temp_files(folder) == []


def test_plot_of_a_layer_selection_writes_beside_the_full_figures(saved_result, monkeypatch):
    _forbid_measuring(monkeypatch)
    folder = saved_result.parent
    full = (folder / "heatmap.png").read_bytes()
    result = invoke("plot", saved_result, "--layers", "2", *FAST_FIGURES)
    assert result.exit_code == 0, result.output
    assert (folder / "heatmap.png").read_bytes() == full  # the full figure is kept
    assert (folder / "heatmap-selected.png").is_file() and (folder / "profile-selected.png").is_file()
    # asked to replace: the selection takes the full figures' names, the -selected ones stay
    result = invoke("plot", saved_result, "--layers", "2", "--replace", *FAST_FIGURES)
    assert result.exit_code == 0, result.output
    assert (folder / "heatmap.png").read_bytes() != full
    assert (folder / "heatmap-selected.png").is_file()


def test_plot_replace_without_layers_is_a_usage_error(saved_result):
    result = invoke("plot", saved_result, "--replace")
    assert result.exit_code == 2 and "--replace needs --layers" in result.stderr


def test_plot_missing_file_is_a_runtime_error(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke("plot", tmp_path / "missing.npz", "--out", out), 1,
                       "no result file", out=out)


@pytest.mark.parametrize("content", [b"not a zip archive", None], ids=["text", "png"])
def test_plot_non_npz_file_is_a_runtime_error(tmp_path, content):
    path = tmp_path / "fake.npz"
    if content is None:
        Image.new("RGB", (16, 16)).save(path, format="PNG")
    else:
        path.write_bytes(content)
    out = tmp_path / "out"
    assert_clean_error(invoke("plot", path, "--out", out), 1, "is not a shiftlab result file", out=out)


def test_plot_npz_without_a_header_is_a_runtime_error(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, mean=np.zeros(3))
    assert_clean_error(invoke("plot", path), 1, "is not a shiftlab result file")
    assert [p.name for p in tmp_path.iterdir()] == ["other.npz"]


def test_plot_on_a_folder_is_a_click_usage_error(tmp_path):
    assert_click_usage_error(invoke("plot", tmp_path), "RESULT_FILE")


def test_plot_out_pointing_at_a_file_is_a_usage_error(saved_result, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert_click_usage_error(invoke("plot", saved_result, "--out", target), "--out")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("option", [["--scale", "sqrt"], ["--format", "jpg"], ["--dpi", "10"]])
def test_plot_invalid_option_values_are_click_usage_errors(saved_result, tmp_path, option):
    out = tmp_path / "out"
    assert_click_usage_error(invoke("plot", saved_result, "--out", out, *option), option[0], out=out)


# -- heatmap: error paths --------------------------------------------------------------------
def test_unknown_model_name_suggests_close_names(images, tmp_path):
    out = tmp_path / "out"
    args = heatmap_args(images, out)
    args[args.index(TINY)] = "resnet19"
    assert_clean_error(invoke(*args), 2, "unknown model 'resnet19'", "did you mean", "resnet18",
                       out=out)


def _with_model(images, out, spec, *extra):
    args = heatmap_args(images, out, *extra)
    args[args.index(TINY)] = spec
    return invoke(*args)


def test_model_file_with_a_syntax_error_is_a_runtime_error(images, tmp_path):
    model = write_module(tmp_path, "broken_syntax", "def factory(:\n    pass\n")
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{model}:factory"), 1, "importing", "SyntaxError",
                       out=out)


def test_model_module_that_does_not_import_is_a_runtime_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, "no_such_package_xyz.models:factory"), 1,
                       "cannot import module 'no_such_package_xyz.models'", out=out)


def test_model_file_that_does_not_exist_is_a_runtime_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{tmp_path / 'missing.py'}:factory"), 1,
                       "does not exist", out=out)


FACTORIES = """
    from torch import nn

    def raises():
        raise ValueError("depth must be even")

    def not_a_model():
        return 42

    def four_pools():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2),
                             nn.MaxPool2d(2), nn.MaxPool2d(2), nn.Flatten())
    """


@pytest.fixture
def factories(tmp_path) -> Path:
    return write_module(tmp_path, "user_factories", FACTORIES)


def test_factory_that_raises_is_a_runtime_error(images, tmp_path, factories):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{factories}:raises"), 1,
                       "raised ValueError: depth must be even", out=out)


def test_factory_that_returns_no_module_is_a_runtime_error(images, tmp_path, factories):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{factories}:not_a_model"), 1,
                       "returned int", "nn.Module", out=out)


def test_factory_name_missing_from_the_file_suggests_one(images, tmp_path, factories):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{factories}:four_pool"), 1,
                       "no attribute 'four_pool'", "four_pools", out=out)


def test_size_too_small_for_the_model_is_an_error_and_a_larger_size_works(images, tmp_path,
                                                                         factories):
    out = tmp_path / "out"
    assert_clean_error(_with_model(images, out, f"{factories}:four_pools", "--size", "8"), 1,
                       "cannot take a 3x8x8 input", "--size", out=out)
    assert _with_model(images, out, f"{factories}:four_pools", "--size", "16").exit_code == 0


def test_weights_file_missing_is_a_runtime_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--weights", tmp_path / "missing.pth")), 1,
                       "does not exist", out=out)


def test_weights_not_a_file_for_a_factory_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--weights", "IMAGENET1K_V1")), 2,
                       "is not a file", out=out)


def test_weights_file_truncated_is_a_runtime_error(images, tmp_path):
    path = tmp_path / "truncated.pth"
    torch.save(tiny_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--weights", path)), 1,
                       "not a readable PyTorch checkpoint", "truncated", out=out)


class _OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)


def test_weights_for_another_architecture_list_the_mismatched_keys(images, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(_OtherNet().state_dict(), path)
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--weights", path)), 1,
                       f"does not fit {TINY_NAME}", "6 missing keys", "0.weight",
                       "2 unexpected keys", "fc.weight", out=out)


PAYLOAD = """
    UNPICKLED = []

    class Note:
        '''Harmless, but it runs code when unpickled: what weights_only=True must refuse.'''

        def __init__(self, text):
            self.text = text

        def __setstate__(self, state):
            self.__dict__.update(state)
            UNPICKLED.append(self.text)
    """


def test_pickled_code_checkpoint_needs_trust_checkpoint(images, tmp_path, monkeypatch):
    name = "shiftlab_cli_test_payload"
    write_module(tmp_path, name, PAYLOAD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    payload = importlib.import_module(name)
    try:
        path = tmp_path / "with_code.pth"
        torch.save({"state_dict": tiny_state_dict(), "note": payload.Note("hello")}, path)

        out = tmp_path / "refused"
        assert_clean_error(invoke(*heatmap_args(images, out, "--weights", path)), 1,
                           "refused", f"{name}.Note", "--trust-checkpoint", out=out)
        assert payload.UNPICKLED == []  # nothing ran

        out = tmp_path / "trusted"
        result = invoke(*heatmap_args(images, out, "--weights", path, "--trust-checkpoint"))
        assert result.exit_code == 0, result.output
        assert payload.UNPICKLED == ["hello"]
        loaded = shiftlab.load(out / "result.npz")
        assert loaded.meta["weights"] == str(path) and loaded.meta["pretrained"] is True
    finally:
        sys.modules.pop(name, None)


def test_missing_image_folder_is_a_runtime_error(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(tmp_path / "nowhere", out)), 1, "does not exist", out=out)


def test_unreadable_image_folder_is_a_runtime_error(images, tmp_path):
    images.chmod(0o000)
    try:
        if os.access(images, os.R_OK):
            pytest.skip("running as a user who can read any folder (root)")
        out = tmp_path / "out"
        assert_clean_error(invoke(*heatmap_args(images, out)), 1, str(images), out=out)
    finally:
        images.chmod(0o755)


def test_empty_image_folder_is_a_runtime_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(empty, out)), 1, "no .png/.jpg/.jpeg files", out=out)


def test_non_image_file_is_a_runtime_error(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(notes, out)), 1, "is not an image file", out=out)


def test_folder_with_only_a_corrupt_image_is_a_runtime_error(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(folder, out)), 1, "no image could be loaded",
                       "broken.png", out=out)


def test_corrupt_image_next_to_good_ones_is_skipped_with_a_warning(images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, "--max-images", "5"))
    assert result.exit_code == 0, result.output
    lines = [line for line in error_lines(result) if not line.startswith(ZERO_PADDING_HINT)]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped") and "broken.png" in lines[0]
    assert shiftlab.load(out / "result.npz").meta["images"] == ["im0.png", "im1.png", "im2.png"]


def test_max_shift_too_large_for_the_given_resize_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--mode", "crop", "--max-shift", "50",
                                            "--size", "32", "--resize", "36")), 2,
                       "--max-shift 50", "--resize 130", out=out)


def test_crop_mode_default_resize_grows_to_fit_the_margin(images, tmp_path):
    out = tmp_path / "out"
    result = invoke(*heatmap_args(images, out, "--mode", "crop", "--grid", "symmetric",
                                  "--max-shift", "3", "--size", "16"))
    assert result.exit_code == 0, result.output
    loaded = shiftlab.load(out / "result.npz")
    assert loaded.settings.margin == 3 and loaded.provenance.resize == 22  # 16 + 2 x 3


def test_crop_margin_error_names_a_resize_that_works(images, tmp_path):
    out = tmp_path / "out"
    extra = ["--mode", "crop", "--grid", "symmetric", "--max-shift", "3", "--size", "32"]
    line = assert_clean_error(invoke(*heatmap_args(images, out, *extra, "--resize", "36")), 2,
                              "--resize", out=out)
    resize = re.search(r"--resize (\d+)", line).group(1)
    result = invoke(*heatmap_args(images, out, *extra, "--resize", resize))
    assert result.exit_code == 0, result.output
    assert shiftlab.load(out / "result.npz").settings.margin == 3


def test_resize_smaller_than_the_crop_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--resize", "10")), 2, "resize=10", out=out)


def test_layer_filter_matching_nothing_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--layers", "features.*")), 2,
                       "matches no module", out=out)


@NO_CUDA
def test_device_cuda_without_cuda_is_a_one_line_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--device", "cuda")), 2, "no CUDA",
                       "--device cpu", out=out)


@NO_CUDA
def test_device_cuda_without_cuda_is_one_line_without_quiet(images, tmp_path):
    out = tmp_path / "out"
    args = heatmap_args(images, out, "--device", "cuda")
    args.remove("--quiet")
    assert_clean_error(invoke(*args), 2, "no CUDA", out=out)


def test_unknown_device_is_a_usage_error(images, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(*heatmap_args(images, out, "--device", "tpu")), 2,
                       "unknown device 'tpu'", out=out)


@pytest.mark.parametrize("option", [
    ["--metric", "foo"], ["--size", "0"], ["--size", "7"], ["--max-shift", "0"], ["--grid", "hex"],
    ["--mode", "reflect"], ["--align", "nearest"], ["--subpixel", "0"], ["--batch-size", "0"],
    ["--max-images", "0"], ["--border", "-1"], ["--resize", "4"], ["--format", "jpg"],
    ["--scale", "sqrt"], ["--dpi", "10"], ["--seed", "x"],
], ids=lambda option: "=".join(option))
def test_invalid_option_values_are_click_usage_errors(images, tmp_path, option):
    out = tmp_path / "out"
    assert_click_usage_error(invoke(*heatmap_args(images, out, *option)), option[0], out=out)


@pytest.mark.parametrize("command", ["heatmap", "layers"])
def test_missing_model_option_is_a_click_usage_error(command):
    assert_click_usage_error(invoke(command), "--model")


def test_out_pointing_at_an_existing_file_is_a_usage_error(images, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    assert_click_usage_error(invoke(*heatmap_args(images, target)), "--out")
    assert target.read_text() == "keep me"


def test_out_below_an_existing_file_is_a_runtime_error(images, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    assert_clean_error(invoke(*heatmap_args(images, blocker / "out")), 1,
                       "cannot create output folder", "--out")
    assert blocker.read_text() == "keep me"


class _NoWriteAccess:
    """``os`` as seen by shiftlab.cli.commands, except that ``folder`` is not writable (even for root)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __getattr__(self, name):
        return getattr(os, name)

    def access(self, path, mode, **kwargs):
        if Path(path).resolve() == self.folder.resolve() and mode & os.W_OK:
            return False
        return os.access(path, mode, **kwargs)


def test_out_folder_without_write_access_is_a_runtime_error(images, tmp_path, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    monkeypatch.setattr("shiftlab.cli.reports.os", _NoWriteAccess(out))
    assert_clean_error(invoke(*heatmap_args(images, out)), 1, "not writable", "--out", out=out)


def test_out_unwritable_folder_is_a_runtime_error(images, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write any folder (root)")
        assert_clean_error(invoke(*heatmap_args(images, out)), 1, "not writable", "--out", out=out)
    finally:
        out.chmod(0o755)


# -- the installed console script, in a subprocess -------------------------------------------
def _launchers() -> list:
    found = shutil.which("shiftlab")
    return [
        pytest.param([sys.executable, "-m", "shiftlab"], id="python-m"),
        pytest.param([found] if found else None, id="console-script",
                     marks=[] if found else [pytest.mark.skip(reason="no shiftlab on PATH")]),
    ]


def _run_script(launcher: list, args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHIFTLAB_OFFLINE="1", MPLBACKEND="Agg", TORCH_HOME=str(cwd / "torch_home"),
               OMP_NUM_THREADS="1")
    env.pop("SHIFTLAB_DEBUG", None)
    return subprocess.run([*launcher, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("launcher", _launchers())
@pytest.mark.parametrize("case", ["unknown-model", "empty-folder", "happy"])
def test_console_script(launcher, case, tmp_path):
    out = tmp_path / "out"
    if case == "unknown-model":
        args, code = ["heatmap", "--model", "resnet19", "--out", out], 2
    elif case == "empty-folder":
        (tmp_path / "empty").mkdir()
        args, code = heatmap_args(tmp_path / "empty", out), 1
    else:
        args, code = heatmap_args(write_images(tmp_path / "images", count=1), out, figures=()), 0
        args.remove("--quiet")
    done = _run_script(launcher, args, tmp_path)
    command = shlex.join([*launcher, *map(str, args)])
    assert done.returncode == code, (command, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    if code:
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
        assert not out.exists()
    else:
        assert not any(line.startswith("error") for line in lines), done.stderr
        assert {p.name for p in out.iterdir()} == OUTPUTS
        assert sorted(Path(line).name for line in done.stdout.splitlines()) == sorted(OUTPUTS)
        assert shiftlab.load(out / "result.npz").meta["images"] == ["im0.png"]
