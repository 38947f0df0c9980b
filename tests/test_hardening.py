"""Issue #13: no silently wrong, mixed or lost results.

Each test names the item of the issue it guards. In-process CLI runs (click's CliRunner) of a
tiny factory model on 16 px images with a 3 x 3 grid; subprocess cases (SIGTERM, an invalid
MPLBACKEND, the NaN consistency exit) live in tests/test_console_script.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from numpy.lib import format as npformat
from PIL import Image
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.cli.commands import main
from shiftlab.results.comparison import Comparison
from shiftlab.errors import SettingsMismatchError, ShiftlabError, UsageError
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.results.result import Result, Settings
from conftest import random_png_folder, make_maxpool

PROGRESS = ".shiftlab-progress.npz"
FACTORY = textwrap.dedent('''
    import os, torch
    from torch import nn

    class Net(nn.Module):
        """A stride-4 classifier. Each forward appends a byte to $COUNT_FILE (when set) and
        the INTERRUPT_AT-th forward raises KeyboardInterrupt; $KERNEL picks the first conv."""
        def __init__(self):
            super().__init__()
            kernel = int(os.environ.get("KERNEL", "3"))
            self.body = nn.Sequential(
                nn.Conv2d(3, 4, kernel, padding=kernel // 2, padding_mode="circular"), nn.ReLU(),
                nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1, stride=2, padding_mode="circular"),
                nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
            self.calls = 0
        def forward(self, x):
            self.calls += 1
            if os.environ.get("COUNT_FILE"):
                with open(os.environ["COUNT_FILE"], "a") as handle:
                    handle.write(".")
            if self.calls == int(os.environ.get("INTERRUPT_AT", "0")):
                raise KeyboardInterrupt
            return self.body(x)

    def build():
        return Net().eval()

    def tex_name():
        """A module whose name is broken TeX: figures must draw it as text."""
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
        model.add_module("$\\\\frac{a$", nn.MaxPool2d(2))
        return model.eval()
''')
# 4 images in batches of 2, 3 x 3 grid: per batch 1 reference + 8 shifted passes
FORWARDS_PER_BATCH = 9


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name in ("SHIFTLAB_DEBUG", "INTERRUPT_AT", "COUNT_FILE", "KERNEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def setup(tmp_path):
    """(images folder, model spec); the factory sits in a folder whose name holds an '@'."""
    images = random_png_folder(tmp_path / "images")
    folder = tmp_path / "ws@2"
    folder.mkdir()
    (folder / "net.py").write_text(FACTORY)
    return images, f"{folder / 'net.py'}:build"


def heatmap(images, model, out, *extra):
    return ["heatmap", "--model", model, "--weights", "none", "--images", str(images), "--size", "16",
            "--max-shift", "3", "--batch-size", "2", "--device", "cpu", "--format", "png",
            "--dpi", "30", "--quiet", "--out", str(out), *extra]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, exit_code: int, *needles: str) -> str:
    everything = result.output + result.stderr
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{everything}"
    assert result.exit_code == exit_code, everything
    assert "Traceback" not in everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()} if folder.is_dir() else {}


def forbid_loading(monkeypatch):
    """A refusal 'before allocation' must come before any model or image is loaded."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the limit must be checked before loading anything")

    monkeypatch.setattr("shiftlab.runs.load_spec", forbidden)
    monkeypatch.setattr("shiftlab.runs.load_inputs", forbidden)


def interrupt(images, model, out, monkeypatch, *extra) -> None:
    """A run of `model` stopped by Ctrl-C inside the second image batch (forward 15 of 20)."""
    monkeypatch.setenv("INTERRUPT_AT", "15")
    assert invoke(*heatmap(images, model, out, *extra)).exit_code == 130
    monkeypatch.delenv("INTERRUPT_AT")
    assert (out / PROGRESS).is_file() and not (out / "result.npz").exists()


