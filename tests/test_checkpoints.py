"""Tests for shiftlab.models.checkpoints: file formats as people have them, the entry holding the weights,
dtype checks, plain pickles, and the state-dict fingerprint. Tiny models, files in tmp_path."""
from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from shiftlab.models.checkpoints import is_checkpoint_path, load_checkpoint, state_dict_fingerprint
from shiftlab.errors import UsageError, WeightsError
from shiftlab.models.zoo import load_model

from conftest import assert_holds


class Net(nn.Module):
    """Conv + BatchNorm (float and integer buffers) + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def net_factory() -> nn.Module:
    """Referenced by tests as ``<this file>:net_factory``."""
    return Net()


FACTORY = f"{Path(__file__)}:net_factory"


def trained(seed: int) -> dict[str, torch.Tensor]:
    """A state dict of Net whose every float entry (BN statistics included) comes from ``seed``."""
    torch.manual_seed(seed)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 1.5)
    model.bn.num_batches_tracked.fill_(seed + 1)
    return {key: value.clone() for key, value in model.state_dict().items()}


# --- what names a checkpoint file ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["w.pth", "w.PT", "w.bin", "w.ckpt", "resnet50_lpf4.pth.tar", "w.tar",
                                  "w.safetensors", "runs/best", "./best"])
def test_checkpoint_suffixes_and_paths_name_checkpoint_files(text):
    assert is_checkpoint_path(text)


@pytest.mark.parametrize("text", ["DEFAULT", "IMAGENET1K_V1", "auto", "none", "", "w.pkl"])
def test_weights_names_do_not_name_checkpoint_files(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not is_checkpoint_path(text)


def test_an_existing_file_names_a_checkpoint_whatever_its_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "best_weights").write_bytes(b"")
    assert is_checkpoint_path("best_weights")


# --- nested dicts and key prefixes ---------------------------------------------------------------


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda sd: sd, id="bare"),
    pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict"),
    pytest.param(lambda sd: {"model": sd, "optimizer": {}, "epoch": 3}, id="model"),
    pytest.param(lambda sd: {"model_ema": sd, "epoch": 3}, id="model_ema"),
    pytest.param(lambda sd: {"ema": sd}, id="ema"),
    pytest.param(lambda sd: {"module": sd}, id="module"),
    pytest.param(lambda sd: {"model": {"module": sd}}, id="nested-twice"),
    pytest.param(lambda sd: {"checkpoint": 1, "ema": {"state_dict": sd}}, id="ema-state_dict"),
    pytest.param(lambda sd: {"module." + k: v for k, v in sd.items()}, id="dataparallel"),
    pytest.param(lambda sd: {"_orig_mod." + k: v for k, v in sd.items()}, id="compiled"),
    pytest.param(lambda sd: {"model_ema": {"_orig_mod.module." + k: v for k, v in sd.items()}}, id="both-prefixes"),
])
def test_nested_checkpoints_and_wrapper_prefixes_load_the_same_weights(tmp_path, wrap):
    state = trained(1)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(state), path)
    assert_holds(load_checkpoint(Net(), path), state)


def test_a_model_whose_own_keys_start_with_module_keeps_them(tmp_path):
    wrapper = nn.Sequential()
    wrapper.module = Net()  # keys "module.conv.weight", ...: not a DataParallel prefix here
    torch.manual_seed(3)
    source = nn.Sequential()
    source.module = Net()
    torch.save(source.state_dict(), tmp_path / "w.pth")
    assert_holds(load_checkpoint(wrapper, tmp_path / "w.pth"), source.state_dict())


def test_several_candidate_entries_without_weights_key_are_refused_listing_them(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": trained(1), "model_ema": trained(2), "epoch": 9}, path)
    with pytest.raises(WeightsError) as info:
        load_checkpoint(Net(), path)
    message = str(info.value)
    assert "several candidate state dicts ('model', 'model_ema')" in message
    assert "--weights-key" in message and "\n" not in message


@pytest.mark.parametrize("key, seed", [("model", 1), ("model_ema", 2)])
def test_weights_key_picks_the_entry(tmp_path, key, seed):
    path = tmp_path / "train.pth"
    torch.save({"model": trained(1), "model_ema": {"module": trained(2)}}, path)
    assert_holds(load_checkpoint(Net(), path, weights_key=key), trained(seed))
    loaded = load_model(FACTORY, weights=str(path), weights_key=key)
    assert_holds(loaded.model, trained(seed))


def test_weights_key_may_name_any_entry_and_is_found_below_one_wrapper(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"state_dict": {"teacher": trained(4), "student": trained(5)}}, path)
    assert_holds(load_checkpoint(Net(), path, weights_key="teacher"), trained(4))


def test_weights_key_not_in_the_file_lists_its_keys(tmp_path):
    path = tmp_path / "train.pth"
    torch.save({"model": trained(1), "model_ema": trained(2)}, path)
    with pytest.raises(WeightsError, match=r"no entry 'ema' \(its keys: 'model', 'model_ema'\)"):
        load_checkpoint(Net(), path, weights_key="ema")
    torch.save(trained(1), path)
    with pytest.raises(WeightsError, match="no entry 'ema': it is a plain state dict.*drop weights_key"):
        load_checkpoint(Net(), path, weights_key="ema")


def test_weights_key_without_a_checkpoint_path_is_a_usage_error():
    with pytest.raises(UsageError, match="weights_key 'model_ema' picks an entry of a checkpoint file"):
        load_model("squeezenet1_0", weights="none", weights_key="model_ema")


# --- safetensors ---------------------------------------------------------------------------------


def test_safetensors_file_loads_strictly(tmp_path):
    from safetensors.torch import save_file

    state = trained(6)
    save_file(state, str(tmp_path / "net.safetensors"))
    assert_holds(load_checkpoint(Net(), tmp_path / "net.safetensors"), state)
    # recognised by its header too, whatever its name
    save_file(state, str(tmp_path / "net.pth"))
    assert_holds(load_checkpoint(Net(), tmp_path / "net.pth"), state)


def test_safetensors_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    save_file(trained(6), str(tmp_path / "net.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(WeightsError, match="needs the safetensors package: pip install safetensors"):
        load_checkpoint(Net(), tmp_path / "net.safetensors")


def test_corrupt_safetensors_is_a_weights_error(tmp_path):
    path = tmp_path / "net.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_checkpoint(Net(), path)


# --- dtypes and plain pickles --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_non_float_values_for_float_entries_are_refused_naming_the_first_key(tmp_path, dtype):
    state = trained(1)
    state["conv.bias"] = state["conv.bias"].to(dtype)
    state["head.weight"] = state["head.weight"].to(dtype)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match=rf"conv\.bias is {dtype} in the checkpoint but torch\.float32 "
                                           r"in the model \(and 1 more entries\)"):
        load_checkpoint(Net(), tmp_path / "w.pth")


def test_half_precision_weights_load_as_a_cast(tmp_path):
    state = trained(1)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(half, tmp_path / "w.pth")
    model = load_checkpoint(Net(), tmp_path / "w.pth")
    assert model.conv.weight.dtype == torch.float32
    assert torch.equal(model.conv.weight, half["conv.weight"].float())


@pytest.mark.parametrize("payload", [{"a": 1}, [1, 2, 3]], ids=["dict", "list"])
@pytest.mark.parametrize("protocol", [1, 2, 4, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_file_gets_its_own_message_without_torch_warnings(tmp_path, payload, protocol):
    path = tmp_path / "w.pth"
    with path.open("wb") as handle:
        pickle.dump(payload, handle, protocol=protocol)
    for trust in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(WeightsError) as info:
                load_checkpoint(Net(), path, trust_checkpoint=trust)
        message = str(info.value)
        assert "is a plain Python pickle (pickle.dump), not a PyTorch checkpoint" in message
        assert "no pickle" not in message and "\n" not in message
        assert caught == []


@pytest.mark.parametrize("protocol", [2, 3])
def test_legacy_torch_save_format_loads_without_torch_warnings(tmp_path, protocol):
    state = trained(2)
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_holds(load_checkpoint(Net(), tmp_path / "old.pth"), state)
    assert caught == []  # torch warns in several lines about protocol 3


def test_legacy_format_with_pickle_protocol_4_needs_trust(tmp_path):
    state = trained(2)
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(WeightsError, match="legacy format with pickle protocol 4.*--trust-checkpoint"):
        load_checkpoint(Net(), tmp_path / "old.pth")
    assert_holds(load_checkpoint(Net(), tmp_path / "old.pth", trust_checkpoint=True), state)


# --- fingerprints --------------------------------------------------------------------------------


def test_fingerprint_is_equal_for_two_identically_seeded_builds():
    torch.manual_seed(0)
    first = Net()
    torch.manual_seed(0)
    second = Net()
    assert state_dict_fingerprint(first) == state_dict_fingerprint(second)
    fingerprint = state_dict_fingerprint(first)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0


def test_fingerprint_changes_when_one_weight_changes():
    torch.manual_seed(0)
    model = Net()
    before = state_dict_fingerprint(model)
    with torch.no_grad():
        model.head.weight[0, 0] += 1e-3
    assert state_dict_fingerprint(model) != before


def test_fingerprint_sees_buffers_dtypes_and_names():
    torch.manual_seed(0)
    model = Net()
    before = state_dict_fingerprint(model)
    model.bn.num_batches_tracked += 1  # an integer buffer
    assert state_dict_fingerprint(model) != before
    model.bn.num_batches_tracked -= 1
    assert state_dict_fingerprint(model) == before
    assert state_dict_fingerprint(model.double()) != before  # same values, other dtype
    renamed = nn.Sequential(Net())
    torch.manual_seed(0)
    renamed[0] = Net()
    assert state_dict_fingerprint(renamed) != before  # same tensors under other names
    assert state_dict_fingerprint(renamed[0]) == before
