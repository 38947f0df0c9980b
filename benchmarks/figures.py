"""What a layer grid costs to draw and save, per format: seconds and peak memory.

    python -m benchmarks.figures --layers 100,200 --formats png,pdf --dpi 150

Each (layers, format) runs in a fresh process on a synthetic result (an 8x8 grid, mixed
strides, two global layers; random values), so one figure's memory never hides another's.
Printed per run: time to build the figure, time to save it, the peak RSS of the process and
the RSS before the figure existed (Python, torch and matplotlib), and the file size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import math, os, resource, sys, time, tempfile
import matplotlib
matplotlib.use("Agg")
import numpy as np
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.equivariance.shifts import ShiftGrid
from shiftlab.figures.plots import layer_grid, save_figure
from shiftlab.results.provenance import Provenance
from shiftlab.results.result import Result, Settings

n_layers, fmt, dpi = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
grid = ShiftGrid.square(8)
layers = []
for i in range(n_layers - 2):
    stride = float(2 ** min(5, i * 6 // n_layers))
    module = ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"][i % 4]
    layers.append(LayerInfo(f"stages.{i // 20}.blocks.{i % 20}.conv_dw", module, "spatial",
                            (stride, stride), (stride, stride), (64, 8, 8)))
nan2 = (math.nan, math.nan)
layers += [LayerInfo("head.global_pool", "SelectAdaptivePool2d", "global", nan2, nan2, (320,)),
           LayerInfo("head.fc", "Linear", "global", nan2, nan2, (1000,))]
mean = np.random.default_rng(0).uniform(0.01, 0.3, size=(len(layers), len(grid)))
mean[:, 0] = 0.0
n = np.full(mean.shape, 6)
result = Result(settings=Settings(grid=grid, size=(112, 112)), layers=layers, mean=mean,
                std=np.zeros_like(mean), n=n, n_inf=np.zeros_like(n), n_nan=np.zeros_like(n),
                provenance=Provenance(model="synthetic", n_images=6))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
figure = layer_grid(result)
built = time.perf_counter()
with tempfile.TemporaryDirectory() as folder:
    paths = save_figure(figure, os.path.join(folder, "heatmap"), formats=(fmt,), dpi=dpi)
    saved = time.perf_counter()
    size = os.path.getsize(paths[0]) / 1024
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{n_layers} {fmt} {built - start:.2f} {saved - built:.2f} {peak:.0f} {before:.0f} {size:.0f}")
"""


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="100,200", help="panel counts, comma-separated")
    parser.add_argument("--formats", default="png,pdf", help="formats, comma-separated")
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'layers':>6} {'format':>6} {'build s':>8} {'save s':>7} {'peak MB':>8}"
          f" {'before MB':>9} {'file KB':>8}")
    for layers in (int(v) for v in args.layers.split(",")):
        for fmt in args.formats.split(","):
            out = subprocess.run([sys.executable, "-c", _CHILD, str(layers), fmt, str(args.dpi)],
                                 capture_output=True, text=True, check=True).stdout.split()
            row = dict(zip(("layers", "format", "build_s", "save_s", "peak_mb", "before_mb",
                            "file_kb"), out))
            rows.append(row)
            print(f"{row['layers']:>6} {row['format']:>6} {row['build_s']:>8} {row['save_s']:>7}"
                  f" {row['peak_mb']:>8} {row['before_mb']:>9} {row['file_kb']:>8}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
