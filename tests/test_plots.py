"""Figures: one panel per layer, one shared colour scale, masked undefined cells, matching."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import LogNorm, TwoSlopeNorm  # noqa: E402
from torch import nn  # noqa: E402

import shiftlab  # noqa: E402
from shiftlab.figures import drawing  # noqa: E402
from shiftlab.figures import panels as panels_module  # noqa: E402
from shiftlab.figures import plots  # noqa: E402
from shiftlab.errors import SettingsMismatchError, UsageError  # noqa: E402
from shiftlab.equivariance.geometry import LayerInfo  # noqa: E402
from shiftlab.results.provenance import Provenance  # noqa: E402
from shiftlab.results.result import Result, Settings  # noqa: E402
from shiftlab.equivariance.shifts import ShiftGrid  # noqa: E402

NAN2 = (math.nan, math.nan)


def spatial(name: str, stride: int, module: str = "Conv2d") -> LayerInfo:
    return LayerInfo(name, module, "spatial", (float(stride),) * 2, (float(stride),) * 2, (4, 8, 8))


def glob(name: str) -> LayerInfo:
    return LayerInfo(name, "Linear", "global", NAN2, NAN2, (10,))


def make_result(layers: list[LayerInfo], grid: ShiftGrid | None = None, metric: str = "cosine",
                align: str = "exact", seed: int = 0, meta: dict | None = None,
                values: np.ndarray | None = None) -> Result:
    """Known per-(layer, shift) means; NaN where align='exact' and the stride does not divide."""
    grid = grid or ShiftGrid.square(4)
    shifts = np.asarray(grid.shifts)
    rng = np.random.default_rng(seed)
    mean = rng.uniform(0.01, 0.2, size=(len(layers), len(grid))) if values is None else values.copy()
    for row, info in enumerate(layers):
        mean[row][(shifts == 0).all(1)] = 0.0 if metric != "psnr" else math.inf
        if info.is_spatial and align == "exact":
            stride = info.stride[0]
            mean[row][(shifts[:, 0] % stride != 0) | (shifts[:, 1] % stride != 0)] = math.nan
    n = np.where(np.isnan(mean), 0, 3)
    meta = {"model": "toynet", "weights": "random init", "n_images": 3} if meta is None else meta
    return Result(settings=Settings(grid=grid, align=align, metric=metric, size=(32, 32)),
                  layers=list(layers), mean=mean, std=np.zeros_like(mean), n=n,
                  n_inf=np.where(np.isinf(mean), 3, 0), n_nan=np.zeros_like(n),
                  provenance=Provenance.from_meta(meta))


THREE = [spatial("features.0", 1), spatial("features.2", 2, "MaxPool2d"), glob("classifier.0")]


@pytest.fixture
def result() -> Result:
    return make_result(THREE)


@pytest.fixture(autouse=True)
def no_open_figures():
    plt.close("all")
    yield
    assert plt.get_fignums() == [], "plots must not register figures with pyplot"
    plt.close("all")


def legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label().startswith("layer:")]


def colorbars(fig) -> list:
    return [ax for ax in fig.axes if hasattr(ax, "_colorbar")]


def main_bar(fig):
    return next(ax for ax in fig.axes if ax.get_label() == "colorbar")


def bar_label(fig) -> str:
    """What the colour shows, its line wrapping undone: the shared bar's label, or the figure
    text that names the quantity when every panel has its own bar."""
    own = [t.get_text() for t in fig.texts if t.get_gid() == drawing.COLOUR_LABEL]
    return " ".join((own[0] if own else main_bar(fig).get_ylabel()).split())


def mesh(ax):
    """A panel's cells: one image (a PDF embeds it at its own size, never a figure-sized bitmap)."""
    return ax.images[0]


# -- layer_grid ----------------------------------------------------------------------------
def test_layer_grid_draws_one_panel_per_layer_in_network_order(result):
    fig = plots.layer_grid(result)
    assert [ax.get_label() for ax in panels(fig)] == [f"layer:{n}" for n in result.layer_names]
    assert [mesh(ax).get_array().shape for ax in panels(fig)] == [(4, 4)] * 3


def test_shared_color_range_has_one_colour_bar_and_one_norm(result):
    fig = plots.layer_grid(result, color_range="shared")
    assert len(colorbars(fig)) == 1
    norms = {id(mesh(ax).norm) for ax in panels(fig)}
    assert len(norms) == 1
    finite = result.mean[np.isfinite(result.mean)]
    assert {mesh(ax).get_clim() for ax in panels(fig)} == {(0.0, finite.max())}
    assert colorbars(fig)[0]._colorbar.norm is mesh(panels(fig)[0]).norm
    assert colorbars(fig)[0]._colorbar.extend == "neither"


def test_panel_titles_name_module_stride_and_mean(result):
    titles = [ax.get_title() for ax in panels(plots.layer_grid(result))]
    for title, name, stride, module in zip(titles, result.layer_names, ["s=1", "s=2", "global"],
                                           ["Conv2d", "MaxPool2d", "Linear"]):
        assert name in title and stride in title and module in title
        assert f"μ={result.layer_mean(name):.3g}" in title


def test_undefined_cells_are_masked_not_zero(result):
    fig = plots.layer_grid(result)
    pool = next(ax for ax in panels(fig) if ax.get_label() == "layer:features.2")
    drawn = mesh(pool).get_array()
    expected = result.map("features.2")
    assert np.isnan(expected).sum() == 12  # stride 2 on a 4x4 grid: only even (dh, dw) defined
    assert np.array_equal(np.ma.getmaskarray(drawn), np.isnan(expected))
    assert np.allclose(drawn.compressed(), expected[~np.isnan(expected)])
    assert any(p.get_hatch() for p in pool.patches), "undefined cells need a hatched background"
    legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "grey = undefined (stride does not divide the shift)" in legend_texts


def test_no_undefined_note_when_every_cell_is_defined():
    fig = plots.layer_grid(make_result(THREE, align="bilinear"))
    assert not fig.legends
    assert not np.ma.getmaskarray(mesh(panels(fig)[1]).get_array()).any()


