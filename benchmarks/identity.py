"""Bit-identity of a fixed set of CLI runs: sha256 of every numeric array they save.

A refactor that should not change any number is checked by running this before and after:

    python -m benchmarks.identity --save before.json      # on the old code
    python -m benchmarks.identity --check before.json     # on the new code: exit 1 on a change

The runs: heatmap on vgg11 at 32 px in all three alignments, compare with --antialias 4, and
consistency (grid and zhang2019) on a generated folder of images. Everything is seeded and
uses random-init weights (--weights none), so no download is needed. The digests depend on the
CPU and the torch build; compare two codes on one machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

COMMON = ["--weights", "none", "--size", "32", "--max-shift", "4", "--device", "cpu"]
FIGURES = ["--format", "png", "--dpi", "30"]


def runs(images: Path) -> dict[str, list[str]]:
    """The fixed runs: name -> shiftlab arguments (without --out)."""
    out = {f"heatmap-{align}": ["heatmap", "--model", "vgg11", *COMMON, *FIGURES,
                                "--align", align]
           for align in ("bilinear", "exact", "fourier")}
    # BlurPool's reflect padding needs maps of 3 px or more: at 64 px (given last, it wins) the last BlurPool reads a 4 x 4 map
    out["compare-aa4"] = ["compare", "--model", "vgg11", "--antialias", "4", *COMMON, *FIGURES,
                          "--size", "64", "--layers", "features.*"]
    out["consistency-grid"] = ["consistency", "--model", "vgg11", *COMMON, "--images",
                               str(images), "--format", "png"]
    out["consistency-zhang2019"] = ["consistency", "--model", "vgg11", "--weights", "none",
                                    "--size", "32", "--resize", "40", "--protocol", "zhang2019",
                                    "--epochs", "2", "--device", "cpu", "--images", str(images),
                                    "--format", "png"]
    return out


def make_images(folder: Path, count: int = 6, seed: int = 0) -> Path:
    """``count`` seeded random-noise photographs (48 x 56 PNG) in ``folder``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, size=(48, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image{index}.png")
    return folder


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every numeric array of every .npz file in ``folder`` (the JSON header and
    timings are text, left out)."""
    out = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            for name in sorted(data.files):
                array = data[name]
                if array.dtype.kind in "biufc":
                    out[f"{path.name}:{name}"] = hashlib.sha256(
                        np.ascontiguousarray(array).tobytes()).hexdigest()
    return out


def measure_all(work: Path) -> dict[str, dict[str, str]]:
    images = make_images(work / "images")
    env = {**os.environ, "SHIFTLAB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    out = {}
    for name, args in runs(images).items():
        folder = work / name
        command = [sys.executable, "-m", "shiftlab", *args, "--out", str(folder), "--quiet"]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed ({done.returncode}): {done.stderr.strip()}")
        out[name] = digests(folder)
        print(f"{name}: {len(out[name])} arrays", file=sys.stderr)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--save", type=Path, help="write the digests to this JSON file")
    action.add_argument("--check", type=Path, help="compare with the digests of this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        found = measure_all(Path(work))
    if args.save:
        args.save.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.save}")
        return 0
    expected = json.loads(args.check.read_text())
    changed = [f"{run}/{key}" for run in sorted(set(expected) | set(found))
               for key in sorted(set(expected.get(run, {})) | set(found.get(run, {})))
               if expected.get(run, {}).get(key) != found.get(run, {}).get(key)]
    total = sum(len(v) for v in expected.values())
    if changed:
        print(f"{len(changed)} of {total} arrays differ:\n  " + "\n  ".join(changed))
        return 1
    print(f"all {total} arrays bit-identical across {len(expected)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