# -- 1. --resume refuses what it cannot continue -------------------------------------------------
@pytest.mark.parametrize("change, named", [
    (["--seed", "1"], "seed"),
    (["--dtype", "bfloat16"], "dtype"),
    ("KERNEL=5", "model weights"),  # the same factory, building 5 x 5 instead of 3 x 3 kernels
])
def test_resume_with_another_seed_dtype_or_model_is_refused_naming_it(setup, tmp_path, monkeypatch,
                                                                       change, named):
    images, model = setup
    out = tmp_path / "out"
    interrupt(images, model, out, monkeypatch)
    saved = (out / PROGRESS).read_bytes()
    extra = change if isinstance(change, list) else []
    if isinstance(change, str):
        monkeypatch.setenv(*change.split("="))
    line = one_error_line(invoke(*heatmap(images, model, out, "--resume", *extra)), 2,
                          "cannot resume", named, "without --resume")
    assert line.count("cannot resume") == 1
    assert (out / PROGRESS).read_bytes() == saved and not (out / "result.npz").exists()


def test_resume_unchanged_equals_an_uninterrupted_run_and_redoes_only_the_open_batch(
        setup, tmp_path, monkeypatch):
    images, model = setup
    assert invoke(*heatmap(images, model, tmp_path / "clean")).exit_code == 0
    out = tmp_path / "out"
    interrupt(images, model, out, monkeypatch)
    counter = tmp_path / "forwards.txt"
    monkeypatch.setenv("COUNT_FILE", str(counter))
    assert invoke(*heatmap(images, model, out, "--resume")).exit_code == 0
    clean, resumed = shiftlab.load(tmp_path / "clean" / "result.npz"), shiftlab.load(out / "result.npz")
    np.testing.assert_array_equal(resumed.n, clean.n)
    np.testing.assert_allclose(resumed.mean, clean.mean, atol=1e-12, equal_nan=True)
    assert counter.stat().st_size < 2 * FORWARDS_PER_BATCH  # the first batch was not redone
    assert not (out / PROGRESS).exists()