def test_title_names_model_random_init_and_settings(result):
    title = plots.layer_grid(result).get_suptitle()
    for part in ("toynet", "random init", "cosine", "circular", "exact", "4×4", "32×32", "3 images"):
        assert part in title
    assert "random init" in plots.layer_grid(make_result(THREE, meta={"model": "m", "weights": "none"})).get_suptitle()
    assert plots.layer_grid(result, title="mine").get_suptitle() == "mine"


def test_log_scale_marks_exact_zeros_in_their_own_colour_not_clipped(result):
    fig = plots.layer_grid(result, scale="log", color_range="shared")
    norm = mesh(panels(fig)[0]).norm
    assert isinstance(norm, LogNorm)
    finite = result.mean[np.isfinite(result.mean)]
    assert norm.vmin == pytest.approx(finite[finite > 0].min())
    drawn = mesh(panels(fig)[0]).get_array()
    assert np.ma.getmaskarray(drawn)[0, 0]  # shift (0, 0) is exactly 0: not on the log scale
    zero_layer = panels(fig)[0].images[1].get_array()  # the flat-colour overlay
    assert not np.ma.getmaskarray(zero_layer)[0, 0] and np.ma.getmaskarray(zero_layer).sum() == 15
    assert "exactly 0 (off the log scale)" in legend_texts(fig)
    assert "log scale" in bar_label(fig)


def test_cosine_colour_bar_says_zero_is_equivariant(result):
    assert "cosine distance (0 = equivariant)" in bar_label(plots.layer_grid(result))


def test_psnr_reverses_colormap_and_draws_inf_in_its_own_labelled_colour():
    psnr = make_result(THREE, metric="psnr", align="bilinear",
                       values=np.random.default_rng(3).uniform(20, 40, size=(3, 16)))
    fig = plots.layer_grid(psnr, cmap="viridis", color_range="shared")
    assert "PSNR (dB, higher = more equivariant)" in bar_label(fig)
    first = mesh(panels(fig)[0])
    assert first.get_cmap().name == "viridis_r"
    finite_max = psnr.mean[np.isfinite(psnr.mean)].max()
    assert np.ma.getmaskarray(first.get_array())[0, 0]  # shift (0, 0) is +inf: not the finite max
    assert first.get_clim()[1] == pytest.approx(finite_max)
    overlay = panels(fig)[0].images[1]
    assert list(overlay.get_cmap().colors) == [panels_module.INF_COLOUR]
    assert not np.ma.getmaskarray(overlay.get_array())[0, 0]
    assert "∞ dB (identical maps)" in legend_texts(fig)
    values = psnr.values("features.0")
    assert f"μ={values[np.isfinite(values)].mean():.3g}" in panels(fig)[0].get_title()


def test_user_colour_limits_are_shared(result):
    fig = plots.layer_grid(result, vmin=0.05, vmax=0.1, color_range="shared")
    assert {mesh(ax).get_clim() for ax in panels(fig)} == {(0.05, 0.1)}
    assert colorbars(fig)[0]._colorbar.extend == "both"  # values above 0.1 and below 0.05
    with pytest.raises(UsageError):
        plots.layer_grid(result, vmin=0.2, vmax=0.1)


def test_layer_selection_spatial_only_and_unknown_layer(result):
    assert len(panels(plots.layer_grid(result, spatial_only=True))) == 2
    assert [ax.get_label() for ax in panels(plots.layer_grid(result, layers=["classifier.*", "features.0"]))] \
        == ["layer:features.0", "layer:classifier.0"]  # network order, not argument order
    with pytest.raises(UsageError, match="no layer matches"):
        plots.layer_grid(result, layers=["nope"])


def test_diagonal_grid_is_drawn_as_strips_not_empty_squares():
    diag = make_result(THREE, grid=ShiftGrid.diagonal(6))
    fig = plots.layer_grid(diag)
    for ax, name in zip(panels(fig), diag.layer_names):
        drawn = mesh(ax).get_array()
        assert drawn.shape == (1, 6)
        assert np.array_equal(np.ma.getmaskarray(drawn)[0], np.isnan(diag.values(name)))
        x0, y0, width, height = ax.get_position().bounds
        assert width * fig.get_figwidth() > 3 * height * fig.get_figheight()  # inches: a strip


def test_many_layers_wrap_into_rows():
    many = make_result([spatial(f"features.{i}", 1) for i in range(45)], align="bilinear")
    fig = plots.layer_grid(many)
    axes = panels(fig)
    assert len(axes) == 45 and len(colorbars(fig)) == 45  # one per panel (color_range='layer')
    rows = {round(ax.get_position().y0, 4) for ax in axes}
    cols = {round(ax.get_position().x0, 4) for ax in axes}
    assert len(rows) > 1 and len(cols) <= 10 and len(rows) * len(cols) >= 45
    assert len(cols) == math.ceil(math.sqrt(45) * 1.3)
    left = min(cols)
    for ax in axes:  # dh labels and the 'dh' axis label on the left column only
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        outer = round(ax.get_position().x0, 4) == left
        assert labels == (["0", "1", "2", "3"] if outer else [])
        assert ax.get_ylabel() == ("dh" if outer else "")


def test_group_by_block_starts_a_labelled_row_per_block():
    layers = [spatial("features.0", 1), spatial("features.1", 2), glob("avgpool"),
              glob("classifier.0"), glob("classifier.1")]
    fig = plots.layer_grid(make_result(layers, align="bilinear"), group_by_block=True, ncols=4)
    texts = [t.get_text() for t in fig.texts]
    assert {"features", "(top level)", "classifier"} <= set(texts)
    x0 = {ax.get_label(): round(ax.get_position().x0, 4) for ax in panels(fig)}
    assert x0["layer:features.0"] == x0["layer:avgpool"] == x0["layer:classifier.0"]
    y0 = {ax.get_label(): round(ax.get_position().y0, 4) for ax in panels(fig)}
    assert y0["layer:features.0"] > y0["layer:avgpool"] > y0["layer:classifier.0"]
    assert panels(fig)[0].get_title().startswith("0\n")  # the name inside the block


