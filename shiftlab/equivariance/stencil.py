"""Memory-lean tensor steps for comparing feature maps: reused scratch, rolls by slicing, stencils.

A comparison is a few passes over large feature maps; its cost is memory traffic, not arithmetic.
These helpers avoid the hidden passes of the obvious code:

- :class:`Workspace`: scratch tensors reused across layers and passes. On the CPU a fresh large
  tensor costs page faults at every allocation (big blocks go back to the OS when freed).
- :func:`sub_rolled` / :func:`rolled_into`: ``b - roll(a)`` and ``roll(a)`` through the (up to)
  four slices of ``a``; ``torch.roll`` would write a rolled copy that the next step reads again.
- :func:`blocks`: cache-sized pieces of a shifted run, so that the passes over one piece after
  the first hit the cache (a scratch the size of the whole run would go to memory and back).
- :func:`stencil2`: a separable circulant filter with a few taps per axis as slice-wise
  multiply-adds; the same filter as a dense n×n matrix product costs O(n) flops per value.

Shapes: any leading dimensions, the last two are (h, w).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Taps = tuple[tuple[int, float], ...]
"""A circulant filter along one axis of length n: ((offset, weight), ...) with offsets in [0, n),
meaning out[i] = Σ weight · x[(i + offset) % n]."""

IDENTITY: Taps = ((0, 1.0),)
_SMALL_ROW = 1 << 17  # values per row below which one batched call beats a BLAS call per row
_ALIGN = 16  # bytes: BLAS dot wants both operands at the same offset modulo this
SMALL_MAP = 64
"""Maps of at most this many positions (8×8) take dense (hw × hw) matrix products instead."""
CACHE_BYTES = 4 * 2**20
"""Comparisons walk the shifted maps in blocks of about this size (:func:`blocks`): every pass
after the first over a block (a norm, a second inner product) then reads the CPU cache, not
memory, and scratch the size of a block stays in the cache too."""


class Workspace:
    """Scratch tensors reused across layers, shifts and image batches.

    One flat buffer per (slot, device, dtype), grown when a larger view is asked for. Its size
    follows the largest layer and the batch, never the number of shifts. Two views of the same
    slot alias: a caller uses a slot for one purpose at a time.

    >>> ws = Workspace()
    >>> a = ws.take("diff", (2, 3), torch.zeros(1))
    >>> a.data_ptr() == ws.take("diff", (3, 2), torch.zeros(1)).data_ptr()
    True
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._constants: dict[tuple, torch.Tensor] = {}

    def constant(self, key: tuple, make, like: torch.Tensor) -> torch.Tensor:
        """A small constant tensor, made on the CPU once per key and copied to the device of
        ``like`` once: not at every pass."""
        key = (*key, like.device, like.dtype)
        if key not in self._constants:
            self._constants[key] = make().to(device=like.device, dtype=like.dtype, non_blocking=True)
        return self._constants[key]

    def take(self, slot: str, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised (shape) tensor with the device and dtype of ``like``."""
        numel = math.prod(shape)
        key = (slot, like.device, like.dtype)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop(key, None)  # free the old one first: peak memory, not the sum
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(tuple(shape))


def _spans(n: int, shift: int) -> list[tuple[slice, slice]]:
    """(destination, source) slices along an axis of length n for ``torch.roll(x, shift)``."""
    k = shift % n
    if k == 0:
        return [(slice(0, n), slice(0, n))]
    return [(slice(k, n), slice(0, n - k)), (slice(0, k), slice(n - k, n))]


def _blocks(size: tuple[int, int], offset: tuple[int, int]):
    for row_dst, row_src in _spans(size[0], offset[0]):
        for col_dst, col_src in _spans(size[1], offset[1]):
            yield (..., row_dst, col_dst), (..., row_src, col_src)


def sub_rolled(out: torch.Tensor, b: torch.Tensor, a: torch.Tensor,
               offset: tuple[int, int]) -> torch.Tensor:
    """``out = b - torch.roll(a, offset, dims=(-2, -1))``, ``a`` broadcast against ``b``."""
    for dst, src in _blocks(tuple(a.shape[-2:]), offset):
        torch.sub(b[dst], a[src], out=out[dst])
    return out


def rolled_into(out: torch.Tensor, a: torch.Tensor, offset: tuple[int, int]) -> torch.Tensor:
    """``out = torch.roll(a, offset, dims=(-2, -1))`` written into ``out``."""
    for dst, src in _blocks(tuple(a.shape[-2:]), offset):
        out[dst].copy_(a[src])
    return out


def circulant_taps(matrix: torch.Tensor, roll: int = 0) -> Optional[Taps]:
    """The taps of ``T_roll M`` for a circulant n×n matrix M (T: circular roll), or None when M
    is not circulant.

    >>> circulant_taps(torch.tensor([[2., 1., 0.], [0., 2., 1.], [1., 0., 2.]]))
    ((0, 2.0), (1, 1.0))
    """
    matrix = matrix.to(torch.float64)
    n = matrix.shape[-1]
    index = torch.arange(n)
    first = matrix[0]
    scale = max(1.0, float(first.abs().max()))
    if not torch.allclose(first[(index[None, :] - index[:, None]) % n], matrix, rtol=0,
                          atol=1e-9 * scale):
        return None
    # (M x)[i] = Σ_j first[j] x[i + j]
    values = first.tolist()  # one conversion, not one per entry
    return rolled_taps(tuple((j, value) for j, value in enumerate(values)
                             if abs(value) > 1e-12 * scale), roll, n)


def rolled_taps(taps: Taps, roll: int, n: int) -> Taps:
    """The taps of ``T_roll M`` from those of M (n×n circulant): x[i + j] becomes x[i - q + j].

    >>> rolled_taps(((0, 2.0), (1, 1.0)), 1, 3)
    ((0, 1.0), (2, 2.0))
    """
    return tuple(sorted(((offset - roll) % n, weight) for offset, weight in taps))


def dense_circulant(taps: Taps, n: int) -> torch.Tensor:
    """The n×n float64 matrix M of ``taps``: (M x)[i] = Σ weight · x[(i + offset) % n]."""
    out = torch.zeros(n, n, dtype=torch.float64)
    index = torch.arange(n)
    for offset, weight in taps:
        out[index, (index + offset) % n] += weight
    return out


def _stencil(out: torch.Tensor, x: torch.Tensor, taps: Taps, dim: int) -> torch.Tensor:
    """out[i] = Σ weight · x[(i + offset) % n] along ``dim``; ``out`` must not overlap ``x``."""
    if not taps:
        return out.zero_()
    n = x.shape[dim]
    for index, (offset, weight) in enumerate(taps):
        for dst, src in _spans(n, -offset):
            target = out.narrow(dim, dst.start, dst.stop - dst.start)
            source = x.narrow(dim, src.start, src.stop - src.start)
            if index == 0:
                torch.mul(source, weight, out=target)
            else:
                target.add_(source, alpha=weight)
    return out


def stencil2(out: torch.Tensor, x: torch.Tensor, taps: tuple[Taps, Taps],
             workspace: Workspace) -> torch.Tensor:
    """``out = (R ⊗ C) x``: the row taps along -2, the column taps along -1 (slot 'stencil')."""
    rows, cols = taps
    if rows == IDENTITY and cols == IDENTITY:
        return out.copy_(x)
    if rows == IDENTITY:
        return _stencil(out, x, cols, -1)
    if cols == IDENTITY:
        return _stencil(out, x, rows, -2)
    return _stencil(out, _stencil(workspace.take("stencil", x.shape, x), x, rows, -2), cols, -1)


def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row inner product of (N, ...) tensors -> (N,) float64.

    One BLAS ``dot`` per row: a batched matrix product of 1×K by K×1 matrices is an order of
    magnitude slower on the CPU, and its long float32 accumulations lose more precision.
    """
    n = x.shape[0]
    x, y = x.reshape(n, -1), y.reshape(n, -1)
    if x.shape[1] < _SMALL_ROW:  # short rows: one call, not one per row
        return torch.linalg.vecdot(x, y).double()
    scratch = None
    if (x.data_ptr() - y.data_ptr()) % _ALIGN or x.stride(0) % (_ALIGN // x.element_size()) \
            or y.stride(0) % (_ALIGN // y.element_size()):
        # BLAS dot runs several times slower when the operands' addresses differ modulo 16
        # bytes (a lag of one column or an odd row width, lag_dot): a copy of the row beside
        # x's alignment costs less
        scratch = torch.empty(x.shape[1] + _ALIGN, dtype=y.dtype, device=y.device)

    def row(i: int) -> torch.Tensor:
        a, b = x[i], y[i]
        if scratch is not None and (a.data_ptr() - b.data_ptr()) % _ALIGN:
            start = (a.data_ptr() - scratch.data_ptr()) % _ALIGN // scratch.element_size()
            b = scratch[start:start + b.numel()].copy_(b)
        return torch.dot(a, b)

    if n == 1:
        return row(0).view(1).double()
    return torch.stack([row(i) for i in range(n)]).double()


def _tridiagonal(taps: Taps, n: int) -> Optional[tuple[float, float]]:
    """(α, β) with P = αI + β(S + Sᵀ) (S: circular shift by one) for symmetric taps, else None."""
    weights = dict(taps)
    if n <= 2:  # S + Sᵀ is 2I (n = 1) or 2S (n = 2)
        if set(weights) - {0, 1}:
            return None
        return (weights.get(0, 0.0) + (weights.get(1, 0.0) if n == 1 else 0.0),
                0.0 if n == 1 else weights.get(1, 0.0) / 2)
    if set(weights) - {0, 1, n - 1}:
        return None
    beta = weights.get(1, 0.0)
    if abs(beta - weights.get(n - 1, 0.0)) > 1e-12 * max(1.0, abs(beta)):
        return None
    return weights.get(0, 0.0), beta


def _by_axis(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int]:
    """x (..., C, h, w) as (..., G, L): G blocks, each one circular line along ``dim`` (-2: a
    channel's h rows of w values; -1: a row of w values), and the flat step of one lag."""
    *lead, channels, height, width = x.shape
    if dim == -2:
        return x.reshape(*lead, channels, height * width), width
    return x.reshape(*lead, channels * height, width), 1


def _wrap_fix(x_blocks: torch.Tensor, y_blocks: torch.Tensor, k: int) -> torch.Tensor:
    """The flat inner product of y with x offset by k (> 0: x ahead, < 0: behind) pairs the end
    of each block with the start of the next block; the circular lag pairs it with the start of
    its own block. The difference, summed over the last two dims (blocks, values)."""
    length = x_blocks.shape[-1]
    if k > 0:
        wrapped, partner = y_blocks[..., length - k:], x_blocks[..., :k]
        crossed = (wrapped[..., :-1, :] * partner[..., 1:, :]).sum((-2, -1))
    else:
        wrapped, partner = y_blocks[..., :-k], x_blocks[..., length + k:]
        crossed = (wrapped[..., 1:, :] * partner[..., :-1, :]).sum((-2, -1))
    return ((wrapped * partner).sum((-2, -1)) - crossed).double()


def _shortest(lag: int, n: int) -> int:
    lag %= n
    return lag - n if lag > n // 2 else lag  # the shorter way round: fewer values to correct


def lag_dot(x: torch.Tensor, y: torch.Tensor, lag: int, dim: int = -2) -> torch.Tensor:
    """Σ x rolled by -``lag`` along ``dim`` ⊙ y per row of x, y (N, C, h, w) -> (N,) float64,
    i.e. Σ x[..., (i + lag) % n, ...] · y[..., i, ...].

    Without the rolled copy: one BLAS dot of the flat arrays offset by ``lag`` lines, then a
    correction for the values that the flat offset takes from the next channel (``dim`` -2) or
    row (``dim`` -1) instead of wrapping round.
    """
    n = x.shape[0]
    lag = _shortest(lag, x.shape[dim])
    if lag == 0:
        return dot(x, y)
    x_blocks, step = _by_axis(x, dim)
    y_blocks, _ = _by_axis(y, dim)
    k = lag * step
    flat_x, flat_y = x.reshape(n, -1), y.reshape(n, -1)
    main = dot(flat_x[:, k:], flat_y[:, :-k]) if k > 0 else dot(flat_x[:, :k], flat_y[:, -k:])
    return main + _wrap_fix(x_blocks, y_blocks, k)


def quadratic(x: torch.Tensor, taps: tuple[Taps, Taps], workspace: Workspace) -> torch.Tensor:
    """<x, (R ⊗ C) x> per row of x (N, C, h, w) -> (N,) float64, for symmetric circulant taps.

    For the tridiagonal R = α_h I + β_h (S + Sᵀ) (and C alike) of linear interpolation the form
    is a sum of four inner products, with m = x + S_w x (slot 'lag_m'):

        (α_h α_w - 2 α_h β_w)|x|² + α_h β_w |m|² + 2 β_h (α_w - 2 β_w)<x, S_h x> + 2 β_h β_w <m, S_h m>

    (every coefficient >= 0): about a third of the memory traffic of filtering x with the
    stencil first. Other taps take the stencil.
    """
    height, width = x.shape[-2:]
    if height * width <= SMALL_MAP:  # one small matrix product beats the dozen steps below
        dense = workspace.constant(("kron", taps, height, width), lambda: torch.kron(
            dense_circulant(taps[0], height), dense_circulant(taps[1], width)), x)
        flat = x.reshape(x.shape[0], -1, height * width)
        return ((flat @ dense) * flat).sum((1, 2)).double()
    rows, cols = _tridiagonal(taps[0], height), _tridiagonal(taps[1], width)
    if rows is None or cols is None:
        return dot(x, stencil2(workspace.take("quadratic", x.shape, x), x, taps, workspace))
    (alpha_h, beta_h), (alpha_w, beta_w) = rows, cols
    total = (alpha_h * alpha_w - 2 * alpha_h * beta_w) * dot(x, x)
    if beta_h:
        total = total + 2 * beta_h * (alpha_w - 2 * beta_w) * lag_dot(x, x, 1)
    if beta_w:
        m = workspace.take("lag_m", x.shape, x)
        torch.add(x[..., :-1], x[..., 1:], out=m[..., :-1])
        torch.add(x[..., -1:], x[..., :1], out=m[..., -1:])
        total = total + alpha_h * beta_w * dot(m, m)
        if beta_h:
            total = total + 2 * beta_h * beta_w * lag_dot(m, m, 1)
    return total


def quadratic_lags(taps: tuple[Taps, Taps], height: int, width: int
                   ) -> tuple[list[tuple[int, int]], list[float]]:
    """<x, (R ⊗ C) x> as Σ coefficient · Σ x ⊙ roll(x, -lag) over the distinct lags: lags
    (l_h, l_w) and (-l_h, -l_w) give the same sum, so each pair is kept once.

    >>> quadratic_lags((((0, 2.0), (1, 0.5), (3, 0.5)), ((0, 1.0),)), 4, 5)
    ([(0, 0), (1, 0)], [2.0, 1.0])
    """
    merged: dict[tuple[int, int], float] = {}
    for offset_h, weight_h in taps[0]:
        for offset_w, weight_w in taps[1]:
            lag = (offset_h % height, offset_w % width)
            mirror = ((-lag[0]) % height, (-lag[1]) % width)
            key = min(lag, mirror)
            merged[key] = merged.get(key, 0.0) + weight_h * weight_w
    keys = sorted(merged)
    return keys, [merged[key] for key in keys]


def blocks(n_shifts: int, n_images: int, map_bytes: int,
           budget: int = CACHE_BYTES) -> list[tuple[slice, slice]]:
    """(shifts, images) slices covering an (S, B) run of maps of ``map_bytes`` each, about
    ``budget`` bytes per block: whole shifts (all images, a contiguous view) while they fit,
    else one shift and some of its images.

    >>> blocks(3, 2, 1, budget=4)
    [(slice(0, 2, None), slice(0, 2, None)), (slice(2, 3, None), slice(0, 2, None))]
    """
    map_bytes = max(1, map_bytes)
    per_shift = map_bytes * n_images
    if per_shift <= budget:
        step = max(1, budget // per_shift)
        return [(slice(s, min(n_shifts, s + step)), slice(0, n_images))
                for s in range(0, n_shifts, step)]
    step = max(1, budget // map_bytes)
    return [(slice(s, s + 1), slice(i, min(n_images, i + step)))
            for s in range(n_shifts) for i in range(0, n_images, step)]


def runs(indices: list[int], limit: int) -> list[tuple[int, int]]:
    """Sorted shift indices as contiguous ranges [start, stop) of at most ``limit`` shifts (a
    range of a shifted run is a view, never a copy).

    >>> runs([0, 1, 2, 5], 2)
    [(0, 2), (2, 3), (5, 6)]
    """
    found: list[tuple[int, int]] = []
    for index in indices:
        if found and found[-1][1] == index and index - found[-1][0] < limit:
            found[-1] = (found[-1][0], index + 1)
        else:
            found.append((index, index + 1))
    return found


def same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """x and y are views of the same values (no data read: no wait for a device)."""
    return (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
            and x.dtype == y.dtype)


def sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over (C, h, w) of (S, B, C, h, w) -> (S, B) float64, without a squared copy."""
    return torch.linalg.vector_norm(x.flatten(2), dim=-1).double().square()


def value_range(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """max - min over (C, h, w) of (S, B, C, h, w), inside ``mask`` when given -> (S, B)."""
    if mask is None:
        flat = values.flatten(2)
        return (flat.amax(-1) - flat.amin(-1)).double()
    keep = mask.bool().expand_as(values)
    high = torch.where(keep, values, torch.full_like(values, -math.inf)).flatten(2).amax(-1)
    low = torch.where(keep, values, torch.full_like(values, math.inf)).flatten(2).amin(-1)
    return torch.nan_to_num(high - low, nan=0.0, posinf=0.0, neginf=0.0).double()


def overlap_mask(n: int, offsets: torch.Tensor, border: int) -> torch.Tensor:
    """(S, n) bool: positions i with i and i - offset both inside [border, n - 1 - border]."""
    index = torch.arange(n, dtype=torch.float64)[None, :]
    lo = torch.clamp(offsets[:, None], min=0) + border
    hi = (n - 1 - border) + torch.clamp(offsets[:, None], max=0)
    return (index >= lo - 1e-9) & (index <= hi + 1e-9)


def device_constants(store: dict, like: torch.Tensor, make) -> dict:
    """Per-device copies of a plan's constants (tensors, also inside lists, tuples and dicts),
    made once: plans are built on the CPU, and copying their constants per pass would cost a
    transfer each."""
    device = like.device

    def moved(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, (list, tuple)):
            return type(value)(moved(item) for item in value)
        if isinstance(value, dict):
            return {key: moved(item) for key, item in value.items()}
        return value

    key = (device, like.dtype)
    if key not in store:
        store[key] = {name: moved(value) for name, value in make().items()}
    return store[key]
