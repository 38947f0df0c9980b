"""Align a layer's output with an input shift and reduce the pair to ``ComparisonStats``.

For a spatial layer of stride s an input shift δ is a feature shift δ/s (SPEC.md):

- ``exact``: roll the reference by δ/s where s divides δ; NaN elsewhere.
- ``fourier``: band-limited fractional shift of the reference (FFT phase ramp) by δ/s.
- ``bilinear`` (the paper's figure; default): compare T_δ U a with U b at input resolution, U
  being circular linear upsampling by s. The upsampled maps are never built: every term is a
  quadratic form x^T (P_h ⊗ P_w) y with small banded n×n matrices (P = A^T D B, A and B the 1-D
  interpolation operators, D the valid-position mask), applied at feature resolution. In
  circular mode every P is circulant, i.e. a separable stencil of a few taps per axis
  (:mod:`shiftlab.stencil`). Tests check it against explicit upsampling.

Performance: each comparison is a few memory-bound passes over the feature maps, so plans are
built once on the CPU (groups of shifts, stencil taps, phase ramps), scratch memory is reused
(:class:`~shiftlab.stencil.Workspace`), nothing is rolled into a copy, and no per-chunk code reads
a value back to the host (no ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean indexing), so
on a GPU the comparisons queue behind the forward pass without synchronising.

Global layers are compared without alignment (an invariance distance). Tensors crossing these
functions: reference (B, C, h, w), shifted run (S, B, C, h, w), shifts (S, 2) in input pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .geometry import LayerInfo
from .metrics import ComparisonStats
from .shifts import phase_ramp, roll_many
from .stencil import (IDENTITY, SMALL_MAP, Taps, Workspace, circulant_taps, dense_circulant,
                      lag_dots, quadratic, rolled_into, stencil2, sub_rolled)

SCRATCH_BYTES = 32 * 2**20
"""Shifts compared in one step are capped so that each scratch tensor stays near this size."""

ALIGNMENTS = ("exact", "bilinear", "fourier")


def _reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over (C, h, w) of an (S, B, C, h, w) tensor -> (S, B) float64."""
    return x.sum(dim=(2, 3, 4)).to(torch.float64)


def compare_global(ref: torch.Tensor, shifted: torch.Tensor, need_peak: bool) -> ComparisonStats:
    """Invariance statistics of a global layer: ref (B, ...) vs. shifted (S, B, ...)."""
    a = ref.reshape(1, ref.shape[0], -1).float()
    b = shifted.reshape(shifted.shape[0], shifted.shape[1], -1).float()
    diff = (b - a).square().sum(-1).double()
    ref_sq = a.square().sum(-1).double().expand_as(diff)
    peak = (a.amax(-1) - a.amin(-1)).double().expand_as(diff) if need_peak else None
    count = torch.full_like(diff, float(a.shape[-1]))
    valid = torch.ones(b.shape[0], dtype=torch.bool, device=diff.device)
    return ComparisonStats(ref_sq, b.square().sum(-1).double(), diff, count, peak, valid)


def _overlap_mask(n: int, offsets: torch.Tensor, border: int) -> torch.Tensor:
    """(S, n) bool: positions i with i and i - offset both inside [border, n - 1 - border]."""
    index = torch.arange(n, dtype=torch.float64)[None, :]
    lo = torch.clamp(offsets[:, None], min=0) + border
    hi = (n - 1 - border) + torch.clamp(offsets[:, None], max=0)
    return (index >= lo - 1e-9) & (index <= hi + 1e-9)


