"""Layer attribution under continuous translation (docs/semantics.md, section 10): the known
answers, and the result's API (names, save/load, streaming, refusals)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shiftlab
from shiftlab.attribution import REMAINDER, layer_tangents
from shiftlab.errors import ShiftlabError, UsageError

from conftest import Twice, _randomise_bn, circular_conv, make_channels_last

# tiny fixed-size classifiers: the probe's stride fallback (H/h) is what they need
pytestmark = pytest.mark.filterwarnings("ignore:the model does not accept a second input size")

AXES = ("horizontal", "vertical")
DIM = {"horizontal": -1, "vertical": -2}


# -- an independent band-limited translation and derivative (full complex FFT) -------------
def translate(x: torch.Tensor, t: float, axis: str) -> torch.Tensor:
    """T_t x(u) = x(u − t) on the periodic grid: phase ramp, real part (the Nyquist bin of an
    even length scales by cos(π·t))."""
    dim, n = DIM[axis], x.shape[DIM[axis]]
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    shape = [1] * x.dim()
    shape[dim] = n
    ramp = torch.exp(-2j * math.pi * k * t / n).reshape(shape)
    return torch.fft.ifft(torch.fft.fft(x, dim=dim) * ramp, dim=dim).real


def derivative(x: torch.Tensor, axis: str) -> torch.Tensor:
    """D x with the Nyquist bin set to 0."""
    dim, n = DIM[axis], x.shape[DIM[axis]]
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    if n % 2 == 0:
        k[n // 2] = 0
    shape = [1] * x.dim()
    shape[dim] = n
    factor = (2j * math.pi * k / n).reshape(shape)
    return torch.fft.ifft(torch.fft.fft(x, dim=dim) * factor, dim=dim).real


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- tiny networks ------------------------------------------------------------------------
def vgg_style() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5)), 0).eval()


class Block(nn.Module):
    """A ResNet basic block: the residual add and the shared ReLU are in ``forward``."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.layer1 = Block(8, 8, 1)
        self.layer2 = Block(8, 16, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)
        _randomise_bn(self, 0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))  # flatten of a 1x1 map: adds exactly 0


class DenseLayer(nn.Module):
    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(self.relu(self.norm(x)))], 1)


class DenseNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dense = nn.Sequential(DenseLayer(8, 4), DenseLayer(12, 4))
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1),
                                        nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
        _randomise_bn(self, 0)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.transition(self.dense(self.stem(x))))


def circular_classifier() -> nn.Module:
    """Known answer 3: circular stride-1 convs, BatchNorm(eval), a ReLU, a global average pool."""
    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        circular_conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), circular_conv(8, 8), nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), 0).eval()


def images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1),
                       dtype=torch.float64)


# -- known answers ------------------------------------------------------------------------
@pytest.mark.parametrize("make", [vgg_style, ResNetStyle, DenseNetStyle],
                         ids=["vgg", "resnet", "densenet"])
def test_layer_tangents_add_up_to_the_total_derivative(make):
    """(1) Σ v_i = L F in float64: residual adds and torch.cat add nothing of their own."""
    net = make().double()
    for axis in AXES:
        tangents = layer_tangents(net, images(), axis=axis)
        summed = sum(tangents.layers.values())
        assert float(tangents.total.norm()) > 1e-6
        assert relative(summed, tangents.total) < 1e-6
        assert relative(summed + tangents.remainder, tangents.total) < 1e-12
        assert float(tangents.remainder.norm() / tangents.total.norm()) < 1e-10


def test_total_derivative_of_a_classifier_is_a_central_difference_of_the_translation():
    """(2) L F = d/dt F(T_t x) at 0 for logits."""
    net, x, eps = vgg_style().double(), images(), 1e-5
    for axis in AXES:
        total = layer_tangents(net, x, axis=axis).total
        with torch.no_grad():
            difference = (net(translate(x, eps, axis)) - net(translate(x, -eps, axis))) / (2 * eps)
        assert relative(total, difference) < 1e-5


