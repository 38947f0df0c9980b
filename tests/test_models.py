"""Tests for shiftlab.models.zoo: model specs, pretrained weights offline (shiftlab.models.pretrained), and
checkpoint loading through load_model (the file formats themselves: tests/test_checkpoints.py)."""
from __future__ import annotations

import socket
import sys
import textwrap
import threading
import urllib.error
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from shiftlab.models import pretrained, zoo as models
from shiftlab.errors import ModelError, UsageError, WeightsError
from shiftlab.models.zoo import LoadedModel, PretrainedUnavailableWarning, list_model_names, load_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
SQUEEZE_FILE = "squeezenet1_0-b66bff10.pth"  # the file name in SqueezeNet1_0_Weights.IMAGENET1K_V1.url


class TinyNet(nn.Module):
    """Small enough to save and load in milliseconds; has a buffer-carrying BatchNorm."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def tiny_factory(num_classes: int = 5) -> nn.Module:
    """Referenced by tests as ``<this file>:tiny_factory``."""
    return TinyNet(num_classes)


THIS_FILE_FACTORY = str(Path(__file__)) + ":tiny_factory"

USER_MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def factory(num_classes=3):
        return nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, num_classes))

    def broken():
        raise ValueError("depth must be even")

    def not_a_model():
        return 42
    """
)

# A checkpoint payload that records whether it was unpickled: harmless, but it runs code on load,
# which is exactly what weights_only=True must refuse.
MARKER_MODULE = textwrap.dedent(
    """
    from pathlib import Path

    class Note:
        def __init__(self, text):
            self.text = text

    def make_note(marker):
        Path(marker).write_text("unpickled")
        return Note("hello")

    class Payload:
        def __init__(self, marker):
            self.marker = marker

        def __reduce__(self):
            return (make_note, (self.marker,))
    """
)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache, so no test sees (or writes) the user's real one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(models.OFFLINE_ENV, raising=False)
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) == checkpoints.parent
    return checkpoints


@pytest.fixture
def offline(hub, monkeypatch) -> Path:
    monkeypatch.setenv(models.OFFLINE_ENV, "1")
    return hub


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "usernets.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield path
    sys.modules.pop("usernets", None)


def _no_download(*args, **kwargs):
    pytest.fail("a download was attempted")


# --- torchvision names ----------------------------------------------------------------------------


def test_torchvision_name_builds_random_init_in_eval_mode_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_model("squeezenet1_0", weights="none")
    assert isinstance(loaded, LoadedModel)
    assert isinstance(loaded.model, nn.Module) and not loaded.model.training
    assert (loaded.name, loaded.weights, loaded.pretrained) == ("squeezenet1_0", "random init", False)
    assert loaded.min_size == 21 and loaded.categories is None
    assert loaded.mean == IMAGENET_MEAN
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)


def test_torchvision_prefix_and_case_are_accepted_and_num_classes_is_applied():
    loaded = load_model("torchvision:MobileNet_V3_Small", weights="none", num_classes=7)
    assert loaded.name == "mobilenet_v3_small"
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(UsageError, match="unknown model 'resnt18'; did you mean resnet18") as info:
        load_model("resnt18", weights="none")
    assert info.value.exit_code == 2


def test_file_spec_without_factory_says_how_to_write_it():
    with pytest.raises(UsageError, match=r"mynet\.py:factory_function"):
        load_model("mynet.py")


def test_list_model_names_holds_classifiers_and_segmentation_models_only():
    names = list_model_names()
    assert "resnet18" in names and "vit_b_16" in names and "deeplabv3_resnet50" in names
    assert "fasterrcnn_resnet50_fpn" not in names and "raft_small" not in names
    assert names == sorted(names)


def test_unknown_weights_name_lists_the_available_ones():
    with pytest.raises(UsageError, match="unknown weights 'IMAGENET1K_V9'.*IMAGENET1K_V1"):
        load_model("squeezenet1_0", weights="IMAGENET1K_V9")


def test_pretrained_weights_with_other_num_classes_is_a_usage_error(offline):
    with pytest.raises(UsageError, match="num_classes=10 conflicts"):
        load_model("squeezenet1_0", weights="IMAGENET1K_V1", num_classes=10)


# --- pretrained weights offline -------------------------------------------------------------------


def test_auto_weights_offline_env_falls_back_to_random_init_without_trying(offline, monkeypatch):
    monkeypatch.setattr(pretrained, "_download_pretrained", _no_download)
    monkeypatch.setattr(pretrained, "_unreachable_reason", _no_download)
    with pytest.warns(PretrainedUnavailableWarning, match=f"random init.*SHIFTLAB_OFFLINE=1.*{SQUEEZE_FILE}"):
        loaded = load_model("squeezenet1_0")
    assert (loaded.weights, loaded.pretrained, loaded.categories) == ("random init", False, None)


