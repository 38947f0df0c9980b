"""shiftlab consistency at scale: per-epoch --resume of the protocols and torchrun sharding."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shiftlab import distributed, load_invariance, load_protocol
from shiftlab.cli.commands import main
from shiftlab.invariance.protocols import consistency_protocol
from shiftlab.data.sources import image_batches
from conftest import INTERRUPTIBLE_FACTORY, random_png_folder, run_torchrun



@pytest.fixture
def setup(tmp_path):
    """Three class folders '0', '1', '2' of 3 random PNGs each, and the factory's spec."""
    root = tmp_path / "val"
    for label in range(3):
        random_png_folder(root / str(label), count=3, side=28)
        for path in (root / str(label)).iterdir():  # distinct images per class
            path.rename(path.with_name(f"{label}-{path.name}"))
    factory = tmp_path / "net.py"
    factory.write_text(INTERRUPTIBLE_FACTORY)
    return root, f"{factory}:build"


def args(root, model, out, protocol="zhang2019", *extra):
    return ["consistency", "--model", model, "--weights", "none", "--num-classes", "3",
            "--labels", str(root), "--protocol", protocol, "--size", "16", "--resize", "24",
            *(["--epochs", "3"] if protocol != "grid" else []),  # grid refuses --epochs
            "--batch-size", "4", "--device", "cpu", "--format", "png",
            "--dpi", "30", "--quiet", "--out", str(out), *extra]


