"""torchrun with 2 gloo processes gives the single-process result (issue: scale-out)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
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