def test_auto_weights_unreachable_server_falls_back_with_the_reason(hub, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(pretrained, "_download_pretrained", _no_download)
    with pytest.warns(PretrainedUnavailableWarning, match="cannot reach download.pytorch.org:443.*Name or service"):
        loaded = load_model("squeezenet1_0")
    assert loaded.weights == "random init" and not loaded.pretrained


def test_auto_weights_gives_up_on_a_server_that_never_answers(hub, monkeypatch):
    # A firewall that drops packets makes name lookup or connect hang; the probe must not wait.
    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_lookup)
    monkeypatch.setattr(pretrained, "DOWNLOAD_TIMEOUT_S", 0.2)
    monkeypatch.setattr(pretrained, "_download_pretrained", _no_download)
    try:
        with pytest.warns(PretrainedUnavailableWarning, match="no answer within 0.2 s"):
            loaded = load_model("squeezenet1_0")
    finally:
        release.set()
    assert loaded.weights == "random init"


def test_download_runs_under_a_socket_timeout_that_is_restored(hub, monkeypatch):
    seen: list[float | None] = []

    def failing_urlopen(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("connection timed out")

    monkeypatch.setattr(pretrained, "_unreachable_reason", lambda url, timeout: None)
    monkeypatch.setattr(torch.hub, "urlopen", failing_urlopen)
    before = socket.getdefaulttimeout()
    with pytest.warns(PretrainedUnavailableWarning, match="download failed.*connection timed out"):
        loaded = load_model("squeezenet1_0")
    assert seen == [pretrained.DOWNLOAD_TIMEOUT_S]
    assert socket.getdefaulttimeout() == before
    assert loaded.weights == "random init"


def test_explicit_default_weights_offline_names_the_file_and_cache_path(offline):
    with pytest.raises(WeightsError) as info:
        load_model("squeezenet1_0", weights="DEFAULT")
    message = str(info.value)
    assert str(offline / SQUEEZE_FILE) in message
    assert "put it at" in message and "\n" not in message


def test_cached_pretrained_weights_are_loaded_with_their_metadata(offline, monkeypatch):
    reference = load_model("squeezenet1_0", weights="none").model
    offline.mkdir(parents=True)
    torch.save(reference.state_dict(), offline / SQUEEZE_FILE)
    monkeypatch.setattr(pretrained, "_unreachable_reason", _no_download)
    for weights in ("auto", "IMAGENET1K_V1", "SqueezeNet1_0_Weights.DEFAULT"):
        loaded = load_model("squeezenet1_0", weights=weights)
        assert (loaded.weights, loaded.pretrained) == ("IMAGENET1K_V1", True)
        assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"
        assert loaded.mean == IMAGENET_MEAN and loaded.std == (0.229, 0.224, 0.225)
        assert not loaded.model.training
        for (key, got), want in zip(loaded.model.state_dict().items(), reference.state_dict().values(), strict=True):
            assert torch.equal(got, want), key


def test_corrupt_cached_weights_are_an_error_not_a_silent_fallback(offline):
    offline.mkdir(parents=True)
    (offline / SQUEEZE_FILE).write_bytes(b"PK\x03\x04 half a download")
    with pytest.raises(WeightsError, match="cannot be loaded.*delete it"):
        load_model("squeezenet1_0")


# --- user factories and timm -------------------------------------------------------------------------


def test_factory_from_this_test_file():
    loaded = load_model(THIS_FILE_FACTORY)
    assert type(loaded.model).__name__ == "TinyNet" and not loaded.model.training
    assert (loaded.name, loaded.weights, loaded.pretrained) == ("test_models:tiny_factory", "from factory", False)
    assert loaded.model(torch.zeros(2, 3, 8, 8)).shape == (2, 5)


def test_factory_from_a_file_path_gets_num_classes(user_module):
    loaded = load_model(f"{user_module}:factory", num_classes=4)
    assert loaded.name == "usernets:factory"
    assert loaded.model(torch.zeros(1, 3, 8, 8)).shape == (1, 4)


def test_factory_from_an_importable_module(user_module):
    loaded = load_model("usernets:factory")
    assert loaded.name == "usernets:factory"
    assert loaded.model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


def test_factory_that_raises_is_a_model_error_with_its_message(user_module):
    with pytest.raises(ModelError, match="usernets:broken raised ValueError: depth must be even"):
        load_model("usernets:broken")


def test_factory_must_return_a_module(user_module):
    with pytest.raises(ModelError, match="returned int; it must return a torch.nn.Module"):
        load_model(f"{user_module}:not_a_model")


def test_missing_factory_name_suggests_close_names(user_module):
    with pytest.raises(ModelError, match="no attribute 'factori'; did you mean factory"):
        load_model("usernets:factori")


def test_module_that_fails_to_import_is_a_model_error(tmp_path, monkeypatch):
    (tmp_path / "brokenmod.py").write_text("import numpy\nraise RuntimeError('missing CUDA extension')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelError, match="cannot import module 'brokenmod': RuntimeError: missing CUDA extension"):
        load_model("brokenmod:factory")
    with pytest.raises(ModelError, match="importing .*brokenmod.py failed: RuntimeError: missing CUDA extension"):
        load_model(f"{tmp_path / 'brokenmod.py'}:factory")
    with pytest.raises(ModelError, match="No module named 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:factory")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"{tmp_path / 'absent.py'}:factory")


def test_torchvision_weights_names_do_not_apply_to_factories():
    with pytest.raises(UsageError, match="torchvision weights names apply to torchvision models only"):
        load_model(THIS_FILE_FACTORY, weights="IMAGENET1K_V1")


def test_timm_spec_without_timm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(UsageError, match="pip install timm"):
        load_model("timm:resnet18")


# --- checkpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="bare"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd, "optimizer": {}}, id="model"),
        pytest.param(lambda sd: {"model_state_dict": sd}, id="model_state_dict"),
        pytest.param(lambda sd: {"module." + k: v for k, v in sd.items()}, id="dataparallel"),
        pytest.param(lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}}, id="nested-dataparallel"),
    ],
)
def test_checkpoint_formats_load_the_same_weights(tmp_path, wrap):
    torch.manual_seed(1)
    trained = TinyNet()
    trained.features[1].running_mean.fill_(0.5)
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(trained.state_dict()), path)
    loaded = load_model(THIS_FILE_FACTORY, weights=str(path))
    assert (loaded.weights, loaded.pretrained) == (str(path), True)
    assert not loaded.model.training
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_torchvision_checkpoint_with_other_classes_needs_num_classes(tmp_path):
    torch.manual_seed(0)
    source = load_model("squeezenet1_1", weights="none", num_classes=10).model
    path = tmp_path / "squeeze10.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    expected = r"classifier\.1\.weight \(10, 512, 1, 1\) vs \(1000, 512, 1, 1\).*10 classes: pass num_classes"
    with pytest.raises(WeightsError, match=expected):
        load_model("squeezenet1_1", weights=str(path))
    loaded = load_model("squeezenet1_1", weights=str(path), num_classes=10)
    assert loaded.pretrained and loaded.categories is None
    assert torch.equal(loaded.model.classifier[1].weight, source.classifier[1].weight)


