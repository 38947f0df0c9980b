"""Align a layer's output with an input shift and reduce the pair to ``ComparisonStats``.

For a spatial layer of stride s an input shift δ is a feature shift δ/s (SPEC.md):

- ``exact``: roll the reference by δ/s where s divides δ; NaN elsewhere.
- ``fourier``: band-limited fractional shift of the reference (FFT phase ramp) by δ/s.
- ``bilinear`` (the paper's figure; default): compare T_δ U a with U b at input resolution, U
  being circular linear upsampling by s. The upsampled maps are never built: every term is a
  quadratic form x^T (P_h ⊗ P_w) y with small banded n×n matrices (P = A^T D B, A and B the 1-D
  interpolation operators, D the valid-position mask), applied with a few rolls at feature
  resolution. Tests check it against explicit upsampling.

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
from .shifts import fourier_shift_many, roll_many

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


@dataclass
class RollPlan:
    """Exact or Fourier alignment at feature resolution, with an optional crop-mode mask."""

    feature_shifts: torch.Tensor  # (S, 2) float64, δ / s
    valid: torch.Tensor  # (S,) bool
    fourier: bool
    mask: Optional[torch.Tensor]  # (S, 1, 1, h, w) float32, crop mode only
    need_peak: bool

    def compare(self, ref: torch.Tensor, shifted: torch.Tensor,
                cache: Optional[dict] = None) -> ComparisonStats:
        device = ref.device
        shifts = self.feature_shifts
        n_shifts, n_images = shifted.shape[:2]
        mask = self.mask.to(device) if self.mask is not None else None
        whole = shifts.round()
        fractional = ((shifts - whole).abs() > 1e-6).any(1) & self.fourier
        # Shifts that need the same aligned reference are done together: deep layers
        # (stride >= grid size) need a single one, and no per-shift copy of the reference.
        keys = torch.where(fractional[:, None], shifts, whole)
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        diff_sq = torch.empty(n_shifts, n_images, dtype=torch.float64, device=device)
        ref_sq = torch.empty_like(diff_sq)
        peak = torch.empty_like(diff_sq) if self.need_peak else None
        plain_ref_sq = _sum_sq(ref[None]) if mask is None else None
        for group, key in enumerate(unique):
            idx = (inverse == group).nonzero().squeeze(1)
            if bool(fractional[idx[0]]):
                aligned = fourier_shift_many(ref, key[None].to(device))[0]
            else:
                offset = [int(v) for v in key.tolist()]
                aligned = torch.roll(ref, offset, dims=(-2, -1)) if any(offset) else ref
            part = shifted if len(idx) == n_shifts else shifted[idx.to(device)]
            where = idx.to(device)
            if mask is None:
                diff_sq[where] = _sum_sq(part - aligned)
                ref_sq[where] = plain_ref_sq if not bool(fractional[idx[0]]) else _sum_sq(aligned[None])
            else:
                part_mask = mask[where]
                diff_sq[where] = _sum_sq((part - aligned) * part_mask)
                ref_sq[where] = _sum_sq(aligned * part_mask)
            if peak is not None:
                peak[where] = _peak(aligned.expand(len(idx), *aligned.shape),
                                    mask[where] if mask is not None else None)
        shifted_sq = _sum_sq(shifted if mask is None else shifted * mask)
        channels = ref.shape[1]
        if mask is None:
            count = torch.full_like(diff_sq, float(channels * ref.shape[-2] * ref.shape[-1]))
        else:
            count = (mask.sum(dim=(1, 2, 3, 4)).double() * channels)[:, None].expand_as(diff_sq)
        valid = self.valid.to(device) & (count[:, 0] > 0)
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)


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
        weights = self.weights.to(x.device)
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


def _circular_filter(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ colsᵀ over the last two dims of x (..., h, w): two BLAS calls.

    The matrices are small (n ≤ a few hundred) and circulant-banded; a dense matmul beats
    both rolls and a tiny conv here (measured in benchmarks/).
    """
    height, width = x.shape[-2:]
    if height * width <= 64:
        # small maps (deep layers): one GEMM with the (hw x hw) Kronecker product beats
        # thousands of tiny batched matmuls
        kron = torch.kron(rows, cols)
        return (x.reshape(-1, height * width) @ kron.T).view_as(x)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(-1, -2))


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row inner product of (B, ...) tensors -> (B,) float64, as one BLAS call."""
    n = x.shape[0]
    return torch.bmm(x.reshape(n, 1, -1), y.reshape(n, -1, 1)).view(n).double()


@dataclass
class _Axis:
    """One axis of the bilinear comparison for a chunk of shifts."""

    quotient: torch.Tensor  # (S,) long: whole feature pixels, pre-applied by a roll
    aligned: Band  # A^T D A
    cross: Band  # A^T D B
    plain: Band  # B^T D B
    residue: torch.Tensor  # (S,) float64: δ - s * quotient, in input pixels
    plain_dense: torch.Tensor  # (S, n, n) float32: B^T D B as a dense matrix
    cross_dense: torch.Tensor  # (S, n, n) float32: A^T D B as a dense matrix
    zero_residue: torch.Tensor  # (S,) bool: s divides δ, so A == B
    valid_count: torch.Tensor  # (S,) float64: Σ D, compared positions at input resolution
    peak_mask: Optional[torch.Tensor]  # (S, n) bool, crop mode only


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
    return _Axis(
        quotient=quotient.long(),
        aligned=Band.from_dense(shifted.transpose(1, 2) @ (shifted * mask[:, :, None])),
        cross=Band.from_dense(cross),
        plain=Band.from_dense(plain_form),
        plain_dense=plain_form.float(),
        cross_dense=cross.float(),
        residue=residue,
        zero_residue=residue.abs() < 1e-9,
        valid_count=mask.sum(1),
        peak_mask=peak_mask,
    )


@dataclass
class BilinearPlan:
    rows: _Axis
    cols: _Axis
    need_peak: bool
    circulant: bool = False  # circular mode: every P is circulant (a small 2-D filter)

    def _compare_circulant(self, ref: torch.Tensor, shifted: torch.Tensor,
                           cache: dict) -> ComparisonStats:
        """Circular mode: filters move onto the reference, cached per image batch and residue,
        so each shift costs one roll and one dot product, as exact alignment does."""
        n_shifts, n_images = shifted.shape[:2]
        rows, cols = self.rows, self.cols
        device = ref.device
        if "plain" not in cache:  # UᵀU: the same for every shift in circular mode
            cache["plain"] = (rows.plain_dense[0].to(device), cols.plain_dense[0].to(device))
        plain = cache["plain"]
        if "ref_sq" not in cache:  # (T_r U)ᵀ(T_r U) = UᵀU: |T_δ U a|² does not depend on δ
            cache["ref_sq"] = _dot(ref, _circular_filter(ref, *plain))
        ref_sq = cache["ref_sq"][None].expand(n_shifts, n_images).clone()
        shifted_sq = _dot(shifted.flatten(0, 1), _circular_filter(shifted, *plain).flatten(0, 1))
        shifted_sq = shifted_sq.view(n_shifts, n_images)
        diff_sq = torch.empty_like(ref_sq)
        filtered: dict = {}  # Pᵀ a per residue, for this call only: caching them across
        # chunks would hold one reference copy per residue for every layer at once
        for s in range(n_shifts):
            offset = (int(rows.quotient[s]), int(cols.quotient[s]))
            if bool(rows.zero_residue[s] & cols.zero_residue[s]):
                # s divides δ: |U(a' - b)|² directly, free of the cancellation in the expansion
                diff = shifted[s] - torch.roll(ref, offset, dims=(-2, -1))
                diff_sq[s] = _dot(diff, _circular_filter(diff, *plain))
                continue
            key = (float(rows.residue[s]), float(cols.residue[s]))
            if key not in filtered:  # Pᵀ a for this residue: <T_q a, P b> = <T_q Pᵀ a, b>
                cross_rows = rows.cross_dense[s].to(device).T
                cross_cols = cols.cross_dense[s].to(device).T
                filtered[key] = _circular_filter(ref, cross_rows, cross_cols)
            cross = _dot(torch.roll(filtered[key], offset, dims=(-2, -1)), shifted[s])
            diff_sq[s] = ref_sq[s] + shifted_sq[s] - 2 * cross
        count = torch.full_like(diff_sq, float(ref.shape[1]) * float(rows.valid_count[0] * cols.valid_count[0]))
        peak = _peak(ref[None], None).expand(n_shifts, n_images) if self.need_peak else None
        valid = torch.ones(n_shifts, dtype=torch.bool, device=ref.device)
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)

    def compare(self, ref: torch.Tensor, shifted: torch.Tensor,
                cache: Optional[dict] = None) -> ComparisonStats:
        if self.circulant:
            return self._compare_circulant(ref, shifted, {} if cache is None else cache)
        device = ref.device
        quotient = torch.stack([self.rows.quotient, self.cols.quotient], 1)
        aligned = roll_many(ref, quotient)  # (S, B, C, h, w)
        rows, cols = self.rows, self.cols
        form = _form
        ref_sq = form(aligned, rows.aligned, cols.aligned, aligned)
        shifted_sq = form(shifted, rows.plain, cols.plain, shifted)
        diff_sq = torch.empty_like(ref_sq)
        exact = (rows.zero_residue & cols.zero_residue).to(device)
        if bool(exact.any()):
            # s divides δ: |U(a' - b)|² directly, free of the cancellation in the expansion
            idx = exact.nonzero().squeeze(1)
            diff = aligned[idx] - shifted[idx]
            diff_sq[idx] = form(diff, rows.plain.subset(idx.cpu()), cols.plain.subset(idx.cpu()), diff)
        if not bool(exact.all()):
            idx = (~exact).nonzero().squeeze(1)
            cross = form(aligned[idx], rows.cross.subset(idx.cpu()), cols.cross.subset(idx.cpu()),
                         shifted[idx])
            diff_sq[idx] = ref_sq[idx] + shifted_sq[idx] - 2 * cross
        channels = ref.shape[1]
        count = (rows.valid_count * cols.valid_count * channels).to(device)[:, None].expand_as(ref_sq)
        peak = None
        if self.need_peak:
            mask = None
            if rows.peak_mask is not None:
                mask = (rows.peak_mask[:, :, None] & cols.peak_mask[:, None, :]).float()
                mask = mask[:, None, None].to(device)
            peak = _peak(aligned, mask)
        valid = count[:, 0] > 0
        return ComparisonStats(ref_sq, shifted_sq, diff_sq, count, peak, valid)


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
                need_peak=need_peak, circulant=not crop)
    fourier = align == "fourier" and not bool(integer.all())
    valid = integer.all(1) if align == "exact" else torch.ones(len(shifts), dtype=torch.bool)
    mask = None
    if crop:
        rows = _overlap_mask(height, feature[:, 0], math.ceil(border / float(stride[0])))
        cols = _overlap_mask(width, feature[:, 1], math.ceil(border / float(stride[1])))
        mask = (rows[:, :, None] & cols[:, None, :]).float()[:, None, None]
    return RollPlan(feature, valid, fourier, mask, need_peak)
