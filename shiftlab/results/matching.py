"""Which layers of several Results belong together, and whether the Results can be compared.

Pure data (no matplotlib): :func:`match_layers` pairs layers by name, depth or structure (a
baseline max-pool with the BlurPool that replaced it); :func:`check_comparable` refuses results
measured with different settings, naming the difference; :func:`result_labels` names results.
Used by :mod:`shiftlab.figures.plots` and :class:`shiftlab.Comparison`.
"""
from __future__ import annotations

import difflib
from typing import Optional, Sequence, Union

from ..errors import SettingsMismatchError, UsageError
from ..equivariance.geometry import LayerInfo
from .result import Result

Results = Union[Result, Sequence[Result]]


def match_layers(results: Results, by: str = "auto",
                 keep_unmatched: bool = False) -> list[tuple[Optional[str], ...]]:
    """Which layers of several results belong together: one tuple of names per matched row.

    - ``by='name'``: the names present in every result, in the first result's network order.
    - ``by='depth'``: the i-th spatial layer of each result together (down to the shortest
      list), then the i-th global layer of each; extra layers of longer networks are dropped.
    - ``by='structure'``: an alignment (difflib) of the layer sequences on (kind, stride,
      output shape), so a baseline max-pool (stride 2) pairs with the BlurPool that replaces it
      in an antialiased model, and inserted layers are skipped.
    - ``by='auto'`` (default): by name when every result has the same layer names (possibly
      one is a filtered subset), else by structure.

    With ``keep_unmatched=True`` a layer without a partner is not dropped: it gets a row of its
    own, None for the other results, placed after its predecessor in its network (what
    ``compare`` shows, so no layer disappears from a comparison).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import shiftlab
        >>> _ = torch.manual_seed(0)
        >>> circular = dict(padding=1, padding_mode="circular")
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
        ...                     nn.Conv2d(4, 8, 3, **circular)).eval()
        >>> images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> grid = shiftlab.ShiftGrid.square(4)
        >>> base = shiftlab.measure(net, images, grid)
        >>> aa = shiftlab.measure(shiftlab.antialias(net, 4), images, grid)   # 2 -> 2, 3 (BlurPool)
        >>> match_layers([base, aa], by="name")
        [('0', '0'), ('1', '1'), ('2', '2'), ('3', '3')]
        >>> match_layers([base, aa])      # auto: the names differ, so by structure
        [('0', '0'), ('1', '1'), ('2', '3'), ('3', '4')]
        >>> match_layers([base, aa], keep_unmatched=True)   # the BlurPool's max-pool (stride 1)
        [('0', '0'), ('1', '1'), (None, '2'), ('2', '3'), ('3', '4')]
    """
    results = as_results(results)
    rows = _matched(results, by)
    return _with_unmatched(results, rows) if keep_unmatched else rows


def unmatched_layers(results: Results, by: str = "auto") -> list[list[str]]:
    """Per result, its layers that no other result's layer matches (in network order)."""
    results = as_results(results)
    rows = _matched(results, by)
    return [[name for name in r.layer_names if name not in {row[j] for row in rows}]
            for j, r in enumerate(results)]


def _with_unmatched(results: list[Result], rows: list[tuple]) -> list[tuple]:
    out = [tuple(row) for row in rows]
    for j, result in enumerate(results):
        names = result.layer_names
        matched = {row[j] for row in out if row[j] is not None}
        for index, name in enumerate(names):
            if name in matched:
                continue
            # after the row of this layer's nearest predecessor in its own network
            position = 0
            for earlier in reversed(names[:index]):
                hits = [k for k, row in enumerate(out) if row[j] == earlier]
                if hits:
                    position = hits[0] + 1
                    break
            while position < len(out) and out[position][j] is None:
                position += 1  # after rows already inserted there, keeping network order
            out.insert(position, tuple(name if k == j else None for k in range(len(results))))
            matched.add(name)
    return out


def _matched(results: list[Result], by: str) -> list[tuple[str, ...]]:
    resolved = resolve_matching(results, by)
    if resolved == "structure":
        return _match_structure(results)
    if resolved == "name":
        common = set.intersection(*(set(r.layer_names) for r in results))
        rows = [(name,) * len(results) for name in results[0].layer_names if name in common]
        if not rows:
            raise UsageError("the results share no layer name; use by='depth'")
        return rows
    rows = []
    for spatial in (True, False):
        lists = [[i.name for i in r.layers if i.is_spatial == spatial] for r in results]
        rows += list(zip(*lists))
    if not rows:
        raise UsageError("no layers to match")
    return rows


def as_results(results: Results) -> list[Result]:
    items = [results] if isinstance(results, Result) else list(results)
    if not items:
        raise UsageError("no results given")
    for item in items:
        if not isinstance(item, Result):
            raise UsageError(f"expected shiftlab Result objects, got {type(item).__name__}")
        if not item.layers:
            raise UsageError("this result has no layers")
    return items


def resolve_matching(results: list[Result], by: str) -> str:
    """'name', 'depth' or 'structure': what ``by='auto'`` means for these results."""
    if by not in ("auto", "name", "depth", "structure"):
        raise UsageError(f"unknown matching {by!r}; use auto, name, depth or structure")
    if by != "auto":
        return by
    sets = [set(r.layer_names) for r in results]
    if all(s == sets[0] for s in sets):
        return "name"
    if any(all(s <= other for other in sets) for s in sets) and all(
            _same_structure(results[0], r) for r in results[1:]):
        return "name"  # one result measured with a layer filter
    return "structure"


