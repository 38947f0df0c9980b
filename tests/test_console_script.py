"""The installed ``shiftlab`` console script on bad input (issue #8), run as a user runs it.

Every case is one subprocess of ``shiftlab heatmap`` (the script on PATH, else
``python -m shiftlab``) with the tiny factory model of conftest.py, 16 px inputs and a 2 x 2 grid.
An error case must exit 2 (usage: the request itself is wrong) or 1 (runtime: a file, a model or
the machine fails), print exactly one 'error:' line on stderr that names the problem and the fix,
never a traceback, and leave --out as it was: absent, empty, or holding only what was there before.

Each subprocess spends most of its ~3 s importing torch, so the file starts all of its selected
cases at once on a small thread pool (one subprocess per core) and each test waits for its own;
under pytest-xdist every test runs its own subprocess instead.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import shiftlab

CONFTEST = Path(__file__).resolve().with_name("conftest.py")
TINY = f"{CONFTEST}:tiny_classifier"
TINY_NAME = "conftest:tiny_classifier"
FAST = ["--size", "16", "--max-shift", "2", "--batch-size", "8", "--device", "cpu",
        "--format", "png", "--dpi", "30"]
FAST_OUTPUTS = {"result.npz", "summary.csv", "heatmap.png", "profile.png"}
PAYLOAD_MODULE = "shiftlab_console_payload"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_CUDA = torch.cuda.is_available()


def _launcher() -> list[str]:
    found = shutil.which("shiftlab")
    return [found] if found else [sys.executable, "-m", "shiftlab"]


# -- the inputs every case draws on, written once per module -----------------------------------
FACTORIES = """
    import torch
    from torch import nn

    def raises():
        raise ValueError("depth must be even")

    def four_pools():
        '''Needs at least 16 px: four 2x poolings.'''
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2),
                             nn.MaxPool2d(2), nn.MaxPool2d(2), nn.Flatten())

    class MakeNaN(nn.Module):
        def forward(self, x):
            return x * float("nan")

    class NanToNum(nn.Module):
        def forward(self, x):
            return torch.nan_to_num(x)

    class NaNLogits(nn.Module):
        def forward(self, x):
            return torch.full((len(x), 3), float("nan"))

    def all_nan():
        '''A classifier without one finite output.'''
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), NaNLogits())

    class Slow(nn.Module):
        def forward(self, x):
            import os, time
            marker = os.environ.get("STARTED_MARKER")
            if marker:
                open(marker, "a").close()
            time.sleep(0.2)
            return x

    def slow():
        '''0.2 s per forward; touches $STARTED_MARKER once the measurement runs.'''
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), Slow())

    def with_nan():
        '''Layer "1" is all NaN; "2" turns it back into zeros, so only "1" is non-finite.'''
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), MakeNaN(), NanToNum(),
                             nn.Conv2d(4, 4, 3, padding=1)).eval()
    """

PAYLOAD = """
    from pathlib import Path

    class Note:
        '''Harmless, but it runs code when unpickled: writes its marker into the cwd.'''

        def __init__(self, marker):
            self.marker = marker

        def __setstate__(self, state):
            self.__dict__.update(state)
            Path(self.marker).write_text("unpickled")
    """


class _OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)


def _smooth_rgb(side: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((side, side), Image.BILINEAR))


def _write_images(folder: Path) -> None:
    folder.mkdir()
    for index in range(2):
        Image.fromarray(_smooth_rgb(32, index)).save(folder / f"im{index}.png")


def _write_mixed_images(folder: Path) -> None:
    """Convertible (grayscale, RGBA, 16-bit, palette, small) next to skipped (corrupt, 4 px)."""
    folder.mkdir()
    rgb = _smooth_rgb(32, 3)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    rgba = np.dstack([rgb, np.full((32, 32), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    deep = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")  # mode I;16
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(_smooth_rgb(10, 4)).save(folder / "small.png")  # upscaled, not skipped
    Image.fromarray(_smooth_rgb(4, 5)).save(folder / "tiny.png")  # below 8 px: skipped
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)


MIXED_KEPT = ["deep.png", "gray.png", "palette.png", "rgb.png", "rgba.png", "small.png"]


def _write_checkpoints(folder: Path) -> None:
    from shiftlab.models.zoo import load_model

    state = load_model(TINY, "none").model.state_dict()
    torch.save(state, folder / "truncated.pth")
    data = (folder / "truncated.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    # what a failed download often leaves behind: an error page under the checkpoint's name
    (folder / "page.pth").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n")
    torch.save(_OtherNet().state_dict(), folder / "other.pth")

    (folder / f"{PAYLOAD_MODULE}.py").write_text(textwrap.dedent(PAYLOAD))
    sys.path.insert(0, str(folder))
    try:
        payload = importlib.import_module(PAYLOAD_MODULE)
        torch.save({"state_dict": state, "note": payload.Note("unpickled.txt")},
                   folder / "with_code.pth")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(PAYLOAD_MODULE, None)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("console")
    _write_images(root / "images")
    _write_mixed_images(root / "mixed")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "corrupt" / "empty.jpg").write_bytes(b"")
    (root / "factories.py").write_text(textwrap.dedent(FACTORIES))
    (root / "blocker").write_text("keep me")
    (root / "out").mkdir()
    _write_checkpoints(root)
    return root


# -- the cases ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One ``shiftlab heatmap`` run: its arguments, given the workspace and the --out folder."""

    args: Callable[[Path, Path], list]
    exit_code: int
    needles: tuple = ()  # what the error line must contain: the problem, then the fix
    out: str = "fresh"  # fresh (absent), prefilled (holds a file from before), locked, under-a-file
    quiet: bool = True
    payload_on_path: bool = False  # the pickled class's module is importable, as for its author
    command: str = "heatmap"
    env: tuple = ()  # (name, value) pairs set for the run
    skip: Optional[str] = None
    xfail: Optional[str] = None


