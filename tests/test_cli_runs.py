"""CLI run control: --dry-run, --resume after Ctrl-C, and torchrun -m shiftlab heatmap."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import shiftlab
from shiftlab.cli.commands import main
from conftest import INTERRUPTIBLE_FACTORY, random_png_folder, run_torchrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tmp_path):
    images = random_png_folder(tmp_path / "images")
    factory = tmp_path / "net.py"
    factory.write_text(INTERRUPTIBLE_FACTORY)
    return images, f"{factory}:build"


def args(images, model, out, *extra):
    return ["heatmap", "--model", model, "--weights", "none", "--images", str(images), "--size", "16",
            "--max-shift", "3", "--batch-size", "2", "--device", "cpu", "--format", "png", "--dpi", "30",
            "--quiet", "--out", str(out), *extra]


def test_dry_run_estimates_and_writes_nothing(setup, tmp_path):
    images, model = setup
    result = CliRunner().invoke(main, args(images, model, tmp_path / "out", "--dry-run"))
    assert result.exit_code == 0, result.output
    assert "forward passes" in result.output and "estimated" in result.output
    # 4 images in batches of 2; 8 shifted inputs 1 per pass + the reference: 2 x 9 passes
    assert "18 forward passes" in result.output
    # and what the figures will cost: one panel per layer of the model
    assert "figures: 1 x a layer grid of" in result.output and " MB" in result.output
    assert not (tmp_path / "out").exists()


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    images, model = setup
    runner = CliRunner()
    clean = runner.invoke(main, args(images, model, tmp_path / "clean"))
    assert clean.exit_code == 0, clean.output
    out = tmp_path / "out"
    # forwards: 2 probes, then 9 per image batch -> the 15th is inside the second batch
    monkeypatch.setenv("INTERRUPT_AT", "15")
    interrupted = runner.invoke(main, args(images, model, out))
    assert interrupted.exit_code == 130
    assert (out / ".shiftlab-progress.npz").is_file() and not (out / "result.npz").exists()
    monkeypatch.delenv("INTERRUPT_AT")
    resumed = runner.invoke(main, args(images, model, out, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    a, b = shiftlab.load(tmp_path / "clean" / "result.npz"), shiftlab.load(out / "result.npz")
    np.testing.assert_allclose(b.mean, a.mean, atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(b.n, a.n)
    assert not (out / ".shiftlab-progress.npz").exists()


def test_resume_needs_an_out_folder(setup):
    images, model = setup
    result = CliRunner().invoke(main, ["heatmap", "--model", model, "--resume"])
    assert result.exit_code == 2 and "--out" in result.stderr


def test_torchrun_heatmap_writes_once_and_equals_a_single_process(setup, tmp_path):
    images, model = setup
    single = CliRunner().invoke(main, args(images, model, tmp_path / "single"))
    assert single.exit_code == 0, single.output
    run_torchrun(["-m", "shiftlab", *args(images, model, tmp_path / "ddp")], tmp_path)
    a, b = shiftlab.load(tmp_path / "single" / "result.npz"), shiftlab.load(tmp_path / "ddp" / "result.npz")
    assert b.meta["n_images"] == 4
    np.testing.assert_allclose(b.mean, a.mean, atol=1e-6, equal_nan=True)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())