def test_group_by_block_keeps_a_nested_block_in_its_row():
    names = ["layer1.0.conv1", "layer1.0.downsample.0", "layer1.0.relu#2", "layer1.1.conv1"]
    fig = plots.layer_grid(make_result([spatial(n, 4) for n in names], align="bilinear"),
                           group_by_block=True)
    y0 = [round(ax.get_position().y0, 4) for ax in panels(fig)]
    assert y0[0] == y0[1] == y0[2] > y0[3]
    assert {"layer1.0", "layer1.1"} <= {t.get_text() for t in fig.texts}
    assert "layer1.0.downsample" not in {t.get_text() for t in fig.texts}
    assert panels(fig)[1].get_title().startswith("downsample.0\n")


def test_long_layer_and_module_names_wrap_onto_lines_and_keep_every_character():
    long_name = "backbone.body.stage4.block12.attention.proj.conv"
    layers = [spatial(long_name, 1, "AdaptiveAvgPool2d"), spatial("c", 1)]
    fig = plots.layer_grid(make_result(layers, align="bilinear"), color_range="shared")
    title = panels(fig)[0].title
    lines = title.get_text().split("\n")
    assert len(lines) > 2 and "…" not in title.get_text()
    mean = panels_module.fmt(make_result(layers, align="bilinear").layer_mean(long_name))
    full = f"{long_name} AdaptiveAvgPool2d · s=1 · μ={mean}"
    assert "".join(title.get_text().split()) == "".join(full.split())  # only line breaks added
    assert lines[0].endswith(".") and all(len(line) <= 24 for line in lines)  # broken after a '.'
    assert title.get_fontsize() == panels(fig)[1].title.get_fontsize() == panels_module.FS_PANEL
    heights = {round(ax.get_position().height, 6) for ax in panels(fig)}
    assert len(heights) == 1  # every panel the same size, the title row as tall as the longest


# -- layer_profile -------------------------------------------------------------------------
def data_line(fig, label):
    ax = next(ax for ax in fig.axes if ax.get_label() == "profile")
    return next(line for line in ax.get_lines() if line.get_label() == label), ax


def test_profile_y_values_are_layer_means_in_network_order(result):
    fig = plots.layer_profile(result, labels=["mine"])
    line, ax = data_line(fig, "mine (random init)")
    assert list(line.get_xdata()) == list(range(3))
    assert np.allclose(line.get_ydata(), [result.layer_mean(n) for n in result.layer_names])
    assert [t.get_text() for t in ax.get_xticklabels()] == result.layer_names
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mine (random init)"]


def test_profile_marks_stride_changes_and_global_layers():
    layers = [spatial("c0", 1), spatial("p1", 2), spatial("c2", 2), spatial("p3", 4), glob("fc")]
    fig = plots.layer_profile(make_result(layers, align="bilinear"))
    ax = fig.axes[0]
    texts = {t.get_text(): t for t in ax.texts}
    assert {"s=2", "s=4", "global"} <= set(texts) and "s=1" not in texts
    dotted = sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":")
    assert dotted == [0.5, 2.5]
    hollow = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [4]


def test_profile_of_two_results_matches_by_name_and_uses_default_labels():
    a = make_result(THREE, seed=0, meta={"model": "net", "weights": "random init"})
    b_layers = [THREE[2], THREE[0], THREE[1]]  # same names, other order
    b = make_result(b_layers, seed=1, meta={"model": "net", "weights": "IMAGENET1K_V1"})
    fig = plots.layer_profile([a, b])
    line, _ = data_line(fig, "net (IMAGENET1K_V1)")
    assert np.allclose(line.get_ydata(), [b.layer_mean(n) for n in a.layer_names])
    data_line(fig, "net (random init)")  # said once, not twice


def test_profile_thins_tick_labels_above_40_layers():
    many = make_result([spatial(f"l{i}", 1) for i in range(90)], align="bilinear")
    ax = plots.layer_profile(many).axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert 20 <= len(labels) <= 40 and labels[0] == "l0" and labels[1] == "l3"


def test_profile_log_scale(result):
    assert plots.layer_profile(result, scale="log").axes[0].get_yscale() == "log"


# -- matching ------------------------------------------------------------------------------
def test_match_layers_by_name_keeps_the_first_results_order():
    a, b = make_result(THREE), make_result([THREE[2], THREE[1], THREE[0]])
    assert plots.match_layers([a, b]) == [(n, n) for n in a.layer_names]
    subset = make_result([THREE[1]])  # measured with a layer filter
    assert plots.match_layers([a, subset]) == [("features.2", "features.2")]


def test_match_layers_by_depth_pairs_spatial_then_global_layers():
    a = make_result([spatial("conv1", 1), spatial("pool", 2), glob("fc")])
    b = make_result([spatial("features.0", 1), glob("avgpool"), spatial("features.1", 2),
                     spatial("features.2", 4), glob("classifier")])
    assert plots.match_layers([a, b], by="depth") == [("conv1", "features.0"), ("pool", "features.1"),
                                                      ("fc", "avgpool")]
    with pytest.raises(UsageError, match="share no layer name"):
        plots.match_layers([a, b], by="name")


# -- compare_grid / difference_grid ---------------------------------------------------------
def test_compare_grid_shares_one_colour_scale_across_results():
    a = make_result(THREE, seed=0, meta={"label": "A"})
    b = make_result(THREE, seed=1, meta={"label": "B"})
    b.mean[0, 5] = 0.9  # b holds the overall maximum
    fig = plots.compare_grid([a, b], color_range="shared")
    axes = panels(fig)
    assert len(axes) == 6 and len(colorbars(fig)) == 1
    assert {mesh(ax).get_clim() for ax in axes} == {(0.0, 0.9)}
    assert len({id(mesh(ax).norm) for ax in axes}) == 1
    drawn = mesh(next(ax for ax in axes if ax.get_label() == "layer:B:features.0")).get_array()
    assert np.allclose(drawn, b.map("features.0"))
    x0 = {ax.get_label(): round(ax.get_position().x0, 4) for ax in axes}
    assert x0["layer:A:features.2"] == x0["layer:B:features.2"]  # same layer stacked in a column
    assert {"A", "B"} <= {t.get_text() for t in fig.texts}


