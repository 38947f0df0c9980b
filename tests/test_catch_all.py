"""Inputs that used to reach the CLI's catch-all line (``error: IndexError: ... please report
it``) and now get one ``error:`` line that names the cause and the fix."""
from __future__ import annotations

import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import shiftlab
from shiftlab import ShiftGrid
from shiftlab.cli.commands import main
from shiftlab.data.images import find_images
from shiftlab.data.labels import read_labels
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.errors import ImageError, ModelError, ShiftlabError, UsageError, WeightsError
from shiftlab.models.checkpoints import load_checkpoint
from shiftlab.results.result import Result, Settings
from conftest import INTERRUPTIBLE_FACTORY, random_png_folder

CATCH_ALL = "please report it"
PROGRESS = ".shiftlab-progress.npz"


@pytest.fixture(autouse=True)
def _environment(monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    for name in ("SHIFTLAB_DEBUG", "INTERRUPT_AT"):
        monkeypatch.delenv(name, raising=False)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, exit_code: int, *needles: str) -> str:
    """The run ended with exactly one ``error:`` line, not the catch-all, holding ``needles``."""
    everything = result.output + result.stderr
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}\n{everything}"
    assert "Traceback" not in everything
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert CATCH_ALL not in lines[0], lines[0]
    assert result.exit_code == exit_code, everything
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def factory(tmp_path) -> str:
    """The spec of a 3-class, stride-4 classifier built by a factory file."""
    path = tmp_path / "net.py"
    path.write_text(INTERRUPTIBLE_FACTORY)
    return f"{path}:build"


def heatmap(images, model, out, *extra):
    return ["heatmap", "--model", model, "--images", images, "--size", "16", "--max-shift", "2",
            "--batch-size", "2", "--device", "cpu", "--format", "png", "--dpi", "30", "--quiet",
            "--out", out, *extra]


def consistency(labels, model, out, *extra):
    return ["consistency", "--model", model, "--weights", "none", "--num-classes", "3",
            "--labels", labels, "--protocol", "zhang2019", "--size", "16", "--resize", "24",
            "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--format", "png",
            "--dpi", "30", "--quiet", "--out", out, *extra]


