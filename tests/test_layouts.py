"""Token sequences (N, L, D) and channels-last (N, H, W, C) outputs are read as (C, h, w) maps.

Known answers: a ViT without position embeddings is exactly equivariant at shifts that are
multiples of its patch size (its patch tokens roll, its class token does not change); a
channels-last block without striding is exactly equivariant at every circular shift.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import shiftlab
from shiftlab.equivariance.geometry import LayerInfo, _fixed_size_stride, _token_grid, as_feature_map, probe_layers
from shiftlab.equivariance.shifts import ShiftGrid

from conftest import TinyViT, make_channels_last

TOKEN_LAYERS = ["norm1", "attention.qkv", "attention.proj", "norm2", "mlp.0", "mlp.1", "mlp.2"]
PATCH_SHIFTS = [(0, 0), (4, 0), (0, 4), (4, 8), (12, 4)]


def _images(n: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("length, size, expected", [
    (197, (224, 224), (1, 14, 14)),   # ViT-B/16: class token + 14x14 patches
    (196, (224, 224), (0, 14, 14)),   # no class token
    (50, (224, 224), (1, 7, 7)),      # ViT-B/32
    (201, (224, 224), (5, 14, 14)),   # class token + 4 register tokens
    (99, (224, 112), (1, 14, 7)),     # a non-square input keeps one stride on both axes
    (7, (224, 224), None),            # 3 + 2x2 would be more extra tokens than patches: global
])
def test_token_grid_finds_extra_tokens_and_patch_grid(length, size, expected):
    assert _token_grid(length, size) == expected


def test_fixed_size_stride_needs_a_whole_stride_that_covers_the_input():
    assert _fixed_size_stride((55, 55), (224, 224)) == (4.0, 4.0)  # AlexNet conv1: 224/55
    assert _fixed_size_stride((14, 14), (224, 224)) == (16.0, 16.0)
    assert _fixed_size_stride((64, 49), (224, 224)) is None  # MaxViT window partition (3.5, 4.6)
    assert _fixed_size_stride((1, 1), (224, 224)) is None
    assert _fixed_size_stride((21, 64), (64, 64)) is None  # timm ViT attention (heads, L, dim)


def test_as_feature_map_undoes_a_row_major_patch_embedding():
    patches = torch.randn(2, 8, 3, 5)  # (N, D, h, w) as a patch embedding makes it
    tokens = torch.cat([torch.randn(2, 1, 8), patches.flatten(2).transpose(1, 2)], dim=1)
    info = LayerInfo("t", "Linear", "spatial", (4.0, 4.0), (4.0, 4.0), (8, 3, 5), "tokens", 1)
    assert torch.equal(as_feature_map(tokens, info), patches)
    channels_last = LayerInfo("c", "LayerNorm", "spatial", (1.0, 1.0), (1.0, 1.0), (8, 3, 5), "nhwc")
    assert torch.equal(as_feature_map(patches.permute(0, 2, 3, 1), channels_last), patches)


@pytest.mark.parametrize("fixed", [False, True], ids=["any-size", "fixed-size"])
def test_transformer_tokens_are_patch_maps_with_the_patch_stride(fixed):
    model = TinyViT(fixed_size=16 if fixed else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fixed-size model warns about its stride estimate
        infos = {info.name: info for info in probe_layers(model, (16, 16))}
    for name in TOKEN_LAYERS:
        info = infos[name]
        assert (info.kind, info.layout, info.extra_tokens) == ("spatial", "tokens", 1), name
        assert info.stride == (4.0, 4.0) and info.shape[1:] == (4, 4), name
    assert infos["attention.qkv"].shape == (24, 4, 4)
    assert infos["patchify"].layout == "nchw" and infos["head"].kind == "global"


@pytest.mark.parametrize("align", ["exact", "bilinear", "fourier"])
def test_vit_without_position_embeddings_is_equivariant_at_patch_multiples(align):
    result = shiftlab.measure(TinyViT(), _images(), ShiftGrid.explicit(PATCH_SHIFTS), align=align,
                              device="cpu", progress=False)
    for name in TOKEN_LAYERS + ["patchify"]:
        assert np.nanmax(result.map(name)) <= 1e-6, (name, result.map(name))
    # the class token is left out of the maps; the logits read from it are invariant
    assert result.layer("head").kind == "global"
    assert np.nanmax(result.map("head")) <= 1e-6


def test_vit_token_maps_change_at_sub_patch_shifts():
    grid = ShiftGrid.explicit([(0, 0), (1, 0), (2, 2)])
    result = shiftlab.measure(TinyViT(), _images(), grid, align="exact", device="cpu", progress=False)
    values = result.to_frame().set_index(["layer", "dh", "dw"])["mean"]
    assert math.isnan(values[("norm2", 1, 0)])  # exact alignment is undefined off the stride
    bilinear = shiftlab.measure(TinyViT(), _images(), grid, device="cpu", progress=False)
    frame = bilinear.to_frame().set_index(["layer", "dh", "dw"])["mean"]
    assert frame[("norm2", 1, 0)] > 1e-3 and frame[("mlp.2", 2, 2)] > 1e-3


def test_token_maps_compared_as_sequences_would_not_be_equivariant():
    """Why the reshape matters: the raw token sequence after a patch-multiple shift is permuted."""
    model, images = TinyViT(), _images()
    seen = {}
    hook = model.norm2.register_forward_hook(lambda m, i, o: seen.setdefault(len(seen), o.clone()))
    with torch.no_grad():
        model(images)
        model(torch.roll(images, (4, 0), dims=(-2, -1)))
    hook.remove()
    raw = 1 - torch.nn.functional.cosine_similarity(seen[0].flatten(1), seen[1].flatten(1)).mean()
    assert raw > 1e-2


@pytest.mark.parametrize("align", ["exact", "bilinear", "fourier"])
def test_channels_last_block_without_striding_is_exactly_equivariant(align):
    model = make_channels_last()
    result = shiftlab.measure(model, _images(), ShiftGrid.square(3), align=align, device="cpu",
                              progress=False)
    layouts = {info.name: info.layout for info in result.layers}
    assert [layouts[name] for name in ("2", "3", "4", "5")] == ["nhwc"] * 4
    assert layouts["0"] == layouts["7"] == "nchw"
    assert all(info.kind == "spatial" and info.stride == (1.0, 1.0) for info in result.layers)
    assert np.nanmax(result.mean) <= 1e-6


def test_channels_last_after_a_maxpool_is_exact_at_even_shifts_only():
    result = shiftlab.measure(make_channels_last(pool=True), _images(), ShiftGrid.square(2),
                              align="exact", device="cpu", progress=False)
    norm = result.layer("3")
    assert (norm.layout, norm.stride, norm.shape) == ("nhwc", (2.0, 2.0), (8, 8, 8))
    values = result.map("3")
    assert values[0, 0] == 0 and np.isnan(values[0, 1]) and np.isnan(values[1, 1])
    even = shiftlab.measure(make_channels_last(pool=True), _images(), ShiftGrid.explicit([(2, 0), (2, 4)]),
                            align="exact", device="cpu", progress=False)
    assert np.nanmax(even.map("3")) <= 1e-6


def test_layout_survives_save_and_load(tmp_path):
    result = shiftlab.measure(TinyViT(), _images(1), ShiftGrid.square(2), device="cpu", progress=False)
    loaded = shiftlab.load(result.save(tmp_path / "vit.npz"))
    assert loaded.layer("norm1") == result.layer("norm1")
    assert (loaded.layer("norm1").layout, loaded.layer("norm1").extra_tokens) == ("tokens", 1)
    summary = loaded.summary().set_index("layer")
    assert summary.loc["norm1", "layout"] == "tokens" and summary.loc["head", "layout"] == ""
