"""The eager PyTorch passes behind :class:`~shiftlab.equivariance.kernels.differences.Differences`:
any device and dtype. This is what the compiled kernel computes in one read of each map
(``csrc/bilinear.c``); here each step is one or a few memory-bound tensor operations, walked in
cache-sized blocks (:func:`~shiftlab.equivariance.stencil.blocks`) so that every pass after the first
over a block reads the cache.

Moved here unchanged from the plans (the same operations in the same order: the same numbers).
A bilinear plan is read for its chunk's constants only: ``rows.taps`` / ``cols.taps`` (the
stencils of each axis), ``exact_flags``, ``offsets``, ``inexact`` and ``cross_groups``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..stencil import (IDENTITY, SMALL_MAP, Taps, Workspace, blocks, dot, quadratic, rolled_into,
                       runs, stencil2, sub_rolled, sum_sq)

if TYPE_CHECKING:
    from ..bilinear import BilinearPlan

RollGroups = list[tuple[tuple[int, int], list[int]]]
"""Shifts that share an aligned source: [(roll q, shift indices), ...]."""
RollPass = Callable[[torch.Tensor, RollGroups, torch.Tensor, torch.Tensor], None]
"""(source, groups, shifted_sq, diff_sq) -> None: the sums of some shifts, written in place."""


def _zeros(n_shifts: int, n_images: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(n_shifts, n_images, dtype=torch.float64, device=device)


def _cross_small(plan: BilinearPlan, ref: torch.Tensor, shifted: torch.Tensor,
                 const: dict) -> torch.Tensor:
    """Maps of at most SMALL_MAP positions: every inexact shift's filter as one dense
    (hw × hw) matrix and one matrix product, which beats many tiny steps -> (R, B)."""
    n_images = ref.shape[0]
    part = shifted if len(plan.inexact) == len(shifted) else shifted[const["inexact"]]
    rows_dense, cols_dense = const["cross_rows"], const["cross_cols"]  # (R, h, h), (R, w, w)
    size = rows_dense.shape[-1] * cols_dense.shape[-1]
    # (R, hw, hw) built per call: kept per plan, it would grow with the number of shifts
    filters = torch.einsum("sik,sjl->sijkl", rows_dense, cols_dense).reshape(-1, size, size)
    filtered = ref.reshape(-1, size) @ filters.transpose(1, 2).permute(1, 0, 2).reshape(size, -1)
    filtered = filtered.view(n_images, -1, len(filters), size).permute(2, 0, 1, 3)
    return (filtered * part.reshape(filtered.shape)).sum((2, 3)).double()


def _cross(plan: BilinearPlan, ref: torch.Tensor, shifted: torch.Tensor, cross: torch.Tensor,
           workspace: Workspace) -> None:
    """cross[s] = <T_δ U a, U b_s> for the inexact shifts. The cross filter is separable
    (R ⊗ C): the reference is filtered along one axis once per distinct filter of the chunk
    (the axis with fewer of them), then along the other once per phase (the roll folded into
    the taps when a phase has one shift), then per shift and cache-sized block of images a
    slice-wise roll into scratch and one inner product. Filtering along both axes per phase
    would repeat the first axis's passes for every phase."""
    map_bytes = ref[0].numel() * ref.element_size()
    axis, groups = plan.cross_groups
    other = plan.cols.taps if axis == -2 else plan.rows.taps
    pair = (lambda first, second: (first, second)) if axis == -2 else (  # noqa: E731
        lambda first, second: (second, first))
    for taps, members in groups:
        half = stencil2(workspace.take("phase", ref.shape, ref), ref, pair(taps, IDENTITY),
                        workspace)
        phases: dict[Taps, list[int]] = {}
        for s in members:
            phases.setdefault(other.phase[s], []).append(s)
        for phase, shifts in phases.items():
            single = len(shifts) == 1  # fold the other axis's roll into its taps
            filtered = stencil2(workspace.take("phase_other", ref.shape, ref), half,
                                pair(IDENTITY, other.cross[shifts[0]] if single else phase),
                                workspace)
            for s in shifts:
                offset = plan.offsets[s]
                if single:
                    offset = (offset[0], 0) if axis == -2 else (0, offset[1])
                for _, images in blocks(1, ref.shape[0], map_bytes):
                    source = filtered[images]
                    if offset != (0, 0):
                        source = rolled_into(workspace.take("rolled", source.shape, source),
                                             source, offset)
                    cross[s, images] = dot(source, shifted[s, images])


class Eager:
    """The eager PyTorch passes: any device and dtype (see the module)."""

    name = "eager"

    def bilinear_norm(self, plan: BilinearPlan, ref: torch.Tensor,
                      workspace: Workspace) -> torch.Tensor:
        """<a, UᵀU a> per image (B,) float64."""
        return quadratic(ref, (plan.rows.taps.plain, plan.cols.taps.plain), workspace)

    def bilinear_sums(self, plan: BilinearPlan, ref: torch.Tensor, shifted: torch.Tensor,
                      const: dict, workspace: Workspace
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """|U b|², |U(a' - b)|² (exact shifts, else 0) and the cross terms <T_δ U a, U b>
        (inexact shifts, else 0) -> three (S, B) float64."""
        n_shifts, n_images = shifted.shape[:2]
        device = ref.device
        channels, height, width = ref.shape[1:]
        map_bytes = ref[0].numel() * ref.element_size()
        plain = (plan.rows.taps.plain, plan.cols.taps.plain)
        shifted_sq, cross = _zeros(n_shifts, n_images, device), _zeros(n_shifts, n_images, device)
        exact_diff = _zeros(n_shifts, n_images, device)
        for shift_range, images in blocks(n_shifts, n_images, map_bytes):
            part = shifted[shift_range, images]
            shifted_sq[shift_range, images] = quadratic(
                part.reshape(-1, channels, height, width), plain, workspace).view(part.shape[:2])
            for s in range(shift_range.start, shift_range.stop):
                if plan.exact_flags[s]:  # s divides δ: |U(a' - b)|² from the difference
                    maps = shifted[s, images]
                    diff = sub_rolled(workspace.take("diff", maps.shape, maps), maps, ref[images],
                                      plan.offsets[s])
                    exact_diff[s, images] = quadratic(diff, plain, workspace)
        if len(plan.inexact):
            if height * width <= SMALL_MAP:
                cross[const["inexact"]] = _cross_small(plan, ref, shifted, const)
            else:
                _cross(plan, ref, shifted, cross, workspace)
        return shifted_sq, exact_diff, cross

    def roll_pass(self, ref: torch.Tensor, shifted: torch.Tensor,
                  workspace: Workspace) -> RollPass:
        """The exact and Fourier sums of this comparison (see ``Differences.roll_pass``): per
        shift and cache-sized block of images, Σ (b - roll(source, q))² and Σ b²."""
        map_bytes = ref[0].numel() * ref.element_size()
        n_images = shifted.shape[1]

        def sums(source: torch.Tensor, groups: RollGroups, shifted_sq: torch.Tensor,
                 diff_sq: torch.Tensor) -> None:
            for offset, indices in groups:
                for start, stop in runs(indices, len(indices)):
                    # cache-sized blocks: the second pass reads the cache
                    for shift_range, images in blocks(stop - start, n_images, map_bytes):
                        run = slice(start + shift_range.start, start + shift_range.stop)
                        part = shifted[run, images]
                        diff = sub_rolled(workspace.take("diff", part.shape, part), part,
                                          source[images], offset)
                        diff_sq[run, images] = sum_sq(diff)
                        shifted_sq[run, images] = sum_sq(part)

        return sums