def _runs(indices: list[int], limit: int) -> list[tuple[int, int]]:
    """Sorted shift indices as contiguous ranges [start, stop) of at most ``limit`` shifts."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index and index - runs[-1][0] < limit:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _progressions(indices: list[int]) -> list[slice]:
    """Sorted indices as evenly spaced runs (slices with a step): strided views, not copies.

    >>> _progressions([1, 3, 5, 6, 9])
    [slice(1, 6, 2), slice(6, 10, 3)]
    """
    runs: list[list[int]] = []
    for index in indices:
        run = runs[-1] if runs else None
        if run is not None and (len(run) == 1 or index - run[-1] == run[1] - run[0]):
            run.append(index)
        else:
            runs.append([index])
    return [slice(run[0], run[-1] + 1, run[1] - run[0] if len(run) > 1 else 1) for run in runs]


def _step(ref: torch.Tensor) -> int:
    """How many shifts one step handles so that scratch stays near ``SCRATCH_BYTES``."""
    return max(1, SCRATCH_BYTES // max(1, ref.numel() * ref.element_size()))


def _zeros(n_shifts: int, n_images: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_shifts, n_images, dtype=torch.float64, device=device)


def _device_constants(store: dict, like: torch.Tensor, make) -> dict:
    """Per-device copies of a plan's constants (tensors, also inside lists and tuples), made once:
    plans are built on the CPU, and copying their constants per pass would cost a transfer each."""
    device = like.device

    def moved(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if isinstance(value, (list, tuple)):
            return type(value)(moved(item) for item in value)
        return value

    key = (device, like.dtype)
    if key not in store:
        store[key] = {name: moved(value) for name, value in make().items()}
    return store[key]


@dataclass
class RollPlan:
    """Exact or Fourier alignment at feature resolution, with an optional crop-mode mask.

    A feature shift δ/s = q + r (q whole pixels, 0 <= r < 1) aligns the reference as a roll by q
    of T_r a: one band-limited shift (an inverse FFT, along one axis when r is whole along the
    other) per distinct fraction r, shared by all shifts with that fraction, and a roll folded
    into the subtraction. Integer shifts need only the roll. These groups are fixed here, on the
    CPU, once; shifts that ``exact`` leaves undefined are not computed at all.
    """

    feature_shifts: torch.Tensor  # (S, 2) float64, δ / s
    valid: torch.Tensor  # (S,) bool
    fourier: bool
    mask: Optional[torch.Tensor]  # (S, 1, 1, h, w) float32, crop mode only
    need_peak: bool

    def __post_init__(self) -> None:
        shifts = self.feature_shifts
        whole = shifts.round()
        fractional = ((shifts - whole).abs() > 1e-6).any(1) & self.fourier
        base = torch.where(fractional[:, None], torch.floor(shifts + 1e-9), whole)
        groups: dict[Optional[tuple], dict[tuple[int, int], list[int]]] = {}
        for index, (valid, frac) in enumerate(zip(self.valid.tolist(), fractional.tolist())):
            if valid:  # exact alignment at a shift the stride does not divide: NaN, no work
                offset = tuple(int(v) for v in base[index].tolist())
                residue = tuple(round(float(v), 9) for v in shifts[index] - base[index]) if frac else None
                groups.setdefault(residue, {}).setdefault(offset, []).append(index)
        # [(fraction r or None, [(roll q, shift indices)])]
        self.groups = [(residue, list(by_offset.items())) for residue, by_offset in groups.items()]
        self.fractional = [residue for residue, _ in self.groups if residue is not None]
        self._constants: dict = {}

    def _make_constants(self, height: int, width: int, dtype: torch.dtype) -> dict:
        counts = (self.mask.sum(dim=(1, 2, 3, 4)).double() if self.mask is not None
                  else torch.full((len(self.valid),), float(height * width), dtype=torch.float64))
        complex_type = torch.complex128 if dtype == torch.float64 else torch.complex64
        ramps = []  # per fraction: (dims of the FFT, ramp) - one axis when the other is whole
        for rows, cols in self.fractional:
            if rows == 0:
                ramp = phase_ramp(torch.tensor([[0.0, cols]]), 1, width)[0]  # (1, w//2+1)
                ramps.append(((-1,), ramp.to(complex_type)))
            elif cols == 0:
                ramp = phase_ramp(torch.tensor([[0.0, rows]]), 1, height)[0].T  # (h//2+1, 1)
                ramps.append(((-2,), ramp.to(complex_type)))
            else:
                ramp = phase_ramp(torch.tensor([[rows, cols]]), height, width)[0]
                ramps.append(((-2, -1), ramp.to(complex_type)))
        return {"mask": self.mask, "counts": counts, "valid": self.valid & (counts > 0),
                "ramps": ramps}

    def compare(self, ref: torch.Tensor, shifted: torch.Tensor, cache: Optional[dict] = None,
                workspace: Optional[Workspace] = None) -> ComparisonStats:
        """Statistics (S, B) of ``ref`` (B, C, h, w) aligned to each shift vs. ``shifted``."""
        cache = {} if cache is None else cache
        workspace = Workspace() if workspace is None else workspace
        device = ref.device
        n_shifts, n_images = shifted.shape[:2]
        const = _device_constants(self._constants, ref,
                                  lambda: self._make_constants(*ref.shape[-2:], ref.dtype))
        mask = const["mask"]
        diff_sq, ref_sq = _zeros(n_shifts, n_images, device), _zeros(n_shifts, n_images, device)
        peak = _zeros(n_shifts, n_images, device) if self.need_peak else None
        shifted_sq = _zeros(n_shifts, n_images, device)
        if mask is None and "roll" not in cache:  # a roll changes neither the norm nor the peak
            cache["roll"] = (_sum_sq(ref[None])[0],
                             _peak(ref[None], None)[0] if self.need_peak else None)
        spectra: dict[tuple[int, ...], torch.Tensor] = {}  # of the reference, per FFT axes
        limit = _step(ref)
        fractional_index = 0
        for residue, by_offset in self.groups:
            source = ref
            if residue is not None:  # band-limited shift: the reference's spectrum times a ramp
                dims, ramp = const["ramps"][fractional_index]
                fractional_index += 1
                if dims not in spectra:
                    spectra[dims] = torch.fft.rfftn(ref, dim=dims)
                spectrum = spectra[dims]
                product = workspace.take("spectrum", spectrum.shape, spectrum)
                torch.mul(spectrum, ramp, out=product)
                source = torch.fft.irfftn(product, s=[ref.shape[d] for d in dims], dim=dims)
            if mask is None:  # a roll changes neither the norm nor the peak
                norm, top = cache["roll"] if residue is None else (
                    _sum_sq(source[None])[0],
                    _peak(source[None], None)[0] if self.need_peak else None)
            for offset, indices in by_offset:
                aligned = None
                if mask is not None:
                    aligned = rolled_into(workspace.take("aligned", ref.shape, ref), source, offset)
                for start, stop in _runs(indices, limit):
                    part = shifted[start:stop]
                    diff = sub_rolled(workspace.take("diff", part.shape, part), part, source, offset)
                    if mask is None:
                        diff_sq[start:stop] = _sum_sq(diff)
                        shifted_sq[start:stop] = _sum_sq(part)
                        ref_sq[start:stop] = norm
                        if peak is not None:
                            peak[start:stop] = top
                        continue
                    part_mask = mask[start:stop]
                    diff_sq[start:stop] = _sum_sq(diff.mul_(part_mask))
                    shifted_sq[start:stop] = _sum_sq(torch.mul(part, part_mask, out=diff))
                    ref_sq[start:stop] = _sum_sq(torch.mul(aligned, part_mask, out=diff))
                    if peak is not None:
                        peak[start:stop] = _peak(aligned.expand(stop - start, *aligned.shape),
                                                 part_mask)
        count = (const["counts"] * ref.shape[1])[:, None].expand(n_shifts, n_images)
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, const["valid"])


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """Σ x² over (C, h, w) of (S, B, C, h, w) -> (S, B) float64, without a squared copy."""
    return torch.linalg.vector_norm(x.flatten(2), dim=-1).double().square()


def _peak(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """max - min over (C, h, w) of (S, B, C, h, w), inside ``mask`` when given -> (S, B)."""
    if mask is None:
        flat = values.flatten(2)
        return (flat.amax(-1) - flat.amin(-1)).double()
    keep = mask.bool().expand_as(values)
    high = torch.where(keep, values, torch.full_like(values, -math.inf)).flatten(2).amax(-1)
    low = torch.where(keep, values, torch.full_like(values, math.inf)).flatten(2).amin(-1)
    return torch.nan_to_num(high - low, nan=0.0, posinf=0.0, neginf=0.0).double()


# -- bilinear: banded quadratic forms ---------------------------------------------------
def _interp_matrix(n: int, positions: torch.Tensor) -> torch.Tensor:
    """Circular linear interpolation weights (..., N, n) of a length-n signal at ``positions``."""
    low = torch.floor(positions)
    frac = positions - low
    low = low.long() % n
    weights = torch.zeros(*positions.shape, n, dtype=torch.float64)
    weights.scatter_add_(-1, low[..., None], (1 - frac)[..., None])
    weights.scatter_add_(-1, ((low + 1) % n)[..., None], frac[..., None])
    return weights


@dataclass
class Band:
    """A batch of n×n matrices stored by their non-zero (circular) diagonals."""

    offsets: list[int]
    weights: torch.Tensor  # (S, K, n) float32: weights[s, k, i] = P[s, i, (i + offsets[k]) % n]

    @classmethod
    def from_dense(cls, matrices: torch.Tensor) -> "Band":
        n = matrices.shape[-1]
        index = torch.arange(n)
        offsets, diagonals = [], []
        for offset in range(n):
            diagonal = matrices[:, index, (index + offset) % n]
            if bool((diagonal.abs() > 1e-12).any()):
                offsets.append(offset if offset <= n // 2 else offset - n)
                diagonals.append(diagonal)
        weights = torch.stack(diagonals, 1) if diagonals else torch.zeros(matrices.shape[0], 1, n)
        return cls(offsets or [0], weights.float())

    def apply(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """P @ x along ``dim`` (-2 rows, -1 cols) of x (S, B, C, h, w)."""
        weights = self.weights.to(x.device, non_blocking=True)
        view = (weights.shape[0], 1, 1, -1, 1) if dim == -2 else (weights.shape[0], 1, 1, 1, -1)
        out = None
        for k, offset in enumerate(self.offsets):
            term = weights[:, k].reshape(view) * (torch.roll(x, -offset, dims=dim) if offset else x)
            out = term if out is None else out + term
        return out

    def subset(self, rows: torch.Tensor) -> "Band":
        return Band(self.offsets, self.weights[rows])


def _form(x: torch.Tensor, rows: Band, cols: Band, y: torch.Tensor) -> torch.Tensor:
    """Σ x ⊙ (P_h y P_wᵀ) per (shift, image) -> (S, B) float64."""
    return _reduce(x * cols.apply(rows.apply(y, -2), -1))


@dataclass
class _AxisTaps:
    """Circular mode: the matrices of one axis as circulant stencils (``shiftlab.stencil``)."""

    plain: Taps  # UᵀU: |U b|² = <b, P b>
    aligned: list[Taps]  # per shift, AᵀA: |T_δ U a|² (UᵀU again unless δ is fractional)
    cross: list[Taps]  # per shift, T_q (AᵀB)ᵀ: <T_δ U a, U b> = <stencil(a), b>
    size: int  # n, the axis length at feature resolution

    def cross_matrices(self) -> torch.Tensor:
        """The cross stencils as dense (S, n, n) float64 matrices (small maps)."""
        return torch.stack([dense_circulant(taps, self.size) for taps in self.cross])


@dataclass
class _Axis:
    """One axis of the bilinear comparison for a chunk of shifts."""

    quotient: torch.Tensor  # (S,) long: whole feature pixels, pre-applied by a roll
    aligned: Optional[Band]  # A^T D A (None when ``taps`` serve instead)
    cross: Optional[Band]  # A^T D B
    plain: Optional[Band]  # B^T D B
    residue: torch.Tensor  # (S,) float64: δ - s * quotient, in input pixels
    zero_residue: torch.Tensor  # (S,) bool: s divides δ, so A == B
    valid_count: torch.Tensor  # (S,) float64: Σ D, compared positions at input resolution
    peak_mask: Optional[torch.Tensor]  # (S, n) bool, crop mode only
    taps: Optional[_AxisTaps]  # circular mode with circulant matrices (integer stride)


def _axis_taps(plain: torch.Tensor, aligned: torch.Tensor, cross: torch.Tensor,
               quotient: torch.Tensor) -> Optional[_AxisTaps]:
    """Stencils of one axis, or None when a matrix is not circulant (a non-integer stride)."""
    plain_taps = circulant_taps(plain)
    aligned_taps = [circulant_taps(matrix) for matrix in aligned]
    # the reference is filtered by (AᵀB)ᵀ and rolled by q: <T_q Pᵀ a, b> = <T_q a, P b>
    cross_taps = [circulant_taps(matrix.T, roll=int(q)) for matrix, q in zip(cross, quotient)]
    if plain_taps is None or any(t is None for t in aligned_taps + cross_taps):
        return None
    return _AxisTaps(plain_taps, aligned_taps, cross_taps, plain.shape[-1])


def _bilinear_axis(n: int, stride: float, shifts: torch.Tensor, crop: bool, border: int) -> _Axis:
    length = max(1, int(round(n * stride)))
    quotient = torch.floor(shifts / stride + 1e-9)
    residue = shifts - quotient * stride
    k = torch.arange(length, dtype=torch.float64)
    plain = _interp_matrix(n, k / stride)  # (N, n): U
    shifted = _interp_matrix(n, (k[None, :] - residue[:, None]) / stride)  # (S, N, n): T_r U
    if crop:
        # positions whose interpolation uses real samples only, shrunk by the border, for both
        # the shifted map (k) and the reference (k - δ)
        top = (n - 1) * stride - border
        inside = lambda p: (p >= border - 1e-9) & (p <= top + 1e-9)  # noqa: E731
        mask = (inside(k)[None, :] & inside(k[None, :] - shifts[:, None])).double()
        peak_mask = _overlap_mask(n, shifts / stride, math.ceil(border / stride))
    else:
        mask = torch.ones(len(shifts), length, dtype=torch.float64)
        peak_mask = None
    weighted_plain = plain[None] * mask[:, :, None]  # D B
    cross = shifted.transpose(1, 2) @ weighted_plain
    plain_form = plain.T[None] @ weighted_plain
    aligned = shifted.transpose(1, 2) @ (shifted * mask[:, :, None])
    taps = None if crop else _axis_taps(plain_form[0], aligned, cross, quotient)
    # the banded forms serve crop mode and non-circulant matrices (a non-integer stride)
    band = (lambda dense: None) if taps is not None else Band.from_dense  # noqa: E731
    return _Axis(
        quotient=quotient.long(),
        aligned=band(aligned),
        cross=band(cross),
        plain=band(plain_form),
        residue=residue,
        zero_residue=residue.abs() < 1e-9,
        valid_count=mask.sum(1),
        peak_mask=peak_mask,
        taps=taps,
    )


@dataclass
class BilinearPlan:
    rows: _Axis
    cols: _Axis
    need_peak: bool

    def __post_init__(self) -> None:
        exact = (self.rows.zero_residue & self.cols.zero_residue)
        self.exact = exact.nonzero().squeeze(1)  # CPU, once: s divides δ
        self.inexact = (~exact).nonzero().squeeze(1)
        self.exact_flags = exact.tolist()
        self.offsets = list(zip(self.rows.quotient.tolist(), self.cols.quotient.tolist()))
        self.circulant = self.rows.taps is not None and self.cols.taps is not None
        self._constants: dict = {}
        self.cross_groups = self._cross_groups() if self.circulant else []

    def _small_map_constants(self, ref: torch.Tensor) -> dict:
        """Small maps: every inexact shift's cross stencil as one dense (hw × hw) matrix."""
        if ref.shape[-2] * ref.shape[-1] > SMALL_MAP:
            return {}
        rows = self.rows.taps.cross_matrices()[self.inexact].to(ref.dtype)
        cols = self.cols.taps.cross_matrices()[self.inexact].to(ref.dtype)
        return {"inexact": self.inexact, "cross_rows": rows, "cross_cols": cols}

    def _cross_groups(self) -> list[tuple[tuple[Taps, Taps], list[tuple[slice, tuple[int, ...]]]]]:
        """Circular mode, fixed once: how the cross terms <stencil_s(a), b_s> are computed.

        One axis's stencil is applied to the reference, once per distinct stencil (the columns,
        unless the rows have far fewer: a long pass of shifts shares dh); the other axis's taps
        become inner products at lags along it, one matrix-vector product for every evenly
        spaced run of shifts (a strided view): [(stencil pair, [(run, lags)])]. The weights of
        the lags are in :meth:`_cross_weights`.
        """
        rows, cols = self.rows.taps.cross, self.cols.taps.cross
        inexact = self.inexact.tolist()
        # lags along the rows correct whole rows (contiguous); lags along the columns correct a
        # value or two at the end of every row, which costs more: only when it saves many passes
        many = len({cols[s] for s in inexact}) > 2 * len({rows[s] for s in inexact})
        self.lag_dim = -1 if many else -2
        shared, lagged = (rows, cols) if self.lag_dim == -1 else (cols, rows)
        by_stencil: dict[Taps, list[int]] = {}
        for s in inexact:
            by_stencil.setdefault(shared[s], []).append(s)
        groups = []
        for taps, members in by_stencil.items():
            pair = (taps, IDENTITY) if self.lag_dim == -1 else (IDENTITY, taps)
            runs = [(run, tuple(sorted({lag for s in range(run.start, run.stop, run.step)
                                        for lag, _ in lagged[s]})))
                    for run in _progressions(members)]
            groups.append((pair, runs))
        return groups

    def _cross_weights(self) -> list[list[torch.Tensor]]:
        """Per group and run of :meth:`_cross_groups`: the lag weights (R, lags) float64."""
        lagged = self.cols.taps.cross if self.lag_dim == -1 else self.rows.taps.cross
        return [[torch.tensor([[dict(lagged[s]).get(lag, 0.0) for lag in lags]
                               for s in range(run.start, run.stop, run.step)], dtype=torch.float64)
                 for run, lags in runs] for _, runs in self.cross_groups]

    def _compare_circulant(self, ref: torch.Tensor, shifted: torch.Tensor, cache: dict,
                           workspace: Workspace) -> ComparisonStats:
        """Circular mode: every matrix is a stencil of a few taps per axis.

        |T_δ U a|² and |U b|² are quadratic forms <x, P x> (:func:`~shiftlab.stencil.quadratic`);
        the cross term <T_δ U a, U b> is <stencil(a), b>, with the whole-pixel roll folded into
        the stencil: one axis's pass is shared by the shifts with the same stencil along it, the
        other axis's taps are inner products at lags (:func:`~shiftlab.stencil.lag_dots`), see
        :meth:`_cross_groups`. Small maps take dense products instead. Where s divides δ the
        distance is |U(a' - b)|², computed from the difference, free of cancellation.
        """
        n_shifts, n_images = shifted.shape[:2]
        rows, cols = self.rows.taps, self.cols.taps
        device = ref.device
        const = _device_constants(self._constants, ref, lambda: {
            "count": self.rows.valid_count * self.cols.valid_count,
            "cross_weights": self._cross_weights(),
            **self._small_map_constants(ref)})
        channels = float(ref.shape[1])
        count = (const["count"] * channels)[:, None].expand(n_shifts, n_images)
        valid = torch.ones(n_shifts, dtype=torch.bool, device=device)
        plain = (rows.plain, cols.plain)
        if "bilinear" not in cache:  # per image batch: <a, UᵀU a> and the peak
            cache["bilinear"] = {plain: quadratic(ref, plain, workspace)}
            if self.need_peak:
                cache["bilinear_peak"] = _peak(ref[None], None)[0]
        norms = cache["bilinear"]
        peak = cache["bilinear_peak"].expand(n_shifts, n_images) if self.need_peak else None
        keys = list(zip(rows.aligned, cols.aligned))
        if all(key == plain for key in keys):  # whole-pixel δ: |T_δ U a|² = |U a|²
            ref_sq = norms[plain][None].expand(n_shifts, n_images)
        else:
            ref_sq = _zeros(n_shifts, n_images, device)
            for s, key in enumerate(keys):
                if key not in norms:  # a fractional δ: the sampled interpolant has another norm
                    norms[key] = quadratic(ref, key, workspace)
                ref_sq[s] = norms[key]
        if n_shifts == 1 and self.offsets[0] == (0, 0) and self.exact_flags[0] \
                and _same_tensor(shifted[0], ref):
            # the reference against itself (the zero shift): nothing to compute
            return ComparisonStats(ref_sq, ref_sq, _zeros(1, n_images, device), count, peak, valid)
        shifted_sq, cross = _zeros(n_shifts, n_images, device), _zeros(n_shifts, n_images, device)
        step = _step(ref)
        for start in range(0, n_shifts, step):
            stop = min(n_shifts, start + step)
            part = shifted[start:stop]
            shifted_sq[start:stop] = quadratic(part.reshape(-1, *ref.shape[1:]), plain,
                                               workspace).view(stop - start, n_images)
        small = ref.shape[-2] * ref.shape[-1] <= SMALL_MAP
        if small and len(self.inexact):
            # small maps: one matrix product with every shift's (hw × hw) filter beats many
            # small steps; (B·C, hw) @ (hw, R·hw)
            index = const["inexact"]
            part = shifted if len(self.inexact) == n_shifts else shifted[index]
            rows_dense, cols_dense = const["cross_rows"], const["cross_cols"]  # (R, h, h), (R, w, w)
            size = rows_dense.shape[-1] * cols_dense.shape[-1]
            # (R, hw, hw) built per call: kept per plan, it would grow with the number of shifts
            filters = torch.einsum("sik,sjl->sijkl", rows_dense, cols_dense).reshape(-1, size, size)
            filtered = ref.reshape(-1, size) @ filters.transpose(1, 2).permute(1, 0, 2).reshape(size, -1)
            filtered = filtered.view(n_images, -1, len(filters), size).permute(2, 0, 1, 3)
            cross[index] = (filtered * part.reshape(filtered.shape)).sum((2, 3)).double()
        for group, (pair, runs) in enumerate([] if small else self.cross_groups):
            # the shared stencil pass; the other axis's taps become inner products at lags,
            # which read the maps without writing anything
            filtered = stencil2(workspace.take("cross", ref.shape, ref), ref, pair, workspace)
            for number, (run, lags) in enumerate(runs):
                weights = const["cross_weights"][group][number]  # (R, lags) float64
                dots = torch.stack([lag_dots(filtered, shifted[run], lag, self.lag_dim)
                                    for lag in lags], 1)
                cross[run] = (weights[:, :, None] * dots).sum(1)
        diff_sq = ref_sq + shifted_sq - 2 * cross
        for s in self.exact.tolist():  # s divides δ: |U(a' - b)|² directly, no cancellation
            diff = sub_rolled(workspace.take("diff", ref.shape, ref), shifted[s], ref, self.offsets[s])
            diff_sq[s] = quadratic(diff, plain, workspace)
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)

    def compare(self, ref: torch.Tensor, shifted: torch.Tensor, cache: Optional[dict] = None,
                workspace: Optional[Workspace] = None) -> ComparisonStats:
        """Statistics (S, B) of T_δ U a vs. U b at input resolution, at feature-resolution cost."""
        cache = {} if cache is None else cache
        workspace = Workspace() if workspace is None else workspace
        if self.circulant:
            return self._compare_circulant(ref, shifted, cache, workspace)
        device = ref.device
        quotient = torch.stack([self.rows.quotient, self.cols.quotient], 1)
        aligned = roll_many(ref, quotient)  # (S, B, C, h, w)
        rows, cols = self.rows, self.cols
        form = _form
        ref_sq = form(aligned, rows.aligned, cols.aligned, aligned)
        shifted_sq = form(shifted, rows.plain, cols.plain, shifted)
        diff_sq = torch.empty_like(ref_sq)
        if len(self.exact):
            # s divides δ: |U(a' - b)|² directly, free of the cancellation in the expansion
            idx = self.exact.to(device, non_blocking=True)
            diff = aligned[idx] - shifted[idx]
            diff_sq[idx] = form(diff, rows.plain.subset(self.exact), cols.plain.subset(self.exact), diff)
        if len(self.inexact):
            idx = self.inexact.to(device, non_blocking=True)
            cross = form(aligned[idx], rows.cross.subset(self.inexact),
                         cols.cross.subset(self.inexact), shifted[idx])
            diff_sq[idx] = ref_sq[idx] + shifted_sq[idx] - 2 * cross
        channels = ref.shape[1]
        count = (rows.valid_count * cols.valid_count * channels).to(device, non_blocking=True)
        count = count[:, None].expand_as(ref_sq)
        peak = None
        if self.need_peak:
            mask = None
            if rows.peak_mask is not None:
                mask = (rows.peak_mask[:, :, None] & cols.peak_mask[:, None, :]).float()
                mask = mask[:, None, None].to(device, non_blocking=True)
            peak = _peak(aligned, mask)
        valid = count[:, 0] > 0
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)