def test_compare_grid_refuses_results_measured_differently():
    a = make_result(THREE)
    psnr = make_result(THREE, metric="psnr")
    with pytest.raises(SettingsMismatchError, match="metric"):
        plots.compare_grid([a, psnr])
    other_align = make_result(THREE)
    other_align.settings = Settings(grid=a.grid, align="bilinear", size=(32, 32))
    with pytest.raises(SettingsMismatchError, match="check_settings=False"):
        plots.compare_grid([a, other_align])
    assert len(panels(plots.compare_grid([a, other_align], check_settings=False))) == 6


def test_difference_grid_shows_b_minus_a_centred_at_zero():
    a = make_result(THREE, seed=0, meta={"label": "base"})
    b = make_result(THREE, seed=1, meta={"label": "blurred"})
    fig = plots.difference_grid(a, b)
    axes = panels(fig)
    assert len(axes) == 3 and len(colorbars(fig)) == 1
    for ax, name in zip(axes, a.layer_names):
        expected = b.map(name) - a.map(name)
        drawn = mesh(ax).get_array()
        assert np.array_equal(np.ma.getmaskarray(drawn), np.isnan(expected))
        assert np.allclose(drawn.compressed(), expected[~np.isnan(expected)])
    norm = mesh(axes[0]).norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0 and norm.vmin == -norm.vmax
    diff = b.mean - a.mean
    assert norm.vmax == pytest.approx(np.abs(diff[np.isfinite(diff)]).max())
    label = bar_label(fig)
    assert "blurred − base" in label and "< 0: blurred more equivariant" in label


def test_difference_sign_for_psnr_and_grid_mismatch():
    a = make_result(THREE, metric="psnr", align="bilinear", meta={"label": "a"})
    b = make_result(THREE, metric="psnr", align="bilinear", seed=2, meta={"label": "b"})
    assert "> 0: b more equivariant" in bar_label(plots.difference_grid(a, b))
    with pytest.raises(SettingsMismatchError, match="grid"):
        plots.difference_grid(make_result(THREE), make_result(THREE, grid=ShiftGrid.square(2)),
                              check_settings=False)


# -- save_figure ---------------------------------------------------------------------------
def test_save_figure_writes_png_and_pdf_and_leaves_no_temp_files(result, tmp_path):
    paths = plots.save_figure(plots.layer_grid(result), tmp_path / "out" / "vgg.layers")
    assert paths == [tmp_path / "out" / "vgg.layers.png", tmp_path / "out" / "vgg.layers.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vgg.layers.pdf", "vgg.layers.png"]
    with pytest.raises(UsageError, match="cannot save"):
        plots.save_figure(plots.layer_grid(result), tmp_path / "x", formats=("docx",))
    assert not (tmp_path / "x.docx").exists()


