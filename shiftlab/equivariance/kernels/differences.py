"""The one seam between the alignment plans and the passes that read the shifted maps.

A plan (:class:`~shiftlab.equivariance.bilinear.BilinearPlan`, :class:`~shiftlab.equivariance.align.RollPlan`)
asks for its sums through a :class:`Differences` backend, chosen once, when the plan is built
(:func:`choose`, from ``SHIFTLAB_NATIVE``):

- :class:`~shiftlab.equivariance.kernels.eager.Eager`: the eager PyTorch passes, any device and dtype;
- :class:`Native`: the compiled CPU kernel (:mod:`~shiftlab.equivariance.kernels.native`). It hands the
  maps it cannot read (a GPU, float64, planes that are not contiguous) and small exact/Fourier
  planes to the eager passes, and if the kernel cannot be built it warns once and does the same
  (``SHIFTLAB_NATIVE=auto``) or raises (``=1``). The library is built at the first comparison it
  takes, never for a run on a GPU.

Both compute the same quantities (to float rounding: tests/test_native.py), so a plan holds one
code path and never asks which backend it has.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol

import torch

from ... import config
from ..stencil import Workspace, quadratic_lags
from . import native
from .eager import Eager, RollGroups, RollPass

if TYPE_CHECKING:
    from ..bilinear import BilinearPlan

KERNEL_PLANE = 256
"""Exact and Fourier alignments: maps of at least this many positions use the compiled kernel
(:func:`~shiftlab.equivariance.kernels.native.difference_sums`, one call per fraction group); smaller
ones the eager steps, for which one call costs more than it saves."""


class Differences(Protocol):
    """What the alignment plans ask of a backend (shapes: ref (B, C, h, w), shifted
    (S, B, C, h, w); sums float64)."""

    name: str

    def bilinear_norm(self, plan: BilinearPlan, ref: torch.Tensor,
                      workspace: Workspace) -> torch.Tensor:
        """<a, UᵀU a> per image (B,): the reference's upsampled norm."""

    def bilinear_sums(self, plan: BilinearPlan, ref: torch.Tensor, shifted: torch.Tensor,
                      const: dict, workspace: Workspace
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """|U b|², |U(roll(a, q) - b)|² (exact shifts, else 0) and the cross terms
        <T_δ U a, U b> (inexact shifts, else 0), each (S, B); ``const``: the plan's constants
        on the maps' device."""

    def roll_pass(self, ref: torch.Tensor, shifted: torch.Tensor,
                  workspace: Workspace) -> RollPass:
        """How the exact and Fourier sums of this comparison are taken, decided once for it: a
        function ``(source, groups, shifted_sq, diff_sq)`` that, per (roll q, shift indices) of
        ``groups``, writes Σ b² into ``shifted_sq`` and Σ (b - roll(source, q))² into
        ``diff_sq`` (both (S, B)) at those shifts' rows. ``source``: the reference or a
        fractional shift of it (same shape, maybe strided)."""


EAGER = Eager()


class Native:
    """The compiled CPU kernel, with the eager passes for what it does not take (see the
    module). ``required``: a kernel that cannot be built is an error, not a warning."""

    name = "native"

    def __init__(self, required: bool) -> None:
        self.required = required

    def takes(self, ref: torch.Tensor, shifted: torch.Tensor) -> bool:
        """The kernel runs this comparison: it can read the maps and the library is built."""
        return native.fits(ref, shifted) and native.load(self.required) is not None

    def bilinear_norm(self, plan: BilinearPlan, ref: torch.Tensor,
                      workspace: Workspace) -> torch.Tensor:
        """<a, UᵀU a> per image from the kernel's lag sums of the reference."""
        if not self.takes(ref, ref[None]):
            return EAGER.bilinear_norm(plan, ref, workspace)
        kernel, weights = self._kernel(plan, "native_norm", ref.shape[-2:],
                                       lambda: ([False], [(0, 0)], [()], [()]))
        return kernel(ref, ref[None])[0][0] @ weights

    def bilinear_sums(self, plan: BilinearPlan, ref: torch.Tensor, shifted: torch.Tensor,
                      const: dict, workspace: Workspace
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three sums from the kernel's lag sums, in one read of each shifted map."""
        if not self.takes(ref, shifted):
            return EAGER.bilinear_sums(plan, ref, shifted, const, workspace)
        rows, cols = plan.rows.taps, plan.cols.taps
        flags = plan.exact_flags
        kernel, weights = self._kernel(plan, "native", ref.shape[-2:], lambda: (
            flags, plan.offsets,
            [None if flag else rows.cross[s] for s, flag in enumerate(flags)],
            [None if flag else cols.cross[s] for s, flag in enumerate(flags)]))
        lag_sums, diff_sums, cross = kernel(ref, shifted)
        return lag_sums @ weights, diff_sums @ weights, cross

    @staticmethod
    def _kernel(plan: BilinearPlan, name: str, shape: tuple[int, int],
                per_shift) -> tuple[native.BilinearKernel, torch.Tensor]:
        """The kernel's arguments and the norm's lag coefficients, made once per plan and map
        size (the norm's lags depend on it) and kept in ``plan.prepared``; ``per_shift()``
        gives the kernel's per-shift arguments."""
        key = (name, *shape)
        if key not in plan.prepared:
            plain = (plan.rows.taps.plain, plan.cols.taps.plain)
            lags, coefficients = quadratic_lags(plain, *shape)
            plan.prepared[key] = (native.BilinearKernel(lags, *per_shift()),
                                  torch.tensor(coefficients, dtype=torch.float64))
        return plan.prepared[key]

    def roll_pass(self, ref: torch.Tensor, shifted: torch.Tensor,
                  workspace: Workspace) -> RollPass:
        """Every shift of a group in one kernel call (one read of each map), for planes of at
        least ``KERNEL_PLANE`` positions; the eager pass otherwise."""
        if ref.shape[-2] * ref.shape[-1] < KERNEL_PLANE or not self.takes(ref, shifted):
            return EAGER.roll_pass(ref, shifted, workspace)

        def sums(source: torch.Tensor, groups: RollGroups, shifted_sq: torch.Tensor,
                 diff_sq: torch.Tensor) -> None:
            index = [i for _, indices in groups for i in indices]
            positions = torch.tensor(index)
            shifted_sq[positions], diff_sq[positions] = native.difference_sums(
                source, shifted, index, [offset for offset, indices in groups for _ in indices])

        return sums


_BACKENDS: dict[str, Differences] = {"off": EAGER, "auto": Native(required=False),
                                     "on": Native(required=True)}


def choose(mode: Optional[str] = None) -> Differences:
    """The backend for a new plan: ``mode`` 'on' (the kernel, required), 'off' (eager) or
    'auto' (the kernel when it builds); by default ``SHIFTLAB_NATIVE``'s (:mod:`shiftlab.config`).

    >>> choose("off").name
    'eager'
    """
    mode = config.native_mode() if mode is None else mode
    if mode not in _BACKENDS:
        raise ValueError(f"mode must be one of {', '.join(_BACKENDS)}, got {mode!r}")
    return _BACKENDS[mode]
