"""The bilinear alignment (the paper's, the default): compare T_δ U a with U b at input
resolution, U being circular linear upsampling by the stride s, without building U a or U b.

Circular mode, integer stride: U a = h ⊛ (↑s a) with the triangle kernel h[k] = 1 - |k|/s, so for
a shift d = q·s + r per axis (0 <= r < s)

    <roll(U a, d), U b> = <roll(w_r ⊛ a, q), b>,   w_r[m] = (h ⊛ h)[s·m - r]   (<= 4 taps per axis)
    |U b|² = <w_0 ⊛ b, b>                                                    (3 taps per axis)

and |roll(U a, d)|² = |U a|². So one filtered reference per phase (r_h, r_w) of the chunk, and per
shifted map one inner product with it (rolled slice-wise into a cache-sized scratch) plus the
map's own 3-tap norm (:func:`~shiftlab.equivariance.stencil.quadratic`); the shifted maps are walked in
cache-sized blocks (:func:`~shiftlab.equivariance.stencil.blocks`), so nothing the size of the shifted run is
ever written. Where s divides δ the distance is |U(roll(a, q) - b)|², computed from the
difference, free of cancellation. The taps come from the dense 1-D matrices (built once per plan on
the CPU), which also covers sub-pixel shifts.

Crop mode and non-integer strides (matrices that are not circulant) take banded quadratic forms
x^T (P_h ⊗ P_w) y with P = A^T D B (A, B the 1-D interpolation operators, D the compared
positions), applied at feature resolution. Tests check both against explicit upsampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from .kernels.differences import Differences, choose
from .metrics import ComparisonStats
from .shifts import roll_many
from .stencil import (SMALL_MAP, Taps, Workspace, circulant_taps, dense_circulant,
                      device_constants, overlap_mask, quadratic, rolled_taps, same_tensor,
                      value_range)


def interpolation_matrix(n: int, positions: torch.Tensor) -> torch.Tensor:
    """Circular linear interpolation weights (..., N, n) of a length-n signal at ``positions``.

    >>> interpolation_matrix(2, torch.tensor([0.0, 0.5], dtype=torch.float64))
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]], dtype=torch.float64)
    """
    low = torch.floor(positions)
    frac = positions - low
    low = low.long() % n
    weights = torch.zeros(*positions.shape, n, dtype=torch.float64)
    weights.scatter_add_(-1, low[..., None], (1 - frac)[..., None])
    weights.scatter_add_(-1, ((low + 1) % n)[..., None], frac[..., None])
    return weights


def _zeros(n_shifts: int, n_images: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_shifts, n_images, dtype=torch.float64, device=device)


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
    return (x * cols.apply(rows.apply(y, -2), -1)).sum(dim=(2, 3, 4)).to(torch.float64)


@dataclass
class _AxisTaps:
    """Circular mode: the matrices of one axis as circulant stencils (``shiftlab.equivariance.stencil``)."""

    plain: Taps  # UᵀU: |U b|² = <b, P b>
    aligned: list[Taps]  # per shift, AᵀA: |T_δ U a|² (UᵀU again unless δ is fractional)
    cross: list[Taps]  # per shift, T_q (AᵀB)ᵀ: <T_δ U a, U b> = <stencil(a), b>
    phase: list[Taps]  # per shift, (AᵀB)ᵀ without the roll: shared by the shifts of one phase
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
    found: dict[bytes, Optional[Taps]] = {}

    def taps_of(matrix: torch.Tensor) -> Optional[Taps]:  # shifts often share a matrix
        key = matrix.numpy().tobytes()
        if key not in found:
            found[key] = circulant_taps(matrix)
        return found[key]

    plain_taps = taps_of(plain)
    aligned_taps = [taps_of(matrix) for matrix in aligned]
    # the reference is filtered by (AᵀB)ᵀ and rolled by q: <T_q Pᵀ a, b> = <T_q a, P b>
    phase_taps = [taps_of(matrix.T.contiguous()) for matrix in cross]
    if plain_taps is None or any(t is None for t in aligned_taps + phase_taps):
        return None
    n = plain.shape[-1]
    cross_taps = [rolled_taps(taps, int(q), n) for taps, q in zip(phase_taps, quotient)]
    return _AxisTaps(plain_taps, aligned_taps, cross_taps, phase_taps, n)


def bilinear_axis(n: int, stride: float, shifts: torch.Tensor, crop: bool, border: int) -> _Axis:
    length = max(1, int(round(n * stride)))
    quotient = torch.floor(shifts / stride + 1e-9)
    residue = shifts - quotient * stride
    k = torch.arange(length, dtype=torch.float64)
    plain = interpolation_matrix(n, k / stride)  # (N, n): U
    shifted = interpolation_matrix(n, (k[None, :] - residue[:, None]) / stride)  # (S, N, n): T_r U
    if crop:
        # positions whose interpolation uses real samples only, shrunk by the border, for both
        # the shifted map (k) and the reference (k - δ)
        top = (n - 1) * stride - border
        inside = lambda p: (p >= border - 1e-9) & (p <= top + 1e-9)  # noqa: E731
        mask = (inside(k)[None, :] & inside(k[None, :] - shifts[:, None])).double()
        peak_mask = overlap_mask(n, shifts / stride, math.ceil(border / stride))
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
    """Bilinear alignment of one layer for a chunk of shifts (made by ``align.make_plan``).

    Circular mode reads the shifted maps through ``differences`` (the compiled kernel or the
    eager passes, :mod:`shiftlab.equivariance.kernels.differences`), chosen when the plan is built.
    """

    rows: _Axis
    cols: _Axis
    need_peak: bool
    differences: Differences = field(default_factory=choose, repr=False, compare=False)

    def __post_init__(self) -> None:
        exact = (self.rows.zero_residue & self.cols.zero_residue)
        self.exact = exact.nonzero().squeeze(1)  # CPU, once: s divides δ
        self.inexact = (~exact).nonzero().squeeze(1)
        self.exact_flags = exact.tolist()
        self.offsets = list(zip(self.rows.quotient.tolist(), self.cols.quotient.tolist()))
        self.circulant = self.rows.taps is not None and self.cols.taps is not None
        self._constants: dict = {}
        self.prepared: dict = {}  # per map size, what ``differences`` prepared for this plan
        # inexact shifts by the cross filter of one axis without its roll, that axis being the
        # one with fewer distinct filters: (axis, [(taps, shifts)])
        self.cross_groups: tuple[int, list[tuple[Taps, list[int]]]] = (-2, [])
        if self.circulant:
            by_axis = {}
            for axis, taps in ((-2, self.rows.taps), (-1, self.cols.taps)):
                groups: dict[Taps, list[int]] = {}
                for s in self.inexact.tolist():
                    groups.setdefault(taps.phase[s], []).append(s)
                by_axis[axis] = list(groups.items())
            self.cross_groups = min(by_axis.items(), key=lambda item: len(item[1]))

    def _small_map_constants(self, ref: torch.Tensor) -> dict:
        """Small maps: every inexact shift's cross stencil as one dense (hw × hw) matrix."""
        if ref.shape[-2] * ref.shape[-1] > SMALL_MAP:
            return {}
        rows = self.rows.taps.cross_matrices()[self.inexact].to(ref.dtype)
        cols = self.cols.taps.cross_matrices()[self.inexact].to(ref.dtype)
        return {"inexact": self.inexact, "cross_rows": rows, "cross_cols": cols}

    def _compare_circulant(self, ref: torch.Tensor, shifted: torch.Tensor, cache: dict,
                           workspace: Workspace) -> ComparisonStats:
        """Circular mode: every matrix is a stencil of a few taps per axis (see the module)."""
        n_shifts, n_images = shifted.shape[:2]
        rows, cols = self.rows.taps, self.cols.taps
        device = ref.device
        const = device_constants(self._constants, ref, lambda: {
            "count": self.rows.valid_count * self.cols.valid_count,
            "exact": torch.tensor(self.exact_flags, dtype=torch.bool),
            **self._small_map_constants(ref)})
        count = (const["count"] * float(ref.shape[1]))[:, None].expand(n_shifts, n_images)
        valid = torch.ones(n_shifts, dtype=torch.bool, device=device)
        plain = (rows.plain, cols.plain)
        if "bilinear" not in cache:  # per image batch: <a, UᵀU a> and the peak
            cache["bilinear"] = {plain: self.differences.bilinear_norm(self, ref, workspace)}
            if self.need_peak:
                cache["bilinear_peak"] = value_range(ref[None], None)[0]
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
                and same_tensor(shifted[0], ref):
            # the reference against itself (the zero shift): nothing to compute, except that
            # a - a is NaN where a holds Inf or NaN (counted as n_nan, not as 0)
            zero = _zeros(1, n_images, device)
            diff = torch.where(torch.isfinite(ref_sq), zero, torch.full_like(zero, math.nan))
            return ComparisonStats(ref_sq, ref_sq, diff, count, peak, valid)
        shifted_sq, exact_diff, cross = self.differences.bilinear_sums(self, ref, shifted, const,
                                                                       workspace)
        diff_sq = torch.where(const["exact"][:, None], exact_diff, ref_sq + shifted_sq - 2 * cross)
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
            peak = value_range(aligned, mask)
        valid = count[:, 0] > 0
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)
