"""The bilinear alignment as one inner product per shifted map (docs/semantics.md), against
explicit circular linear upsampling."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings, strategies as st

from shiftlab.equivariance.align import make_plan
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.equivariance.metrics import distance


def upsample(x: np.ndarray, stride: int, axis: int) -> np.ndarray:
    """Circular linear upsampling written out: A, (A+B)/2, B, ... for 2x, along ``axis``."""
    n = x.shape[axis]
    k = np.arange(n * stride)
    low, frac = k // stride, (k % stride) / stride
    shape = [1] * x.ndim
    shape[axis] = -1
    return ((1 - frac).reshape(shape) * np.take(x, low, axis=axis)
            + frac.reshape(shape) * np.take(x, (low + 1) % n, axis=axis))


def phase_taps(stride: int, residue: int) -> dict[int, float]:
    """w_r[m] = (h ⊛ h)[s·m - r] with the triangle kernel h[k] = 1 - |k|/s."""
    h = 1 - np.abs(np.arange(-stride + 1, stride)) / stride
    g = np.convolve(h, h)  # g[x + 2s - 2] = (h ⊛ h)[x]
    taps = {}
    for m in range(-2, 4):
        x = stride * m - residue
        if abs(x) <= 2 * stride - 2 and g[x + 2 * stride - 2] != 0:
            taps[m] = float(g[x + 2 * stride - 2])
    return taps


def filtered(x: np.ndarray, taps: dict[int, float], axis: int) -> np.ndarray:
    """(w ⊛ x)[t] = Σ_m w[m] x[t - m], circular along ``axis``."""
    return sum(weight * np.roll(x, m, axis=axis) for m, weight in taps.items())


@settings(max_examples=60, deadline=None)
@given(stride=st.integers(2, 32), n=st.integers(1, 7), shift=st.integers(-70, 70),
       seed=st.integers(0, 2**16))
def test_the_cross_term_of_upsampled_maps_is_one_inner_product_with_a_filtered_reference(
        stride, n, shift, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(n), rng.standard_normal(n)
    quotient, residue = divmod(shift, stride)
    taps = phase_taps(stride, residue)
    assert len(taps) <= 4
    explicit = np.roll(upsample(a, stride, 0), shift) @ upsample(b, stride, 0)
    formula = np.roll(filtered(a, taps, 0), quotient) @ b
    np.testing.assert_allclose(formula, explicit, rtol=1e-10, atol=1e-10)
    norm_taps = phase_taps(stride, 0)
    assert len(norm_taps) == 3
    np.testing.assert_allclose(filtered(b, norm_taps, 0) @ b, upsample(b, stride, 0) @ upsample(b, stride, 0),
                               rtol=1e-10, atol=1e-10)


def test_the_two_dimensional_cross_term_is_separable():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 6)), rng.standard_normal((2, 5, 6))
    up = lambda x: upsample(upsample(x, 4, 1), 2, 2)  # noqa: E731
    for dh in range(-5, 9):
        for dw in range(-3, 5):
            (qh, rh), (qw, rw) = divmod(dh, 4), divmod(dw, 2)
            explicit = (np.roll(up(a), (dh, dw), (1, 2)) * up(b)).sum()
            filter_a = filtered(filtered(a, phase_taps(4, rh), 1), phase_taps(2, rw), 2)
            np.testing.assert_allclose((np.roll(filter_a, (qh, qw), (1, 2)) * b).sum(), explicit,
                                       rtol=1e-10, atol=1e-10)


def explicit_cosine(ref: torch.Tensor, shifted: torch.Tensor, shifts, stride: int) -> np.ndarray:
    a_up = upsample(upsample(ref.double().numpy(), stride, -2), stride, -1)
    out = np.zeros(shifted.shape[:2])
    for s, (dh, dw) in enumerate(shifts):
        x = np.roll(a_up, (dh, dw), (-2, -1))
        y = upsample(upsample(shifted[s].double().numpy(), stride, -2), stride, -1)
        for i in range(shifted.shape[1]):
            out[s, i] = 1 - (x[i] * y[i]).sum() / (np.linalg.norm(x[i]) * np.linalg.norm(y[i]))
    return out


@settings(max_examples=15, deadline=None)
@given(stride=st.sampled_from([2, 3, 4, 8]), size=st.integers(9, 13), seed=st.integers(0, 2**16),
       data=st.data())
def test_bilinear_plan_on_maps_larger_than_the_dense_limit_equals_explicit_upsampling(
        stride, size, seed, data):
    """Maps above 8×8 take the per-phase filtered reference and one inner product per map; the
    shifts include several of one phase (one filter, rolled) and phases of one shift each."""
    shifts = data.draw(st.lists(st.tuples(st.integers(-2 * stride, 3 * stride),
                                          st.integers(-2 * stride, 3 * stride)),
                                min_size=1, max_size=6))
    shifts += [(stride + 1, 1), (2 * stride + 1, 1)]  # one phase, two rolls
    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(2, 3, size, size + 1, generator=generator)
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), 2, 3, size, size + 1, generator=generator)
    info = LayerInfo("x", "Test", "spatial", (float(stride),) * 2, (float(stride),) * 2,
                     (3, size, size + 1))
    plan = make_plan(info, torch.tensor(shifts, dtype=torch.float64), "circular", "bilinear")
    got = distance(plan.compare(ref, shifted), "cosine").numpy()
    np.testing.assert_allclose(got, explicit_cosine(ref, shifted, shifts, stride), rtol=1e-4,
                               atol=2e-6)


def test_bilinear_plan_filters_the_reference_once_per_distinct_filter_of_one_axis():
    info = LayerInfo("x", "Test", "spatial", (4.0, 4.0), (4.0, 4.0), (3, 16, 16))
    shifts = torch.tensor([(1, 2), (5, 2), (1, 6), (9, 10), (3, 3), (4, 0)], dtype=torch.float64)
    plan = make_plan(info, shifts, "circular", "bilinear")
    # row phase 1 x4 (the rolls differ), 3 x1, and column phase 2 x4, 3 x1: two filtered
    # references either way; (4, 0) is whole feature pixels (exact)
    assert sorted(len(members) for _, members in plan.cross_groups[1]) == [1, 4]


def test_bilinear_plan_prefiltering_along_columns_with_rolls_equals_explicit_upsampling():
    """One column phase and three row phases: the columns are filtered once, the rows per phase;
    (11, 5) is alone in its row phase (row roll folded into the taps, column roll a copy)."""
    stride, size = 4, 10
    shifts = [(1, 1), (2, 1), (9, 9), (11, 5)]
    generator = torch.Generator().manual_seed(3)
    ref = torch.randn(2, 3, size, size + 1, generator=generator)
    shifted = ref[None] + 0.5 * torch.randn(len(shifts), 2, 3, size, size + 1, generator=generator)
    info = LayerInfo("x", "Test", "spatial", (float(stride),) * 2, (float(stride),) * 2,
                     (3, size, size + 1))
    plan = make_plan(info, torch.tensor(shifts, dtype=torch.float64), "circular", "bilinear")
    assert plan.cross_groups[0] == -1 and len(plan.cross_groups[1]) == 1
    got = distance(plan.compare(ref, shifted), "cosine").numpy()
    np.testing.assert_allclose(got, explicit_cosine(ref, shifted, shifts, stride), rtol=1e-4,
                               atol=2e-6)
