"""``LoadedModel.min_size`` describes the model that is built, not the weights that are not used.

torchvision's ``meta['min_size']`` belongs to one set of weights. For vit_h_14 the DEFAULT weights
(SWAG E2E) say 518, the size they were trained at and the ``image_size`` the builder gives the
model when it loads them; built without weights, vit_h_14 has ``image_size`` 224 and takes
nothing else. So random init and checkpoints take the model's own fixed size, or else the
smallest ``min_size`` of the architecture's weights; loaded weights keep theirs.
"""
from __future__ import annotations

import textwrap
import warnings

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn
from torchvision.models import ViT_H_14_Weights

from shiftlab.models import pretrained, zoo as models
from shiftlab.cli.commands import main
from shiftlab.models.zoo import PretrainedUnavailableWarning, load_model


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv(models.OFFLINE_ENV, "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def test_random_init_vit_h_14_takes_224_not_the_518_of_its_default_weights():
    assert ViT_H_14_Weights.DEFAULT.meta["min_size"] == (518, 518)  # why this test exists
    loaded = load_model("vit_h_14", weights="none")
    assert loaded.model.image_size == 224
    assert loaded.min_size == 224


@pytest.mark.parametrize("weights", ["none", "auto"])
def test_random_init_vit_b_16_min_size_is_its_image_size(weights):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("vit_b_16", weights=weights)
    # 'auto' offline falls back to random init, with a warning; 'none' asks for it, silently
    assert [w.category for w in caught] == ([PretrainedUnavailableWarning] if weights == "auto" else [])
    assert not loaded.pretrained
    assert loaded.model.image_size == loaded.min_size == 224


def test_loaded_weights_keep_the_size_the_builder_gave_the_model(tmp_path, monkeypatch):
    chosen = torchvision.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1  # trained at 384
    cache = pretrained.cache_file(chosen)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")  # 'cached': no download is tried

    def build(name, weights):  # what torchvision's builder does with these weights, sans file
        assert weights is chosen
        return torchvision.models.vit_b_16(image_size=384)

    monkeypatch.setattr(pretrained, "_download_pretrained", build)
    loaded = load_model("vit_b_16", weights="IMAGENET1K_SWAG_E2E_V1")
    assert loaded.pretrained and loaded.weights == "IMAGENET1K_SWAG_E2E_V1"
    assert loaded.min_size == 384  # not the DEFAULT weights' 224


def test_without_a_fixed_size_random_init_takes_the_smallest_min_size_of_the_weights():
    # nn.Identity has no image_size: only the weights' metadata is left to go by
    assert models._min_size(nn.Identity(), ViT_H_14_Weights) == 224
    assert models._min_size(nn.Identity(), ViT_H_14_Weights, ViT_H_14_Weights.DEFAULT) == 518
    assert load_model("squeezenet1_0", weights="none").min_size == 21  # CNNs: unchanged


def test_factory_vit_gets_its_image_size(tmp_path):
    path = tmp_path / "small_vit.py"
    path.write_text(textwrap.dedent("""
        from torchvision.models import VisionTransformer

        def vit(num_classes=10):
            return VisionTransformer(image_size=64, patch_size=16, num_layers=1, num_heads=2,
                                     hidden_dim=32, mlp_dim=64, num_classes=num_classes)
    """))
    loaded = load_model(f"{path}:vit", weights="none")
    assert loaded.min_size == 64
    assert loaded.model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_cli_refuses_a_vit_below_its_size_naming_the_size(tmp_path):
    result = CliRunner().invoke(main, ["heatmap", "--model", "vit_b_16", "--weights", "none",
                                       "--size", "112", "--max-images", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "vit_b_16 needs inputs of at least 224 px; use --size 224" in result.stderr

