"""probe_layers: execution order, spatial vs. global, and the measured stride."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from shiftlab.errors import ModelError
from shiftlab.equivariance.geometry import LayerInfo, probe_layers


def _mixed_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),             # 0: stride 1
        nn.MaxPool2d(2),                           # 1: stride 2
        nn.Conv2d(4, 6, 3, stride=2, padding=1),   # 2: stride 4
        nn.Upsample(scale_factor=2),               # 3: back to stride 2
        nn.AdaptiveAvgPool2d(1),                   # 4: global
        nn.Flatten(),                              # 5: global
        nn.Linear(6, 5),                           # 6: global
    ).eval()


def test_probe_reports_kind_stride_and_shape_of_each_layer():
    infos = probe_layers(_mixed_net(), (16, 16))
    assert [i.name for i in infos] == ["0", "1", "2", "3", "4", "5", "6"]
    assert [i.module for i in infos] == ["Conv2d", "MaxPool2d", "Conv2d", "Upsample",
                                         "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert [i.kind for i in infos] == ["spatial"] * 4 + ["global"] * 3
    assert [i.stride for i in infos[:4]] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (2.0, 2.0)]
    assert [i.integer_stride for i in infos[:4]] == [(1, 1), (2, 2), (4, 4), (2, 2)]
    for info in infos[4:]:
        assert all(math.isnan(v) for v in info.stride)
        assert info.integer_stride is None and not info.is_spatial
    assert [i.shape for i in infos] == [(4, 16, 16), (4, 8, 8), (6, 4, 4), (6, 8, 8), (6, 1, 1),
                                        (6,), (5,)]


def test_probe_measures_strides_per_axis_on_a_rectangular_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, stride=(2, 1), padding=1), nn.MaxPool2d((1, 4))).eval()
    infos = probe_layers(net, (8, 12))
    assert infos[0].stride == (2.0, 1.0) and infos[0].shape == (2, 4, 12)
    assert infos[1].stride == (2.0, 4.0) and infos[1].shape == (2, 4, 3)


def test_an_upsampling_layer_has_a_stride_below_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Upsample(scale_factor=4)).eval()
    up = probe_layers(net, (8, 8))[1]
    assert up.kind == "spatial"
    assert up.stride == (0.25, 0.25)
    assert up.integer_stride is None


class _CalledOutOfOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)      # registered first, called last
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.body(x)).flatten(1))


def test_layers_are_listed_in_execution_order_not_registration_order():
    torch.manual_seed(0)
    model = _CalledOutOfOrder().eval()
    assert [name for name, _ in model.named_children()] == ["head", "body", "pool"]
    assert [i.name for i in probe_layers(model, (8, 8))] == ["body", "pool", "head"]


def test_probe_respects_a_layer_filter():
    infos = probe_layers(_mixed_net(), (16, 16), layers=[nn.Conv2d])
    assert [(i.name, i.stride) for i in infos] == [("0", (1.0, 1.0)), ("2", (4.0, 4.0))]


def test_probe_leaves_no_hooks_on_the_model():
    model = _mixed_net()
    probe_layers(model, (16, 16))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_alexnet_conv1_stride_is_four_although_224_over_55_is_not():
    import torchvision

    model = torchvision.models.alexnet(weights=None).eval()
    (conv1,) = probe_layers(model, (224, 224), layers="features.0")
    assert conv1.shape == (64, 55, 55)
    assert 224 / 55 != 4
    assert conv1.stride == (4.0, 4.0)
    assert conv1.measured_stride == (4.0, 4.0)


def test_vgg11_pools_have_strides_2_4_8_16_32():
    import torchvision

    model = torchvision.models.vgg11(weights=None).eval()
    infos = probe_layers(model, (64, 64), layers=[nn.MaxPool2d])
    assert [i.name for i in infos] == ["features.2", "features.5", "features.10", "features.15",
                                      "features.20"]
    assert [i.stride for i in infos] == [(2.0, 2.0), (4.0, 4.0), (8.0, 8.0), (16.0, 16.0),
                                        (32.0, 32.0)]


def test_a_size_too_small_for_the_model_raises_a_one_line_model_error_naming_the_size():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 5), nn.Conv2d(4, 4, 5)).eval()
    with pytest.raises(ModelError) as info:
        probe_layers(net, (5, 6))
    message = str(info.value)
    assert "\n" not in message
    assert "5x6" in message
    assert all(not m._forward_hooks for m in net.modules())


class _FixedSize(nn.Module):
    """Accepts 16x16 inputs only (a Linear on the flattened feature map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.conv(x))))


def test_a_fixed_size_model_falls_back_to_the_size_ratio_with_a_warning():
    torch.manual_seed(0)
    model = _FixedSize().eval()
    with pytest.warns(UserWarning, match="input size / feature size"):
        infos = probe_layers(model, (16, 16))
    by_name = {i.name: i for i in infos}
    assert by_name["conv"].stride == (2.0, 2.0) and by_name["conv"].kind == "spatial"
    assert by_name["pool"].stride == (4.0, 4.0)
    assert by_name["flatten"].kind == "global" and by_name["fc"].kind == "global"
    assert all(not m._forward_hooks for m in model.modules())


def test_the_size_ratio_fallback_snaps_an_alexnet_like_ratio_to_the_whole_stride():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 2, 11, stride=4, padding=2)  # 64 px -> 15 px: ratio 4.27
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(2 * 15 * 15, 3)).eval()
    with pytest.warns(UserWarning):
        first = probe_layers(model, (64, 64))[0]
    assert first.shape == (2, 15, 15)
    assert first.stride == (4.0, 4.0)
    assert first.measured_stride == pytest.approx((64 / 15, 64 / 15))


def test_a_model_accepting_both_sizes_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probe_layers(_mixed_net(), (16, 16))


def test_a_layer_filter_matching_nothing_raises_usage_error_not_model_error():
    from shiftlab.errors import UsageError

    with pytest.raises(UsageError, match="matches no module"):
        probe_layers(_mixed_net(), (16, 16), layers="features.*")


def test_layer_info_round_trips_through_a_dict():
    info = LayerInfo("features.3", "Conv2d", "spatial", (2.0, 4.0), (2.0, 4.07), (8, 5, 3))
    again = LayerInfo.from_dict(info.to_dict())
    assert again == info
    assert again.integer_stride == (2, 4)


def test_a_fixed_size_stride_keeps_the_previous_stride_when_it_covers_the_map():
    from shiftlab.equivariance.geometry import _fixed_size_stride

    # 32 px, a 7x7 map after a stride-4 layer: 32/7 rounds to 5, but 4 covers it (|32 - 28| <= 8)
    assert _fixed_size_stride((7, 7), (32, 32), previous=(4.0, 4.0)) == (4.0, 4.0)
    assert _fixed_size_stride((8, 8), (32, 32)) == (4.0, 4.0)