# -- a real measurement ----------------------------------------------------------------------
def test_real_measurement_renders_every_layer(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU(),
                        nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    measured = shiftlab.measure(net, images, ShiftGrid.square(4), align="exact", device="cpu",
                                progress=False, meta={"model": "tiny", "weights": "random init"})
    fig = plots.layer_grid(measured)
    assert len(panels(fig)) == len(measured.layers) == 6
    pool = next(ax for ax in panels(fig) if ax.get_label() == "layer:2")
    assert "s=2" in pool.get_title()
    assert np.array_equal(np.ma.getmaskarray(mesh(pool).get_array()), np.isnan(measured.map("2")))
    assert "random init" in fig.get_suptitle() and "2 images" in fig.get_suptitle()
    line, _ = data_line(plots.layer_profile(measured), "tiny (random init)")
    assert np.allclose(line.get_ydata(), [measured.layer_mean(n) for n in measured.layer_names])
    assert all(p.stat().st_size > 0 for p in plots.save_figure(fig, tmp_path / "tiny"))


def test_match_layers_by_structure_pairs_a_maxpool_with_the_blurpool_that_replaces_it():
    from shiftlab.equivariance.geometry import LayerInfo

    def info(name, module, stride, shape):
        kind = "global" if stride is None else "spatial"
        s = (float("nan"),) * 2 if stride is None else (float(stride),) * 2
        return LayerInfo(name, module, kind, s, s, shape)

    base = make_result([info("features.0", "Conv2d", 1, (8, 16, 16)), info("features.1", "ReLU", 1, (8, 16, 16)),
                        info("features.2", "MaxPool2d", 2, (8, 8, 8)), info("features.3", "Conv2d", 2, (8, 8, 8)),
                        info("fc", "Linear", None, (10,))])
    aa = make_result([info("features.0", "Conv2d", 1, (8, 16, 16)), info("features.1", "ReLU", 1, (8, 16, 16)),
                      info("features.2", "MaxPool2d", 1, (8, 16, 16)), info("features.3", "BlurPool", 2, (8, 8, 8)),
                      info("features.4", "Conv2d", 2, (8, 8, 8)), info("fc", "Linear", None, (10,))])
    rows = plots.match_layers([base, aa])  # names differ in meaning, so auto uses structure
    assert ("features.2", "features.3") in rows
    assert ("features.3", "features.4") in rows
    assert ("fc", "fc") in rows
    assert all(b != "features.2" for _, b in rows)  # the stride-1 max-pool has no partner


# -- colour ranges and vmax ----------------------------------------------------------------
def test_layer_color_range_gives_each_panel_its_own_scale_and_bar(result):
    fig = plots.layer_grid(result, color_range="layer")
    for ax, name in zip(panels(fig), result.layer_names):
        values = result.values(name)
        assert mesh(ax).get_clim() == (0.0, pytest.approx(np.nanmax(values)))
        own = next(a for a in fig.axes if a.get_label() == f"colorbar:{ax.get_label()}")
        assert own._colorbar.norm is mesh(ax).norm
    assert len({mesh(ax).get_clim() for ax in panels(fig)}) == 3


def test_stage_color_range_shares_one_scale_per_stride():
    layers = [spatial("c1", 1), spatial("c2", 1), spatial("p1", 2, "MaxPool2d"), spatial("c3", 2)]
    values = np.full((4, 16), 0.1)
    values[1, 3], values[3, 5] = 0.5, 0.9
    fig = plots.layer_grid(make_result(layers, align="bilinear", values=values), color_range="stage")
    clims = [mesh(ax).get_clim() for ax in panels(fig)]
    assert clims[0] == clims[1] == (0.0, 0.5) and clims[2] == clims[3] == (0.0, 0.9)


def test_percentile_vmax_sets_the_top_and_the_bar_shows_an_over_arrow(result):
    fig = plots.layer_grid(result, color_range="shared", vmax="p50")
    finite = result.mean[np.isfinite(result.mean)]
    assert mesh(panels(fig)[0]).get_clim()[1] == pytest.approx(np.percentile(finite, 50))
    assert colorbars(fig)[0]._colorbar.extend == "max"
    number = plots.layer_grid(result, color_range="shared", vmax=1.0)
    assert mesh(panels(number)[0]).get_clim() == (0.0, 1.0)
    assert colorbars(number)[0]._colorbar.extend == "neither"  # nothing above 1.0
    with pytest.raises(UsageError, match="vmax"):
        plots.layer_grid(result, vmax="q99")
    with pytest.raises(UsageError, match="color_range"):
        plots.layer_grid(result, color_range="everything")


# -- ticks, axis labels, provenance -----------------------------------------------------------
def test_tick_steps_are_round_and_symmetric_grids_have_a_zero_tick():
    assert panels_module.tick_indices(list(range(-8, 9))) == [0, 4, 8, 12, 16]
    assert panels_module.tick_indices(list(range(8))) == [0, 2, 4, 6]
    fig = plots.layer_grid(make_result(THREE, grid=ShiftGrid.symmetric(3), align="bilinear"))
    first = panels(fig)[0]
    assert [t.get_text() for t in first.get_yticklabels()] == ["-2", "0", "2"]
    bottom = [ax for ax in panels(fig) if ax.get_xlabel() == "dw"]
    assert bottom and all("0" in [t.get_text() for t in ax.get_xticklabels()] for ax in bottom)


def test_random_init_is_read_from_provenance_before_meta():
    class Typed:  # a stand-in with a typed provenance and a meta that says otherwise
        provenance = type("P", (), {"random_init": True})()
        meta = {"pretrained": True}

    assert panels_module.is_random_init(Typed())
    assert panels_module.is_random_init(type("M", (), {"meta": {"weights": "none"}})())
    assert not panels_module.is_random_init(type("M", (), {"meta": {"pretrained": True}})())
    trained = make_result(THREE, meta={"model": "toynet", "weights": "IMAGENET1K_V1", "pretrained": True})
    assert "random init" not in plots.layer_grid(trained).get_suptitle()
    random = make_result(THREE)
    fig = plots.layer_grid(random, title="mine")
    assert fig.get_suptitle() == "mine"
    assert any("random init" in t.get_text() for t in fig.texts)  # said even under a custom title


# -- text escaping ----------------------------------------------------------------------------
def test_escape_keeps_dollar_signs_literal():
    assert panels_module.escape("$\\frac{a$") == "\\$\\frac{a\\$"
    assert panels_module.escape("plain") == "plain"


def test_mathtext_in_layer_model_and_title_strings_draws_literally(tmp_path):
    odd = "$\\frac{a$"
    layers = [spatial(odd, 1, module=odd), glob("fc")]
    result = make_result(layers, align="bilinear", meta={"model": odd, "weights": "none", "label": odd})
    figures = [plots.layer_grid(result, title=odd), plots.layer_profile(result),
               plots.compare_grid([result, make_result(layers, align="bilinear", seed=1)], labels=[odd, "b"]),
               plots.difference_grid(result, make_result(layers, align="bilinear", seed=1), difference="ratio")]
    for k, fig in enumerate(figures):
        plots.save_figure(fig, tmp_path / f"odd{k}", formats=("png",))  # raised ValueError before
    assert panels(figures[0])[0].get_title().startswith("\\$\\frac{a\\$")


# -- compare / difference ----------------------------------------------------------------------
def base_and_antialiased():
    def info(name, module, stride):
        s = (float(stride),) * 2
        return LayerInfo(name, module, "spatial", s, s, (8, 8, 8))

    base = make_result([info("features.0", "Conv2d", 1), info("features.2", "MaxPool2d", 2),
                        info("features.3", "Conv2d", 2), glob("fc")], align="bilinear", seed=0,
                       meta={"label": "base"})
    aa = make_result([info("features.0", "Conv2d", 1), info("features.2", "MaxPool2d", 1),
                      info("features.3", "BlurPool", 2), info("features.4", "Conv2d", 2), glob("fc")],
                     align="bilinear", seed=1, meta={"label": "aa"})
    return base, aa


def test_profile_of_renamed_layers_is_aligned_on_matched_rows_with_both_names():
    base, aa = base_and_antialiased()
    fig = plots.layer_profile([base, aa])
    (line_a, ax), (line_b, _) = data_line(fig, "base"), data_line(fig, "aa")
    assert list(line_a.get_xdata()) == [0, 2, 3, 4]  # base has no layer in aa's stride-1 pool's row
    assert list(line_b.get_xdata()) == [0, 1, 2, 3, 4]
    assert np.allclose(line_b.get_ydata(), [aa.layer_mean(n) for n in aa.layer_names])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert ticks == ["features.0", "– / features.2", "features.2 / features.3",
                     "features.3 / features.4", "fc"]


def test_ratio_difference_is_log2_of_b_over_a_with_zero_cases_marked():
    a = make_result(THREE, align="bilinear", values=np.full((3, 16), 0.1), meta={"label": "a"})
    b = make_result(THREE, align="bilinear", values=np.full((3, 16), 0.05), meta={"label": "b"})
    b.mean[0, 1], a.mean[0, 2] = 0.4, 0.0  # one cell 4x worse, one where a is exactly 0
    fig = plots.difference_grid(a, b, difference="ratio")
    drawn = mesh(panels(fig)[0]).get_array()
    assert drawn[0, 0] == 0  # both exactly 0 at shift (0, 0): no change
    assert drawn[0, 1] == pytest.approx(2.0) and drawn[1, 1] == pytest.approx(-1.0)  # 4x, halved
    assert np.ma.getmaskarray(drawn)[0, 2]
    assert "a ≤ 1e-06 (equivariant), b above" in legend_texts(fig)
    norm = mesh(panels(fig)[0]).norm
    assert isinstance(norm, TwoSlopeNorm) and norm.vcenter == 0 and norm.vmax == pytest.approx(2.0)
    assert "log2(b / a)" in bar_label(fig)
    psnr = make_result(THREE, metric="psnr")
    with pytest.raises(UsageError, match="ratio"):
        plots.difference_grid(psnr, psnr, difference="ratio")


def test_ratio_treats_distances_at_rounding_level_as_equivariant():
    # 1e-9 against 1e-12 is rounding in both, not a 1000x change that would set the colour scale
    a = make_result(THREE, align="bilinear", values=np.full((3, 16), 0.1), meta={"label": "a"})
    b = make_result(THREE, align="bilinear", values=np.full((3, 16), 0.05), meta={"label": "b"})
    a.mean[0, 3], b.mean[0, 3] = 1e-12, 1e-9
    drawn = mesh(panels(plots.difference_grid(a, b, difference="ratio"))[0]).get_array()
    assert drawn[0, 3] == 0


def test_difference_with_layer_range_scales_each_panel_on_its_own():
    a, b = make_result(THREE, seed=0), make_result(THREE, seed=1)
    fig = plots.difference_grid(a, b, color_range="layer")
    for ax, name in zip(panels(fig), a.layer_names):
        diff = b.values(name) - a.values(name)
        assert mesh(ax).norm.vmax == pytest.approx(np.nanmax(np.abs(diff)))


def test_paper_view_compare_names_both_layers_with_module_types():
    base, aa = base_and_antialiased()
    fig = plots.compare_grid([base, aa], view="paper")
    titles = {ax.get_label(): ax.get_title() for ax in panels(fig)}
    assert titles["layer:base:features.2"].startswith("pool1\nMaxPool2d · s=2")
    assert titles["layer:aa:features.3"].startswith("blurpool1\nBlurPool · s=2")
    assert titles["layer:aa:fc"].startswith("logits\nLinear · global")


# -- probabilities ---------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # random weights: every image one class, expected
def test_probability_plot_has_one_legend_entry_per_image_and_dashes_misclassified_ones():
    from conftest import tiny_classifier

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    measured = shiftlab.measure_invariance(
        tiny_classifier(), images, ShiftGrid.square(2), n_pairs=4, device="cpu", progress=False,
        meta={"label": "tiny", "model": "tiny", "weights": "none", "images": ["a.png", "b.png", "c.png"]})
    truth = measured.reference_argmax.copy()
    truth[1] = (truth[1] + 1) % 10  # image b's top class is not its label
    measured.labels = truth
    fig = plots.probability_plot(measured)
    texts = legend_texts(fig)
    assert texts == ["a.png", "b.png (top class ≠ label)", "c.png", "mean over images"]
    styles = [line.get_linestyle() for line in fig.axes[0].get_lines()[:3]]
    assert styles == ["-", "--", "-"]
    assert "random init" in fig.axes[0].get_title()


# -- issue 25: vector files, colour bars, notes in panels, undefined layers -------------------
def all_artists(fig) -> list:
    return [a for a in fig.findobj() if a is not fig]


def test_pdf_draws_panels_as_images_and_never_through_a_figure_sized_raster(result, tmp_path,
                                                                            monkeypatch):
    from matplotlib.backends.backend_mixed import MixedModeRenderer

    passes = []
    real = MixedModeRenderer.start_rasterizing
    monkeypatch.setattr(MixedModeRenderer, "start_rasterizing",
                        lambda self: (passes.append(1), real(self))[1])
    for color_range in ("layer", "shared"):
        fig = plots.layer_grid(result, color_range=color_range)
        assert not [a for a in all_artists(fig) if a.get_rasterized()]
        assert all(len(ax.images) >= 1 for ax in panels(fig))
        pdf, = plots.save_figure(fig, tmp_path / color_range, formats=("pdf",))
        data = pdf.read_bytes()
        assert data.count(b"/Subtype /Image") >= len(panels(fig))  # cells: embedded images
        assert b"/Font" in data  # titles and ticks: text, not pixels
    assert passes == []  # each pass costs a bitmap of the whole figure, kept until the file is written


def test_each_panels_colour_bar_labels_three_to_five_round_values_in_readable_print(result):
    fig = plots.layer_grid(result, color_range="layer")
    for ax in panels(fig):
        bar = next(a for a in fig.axes if a.get_label() == f"colorbar:{ax.get_label()}")
        labels = [t for t in bar.get_yticklabels() if t.get_text()]
        assert 3 <= len(labels) <= 5, [t.get_text() for t in labels]
        assert all(t.get_fontsize() >= 6 for t in labels)
        values = [float(t.get_text().replace("−", "-")) for t in labels]
        low, high = mesh(ax).get_clim()
        assert values[0] == low == 0 and all(low <= v <= high for v in values)


def test_colour_bars_show_numbers_and_no_numberless_panel_low_high_key(result):
    fig = plots.layer_grid(result, color_range="layer")
    texts = [t.get_text() for a in fig.axes for t in a.get_yticklabels()] + [t.get_text() for t in fig.texts]
    assert not [t for t in texts if "panel" in t and ("low" in t or "high" in t)]
    assert "colorbar" not in [a.get_label() for a in fig.axes]  # no key without numbers
    assert "cosine distance (0 = equivariant)" in bar_label(fig)  # the quantity, named once
    shared = plots.layer_grid(result, color_range="shared")
    labels = [t.get_text() for t in main_bar(shared).get_yticklabels() if t.get_text()]
    assert 3 <= len(labels) <= 5 and all(float(v.replace("−", "-")) >= 0 for v in labels)


def test_a_panel_that_is_0_everywhere_says_so_without_a_meaningless_colour_bar():
    values = np.random.default_rng(0).uniform(0.01, 0.2, size=(3, 16))
    values[0] = 0.0  # features.0: exactly equivariant at every shift
    zero = make_result(THREE, align="bilinear", values=values)
    fig = plots.layer_grid(zero, color_range="layer")
    first, pool = panels(fig)[0], panels(fig)[1]
    assert [t.get_text() for t in first.texts] == ["0 everywhere"] and len(pool.texts) == 0
    labels = [a.get_label() for a in fig.axes]
    assert "colorbar:layer:features.0" not in labels and "colorbar:layer:features.2" in labels
    shared = plots.layer_grid(zero, color_range="shared")  # 0 has a place on a shared scale
    assert [t.get_text() for t in panels(shared)[0].texts] == ["0 everywhere"]
    assert mesh(panels(shared)[0]).norm is mesh(panels(shared)[1]).norm


def test_ratio_difference_titles_give_the_log2_ratio_of_the_means_not_a_difference():
    a = make_result(THREE, align="bilinear", seed=0, meta={"label": "base"})
    b = make_result(THREE, align="bilinear", seed=1, meta={"label": "aa"})
    fig = plots.difference_grid(a, b, difference="ratio")
    for ax, name in zip(panels(fig), a.layer_names):
        title = " ".join(ax.get_title().split())
        expected = math.log2(b.layer_mean(name) / a.layer_mean(name))
        assert "Δμ" not in title and f"log2 μ ratio={panels_module.fmt(expected)}" in title
    assert "log2 μ ratio = log2(aa's μ / base's μ)" in " ".join(t.get_text() for t in fig.texts)
    diff = plots.difference_grid(a, b, difference="diff")
    delta = b.layer_mean("features.0") - a.layer_mean("features.0")
    assert f"Δμ={panels_module.fmt(delta)}" in " ".join(panels(diff)[0].get_title().split())


def test_profile_y_axis_starts_at_0_for_distances_and_psnr_keeps_its_own_range(result):
    assert plots.layer_profile(result).axes[0].get_ylim()[0] == 0
    psnr = make_result(THREE, metric="psnr", align="bilinear",
                       values=np.random.default_rng(3).uniform(20, 40, size=(3, 16)))
    assert plots.layer_profile(psnr).axes[0].get_ylim()[0] > 15


def test_single_model_profile_does_not_say_matched_layers_share_an_x(result):
    assert "matched" not in plots.layer_profile(result).axes[0].get_xlabel()
    assert "matched layers share an x" in plots.layer_profile([result, make_result(THREE, seed=1)]).axes[0].get_xlabel()


def vgg16_like(last_stride: tuple = (32, 32)) -> list[LayerInfo]:
    """VGG16's convolutions, ReLUs and pools (strides 1..32), then two linear layers."""
    layers, index, stride = [], 0, 1
    for convs in (2, 2, 3, 3, 3):
        for _ in range(convs):
            layers += [spatial(f"features.{index}", stride), spatial(f"features.{index + 1}", stride, "ReLU")]
            index += 2
        stride *= 2
        layers.append(spatial(f"features.{index}", stride, "MaxPool2d"))
        index += 1
    layers[-1] = LayerInfo(layers[-1].name, "MaxPool2d", "spatial", tuple(map(float, last_stride)),
                           tuple(map(float, last_stride)), (4, 2, 2))
    return layers + [glob("classifier.0"), glob("classifier.6")]


@pytest.mark.parametrize("last_stride", [(32, 32), (32, 16)])
def test_stride_labels_and_global_never_touch_in_a_paper_view_profile(last_stride):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.layer_profile(make_result(vgg16_like(last_stride), align="bilinear"), view="paper")
    FigureCanvasAgg(fig).draw()
    boxes = [(t.get_text(), t.get_window_extent().expanded(1.0, 1.0).padded(2 * fig.dpi / 72))
             for t in fig.axes[0].texts]  # 2 pt of room around each label
    assert {"s=16", "global"} <= {text for text, _ in boxes}
    assert not [(a, b) for k, (a, box) in enumerate(boxes) for b, other in boxes[k + 1:]
                if box.overlaps(other)]


def undefined_result(metric: str = "cosine", seed: int = 0, label: str = "toy") -> Result:
    """A stride-4 pool under exact alignment on the 0..3 grid: only (0, 0) is defined."""
    layers = [spatial("features.0", 1), spatial("features.2", 4, "MaxPool2d"), glob("classifier.0")]
    return make_result(layers, seed=seed, meta={"model": "toynet", "weights": "random init",
                                                "n_images": 3, "label": label})


UNDEFINED_AT_4 = "undefined: no shift except (0, 0) is defined at stride 4"


def notes(ax) -> list[str]:
    """The texts written across a panel, their line wrapping undone."""
    return [" ".join(t.get_text().split()) for t in ax.texts]


def test_a_layer_with_only_the_identity_shift_defined_says_undefined_not_mu_0():
    undefined = undefined_result()
    assert np.isnan(undefined.map("features.2")).sum() == 15  # the cells: (0, 0) only
    fig = plots.layer_grid(undefined)
    pool = next(ax for ax in panels(fig) if ax.get_label() == "layer:features.2")
    assert notes(pool) == [UNDEFINED_AT_4]
    assert "μ" not in pool.get_title() and "nan" not in pool.get_title() and "n/a" not in pool.get_title()
    assert "colorbar:layer:features.2" not in [a.get_label() for a in fig.axes]
    assert "μ=" in panels(fig)[0].get_title()
    shared = plots.layer_grid(undefined, color_range="shared", view="paper")
    assert notes(panels(shared)[1]) == [UNDEFINED_AT_4]


def test_profiles_leave_a_gap_at_an_undefined_layer_never_a_0():
    undefined = undefined_result()
    fig = plots.layer_profile(undefined, labels=["toy"])
    line, ax = data_line(fig, "toy (random init)")
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()
    assert ax.get_xticklabels()[1].get_color() != ax.get_xticklabels()[0].get_color()
    assert "undefined" in ax.get_xlabel()


def test_compare_and_difference_panels_of_an_undefined_layer_say_so():
    a, b = undefined_result(seed=0, label="a"), undefined_result(seed=1, label="b")
    grid = plots.compare_grid([a, b])
    assert [n for ax in panels(grid) for n in notes(ax)] == [UNDEFINED_AT_4] * 2
    for difference in ("diff", "ratio"):
        fig = plots.difference_grid(a, b, difference=difference)
        pool = panels(fig)[1]
        assert notes(pool) == [UNDEFINED_AT_4]
        assert "μ" not in pool.get_title() and "nan" not in pool.get_title()


def test_padding_figure_treats_an_undefined_layer_as_no_value_not_a_0_gap():
    from shiftlab.figures.boundary import padding_profile

    trained, circular = undefined_result(seed=0), undefined_result(seed=1)
    fig = padding_profile(trained, circular)
    ax = fig.axes[0]
    for line in ax.get_lines()[:2]:
        y = np.asarray(line.get_ydata(), dtype=float)
        assert np.isnan(y[1]) and np.isfinite(y[[0, 2]]).all()
    shaded = ax.collections[0].get_paths()
    xs = np.concatenate([path.vertices[:, 0] for path in shaded])
    assert not np.any(np.isclose(xs, 1.0))  # nothing shaded at the undefined layer
    assert ax.get_xticklabels()[1].get_color() != ax.get_xticklabels()[0].get_color()
    assert ax.get_ylim()[0] == 0
    plt.close(fig)


# -- every layer of both models in compare's figures ------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair() -> tuple[Result, Result]:
    """A circular conv / ReLU / max-pool / conv net and antialias(net, 4): the antialiased
    model's layer '2' is the stride-1 max-pool in front of its BlurPool '3', with no partner."""
    torch.manual_seed(0)
    circular = dict(padding=1, padding_mode="circular")
    net = nn.Sequential(nn.Conv2d(3, 4, 3, **circular), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3, **circular)).eval()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grid = ShiftGrid.square(4)
    tiny = shiftlab.measure(net, images, grid, progress=False, meta={"label": "tiny"})
    tiny_aa = shiftlab.measure(shiftlab.antialias(net, 4), images, grid, progress=False,
                               meta={"label": "tiny+aa4"})
    assert tiny_aa.layer("2").module == "MaxPool2d" and tiny_aa.layer("2").stride == (1.0, 1.0)
    return tiny, tiny_aa