def test_total_derivative_of_a_spatial_output_undoes_the_shift_at_its_stride():
    """(2) For an output of stride s: L F = d/dt T_{−t/s} F(T_t x) at 0."""
    torch.manual_seed(0)
    net = nn.Sequential(circular_conv(3, 8), nn.ReLU(), nn.MaxPool2d(2),
                        circular_conv(8, 4)).double().eval()
    x, eps = images(), 1e-5
    for axis in AXES:
        total = layer_tangents(net, x, axis=axis).total
        assert total.shape == (2, 4, 8, 8)
        with torch.no_grad():
            forward = translate(net(translate(x, eps, axis)), -eps / 2, axis)
            backward = translate(net(translate(x, -eps, axis)), eps / 2, axis)
        assert relative(total, (forward - backward) / (2 * eps)) < 1e-5


def test_circular_convs_batchnorm_and_global_pool_add_nothing():
    """(3) Stride-1 circular convs (also after a stride-2 pool, at stride 2), BatchNorm(eval),
    the global average pool: v_i = 0; the ReLU and the max-pool carry the whole derivative."""
    torch.manual_seed(0)
    net = _randomise_bn(nn.Sequential(
        circular_conv(3, 8), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), circular_conv(8, 8),
        nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), 0)
    net = net.double().eval()
    for axis in AXES:
        tangents = layer_tangents(net, images(), axis=axis)
        scale = float(tangents.total.norm())
        assert scale > 1e-6
        for name, v in tangents.layers.items():
            if name not in ("2", "3"):
                assert float(v.norm()) <= 1e-10 * scale, name
        assert float(tangents.layers["2"].norm()) > 1e-3 * scale  # ReLU
        assert float(tangents.layers["3"].norm()) > 1e-3 * scale  # max-pool
        assert relative(tangents.layers["2"] + tangents.layers["3"], tangents.total) < 1e-10


def test_relu_aliases_under_continuous_translation_but_not_under_integer_shifts():
    """(4) ReLU commutes with every torch.roll exactly, yet its v_i is not zero."""
    net = circular_classifier().double()
    seen = {}
    handle = net[2].register_forward_hook(lambda m, args, out: seen.update(x=args[0].clone()))
    try:
        with torch.no_grad():
            net(images())
    finally:
        handle.remove()
    before = seen["x"]
    for dims in ((-1,), (-2,)):
        for k in range(before.shape[-1]):
            assert torch.equal(F.relu(torch.roll(before, k, dims)), torch.roll(F.relu(before), k, dims))
    result = shiftlab.attribute(net, images(), dtype="float64", progress=False)
    relu = result.layer_names.index("2")
    assert (result.norms[:, relu] > 1e-3 * result.total).all()
    np.testing.assert_allclose(result.shares[:, relu], 1.0, atol=1e-10)


class FlattenInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu, self.fc = circular_conv(3, 4), nn.ReLU(), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


class ReluInForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = circular_conv(3, 4), circular_conv(4, 4)
        self.tail = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.conv2(F.relu(self.conv1(x))))


def test_flatten_of_a_spatial_map_is_the_remainder():
    """(5) torch.flatten's own Lie derivative, −flatten(D h) carried through the classifier."""
    net = FlattenInForward().double().eval()
    x = images(size=8)
    for axis in AXES:
        tangents = layer_tangents(net, x, axis=axis)
        with torch.no_grad():
            h = net.relu(net.conv(x))
            expected = -torch.flatten(derivative(h, axis), 1) @ net.fc.weight.T
        assert float(expected.norm()) > 1e-6
        assert relative(tangents.remainder, expected) < 1e-10


def test_relu_in_forward_is_the_remainder():
    """(5) F.relu in forward: D relu(h) − relu'(h)·D h, carried through conv2 and the head."""
    net = ReluInForward().double().eval()
    x = images()
    for axis in AXES:
        tangents = layer_tangents(net, x, axis=axis)
        with torch.no_grad():
            h = net.conv1(x)
            own = derivative(F.relu(h), axis) - (h > 0).double() * derivative(h, axis)
            rest = lambda y: net.tail(net.conv2(y))  # noqa: E731
            _, expected = torch.func.jvp(rest, (F.relu(h),), (own,))
        assert float(expected.norm()) > 1e-6
        assert relative(tangents.remainder, expected) < 1e-10