def test_wrong_architecture_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Linear(2, 2)).state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_model(THIS_FILE_FACTORY, weights=str(path))
    message = str(info.value)
    assert "9 missing keys (features.0.weight, features.0.bias, features.1.weight" in message
    assert "... 4 more" in message
    assert "2 unexpected keys (0.weight, 0.bias)" in message
    assert "architecture" in message


def _truncated(path: Path) -> None:
    torch.save(TinyNet().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, pattern",
    [
        pytest.param(_truncated, "not a readable PyTorch checkpoint.*truncated or corrupt", id="truncated"),
        pytest.param(lambda p: p.write_text("epoch 3, loss 0.1\n"), "not a readable PyTorch checkpoint", id="text"),
        pytest.param(lambda p: p.write_bytes(b""), "not a readable PyTorch checkpoint", id="empty"),
        pytest.param(lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a state dict", id="tensor"),
        pytest.param(
            lambda p: torch.save({"epoch": 3, "lr": 0.1}, p), r"not a state dict \(keys: 'epoch', 'lr'\)", id="dict"
        ),
        pytest.param(lambda p: p.mkdir(), "is not a file", id="directory"),
        pytest.param(lambda p: None, "does not exist", id="missing"),
    ],
)
def test_unusable_checkpoint_files_are_weights_errors(tmp_path, make, pattern):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(WeightsError, match=pattern):
        load_model(THIS_FILE_FACTORY, weights=str(path))


def test_pickle_with_code_is_refused_unless_trusted(tmp_path, monkeypatch):
    (tmp_path / "notes_payload.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import notes_payload

    marker = tmp_path / "marker.txt"
    trained = TinyNet()
    path = tmp_path / "with_code.pth"
    torch.save({"state_dict": trained.state_dict(), "note": notes_payload.Payload(str(marker))}, path)
    marker.unlink(missing_ok=True)

    refused = "refused for safety: it pickles notes_payload.make_note.*--trust-checkpoint"
    with pytest.raises(WeightsError, match=refused):
        load_model(THIS_FILE_FACTORY, weights=str(path))
    assert not marker.exists(), "the refused checkpoint ran code"

    loaded = load_model(THIS_FILE_FACTORY, weights=str(path), trust_checkpoint=True)
    assert marker.read_text() == "unpickled"
    assert torch.equal(loaded.model.head[2].weight, trained.head[2].weight)
    sys.modules.pop("notes_payload", None)


def test_trusted_checkpoint_may_hold_a_whole_module(tmp_path):
    trained = TinyNet()
    path = tmp_path / "whole.pt"
    torch.save(trained, path)
    with pytest.raises(WeightsError, match="refused for safety"):
        load_model(THIS_FILE_FACTORY, weights=str(path))
    loaded = load_model(THIS_FILE_FACTORY, weights=str(path), trust_checkpoint=True)
    assert torch.equal(loaded.model.features[0].weight, trained.features[0].weight)
