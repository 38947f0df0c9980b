"""Every alignment against the floor and the naive loop over a matrix of configurations.

    python -m benchmarks.matrix --models vgg16,resnet50 --sizes 64,224 --grids 4,8

runs ``python -m benchmarks`` (without its memory check) for each model, input size and K×K
grid, one configuration after the other in this process, and prints one table of ratios to the
floor: is any alignment slower than the naive loop anywhere? ``--json FILE`` keeps the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json

from .bench import main as bench


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--sizes", default="64,224")
    parser.add_argument("--grids", default="4,8")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--malloc", choices=("default", "stable"), default="default")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            for grid in [int(g) for g in args.grids.split(",")]:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    report = bench(["--model", model, "--size", str(size), "--grid", str(grid),
                                    "--images", str(args.images), "--repeat", str(args.repeat),
                                    "--memory-shifts", "", "--malloc", args.malloc])
                ratios = {row["variant"].replace("measure align=", "").split(" ")[0]: row["ratio_to_floor"]
                          for row in report["rows"]}
                row = {"model": model, "size": size, "grid": f"{grid}x{grid}", **ratios}
                row["slowest_vs_naive"] = max(ratios[a] for a in ("exact", "fourier", "bilinear")) / ratios["naive"]
                rows.append(row)
                print(f"{model:<10} {size:>4}px {grid}x{grid}: " + "  ".join(
                    f"{k} {v:.2f}" for k, v in ratios.items()) +
                      f"  | slowest alignment / naive {row['slowest_vs_naive']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