def _token(info: LayerInfo) -> tuple:
    return (info.kind, tuple(info.stride) if info.is_spatial else None, tuple(info.shape))


def _loose_token(info: LayerInfo) -> tuple:
    """Kind, stride and channels: a BlurPool's output can be a pixel larger than the max-pool
    it replaced (vgg16's pool5 at 112 px: 4x4 against 3x3), and still takes its place."""
    return (info.kind, tuple(info.stride) if info.is_spatial else None, tuple(info.shape[:1]))


def _same_structure(a: Result, b: Result) -> bool:
    common = set(a.layer_names) & set(b.layer_names)
    return all(_token(a.layer(n)) == _token(b.layer(n)) for n in common)


def _align(a: list, b: list, offset_a: int = 0, offset_b: int = 0) -> dict[int, int]:
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    return {offset_a + blk.a + k: offset_b + blk.b + k
            for blk in matcher.get_matching_blocks() for k in range(blk.size)}


def _match_structure(results: list[Result]) -> list[tuple[str, ...]]:
    """Align every result's layer sequence with the first's; keep rows matched in all.

    Pass 1 matches identical (module, kind, stride, shape) runs; pass 2 scans the gaps between
    them in order on (kind, stride, shape) alone, pairing a replaced layer with its replacement.
    """
    base = results[0].layers
    maps = []
    for other in results[1:]:
        full = _align([(i.module, *_token(i)) for i in base], [(i.module, *_token(i)) for i in other.layers])
        pairs = dict(full)
        anchors = [(-1, -1)] + sorted(full.items()) + [(len(base), len(other.layers))]
        for (a0, b0), (a1, b1) in zip(anchors, anchors[1:]):
            # in a gap, each layer takes the earliest later layer of the same structure: a
            # replaced max-pool pairs with its BlurPool, not with whatever follows it
            cursor = b0 + 1
            for a in range(a0 + 1, a1):
                for same in (_token, _loose_token):
                    match = next((b for b in range(cursor, b1)
                                  if same(other.layers[b]) == same(base[a])), None)
                    if match is not None:
                        pairs[a] = match
                        cursor = match + 1
                        break
        maps.append({k: other.layers[v].name for k, v in pairs.items()})
    first = base
    rows = [(info.name, *(m[i] for m in maps)) for i, info in enumerate(first)
            if all(i in m for m in maps)]
    if not rows:
        raise UsageError("the results share no layer structure; use by='depth'")
    return rows


def result_labels(results: list[Result], labels: Optional[Sequence[str]] = None) -> list[str]:
    """One label per result: ``labels`` if given, else each result's label or model name, made
    unique by its weights and then by a number."""
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != len(results):
            raise UsageError(f"got {len(labels)} labels for {len(results)} results")
        return labels
    out = [r.provenance.label or r.provenance.model or f"result {i + 1}"
           for i, r in enumerate(results)]
    if len(set(out)) < len(out):
        out = [f"{label} ({weights_label(r)})" if weights_label(r) else label for label, r in zip(out, results)]
    if len(set(out)) < len(out):
        out = [f"{label} #{i + 1}" for i, label in enumerate(out)]
    return out


def check_comparable(results: list[Result], labels: list[str], check: bool, same_grid: bool) -> str:
    """The shared metric, or a ``SettingsMismatchError`` naming what differs and the fix."""
    first = results[0]
    for result, label in zip(results[1:], labels[1:]):
        fix = "re-measure with the same settings"
        if result.settings.metric != first.settings.metric:
            raise SettingsMismatchError(
                f"{labels[0]} uses metric {first.settings.metric} and {label} {result.settings.metric};"
                f" one colour scale cannot show both: {fix}")
        if same_grid and result.grid.shifts != first.grid.shifts:
            raise SettingsMismatchError(f"{labels[0]} and {label} use different shift grids;"
                                        f" a difference needs the same shifts: {fix}")
        differences = first.settings.differences(result.settings)
        if check and differences:
            raise SettingsMismatchError(
                f"{labels[0]} and {label} were measured with different settings"
                f" ({', '.join(differences)}); {fix}, or pass check_settings=False to plot them anyway")
    return first.settings.metric


def weights_label(result: Result) -> str:
    if result.provenance.random_init:
        return "random init"
    return str(result.provenance.weights or "")


def input_differences(first, second) -> list[str]:
    """What differs between two results' inputs (``Provenance``): image content (the digest of
    the input tensors, for results made anywhere), image files, resize and normalisation."""
    out = []
    if first.input_digest and second.input_digest and first.input_digest != second.input_digest:
        names = "" if first.images == second.images else " and files"
        out.append(f"image content{names} (input digests {first.input_digest[:8]} vs"
                   f" {second.input_digest[:8]})")
    elif first.images and second.images and first.images != second.images:
        out.append("image files")
    if first.resize and second.resize and first.resize != second.resize:
        out.append(f"resize ({first.resize} vs {second.resize})")
    return out
