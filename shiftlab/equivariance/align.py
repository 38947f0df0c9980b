"""Align a layer's output with an input shift and reduce the pair to ``ComparisonStats``.

For a spatial layer of stride s an input shift δ is a feature shift δ/s (docs/semantics.md):

- ``exact``: roll the reference by δ/s where s divides δ; NaN elsewhere.
- ``fourier``: band-limited fractional shift of the reference (FFT phase ramp) by δ/s.
- ``bilinear`` (the paper's figure; default): compare T_δ U a with U b at input resolution, U
  being circular linear upsampling by s; the plan lives in :mod:`shiftlab.equivariance.bilinear`.

Performance: each comparison is a few memory-bound passes over the feature maps, so plans are
built once on the CPU (groups of shifts, stencil taps, phase ramps), scratch memory is reused
(:class:`~shiftlab.equivariance.stencil.Workspace`), the shifted maps are walked in cache-sized blocks
(:func:`~shiftlab.equivariance.stencil.blocks`: the second pass over a block reads the cache), nothing is
rolled into a copy of the shifted run, and no per-chunk code reads a value back to the host (no
``.item()``, ``bool(tensor)``, ``nonzero`` or boolean indexing), so on a GPU the comparisons queue
behind the forward pass without synchronising.

Global layers are compared without alignment (an invariance distance). Tensors crossing these
functions: reference (B, C, h, w), shifted run (S, B, C, h, w), shifts (S, 2) in input pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .bilinear import BilinearPlan, bilinear_axis
from ..checks import check_alignment, check_mode
from .geometry import LayerInfo
from .kernels.differences import Differences, choose
from .metrics import ComparisonStats
from .shifts import phase_ramp
from .stencil import (Workspace, device_constants, overlap_mask, rolled_into, runs, same_tensor,
                      sub_rolled, sum_sq, value_range)

SCRATCH_BYTES = 32 * 2**20
"""Crop mode: shifts compared in one step are capped so that each scratch tensor stays near this
size (circular mode walks cache-sized blocks instead)."""

ALIGNMENTS = ("exact", "bilinear", "fourier")
DENSE_SIDE = 64
"""Fourier alignment: maps of at most this many rows and columns are shifted by dense matrix
products (h or w multiply-adds per value, faster than the FFTs on the CPU up to about this size),
larger ones by FFTs."""


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


def _step(ref: torch.Tensor) -> int:
    """How many shifts one step handles so that scratch stays near ``SCRATCH_BYTES``."""
    return max(1, SCRATCH_BYTES // max(1, ref.numel() * ref.element_size()))


def _zeros(n_shifts: int, n_images: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_shifts, n_images, dtype=torch.float64, device=device)


@dataclass
class RollPlan:
    """Exact or Fourier alignment at feature resolution, with an optional crop-mode mask.

    A feature shift δ/s = q + r (q whole pixels, 0 <= r < 1) aligns the reference as a roll by q
    of T_r a: one band-limited shift per distinct fraction r, shared by all shifts with that
    fraction, and a roll folded into the subtraction. Integer shifts need only the roll. These
    groups are fixed here, on the CPU, once; shifts that ``exact`` leaves undefined are not
    computed at all.

    T_r is separable: the reference is shifted along the rows once per distinct r_h, then along
    the columns. On maps up to ``DENSE_SIDE`` a side both steps are matrix products with the
    operators as dense matrices (:class:`_DenseShifts`: one product per row part gives every
    column fraction that shares it); larger maps use 1-D FFTs along contiguous lines
    (:class:`_FractionalShifts`). The half-spectrum convention's corner bin (even h and w) is
    not separable: it is added back as a checkerboard term.
    """

    feature_shifts: torch.Tensor  # (S, 2) float64, δ / s
    valid: torch.Tensor  # (S,) bool
    fourier: bool
    mask: Optional[torch.Tensor]  # (S, 1, 1, h, w) float32, crop mode only
    need_peak: bool
    # circular mode: how the shifted maps are read (the compiled kernel or the eager passes)
    differences: Differences = field(default_factory=choose, repr=False, compare=False)

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
        # [(fraction r or None, [(roll q, shift indices)])], by row fraction: the shifter keeps
        # one row-shifted spectrum at a time
        order = sorted(groups, key=lambda r: (-1.0, -1.0) if r is None else r)
        self.groups = [(residue, list(groups[residue].items())) for residue in order]
        # per group: its shifts as contiguous ranges, for the rows its sums fill
        self.spans = [[span for _, indices in by_offset for span in runs(indices, len(indices))]
                      for _, by_offset in self.groups]
        self.fractional = [residue for residue, _ in self.groups if residue is not None]
        self._constants: dict = {}

    def _make_constants(self, height: int, width: int, dtype: torch.dtype) -> dict:
        counts = (self.mask.sum(dim=(1, 2, 3, 4)).double() if self.mask is not None
                  else torch.full((len(self.valid),), float(height * width), dtype=torch.float64))
        complex_type = torch.complex128 if dtype == torch.float64 else torch.complex64
        # per fraction: the 1-D ramps (h//2+1,) and (w//2+1,), complex128, None for a whole axis
        axis_ramps = [(_axis_ramp(height, rows) if rows else None,
                       _axis_ramp(width, cols) if cols else None) for rows, cols in self.fractional]
        ramps = []  # per fraction: (row ramp (h//2+1, 1) or None, column ramp (1, w//2+1) or None)
        corners = []  # per fraction: the corner bin's correction / (h·w), or 0
        for (rows, cols), (ramp_h, ramp_w) in zip(self.fractional, axis_ramps):
            ramps.append((None if ramp_h is None else ramp_h[:, None].to(complex_type),
                          None if ramp_w is None else ramp_w[None, :].to(complex_type)))
            # phase_ramp's corner is cos(π(r_h + r_w)); the separable product gives
            # cos(π r_h)·cos(π r_w): the difference is -sin(π r_h)·sin(π r_w)
            even = height % 2 == 0 and width % 2 == 0
            corners.append(-math.sin(math.pi * rows) * math.sin(math.pi * cols) / (height * width)
                           if even else 0.0)
        checker = ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2) * -2.0 + 1
        return {"mask": self.mask, "counts": counts, "valid": self.valid & (counts > 0),
                "ramps": ramps, "corners": corners, "checker": checker.to(dtype),
                "dense": _dense_operators(self.fractional, axis_ramps, height, width, dtype)
                if max(height, width) <= DENSE_SIDE else None,
                "energy_weights": torch.tensor([energy_weights(r) for r in self.fractional],
                                               dtype=torch.float64).reshape(-1, 4)}

    def compare(self, ref: torch.Tensor, shifted: torch.Tensor, cache: Optional[dict] = None,
                workspace: Optional[Workspace] = None) -> ComparisonStats:
        """Statistics (S, B) of ``ref`` (B, C, h, w) aligned to each shift vs. ``shifted``."""
        cache = {} if cache is None else cache
        workspace = Workspace() if workspace is None else workspace
        device = ref.device
        n_shifts, n_images = shifted.shape[:2]
        const = device_constants(self._constants, ref,
                                  lambda: self._make_constants(*ref.shape[-2:], ref.dtype))
        mask = const["mask"]
        diff_sq, ref_sq = _zeros(n_shifts, n_images, device), _zeros(n_shifts, n_images, device)
        peak = _zeros(n_shifts, n_images, device) if self.need_peak else None
        shifted_sq = _zeros(n_shifts, n_images, device)
        if mask is None and "roll" not in cache:  # a roll changes neither the norm nor the peak
            cache["roll"] = (sum_sq(ref[None])[0],
                             value_range(ref[None], None)[0] if self.need_peak else None)
        if mask is None and n_shifts == 1 and bool(self.valid[0]) and \
                not bool(self.feature_shifts[0].any()) and same_tensor(shifted[0], ref):
            # the reference against itself (the zero shift): nothing to compute
            norm, top = cache["roll"]
            count = (const["counts"] * ref.shape[1])[:, None].expand(1, n_images)
            # a - a is NaN where a holds Inf or NaN: keep that (counted as n_nan), not 0
            diff_sq = torch.where(torch.isfinite(norm), diff_sq, torch.full_like(diff_sq, math.nan))
            return ComparisonStats(norm[None], norm[None], diff_sq, count,
                                   None if top is None else top[None], const["valid"])
        dense = const["dense"] is not None and _exact_products(ref)
        shifter = (_DenseShifts if dense else _FractionalShifts)(ref, const)
        norms = None  # ‖T_r a‖² (fractions, B), all from the reference's spectrum at once
        if mask is None and self.fractional:
            norms = (const["energy_weights"] @ torch.stack(nyquist_energies(ref))).clamp_min_(0)
        limit = _step(ref)
        fractional_index = 0
        sums = self.differences.roll_pass(ref, shifted, workspace) if mask is None else None
        for (residue, by_offset), spans in zip(self.groups, self.spans):
            source = ref
            if residue is not None:  # band-limited shift of the reference
                source = shifter.shifted(fractional_index, residue[0])
                fractional_index += 1
            if mask is None:  # a roll changes neither the norm nor the peak
                norm, top = cache["roll"]
                if residue is not None:
                    norm = norms[fractional_index - 1]
                    top = value_range(source[None], None)[0] if self.need_peak else None
                sums(source, by_offset, shifted_sq, diff_sq)
                for start, stop in spans:
                    ref_sq[start:stop] = norm
                    if peak is not None:
                        peak[start:stop] = top
                continue
            for offset, indices in by_offset:  # crop mode: masked, steps of ~SCRATCH_BYTES
                aligned = rolled_into(workspace.take("aligned", ref.shape, ref), source, offset)
                for start, stop in runs(indices, limit):
                    part = shifted[start:stop]
                    diff = sub_rolled(workspace.take("diff", part.shape, part), part, source, offset)
                    part_mask = mask[start:stop]
                    diff_sq[start:stop] = sum_sq(diff.mul_(part_mask))
                    shifted_sq[start:stop] = sum_sq(torch.mul(part, part_mask, out=diff))
                    ref_sq[start:stop] = sum_sq(torch.mul(aligned, part_mask, out=diff))
                    if peak is not None:
                        peak[start:stop] = value_range(aligned.expand(stop - start, *aligned.shape),
                                                       part_mask)
        count = (const["counts"] * ref.shape[1])[:, None].expand(n_shifts, n_images)
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, const["valid"])


class _Shifts:
    """What both ways of shifting a reference by a fraction share: the reference, the plan's
    constants and the non-separable corner term."""

    def __init__(self, ref: torch.Tensor, const: dict) -> None:
        self.ref, self.const = ref, const
        self._corner: Optional[torch.Tensor] = None

    def _add_corner(self, out: torch.Tensor, index: int) -> torch.Tensor:
        """``out`` (the separable shift for fraction ``index``) plus the corner bin's correction,
        in place (even h and w; nothing otherwise)."""
        corner = self.const["corners"][index]
        if corner:
            if self._corner is None:  # the reference's corner bin: Σ a·(-1)^(i+j) per map
                flat = self.ref.reshape(*self.ref.shape[:-2], -1)
                self._corner = flat @ self.const["checker"].reshape(-1)
            out.addcmul_(self._corner[..., None, None], self.const["checker"], value=corner)
        return out


class _FractionalShifts(_Shifts):
    """The band-limited shifts T_r a of one reference for a compare call: the row spectrum
    computed once, and the column spectrum of the current row shift kept while the fractions
    (sorted by row part) share it."""

    def __init__(self, ref: torch.Tensor, const: dict) -> None:
        super().__init__(ref, const)
        self.height, self.width = ref.shape[-2:]
        self._rows: Optional[tuple[float, torch.Tensor]] = None  # r_h, spectrum of T_(r_h, 0) a
        self._spectrum_h: Optional[torch.Tensor] = None

    def _along_rows(self, ramp: torch.Tensor) -> torch.Tensor:
        if self._spectrum_h is None:
            self._spectrum_h = torch.fft.rfft(self.ref, dim=-2)
        return torch.fft.irfft(self._spectrum_h * ramp, n=self.height, dim=-2)

    def shifted(self, index: int, rows: float) -> torch.Tensor:
        """T_r a for fraction ``index`` of the plan (whose row part is ``rows``)."""
        ramp_h, ramp_w = self.const["ramps"][index]
        if ramp_w is None:  # a row fraction only
            return self._along_rows(ramp_h)
        if self._rows is None or self._rows[0] != rows:  # the previous row part is done with
            base = self.ref if ramp_h is None else self._along_rows(ramp_h)
            self._rows = (rows, torch.fft.rfft(base, dim=-1))
        return self._add_corner(torch.fft.irfft(self._rows[1] * ramp_w, n=self.width, dim=-1),
                                index)


def nyquist_energies(ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per image of ``ref`` (B, C, h, w), float64 (B,): the energy Σx², and that of its
    components at the row Nyquist frequency, at the column Nyquist frequency (each including
    the corner) and at the corner alone; 0 along an odd axis, which has no Nyquist frequency.

    :func:`energy_weights` combines them by subtraction, which float32 sums do to ~1e-7 of
    Σx²: enough while the Nyquist components hold at most half the energy (the shifted norm
    keeps at least half). A map with more is summed again in float64 (rare: it is nearly a
    checkerboard); off the CPU always, where looking first would wait for the device."""
    if ref.dtype == torch.float64 or ref.device.type != "cpu":
        return _nyquist_sums(ref.double())
    energies = _nyquist_sums(ref)
    if bool(((energies[1] + energies[2]) > energies[0] / 2).any()):
        energies = _nyquist_sums(ref.double())
    return energies