# -- the result ---------------------------------------------------------------------------
def test_shares_and_remainder_add_up_to_one_per_image():
    net = ResNetStyle()
    result = shiftlab.attribute(net, images().float(), progress=False)  # float32, both axes
    assert result.shares.shape == result.norms.shape == (2, len(result.layers))
    np.testing.assert_allclose(result.shares.sum(1) + result.remainder_share, 1.0, atol=1e-9)
    summary = result.summary()
    assert summary["layer"].iloc[-1] == REMAINDER
    assert summary["cumulative_share"].iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert list(summary["layer"][:-1]) == result.layer_names
    frame = result.to_frame()
    assert len(frame) == 2 * (len(result.layers) + 1)
    np.testing.assert_allclose(frame.groupby("image")["share"].sum(), 1.0, atol=1e-9)
    assert (result.lee > 0).all() and (result.total > 0).all()


def test_lee_is_the_mean_absolute_derivative_of_the_probabilities():
    net, x = vgg_style().double(), images()
    result = shiftlab.attribute(net, x, axis="vertical", dtype="float64", progress=False)
    derivative_p = layer_tangents(net, x, axis="vertical", output="probabilities").total
    np.testing.assert_allclose(result.lee, derivative_p.abs().mean(1).numpy(), rtol=1e-10)


def test_probability_space_tangents_add_up_too():
    net, x = ResNetStyle().double(), images()
    logits = layer_tangents(net, x, axis="horizontal")
    tangents = layer_tangents(net, x, axis="horizontal", output="probabilities")
    p = torch.softmax(logits.output, 1)
    assert relative(tangents.total, p * (logits.total - (p * logits.total).sum(1, keepdim=True))) < 1e-12
    assert relative(sum(tangents.layers.values()), tangents.total) < 1e-6
    result = shiftlab.attribute(net, x, output="probabilities", dtype="float64", progress=False)
    assert np.abs(result.remainder_share).max() < 1e-10


def test_shared_module_gives_one_layer_per_call():
    result = shiftlab.attribute(Twice().eval(), images().float(), axis="horizontal",
                                progress=False)
    assert result.layer_names == ["conv1", "relu", "conv2", "relu#2"]
    assert np.abs(result.remainder_share).max() < 1e-5