def test_api_resume_with_other_weights_is_a_usage_error(tmp_path):
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    checkpoint = tmp_path / "progress.npz"

    class Stop(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model, self.calls = model, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 14:  # inside the second image batch
                raise KeyboardInterrupt
            return self.model(x)

    options = dict(device="cpu", progress=False, batch_size=2, checkpoint=checkpoint)
    with pytest.raises(KeyboardInterrupt):
        shiftlab.measure(Stop(make_maxpool(seed=0)).eval(), images, ShiftGrid.square(3), **options)
    with pytest.raises(UsageError, match="model weights"):
        shiftlab.measure(Stop(make_maxpool(seed=1)).eval(), images, ShiftGrid.square(3), resume=True,
                         **options)


# -- 3. interrupts lose nothing ------------------------------------------------------------------
def test_ctrl_c_while_saving_a_figure_keeps_the_progress_and_resume_measures_nothing_again(
        setup, tmp_path, monkeypatch):
    images, model = setup
    out = tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("shiftlab.figures.plots.save_figure", interrupted)
        assert invoke(*heatmap(images, model, out)).exit_code == 130
    assert sorted(p.name for p in out.iterdir()) == [PROGRESS]  # no outputs, no staging folder
    with np.load(out / PROGRESS) as progress:
        assert int(progress["done"]) == 4  # every image batch was measured
    counter = tmp_path / "forwards.txt"
    monkeypatch.setenv("COUNT_FILE", str(counter))
    assert invoke(*heatmap(images, model, out, "--resume")).exit_code == 0
    assert counter.stat().st_size < FORWARDS_PER_BATCH  # at most the layer probes, no batch
    assert {p.name for p in out.iterdir()} == {"result.npz", "summary.csv", "heatmap.png", "profile.png"}


def test_a_stale_staging_folder_of_a_dead_process_is_removed_by_the_next_run(setup, tmp_path):
    images, model = setup
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = out / f".shiftlab-{int(dead.stdout)}-new-abcd"
    stale.mkdir(parents=True)
    (stale / "heatmap.png").write_bytes(b"half written")
    alive = out / f".shiftlab-{os.getppid()}-new-efgh"  # a run still going on: left alone
    alive.mkdir()
    assert invoke(*heatmap(images, model, out)).exit_code == 0
    assert not stale.exists() and alive.is_dir()


# -- 4. a used --out is never a mix --------------------------------------------------------------
def test_rerun_into_another_runs_folder_is_refused_naming_overwrite(setup, tmp_path):
    images, model = setup
    out = tmp_path / "out"
    assert invoke(*heatmap(images, model, out)).exit_code == 0
    before = snapshot(out)
    one_error_line(invoke(*heatmap(images, model, out, "--metric", "l2")), 2,
                   "already holds another run's results", "--overwrite", "fresh --out")
    assert snapshot(out) == before


def test_overwrite_replaces_the_whole_set_so_old_pdfs_are_gone(setup, tmp_path):
    images, model = setup
    out = tmp_path / "out"
    assert invoke(*heatmap(images, model, out, "--format", "pdf")).exit_code == 0
    assert (out / "heatmap.pdf").is_file()
    (out / "notes.txt").write_text("mine")  # not an output: kept
    assert invoke(*heatmap(images, model, out, "--overwrite", "--metric", "l2")).exit_code == 0
    assert {p.name for p in out.iterdir()} == {"result.npz", "summary.csv", "heatmap.png",
                                               "profile.png", "notes.txt"}
    assert shiftlab.load(out / "result.npz").settings.metric == "l2"


def test_overwrite_replaces_the_padding_pair_figures_too(setup, tmp_path):
    images, model = setup
    out = tmp_path / "out"
    assert invoke(*heatmap(images, model, out, "--padding", "both", "--format", "pdf")).exit_code == 0
    assert (out / "heatmap-as-trained.pdf").is_file()
    assert invoke(*heatmap(images, model, out, "--overwrite")).exit_code == 0
    assert {p.name for p in out.iterdir()} == {"result.npz", "summary.csv", "heatmap.png",
                                               "profile.png"}


class _FailingReplace:
    """``os`` for shiftlab.cli.reports, whose n-th ``replace`` fails as a full disk would."""

    def __init__(self, fail_at: int) -> None:
        self.calls, self.fail_at = 0, fail_at

    def replace(self, source, target):
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        return os.replace(source, target)

    def __getattr__(self, name):
        return getattr(os, name)


@pytest.mark.parametrize("fail_at", [3, 6], ids=["moving-old-aside", "moving-new-in"])
def test_a_failed_move_puts_the_previous_set_back(setup, tmp_path, monkeypatch, fail_at):
    images, model = setup
    out = tmp_path / "out"
    assert invoke(*heatmap(images, model, out)).exit_code == 0
    before = snapshot(out)  # 4 outputs: moves 1-4 set them aside, 5-8 move the new ones in
    failing = _FailingReplace(fail_at)
    monkeypatch.setattr("shiftlab.cli.reports.os", failing)
    one_error_line(invoke(*heatmap(images, model, out, "--overwrite", "--metric", "l2")), 1,
                   "No space left on device", "previous outputs were put back")
    assert failing.calls >= fail_at
    after = snapshot(out)
    after.pop(PROGRESS, None)  # kept: the numbers can still be had with --resume
    assert after == before


def test_a_failed_run_leaves_no_new_empty_folder(setup, tmp_path, monkeypatch):
    images, model = setup
    out = tmp_path / "new" / "out"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shiftlab.cli.reports.write_table", full_disk)
    result = invoke("compare", "-m", model, "--antialias", "2", "--weights", "none", "--images",
                    images, "--size", "16", "--max-shift", "2", "--device", "cpu", "--quiet",
                    "--out", out)
    one_error_line(result, 1, "No space left on device")
    assert not out.exists()


# -- 5. limits before allocation -----------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    (["--mode", "crop", "--max-shift", "100000"], ("--max-shift 100000", "limit of 4096 px")),
    (["-k", "3000"], ("9,000,000 shifts", "limit of 16,384")),
    (["--subpixel", "1000000000"], ("shifts, more than the limit of 16,384", "--subpixel")),
], ids=["crop-canvas", "max-shift", "subpixel"])
def test_huge_grids_are_refused_before_anything_is_loaded(setup, tmp_path, monkeypatch, extra, needles):
    images, model = setup
    forbid_loading(monkeypatch)
    out = tmp_path / "out"
    one_error_line(invoke(*heatmap(images, model, out, *extra)), 2, *needles)
    assert not out.exists()


