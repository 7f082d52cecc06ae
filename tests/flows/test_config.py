"""TrainConfig: the flow's form. Bad values fail before any work with a message that lists the choices."""

from __future__ import annotations

import json
import hashlib

import pytest
from pydantic import ValidationError

from flows.config import TrainConfig


def test_defaults_are_the_documented_recipe():
    config = TrainConfig()
    assert config.backbones == ["resnet50"] and config.weights == "imagenet" and config.input_size is None
    assert config.fine_tune is False and config.fine_tune_learning_rate == 1e-5
    assert config.input_size_for("resnet50") == 224 and TrainConfig(input_size=64).input_size_for("resnet50") == 64


def test_unknown_backbone_fails_listing_the_choices():
    with pytest.raises(ValidationError) as error:
        TrainConfig(backbones=["resnet5"])
    message = str(error.value)
    assert "resnet5" in message and "resnet50" in message and "vgg16" in message


@pytest.mark.parametrize("values, fragment", [
    ({"backbones": []}, "at least one"),
    ({"backbones": ["vgg16", "VGG16"]}, "twice"),
    ({"backbones": ["inception_v3"], "input_size": 32}, "minimum 75"),
    ({"backbones": ["vgg16", "resnet50"], "weights": "/w/vgg16.weights.h5"}, "single backbone"),
    ({"dropout": 1.0}, "dropout"),
    ({"head_epochs": 0}, "head_epochs"),
    ({"batch_sise": 8}, "batch_sise"),  # typos are errors, not silently ignored
    ({"precision": "int8", "engine": "keras"}, "int8 runs only on OpenVINO; use --engine openvino"),
    ({"engine": "onnx"}, "engine"),
])
def test_bad_values_are_rejected(values, fragment):
    with pytest.raises(ValidationError, match=fragment):
        TrainConfig(**values)


def test_names_and_weights_are_normalised():
    config = TrainConfig(backbones=[" VGG16 "], weights="None")
    assert config.backbones == ["vgg16"] and config.weights is None
    assert TrainConfig(weights="ImageNet").weights == "imagenet"


def test_json_round_trip_and_schema_make_a_form():
    config = TrainConfig(backbones=["vgg16", "mobilenet_v2"], weights=None, input_size=32, fine_tune=True)
    assert TrainConfig.model_validate_json(config.model_dump_json()) == config
    schema = TrainConfig.model_json_schema()
    assert {"backbones", "weights", "input_size", "fine_tune", "seed"} <= set(schema["properties"])


def test_config_hash_is_content_only_and_sensitive_to_every_field():
    config = TrainConfig(backbones=["vgg16"], weights=None, input_size=32)
    canonical = json.dumps(config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert config.config_hash() == hashlib.sha256(canonical.encode()).hexdigest()  # no id(), no hash() salt
    assert TrainConfig(input_size=32, weights=None, backbones=["vgg16"]).config_hash() == config.config_hash()
    hashes = {config.config_hash()}
    for change in ({"seed": 1}, {"fine_tune": True}, {"input_size": 48}, {"dropout": 0.3}, {"weights": "imagenet"},
                   {"decoder": "pillow"}, {"precision": "float32"}, {"engine": "openvino"}):
        hashes.add(config.model_copy(update=change).config_hash())
    assert len(hashes) == 9


def test_subclasses_hash_only_the_training_fields():
    class WithExtras(TrainConfig):
        note: str = ""

    base = TrainConfig(backbones=["vgg16"])
    extended = WithExtras(backbones=["vgg16"], note="nightly")
    assert extended.config_hash() == base.config_hash()
    assert set(extended.section(TrainConfig).model_dump()) == set(TrainConfig.model_fields)
    json.dumps(extended.section(TrainConfig).model_dump(mode="json"))


def test_a_weights_file_enters_the_hash_by_content_not_path(tmp_path):
    first, moved = tmp_path / "a.weights.h5", tmp_path / "moved" / "b.weights.h5"
    first.write_bytes(b"weights one")
    moved.parent.mkdir()
    moved.write_bytes(b"weights one")
    config = TrainConfig(backbones=["vgg16"], weights=str(first))
    assert config.config_hash() == TrainConfig(backbones=["vgg16"], weights=str(moved)).config_hash()
    before = config.config_hash()
    first.write_bytes(b"weights two: replaced at the same path")
    assert config.config_hash() != before


def test_threshold_names_of_the_command_line_are_accepted_at_the_top_level():
    """`--params '{"config": {"min_per_class": 10}}'` means what `--min-per-class 10` means."""
    from flows.config import DataConfig, RetrainConfig
    from tasks.data.validate import ValidationThresholds

    flat = RetrainConfig.model_validate({"min_per_class": 10, "max_class_imbalance": 3,
                                         "thresholds": {"min_per_class_per_split": 1}})
    assert flat.thresholds == ValidationThresholds(min_per_class=10, max_class_imbalance=3.0, min_per_class_per_split=1)
    assert flat == RetrainConfig.model_validate(flat.model_dump(mode="json"))  # dumps nested, reads back the same
    assert DataConfig.model_validate({"min_per_class": 10}).thresholds.min_per_class == 10
    same = RetrainConfig.model_validate({"min_per_class": 10, "thresholds": {"min_per_class": 10}})
    assert same.thresholds.min_per_class == 10  # given twice alike is no conflict
    with pytest.raises(ValidationError, match="min_per_class is given twice, 10 at the top and 20 in thresholds; "
                                              "give it once"):
        RetrainConfig.model_validate({"min_per_class": 10, "thresholds": {"min_per_class": 20}})
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        RetrainConfig.model_validate({"min_per_class": -1})  # checked like the nested field
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        RetrainConfig.model_validate({"min_per_klass": 10})


def test_the_deployment_schema_lists_the_flat_threshold_names_so_prefect_accepts_them():
    from prefect.utilities.callables import parameter_schema

    from flows.retrain import retrain

    schema = parameter_schema(retrain).model_dump()["definitions"]["RetrainConfig"]
    assert schema["additionalProperties"] is False  # unknown keys are still refused before a run is created
    assert schema["properties"]["min_per_class"]["type"] == "integer"
    assert "default" not in schema["properties"]["min_per_class"]  # absent: the nested value (or its default) holds
    assert schema["properties"]["min_per_class"]["description"].startswith("Same as thresholds.min_per_class")


def test_a_model_name_carries_its_own_data_folder_and_experiment():
    """One data folder and one experiment per set of classes, cats-vs-dogs keeping `data/` and its experiment."""
    from flows.config import PredictConfig, RetrainConfig
    from flows.retrain import build_parser, config_from_args

    assert (RetrainConfig().data_dir, RetrainConfig().experiment) == ("data", "cats-vs-dogs")
    flowers = config_from_args(build_parser().parse_args(["--model-name", "flowers"]))
    assert (flowers.data_dir, flowers.experiment, flowers.model_name) == ("data-flowers", "flowers", "flowers")
    assert RetrainConfig.model_validate(flowers.model_dump(mode="json")) == flowers
    given = RetrainConfig(model_name="flowers", data_dir="/srv/blooms", experiment="blooms")
    assert (given.data_dir, given.experiment) == ("/srv/blooms", "blooms")
    assert PredictConfig(images="new/", model_uri="models:/flowers@champion").data_dir == "data-flowers"
    assert PredictConfig(images="new/").data_dir == "data"
