"""Typed requests: validated once when built, passed whole; a command refuses options it
would not use."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner

from shiftlab.cli import main
from shiftlab.errors import UsageError
from shiftlab.requests import (CompareRequest, ConsistencyRequest, HeatmapRequest, Inputs,
                               LayerComparison, ModelSpec, Shifts)


def test_model_spec_reads_name_filter_and_weights_from_the_spec_text():
    spec = ModelSpec("resnet50+aa4@lpf4.pth")
    assert (spec.base, spec.filter_size, spec.label) == ("resnet50", 4, "resnet50+aa4")
    assert spec.antialias is None  # +aaK stays in the name; the field is the explicit option


def test_model_spec_antialiased_gives_the_blurpool_version_of_the_same_model():
    spec = ModelSpec("vgg11", weights="none", seed=3).antialiased(5)
    assert (spec.label, spec.weights, spec.seed) == ("vgg11+aa5", "none", 3)


@pytest.mark.parametrize("fields, message", [
    (dict(name="vgg11+aa9"), "filter size must be 1..7"),
    (dict(name="vgg11", antialias=0), "filter size must be 1..7"),
    (dict(name="vgg11+aa3", antialias=4), "give one"),
    (dict(name="vgg11", padding="reflect"), "unknown padding"),
    (dict(name="vgg11", seed=1.5), "seed must be a whole number"),
    (dict(name="vgg11", num_classes=0), "num_classes must be a whole number >= 1"),
    (dict(name="vgg11", mean=(0.5, 0.5)), "--mean takes 1 or 3 finite numbers"),
    (dict(name="vgg11", std=(0.2, 0.0, 0.2)), "--std takes 1 or 3 finite numbers > 0"),
])
def test_model_spec_refuses_a_bad_field_when_built(fields, message):
    with pytest.raises(UsageError, match=message):
        ModelSpec(**fields)


def test_one_channel_statistic_applies_to_all_three():
    assert ModelSpec("vgg11", mean=(0.5,)).mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("build, message", [
    (lambda: Shifts(mode="wrap"), "unknown mode"),
    (lambda: Shifts(grid="hexagonal"), "unknown grid"),
    (lambda: Shifts(max_shift=0), "max_shift must be a whole number >= 1"),
    (lambda: LayerComparison(metric="ssim"), "unknown metric"),
    (lambda: LayerComparison(border=-1), "border must be a whole number >= 0"),
    (lambda: Inputs(size=4), "size must be a whole number >= 8"),
    (lambda: HeatmapRequest(ModelSpec("vgg11"), dtype="float64"), "unknown dtype"),
    (lambda: HeatmapRequest(ModelSpec("vgg11"), comparison=LayerComparison(border=2)),
     "--border applies to --mode crop"),
    (lambda: HeatmapRequest("vgg11"), "model must be a ModelSpec"),
    (lambda: ConsistencyRequest(ModelSpec("vgg11"), protocol="random"), "unknown protocol"),
    (lambda: ConsistencyRequest(ModelSpec("vgg11"), protocol="zhang2019",
                                inputs=Inputs(size=64, resize=64)), "use a --resize above"),
    (lambda: ConsistencyRequest(ModelSpec("vgg11"), protocol="diagonal"), "pass --labels"),
    (lambda: ConsistencyRequest(ModelSpec("vgg11"), labels="val", inputs=Inputs(images=("a",))),
     "drop --images"),
])
def test_requests_refuse_bad_settings_when_built(build, message):
    with pytest.raises(UsageError, match=message):
        build()


def test_requests_are_frozen():
    request = HeatmapRequest(ModelSpec("vgg11"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.batch_size = 2


def test_layer_patterns_are_stripped_and_empty_means_every_layer():
    assert LayerComparison(layers=(" features.* ", "")).layers == ("features.*",)
    assert LayerComparison(layers=(" ",)).layers is None


def test_compare_request_measures_each_model_then_each_blurpool_version():
    template = HeatmapRequest(ModelSpec("vgg11"), inputs=Inputs(size=32))
    request = CompareRequest.of_models([ModelSpec("vgg11"), ModelSpec("resnet18")], template, 4)
    assert [h.model.label for h in request.heatmaps] == \
        ["vgg11", "resnet18", "vgg11+aa4", "resnet18+aa4"]
    assert {h.inputs.size for h in request.heatmaps} == {32}


def test_compare_request_needs_two_models_measured_alike():
    template = HeatmapRequest(ModelSpec("vgg11"))
    with pytest.raises(UsageError, match="needs two models"):
        CompareRequest.of_models([ModelSpec("vgg11")], template)
    other = dataclasses.replace(template, batch_size=2, model=ModelSpec("resnet18"))
    with pytest.raises(UsageError, match="same settings"):
        CompareRequest((template, other))


def _invoke(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("option", [["--align", "exact"], ["--metric", "psnr"],
                                    ["--layers", "nothing.*"], ["--border", "3"]])
def test_consistency_has_no_per_layer_options(option):
    result = _invoke("consistency", "--model", "resnet18", "--weights", "none", *option)
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.mark.parametrize("protocol, option", [
    ("zhang2019", ["--max-shift", "3"]), ("zhang2019", ["--pairs", "10"]),
    ("zhang2019", ["--mode", "crop"]), ("grid", ["--epochs", "2"]), ("grid", ["--workers", "1"]),
])
def test_consistency_refuses_an_option_its_protocol_does_not_use(protocol, option):
    result = _invoke("consistency", "--model", "resnet18", "--weights", "none",
                     "--protocol", protocol, "--resize", "80", "--size", "64", *option)
    assert result.exit_code == 2
    assert f"{option[0]} is not used by --protocol {protocol}" in result.output


def test_consistency_refuses_class_order_without_labels():
    result = _invoke("consistency", "--model", "resnet18", "--class-order", "sorted")
    assert result.exit_code == 2 and "--class-order is not used without --labels" in result.output


def test_compare_of_saved_results_refuses_measurement_options(tmp_path):
    files = [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    result = _invoke("compare", *files, "--size", "64")
    assert result.exit_code == 2 and "--size is not used with saved results" in result.output


def test_heatmap_border_needs_crop_mode():
    result = _invoke("heatmap", "--model", "vgg11", "--weights", "none", "--border", "2")
    assert result.exit_code == 2 and "--border applies to --mode crop" in result.output


def test_pairs_have_an_upper_bound_checked_before_anything_is_allocated():
    with pytest.raises(UsageError, match=r"--pairs must be a whole number in 1\.\.10,000,000"):
        ConsistencyRequest(ModelSpec("vgg11"), pairs=1_000_000_000)
    result = _invoke("consistency", "--model", "resnet18", "--pairs", "1000000000")
    assert result.exit_code == 2 and "10,000,000" in result.output