def _tiny(images: str = "images", *extra, model: str = TINY) -> Callable[[Path, Path], list]:
    return lambda ws, out: ["--model", model, "--images", ws / images, *FAST, "--out", out, *extra]


def _factory(name: str, *extra) -> Callable[[Path, Path], list]:
    return lambda ws, out: _tiny("images", *extra, model=f"{ws / 'factories.py'}:{name}")(ws, out)


def _weights(file: str, *extra) -> Callable[[Path, Path], list]:
    return lambda ws, out: _tiny("images", "--weights", ws / file, *extra)(ws, out)


ERRORS = {
    "unknown-model-name-suggests-close-names": Case(
        _tiny(model="resnet19"), 2, ("unknown model 'resnet19'", "did you mean", "resnet18")),
    "module-that-does-not-import": Case(
        _tiny(model="nosuchpkg.mod:factory"), 1,
        ("cannot import module 'nosuchpkg.mod'", "No module named 'nosuchpkg'", "PYTHONPATH")),
    "factory-that-raises": Case(
        _factory("raises"), 1, ("raises", "raised ValueError: depth must be even")),
    "weights-file-missing": Case(
        _weights("missing.pth"), 1, ("missing.pth", "does not exist", "check the weights path")),
    "truncated-checkpoint": Case(
        _weights("truncated.pth"), 1,
        ("not a readable PyTorch checkpoint", "truncated", "save it again"), out="prefilled"),
    "html-page-as-checkpoint": Case(
        _weights("page.pth"), 1,
        ("page.pth", "not a readable PyTorch checkpoint", "not written by torch.save")),
    "checkpoint-of-another-architecture-lists-mismatched-keys": Case(
        _weights("other.pth"), 1,
        (f"does not fit {TINY_NAME}", "6 missing keys", "0.weight", "2 unexpected keys",
         "fc.weight")),
    "pickled-code-checkpoint-refused-without-trust": Case(
        _weights("with_code.pth"), 1, ("refused", f"{PAYLOAD_MODULE}.Note", "--trust-checkpoint"),
        payload_on_path=True),
    "image-folder-missing": Case(_tiny("nowhere"), 1, ("nowhere", "does not exist", "check the path")),
    "image-folder-empty": Case(
        _tiny("empty"), 1, ("empty", "no .png/.jpg/.jpeg files", "folder that holds images")),
    "folder-of-only-corrupt-images": Case(
        _tiny("corrupt"), 1,
        ("no image could be loaded", "broken.png", "empty.jpg", "pass readable PNG or JPEG"),
        out="prefilled"),
    "crop-grid-larger-than-the-margin": Case(
        _tiny("images", "--mode", "crop", "--max-shift", "50", "--resize", "20"), 2,
        ("--max-shift 50", "crop margin", "--resize 114"), out="prefilled"),
    "circular-grid-larger-than-the-image": Case(
        _tiny("images", "--max-shift", "40"), 2,
        ("--max-shift 40", "repeat every 16 px", "below 16")),
    "size-too-small-for-a-factory-model": Case(
        _factory("four_pools", "--size", "8"), 1, ("cannot take a 3x8x8 input", "larger --size"),
        out="prefilled"),
    "out-below-an-existing-file": Case(
        _tiny(), 1, ("cannot create output folder", "is not a folder", "choose another --out"),
        out="under-a-file"),
    "out-folder-not-writable": Case(
        _tiny(), 1, ("not writable", "choose another --out"), out="locked",
        skip="running as root, who can write any folder" if IS_ROOT else None),
    "invalid-mplbackend": Case(
        _tiny(), 1, ("MPLBACKEND='nonsense' is not a usable matplotlib backend", "MPLBACKEND=Agg"),
        env=(("MPLBACKEND", "nonsense"),)),
    "consistency-of-a-model-without-finite-output": Case(
        _factory("all_nan"), 1, ("all_nan gave NaN or Inf logits for every input", "weights"),
        command="consistency"),
    "device-cuda-without-cuda": Case(
        _tiny("images", "--device", "cuda"), 2, ("no CUDA", "--device cpu"),
        skip="CUDA is available" if HAS_CUDA else None),
}

