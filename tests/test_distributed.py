"""torchrun with 2 gloo processes gives the single-process result (issue: scale-out)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import shiftlab
from shiftlab import ShiftGrid
from conftest import run_torchrun

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, {tests!r})
    import shiftlab
    from shiftlab import distributed
    from conftest import make_maxpool
    assert distributed.init_from_env(), "torchrun did not set WORLD_SIZE"
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    result = shiftlab.measure(make_maxpool(), images, shiftlab.ShiftGrid.square(4), align={align!r},
                              batch_size=4, device="cpu", progress=False)
    if distributed.is_main():
        result.save(sys.argv[1])
    torch.distributed.destroy_process_group()
''')


def measure_with_torchrun(tmp_path: Path, align: str) -> shiftlab.Result:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests"), align=align))
    out = tmp_path / "result.npz"
    run_torchrun([script, out], tmp_path)
    return shiftlab.load(out)


def test_two_gloo_ranks_equal_the_single_process_result(tmp_path):
    from conftest import make_maxpool

    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    single = shiftlab.measure(make_maxpool(), images, ShiftGrid.square(4), align="bilinear",
                              batch_size=4, device="cpu", progress=False)
    sharded = measure_with_torchrun(tmp_path, "bilinear")
    assert sharded.meta["n_images"] == 5
    np.testing.assert_array_equal(sharded.n, single.n)  # every image counted once
    np.testing.assert_allclose(sharded.mean, single.mean, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(sharded.std, single.std, atol=1e-6, equal_nan=True)


def test_a_peer_that_died_is_one_line_not_the_backends_report_a_bug_message(monkeypatch):
    from shiftlab import distributed
    from shiftlab.errors import ShiftlabError

    def closed(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection"
                           " closed by peer [127.0.0.1]:29500")

    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "all_gather_object", closed)
    monkeypatch.setattr(distributed.dist, "barrier", closed)
    for call in (lambda: distributed.gather(1), distributed.finish):
        with pytest.raises(ShiftlabError, match="another torchrun process stopped, so process 0"
                                                " cannot go on .*Connection closed by peer"):
            call()
