"""Where the time of one ``measure`` call goes, by PyTorch operator (torch.profiler).

    python -m benchmarks.profile --model resnet50 --size 224 --grid 4 --align bilinear

After one warm-up call on a 2×2 grid, profiles one call on 2 random images and prints the
operators with the most self CPU time.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import shiftlab
from shiftlab.shifts import ShiftGrid

from .bench import stable_malloc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--align", default="bilinear")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--malloc", choices=("default", "stable"), default="default")
    args = parser.parse_args(argv)
    if args.malloc == "stable":
        stable_malloc()
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model.eval()
    images = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    shiftlab.measure(model, images[:1], ShiftGrid.square(2), align=args.align, device="cpu",
                     progress=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        shiftlab.measure(model, images, ShiftGrid.square(args.grid), align=args.align,
                         batch_size=16, device="cpu", progress=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
