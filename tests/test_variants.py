"""Tests for shiftlab.models.variants: NAME[+aaK][@WEIGHTS] with '@' inside paths, converted-model
checkpoints under any checkpoint suffix, and weights_key. A tiny factory file in tmp_path."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from shiftlab import BlurPool
from shiftlab.models.variants import load_variant, parse_variant

from conftest import ANTIALIAS_FACTORY_SOURCE as FACTORY_SOURCE, assert_holds



def write_factory(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    return f"{folder / 'model.py'}:factory"


def seeded_load(spec: str, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_variant(spec, **kwargs)


def randomised(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every parameter from ``seed`` (unlike any seeded init); return the state dict."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return {key: value.clone() for key, value in model.state_dict().items()}


def blurpools(model: nn.Module) -> list[BlurPool]:
    return [m for m in model.modules() if isinstance(m, BlurPool)]


@pytest.mark.parametrize("text, expected", [
    ("ci/workspace@2/model.py:factory", ("ci/workspace@2/model.py:factory", None, None)),
    ("ci/workspace@2/model.py:factory+aa4", ("ci/workspace@2/model.py:factory", 4, None)),
    ("ci/workspace@2/model.py:factory@weights.pth", ("ci/workspace@2/model.py:factory", None, "weights.pth")),
    ("ci/workspace@2/model.py:factory+aa4@weights.pth", ("ci/workspace@2/model.py:factory", 4, "weights.pth")),
    ("ci/workspace@2/model.py:factory+aa4@runs@3/w.pth", ("ci/workspace@2/model.py:factory", 4, "runs@3/w.pth")),
    ("pkg.nets:build+aa2@w.tar", ("pkg.nets:build", 2, "w.tar")),
    ("torchvision:resnet50+aa4@x.tar", ("torchvision:resnet50", 4, "x.tar")),
    ("timm:resnet18.a1_in1k@w.safetensors", ("timm:resnet18.a1_in1k", None, "w.safetensors")),
])
def test_parse_variant_keeps_at_signs_inside_paths(text, expected):
    assert parse_variant(text) == expected


def test_factory_in_a_folder_with_an_at_sign_loads_plain_converted_and_with_weights(tmp_path):
    spec = write_factory(tmp_path / "ci" / "workspace@2")
    baseline = seeded_load(spec, weights="none")
    assert baseline.name == "model:factory" and blurpools(baseline.model) == []

    converted = seeded_load(f"{spec}+aa4", weights="none")
    assert converted.name == "model:factory+aa4"
    assert [p.filt_size for p in blurpools(converted.model)] == [4, 4]

    base_state = randomised(baseline.model, 7)
    torch.save(base_state, tmp_path / "weights.pth")
    with_weights = seeded_load(f"{spec}@{tmp_path / 'weights.pth'}")
    assert_holds(with_weights.model, base_state)

    aa_state = randomised(converted.model, 8)
    torch.save(aa_state, tmp_path / "ci" / "workspace@2" / "lpf4.pth")
    with_aa_weights = seeded_load(f"{spec}+aa4@{tmp_path / 'ci' / 'workspace@2' / 'lpf4.pth'}")
    assert with_aa_weights.name == "model:factory+aa4"
    assert_holds(with_aa_weights.model, aa_state)


@pytest.mark.parametrize("file_name", ["lpf4.tar", "lpf4.pth.tar", "lpf4.ckpt", "lpf4.bin", "lpf4.safetensors"])
def test_converted_checkpoint_by_relative_name_loads_strictly_into_the_aa_model(tmp_path, monkeypatch, file_name):
    # resnet50+aa4@x.tar once loaded x.tar into the baseline: no '/', and .tar was not a suffix
    spec = write_factory(tmp_path / "nets")
    aa_state = randomised(seeded_load(f"{spec}+aa4", weights="none").model, 9)
    monkeypatch.chdir(tmp_path)
    if file_name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(aa_state, file_name)
    else:
        torch.save({"state_dict": aa_state, "epoch": 90}, file_name)
    loaded = load_variant(f"{spec}+aa4@{file_name}")
    assert (loaded.name, loaded.weights) == ("model:factory+aa4", file_name)
    assert_holds(loaded.model, aa_state)
    assert any(key.endswith(".filt") for key in aa_state)  # the converted layout, BlurPool buffers too


def test_antialias_argument_copies_a_baseline_tar_checkpoint(tmp_path, monkeypatch):
    spec = write_factory(tmp_path / "nets")
    base_state = randomised(seeded_load(spec, weights="none").model, 10)
    monkeypatch.chdir(tmp_path)
    torch.save(base_state, "base.tar")
    loaded = load_variant(spec, weights="base.tar", antialias=4)
    assert loaded.name == "model:factory+aa4" and len(blurpools(loaded.model)) == 2
    linear = [m for m in loaded.model.modules() if isinstance(m, nn.Linear)][0]
    assert torch.equal(linear.weight, base_state["7.weight"])


def test_weights_key_picks_the_entry_of_a_converted_checkpoint(tmp_path):
    spec = write_factory(tmp_path / "nets")
    model = seeded_load(f"{spec}+aa2", weights="none").model
    plain, ema = randomised(model, 11), randomised(model, 12)
    path = tmp_path / "train.pth"
    torch.save({"model": plain, "model_ema": {"module": ema}}, path)
    assert_holds(load_variant(f"{spec}+aa2@{path}", weights_key="model_ema").model, ema)
    assert_holds(load_variant(f"{spec}+aa2@{path}", weights_key="model").model, plain)


def test_weights_key_picks_the_entry_of_a_baseline_checkpoint(tmp_path):
    spec = write_factory(tmp_path / "nets")
    model = seeded_load(spec, weights="none").model
    plain, ema = randomised(model, 13), randomised(model, 14)
    path = tmp_path / "train.pth"
    torch.save({"model": plain, "ema": ema}, path)
    assert_holds(load_variant(f"{spec}@{path}", weights_key="ema").model, ema)
    converted = load_variant(spec, weights=str(path), antialias=2, weights_key="model").model
    linear = [m for m in converted.modules() if isinstance(m, nn.Linear)][0]
    assert torch.equal(linear.weight, plain["7.weight"])
