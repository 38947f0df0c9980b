"""Benchmark shiftlab.measure against the floor (bare forwards) and the naive approach, in one run.

    python -m benchmarks --model vgg16 --size 112 --grid 4 --images 2

Every variant sees the same images and shifts. Reported: wall time, images x shifts per second,
peak memory above the starting point (RSS on CPU, max_memory_allocated on CUDA) and the ratio of
each time to the floor's. Ratios are what to compare: absolute seconds on a shared machine are not.

With ``--repeat N`` the variants run N times in turn (floor, measure..., floor, measure..., ...)
and each keeps its fastest time, so a burst of load on a shared machine hits no single variant;
the spread (slowest / fastest) is reported too. The naive approach runs once.

``--malloc stable`` keeps glibc from returning large freed blocks to the OS (``mallopt``: the
same as ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647``). By default
every large activation is a fresh mapping that page-faults on first touch, and whether it is
depends on the allocation history, so the floor's time varies by up to 1.8× between repeats;
with ``stable`` the forwards are also faster (ResNet-50 at 224 px: about 1.7×).

``measure`` includes a one-off cost that does not grow with images or shifts: probing the
layers' strides (two small forwards at two sizes). It is timed apart, once, and the
table's last column is the ratio without it (what a long run converges to).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from typing import Callable

import torch
from torch import nn

import shiftlab
import shiftlab.equivariance.kernels.native
from shiftlab.equivariance.capture import LayerCapture
from shiftlab.equivariance.engine import batch_layout
from shiftlab.equivariance.estimate import peak_memory
from shiftlab.equivariance.geometry import probe_layers
from shiftlab.equivariance.shifts import ShiftGrid, apply_shifts

def run_floor(model: nn.Module, images: torch.Tensor, grid: ShiftGrid, batch_size: int,
              device: torch.device) -> None:
    """Bare batched forwards of every shifted input: the least any tool must do."""
    shifts = torch.tensor(grid.shifts, dtype=torch.float64)
    per_batch, per_pass = batch_layout(len(images), batch_size)
    with torch.inference_mode():
        for start in range(0, len(images), per_batch):
            batch = images[start:start + per_batch].to(device)
            for first in range(0, len(shifts), per_pass):
                shifted = apply_shifts(batch, shifts[first:first + per_pass], "circular")
                model(shifted.reshape(-1, *shifted.shape[2:]))
    _sync(device)


def run_naive(model: nn.Module, images: torch.Tensor, grid: ShiftGrid, device: torch.device) -> None:
    """What users write by hand: one forward per shift, hooks that clone every feature map,
    cosine distances (exact alignment) computed afterwards."""
    stored: dict[tuple[int, str], torch.Tensor] = {}
    current = [0]

    def keep(name: str, tensor: torch.Tensor) -> None:
        stored[(current[0], name)] = tensor.detach().clone()

    with LayerCapture(model, on_output=keep), torch.inference_mode():
        current[0] = -1
        model(images.to(device))
        for index, (dh, dw) in enumerate(grid.shifts):
            current[0] = index
            model(torch.roll(images, (int(dh), int(dw)), dims=(-2, -1)).to(device))
    distances = []
    for (index, name), shifted in stored.items():
        if index < 0:
            continue
        reference = stored[(-1, name)]
        dh, dw = grid.shifts[index]
        if reference.dim() == 4:
            sh, sw = images.shape[-2] / reference.shape[-2], images.shape[-1] / reference.shape[-1]
            reference = torch.roll(reference, (round(dh / sh), round(dw / sw)), dims=(-2, -1))
        a, b = reference.flatten(1), shifted.flatten(1)
        distances.append(1 - torch.nn.functional.cosine_similarity(a, b, dim=1))
    _sync(device)


def stable_malloc() -> None:
    """Ask glibc to keep large freed blocks in the heap instead of unmapping them (no-op
    elsewhere): M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 2 GiB (its largest value)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(label: str, work: Callable[[], None], device: torch.device) -> dict:
    with peak_memory(device) as memory:
        start = time.perf_counter()
        work()
        _sync(device)
        seconds = time.perf_counter() - start
    return {"variant": label, "seconds": seconds, **memory}