@pytest.mark.parametrize("view", ["all", "paper"])
def test_compare_grid_draws_the_stride1_maxpool_that_has_no_partner_beside_an_empty_panel(tiny_pair, view):
    tiny, tiny_aa = tiny_pair
    fig = plots.compare_grid([tiny, tiny_aa], view=view)
    labels = [ax.get_label() for ax in fig.axes]
    assert len(panels(fig)) == {"all": 4 + 5, "paper": 3 + 4}[view]  # every (view) layer of both
    pool = next(ax for ax in panels(fig) if ax.get_label() == "layer:tiny+aa4:2")
    assert pool.get_title().split("\n")[1].startswith("MaxPool2d · s=1")
    assert np.allclose(mesh(pool).get_array(), tiny_aa.map("2"))
    empty = next(ax for ax in fig.axes if ax.get_label() == "missing:tiny:2")
    assert notes(empty) == ["no partner in tiny"] and not empty.images
    assert "colorbar:missing:tiny:2" not in labels
    x0 = {ax.get_label(): round(ax.get_position().x0, 4) for ax in fig.axes}
    assert x0["missing:tiny:2"] == x0["layer:tiny+aa4:2"]  # stacked in the pool's column


def test_layer_grid_of_one_result_has_no_missing_panels(tiny_pair):
    fig = plots.layer_grid(tiny_pair[1])
    assert [ax.get_label() for ax in panels(fig)] == [f"layer:{n}" for n in tiny_pair[1].layer_names]
    assert not [ax for ax in fig.axes if ax.get_label().startswith("missing:")]