def _nyquist_sums(ref: torch.Tensor) -> tuple[torch.Tensor, ...]:
    height, width = ref.shape[-2:]
    zero = torch.zeros(ref.shape[0], dtype=torch.float64, device=ref.device)
    alternate_h = torch.ones(height, dtype=ref.dtype, device=ref.device)
    alternate_h[1::2] = -1
    alternate_w = torch.ones(width, dtype=ref.dtype, device=ref.device)
    alternate_w[1::2] = -1
    along_rows = torch.matmul(alternate_h, ref) if height % 2 == 0 else None  # (B, C, w)
    along_cols = ref @ alternate_w if width % 2 == 0 else None  # (B, C, h)
    rows = zero if along_rows is None else along_rows.double().square().sum((-2, -1)) / height
    cols = zero if along_cols is None else along_cols.double().square().sum((-2, -1)) / width
    corner = zero
    if along_rows is not None and along_cols is not None:
        corner = (along_rows.double() @ alternate_w.double()).square().sum(-1) / (height * width)
    energy = torch.linalg.vector_norm(ref.flatten(1), dim=-1).double().square()
    return energy, rows, cols, corner


def energy_weights(fraction: tuple[float, float]) -> tuple[float, float, float, float]:
    """w with ‖T_r a‖² = w · :func:`nyquist_energies` (a) (Parseval): the band-limited shift
    keeps every frequency's magnitude but the Nyquist ones, which it scales by cos(π r_h),
    cos(π r_w) and, at the corner, cos(π (r_h + r_w)) (:func:`~shiftlab.equivariance.shifts.phase_ramp`).
    No pass over T_r a."""
    rows, cols = (math.sin(math.pi * r) ** 2 for r in fraction)
    corner = math.sin(math.pi * (fraction[0] + fraction[1])) ** 2
    return 1.0, -rows, -cols, rows + cols - corner


