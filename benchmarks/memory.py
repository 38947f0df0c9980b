"""Peak memory of one shiftlab.measure run in a fresh process (so no earlier run's heap counts).

    python -m benchmarks.memory --model vgg16 --size 64 --shifts 256
prints one JSON line: {"shifts": ..., "peak_rss_mb": ..., "seconds": ...}
(``--align`` picks the alignment; bilinear, the default, by default.)
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch

import shiftlab
from shiftlab.equivariance.shifts import ShiftGrid


def _peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would include the parent's peak before exec)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shifts", type=int, default=16, help="a square number gives a square grid")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--align", default="bilinear", choices=("exact", "bilinear", "fourier"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model
    images = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    k = math.isqrt(args.shifts)
    grid = ShiftGrid.square(k) if k * k == args.shifts else ShiftGrid.diagonal(args.shifts)
    started = time.perf_counter()
    shiftlab.measure(model, images, grid, align=args.align, batch_size=args.batch_size,
                     device="cpu", progress=False)
    peak = _peak_rss_mb()
    print(json.dumps({"shifts": len(grid), "peak_rss_mb": round(peak, 1),
                      "seconds": round(time.perf_counter() - started, 2)}))


if __name__ == "__main__":
    main()
