"""LayerCapture: which layers are watched, how they are named, and hooks always removed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from shiftlab.equivariance.capture import LayerCapture, flatten_output, layer_module, select_modules
from shiftlab.errors import UsageError

from conftest import Twice


def _nested() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
        nn.MaxPool2d(2),
    ).eval()


class _Composite(nn.Module):
    """A module with children that asks to be watched as one layer."""

    shiftlab_layer = True

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.pool = nn.AvgPool2d(3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.pad(x))


class BlurPool(nn.Module):  # the class name alone marks it as one layer
    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ReflectionPad2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(x)[..., ::2, ::2]


def _all_hooks_removed(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _names_seen(model: nn.Module, x: torch.Tensor, layers=None) -> list[str]:
    seen: list[str] = []
    with LayerCapture(model, layers, on_output=lambda name, t: seen.append(name)):
        model(x)
    return seen


# -- selection ------------------------------------------------------------------------------
def test_default_selection_is_every_leaf_module_in_registration_order():
    assert list(select_modules(_nested())) == ["0", "1.0", "1.1", "2"]


def test_a_module_marked_shiftlab_layer_is_one_leaf_and_its_children_are_not_watched():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), _Composite(), nn.ReLU())
    assert list(select_modules(model)) == ["0", "1", "2"]


def test_nested_marked_modules_are_leaves_wherever_they_sit():
    marked = type("Marked", (BlurPool,), {"shiftlab_layer": True})
    model = nn.Sequential(nn.Conv2d(3, 3, 1), marked(), nn.Sequential(marked()))
    assert list(select_modules(model)) == ["0", "1", "2.0"]


def test_a_class_name_alone_does_not_make_a_module_one_layer():
    # recognised by the marker attribute, not by the class name "BlurPool"
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BlurPool())
    assert list(select_modules(model)) == ["0", "1.pad"]


def test_shiftlab_blurpool_is_watched_as_one_layer():
    from shiftlab.models.antialias import BlurPool as RealBlurPool

    model = nn.Sequential(nn.Conv2d(3, 4, 1), RealBlurPool(4, filt_size=3, stride=2))
    assert any(True for _ in model[1].children())  # it does own a padding child
    assert list(select_modules(model)) == ["0", "1"]


def test_a_model_without_children_is_watched_as_the_single_layer_output():
    conv = nn.Conv2d(1, 2, 3)
    assert select_modules(conv) == {"output": conv}
    assert _names_seen(conv, torch.zeros(1, 1, 5, 5)) == ["output"]
    assert layer_module(conv, "output") is conv


def test_glob_patterns_can_select_non_leaf_modules():
    model = _nested()
    assert list(select_modules(model, "1")) == ["1"]
    assert list(select_modules(model, ["1", "1.*"])) == ["1", "1.0", "1.1"]
    assert list(select_modules(model, "?")) == ["0", "1", "2"]
    assert _names_seen(model, torch.zeros(1, 3, 8, 8), ["1"]) == ["1"]


def test_module_types_select_every_instance_and_mix_with_patterns():
    model = _nested()
    assert list(select_modules(model, nn.Conv2d)) == ["0", "1.1"]
    assert list(select_modules(model, [nn.MaxPool2d, "1.0"])) == ["1.0", "2"]
    assert list(select_modules(model, [nn.Sequential])) == ["1"]


def test_a_filter_that_matches_nothing_raises_usage_error_naming_example_modules():
    with pytest.raises(UsageError) as info:
        select_modules(_nested(), ["features.*", nn.BatchNorm2d])
    message = str(info.value)
    assert "features.*" in message and "BatchNorm2d" in message
    assert "0" in message and "1.0" in message


def test_a_filter_item_that_is_neither_pattern_nor_type_raises_usage_error():
    with pytest.raises(UsageError):
        select_modules(_nested(), ["0", 3])


# -- hook lifetime --------------------------------------------------------------------------
def test_hooks_are_removed_after_the_with_block():
    model = _nested()
    with LayerCapture(model, on_output=lambda name, t: None):
        assert not _all_hooks_removed(model)
        model(torch.zeros(1, 3, 8, 8))
    assert _all_hooks_removed(model)


def test_hooks_are_removed_when_the_forward_raises_inside_the_block():
    model = _nested()
    with pytest.raises(RuntimeError):
        with LayerCapture(model, on_output=lambda name, t: None):
            model(torch.zeros(1, 5, 8, 8))  # wrong channel count: conv raises
    assert _all_hooks_removed(model)


def test_hooks_are_removed_when_the_callback_raises():
    model = _nested()

    def explode(name: str, tensor: torch.Tensor) -> None:
        if name == "1.1":
            raise KeyError(name)

    with pytest.raises(KeyError):
        with LayerCapture(model, on_output=explode):
            model(torch.zeros(1, 3, 8, 8))
    assert _all_hooks_removed(model)


def test_a_model_run_after_the_block_no_longer_calls_back():
    model = _nested()
    seen: list[str] = []
    with LayerCapture(model, on_output=lambda name, t: seen.append(name)):
        pass
    model(torch.zeros(1, 3, 8, 8))
    assert seen == []


# -- naming ---------------------------------------------------------------------------------
def test_a_module_called_twice_gives_name_and_name_hash_2():
    torch.manual_seed(0)
    assert _names_seen(Twice().eval(), torch.zeros(1, 3, 6, 6)) == ["conv1", "relu", "conv2", "relu#2"]


def test_call_counts_restart_at_every_forward():
    torch.manual_seed(0)
    model = Twice().eval()
    per_forward: list[list[str]] = []
    with LayerCapture(model, ["relu"], on_output=lambda name, t: per_forward[-1].append(name)):
        for _ in range(3):
            per_forward.append([])
            model(torch.zeros(1, 3, 6, 6))
    assert per_forward == [["relu", "relu#2"]] * 3


def test_the_two_calls_of_a_shared_module_see_their_own_tensors():
    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}
    with LayerCapture(model, on_output=lambda name, t: seen.__setitem__(name, t.clone())):
        out = model(x)
    assert torch.equal(seen["relu"], torch.relu(model.conv1(x)))
    assert torch.equal(seen["relu#2"], out)


class _MultiOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = _Returns(lambda x: (x, 2 * x))
        self.items = _Returns(lambda x: [x + 1, (x - 1, 3 * x)])
        self.table = _Returns(lambda x: {"low": x * 0.5, "high": x * 4, "label": "not a tensor"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.pair(x)
        self.items(a)
        return self.table(a)["low"]


class _Returns(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor):
        return self.fn(x)


def test_tuple_list_and_dict_outputs_yield_one_layer_per_tensor():
    x = torch.ones(1, 1, 2, 2)
    seen: dict[str, torch.Tensor] = {}
    model = _MultiOutput()
    with LayerCapture(model, on_output=lambda name, t: seen.__setitem__(name, t.clone())):
        model(x)
    assert list(seen) == ["pair[0]", "pair[1]", "items[0]", "items[1][0]", "items[1][1]",
                          "table[low]", "table[high]"]
    assert torch.equal(seen["pair[1]"], 2 * x)
    assert torch.equal(seen["items[1][0]"], x - 1)
    assert torch.equal(seen["table[high]"], 4 * x)
    assert layer_module(model, "items[1][0]") is model.items


def test_flatten_output_indexes_a_namedtuple_like_any_tuple_and_skips_non_tensors():
    from collections import namedtuple

    Out = namedtuple("Out", ["logits", "aux"])
    t, u = torch.zeros(1), torch.ones(2)
    flat = list(flatten_output("net", Out(t, u)))
    assert [n for n, _ in flat] == ["net[0]", "net[1]"]  # SPEC: tuple elements are name[i]
    assert flat[1][1] is u
    assert list(flatten_output("net", (None, 3, "x"))) == []


def test_layer_module_strips_call_and_element_suffixes():
    model = _nested()
    assert layer_module(model, "1.1#2") is model[1][1]
    assert layer_module(model, "2[0]") is model[2]


# -- in-place ops ---------------------------------------------------------------------------
def test_a_callback_that_clones_sees_the_conv_output_before_an_inplace_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True)).eval()
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model[0](x)
    seen: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}

    def record(name: str, tensor: torch.Tensor) -> None:
        seen[name] = tensor.clone()
        kept[name] = tensor  # a reference, overwritten by the in-place ReLU

    with LayerCapture(model, on_output=record), torch.no_grad():
        model(x)
    assert torch.equal(seen["0"], expected)
    assert (seen["0"] < 0).any()
    assert (kept["0"] >= 0).all()  # why the callback must clone or reduce inside the hook
    assert torch.equal(seen["1"], expected.clamp_min(0))