def test_a_tall_png_is_refused_by_its_resized_size(setup, tmp_path):
    _, model = setup
    tall = tmp_path / "tall.png"
    Image.fromarray(np.zeros((2_000_000, 8), np.uint8)).save(tall)  # ~20 kB on disk
    assert tall.stat().st_size < 100_000
    out = tmp_path / "out"
    one_error_line(invoke(*heatmap(tall, model, out)), 1, "tall.png", "8x2000000",
                   "MAX_RESIZED_PIXELS")
    assert not out.exists()


def _saved_result(tmp_path: Path, n_shifts: int = 4) -> Path:
    """A tiny saved result: 2 layers x ``n_shifts`` shifts along the line (t, 2t)."""
    grid = ShiftGrid(tuple((float(t), float(2 * t)) for t in range(n_shifts)))
    layers = [LayerInfo(name, "Conv2d", "spatial", (1.0, 1.0), (1.0, 1.0), (4, 16, 16))
              for name in ("a", "b")]
    shape = (2, n_shifts)
    result = Result(Settings(grid=grid, size=(16, 16)), layers, np.full(shape, 0.1), np.zeros(shape),
                    np.full(shape, 3), np.zeros(shape, int), np.zeros(shape, int))
    return result.save(tmp_path / "result.npz")


def _rewrite(path: Path, **members) -> Path:
    """``path`` with some members replaced (arrays, or raw .npy bytes)."""
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update({k: v for k, v in members.items() if not isinstance(v, bytes)})
    np.savez(path, **arrays)
    raw = {k: v for k, v in members.items() if isinstance(v, bytes)}
    if raw:
        with zipfile.ZipFile(path) as source:
            kept = {name: source.read(name) for name in source.namelist()}
        with zipfile.ZipFile(path, "w") as target:
            for name, data in kept.items():
                target.writestr(name, raw.get(name[:-4], data))
    return path


@pytest.mark.parametrize("member, dtype, shape, limit", [
    ("header", "<U250000000", (), "16,777,216"),       # one 1 GB text value
    ("mean", "|S50000000", (32,), "16,777,216"),       # 32 text values of 50 MB each
])
def test_a_member_declaring_huge_values_is_refused_by_bytes_unexpanded(tmp_path, member, dtype,
                                                                       shape, limit):
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    handle = __import__("io").BytesIO()
    npformat.write_array_header_1_0(handle, header)
    path = _rewrite(_saved_result(tmp_path), **{member: handle.getvalue() + b"\0" * 16})
    with pytest.raises(ShiftlabError, match=rf"declares [\d,]+ bytes .* above the limit of {limit}"):
        shiftlab.load(path)


def test_a_result_member_declaring_a_huge_array_is_refused_unexpanded(tmp_path):
    header = npformat.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (100_000, 100_000)  # 80 GB declared, a few bytes stored
    handle = __import__("io").BytesIO()
    npformat.write_array_header_1_0(handle, header)
    path = _rewrite(_saved_result(tmp_path), mean=handle.getvalue() + b"\0" * 16)
    with pytest.raises(ShiftlabError, match=r"declares 10,000,000,000 values .* above the limit"):
        shiftlab.load(path)
    one_error_line(invoke("plot", path, "--format", "png"), 1, "10,000,000,000 values", "limit")


def test_plot_refuses_a_grid_whose_panels_exceed_the_drawing_limit(tmp_path, monkeypatch):
    path = _saved_result(tmp_path, n_shifts=2000)  # a map of 2000 x 2000 cells per layer

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may be drawn")

    monkeypatch.setattr("shiftlab.figures.plots.layer_grid", forbidden)
    one_error_line(invoke("plot", path, "--format", "png"), 2, "2,000 x 2,000 cells",
                   "drawing limit of 16,384")
    assert [p.name for p in tmp_path.iterdir()] == ["result.npz"]


def test_plot_draws_a_grid_within_the_limit(tmp_path):
    path = _saved_result(tmp_path, n_shifts=4)
    result = invoke("plot", path, "--format", "png", "--dpi", "30")
    assert result.exit_code == 0, result.output + result.stderr


# -- 6. shiftlab.load validates ------------------------------------------------------------------
def _header_with_one_layer(path: Path) -> np.ndarray:
    with np.load(path) as data:
        header = json.loads(str(data["header"]))
    header["layers"] = header["layers"][:1]
    return np.array(json.dumps(header))


