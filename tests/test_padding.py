"""circular_padding(): every padding made circular; SPEC known answer 10 (boundary vs. aliasing)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import shiftlab
from shiftlab import BlurPool, ShiftGrid
from shiftlab.equivariance.capture import select_modules
from shiftlab.models.padding import CircularPool, circular_padding


def converted(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported models must convert without a report
        return circular_padding(model)


def wrapped(x: torch.Tensor, pad: int) -> torch.Tensor:
    return F.pad(x, [pad] * 4, mode="circular")


# -- what each module becomes ----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_conv_padding_becomes_a_circular_wrap(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode)
    x = torch.randn(2, 3, 9, 9)
    out = converted(conv)(x)
    assert torch.allclose(out, F.conv2d(wrapped(x, 1), conv.weight, conv.bias), atol=1e-6)


def test_same_padding_of_an_even_kernel_wraps_the_extra_row_at_the_bottom():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 4, padding="same")
    x = torch.randn(1, 2, 8, 8)
    out = converted(conv)(x)
    expected = F.conv2d(F.pad(x, [1, 2, 1, 2], mode="circular"), conv.weight, conv.bias)
    assert out.shape == x.shape[:1] + (3, 8, 8)
    assert torch.allclose(out, expected, atol=1e-6)


def test_conv1d_and_conv3d_are_converted_too():
    model = nn.Sequential(nn.Conv1d(1, 1, 3, padding=1), nn.Conv3d(1, 1, 3, padding=1))
    circ = converted(model)
    assert [m.padding_mode for m in circ] == ["circular", "circular"]


def test_padded_maxpool_takes_wrapped_values_instead_of_minus_infinity():
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    pool = converted(nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1)))[0]
    assert isinstance(pool, CircularPool)
    assert torch.equal(pool(x), F.max_pool2d(wrapped(x, 1)[..., :-1, :-1], 3, stride=2))


@pytest.mark.parametrize("count_include_pad", [True, False])
def test_padded_avgpool_divides_every_wrapped_window_by_the_kernel_size(count_include_pad):
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
    out = converted(nn.Sequential(pool))(x)
    # The mean of the 3x3 circular neighbourhood, written with torch.roll.
    expected = sum(torch.roll(x, (i, j), dims=(-2, -1)) for i in (-1, 0, 1) for j in (-1, 0, 1)) / 9
    assert torch.allclose(out, expected, atol=1e-6)


def test_ceil_mode_pool_keeps_its_output_size_and_becomes_equivariant():
    x = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    original = nn.MaxPool2d(3, stride=2, ceil_mode=True)   # GoogLeNet's pools: overhang at the end
    pool = converted(nn.Sequential(original))
    assert pool(x).shape == original(x).shape == (1, 2, 8, 8)
    shifted = pool(torch.roll(x, (2, 4), dims=(-2, -1)))
    assert torch.equal(shifted, torch.roll(pool(x), (1, 2), dims=(-2, -1)))


def test_circular_pool_is_one_layer_for_capture():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1))
    assert list(select_modules(converted(model))) == ["0", "1"]


def test_blurpool_and_pad_modules_become_circular():
    model = nn.Sequential(nn.ZeroPad2d(1), nn.ReflectionPad2d((1, 2, 0, 1)),
                          nn.ConstantPad1d(2, 3.0),
                          BlurPool(3, filt_size=4, stride=2, pad_type="reflect"))
    circ = converted(model)
    assert type(circ[0]) is nn.CircularPad2d and circ[0].padding == (1, 1, 1, 1)
    assert type(circ[1]) is nn.CircularPad2d and circ[1].padding == (1, 2, 0, 1)
    assert type(circ[2]) is nn.CircularPad1d and circ[2].padding == (2, 2)
    assert circ[3].pad_type == "circular" and isinstance(circ[3].pad, nn.CircularPad2d)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = F.conv2d(F.pad(x, [1, 2, 1, 2], mode="circular"), circ[3].filt, stride=2, groups=3)
    assert torch.allclose(circ[3](x), expected, atol=1e-6)


def test_state_dict_keys_and_values_are_unchanged_and_the_original_is_untouched():
    model = torchvision.models.resnet18(num_classes=4).eval()
    circ = converted(model)
    before, after = model.state_dict(), circ.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert model.conv1.padding_mode == "zeros" and isinstance(model.maxpool, nn.MaxPool2d)
    circ.load_state_dict(before, strict=True)
    assert circ.shiftlab_unconverted == []
    assert circ.shiftlab_padding == "circular" and not hasattr(model, "shiftlab_padding")


def test_modules_that_cannot_be_made_circular_are_listed_and_warned_once():
    class OwnPadConv(nn.Conv2d):  # pads inside forward, as timm's Conv2dSame does
        def forward(self, x):
            return super().forward(F.pad(x, [1, 1, 1, 1]))

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 3, padding=1),
                          OwnPadConv(4, 4, 3), nn.MaxPool2d(5, stride=2),
                          nn.MaxPool2d(3, stride=2, padding=1, return_indices=True),
                          nn.Unfold(3, padding=1))
    with pytest.warns(UserWarning, match="not made circular") as caught:
        circ = circular_padding(model)
    assert len(caught) == 1
    assert circ.shiftlab_unconverted == ["1", "2", "3", "4", "5"]
    assert circ[0].padding_mode == "circular"


# -- known answer 10 (docs/semantics.md): boundary vs. aliasing on torchvision models ------------------------
def _vgg11() -> nn.Module:
    model = torchvision.models.vgg11()
    model.classifier = nn.Linear(512 * 7 * 7, 10)  # the 4096-wide head only costs test time
    return model


def _densenet() -> nn.Module:
    # densenet121's module types (padded stem pool, dense layers, avg-pool transitions) at 1/100
    # of its run time.
    return torchvision.models.DenseNet(growth_rate=8, block_config=(1, 1, 1, 1),
                                       num_init_features=8)


# name -> (builder, input size); 64 px where the stride-32 layers must see a non-trivial shift.
ARCHITECTURES = {
    "vgg11": (_vgg11, 32),
    "resnet18": (torchvision.models.resnet18, 64),
    "densenet": (_densenet, 64),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(width_mult=0.25), 32),
}
# Shifts divisible by every stride 1..32; (0, 32) is the identity at 32 px.
GRID = ShiftGrid.explicit([(0, 0), (1, 1), (2, 0), (0, 6), (4, 4), (8, 8), (16, 0), (0, 32)])


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def measured(request):
    builder, size = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    model = builder().eval()
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    run = dict(grid=GRID, mode="circular", align="exact", device="cpu", progress=False)
    return (request.param, size, shiftlab.measure(converted(model).eval(), images, **run),
            shiftlab.measure(model, images, **run))


def _divides(stride: tuple[float, float], shift: tuple[float, float]) -> bool:
    return shift[0] % stride[0] == 0 and shift[1] % stride[1] == 0


def test_circular_padding_makes_every_layer_exact_where_its_stride_divides_the_shift(measured):
    name, _, circular, trained = measured
    assert (circular.settings.padding, trained.settings.padding) == ("circular", "as-trained")
    spatial = [info for info in circular.layers if info.is_spatial]
    assert len(spatial) > 10
    for info in spatial:
        values = circular.values(info.name)
        defined = np.array([_divides(info.stride, shift) for shift in GRID.shifts])
        assert np.all(values[defined] <= 1e-6), (name, info.name, info.stride, values)
        assert np.all(np.isnan(values[~defined])), (name, info.name, values)


def test_after_a_global_pool_circular_models_are_invariant_to_shifts_of_the_total_stride(measured):
    name, size, circular, _ = measured
    total = max(info.stride[0] for info in circular.layers if info.is_spatial)
    assert total == 32
    nontrivial = [i for i, (dh, dw) in enumerate(GRID.shifts) if dh % 32 == dw % 32 == 0
                  and (dh % size or dw % size)]
    for info in circular.layers:
        if info.is_spatial:
            continue
        values = circular.values(info.name)[nontrivial]
        if name == "vgg11":
            # VGG's AdaptiveAvgPool2d((7, 7)) resamples the 2x2 map onto 7x7 bins, which does not
            # commute with rolling it by one: not a padding effect, so it stays > 0.
            assert np.all(values > 1e-4), (info.name, values)
        else:  # global average pool: a rolled map has the same mean
            assert np.all(values <= 1e-6), (name, info.name, values)


def test_as_trained_zero_padding_breaks_equivariance_at_every_spatial_layer(measured):
    name, size, _, trained = measured
    nonzero = np.array([dh % size or dw % size for dh, dw in GRID.shifts], dtype=bool)
    for info in trained.layers:
        if not info.is_spatial or info.stride[0] >= size:
            continue  # a 1x1 map: every shift it defines is the identity
        values = trained.values(info.name)
        if info.stride == (1.0, 1.0):  # the seam meets the zero border at every shift
            assert np.all(values[nonzero] > 1e-4), (name, info.name, values)
        assert np.nanmax(values[nonzero]) > 1e-3, (name, info.name, values)


def test_an_antialiased_model_is_fully_circular_and_exact_where_its_stride_divides_the_shift():
    # antialias() makes MaxPool(2, stride=1) + BlurPool: the stride-1 pool must wrap, not shrink
    import torchvision

    torch.manual_seed(0)
    model = shiftlab.antialias(torchvision.models.vgg11(num_classes=10), filt_size=4).eval()
    circular = circular_padding(model)
    assert circular.shiftlab_unconverted == []
    images = torch.randn(2, 3, 64, 64)
    assert circular(images).shape == model(images).shape
    grid = shiftlab.ShiftGrid.explicit([(0, 0), (2, 2), (4, 0), (8, 8), (32, 32)])
    result = shiftlab.measure(circular, images, grid, align="exact", progress=False, device="cpu")
    checked = 0
    for info in result.layers:
        if not info.is_spatial:
            continue
        stride = int(info.stride[0])
        for (dh, dw), value in zip(grid.shifts, result.values(info.name)):
            if dh % stride == 0 and dw % stride == 0:
                assert value <= 1e-6, (info.name, stride, dh, dw, value)
                checked += 1
    assert checked > 40


def test_has_zero_padding_names_what_the_circular_shift_hint_is_about():
    from shiftlab.models.padding import has_zero_padding

    assert has_zero_padding(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)))
    assert has_zero_padding(nn.Sequential(nn.Conv2d(3, 4, 3, padding="same")))
    assert has_zero_padding(nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1)))
    assert not has_zero_padding(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)))
    assert not has_zero_padding(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")))
