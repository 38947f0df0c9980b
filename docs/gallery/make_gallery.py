"""Regenerate the README gallery: ``python docs/gallery/make_gallery.py`` (a few minutes on 2 CPU cores).

1. The default run (``shiftlab heatmap --model vgg16``: random init, 6 sample photos, 112 px,
   8x8 circular shifts): the layer grid and the paper view.
2. A trained pair: the small VGG of notebook 04 and its BlurPool(4) version, trained on
   scikit-learn's digits (same seed, no shift augmentation), compared with circular padding
   so that the grids show aliasing and not the zero-border seam: compare grid, difference
   (log2 ratio) and profile; and the attribution of both nets as trained
   (``shiftlab.attribute``, the same 16 test digits, both axes).
3. A trained segmentation pair: the same encoder as a fully convolutional net (1x1
   classifier, bilinear x8 upsampling; ``train_digits.small_fcn``) and its BlurPool(4) version,
   trained for 25 epochs to label each digit pixel with its digit (11 classes with the
   background), measured with circular padding on 64 test digits and their masks (8x8 shifts):
   the agreement map and agreement / mIoU against the shift's length.
Every PNG is written at 150 dpi. ``make_gallery.py trained-segmentation`` redraws one part
only (``default``, ``trained``, ``trained-segmentation``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "notebooks"))

import shiftlab  # noqa: E402
from shiftlab import runs  # noqa: E402
from shiftlab.figures import plots  # noqa: E402
from shiftlab.figures.attribution import attribution_chart  # noqa: E402

DPI = 150


def save(figure, name: str) -> None:
    path = HERE / f"{name}.png"
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    print(f"{path.relative_to(HERE.parents[1])}: {path.stat().st_size / 1024:.0f} KB")


def default_run() -> None:
    result = runs.heatmap("vgg16", weights="none", progress=False)
    save(plots.layer_grid(result), "vgg16-heatmap")
    save(plots.layer_grid(result, view="paper"), "vgg16-paper-view")


def trained_pair() -> None:
    from train_digits import load_digits_32, small_vgg, train

    data = load_digits_32(seed=0)
    torch.manual_seed(0)
    baseline = small_vgg()
    antialiased = shiftlab.antialias(baseline, filt_size=4)
    for model in (baseline, antialiased):
        train(model, data.x_train, data.y_train, epochs=10, seed=0)
    images = data.x_test[:16]
    grid = shiftlab.ShiftGrid.square(8)
    results, attributions = [], []
    for label, model in (("baseline", baseline), ("antialiased (BlurPool 4)", antialiased)):
        provenance = shiftlab.Provenance(model=label, label=label, weights="trained on digits",
                                         pretrained=True)
        attributions.append(shiftlab.attribute(model.eval(), images, progress=False,
                                               provenance=provenance))
        model = shiftlab.circular_padding(model.eval())
        results.append(shiftlab.measure(model, images, grid, progress=False,
                                        provenance=provenance))
    save(attribution_chart(attributions), "digits-attribution")
    comparison = shiftlab.Comparison(results)
    save(comparison.plot_grids(), "digits-compare-grid")
    save(comparison.plot_difference(difference="ratio"), "digits-difference-ratio")
    save(comparison.plot_profile(), "digits-profile")


def trained_segmentation() -> None:
    from shiftlab.figures.dense import agreement_by_shift_plot, agreement_map_plot
    from train_digits import digit_masks, load_digits_32, small_fcn, train

    data = load_digits_32(seed=0)
    torch.manual_seed(0)
    baseline = small_fcn()
    antialiased = shiftlab.antialias(baseline, filt_size=4)
    results = []
    for label, model in (("baseline", baseline), ("antialiased (BlurPool 4)", antialiased)):
        train(model, data.x_train, digit_masks(data.x_train, data.y_train), epochs=25, seed=0)
        provenance = shiftlab.Provenance(model=label, label=label, weights="trained on digits")
        results.append(shiftlab.measure_dense(
            shiftlab.circular_padding(model.eval()), data.x_test[:64], shiftlab.ShiftGrid.square(8),
            masks=digit_masks(data.x_test[:64], data.y_test[:64]), progress=False,
            provenance=provenance))
    for result in results:
        print(result.label, {k: round(v, 4) for k, v in result.summary().items()},
              f"mIoU per shift {result.miou.min():.3f}..{result.miou.max():.3f}")
    save(agreement_map_plot(results), "digits-segmentation-agreement")
    save(agreement_by_shift_plot(results), "digits-segmentation-shift-size")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = {"default": default_run, "trained": trained_pair,
             "trained-segmentation": trained_segmentation}
    for name in sys.argv[1:] or list(parts):
        parts[name]()
