"""Dense models (the output is a map): torchvision's segmentation names, the model's own output
as a layer, known answers for maps, and antialiased dilated backbones (issue 27, first part)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights

import shiftlab
from shiftlab.equivariance.capture import LayerCapture
from shiftlab.errors import UsageError
from shiftlab.models import pretrained
from shiftlab.models.antialias import BlurPool
from shiftlab.models.segmentation import segmentation_model_names
from shiftlab.models.variants import load_variant
from shiftlab.models.zoo import PretrainedUnavailableWarning, list_model_names, load_model

from conftest import _randomise_bn, conv_stack

SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "deeplabv3_resnet101", "deeplabv3_resnet50",
                "fcn_resnet101", "fcn_resnet50", "lraspp_mobilenet_v3_large"]


class _DenseHeads(nn.Module):
    """Circular convs without striding, two 1x1 heads upsampled by F.interpolate in forward
    (as torchvision's segmentation models do): {'out': (N, 5, H, W), 'aux': (N, 2, H, W)}."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_stack("circular"))
        self.head = nn.Conv2d(8, 5, 1)
        self.aux_head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.body(x)
        size = x.shape[-2:]
        return {"out": F.interpolate(self.head(features), size=size, mode="bilinear"),
                "aux": F.interpolate(self.aux_head(features), size=size, mode="bilinear")}


class _PoolUpsample(nn.Module):
    """Circular convs, one MaxPool2d(2), a circular conv, nn.Upsample(2, nearest): {'out': map}."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_stack("circular"), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 4, 3, padding=1, padding_mode="circular"),
                                  nn.Upsample(scale_factor=2, mode="nearest"))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body(x)}


def _dense_heads() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(_DenseHeads(), 0).eval()


def _pool_upsample() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(_PoolUpsample(), 0).eval()


def _images(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def _measure(model: nn.Module, images: torch.Tensor, k: int, **options) -> shiftlab.Result:
    return shiftlab.measure(model, images, shiftlab.ShiftGrid.square(k), device="cpu",
                            progress=False, **options)


# -- the model's own output ------------------------------------------------------------------
def test_a_dict_output_upsampled_in_forward_is_measured_as_output_layers_at_stride_1():
    result = _measure(_dense_heads(), _images(16), 2)
    assert result.layer_names[-2:] == ["output[out]", "output[aux]"]
    for name, channels in (("output[out]", 5), ("output[aux]", 2)):
        info = result.layer(name)
        assert (info.kind, info.stride, info.shape) == ("spatial", (1.0, 1.0), (channels, 16, 16))


def test_an_output_tensor_a_module_returned_is_not_counted_twice():
    seen: list[str] = []
    model = _pool_upsample()
    with LayerCapture(model, on_output=lambda name, tensor: seen.append(name)):
        model(_images(16))
    assert seen[-1] == "body.8"  # the Upsample; the dict's 'out' is that very tensor
    assert not [name for name in seen if name.startswith("output")]


class _FlattenAtRoot(nn.Module):
    """A classifier whose forward flattens: its output is a new tensor, but not a map."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(x), 1)


def test_an_output_that_is_not_a_map_is_not_a_layer():
    seen: list[str] = []
    model = _FlattenAtRoot().eval()
    with LayerCapture(model, on_output=lambda name, tensor: seen.append(name)):
        model(_images(8))
    assert seen == ["net.0", "net.1"]


def test_an_explicit_layer_filter_leaves_the_output_out():
    result = _measure(_dense_heads(), _images(16), 2, layers="head")
    assert result.layer_names == ["head"]


# -- known answers -----------------------------------------------------------------------------
def test_circular_stride_1_dense_net_is_exactly_equivariant_at_every_shift_and_layer():
    result = _measure(_dense_heads(), _images(16), 4)
    assert all(info.stride == (1.0, 1.0) for info in result.layers)
    assert np.isfinite(result.mean).all()
    assert result.mean.max() <= 1e-6


def test_maxpool_then_nearest_upsampling_is_exact_at_even_shifts_only():
    result = _measure(_pool_upsample(), _images(16), 4, align="exact")
    output = result.layers[-1]
    assert (output.name, output.module, output.stride) == ("body.8", "Upsample", (1.0, 1.0))
    distances = result.map("body.8")
    even = (np.arange(4)[:, None] % 2 == 0) & (np.arange(4)[None, :] % 2 == 0)
    assert distances[even].max() <= 1e-6
    assert distances[~even].min() > 1e-3
    pooled = result.map("body.6")  # stride 2: exact alignment is undefined at odd shifts
    assert pooled[even].max() <= 1e-6 and np.isnan(pooled[~even]).all()


# -- torchvision's segmentation names ---------------------------------------------------------
def test_segmentation_names_are_listed_with_the_classifiers():
    names = list_model_names()
    assert segmentation_model_names() == SEGMENTATION
    assert set(SEGMENTATION) <= set(names) and "resnet18" in names and names == sorted(names)


@pytest.mark.parametrize("wrong, expected", [("deeplabv3_resnet5", "deeplabv3_resnet50"),
                                             ("lraspp_mobilenet_v3", "lraspp_mobilenet_v3_large"),
                                             ("resnt18", "resnet18")])
def test_unknown_names_suggest_close_names(wrong, expected):
    with pytest.raises(UsageError, match=f"unknown model '{wrong}'; did you mean {expected}"):
        load_model(wrong, weights="none")


def test_lraspp_loads_with_random_init_and_gives_its_output_at_stride_1():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning, no download of the backbone's weights
        loaded = load_model("lraspp_mobilenet_v3_large", weights="none", num_classes=3)
    assert (loaded.weights, loaded.pretrained, loaded.categories) == ("random init", False, None)
    result = _measure(loaded.model, _images(32, 1), 2)
    layers = {info.name: info for info in result.layers}
    output = result.layers[-1]
    assert (output.name, output.stride, output.shape) == ("output[out]", (1.0, 1.0), (3, 32, 32))
    assert layers["backbone.16.0"].stride == (16.0, 16.0)  # dilated last stage: 16, not 32
    assert np.isfinite(result.mean).all()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache, offline, where downloading anything fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "1")

    def no_download(*args, **kwargs):
        pytest.fail("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_auto_weights_fall_back_to_random_init_when_not_cached(hub):
    with pytest.warns(PretrainedUnavailableWarning, match="random init.*lraspp_mobilenet_v3_large-"):
        loaded = load_model("lraspp_mobilenet_v3_large")
    assert (loaded.weights, loaded.pretrained) == ("random init", False)


def test_cached_default_weights_load_with_their_classes(hub):
    torch.manual_seed(1)
    trained = load_model("lraspp_mobilenet_v3_large", weights="none").model
    default = LRASPP_MobileNet_V3_Large_Weights.DEFAULT
    pretrained.cache_file(default).parent.mkdir(parents=True)
    torch.save(trained.state_dict(), pretrained.cache_file(default))
    loaded = load_model("lraspp_mobilenet_v3_large")
    assert (loaded.weights, loaded.pretrained) == ("COCO_WITH_VOC_LABELS_V1", True)
    assert len(loaded.categories) == 21 and loaded.categories[0] == "__background__"
    assert torch.equal(loaded.model.classifier.low_classifier.weight,
                       trained.classifier.low_classifier.weight)
    with pytest.raises(UsageError, match="num_classes=3 conflicts"):
        load_model("lraspp_mobilenet_v3_large", weights="COCO_WITH_VOC_LABELS_V1", num_classes=3)


def test_a_checkpoint_with_an_auxiliary_head_loads_into_the_model_with_it(tmp_path):
    import torchvision

    torch.manual_seed(0)
    trained = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights_backbone=None,
                                           num_classes=4, aux_loss=True)
    torch.save({"model": trained.state_dict()}, tmp_path / "deeplab.pth")
    loaded = load_model("deeplabv3_mobilenet_v3_large", weights=str(tmp_path / "deeplab.pth"),
                        num_classes=4)
    assert loaded.pretrained and torch.equal(loaded.model.aux_classifier[4].weight,
                                             trained.aux_classifier[4].weight)
    with torch.no_grad():
        output = loaded.model(_images(32, 1))
    assert {key: tuple(value.shape) for key, value in output.items()} == {
        "out": (1, 4, 32, 32), "aux": (1, 4, 32, 32)}


