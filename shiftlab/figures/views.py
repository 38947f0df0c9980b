"""Which layers a figure shows, and under which names: the 'all' and 'paper' views.

The 'paper' view keeps what Zhang (ICML 2019) plots per layer: every convolution, every pool
(max/avg pools and BlurPools) and the logits (the last global layer), named like the paper.
Names come from the measured strides, not from the architecture's module names, so any model
gets them:

- a *stage* ends at a pool that raises the stride (the pool takes the stage's number), or
  where a later layer's stride exceeds the stage's (a strided convolution starts a new stage);
- plain stacks (VGG, AlexNet: layers are items of one ``nn.Sequential``) are named
  ``conv<stage>_<i>``, ``pool<stage>`` and ``blurpool<stage>``;
- block-structured nets (ResNet ``layer1.0.conv1``, MobileNetV2 ``features.1.conv.0.0``,
  DenseNet ``features.denseblock1.denselayer1.conv1``) name the stem like a plain stack and
  each block ``stage<k>.block<j>.<name inside the block>``, the stage taken from the block's
  output stride (torchvision's ResNet ``layer2.0.conv1`` → ``stage3.block1.conv1``, as in
  He et al.'s conv3_x).

A plain stack like VGG's, two convolutions and a max-pool per stage:

>>> from collections import OrderedDict
>>> import torch
>>> from torch import nn
>>> import shiftlab
>>> _ = torch.manual_seed(0)
>>> conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1)
>>> vgg_like = nn.Sequential(OrderedDict(features=nn.Sequential(
...     conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2),
...     conv(4, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.MaxPool2d(2)))).eval()
>>> images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
>>> result = shiftlab.measure(vgg_like, images, shiftlab.ShiftGrid.square(2))
>>> [shown for _, shown in select_view(result, "paper")]
['conv1_1', 'conv1_2', 'pool1', 'conv2_1', 'conv2_2', 'pool2']
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from ..equivariance.capture import module_name
from ..errors import UsageError
from ..equivariance.geometry import LayerInfo
from ..results.matching import as_results
from ..results.result import Result, layer_indices

VIEWS = ("all", "paper")
DEFAULT_VIEW = "all"
LOGITS = "logits"


def select_view(result: Result, view: str = DEFAULT_VIEW) -> list[tuple[str, str]]:
    """The layers a figure shows in ``view``, as (layer name, display name) in network order.

    Args:
        result: a measurement (its ``layers`` carry module type, kind and measured stride).
        view: 'all' (every layer, shown under its own name) or 'paper' (convolutions, pools,
            BlurPools and the logits, named conv1_1, pool1, ... or stage2.block1.conv1, ...).

    Returns:
        A list of (layer name in the result, name to draw).

    Raises:
        UsageError: unknown view, or a paper view with nothing to show.

    Example:
        >>> from collections import OrderedDict
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1)
        >>> vgg_like = nn.Sequential(OrderedDict(features=nn.Sequential(
        ...     conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2),
        ...     conv(4, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.MaxPool2d(2)))).eval()
        >>> images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> result = shiftlab.measure(vgg_like, images, shiftlab.ShiftGrid.square(2))
        >>> select_view(result, "paper")[:3]
        [('features.0', 'conv1_1'), ('features.2', 'conv1_2'), ('features.4', 'pool1')]
        >>> select_view(result, "all")[:3]
        [('features.0', 'features.0'), ('features.1', 'features.1'), ('features.2', 'features.2')]
    """
    if view not in VIEWS:
        raise UsageError(f"unknown view {view!r}; use {' or '.join(VIEWS)}")
    if view == "all":
        return [(info.name, info.name) for info in result.layers]
    kept = [info for info in result.layers if info.is_spatial and (_is_conv(info) or _is_pool(info))]
    globals_ = [info for info in result.layers if not info.is_spatial]
    if not kept and not globals_:
        raise UsageError("the paper view found no convolution, pool or logits layer; use view='all'")
    shown = _paper_names(kept)
    if globals_:
        shown.append((globals_[-1].name, LOGITS))
    return shown


def _is_conv(info: LayerInfo) -> bool:
    return "conv" in info.module.lower()


def _is_pool(info: LayerInfo) -> bool:
    return "pool" in info.module.lower()


def _block_of(name: str) -> Optional[str]:
    """The block a layer lives in: the name up to its first index that is not the last part
    ('layer1.0' for 'layer1.0.downsample.0'), else its parent when that is nested
    ('features.denseblock1.denselayer1'); None for items of a plain stack ('features.4', 'conv1')."""
    parts = module_name(name).split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) if len(parts) > 2 else None


def _units(infos: list[LayerInfo]) -> list[tuple[Optional[str], list[LayerInfo]]]:
    """Consecutive layers grouped by block (None = a stem/plain-stack layer on its own)."""
    units: list[tuple[Optional[str], list[LayerInfo]]] = []
    for info in infos:
        block = _block_of(info.name)
        if block is not None and units and units[-1][0] == block:
            units[-1][1].append(info)
        else:
            units.append((block, [info]))
    return units


def _stride(infos: list[LayerInfo]) -> float:
    strides = [max(i.stride) for i in infos if max(i.stride) == max(i.stride)]  # drop NaN
    return max(strides) if strides else 1.0


def _paper_names(infos: list[LayerInfo]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stage, stage_stride, closed = 1, None, False
    convs: dict[int, int] = {}
    blocks: dict[int, int] = {}
    used: set[str] = set()
    for block, members in _units(infos):
        stride = _stride(members)
        pool = block is None and _is_pool(members[0])
        if not pool and (closed or (stage_stride is not None and stride > stage_stride)):
            stage, closed = stage + 1, False
        if stage_stride is None or stride > stage_stride:
            stage_stride = stride
            closed = closed or pool  # a pool that raises the stride ends its stage
        if block is not None:
            blocks[stage] = blocks.get(stage, 0) + 1
            prefix = f"stage{stage}.block{blocks[stage]}"
            for info in members:
                inner = module_name(info.name)[len(block) + 1:] or info.name
                out.append((info.name, _unique(f"{prefix}.{inner}", used)))
            continue
        info = members[0]
        if pool:
            kind = "blurpool" if "blur" in info.module.lower() else "pool"
            out.append((info.name, _unique(f"{kind}{stage}", used)))
        else:
            convs[stage] = convs.get(stage, 0) + 1
            out.append((info.name, _unique(f"conv{stage}_{convs[stage]}", used)))
    return _drop_single_index(out)


def _drop_single_index(names: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """'conv1_1' → 'conv1' where a stage has one convolution (ResNet's stem: conv1, pool1)."""
    stems = [shown.rsplit("_", 1)[0] for _, shown in names if shown.startswith("conv") and "_" in shown]
    single = {s for s in stems if stems.count(s) == 1}
    return [(name, shown.rsplit("_", 1)[0] if shown.startswith("conv") and shown.rsplit("_", 1)[0] in single
             else shown) for name, shown in names]


def _unique(text: str, used: set[str]) -> str:
    candidate, k = text, 2
    while candidate in used:
        candidate, k = f"{text}#{k}", k + 1
    used.add(candidate)
    return candidate


# -- layer selection and stride labels shared by the figures ---------------------------------
def plotted_layers(result: Result, layers: Optional[Sequence[str]] = None,
                   spatial_only: bool = False) -> list[LayerInfo]:
    """The layers a figure shows: those matching ``layers`` (globs, ``type:Name``; see
    :func:`shiftlab.results.result.layer_indices`), in network order, spatial ones only if asked.

    >>> from collections import OrderedDict
    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> conv = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 3, padding=1)
    >>> vgg_like = nn.Sequential(OrderedDict(features=nn.Sequential(
    ...     conv(3, 4), nn.ReLU(), conv(4, 4), nn.ReLU(), nn.MaxPool2d(2),
    ...     conv(4, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.MaxPool2d(2)))).eval()
    >>> images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> result = shiftlab.measure(vgg_like, images, shiftlab.ShiftGrid.square(2))
    >>> [i.name for i in plotted_layers(result, ["features.*"], spatial_only=True)][:2]
    ['features.0', 'features.1']
    >>> [i.name for i in plotted_layers(result, ["type:MaxPool2d"])]
    ['features.4', 'features.9']
    """
    as_results(result)
    infos = [result.layers[i] for i in layer_indices(result, layers)]
    if spatial_only:
        infos = [i for i in infos if i.is_spatial]
    if not infos:
        raise UsageError("no layers left to plot (spatial_only drops global layers)")
    return infos


def view_rows(results: list[Result], rows: list[tuple[Optional[str], ...]],
              view: str) -> list[tuple[Optional[str], ...]]:
    """Matched rows whose layer is in ``view``: the first result's layer, or in a row where that
    result has none (None: a layer without a partner), the first named layer's in its result.

    >>> import torch
    >>> from torch import nn
    >>> import shiftlab
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    >>> images = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    >>> grid = shiftlab.ShiftGrid.square(2)
    >>> base = shiftlab.measure(net, images, grid)
    >>> aa = shiftlab.measure(shiftlab.antialias(net, 4), images, grid)
    >>> rows = [('0', '0'), ('1', '1'), (None, '2'), ('2', '3')]
    >>> view_rows([base, aa], rows, "paper")     # the ReLU is not in the paper view
    [('0', '0'), (None, '2'), ('2', '3')]
    """
    views: dict[int, dict[str, str]] = {}  # a result's view, looked up only when a row needs it

    def kept(row: tuple[Optional[str], ...]) -> bool:
        index = next((k for k, name in enumerate(row) if name is not None), None)
        if index is None:
            return False
        if index not in views:
            views[index] = dict(select_view(results[index], view))
        return row[index] in views[index]

    rows = [row for row in rows if kept(row)]
    if not rows:
        raise UsageError(f"no matched layers left in the {view!r} view; use view='all'")
    return rows


#: where a row has no layer of a result (a layer without a partner in the other results)
NO_LAYER = "–"


def row_texts(rows: list[tuple[Optional[str], ...]], results: list[Result], view: str) -> list[str]:
    """One tick text per matched row: each result's (view) name, ' / '-joined where they differ;
    a row where a result has no layer names every result in order, :data:`NO_LAYER` for it
    ('– / 2': only the second result has a layer there)."""
    names = [dict(select_view(r, view)) for r in results]
    texts = []
    for row in rows:
        shown = [NO_LAYER if name is None else n.get(name, name) for n, name in zip(names, row)]
        texts.append(" / ".join(shown if None in row else dict.fromkeys(shown)))
    return texts


def blocks(names: list[str]) -> list[str]:
    """Each layer's block: its module name up to the last '.' ('layer1.0' for 'layer1.0.relu#2',
    '' for 'fc'), except that a block one level inside the previous layer's
    ('layer1.0.downsample' after 'layer1.0') stays in it."""
    out: list[str] = []
    for name in names:
        block = module_name(name).rpartition(".")[0]
        if out and out[-1] and block.startswith(f"{out[-1]}.") and "." not in block[len(out[-1]) + 1:]:
            block = out[-1]
        out.append(block)
    return out


def stride_text(info: LayerInfo) -> str:
    """'s=2', 's=1/2', 's=2×4', 's=?' or 'global': the stride as a figure shows it.

    >>> stride_text(LayerInfo("p", "MaxPool2d", "spatial", (2.0, 2.0), (2.0, 2.0), (4, 8, 8)))
    's=2'
    """
    if not info.is_spatial:
        return "global"
    sh, sw = info.stride
    if not (math.isfinite(sh) and math.isfinite(sw)):
        return "s=?"
    one = lambda s: f"1/{round(1 / s)}" if 0 < s < 1 else f"{s:g}"  # noqa: E731
    return f"s={one(sh)}" if sh == sw else f"s={one(sh)}×{one(sw)}"


def stride_changes(infos: list[Optional[LayerInfo]]) -> tuple[list[tuple[float, str]], list[tuple[float, float]]]:
    """(x, 's=2') where the stride differs from the previous spatial layer's; (x0, x1) global runs.

    ``infos[x]`` is the layer at x, None where this result has none (a row of another result's
    layer without a partner): such an x neither changes the stride nor ends a global run.

    >>> conv = LayerInfo("c", "Conv2d", "spatial", (1.0, 1.0), (1.0, 1.0), (4, 8, 8))
    >>> pool = LayerInfo("p", "MaxPool2d", "spatial", (2.0, 2.0), (2.0, 2.0), (4, 4, 4))
    >>> fc = LayerInfo("fc", "Linear", "global", (math.nan,) * 2, (math.nan,) * 2, (10,))
    >>> stride_changes([conv, None, pool, fc])
    ([(1.5, 's=2')], [(2.5, 3.5)])
    """
    marks, spans, previous, start = [], [], "s=1", None
    for x, info in enumerate(infos):
        if info is None:
            continue
        if not info.is_spatial:
            start = x if start is None else start
            continue
        if start is not None:
            spans.append((start - 0.5, x - 0.5))
            start = None
        if stride_text(info) != previous:
            previous = stride_text(info)
            marks.append((x - 0.5, previous))
    if start is not None:
        spans.append((start - 0.5, len(infos) - 0.5))
    return marks, spans