@pytest.mark.parametrize("damage, needle", [
    (lambda p: {"mean": np.zeros(4)}, "'mean' has shape (4,)"),
    (lambda p: {"header": _header_with_one_layer(p)}, "1 layers x 4 shifts"),
    (lambda p: {"n": np.full((2, 4), 2.5)}, "counts 'n' must be whole numbers"),
    (lambda p: {"std": np.array([["a"] * 4] * 2)}, "'std' has dtype <U1"),
    (lambda p: {"mean": np.ones((2, 4), bool)}, "'mean' has dtype bool"),
], ids=["1-d-mean", "fewer-layers-in-header", "fractional-counts", "text-std", "bool-mean"])
def test_load_refuses_a_damaged_result_in_one_line(tmp_path, damage, needle):
    path = _saved_result(tmp_path)
    _rewrite(path, **damage(path))
    with pytest.raises(ShiftlabError) as caught:
        shiftlab.load(path)
    assert needle in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "good").mkdir()
    good = _saved_result(tmp_path / "good")
    one_error_line(invoke("compare", good, path, "--out", tmp_path / "cmp"), 1, needle)
    assert not (tmp_path / "cmp").exists()


# -- 7. names are text ---------------------------------------------------------------------------
def test_a_module_named_like_broken_tex_draws(setup, tmp_path):
    images, model = setup
    out = tmp_path / "out"
    result = invoke(*heatmap(images, model.replace(":build", ":tex_name"), out))
    assert result.exit_code == 0, result.output + result.stderr
    assert "$\\frac{a$" in shiftlab.load(out / "result.npz").layer_names
    assert (out / "heatmap.png").stat().st_size > 0 and (out / "profile.png").stat().st_size > 0


# -- 9. eval mode, restored ----------------------------------------------------------------------
def _dropout_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4),
                         nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_measure_runs_a_training_model_in_eval_mode_and_restores_it():
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = dict(device="cpu", progress=False)
    expected = shiftlab.measure(_dropout_bn().eval(), images, ShiftGrid.square(2), **options)
    model = _dropout_bn().train()
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    with pytest.warns(UserWarning, match="train mode"):
        result = shiftlab.measure(model, images, ShiftGrid.square(2), **options)
    np.testing.assert_array_equal(result.mean, expected.mean)  # no dropout noise
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.filterwarnings("ignore:.*consistency is uninformative")
def test_measure_invariance_runs_a_training_model_in_eval_mode_and_restores_it():
    from shiftlab.invariance.grid import measure_invariance

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    options = dict(device="cpu", progress=False, n_pairs=10, n_bootstrap=10)
    expected = measure_invariance(_dropout_bn().eval(), images, ShiftGrid.square(2), **options)
    model = _dropout_bn().train()
    stats = model[1].running_mean.clone()
    with pytest.warns(UserWarning, match="train mode"):
        result = measure_invariance(model, images, ShiftGrid.square(2), **options)
    np.testing.assert_equal(result.summary(), expected.summary())  # no dropout noise
    assert torch.equal(model[1].running_mean, stats) and model.training


# -- 10. one-line errors -------------------------------------------------------------------------
def test_the_cpu_allocators_out_of_memory_is_one_line_like_cudas(setup, tmp_path, monkeypatch):
    images, model = setup

    def exhausted(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't"
                           " allocate memory: you tried to allocate 68719476736 bytes.\nError code 12")

    monkeypatch.setattr("shiftlab.equivariance.engine.measure", exhausted)
    out = tmp_path / "out"
    line = one_error_line(invoke(*heatmap(images, model, out)), 1, "out of memory", "--batch-size")
    assert "report" not in line and not out.exists()


@pytest.mark.parametrize("extra, code, needles", [
    (["--device", "meta"], 2, ("device 'meta' cannot run a measurement", "cpu")),
    (["--seed", "1e23"], 2, ("'1e23' is not a valid integer", "--help')")),
    (["--max-shift", "x"], 2, ("--max-shift", "(see '")),
], ids=["device-meta", "seed-float", "max-shift-text"])
def test_bad_values_are_one_line_before_loading(setup, tmp_path, monkeypatch, extra, code, needles):
    images, model = setup
    forbid_loading(monkeypatch)
    out = tmp_path / "out"
    one_error_line(invoke(*heatmap(images, model, out, *extra)), code, *needles)
    assert not out.exists()


