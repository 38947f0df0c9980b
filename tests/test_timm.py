"""timm models through ``timm:NAME`` specs: build, normalisation, geometry, CLI, checkpoints.

Skipped when timm is not installed (it is an optional extra: ``pip install -e '.[timm]'``; the
``test`` extra installs it too). Random init only, never a download (``SHIFTLAB_OFFLINE=1``;
timm models are built with ``pretrained=False``); small models at small sizes, about 5 s on 2 idle cores.

What a user gets from timm's defaults: CNNs (ResNet, ConvNeXt) take any size and have their
strides measured by probing; a ViT built by name takes exactly its ``img_size`` (224), so its
``min_size`` is 224 and its strides come from input / feature size. A ViT built with other
arguments (register tokens, another ``img_size``, ``dynamic_img_size=True``) comes through a
factory file, ``path/to/file.py:factory``.
"""
from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import shiftlab
from shiftlab.cli.commands import main
from shiftlab.errors import UsageError
from shiftlab.equivariance.geometry import probe_layers
from shiftlab.models.zoo import load_model

timm = pytest.importorskip("timm")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FIXED_SIZE_WARNING = "ignore:the model does not accept a second input size"


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _measure_2x2(model: torch.nn.Module, size: int) -> shiftlab.Result:
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return shiftlab.measure(model, images, shiftlab.ShiftGrid.square(2), device="cpu",
                            progress=False, batch_size=4)


def _by_name(result: shiftlab.Result) -> dict:
    return {info.name: info for info in result.layers}


def _invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _write_factory(folder: Path, source: str) -> str:
    path = folder / "timm_factories.py"
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_resnet18_builds_with_timms_normalisation_and_whole_strides():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights='none': no random-init warning
        loaded = load_model("timm:resnet18", weights="none")
    assert (loaded.name, loaded.weights, loaded.pretrained) == ("timm:resnet18", "random init", False)
    assert not loaded.model.training
    config = timm.data.resolve_model_data_config(loaded.model)
    assert loaded.mean == tuple(config["mean"]) == IMAGENET_MEAN
    assert loaded.std == tuple(config["std"]) == IMAGENET_STD
    assert loaded.min_size is None  # a CNN takes any size

    result = _measure_2x2(loaded.model, 32)
    layers = _by_name(result)
    assert layers["conv1"].stride == (2.0, 2.0)
    assert layers["maxpool"].stride == (4.0, 4.0)
    assert layers["layer2.0.conv1"].stride == (8.0, 8.0)
    assert layers["layer4.1.conv2"].stride == (32.0, 32.0)
    assert layers["fc"].kind == "global" and layers["fc"].shape == (1000,)
    spatial = [info for info in result.layers if info.is_spatial]
    assert spatial and all(info.integer_stride and info.layout == "nchw" for info in spatial)
    assert (result.mean[:, result.grid.shifts.index((0, 0))] == 0).all()  # SPEC known answer 1


def test_num_classes_is_passed_to_timm():
    loaded = load_model("timm:resnet18", weights="none", num_classes=7)
    assert loaded.model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_auto_weights_warn_that_timm_models_are_random_init():
    with pytest.warns(shiftlab.models.zoo.PretrainedUnavailableWarning, match="pretrained=False"):
        loaded = load_model("timm:resnet18")
    assert loaded.weights == "random init" and not loaded.pretrained


@pytest.mark.filterwarnings(FIXED_SIZE_WARNING)
def test_vit_blocks_are_token_maps_with_the_patch_stride():
    torch.manual_seed(0)
    loaded = load_model("timm:vit_tiny_patch16_224", weights="none")
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)  # its pretrained_cfg
    assert loaded.min_size == 224  # timm's ViT checks the input size (strict_img_size)

    result = _measure_2x2(loaded.model, 224)
    layers = _by_name(result)
    assert layers["patch_embed.proj"].layout == "nchw" and layers["patch_embed.proj"].stride == (16.0, 16.0)
    blocks = [info for info in result.layers if info.name.startswith("blocks.")
              and info.module in ("LayerNorm", "Linear", "GELU")]
    assert len(blocks) == 12 * 7  # norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.act, mlp.fc2
    assert all(info.kind == "spatial" and info.layout == "tokens" and info.extra_tokens == 1
               and info.stride == (16.0, 16.0) for info in blocks), blocks[:2]
    assert {info.shape[1:] for info in blocks} == {(14, 14)}
    assert layers["norm"].layout == "tokens" and layers["head"].kind == "global"
    assert (result.mean[:, result.grid.shifts.index((0, 0))] == 0).all()


