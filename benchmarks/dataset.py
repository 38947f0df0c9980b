"""Streaming a dataset: images/s through shiftlab.data.sources.image_batches, and peak memory.

    python -m benchmarks.dataset                       # 2,000 JPEGs in 10 WNID class folders
    python -m benchmarks.dataset --images 500 --workers 0,2 --model resnet18 --size 112
    python -m benchmarks.dataset --work protocol       # the zhang2019 protocol's two windows

Generates (once, cached under the temp folder) a class-folder dataset of random JPEGs, then:

* throughput: images/s of streaming it through ``image_batches`` (decode in ``--workers``
  DataLoader processes) plus the per-batch work, against the floor: the same work on a batch
  already in memory (no decoding). Ratios are what to compare on a shared machine.
* memory: peak RSS (VmHWM) of a fresh process that streams N images, against one that loads
  them all with ``load_images``, at N = 1/10 of the dataset and all of it. Streaming stays flat;
  loading grows with N.

The per-batch work is a function ``work(model, batch)`` (:func:`bare_forward` by default); pass
another to :func:`throughput` (e.g. the consistency protocol) to benchmark it the same way.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

import shiftlab
from shiftlab.data.images import load_images
from shiftlab.data.sources import ImageBatch, image_batches

#: The first ten ImageNet WNIDs: folder names as in ImageNet's train/val layout.
WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
         "n01496331", "n01498041", "n01514668", "n01514859", "n01518878")

Work = Callable[[nn.Module, ImageBatch], None]


def bare_forward(model: nn.Module, batch: ImageBatch) -> None:
    """The least per-batch work: one forward pass, no hooks, no shifts."""
    with torch.inference_mode():
        model(batch.tensor)


def protocol_pairs(size: int) -> Work:
    """The per-batch work of ``--protocol zhang2019``: two random ``size`` windows of each image's
    R×R centre crop, one forward each (offsets 0..R−size−1, seeded per batch)."""
    generator = torch.Generator().manual_seed(0)

    def work(model: nn.Module, batch: ImageBatch) -> None:
        images = batch.tensor
        spare = images.shape[-1] - size
        with torch.inference_mode():
            for _ in range(2):
                oh, ow = (int(v) for v in torch.randint(max(spare, 1), (2,), generator=generator))
                model(images[..., oh:oh + size, ow:ow + size])
    return work


def tiny_model() -> nn.Module:
    """A small CNN (three conv-BN-ReLU stages, global pool, 10 classes): decoding stays visible."""
    layers: list[nn.Module] = []
    for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def build_model(spec: str) -> nn.Module:
    """``tiny`` (:func:`tiny_model`) or any shiftlab model spec, with random weights."""
    torch.manual_seed(0)
    return tiny_model() if spec == "tiny" else shiftlab.load_model(spec, "none").model.eval()


def make_dataset(images: int, classes: int = 10, side: int = 80, seed: int = 0) -> Path:
    """A class-folder dataset of random ``side`` x ``side`` JPEGs, cached between runs."""
    root = Path(tempfile.gettempdir()) / f"shiftlab-bench-dataset-{images}x{side}-{classes}-{seed}"
    if (root / ".complete").exists():
        return root
    rng = np.random.default_rng(seed)
    for k in range(images):
        folder = root / WNIDS[k % classes]
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth random content, so JPEG sizes and decode times resemble photographs.
        small = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BILINEAR).save(folder / f"{k:06d}.jpg", quality=90)
    (root / ".complete").write_text("ok")
    return root


def throughput(root: Path, model: nn.Module, size: int, batch_size: int, workers: int,
               work: Work = bare_forward, decode: int | None = None) -> dict:
    """Images/s of streaming ``root`` through ``work``, and of ``work`` alone (the floor).

    ``decode``: the side images are decoded to (default ``size``; the protocol decodes the
    R×R crop its windows are taken from)."""
    side = decode or size
    stream = image_batches(root, size=side, resize=side, batch_size=batch_size, workers=workers)
    started, count, first = time.perf_counter(), 0, None
    for batch in stream:
        first = first or batch
        work(model, batch)
        count += len(batch.indices)
    streamed = time.perf_counter() - started
    # The floor: the same work on a batch already decoded, repeated to cover the same images.
    reps = -(-count // len(first.indices))
    started = time.perf_counter()
    for _ in range(reps):
        work(model, first)
    floor = (time.perf_counter() - started) * count / (reps * len(first.indices))
    return {"workers": workers, "images": count, "streamed_s": round(streamed, 2),
            "images_per_s": round(count / streamed, 1), "floor_images_per_s": round(count / floor, 1),
            "ratio": round(streamed / floor, 2)}


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _child(args: argparse.Namespace) -> None:
    """One fresh process: stream or load ``--count`` images, forward them, print peak RSS."""
    model = build_model(args.model)
    root = Path(args.root)
    work, side = _work(args)
    if args.child == "stream":
        for batch in image_batches(root, size=side, resize=side, batch_size=args.batch_size,
                                   workers=0, max_images=args.count):
            work(model, batch)
    else:
        paths = sorted(root.glob("n*/*.jpg"))[:args.count]
        tensor = load_images(paths, size=side, resize=side).tensor
        for start in range(0, len(tensor), args.batch_size):
            work(model, ImageBatch(tensor[start:start + args.batch_size], None, [], []))
    print(json.dumps({"peak_rss_mb": round(_peak_rss_mb(), 1)}))


def _work(args: argparse.Namespace) -> tuple[Work, int]:
    """The per-batch work and the decoded side of ``--work``."""
    if args.work == "protocol":
        return protocol_pairs(args.size), round(args.size / 0.875)
    return bare_forward, args.size


def peak_rss(root: Path, mode: str, count: int, args: argparse.Namespace) -> float:
    """Peak RSS in MB of a fresh process that streams or loads ``count`` images."""
    command = [sys.executable, "-m", "benchmarks.dataset", "--child", mode, "--count", str(count),
               "--root", str(root), "--model", args.model, "--size", str(args.size),
               "--batch-size", str(args.batch_size), "--work", args.work]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10, choices=range(1, len(WNIDS) + 1))
    parser.add_argument("--side", type=int, default=80, help="side of the generated JPEGs")
    parser.add_argument("--size", type=int, default=64, help="model input size")
    parser.add_argument("--model", default="tiny", help="'tiny' (a small CNN) or a shiftlab model spec")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--work", choices=("forward", "protocol"), default="forward",
                        help="per-batch work: one bare forward, or the zhang2019 protocol's two"
                             " random windows of a size/0.875 centre crop (two forwards)")
    parser.add_argument("--child", choices=("stream", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    root = make_dataset(args.images, args.classes, args.side)
    model = build_model(args.model)
    bare_forward(model, ImageBatch(torch.zeros(2, 3, args.size, args.size), None, [], []))  # warm-up
    print(f"{args.images} JPEGs of {args.side} px in {args.classes} WNID folders ({root}); {args.model}"
          f" at {args.size} px, batch {args.batch_size}, {torch.get_num_threads()} torch threads\n")
    work, side = _work(args)
    print(f"work: {args.work} (images decoded at {side} px)\n")
    print("| workers | images | streamed s | images/s | floor images/s | streamed / floor |")
    print("|---:|---:|---:|---:|---:|---:|")
    for workers in (int(w) for w in args.workers.split(",")):
        row = throughput(root, model, args.size, args.batch_size, workers, work, side)
        print(f"| {row['workers']} | {row['images']} | {row['streamed_s']} | {row['images_per_s']} |"
              f" {row['floor_images_per_s']} | {row['ratio']} |")
    counts = sorted({max(1, args.images // 10), args.images})
    print("\n| peak RSS (MB, fresh process) | " + " | ".join(f"{n} images" for n in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for mode, label in (("stream", "image_batches (streamed)"), ("load", "load_images (all at once)")):
        print(f"| {label} | " + " | ".join(str(peak_rss(root, mode, n, args)) for n in counts) + " |")


if __name__ == "__main__":
    main()
