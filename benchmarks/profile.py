"""Where the time of one ``measure`` call goes, by PyTorch operator (torch.profiler).

    python -m benchmarks.profile --model resnet50 --size 224 --grid 4 --align bilinear
    python -m benchmarks.profile --model resnet50 --align fourier --by-size

After one warm-up call on a 2×2 grid, profiles one call on 2 random images and prints the
operators with the most self CPU time. ``--by-size`` instead times the comparisons (the plans'
``compare``) per feature-map width: seconds, calls and ns per shifted value.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

import shiftlab
from shiftlab.equivariance.shifts import ShiftGrid

from shiftlab.equivariance.align import RollPlan
from shiftlab.equivariance.bilinear import BilinearPlan

from .bench import stable_malloc


def by_size(run) -> None:
    """Time every plan's ``compare`` during ``run()``, grouped by the width of the maps."""
    seconds: dict = collections.Counter()
    calls: dict = collections.Counter()
    values: dict = collections.Counter()
    originals = {plan: plan.compare for plan in (RollPlan, BilinearPlan)}

    def timed(original):
        def compare(self, ref, shifted, *args, **kwargs):
            started = time.perf_counter()
            out = original(self, ref, shifted, *args, **kwargs)
            width = ref.shape[-1]
            seconds[width] += time.perf_counter() - started
            calls[width] += 1
            values[width] += shifted.numel()
            return out
        return compare

    for plan, original in originals.items():
        plan.compare = timed(original)
    try:
        run()
    finally:
        for plan, original in originals.items():
            plan.compare = original
    print(f"{'width':>5} {'seconds':>8} {'calls':>6} {'ns/shifted value':>17}")
    for width in sorted(seconds):
        print(f"{width:>5} {seconds[width]:>8.3f} {calls[width]:>6}"
              f" {1e9 * seconds[width] / values[width]:>17.2f}")
    print(f"{'all':>5} {sum(seconds.values()):>8.3f} {sum(calls.values()):>6}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--align", default="bilinear")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--malloc", choices=("default", "stable"), default="default")
    parser.add_argument("--by-size", action="store_true",
                        help="time the comparisons per map width instead of profiling operators")
    args = parser.parse_args(argv)
    if args.malloc == "stable":
        stable_malloc()
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model.eval()
    images = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    shiftlab.measure(model, images[:1], ShiftGrid.square(2), align=args.align, device="cpu",
                     progress=False)
    def run() -> None:
        shiftlab.measure(model, images, ShiftGrid.square(args.grid), align=args.align,
                         batch_size=16, device="cpu", progress=False)

    if args.by_size:
        by_size(run)
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