def _best(runs: list[dict]) -> dict:
    """The fastest of repeated runs, with the spread of times and the highest memory peak."""
    times = [run["seconds"] for run in runs]
    best = dict(min(runs, key=lambda run: run["seconds"]))
    best.update(repeats=len(runs), spread=max(times) / min(times),
                peak_mb=max(run["peak_mb"] for run in runs))
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg16", help="torchvision model name (random init)")
    parser.add_argument("--size", type=int, default=112, help="input size (px)")
    parser.add_argument("--grid", type=int, default=4, help="square grid K: K x K circular shifts")
    parser.add_argument("--images", type=int, default=2, help="number of (random) images")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    parser.add_argument("--aligns", default="exact,fourier,bilinear", help="measure() alignments to time")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive approach")
    parser.add_argument("--memory-shifts", default="16,256",
                        help="shift counts for the memory-flatness check (1 image, --memory-size)")
    parser.add_argument("--memory-size", type=int, default=64, help="input size for the memory check")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each variant, interleaved; the fastest counts")
    parser.add_argument("--json", default=None, help="also write the JSON report to this file")
    parser.add_argument("--malloc", choices=("default", "stable"), default="default",
                        help="stable: glibc keeps freed blocks (no page faults per forward)")
    args = parser.parse_args(argv)
    if args.malloc == "stable":
        stable_malloc()

    device = shiftlab.equivariance.engine.resolve_device(args.device)
    torch.manual_seed(0)
    model = shiftlab.load_model(args.model, "none").model.to(device).eval()
    images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    grid = ShiftGrid.square(args.grid)
    n_work = args.images * len(grid)

    # warm-up: first-call costs (allocator, oneDNN/cuDNN kernel choice) hit no timed variant
    run_floor(model, images[:1], ShiftGrid.square(2), args.batch_size, device)
    shiftlab.measure(model, images[:1], ShiftGrid.square(2), device=device, progress=False)
    variants: list[tuple[str, Callable[[], None]]] = [
        ("floor (bare forwards)", lambda: run_floor(model, images, grid, args.batch_size, device))]
    for align in [a for a in args.aligns.split(",") if a]:
        variants.append((f"measure align={align}", lambda align=align: shiftlab.measure(
            model, images, grid, align=align, batch_size=args.batch_size, device=device,
            progress=False)))
    runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
    for _ in range(max(1, args.repeat)):
        for label, work in variants:
            runs[label].append(timed(label, work, device))
    rows = [_best(runs[label]) for label, _ in variants]
    if not args.no_naive:
        rows.append(_best([timed("naive (clone every map)",
                                 lambda: run_naive(model, images, grid, device), device)]))
    probe = min(_time(lambda: probe_layers(model, (args.size, args.size), device=device), device)
                for _ in range(max(1, args.repeat)))
    floor = rows[0]["seconds"]
    for row in rows:
        row["ratio_to_floor"] = row["seconds"] / floor
        row["images_x_shifts_per_s"] = n_work / row["seconds"]
        if row["variant"].startswith("measure"):
            row["ratio_without_probe"] = (row["seconds"] - probe) / floor

    # memory flatness: each count in a fresh process, so the allocator's earlier heap does not hide it
    memory = []
    for count in [int(c) for c in args.memory_shifts.split(",") if c]:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--model", args.model,
                               "--size", str(args.memory_size), "--shifts", str(count),
                               "--batch-size", str(args.batch_size)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        memory.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    report = {
        "model": args.model, "size": args.size, "grid": f"{args.grid}x{args.grid}",
        "images": args.images, "batch_size": args.batch_size, "device": str(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "repeat": args.repeat, "probe_seconds": probe,
        "malloc": args.malloc, "cpu_kernel": shiftlab.equivariance.kernels.native.status(),
        "rows": rows, "memory_flatness": memory,
    }
    _print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text)
    return report


def _time(work: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def _print_table(report: dict) -> None:
    print(f"# {report['model']} {report['size']}px, {report['grid']} shifts x {report['images']} images,"
          f" batch {report['batch_size']}, {report['device']} ({report['threads']} threads),"
          f" fastest of {report['repeat']}, malloc {report['malloc']},"
          f" CPU kernel {report['cpu_kernel']}", file=sys.stderr)
    print(f"{'variant':<28} {'seconds':>8} {'img*shift/s':>11} {'peak MB':>8} {'x floor':>8}"
          f" {'spread':>7} {'w/o probe':>9}", file=sys.stderr)
    for row in report["rows"]:
        steady = row.get("ratio_without_probe")
        print(f"{row['variant']:<28} {row['seconds']:>8.2f} {row['images_x_shifts_per_s']:>11.2f}"
              f" {row['peak_mb']:>8.0f} {row['ratio_to_floor']:>8.2f} {row['spread']:>7.2f}"
              f" {'' if steady is None else f'{steady:.2f}':>9}", file=sys.stderr)
    print(f"layer probe (one-off, inside every measure): {report['probe_seconds']:.2f} s",
          file=sys.stderr)
    for row in report["memory_flatness"]:
        print(f"fresh process, {row['shifts']:>4} shifts: peak RSS {row['peak_rss_mb']:.0f} MB"
              f" ({row['seconds']:.1f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