def test_a_model_path_with_an_at_sign_is_a_path_not_weights(setup, tmp_path):
    images, model = setup
    assert "@" in model
    result = invoke(*heatmap(images, model, tmp_path / "out"))
    assert result.exit_code == 0, result.output + result.stderr
    assert shiftlab.load(tmp_path / "out" / "result.npz").provenance.model.endswith("net:build")


def test_crop_mode_with_every_spatial_layer_undefined_warns(setup, tmp_path):
    images, model = setup
    result = invoke(*heatmap(images, model, tmp_path / "out", "--mode", "crop", "--border", "40"))
    assert result.exit_code == 0, result.output + result.stderr
    assert "warning: --border 40 leaves no valid region in any spatial layer" in result.stderr


@pytest.fixture(scope="module")
def measured():
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return shiftlab.measure(make_maxpool(), images, ShiftGrid.square(2), device="cpu", progress=False)


@pytest.mark.parametrize("change, needle", [
    (lambda r: {"provenance": r.provenance.replace(resize=20)}, "resize (18 vs 20)"),
    (lambda r: {"settings": dataclasses.replace(r.settings, dtype="bfloat16")}, "dtype"),
    (lambda r: {"settings": dataclasses.replace(r.settings, padding="circular")}, "padding"),
    (lambda r: {"provenance": r.provenance.replace(input_digest="0" * 16)}, "image content"),
], ids=["resize", "dtype", "padding", "image-content"])
def test_compare_refuses_results_of_other_inputs_or_numerics(measured, change, needle):
    first = dataclasses.replace(measured, provenance=measured.provenance.replace(resize=18))
    other = dataclasses.replace(first, **change(first))
    with pytest.raises(SettingsMismatchError, match="cannot compare") as caught:
        Comparison([first, other], labels=["a", "b"])
    assert needle in str(caught.value)


def test_compare_command_refuses_saved_results_of_other_padding(measured, tmp_path):
    a = measured.save(tmp_path / "a.npz")
    b = dataclasses.replace(measured, settings=dataclasses.replace(measured.settings,
                                                                   padding="circular"))
    b = b.save(tmp_path / "b.npz")
    one_error_line(invoke("compare", a, b, "--out", tmp_path / "cmp"), 1, "padding", "cannot compare")
    assert not (tmp_path / "cmp").exists()


def test_stale_staging_cleanup_never_follows_a_planted_symlink(tmp_path):
    from shiftlab.cli.reports import clean_stale

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "result.npz").write_bytes(b"someone else's file")
    (outside / "notes.txt").write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / ".shiftlab-999999-old-x"
    planted.symlink_to(outside, target_is_directory=True)
    for _ in range(2):  # every run cleans: nothing moves, however often
        clean_stale(out)
    assert sorted(p.name for p in outside.iterdir()) == ["notes.txt", "result.npz"]
    assert (outside / "result.npz").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in out.iterdir()) == [planted.name]


def test_stale_staging_cleanup_puts_back_only_outputs_it_could_have_set_aside(tmp_path):
    from shiftlab.cli.reports import clean_stale

    out = tmp_path / "out"
    stale = out / ".shiftlab-999999-old-y"
    stale.mkdir(parents=True)
    (stale / "summary.csv").write_text("layer\n")
    (stale / "notes.txt").write_text("not ours")
    clean_stale(out)
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]


@pytest.mark.skipif(not hasattr(__import__("signal"), "pthread_sigmask"), reason="POSIX only")
def test_a_second_ctrl_c_during_cleanup_waits_until_the_staging_folder_is_gone(tmp_path,
                                                                              monkeypatch):
    import os
    import shutil
    import signal

    from shiftlab.cli import reports

    real_rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C lands as cleanup starts
        for _ in range(1000):  # bytecodes run: an undeferred KeyboardInterrupt is raised here
            pass
        real_rmtree(path, *args, **kwargs)

    def write(stage):
        raise KeyboardInterrupt  # the first Ctrl-C, while the numbers are written

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")
    monkeypatch.setattr(reports.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        reports.write_set(out, write)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
