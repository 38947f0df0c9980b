"""BlurPool and antialias(): hand-computed blurs, published layouts, filt_size=1 equalities.

The expected layouts below were read from antialiased-cnns (antialiased_cnns/vgg.py, alexnet.py,
resnet.py, densenet.py, mobilenet.py, blurpool.py) and are written out here by hand, so these
tests do not compare the converter with itself.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

from shiftlab.models.antialias import BlurPool, antialias, binomial_filter
from shiftlab.errors import ModelError, UsageError

BINOMIAL_ROWS = {1: [1], 2: [1, 1], 3: [1, 2, 1], 4: [1, 3, 3, 1], 5: [1, 4, 6, 4, 1],
                 6: [1, 5, 10, 10, 5, 1], 7: [1, 6, 15, 20, 15, 6, 1]}


def _ramp() -> torch.Tensor:
    """x[i, j] = 4 i + j on a 4x4 grid, shape (1, 1, 4, 4): blurs of a ramp are easy by hand."""
    return torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)


# -- BlurPool ---------------------------------------------------------------------------------

@pytest.mark.parametrize("filt_size, pad_type, pad_off, stride, expected", [
    # k=1: plain subsampling; with pad_off the padded border is sampled too.
    (1, "reflect", 0, 2, [[0, 2], [8, 10]]),
    (1, "reflect", 0, 3, [[0, 3], [12, 15]]),
    (1, "zero", 1, 2, [[0, 0, 0], [0, 5, 7], [0, 13, 15]]),
    (1, "replicate", 1, 2, [[0, 1, 3], [4, 5, 7], [12, 13, 15]]),
    # k=2: box mean of each 2x2 block; the one pad row/column goes bottom/right and is unused.
    (2, "reflect", 0, 2, [[2.5, 4.5], [10.5, 12.5]]),
    (2, "zero", 0, 2, [[2.5, 4.5], [10.5, 12.5]]),
    # k=3, [1,2,1]/4 centred on rows/cols 0 and 2; row -1 is row 1 (reflect), row 0
    # (replicate), zeros (zero), row 3 (circular).
    (3, "reflect", 0, 2, [[2.5, 4.0], [8.5, 10.0]]),
    (3, "refl", 0, 2, [[2.5, 4.0], [8.5, 10.0]]),
    (3, "replicate", 0, 2, [[1.25, 3.0], [8.25, 10.0]]),
    (3, "repl", 0, 2, [[1.25, 3.0], [8.25, 10.0]]),
    (3, "zero", 0, 2, [[0.9375, 2.5], [6.25, 10.0]]),
    (3, "circular", 0, 2, [[5.0, 6.0], [9.0, 10.0]]),
    # k=4, [1,3,3,1]/8 with pads (1, 2): windows over rows -1..2 and 1..4, reflected.
    (4, "reflect", 0, 2, [[3.75, 5.25], [9.75, 11.25]]),
])
def test_blurpool_matches_hand_computed_values(filt_size, pad_type, pad_off, stride, expected):
    pool = BlurPool(1, filt_size=filt_size, stride=stride, pad_type=pad_type, pad_off=pad_off)
    out = pool(_ramp())
    assert torch.allclose(out[0, 0], torch.tensor(expected, dtype=torch.float32), atol=1e-6)


def test_blurpool_acts_on_each_channel_separately():
    x = torch.cat([_ramp(), 10 * _ramp()], dim=1)
    out = BlurPool(2, filt_size=3, stride=2, pad_type="circular")(x)
    assert torch.allclose(out[0, 0], torch.tensor([[5.0, 6.0], [9.0, 10.0]]))
    assert torch.allclose(out[0, 1], 10 * out[0, 0])


@pytest.mark.parametrize("filt_size", range(1, 8))
def test_filter_is_normalised_outer_product_of_binomial_row(filt_size):
    pool = BlurPool(3, filt_size=filt_size)
    row = torch.tensor(BINOMIAL_ROWS[filt_size], dtype=torch.float32)
    expected = torch.outer(row, row) / row.sum() ** 2
    assert list(pool.state_dict()) == ["filt"]  # the name antialiased-cnns checkpoints use
    assert pool.filt.shape == (3, 1, filt_size, filt_size)
    for channel in range(3):
        assert torch.allclose(pool.filt[channel, 0], expected, atol=1e-7)
        assert torch.isclose(pool.filt[channel].sum(), torch.tensor(1.0))
    assert torch.allclose(binomial_filter(filt_size), expected, atol=1e-7)


@pytest.mark.parametrize("pad_type", ["reflect", "replicate", "zero", "circular"])
@pytest.mark.parametrize("filt_size", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("size, stride", [(8, 2), (9, 2), (12, 3), (10, 4)])
def test_blurpool_output_size_is_ceil_of_input_over_stride(pad_type, filt_size, size, stride):
    pool = BlurPool(2, filt_size=filt_size, stride=stride, pad_type=pad_type)
    out = pool(torch.randn(1, 2, size, size + 1))
    assert out.shape == (1, 2, -(-size // stride), -(-(size + 1) // stride))


def test_blurpool_pads_follow_antialiased_cnns():
    # [(k-1)//2, ceil((k-1)/2)] per axis, plus pad_off on every side.
    assert BlurPool(1, filt_size=4).pad_sizes == [1, 2, 1, 2]
    assert BlurPool(1, filt_size=5, pad_off=1).pad_sizes == [3, 3, 3, 3]
    assert isinstance(BlurPool(1, pad_type="zero").pad, nn.ZeroPad2d)
    assert isinstance(BlurPool(1, pad_type="circular").pad, nn.CircularPad2d)


def test_box_blurpool_equals_avgpool_on_even_sizes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 6)
    assert torch.allclose(BlurPool(3, filt_size=2)(x), nn.AvgPool2d(2)(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, words", [
    ({"filt_size": 0}, "1..7"), ({"filt_size": 8}, "1..7"), ({"filt_size": 2.0}, "1..7"),
    ({"pad_type": "mirror"}, "reflect"), ({"stride": 0}, ">= 1"), ({"channels": 0}, ">= 1"),
    ({"pad_off": -3, "filt_size": 3}, "pad_off"), ({"pad_off": 0.5}, "pad_off"),
])
def test_invalid_blurpool_args_raise_usage_error(kwargs, words):
    args = {"channels": 4, **kwargs}
    with pytest.raises(UsageError, match=words.replace(".", r"\.")):
        BlurPool(**args)


def test_blurpool_wrong_channel_count_raises_model_error():
    with pytest.raises(ModelError, match="BlurPool"):
        BlurPool(4)(torch.zeros(1, 3, 8, 8))


def test_blurpool_too_small_for_reflect_padding_raises_model_error():
    with pytest.raises(ModelError, match="pad_type='zero'"):
        BlurPool(1, filt_size=4, pad_type="reflect")(torch.zeros(1, 1, 2, 5))
    smallest = BlurPool(1, filt_size=4, pad_type="reflect")(torch.zeros(1, 1, 3, 5))
    assert smallest.shape == (1, 1, 2, 3)
    assert BlurPool(1, filt_size=4, pad_type="zero")(torch.zeros(1, 1, 1, 1)).shape == (1, 1, 1, 1)


# -- published layouts -------------------------------------------------------------------------

def _renamed(prefixes: dict[str, str]):
    def rename(key: str) -> str:
        for old, new in prefixes.items():
            if key.startswith(old):
                return new + key[len(old):]
        return key
    return rename


def _resnet_renames(strided_conv: str) -> dict[str, str]:
    # The strided blocks of layer2..4: the conv after the stride gets the BlurPool at index 0,
    # the downsample Sequential gets one in front of its 1x1 conv.
    out = {}
    for layer in (2, 3, 4):
        block = f"layer{layer}.0."
        out[block + strided_conv + "."] = block + strided_conv + ".1."
        out[block + "downsample.0."] = block + "downsample.1."
        out[block + "downsample.1."] = block + "downsample.2."
    return out


# name -> (prefix renames torchvision -> antialiased-cnns, {filt key: channels})
LAYOUTS = {
    "vgg11": ({f"features.{a}.": f"features.{b}." for a, b in
               {3: 4, 6: 8, 8: 10, 11: 14, 13: 16, 16: 20, 18: 22}.items()},
              {"features.3.filt": 64, "features.7.filt": 128, "features.13.filt": 256,
               "features.19.filt": 512, "features.25.filt": 512}),
    "vgg11_bn": ({f"features.{a}.": f"features.{b}." for a, b in
                  {4: 5, 5: 6, 8: 10, 9: 11, 11: 13, 12: 14, 15: 18, 16: 19, 18: 21, 19: 22,
                   22: 26, 23: 27, 25: 29, 26: 30}.items()},
                 {"features.4.filt": 64, "features.9.filt": 128, "features.17.filt": 256,
                  "features.25.filt": 512, "features.33.filt": 512}),
    "alexnet": ({"features.3.": "features.5.", "features.6.": "features.9.",
                 "features.8.": "features.11.", "features.10.": "features.13."},
                {"features.2.filt": 64, "features.4.filt": 64, "features.8.filt": 192,
                 "features.16.filt": 256}),
    "resnet18": (_resnet_renames("conv2"),
                 {"maxpool.1.filt": 64, "layer2.0.conv2.0.filt": 128, "layer3.0.conv2.0.filt": 256,
                  "layer4.0.conv2.0.filt": 512, "layer2.0.downsample.0.filt": 64,
                  "layer3.0.downsample.0.filt": 128, "layer4.0.downsample.0.filt": 256}),
    "resnet50": (_resnet_renames("conv3"),
                 {"maxpool.1.filt": 64, "layer2.0.conv3.0.filt": 128, "layer3.0.conv3.0.filt": 256,
                  "layer4.0.conv3.0.filt": 512, "layer2.0.downsample.0.filt": 256,
                  "layer3.0.downsample.0.filt": 512, "layer4.0.downsample.0.filt": 1024}),
    "resnext50_32x4d": (_resnet_renames("conv3"),
                        {"maxpool.1.filt": 64, "layer2.0.conv3.0.filt": 256,
                         "layer3.0.conv3.0.filt": 512, "layer4.0.conv3.0.filt": 1024,
                         "layer2.0.downsample.0.filt": 256, "layer3.0.downsample.0.filt": 512,
                         "layer4.0.downsample.0.filt": 1024}),
    "wide_resnet50_2": (_resnet_renames("conv3"),
                        {"maxpool.1.filt": 64, "layer2.0.conv3.0.filt": 256,
                         "layer3.0.conv3.0.filt": 512, "layer4.0.conv3.0.filt": 1024,
                         "layer2.0.downsample.0.filt": 256, "layer3.0.downsample.0.filt": 512,
                         "layer4.0.downsample.0.filt": 1024}),
    "densenet121": ({}, {"features.pool0.filt": 64, "features.transition1.pool.filt": 128,
                         "features.transition2.pool.filt": 256,
                         "features.transition3.pool.filt": 512}),
    "mobilenet_v2": ({**{f"features.{n}.conv.{a}.": f"features.{n}.conv.{a + 1}."
                         for n in (2, 4, 7, 14) for a in (2, 3)}, "classifier.1.": "classifier.0."},
                     {"features.2.conv.2.filt": 96, "features.4.conv.2.filt": 144,
                      "features.7.conv.2.filt": 192, "features.14.conv.2.filt": 576}),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("filt_size", [3, 4])
def test_state_dict_layout_equals_published_model(name, filt_size):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        original = getattr(torchvision.models, name)(weights=None)
    renames, filts = LAYOUTS[name]
    rename = _renamed(renames)
    expected = {rename(k): tuple(v.shape) for k, v in original.state_dict().items()}
    expected.update({key: (c, 1, filt_size, filt_size) for key, c in filts.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported family converts without complaint
        converted = antialias(original, filt_size=filt_size)
    got = {k: tuple(v.shape) for k, v in converted.state_dict().items()}
    assert got == expected
    assert sum(isinstance(m, BlurPool) for m in converted.modules()) == len(filts)
    assert converted.shiftlab_unconverted == []


# Strided modules antialiased-cnns keeps (its pool_only=True default), with their strides.
KEPT_STRIDED = {
    "vgg11": {}, "vgg11_bn": {}, "alexnet": {"features.0": (2, 2)},
    "resnet18": {"conv1": (2, 2)}, "resnet50": {"conv1": (2, 2)},
    "resnext50_32x4d": {"conv1": (2, 2)}, "wide_resnet50_2": {"conv1": (2, 2)},
    "densenet121": {"features.conv0": (2, 2)}, "mobilenet_v2": {"features.0.0": (2, 2)},
}


@pytest.mark.parametrize("name", sorted(KEPT_STRIDED))
def test_only_the_published_stems_stay_strided(name):
    with torch.device("meta"):
        converted = antialias(getattr(torchvision.models, name)(weights=None))
    strided = {n: tuple(m.stride) if isinstance(m.stride, tuple) else (m.stride, m.stride)
               for n, m in converted.named_modules()
               if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))
               and m.stride not in (1, (1, 1))}
    assert strided == KEPT_STRIDED[name]
    assert all(m.stride == 2 for m in converted.modules() if isinstance(m, BlurPool))


def test_pooling_modules_follow_published_definitions():
    with torch.device("meta"):
        resnet = antialias(torchvision.models.resnet18())
        densenet = antialias(torchvision.models.densenet121())
        alexnet = antialias(torchvision.models.alexnet())
    # resnet.py: maxpool = Sequential(MaxPool2d(kernel_size=2, stride=1), BlurPool(64)).
    stem = resnet.maxpool[0]
    assert (stem.kernel_size, stem.stride, stem.padding) == (2, 1, 0)
    # densenet.py: max0 = MaxPool2d(3, stride=1, padding=1); transitions end in BlurPool.
    max0 = densenet.features.max0
    assert (max0.kernel_size, max0.stride, max0.padding) == (3, 1, 1)
    assert isinstance(densenet.features.transition2.pool, BlurPool)
    # alexnet.py: conv(stride 2), ReLU, BlurPool, MaxPool(3, 1), BlurPool, conv, ...
    kinds = [type(m).__name__ for m in alexnet.features][:6]
    assert kinds == ["Conv2d", "ReLU", "BlurPool", "MaxPool2d", "BlurPool", "Conv2d"]
    assert alexnet.features[3].stride == 1


# -- behaviour on real weights ------------------------------------------------------------------

def _seeded(name: str, **kwargs) -> nn.Module:
    """A torchvision model with seeded random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _image(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_input_model_is_untouched():
    model = _seeded("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    converted = antialias(model, filt_size=3)
    assert repr(model) == structure and not any(isinstance(m, BlurPool) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        converted.fc.weight.add_(1.0)  # no storage is shared with the input
    assert torch.equal(model.fc.weight, before["fc.weight"])


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("densenet121", 64),
                                        ("mobilenet_v2", 64), ("alexnet", 128)])
def test_output_shape_equals_torchvision(name, size):
    model = _seeded(name)
    converted = antialias(model, filt_size=4).eval()
    with torch.no_grad():
        assert converted(_image(size)).shape == model(_image(size)).shape == (1, 1000)


def _subsample_transitions(model: nn.Module) -> nn.Module:
    # MaxPool2d(kernel 1, stride 2) is x[:, :, ::2, ::2]: what BlurPool(filt_size=1) computes.
    for m in model.modules():
        if hasattr(m, "pool") and isinstance(m.pool, nn.AvgPool2d):
            m.pool = nn.MaxPool2d(1, stride=2)
    return model


def _two_by_two_stem(model: nn.Module) -> nn.Module:
    # antialiased-cnns' ResNet stem pools with kernel 2 (no padding) where torchvision uses
    # MaxPool(3, 2, padding 1); with that one change, the rest is exactly equal.
    model.maxpool = nn.MaxPool2d(2, stride=2)
    return model


# With filt_size=1, BlurPool is x[::s, ::s], and a stride-s conv/max-pool equals its stride-1
# version sampled every s-th position (BatchNorm in eval mode and ReLU are pointwise, so they
# commute with the sampling). What breaks exact equality: the ResNet stem pool (kernel 2, not
# 3, as published) and DenseNet's AvgPool transitions (a box mean, not a sample), so the
# reference is adjusted there as the second element says.
@pytest.mark.parametrize("name, size, adjust", [
    ("vgg11_bn", 64, None), ("alexnet", 128, None), ("mobilenet_v2", 64, None),
    ("resnet18", 64, _two_by_two_stem), ("resnet50", 64, _two_by_two_stem),
    ("densenet121", 64, _subsample_transitions),
])
def test_filt_size_1_with_copied_weights_computes_the_original_function(name, size, adjust):
    model = _seeded(name)
    converted = antialias(model, filt_size=1, copy_weights=True).eval()
    reference = adjust(model) if adjust else model
    x = _image(size)
    with torch.no_grad():
        expected, got = reference(x), converted(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_resnet_stem_differs_from_torchvision_as_published():
    model = _seeded("resnet18")
    converted = antialias(model, filt_size=1)
    with torch.no_grad():
        assert not torch.allclose(converted(_image(64)), model(_image(64)), atol=1e-3)


def test_copy_weights_false_reinitialises_parameters():
    model = _seeded("resnet18")
    converted = antialias(model, filt_size=4, copy_weights=False)
    assert not torch.equal(converted.conv1.weight, model.conv1.weight)
    assert torch.equal(converted.bn1.running_var, torch.ones(64))  # default statistics
    assert torch.allclose(converted.maxpool[1].filt[0, 0], binomial_filter(4))


def test_pad_type_reaches_every_blurpool():
    with torch.device("meta"):
        converted = antialias(torchvision.models.resnet18(), pad_type="circular", filt_size=5)
    pools = [m for m in converted.modules() if isinstance(m, BlurPool)]
    assert len(pools) == 7
    assert all(p.pad_type == "circular" and p.filt_size == 5 for p in pools)


# -- generic fallback ---------------------------------------------------------------------------

def test_generic_sequential_gets_the_three_rules():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AvgPool2d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = antialias(model, filt_size=3)
    kinds = [type(m).__name__ for m in converted]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "BlurPool", "MaxPool2d", "BlurPool",
                     "Conv2d", "ReLU", "BlurPool"]
    assert converted[0].stride == (1, 1) and converted[4].stride == 1
    blurs = [(converted[i].channels, converted[i].stride) for i in (3, 5, 8)]
    assert blurs == [(8, 2), (8, 2), (16, 2)]
    assert converted.shiftlab_unconverted == []
    assert converted(torch.randn(1, 3, 32, 32)).shape == model(torch.randn(1, 3, 32, 32)).shape


def test_generic_conversion_with_filt_size_1_keeps_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 4, 3, stride=3)).eval()
    converted = antialias(model, filt_size=1)
    x = torch.randn(2, 3, 37, 37)
    assert torch.allclose(converted(x), model(x), atol=1e-5)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)           # outside a Sequential: channel count unknown
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 4, 1), nn.LPPool2d(2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv(x)))


def test_unconvertible_modules_are_reported_with_a_warning():
    with pytest.warns(UserWarning, match="could not convert"):
        converted = antialias(_Custom(), filt_size=2)
    assert converted.shiftlab_unconverted == ["pool", "head.0", "head.2"]
    assert isinstance(converted.conv[1], BlurPool) and converted.conv[0].stride == (1, 1)
    assert converted(torch.randn(1, 3, 32, 32)).shape == (1, 4, 2, 2)


def test_arch_override_and_errors():
    with torch.device("meta"):
        resnet = torchvision.models.resnet18()
    with pytest.warns(UserWarning, match="maxpool"):
        generic = antialias(resnet, arch="generic")
    assert generic.shiftlab_unconverted == ["maxpool"]  # a direct child of ResNet, not a Sequential
    with pytest.raises(UsageError, match="arch must be one of"):
        antialias(resnet, arch="inception")
    with pytest.raises(ModelError, match="'vgg' layout"):
        antialias(resnet, arch="vgg")
    with pytest.raises(UsageError, match="1..7"):
        antialias(resnet, filt_size=9)