def _exact_products(ref: torch.Tensor) -> bool:
    """Whether matrix products on these maps run in full precision: a user who allowed TF32 or
    bf16 float32 products (``torch.set_float32_matmul_precision``) gets the FFT shifts, whose
    ~1e-3 error would otherwise reach the distances."""
    if ref.dtype == torch.float64:
        return True
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (ref.is_cuda and torch.backends.cuda.matmul.allow_tf32)


def _axis_ramp(n: int, fraction: float) -> torch.Tensor:
    """The half-spectrum ramp (n//2 + 1,) complex128 of a band-limited shift by ``fraction``
    along one axis of length n (:func:`~shiftlab.equivariance.shifts.phase_ramp`, from the float64 fraction)."""
    return phase_ramp(torch.tensor([[0.0, fraction]], dtype=torch.float64), 1, n)[0, 0]


def _shift_matrix(n: int, ramp: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 M with ``x @ M`` the band-limited circular shift of rows x whose
    :func:`_axis_ramp` is ``ramp``: the half-spectrum operator applied to the identity."""
    eye = torch.eye(n, dtype=torch.float64)
    return torch.fft.irfft(torch.fft.rfft(eye, dim=-1) * ramp, n=n, dim=-1)


def _dense_operators(fractions: list[tuple[float, float]], axis_ramps: list[tuple],
                     height: int, width: int, dtype: torch.dtype) -> dict[float, tuple]:
    """Per row part r_h of the plan's fractions: the row operator (h, h) or None, the column
    operators of the fractions sharing it side by side (w, k·w) or None, and each fraction's
    index -> its slot there (None: the row shift alone). ``axis_ramps``: per fraction, its
    :func:`_axis_ramp` pair (None for a whole axis)."""
    by_rows: dict[float, tuple] = {}
    for index, ((rows, _), (ramp_h, ramp_w)) in enumerate(zip(fractions, axis_ramps)):
        if rows not in by_rows:  # one row operator per row part
            by_rows[rows] = (None if ramp_h is None else _shift_matrix(height, ramp_h).T.to(dtype),
                             [], {})
        _, columns, slots = by_rows[rows]
        slots[index] = None
        if ramp_w is not None:
            slots[index] = len(columns)
            columns.append(_shift_matrix(width, ramp_w))
    return {rows: (row_matrix, torch.cat(columns, dim=1).to(dtype) if columns else None, slots)
            for rows, (row_matrix, columns, slots) in by_rows.items()}


class _DenseShifts(_Shifts):
    """The band-limited shifts T_r a of one reference for a compare call as matrix products: per
    row part r_h, the row shift M_h a, then one product (B·C·h, w) @ (w, k·w) for the k fractions
    that share r_h (each a strided slice of it). Kept while the fractions (sorted by row part)
    share it."""

    def __init__(self, ref: torch.Tensor, const: dict) -> None:
        super().__init__(ref, const)
        self._rows: Optional[tuple[float, torch.Tensor, Optional[torch.Tensor]]] = None

    def shifted(self, index: int, rows: float) -> torch.Tensor:
        """T_r a for fraction ``index`` of the plan (whose row part is ``rows``)."""
        row_matrix, columns, slots = self.const["dense"][rows]
        if self._rows is None or self._rows[0] != rows:  # the previous row part is done with
            base = self.ref if row_matrix is None else torch.matmul(row_matrix, self.ref)
            product = None
            if columns is not None:
                width = self.ref.shape[-1]
                product = (base.reshape(-1, width) @ columns).view(
                    *self.ref.shape[:-1], columns.shape[1] // width, width)
            self._rows = (rows, base, product)
        slot = slots[index]
        if slot is None:
            return self._rows[1]
        return self._add_corner(self._rows[2][..., slot, :], index)


Plan = Union[RollPlan, BilinearPlan]


def make_plan(info: LayerInfo, shifts: torch.Tensor, mode: str, align: str, border: int = 0,
              need_peak: bool = False) -> Plan:
    """How to compare one spatial layer for a chunk of input shifts (S, 2) in pixels.

    ``border`` (input pixels, crop mode) shrinks the compared region on every side. The plan's
    ``compare(ref (B, C, h, w), shifted (S, B, C, h, w))`` gives the ``ComparisonStats``.

    Example:
        >>> info = LayerInfo("pool", "MaxPool2d", "spatial", (2.0, 2.0), (2.0, 2.0), (3, 8, 8))
        >>> plan = make_plan(info, torch.tensor([[1.0, 2.0]]), "circular", "bilinear")
        >>> plan.compare(torch.ones(1, 3, 8, 8), torch.ones(1, 1, 3, 8, 8)).diff_sq.abs().max() < 1e-3
        tensor(True)
    """
    check_alignment(align)
    check_mode(mode)
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
                rows=bilinear_axis(height, float(stride[0]), shifts[:, 0], crop, border),
                cols=bilinear_axis(width, float(stride[1]), shifts[:, 1], crop, border),
                need_peak=need_peak)
    fourier = align == "fourier" and not bool(integer.all())
    valid = integer.all(1) if align == "exact" else torch.ones(len(shifts), dtype=torch.bool)
    mask = None
    if crop:
        rows = overlap_mask(height, feature[:, 0], math.ceil(border / float(stride[0])))
        cols = overlap_mask(width, feature[:, 1], math.ceil(border / float(stride[1])))
        mask = (rows[:, :, None] & cols[:, None, :]).float()[:, None, None]
    return RollPlan(feature, valid, fourier, mask, need_peak)