def _same_tensor(x: torch.Tensor, y: torch.Tensor) -> bool:
    """x and y are views of the same values (no data read: no wait for a device)."""
    return (x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
            and x.dtype == y.dtype)


Plan = Union[RollPlan, BilinearPlan]


def make_plan(info: LayerInfo, shifts: torch.Tensor, mode: str, align: str, border: int = 0,
              need_peak: bool = False) -> Plan:
    """How to compare one spatial layer for a chunk of input shifts (S, 2) in pixels.

    ``border`` (input pixels, crop mode) shrinks the compared region on every side.
    """
    shifts = shifts.to(torch.float64).cpu()
    stride = torch.tensor(info.stride, dtype=torch.float64)
    _, height, width = info.shape
    crop = mode == "crop"
    feature = shifts / stride
    integer = (feature - feature.round()).abs() < 1e-6
    use_bilinear = align == "bilinear" and (float(stride.min()) > 1 or not bool(integer.all()))
    if use_bilinear:
        if float(stride.min()) < 1:
            # an upsampling layer: there is nothing to interpolate, a band-limited shift is exact
            align = "fourier"
        else:
            # circular padding in the conv needs the map to be larger than the kernel
            return BilinearPlan(
                rows=_bilinear_axis(height, float(stride[0]), shifts[:, 0], crop, border),
                cols=_bilinear_axis(width, float(stride[1]), shifts[:, 1], crop, border),
                need_peak=need_peak)
    fourier = align == "fourier" and not bool(integer.all())
    valid = integer.all(1) if align == "exact" else torch.ones(len(shifts), dtype=torch.bool)
    mask = None
    if crop:
        rows = _overlap_mask(height, feature[:, 0], math.ceil(border / float(stride[0])))
        cols = _overlap_mask(width, feature[:, 1], math.ceil(border / float(stride[1])))
        mask = (rows[:, :, None] & cols[:, None, :]).float()[:, None, None]
    return RollPlan(feature, valid, fourier, mask, need_peak)
