"""Every default and every choice list of shiftlab, in one place.

The CLI's options, the pipeline (``shiftlab.runs``), the engine and the notebooks all read them
from here, so a default is changed once.
"""
from __future__ import annotations

from .equivariance.shifts import ShiftGrid

#: input size of the CLI and the pipeline: small enough for a CPU, large enough for VGG's 5 pools
SIZE = 112
#: grid extent K: shifts 0..K-1 per axis (the square grid of the per-layer figure)
MAX_SHIFT = 8
#: torchvision's evaluation transform: shorter side to size / 0.875, then a centre crop
CROP_FRACTION = 0.875
#: random shift pairs of the paper's pairwise consistency
PAIRS = 1000
#: the most pairs a run may ask for: 24 bytes each are kept (240 MB at the bound)
MAX_PAIRS = 10_000_000
#: inputs (images × shifts) per forward pass
BATCH_SIZE = 16
#: bootstrap resamples (over images) for consistency and accuracy intervals
BOOTSTRAP = 1000

GRID_KINDS = ("square", "symmetric", "diagonal")
#: 'as-trained' measures the model as it is; 'circular' makes every zero padding circular (the
#: boundary-effect diagnostic); 'both' (CLI only) measures both and shows the gap
PADDINGS = ("as-trained", "circular")
DTYPES = ("float32", "bfloat16", "float16")
#: output-level protocols: every grid shift per image, the paper's two random windows per
#: image and epoch, the paper's diagonal sweep
PROTOCOLS = ("grid", "zhang2019", "diagonal")
FIGURE_FORMATS = ("png", "pdf", "svg")
#: BlurPool filter sizes: the binomial filters [1], [1, 1], ..., [1, 6, 15, 20, 15, 6, 1]
FILTER_SIZES = tuple(range(1, 8))


def default_grid(mode: str) -> ShiftGrid:
    """The grid used when none is given: 8×8 from 0 (circular), -4..4 per axis (crop).

    >>> len(default_grid("circular"))
    64
    """
    return ShiftGrid.square(MAX_SHIFT) if mode == "circular" else ShiftGrid.symmetric(MAX_SHIFT // 2)


def make_grid(kind: str = "square", max_shift: int = MAX_SHIFT, subpixel: int = 1) -> ShiftGrid:
    """The grid of a CLI/pipeline request: square 0..K-1, symmetric -K..K or diagonal (t, t).

    >>> make_grid("symmetric", 2).max_abs
    2.0
    """
    from .errors import UsageError

    if kind == "square":
        return ShiftGrid.square(max_shift, subpixel)
    if kind == "symmetric":
        return ShiftGrid.symmetric(max_shift, subpixel)
    if kind == "diagonal":
        return ShiftGrid.diagonal(max_shift * subpixel, subpixel=subpixel)
    raise UsageError(f"unknown grid {kind!r}; choose one of {', '.join(GRID_KINDS)}")


def default_resize(size: int, margin: int = 0) -> int:
    """Shorter side before the centre crop: round(size / 0.875), at least size + 2·margin.

    >>> default_resize(224)
    256
    """
    return max(round(size / CROP_FRACTION), size + 2 * margin)