# -- antialiasing ------------------------------------------------------------------------------
def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [module for module in model.modules() if isinstance(module, nn.Conv2d)]


def test_antialiased_deeplabv3_keeps_its_dilations_and_loads_a_baseline_checkpoint(tmp_path):
    torch.manual_seed(0)
    baseline = load_model("deeplabv3_resnet50", weights="none").model
    torch.save(baseline.state_dict(), tmp_path / "baseline.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unconverted
        loaded = load_variant("deeplabv3_resnet50+aa4", weights=str(tmp_path / "baseline.pth"))
    model = loaded.model
    assert (loaded.name, loaded.weights) == ("deeplabv3_resnet50+aa4", str(tmp_path / "baseline.pth"))

    # the dilated stages are left alone: same dilations, no BlurPool; the strided convs of the
    # stem pool and layer2 became stride 1 + BlurPool (conv1 stays strided, as in antialiased-cnns)
    assert [conv.dilation for conv in _convs(model)] == [conv.dilation for conv in _convs(baseline)]
    dilations = [[conv.dilation for conv in _convs(layer) if conv.kernel_size == (3, 3)]
                 for layer in (model.backbone.layer3, model.backbone.layer4)]
    assert dilations == [[(1, 1)] + [(2, 2)] * 5, [(2, 2), (4, 4), (4, 4)]]
    assert [name for name, conv in model.named_modules()
            if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1)] == ["backbone.conv1"]
    blurs = [name for name, module in model.named_modules() if isinstance(module, BlurPool)]
    assert blurs == ["backbone.maxpool.1", "backbone.layer2.0.conv3.0", "backbone.layer2.0.downsample.0"]

    # every weight and BatchNorm statistic of the baseline checkpoint, in the converted model
    def tensors(net: nn.Module) -> list[torch.Tensor]:
        return list(net.parameters()) + [b for n, b in net.named_buffers() if not n.endswith("filt")]

    assert all(torch.equal(a, b) for a, b in zip(tensors(model), tensors(baseline), strict=True))
    with torch.no_grad():
        assert model.backbone(_images(32, 1))["out"].shape == (1, 2048, 4, 4)  # still stride 8