def chmod_denies_reads(tmp_path: Path) -> bool:
    """False as root (or with CAP_DAC_OVERRIDE), where chmod 000 does not stop reading."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        probe.read_text()
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
    return False


# -- 1. checkpoints with 0-d tensors ----------------------------------------------------------------
def _net(factory: str) -> nn.Module:
    return shiftlab.load_model(factory, weights="none").model


def test_a_checkpoint_with_a_0d_entry_is_one_weights_line(factory, tmp_path):
    state = _net(factory).state_dict()
    state["body.7.bias"] = torch.tensor(1.0)  # the classifier's (3,) bias as a scalar
    checkpoint = tmp_path / "scalar.pth"
    torch.save(state, checkpoint)
    images = random_png_folder(tmp_path / "images")
    line = one_error_line(invoke(*heatmap(images, factory, tmp_path / "out", "--weights", checkpoint)),
                          1, "scalar.pth", "body.7.bias () vs (3,)", "architecture")
    assert "classes" not in line  # a scalar has no output size: not a class-count mismatch


@pytest.mark.parametrize("model, state, needle", [
    (lambda: nn.Linear(4, 4), {"weight": torch.zeros(4, 4), "bias": torch.tensor(1.0)},
     "bias () vs (4,)"),
    (lambda: nn.Linear(4, 4, bias=False), {"weight": torch.tensor(1.0)}, "weight () vs (4, 4)"),
    (lambda: nn.BatchNorm2d(2), {**nn.BatchNorm2d(2).state_dict(),
                                 "num_batches_tracked": torch.tensor([1])},
     "num_batches_tracked (1,) vs ()"),
], ids=["0-d-bias", "0-d-weight", "1-d-for-a-0-d-buffer"])
def test_load_checkpoint_refuses_0d_mismatches_in_one_line(tmp_path, model, state, needle):
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as caught:
        load_checkpoint(model(), path)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# -- 2. labels that are digits but not decimal ('²') ------------------------------------------------
def test_a_superscript_two_label_in_a_csv_is_a_class_name_not_an_index(tmp_path):
    images = random_png_folder(tmp_path / "images", count=2)
    csv = images / "labels.csv"
    csv.write_text("file,label\n0.png,0\n1.png,\u00b2\n")
    with pytest.raises(UsageError, match="'\u00b2'.*class indices"):
        read_labels(csv)
    with pytest.raises(UsageError, match="1 unknown class names .*'\u00b2'"):
        read_labels(csv, categories=["a", "b", "c"])


def test_a_class_folder_named_superscript_two_is_one_usage_line(factory, tmp_path):
    root = tmp_path / "val"
    for name in ("0", "1", "\u00b2"):
        random_png_folder(root / name, count=1, side=28)
    one_error_line(invoke(*consistency(root, factory, tmp_path / "out")), 2, "'\u00b2'",
                   "class indices")
    assert not (tmp_path / "out").exists()


# -- 3. result headers with damaged layer fields ------------------------------------------------------
def _saved_result(path: Path, n_layers: int = 2) -> Path:
    grid = ShiftGrid(tuple((float(t), float(2 * t)) for t in range(4)))
    layers = [LayerInfo(name, "Conv2d", "spatial", (1.0, 1.0), (1.0, 1.0), (4, 16, 16))
              for name in ("a", "b")[:n_layers]]
    shape = (n_layers, 4)
    result = Result(Settings(grid=grid, size=(16, 16)), layers, np.full(shape, 0.1), np.zeros(shape),
                    np.full(shape, 3), np.zeros(shape, int), np.zeros(shape, int))
    return result.save(path)


def _with_layer_field(path: Path, key: str, value) -> Path:
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    header = json.loads(str(arrays["header"]))
    header["layers"][0][key] = value
    arrays["header"] = np.array(json.dumps(header))
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("key, value, needle", [
    ("name", 5, "has name 5"),
    ("name", ["a"], "has name ['a']"),
    ("module", None, "has module None"),
    ("stride", [2], "has stride [2.0]: 1 values, not 2"),
    ("measured_stride", [1, 1, 1], "has measured_stride [1.0, 1.0, 1.0]: 3 values"),
    ("kind", "local", "has kind 'local'"),
    ("layout", 7, "has layout 7"),
], ids=["int-name", "list-name", "no-module", "1-stride", "3-measured-stride", "kind", "layout"])
def test_a_result_with_damaged_layer_fields_is_refused_naming_the_file(tmp_path, key, value, needle):
    path = _with_layer_field(_saved_result(tmp_path / "damaged.npz"), key, value)
    with pytest.raises(ShiftlabError) as caught:
        shiftlab.load(path)
    message = str(caught.value)
    assert str(path) in message and "layer 0" in message and needle in message, message
    assert "\n" not in message
    one_error_line(invoke("plot", path, "--format", "png", "--dpi", "30", "--out", tmp_path / "o"),
                   1, "damaged.npz", needle)


# -- 4. unreadable images and folders -----------------------------------------------------------------
def _deny_listing(monkeypatch, folder: Path) -> None:
    """``folder.iterdir()`` raises PermissionError, as for a folder without read permission."""
    iterdir = pathlib.Path.iterdir

    def guarded(self):
        if os.path.abspath(self) == os.path.abspath(folder):
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", guarded)


def _deny_opening(monkeypatch, image: Path) -> None:
    """Opening ``image`` raises PermissionError, as for a file without read permission."""
    from shiftlab.data import images as module

    open_image = module.Image.open

    def guarded(path, *args, **kwargs):
        if os.path.abspath(path) == os.path.abspath(image):
            raise PermissionError(13, "Permission denied", str(path))
        return open_image(path, *args, **kwargs)

    monkeypatch.setattr(module.Image, "open", guarded)


def test_an_unlistable_images_folder_is_one_line(factory, tmp_path, monkeypatch):
    images = random_png_folder(tmp_path / "images")
    _deny_listing(monkeypatch, images)
    one_error_line(invoke(*heatmap(images, factory, tmp_path / "out", "--weights", "none")), 1,
                   f"cannot list folder {images}", "Permission denied", "chmod")
    with pytest.raises(ImageError, match="cannot list folder"):
        find_images(images)


def test_an_unlistable_class_folder_is_one_line_naming_it(factory, tmp_path, monkeypatch):
    root = tmp_path / "val"
    for label in range(3):
        random_png_folder(root / str(label), count=2, side=28)
    _deny_listing(monkeypatch, root / "1")
    one_error_line(invoke(*consistency(root, factory, tmp_path / "out")), 1,
                   f"cannot list folder {root / '1'}", "Permission denied")
    with pytest.raises(ImageError, match="cannot list folder"):
        read_labels(root)


def test_an_unreadable_image_is_reported_as_unreadable_not_corrupt(factory, tmp_path, monkeypatch):
    images = random_png_folder(tmp_path / "images", count=1)
    _deny_opening(monkeypatch, images / "0.png")
    line = one_error_line(invoke(*heatmap(images, factory, tmp_path / "out", "--weights", "none")),
                          1, "0.png", "Permission denied", "chmod +r")
    assert "corrupt" not in line


def test_real_chmod_000_folder_and_image(factory, tmp_path):
    if not chmod_denies_reads(tmp_path):
        pytest.skip("chmod does not deny reads here (root)")
    closed = random_png_folder(tmp_path / "closed", count=2)
    one = random_png_folder(tmp_path / "one", count=1)
    root = tmp_path / "val"
    for label in range(3):
        random_png_folder(root / str(label), count=2, side=28)
    (one / "0.png").chmod(0)
    closed.chmod(0)
    (root / "1").chmod(0)
    try:
        one_error_line(invoke(*heatmap(closed, factory, tmp_path / "o1", "--weights", "none")), 1,
                       "cannot list folder")
        one_error_line(invoke(*heatmap(closed / "0.png", factory, tmp_path / "o2",
                                       "--weights", "none")), 1, "cannot look at")
        line = one_error_line(invoke(*heatmap(one, factory, tmp_path / "o3", "--weights", "none")),
                              1, "0.png", "chmod +r")
        assert "corrupt" not in line
        one_error_line(invoke(*consistency(root, factory, tmp_path / "o4")), 1,
                       f"cannot list folder {root / '1'}")
    finally:
        (one / "0.png").chmod(0o644)
        closed.chmod(0o755)
        (root / "1").chmod(0o755)


# -- 5. models built on the meta device ---------------------------------------------------------------
META_FACTORY = """
import torch
from torch import nn

