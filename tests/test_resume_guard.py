"""--resume continues only the run its progress file names; it never replaces a finished set."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import random_png_folder
from shiftlab.cli.commands import main
from shiftlab.cli.jobs import run_heatmap
from shiftlab.errors import UsageError
from shiftlab.figures.options import FigureOptions
from shiftlab.requests import HeatmapRequest, ModelSpec

TINY = f"{Path(__file__).resolve().with_name('conftest.py')}:tiny_classifier"
FAST = ["--size", "16", "--max-shift", "2", "--max-images", "2", "--batch-size", "8",
        "--device", "cpu", "--format", "png", "--dpi", "30", "--quiet"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_heatmap_resume_of_a_finished_run_is_refused_and_changes_nothing(tmp_path):
    images = random_png_folder(tmp_path / "images", count=2, side=24)
    out = tmp_path / "out"
    assert invoke("heatmap", "--model", TINY, "--images", images, *FAST, "--out", out).exit_code == 0
    before = snapshot(out)
    other = invoke("heatmap", "--model", "vgg11", "--weights", "none", "--images", images, *FAST,
                   "--out", out, "--resume")
    assert other.exit_code == 2
    assert "holds no progress of this run" in other.output and "--overwrite" in other.output
    assert snapshot(out) == before


def test_consistency_protocol_resume_of_a_finished_run_is_refused(tmp_path):
    images = random_png_folder(tmp_path / "images", count=3, side=24)
    out = tmp_path / "out"
    args = ["consistency", "--model", TINY, "--images", images, "--protocol", "zhang2019",
            "--size", "16", "--resize", "20", "--device", "cpu", "--format", "png", "--dpi", "30",
            "--quiet", "--out", out]
    assert invoke(*args).exit_code == 0
    before = snapshot(out)
    again = invoke(*args, "--resume")
    assert again.exit_code == 2 and "holds no progress of this run" in again.output
    assert snapshot(out) == before


def test_protocol_resume_with_another_model_refuses_the_other_models_progress(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".shiftlab-progress-resnet18.npz").write_bytes(b"progress of another model")
    images = random_png_folder(tmp_path / "images", count=2, side=24)
    result = invoke("consistency", "--model", TINY, "--images", images, "--protocol", "zhang2019",
                    "--size", "16", "--resize", "20", "--device", "cpu", "--out", out, "--resume")
    assert result.exit_code == 2
    assert ".shiftlab-progress-resnet18.npz" in result.output
    assert (out / ".shiftlab-progress-resnet18.npz").read_bytes() == b"progress of another model"


def test_resume_is_refused_under_torchrun_instead_of_ignored(tmp_path):
    request = HeatmapRequest(ModelSpec(TINY))
    with pytest.raises(UsageError, match="not available under torchrun"):
        run_heatmap(request, FigureOptions(), padding_both=False, out=tmp_path / "out",
                    overwrite=False, quiet=True, resume=True, dry_run=False,
                    distributed_run=True)


def test_a_second_run_into_an_out_folder_in_use_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    images = random_png_folder(tmp_path / "images", count=2, side=24)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".shiftlab-lock").write_text(str(holder.pid))  # as a running shiftlab leaves it
        result = invoke("heatmap", "--model", TINY, "--images", images, *FAST, "--out", out)
        assert result.exit_code == 2
        assert f"in use by another shiftlab run (process {holder.pid})" in result.output
        assert sorted(p.name for p in out.iterdir()) == [".shiftlab-lock"]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and the next run takes it over, then removes it
    assert invoke("heatmap", "--model", TINY, "--images", images, *FAST, "--out", out).exit_code == 0
    assert not (out / ".shiftlab-lock").exists() and (out / "result.npz").is_file()


def test_two_runs_started_together_into_one_fresh_folder_do_not_both_write(tmp_path):
    import os
    import subprocess
    import sys

    images = random_png_folder(tmp_path / "images", count=2, side=24)
    out = tmp_path / "out"
    env = {**os.environ, "SHIFTLAB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    command = [sys.executable, "-m", "shiftlab", "heatmap", "--model", TINY, "--images",
               str(images), *FAST, "--out", str(out)]
    runs = [subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    codes = sorted(run.wait(timeout=300) for run in runs)
    errors = [run.stderr.read() for run in runs]
    assert codes == [0, 2], errors  # never both: one writes, the other is refused in one line
    refusal = next(e for e, run in zip(errors, runs) if run.returncode == 2)
    # overlapping: the folder is in use; one after the other: it holds the first one's results
    assert "in use by another shiftlab run" in refusal or "already holds" in refusal, refusal
    assert len(refusal.strip().splitlines()) == 1