def assert_same_protocol(a, b):
    for name in ("image", "offsets", "predictions", "labels"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    np.testing.assert_allclose(b.probability, a.probability, rtol=1e-6, equal_nan=True)


def test_resume_after_ctrl_c_in_an_epoch_equals_an_uninterrupted_protocol(setup, tmp_path,
                                                                           monkeypatch):
    root, model = setup
    runner = CliRunner()
    clean = runner.invoke(main, args(root, model, tmp_path / "clean"))
    assert clean.exit_code == 0, clean.output
    out = tmp_path / "out"
    # 9 images in batches of 4: 3 batches x 2 windows = 6 forwards per epoch -> 9th is in epoch 2
    monkeypatch.setenv("INTERRUPT_AT", "9")
    interrupted = runner.invoke(main, args(root, model, out))
    assert interrupted.exit_code == 130
    progress = list(out.glob(".shiftlab-progress-*.npz"))
    assert len(progress) == 1 and not list(out.glob("protocol-*.npz"))
    with np.load(progress[0]) as saved:
        assert int(saved["n_epochs"]) == 1  # epoch 1 kept, the interrupted epoch 2 is not
    monkeypatch.setenv("INTERRUPT_AT", "4")  # resumed: epoch 1 is not run again, so this is
    # the 4th forward of epoch 2 ...
    again = runner.invoke(main, args(root, model, out, "zhang2019", "--resume"))
    assert again.exit_code == 130
    monkeypatch.delenv("INTERRUPT_AT")
    resumed = runner.invoke(main, args(root, model, out, "zhang2019", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    [a] = list((tmp_path / "clean").glob("protocol-*.npz"))
    [b] = list(out.glob("protocol-*.npz"))
    assert_same_protocol(load_protocol(a), load_protocol(b))
    assert load_protocol(b).n_pairs == 27
    assert not list(out.glob(".shiftlab-progress-*.npz"))  # removed once the outputs are in place


def test_resume_refuses_another_seed_and_the_grid_protocol(setup, tmp_path, monkeypatch):
    root, model = setup
    out = tmp_path / "out"
    monkeypatch.setenv("INTERRUPT_AT", "9")
    assert CliRunner().invoke(main, args(root, model, out)).exit_code == 130
    monkeypatch.delenv("INTERRUPT_AT")
    other = CliRunner().invoke(main, args(root, model, out, "zhang2019", "--resume", "--seed", "1"))
    assert other.exit_code != 0 and "cannot resume" in other.output and "seed" in other.output
    grid = CliRunner().invoke(main, args(root, model, out, "grid", "--resume"))
    assert grid.exit_code == 2 and "grid protocol runs in one pass" in grid.output


def test_resume_with_more_epochs_continues_a_finished_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveMaxPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    images = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    batches = [(images[:3], torch.tensor([0, 1, 2])), (images[3:], torch.tensor([1, 0]))]
    full = consistency_protocol(model, batches, size=8, epochs=4, progress=False, device="cpu")
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "progress.npz"
        consistency_protocol(model, batches, size=8, epochs=2, progress=False, device="cpu",
                             checkpoint=path)
        calls = []
        model.register_forward_hook(lambda *_: calls.append(1))
        more = consistency_protocol(model, batches, size=8, epochs=4, progress=False, device="cpu",
                                    checkpoint=path, resume=True)
    assert len(calls) == 2 * 2 * 2  # only epochs 3 and 4: 2 batches x 2 windows each
    assert_same_protocol(full, more)


def test_a_sharded_stream_decodes_only_its_share_with_source_positions(tmp_path, monkeypatch):
    folder = random_png_folder(tmp_path / "images", count=5, side=20)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    stream = image_batches(folder, size=16, batch_size=4, shard=True)
    batches = list(stream)
    assert stream.sharded and stream.total == 2
    assert [i for b in batches for i in b.indices] == [1, 3]
    assert [p.name for b in batches for p in b.paths] == ["1.png", "3.png"]
    monkeypatch.setattr(distributed, "world_size", lambda: 6)
    monkeypatch.setattr(distributed, "rank", lambda: 5)
    assert list(image_batches(folder, size=16, shard=True)) == []  # 5 images, 6 ranks: none here


@pytest.mark.parametrize("protocol", ["zhang2019", "grid"])
def test_torchrun_consistency_writes_once_and_equals_a_single_process(setup, tmp_path, protocol):
    root, model = setup
    extra = ("--max-shift", "2") if protocol == "grid" else ()
    single = CliRunner().invoke(main, args(root, model, tmp_path / "single", protocol, *extra))
    assert single.exit_code == 0, single.output
    run_torchrun(["-m", "shiftlab", *args(root, model, tmp_path / "ddp", protocol, *extra)], tmp_path)
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == sorted(
        p.name for p in (tmp_path / "single").iterdir())
    pattern = "protocol-*.npz" if protocol == "zhang2019" else "invariance-*.npz"
    [a] = list((tmp_path / "single").glob(pattern))
    [b] = list((tmp_path / "ddp").glob(pattern))
    if protocol == "zhang2019":
        assert_same_protocol(load_protocol(a), load_protocol(b))
    else:
        a, b = load_invariance(a), load_invariance(b)
        np.testing.assert_array_equal(b.grid_argmax, a.grid_argmax)
        np.testing.assert_array_equal(b.reference_argmax, a.reference_argmax)
        np.testing.assert_allclose(b.grid_prob, a.grid_prob, rtol=1e-5, equal_nan=True)
        assert b.summary() == pytest.approx(a.summary(), nan_ok=True)


def test_torchrun_with_unreadable_files_on_one_rank_equals_one_process(setup, tmp_path):
    """Files 1, 3, 5, 7 (rank 1's share) are unreadable: rank 1 has no image, yet the run is the
    single-process one (which skips them), and rank 1's skips are reported by rank 0."""
    root, model = setup
    files = sorted(p for folder in sorted(root.iterdir()) for p in sorted(folder.iterdir()))
    for path in files[1::2]:
        path.write_bytes(b"not an image")
    single = CliRunner().invoke(main, args(root, model, tmp_path / "single"))
    assert single.exit_code == 0, single.output
    stderr = run_torchrun(["-m", "shiftlab", *args(root, model, tmp_path / "ddp")], tmp_path)
    [a] = list((tmp_path / "single").glob("protocol-*.npz"))
    [b] = list((tmp_path / "ddp").glob("protocol-*.npz"))
    assert_same_protocol(load_protocol(a), load_protocol(b))
    assert load_protocol(b).n_images == 5
    assert stderr.count("skipped") >= 4


def test_an_error_on_one_rank_is_the_same_one_line_error_on_every_rank(setup, tmp_path):
    """A label out of range in rank 1's share only: no rank is left waiting in a collective."""
    root, model = setup
    files = sorted(p for folder in sorted(root.iterdir()) for p in sorted(folder.iterdir()))
    rows = [f"{path},{7 if index == 3 else int(path.parent.name)}" for index, path in enumerate(files)]
    table = tmp_path / "labels.csv"
    table.write_text("file,label\n" + "\n".join(rows) + "\n")
    command = args(table, model, tmp_path / "ddp")
    stderr = run_torchrun(["-m", "shiftlab", *command], tmp_path, expect_success=False)
    # torchrun stops the other rank once one has failed, so one or both lines may be printed;
    # never a lost-peer error from the collective the failing rank did not reach
    assert stderr.count("error: label 7 is out of range") >= 1, stderr[-1500:]
    assert "exitcode  : 2" in stderr
    assert "Connection closed" not in stderr and "gloo" not in stderr.lower()


def test_a_figure_that_fails_leaves_the_numbers_and_no_checkpoint(setup, tmp_path, monkeypatch):
    from shiftlab.figures import tradeoff

    root, model = setup
    def broken(*_, **__):
        raise RuntimeError("no drawing today")
    monkeypatch.setattr(tradeoff, "diagonal_plot", broken)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, args(root, model, out, "diagonal"))
    assert result.exit_code != 0
    assert list(out.glob("protocol-*.npz")) and not list(out.glob(".shiftlab-progress-*"))