class Split(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.relu(x), F.gelu(x)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.split = circular_conv(3, 4), Split()
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.split(self.conv(x))
        return self.head(a + b)


def test_tuple_output_layer_is_one_call_with_every_element_injected():
    net = TupleNet().double().eval()
    tangents = layer_tangents(net, images(), axis="horizontal")
    assert list(tangents.layers) == ["conv", "split", "head.0", "head.1", "head.2"]
    assert tangents.infos[1].module == "Split"
    assert float(tangents.layers["split"].norm()) > 1e-6
    assert float(tangents.remainder.norm() / tangents.total.norm()) < 1e-10  # both elements


def test_channels_last_layers_are_moved_along_their_own_axes():
    """(N, H, W, C) maps are differentiated along H and W: the permutes and the per-pixel
    Linears commute with D (v = 0); LayerNorm and GELU are pointwise nonlinear (v ≠ 0)."""
    net = make_channels_last().double()  # circular conv, then LayerNorm/Linear/GELU on (N, H, W, C)
    tangents = layer_tangents(net, images(size=12), axis="vertical")
    kinds = {info.name: (info.layout, info.stride) for info in tangents.infos}
    assert kinds["2"] == ("nhwc", (1.0, 1.0)) and kinds["3"] == ("nhwc", (1.0, 1.0))
    scale = float(tangents.total.norm())
    for name in ("0", "1", "3", "5", "6", "7"):
        assert float(tangents.layers[name].norm()) <= 1e-10 * scale, name
    assert float(tangents.layers["2"].norm()) > 1e-3 * scale  # LayerNorm
    assert float(tangents.layers["4"].norm()) > 1e-3 * scale  # GELU
    assert float(tangents.remainder.norm()) <= 1e-10 * scale


def test_streamed_batches_give_the_numbers_of_one_batch():
    net, x = vgg_style(), images(4).float()
    whole = shiftlab.attribute(net, x, dtype="float64", progress=False)
    streamed = shiftlab.attribute(net, [x[:3], x[3:]], dtype="float64", batch_size=2,
                                  progress=False)
    assert streamed.n_images == 4 and streamed.provenance.n_images == 4
    for name in ("norms", "shares", "total", "remainder_norm", "lee"):
        np.testing.assert_allclose(getattr(streamed, name), getattr(whole, name), rtol=1e-10,
                                   atol=1e-14)
    assert next(net.parameters()).dtype == torch.float32  # the float64 run used a copy


def test_save_and_load_round_trip(tmp_path):
    result = shiftlab.attribute(vgg_style(), images().float(), axis="horizontal",
                                progress=False).with_label("tiny")
    loaded = shiftlab.load_attribution(result.save(tmp_path / "result.npz"))
    assert loaded.settings == result.settings and loaded.layers == result.layers
    assert loaded.label == "tiny" and loaded.provenance == result.provenance
    for name in ("norms", "shares", "total", "remainder_norm", "remainder_share", "lee"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
    assert repr(loaded) == "AttributionResult(tiny: 9 layers, axis horizontal, logits, 2 images)"


def test_damaged_or_foreign_files_are_refused_in_one_line(tmp_path):
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    heatmap = shiftlab.measure(vgg_style(), images().float(), shiftlab.ShiftGrid.square(2),
                               progress=False).save(tmp_path / "heatmap.npz")
    for path in (damaged, heatmap, tmp_path / "missing.npz"):
        with pytest.raises(ShiftlabError) as error:
            shiftlab.load_attribution(path)
        assert "\n" not in str(error.value)


def test_nested_layer_selection_is_refused():
    with pytest.raises(UsageError, match="nested") as error:
        shiftlab.attribute(ResNetStyle(), images().float(), layers=["layer1", "layer1.conv1"],
                           progress=False)
    assert "\n" not in str(error.value)


def test_unselected_modules_land_in_the_remainder():
    net, x = ResNetStyle().double(), images()
    tangents = layer_tangents(net, x, axis="horizontal", layers=["layer2", "fc"])
    assert list(tangents.layers) == ["layer2", "fc"]
    full = layer_tangents(net, x, axis="horizontal")
    before = sum(v for name, v in full.layers.items() if name.startswith(("stem", "layer1")))
    assert relative(tangents.remainder, before) < 1e-10


class _NoForwardMode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


class Doubling(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NoForwardMode.apply(x)


def test_an_op_without_forward_mode_derivative_is_named_in_one_line():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), Doubling(), nn.Flatten()).eval()
    with pytest.raises(UsageError, match=r"module 1 \(Doubling\)") as error:
        shiftlab.attribute(net, images().float(), progress=False)
    assert "\n" not in str(error.value)


def test_pipeline_run_fills_the_provenance():
    result = shiftlab.runs.attribute("resnet18", weights="none", size=32, max_images=2,
                                     axis="horizontal", layers="layer4.1.*", progress=False)
    assert result.provenance.model == "resnet18" and result.provenance.n_images == 2
    assert result.settings.size == (32, 32) and result.settings.layers == ("layer4.1.*",)
    assert result.layer_names[0] == "layer4.1.conv1"
    np.testing.assert_allclose(result.shares.sum(1) + result.remainder_share, 1.0, atol=1e-9)


def test_request_is_validated_when_built():
    spec = shiftlab.ModelSpec("vgg11", weights="none")
    assert shiftlab.AttributionRequest(spec, layers="features.*").selection == ["features.*"]
    with pytest.raises(UsageError, match="axis"):
        shiftlab.AttributionRequest(spec, axis="diagonal")
    with pytest.raises(UsageError, match="dtype"):
        shiftlab.AttributionRequest(spec, dtype="bfloat16")