def test_vit_at_another_size_is_refused_by_the_cli_with_its_size(tmp_path):
    result = _invoke("heatmap", "--model", "timm:vit_tiny_patch16_224", "--weights", "none",
                     "--size", "112", "--max-images", "1", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "needs inputs of at least 224 px" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings(FIXED_SIZE_WARNING)
def test_register_tokens_are_left_out_of_the_patch_map(tmp_path):
    spec = _write_factory(tmp_path, """
        import timm

        def vit_registers(num_classes=10):
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96,
                                     reg_tokens=4, depth=2, num_classes=num_classes)

        def vit_any_size():
            return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=96,
                                     reg_tokens=4, depth=2, dynamic_img_size=True)
    """)
    loaded = load_model(f"{spec}:vit_registers", weights="none")
    assert loaded.min_size == 96 and loaded.mean == (0.5, 0.5, 0.5)
    assert loaded.model.num_prefix_tokens == 5  # class token + 4 registers
    result = _measure_2x2(loaded.model, 96)
    norms = [info for info in result.layers if info.name.startswith("blocks.") and info.module == "LayerNorm"]
    assert len(norms) == 4 and all(info.layout == "tokens" and info.extra_tokens == 5
                                   and info.stride == (16.0, 16.0) and info.shape == (192, 6, 6)
                                   for info in norms), norms

    # dynamic_img_size=True: any size, so the stride is measured at two sizes, not estimated
    dynamic = load_model(f"{spec}:vit_any_size", weights="none")
    assert dynamic.min_size is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infos = {info.name: info for info in probe_layers(dynamic.model, (96, 96))}
    assert infos["patch_embed.norm"].layout == "nhwc"  # timm keeps (N, h, w, C) here
    assert infos["blocks.1.norm2"].layout == "tokens" and infos["blocks.1.norm2"].extra_tokens == 5
    assert infos["blocks.1.norm2"].measured_stride == (16.0, 16.0)


def test_convnext_runs_with_the_stride_of_each_stage():
    torch.manual_seed(0)
    loaded = load_model("timm:convnext_atto", weights="none")
    result = _measure_2x2(loaded.model, 32)
    layers = _by_name(result)
    assert layers["stem.0"].stride == (4.0, 4.0)
    assert layers["stages.1.downsample.1"].stride == (8.0, 8.0)
    assert layers["stages.3.blocks.1.conv_dw"].stride == (32.0, 32.0)
    assert layers["head.fc"].kind == "global"
    spatial = [info for info in result.layers if info.is_spatial]
    assert all(info.integer_stride and info.stride[0] == info.stride[1] for info in spatial)
    assert (result.mean[:, result.grid.shifts.index((0, 0))] == 0).all()


def test_cli_layers_lists_a_timm_model():
    result = _invoke("layers", "--model", "timm:resnet18", "--size", "32")  # weights 'auto'
    assert result.exit_code == 0, result.output
    assert "warning: timm:resnet18 has random weights" in result.stderr
    assert "77 layers of timm:resnet18 at 32 px (random init)" in result.stderr
    rows = {line.split()[1]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["conv1"][2:6] == ["Conv2d", "spatial", "nchw", "2"]
    assert rows["fc"][2:4] == ["Linear", "global"]


def test_unknown_timm_name_is_a_one_line_usage_error_naming_list_models():
    with pytest.raises(UsageError, match=r"unknown timm model 'resnet181'; did you mean resnet18"):
        load_model("timm:resnet181", weights="none")
    result = _invoke("layers", "--model", "timm:no_such_net", "--size", "32")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: unknown timm model 'no_such_net'"), lines
    assert "timm.list_models()" in lines[0] and "Traceback" not in result.output


def test_a_pretrained_tag_picks_the_normalisation_of_those_weights():
    # random init either way; the tag only chooses timm's pretrained_cfg
    assert load_model("timm:resnet18d.ra2_in1k", weights="none").mean == IMAGENET_MEAN
    tagged = load_model("timm:resnet18d.ra4_e3600_r224_in1k", weights="none")
    assert tagged.mean == (0.5, 0.5, 0.5) and not tagged.pretrained
    with pytest.raises(UsageError, match=r"no pretrained tag 'nosuchtag' \(its tags: .*ra2_in1k"):
        load_model("timm:resnet18d.nosuchtag", weights="none")


def test_hub_names_are_refused_instead_of_downloaded():
    with pytest.raises(UsageError, match="does not download"):
        load_model("timm:hf-hub:timm/resnet18.a1_in1k", weights="none")


def test_timm_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    torch.manual_seed(3)
    trained = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(trained.state_dict(), path)

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = load_model("timm:resnet18", weights=str(path), num_classes=5)
    assert calls == [True]
    assert (loaded.weights, loaded.pretrained) == (str(path), True)
    for (key, got), want in zip(loaded.model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(got, want), key
    probe = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded.model(probe), trained(probe))