SUCCESSES = {
    "pickled-code-checkpoint-loads-with-trust": Case(  # --dry-run: loads model and images only
        _weights("with_code.pth", "--trust-checkpoint", "--dry-run"), 0, payload_on_path=True),
    "mixed-folder": Case(_tiny("mixed"), 0),
    "nan-layer": Case(_factory("with_nan"), 0, quiet=False),
    "nan-layer-under-quiet": Case(_factory("with_nan"), 0),  # a warning, not a summary line
}

CASES = {**ERRORS, **SUCCESSES}


# -- running them ------------------------------------------------------------------------------
@dataclass
class Run:
    command: str
    returncode: int
    stdout: str
    stderr: str
    out: Path
    cwd: Path
    before: set  # what --out held before the run

    def __str__(self) -> str:
        return f"$ {self.command}\nexit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def _contents(folder: Path) -> set:
    """Every path under ``folder`` (hidden ones too), relative; empty if it is not a folder."""
    if not folder.is_dir():
        return set()
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _prepare_out(ws: Path, name: str, case: Case) -> Path:
    if case.out == "under-a-file":
        return ws / "blocker" / "out"
    out = ws / "out" / name
    if case.out == "prefilled":
        out.mkdir()
        (out / "notes-from-before.txt").write_text("keep me")
    elif case.out == "locked":
        out.mkdir()
        out.chmod(0o500)
    return out


def _run(ws: Path, name: str) -> Run:
    """``shiftlab heatmap ...`` in a fresh working folder of its own (the payload's marker and
    any default runs/ folder would land there)."""
    case = CASES[name]
    out = _prepare_out(ws, name, case)
    before = _contents(out)
    cwd = ws / "cwd" / name
    cwd.mkdir(parents=True)
    args = [case.command, *map(str, case.args(ws, out)), *(["--quiet"] if case.quiet else [])]
    env = dict(os.environ, SHIFTLAB_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               TORCH_HOME=str(ws / "torch_home"))
    env.update(case.env)
    env.pop("SHIFTLAB_DEBUG", None)
    if case.payload_on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ws), os.environ.get("PYTHONPATH")]))
    command = [*_launcher(), *args]
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    finally:
        if case.out == "locked":
            out.chmod(0o755)
    return Run(shlex.join(command), done.returncode, done.stdout, done.stderr, out, cwd, before)


class _Runs:
    """This module's subprocesses: all started at once on a pool, each test waits for its own."""

    def __init__(self, ws: Path, names: list) -> None:
        self.ws = ws
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self.futures: dict[str, Future] = {}
        for name in names:
            self._start(name)

    def _start(self, name: str) -> Future:
        if name not in self.futures:
            self.futures[name] = self.pool.submit(_run, self.ws, name)
        return self.futures[name]

    def __getitem__(self, name: str) -> Run:
        return self._start(name).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def runs(request, workspace):
    """Starts every selected case up front; under xdist (tests spread over workers) on demand."""
    names = []
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        for item in request.session.items:
            callspec = getattr(item, "callspec", None)
            name = callspec.params.get("case") if callspec else None
            if item.module is request.module and name in CASES and not CASES[name].skip:
                names.append(name)
    started = _Runs(workspace, list(dict.fromkeys(names)))
    yield started
    started.close()


def _params(*names: str) -> list:
    params = []
    for name in names:
        case = CASES[name]
        marks = [pytest.mark.skip(reason=case.skip)] if case.skip else []
        if case.xfail:
            marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _stderr_lines(run: Run) -> list:
    return [line for line in run.stderr.splitlines() if line.strip()]


ZERO_PADDING_HINT = "warning: this model pads with zeros"


def _without_padding_hint(lines: list) -> list:
    """The lines, less the one-line hint every zero-padded model measured circularly gets."""
    hints = [line for line in lines if line.startswith(ZERO_PADDING_HINT)]
    assert len(hints) == 1, lines
    return [line for line in lines if not line.startswith(ZERO_PADDING_HINT)]


