"""Shift grids and the shift operators T_δ (circular, crop, fractional).

A shift δ = (dh, dw) moves content down by dh rows and right by dw columns (docs/semantics.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import UsageError

MODES = ("circular", "crop")
#: the most shifts one grid may hold (checked before any list is built): 128 x 128, or a 32 x 32
#: grid at quarter-pixel steps; the paper's per-layer figure uses 32 x 32 = 1,024
MAX_SHIFTS = 16384


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


@dataclass(frozen=True)
class ShiftGrid:
    """An ordered set of input shifts (dh, dw) in pixels, possibly fractional.

    Build one with a constructor:

    >>> ShiftGrid.square(4).shifts[:3]
    ((0.0, 0.0), (0.0, 1.0), (0.0, 2.0))
    >>> len(ShiftGrid.symmetric(2))          # -2..2 x -2..2
    25
    >>> ShiftGrid.diagonal(3).shifts
    ((0.0, 0.0), (1.0, 1.0), (2.0, 2.0))
    """

    shifts: tuple[tuple[float, float], ...]
    kind: str = "explicit"

    def __post_init__(self) -> None:
        if not self.shifts:
            raise UsageError("a shift grid needs at least one shift")
        for shift in self.shifts:
            if len(shift) != 2 or not all(math.isfinite(v) for v in shift):
                raise UsageError(f"a shift must be two finite numbers (dh, dw), got {shift!r}")
        if len(set(self.shifts)) != len(self.shifts):
            raise UsageError("a shift grid must not repeat a shift")

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def square(cls, k: int, subpixel: int = 1) -> "ShiftGrid":
        """All (dh, dw) in {0, 1/p, ..., k - 1/p}², p = ``subpixel`` (the paper's figure: k=32)."""
        _check_count(_count(k, subpixel) ** 2, f"a square grid of {k} x {k} at 1/{subpixel} px")
        values = _steps(0, k, subpixel, "square")
        return cls(tuple((dh, dw) for dh in values for dw in values), "square")

    @classmethod
    def symmetric(cls, k: int, subpixel: int = 1) -> "ShiftGrid":
        """All (dh, dw) in [-k, k]² in steps of 1/``subpixel`` (the crop-mode grid)."""
        if k < 0:
            raise UsageError(f"symmetric grid needs k >= 0, got {k}")
        _check_count(_count(2 * k + 1, subpixel) ** 2, f"a symmetric grid of -{k}..{k} at 1/{subpixel} px")
        values = _steps(-k, k + 1.0 / subpixel, subpixel, "symmetric")
        return cls(tuple((dh, dw) for dh in values for dw in values), "symmetric")

    @classmethod
    def diagonal(cls, n: int, start: int = 0, subpixel: int = 1) -> "ShiftGrid":
        """The sweep (t, t) for t = start, start + 1/p, ... (n values)."""
        if n < 1:
            raise UsageError(f"diagonal grid needs n >= 1, got {n}")
        _check_subpixel(subpixel)
        _check_count(int(n), f"a diagonal sweep of {n} steps")
        values = [start + i / subpixel for i in range(n)]
        return cls(tuple((float(t), float(t)) for t in values), "diagonal")

    @classmethod
    def explicit(cls, shifts: Iterable[Sequence[float]]) -> "ShiftGrid":
        """Any list of (dh, dw) pairs, kept in the given order."""
        pairs = []
        for shift in shifts:
            try:
                dh, dw = shift
                pairs.append((float(dh), float(dw)))
            except (TypeError, ValueError):
                raise UsageError(f"a shift must be two numbers (dh, dw), got {shift!r}") from None
        return cls(tuple(pairs), "explicit")

    # -- layout of the per-layer maps --------------------------------------------------
    def __len__(self) -> int:
        return len(self.shifts)

    @property
    def dh_values(self) -> tuple[float, ...]:
        """Sorted distinct dh: the rows of a map."""
        return tuple(sorted({dh for dh, _ in self.shifts}))

    @property
    def dw_values(self) -> tuple[float, ...]:
        """Sorted distinct dw: the columns of a map."""
        return tuple(sorted({dw for _, dw in self.shifts}))

    @property
    def map_shape(self) -> tuple[int, int]:
        return len(self.dh_values), len(self.dw_values)

    def map_index(self) -> tuple[list[int], list[int]]:
        """Row and column of each shift in a (len(dh_values), len(dw_values)) map."""
        rows = {v: i for i, v in enumerate(self.dh_values)}
        cols = {v: i for i, v in enumerate(self.dw_values)}
        return [rows[dh] for dh, _ in self.shifts], [cols[dw] for _, dw in self.shifts]

    @property
    def is_integer(self) -> bool:
        return all(_is_integer(dh) and _is_integer(dw) for dh, dw in self.shifts)

    @property
    def max_abs(self) -> float:
        return max(max(abs(dh), abs(dw)) for dh, dw in self.shifts)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shifts": [list(s) for s in self.shifts]}

    @classmethod
    def from_dict(cls, data: dict) -> "ShiftGrid":
        return cls(tuple((float(a), float(b)) for a, b in data["shifts"]), data.get("kind", "explicit"))

    def __repr__(self) -> str:
        return f"ShiftGrid({self.kind}, {len(self)} shifts, |δ| <= {self.max_abs:g})"


def _check_subpixel(subpixel: int) -> None:
    if int(subpixel) != subpixel or subpixel < 1:
        raise UsageError(f"subpixel must be a positive integer, got {subpixel}")


def _count(extent: int, subpixel: int) -> int:
    _check_subpixel(subpixel)
    return max(0, int(extent)) * int(subpixel)


def _check_count(count: int, what: str) -> None:
    """Refuse a grid before its list of shifts is built (a typo like -k 3000 would take GBs)."""
    if count > MAX_SHIFTS:
        raise UsageError(f"{what} has {count:,} shifts, more than the limit of {MAX_SHIFTS:,};"
                         " use a smaller --max-shift or --subpixel")


def _steps(start: float, stop: float, subpixel: int, name: str) -> list[float]:
    _check_subpixel(subpixel)
    count = int(round((stop - start) * subpixel))
    if count < 1:
        raise UsageError(f"{name} grid needs at least one shift (got size {stop - start:g})")
    return [start + i / subpixel for i in range(count)]


# -- shift operators -------------------------------------------------------------------
def roll_many(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Circular integer shifts of ``x`` (B, C, H, W) by each row of ``shifts`` (S, 2) of ints.

    Returns (S, B, C, H, W). One gather instead of S calls to ``torch.roll``.
    """
    height, width = x.shape[-2:]
    # asynchronous: a host-to-GPU copy of the shifts must not wait for the GPU's queue
    shifts = shifts.to(device=x.device, dtype=torch.long, non_blocking=True)
    rows = (torch.arange(height, device=x.device)[None, :] - shifts[:, :1]) % height  # (S, H)
    cols = (torch.arange(width, device=x.device)[None, :] - shifts[:, 1:]) % width  # (S, W)
    # x[:, :, rows[s]][:, :, :, cols[s]] for every s at once
    out = x[:, :, rows[:, :, None], cols[:, None, :]]  # (B, C, S, H, W)
    return out.permute(2, 0, 1, 3, 4)


def phase_ramp(shifts: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Half-spectrum phase ramps (S, H, W//2 + 1) complex128 for real (S, 2) shifts.

    ``irfft2(rfft2(x) * ramp)`` is the band-limited circular shift of a real map x (H, W): the
    real part of the full-spectrum shift ``ifft2(fft2(x) * exp(-2πi(f·δ)))``. At even sizes the
    Nyquist bins of that ramp are not Hermitian for a fractional δ; taking the real part averages
    each with its mirror, which is what the cos(πδ) factors below do on the half spectrum.
    """
    shifts = shifts.to(torch.float64).cpu()
    freq_h = torch.fft.fftfreq(height, dtype=torch.float64)
    freq_w = torch.fft.rfftfreq(width, dtype=torch.float64)
    phase_h = -2 * math.pi * shifts[:, :1] * freq_h[None, :]  # (S, H)
    phase_w = -2 * math.pi * shifts[:, 1:] * freq_w[None, :]  # (S, W//2 + 1)
    ramp_h = torch.polar(torch.ones_like(phase_h), phase_h)
    ramp_w = torch.polar(torch.ones_like(phase_w), phase_w)
    if height % 2 == 0:
        ramp_h[:, height // 2] = torch.cos(math.pi * shifts[:, 0])
    if width % 2 == 0:
        ramp_w[:, width // 2] = torch.cos(math.pi * shifts[:, 1])
    ramp = ramp_h[:, :, None] * ramp_w[:, None, :]
    if height % 2 == 0 and width % 2 == 0:  # the corner bin is its own mirror
        ramp[:, height // 2, width // 2] = torch.cos(math.pi * (shifts[:, 0] + shifts[:, 1]))
    return ramp


def fourier_shift_many(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Band-limited circular shifts (FFT phase ramp) of ``x`` (B, C, H, W) by real (S, 2) shifts.

    Returns (S, B, C, H, W). An integer shift equals ``torch.roll`` up to rounding.
    """
    height, width = x.shape[-2:]
    real = torch.float64 if x.dtype == torch.float64 else torch.float32
    spectrum = torch.fft.rfft2(x.to(real))
    ramp = phase_ramp(shifts, height, width).to(device=x.device, dtype=spectrum.dtype,
                                                 non_blocking=True)
    out = torch.fft.irfft2(spectrum[None] * ramp[:, None, None], s=(height, width))
    return out.to(x.dtype)


def circular_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """T_δ for circular mode: integer rolls where possible, phase ramps otherwise. (S, B, C, H, W)."""
    shifts = torch.as_tensor(shifts, dtype=torch.float64)
    if bool(torch.all(shifts == shifts.round())):
        return roll_many(x, shifts.round().long())
    return fourier_shift_many(x, shifts)


def crop_shift(canvas: torch.Tensor, shifts: torch.Tensor, margin: int) -> torch.Tensor:
    """T_δ for crop mode: the window of ``canvas`` (B, C, H+2m, W+2m) whose content is shifted by δ.

    Returns (S, B, C, H, W); the unshifted window is the centre one. Fractional parts of δ are
    applied with a phase ramp on the canvas first (its wrap-around stays outside the window
    as long as |δ| < m).
    """
    shifts = torch.as_tensor(shifts, dtype=torch.float64)
    if float(shifts.abs().max()) > margin + 1e-9:
        raise UsageError(
            f"crop-mode shift {float(shifts.abs().max()):g} px exceeds the crop margin {margin} px;"
            " use a smaller grid or a larger margin")
    height = canvas.shape[-2] - 2 * margin
    width = canvas.shape[-1] - 2 * margin
    whole = torch.floor(shifts)
    frac = shifts - whole
    windows = []
    for index, (dh, dw) in enumerate(whole.long().tolist()):
        source = canvas
        if bool(frac[index].any()):
            source = fourier_shift_many(canvas, frac[index:index + 1])[0]
        top, left = margin - dh, margin - dw
        windows.append(source[..., top:top + height, left:left + width])
    return torch.stack(windows)


def apply_shifts(images: torch.Tensor, shifts: torch.Tensor, mode: str, margin: int = 0) -> torch.Tensor:
    """Shifted copies of ``images`` for each shift: (S, B, C, H, W).

    ``images`` is (B, C, H, W) in circular mode and the canvas (B, C, H+2m, W+2m) in crop mode.
    """
    if mode == "circular":
        return circular_shift(images, shifts)
    if mode == "crop":
        return crop_shift(images, shifts, margin)
    raise UsageError(f"unknown shift mode {mode!r}; choose one of {', '.join(MODES)}")


def centre_window(canvas: torch.Tensor, margin: int) -> torch.Tensor:
    """The unshifted window (B, C, H, W) of a crop-mode canvas."""
    if margin == 0:
        return canvas
    return canvas[..., margin:-margin, margin:-margin]
