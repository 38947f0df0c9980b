"""How measure() time scales with the number of shifts and of images (one process, one run).

    python -m benchmarks.scaling --model vgg16 --size 64
    python -m benchmarks.scaling --model vgg16 --size 64 --images 1 --shifts 2,4,8,16 \\
        --align exact,fourier,bilinear --plot benchmarks/scaling.png

prints a table of seconds per (alignment, images, shifts) and the time per image-shift; with
``--plot FILE`` also a PNG of ms per image·shift against the number of shifts, one line per
alignment and image count.

The objects alive after the warm-up (about 340,000 after importing torch) are frozen out of
Python's garbage collector (``gc.freeze``): otherwise whichever call happens to trigger a full
collection pays ~0.15 s for it (vgg16 at 64 px: one point of the plot at 28–47 ms per
image·shift instead of 20–22), a cost of the process, not of the number of shifts.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

import shiftlab
from shiftlab.equivariance.shifts import ShiftGrid


def plot(rows: list[dict], path: str, title: str) -> None:
    """ms per image·shift against the number of shifts (log scale), one line per alignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), layout="constrained")
    for align in dict.fromkeys(row["align"] for row in rows):
        for n in dict.fromkeys(row["images"] for row in rows):
            line = [row for row in rows if row["align"] == align and row["images"] == n]
            axes.plot([row["shifts"] for row in line], [row["ms_per_image_shift"] for row in line],
                      marker="o", label=f"{align}, {n} image{'s' if n > 1 else ''}")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("shifts per image")
    axes.set_ylabel("ms per image·shift")
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.legend()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shifts", default="4,8,16", help="square grid sides K (K x K shifts)")
    parser.add_argument("--images", default="1,2,4")
    parser.add_argument("--align", default="bilinear", help="alignments, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plot", default=None, metavar="FILE", help="also write a PNG plot here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model
    pool = torch.randn(max(int(n) for n in args.images.split(",")), 3, args.size, args.size,
                       generator=torch.Generator().manual_seed(0))
    shiftlab.measure(model, pool[:1], ShiftGrid.square(2), device="cpu", progress=False)  # warm-up
    gc.collect()
    gc.freeze()
    rows = []
    for align in [a for a in args.align.split(",") if a]:
        for n in [int(v) for v in args.images.split(",")]:
            for k in [int(v) for v in args.shifts.split(",")]:
                started = time.perf_counter()
                shiftlab.measure(model, pool[:n], ShiftGrid.square(k), align=align,
                                 batch_size=args.batch_size, device="cpu", progress=False)
                seconds = time.perf_counter() - started
                rows.append({"align": align, "images": n, "shifts": k * k,
                             "seconds": round(seconds, 2),
                             "ms_per_image_shift": round(1000 * seconds / (n * k * k), 2)})
    print(f"{'align':>9} {'images':>6} {'shifts':>6} {'seconds':>8} {'ms/(image*shift)':>17}")
    for row in rows:
        print(f"{row['align']:>9} {row['images']:>6} {row['shifts']:>6} {row['seconds']:>8.2f}"
              f" {row['ms_per_image_shift']:>17.2f}")
    print(json.dumps(rows))
    if args.plot:
        plot(rows, args.plot, f"{args.model} {args.size} px, batch {args.batch_size}, CPU")


if __name__ == "__main__":
    main()
