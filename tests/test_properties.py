"""Property-based checks of the alignment maths (hypothesis)."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from shiftlab.equivariance.align import make_plan
from shiftlab.equivariance.geometry import LayerInfo
from shiftlab.equivariance.metrics import distance


def layer(stride: int, channels: int, n: int) -> LayerInfo:
    s = float(stride)
    return LayerInfo("x", "Test", "spatial", (s, s), (s, s), (channels, n, n))


@settings(max_examples=30, deadline=None)
@given(stride=st.sampled_from([1, 2, 4]), n=st.integers(3, 9), qh=st.integers(-12, 12),
       qw=st.integers(-12, 12), seed=st.integers(0, 2**16))
def test_all_alignments_agree_that_an_exactly_shifted_map_is_equivariant(stride, n, qh, qw, seed):
    ref = torch.randn(2, 3, n, n, generator=torch.Generator().manual_seed(seed))
    shifted = torch.roll(ref, (qh, qw), dims=(-2, -1))[None]
    shift = torch.tensor([(qh * stride, qw * stride)], dtype=torch.float64)
    for align in ("exact", "bilinear", "fourier"):
        stats = make_plan(layer(stride, 3, n), shift, "circular", align).compare(ref, shifted)
        assert float(distance(stats, "l2").abs().max()) <= 1e-5, align


@settings(max_examples=30, deadline=None)
@given(stride=st.sampled_from([1, 2, 4]), n=st.integers(3, 9), qh=st.integers(-8, 8),
       qw=st.integers(-8, 8), seed=st.integers(0, 2**16), metric=st.sampled_from(["cosine", "l2", "psnr"]))
def test_fourier_equals_exact_wherever_the_stride_divides_the_shift(stride, n, qh, qw, seed, metric):
    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, 2, n, n, generator=generator)
    shifted = torch.randn(1, 1, 2, n, n, generator=generator)
    shift = torch.tensor([(qh * stride, qw * stride)], dtype=torch.float64)
    values = [distance(make_plan(layer(stride, 2, n), shift, "circular", align, need_peak=True)
                       .compare(ref, shifted), metric) for align in ("exact", "fourier")]
    assert torch.equal(values[0], values[1])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 8), seed=st.integers(0, 2**16), qh=st.integers(-3, 3))
def test_bilinear_distance_does_not_depend_on_whole_periods_of_the_shift(n, seed, qh):
    """Circular mode: shifting the input by a whole period of the feature map changes nothing."""
    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(1, 2, n, n, generator=generator)
    shifted = torch.randn(1, 1, 2, n, n, generator=generator)
    stride = 2
    base = torch.tensor([(3.0, 1.0)], dtype=torch.float64)
    wrapped = base + torch.tensor([(qh * n * stride, 0.0)], dtype=torch.float64)
    a = distance(make_plan(layer(stride, 2, n), base, "circular", "bilinear").compare(ref, shifted), "cosine")
    b = distance(make_plan(layer(stride, 2, n), wrapped, "circular", "bilinear").compare(ref, shifted), "cosine")
    assert torch.allclose(a, b, atol=1e-6)
