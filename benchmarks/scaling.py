"""How measure() time scales with the number of shifts and of images (one process, one run).

    python -m benchmarks.scaling --model vgg16 --size 64
prints a table of seconds per (images, shifts) and the time per image-shift.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import shiftlab
from shiftlab.shifts import ShiftGrid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--shifts", default="4,8,16", help="square grid sides K (K x K shifts)")
    parser.add_argument("--images", default="1,2,4")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model
    pool = torch.randn(max(int(n) for n in args.images.split(",")), 3, args.size, args.size,
                       generator=torch.Generator().manual_seed(0))
    shiftlab.measure(model, pool[:1], ShiftGrid.square(2), device="cpu", progress=False)  # warm-up
    rows = []
    for n in [int(v) for v in args.images.split(",")]:
        for k in [int(v) for v in args.shifts.split(",")]:
            started = time.perf_counter()
            shiftlab.measure(model, pool[:n], ShiftGrid.square(k), batch_size=args.batch_size,
                             device="cpu", progress=False)
            seconds = time.perf_counter() - started
            rows.append({"images": n, "shifts": k * k, "seconds": round(seconds, 2),
                         "ms_per_image_shift": round(1000 * seconds / (n * k * k), 2)})
    print(f"{'images':>6} {'shifts':>6} {'seconds':>8} {'ms/(image*shift)':>17}")
    for row in rows:
        print(f"{row['images']:>6} {row['shifts']:>6} {row['seconds']:>8.2f} {row['ms_per_image_shift']:>17.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
