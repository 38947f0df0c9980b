"""Cost of the layer-wise attribution (``shiftlab.attribute``) against one forward pass.

    python -m benchmarks.attribution --models vgg16,resnet50 --sizes 224,64 --images 2

The attribution does one forward-mode pass per layer call per image batch (plus one for the
output's own derivative), once per axis, so its time grows with the number of layer calls.
For every model and size this prints: the number of layer calls, seconds per image of
``attribute`` (axis ``both``), seconds per image of one plain forward (the floor, timed in the
same run), their ratio, and that ratio divided by the number of passes (2 axes x (calls + 1)):
what one forward-mode pass costs in plain forwards. Random weights, random images; each
variant keeps its fastest of ``--repeat`` runs. ``--json FILE`` also writes the rows.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torchvision

import shiftlab
from shiftlab.equivariance.capture import select_modules

from .bench import _sync


def _fastest(run, repeat: int, device: torch.device) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_row(name: str, size: int, images: int, repeat: int, device: torch.device,
                batch_size: int) -> dict:
    """Time one model at one size: attribute (both axes) and the plain forward floor."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval().to(device)
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(x[:1].to(device))  # warm-up (cuDNN, allocator)

    def forward() -> None:
        with torch.inference_mode():
            for start in range(0, images, batch_size):
                model(x[start:start + batch_size].to(device))

    def attribution() -> None:
        result = shiftlab.attribute(model, x, axis="both", device=device, progress=False,
                                    batch_size=batch_size)
        row["layers"] = len(result.layers)
        row["sum_check"] = float(abs(result.shares.sum(axis=1) + result.remainder_share - 1).max())

    row: dict = {"model": name, "size": size, "images": images, "device": str(device)}
    row["leaf_modules"] = len(select_modules(model))
    floor = _fastest(forward, repeat, device)
    attributed = _fastest(attribution, repeat, device)
    passes = 2 * (row["layers"] + 1)
    row.update({
        "forward_s_per_image": floor / images,
        "attribute_s_per_image": attributed / images,
        "ratio": attributed / floor,
        "ratio_per_pass": attributed / floor / passes,
        "peak_mb": (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                    else float("nan")),
    })
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50", help="torchvision model names")
    parser.add_argument("--sizes", default="224,64", help="input sizes (px), comma-separated")
    parser.add_argument("--images", type=int, default=2, help="random images per run")
    parser.add_argument("--batch-size", type=int, default=2, help="images per forward pass")
    parser.add_argument("--repeat", type=int, default=2, help="runs per variant; the fastest is kept")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()},"
          f" {torch.get_num_threads()} threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rows = []
    header = (f"{'model':<10} {'size':>5} {'calls':>6} {'forward s/img':>14} {'attribute s/img':>16}"
              f" {'ratio':>8} {'ratio/pass':>11} {'sum-1':>9}")
    print(header)
    for name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = measure_row(name, size, args.images, args.repeat, device, args.batch_size)
            rows.append(row)
            print(f"{name:<10} {size:>5} {row['layers']:>6} {row['forward_s_per_image']:>14.4f}"
                  f" {row['attribute_s_per_image']:>16.3f} {row['ratio']:>8.1f}"
                  f" {row['ratio_per_pass']:>11.2f} {row['sum_check']:>9.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