def _assert_outputs_written(run: Run) -> None:
    assert _contents(run.out) == FAST_OUTPUTS, (sorted(_contents(run.out)), str(run))  # no temp files
    for name in FAST_OUTPUTS:
        assert (run.out / name).stat().st_size > 0, name
    assert _contents(run.cwd) == set(), sorted(_contents(run.cwd))


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(*ERRORS))
def test_bad_input_is_one_error_line_an_exit_code_and_no_output(runs, case):
    run = runs[case]
    assert run.returncode == CASES[case].exit_code, str(run)
    assert "Traceback" not in run.stdout + run.stderr, str(run)
    assert run.stdout == "", str(run)
    lines = _stderr_lines(run)
    assert len(lines) == 1 and lines[0].startswith("error: "), str(run)
    for needle in CASES[case].needles:
        assert needle in lines[0], (needle, lines[0])
    assert _contents(run.out) == run.before, (sorted(_contents(run.out)), str(run))
    assert _contents(run.cwd) == set(), sorted(_contents(run.cwd))  # no runs/, no marker


def test_out_below_an_existing_file_leaves_the_file_alone(runs, workspace):
    assert runs["out-below-an-existing-file"].returncode == 1
    assert (workspace / "blocker").read_text() == "keep me"


@pytest.mark.parametrize("case", _params("pickled-code-checkpoint-loads-with-trust"))
def test_pickled_code_checkpoint_loads_with_trust_checkpoint_and_runs_its_code(runs, case):
    run = runs[case]
    assert run.returncode == 0, str(run)
    assert run.stderr == "", str(run)
    assert run.stdout.startswith(f"{TINY_NAME}: 2 images x 4 shifts at 16 px:"), str(run)
    assert (run.cwd / "unpickled.txt").read_text() == "unpickled"  # its code ran (refused: no file)
    assert _contents(run.out) == set()  # --dry-run writes nothing


@pytest.mark.parametrize("case", _params("mixed-folder"))
def test_mixed_folder_converts_what_it_can_and_reports_what_it_skipped(runs, case):
    run = runs[case]
    assert run.returncode == 0, str(run)
    assert "Traceback" not in run.stderr, str(run)
    lines = _without_padding_hint(_stderr_lines(run))
    assert len(lines) == 2 and all(line.startswith("warning: skipped ") for line in lines), lines
    assert "broken.png" in lines[0] and "corrupt" in lines[0], lines
    assert "tiny.png" in lines[1] and "too small (4x4 px)" in lines[1], lines
    _assert_outputs_written(run)
    loaded = shiftlab.load(run.out / "result.npz")
    assert list(loaded.provenance.images) == MIXED_KEPT
    assert np.isfinite(loaded.mean).all()  # every converted image gave finite distances


@pytest.mark.parametrize("case", _params("nan-layer", "nan-layer-under-quiet"))
def test_nan_layer_is_reported_and_left_out_of_the_means(runs, case):
    run = runs[case]
    assert run.returncode == 0, str(run)  # README: counted per layer, reported, left out
    assert "Traceback" not in run.stderr, str(run)
    warnings = [line for line in _without_padding_hint(_stderr_lines(run))
                if line.startswith("warning: ")]
    assert len(warnings) == 1, str(run)
    assert re.search(r"non-finite values \(NaN/Inf\) in 1 layer, left out of the means:"
                     r" 1 \(8 of 8 image-shifts\)$", warnings[0]), warnings
    _assert_outputs_written(run)
    loaded = shiftlab.load(run.out / "result.npz")
    assert loaded.nonfinite_layers() == ["1"]
    assert [bool(n.sum()) for n in loaded.n_nan] == [False, True, False, False]
    with open(run.out / "summary.csv", newline="") as handle:
        means = {row["layer"]: row["mean"] for row in csv.DictReader(handle)}
    assert not means["1"] or math.isnan(float(means["1"])), means  # pandas writes NaN as ''
    assert all(math.isfinite(float(means[name])) for name in ("0", "2", "3")), means


def test_sigterm_during_a_measurement_exits_143_with_one_line(workspace, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "started"
    env = dict(os.environ, SHIFTLAB_OFFLINE="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               STARTED_MARKER=str(marker))
    env.pop("SHIFTLAB_DEBUG", None)
    command = [*_launcher(), "heatmap", "--model", f"{workspace / 'factories.py'}:slow", "--images",
               str(workspace / "images"), *FAST, "--quiet", "--out", str(out)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the model is running (imports take a few seconds)
            if marker.exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert marker.exists(), proc.communicate()
        proc.send_signal(15)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM)"), stderr
    assert "Traceback" not in stderr and stdout == ""
    assert _contents(out) <= {".shiftlab-progress.npz"}  # no outputs, no staging folder