def build():
    return nn.Linear(4, 4, device="meta")

def conv():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, device="meta"))
"""


@pytest.mark.parametrize("name, first", [("build", "'weight'"), ("conv", "'1.weight'")])
def test_a_factory_building_on_the_meta_device_is_one_model_line(tmp_path, name, first):
    path = tmp_path / "f.py"
    path.write_text(META_FACTORY)
    images = random_png_folder(tmp_path / "images")
    one_error_line(invoke(*heatmap(images, f"{path}:{name}", tmp_path / "out", "--weights", "none")),
                   1, f"f.py:{name}", "no data", "meta device", first, "real device")
    with pytest.raises(ModelError, match="meta device"):
        shiftlab.load_model(f"{path}:{name}", weights="none")


def test_measuring_a_meta_model_is_a_model_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, device="meta"))
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(ModelError, match="no data: its tensors are on the meta device"):
        shiftlab.measure(model, images, ShiftGrid.square(2))
    with pytest.raises(ModelError, match="meta device"):
        shiftlab.measure_invariance(model, images, ShiftGrid.square(2))


# -- 6. a progress path that is a folder ----------------------------------------------------------------
def test_a_progress_path_that_is_a_folder_is_refused_before_measuring(factory, tmp_path,
                                                                      monkeypatch):
    images = random_png_folder(tmp_path / "images")
    out = tmp_path / "out"
    (out / PROGRESS).mkdir(parents=True)

    def never(*args, **kwargs):
        raise AssertionError("nothing may be measured")

    monkeypatch.setattr("shiftlab.runs.measure_heatmap", never)
    one_error_line(invoke(*heatmap(images, factory, out, "--weights", "none")), 2,
                   f"progress file {out / PROGRESS} is a folder")
    assert (out / PROGRESS).is_dir()


def test_measure_refuses_a_checkpoint_folder_before_any_forward_pass(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")).eval()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(UsageError, match="is a folder, not a file"):
        shiftlab.measure(model, torch.randn(2, 3, 8, 8), ShiftGrid.square(2), checkpoint=tmp_path)
    assert calls == []


# -- 7. a result without layers -----------------------------------------------------------------------
def test_str_of_a_loaded_result_without_layers(tmp_path):
    result = shiftlab.load(_saved_result(tmp_path / "empty.npz", n_layers=0))
    text = str(result)
    assert "0 layers" in text and "no layers" in text
    assert list(result.summary().columns)[:4] == ["layer", "depth", "module", "kind"]
    assert len(result.summary()) == 0 and len(result.to_frame()) == 0


def test_importing_shiftlab_does_not_import_torch():
    """The command line starts (and can be interrupted) before the heavy imports."""
    import subprocess
    import sys

    code = "import sys, shiftlab; print('torch' in sys.modules, shiftlab.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"
    assert shiftlab.ShiftGrid.__name__ == "ShiftGrid"  # the lazy names still resolve
    assert "measure" in dir(shiftlab) and "runs" in shiftlab.__all__


@pytest.mark.parametrize("delay", [0.4, 1.2])
def test_ctrl_c_while_the_command_line_imports_is_one_line_and_exit_130(delay):
    """A Ctrl-C during the first seconds (torch, matplotlib importing) gives no traceback."""
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "shiftlab", "--help"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    if process.returncode == 0:  # the imports finished first: nothing to check on this machine
        pytest.skip(f"imports took under {delay} s")
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [
        "shiftlab: interrupted while starting (Ctrl-C); nothing was written"]