def test_profile_lines_have_a_point_at_every_layer_of_their_own_model(tiny_pair):
    tiny, tiny_aa = tiny_pair
    fig = plots.layer_profile([tiny, tiny_aa])
    (line_aa, ax), (line_tiny, _) = data_line(fig, "tiny+aa4"), data_line(fig, "tiny")
    assert list(line_aa.get_xdata()) == [0, 1, 2, 3, 4]  # one point per layer of tiny+aa4
    assert np.allclose(line_aa.get_ydata(), [tiny_aa.layer_mean(n) for n in tiny_aa.layer_names])
    assert list(line_tiny.get_xdata()) == [0, 1, 3, 4]  # nothing of tiny in the stride-1 pool's row
    assert np.allclose(line_tiny.get_ydata(), [tiny.layer_mean(n) for n in tiny.layer_names])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "– / 2", "2 / 3", "3 / 4"]
    assert "no layer here" in ax.get_xlabel()


def test_difference_figure_names_the_row_without_a_partner_and_subtracts_nothing(tiny_pair):
    tiny, tiny_aa = tiny_pair
    fig = plots.difference_grid(tiny, tiny_aa)
    assert [ax.get_label() for ax in panels(fig)] == ["layer:0", "layer:1", "layer:2", "layer:3", "layer:4"]
    alone = panels(fig)[2]
    assert alone.get_title().split("\n")[0] == "2 (tiny+aa4)" and "Δμ" not in alone.get_title()
    assert notes(alone) == ["no partner in tiny: nothing to subtract"] and not alone.images
    matched = panels(fig)[3]  # matched rows as before: b − a on one shared scale
    assert matched.get_title().split("\n")[0] == "2→3"
    assert np.allclose(mesh(matched).get_array(), tiny_aa.map("3") - tiny.map("2"))
    assert len(colorbars(fig)) == 1
    reverse = plots.difference_grid(tiny_aa, tiny)  # the layer of a: labelled with a's label
    alone = next(ax for ax in panels(reverse) if ax.get_label() == "layer:tiny+aa4:2")
    assert notes(alone) == ["no partner in tiny: nothing to subtract"]
