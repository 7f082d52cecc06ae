"""Backbone registry, weights handling and in-model preprocessing (weights=None, tiny inputs, offline)."""

from __future__ import annotations

import shutil

import keras
import numpy as np
import pytest

from tasks.learning.backbones import (
    BACKBONES,
    build_backbone,
    fine_tune_start,
    get_backbone,
    resolve_input_size,
    weights_fingerprint,
)
from tasks.common.errors import ConfigError, InputError
from tasks.learning.preprocess import Preprocess



def _tiny(name: str) -> int:
    return get_backbone(name).min_size


def test_registry_has_the_classics_and_two_fast_ones():
    assert {"vgg16", "resnet50", "inception_v3"} <= set(BACKBONES)
    assert {"efficientnetv2b0", "mobilenet_v2"} <= set(BACKBONES)
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.min_size <= spec.native_size


def test_unknown_backbone_is_a_config_error_listing_the_choices():
    with pytest.raises(ConfigError) as caught:
        get_backbone("resnet5O")
    assert isinstance(caught.value, InputError)  # never retried by Prefect
    message = str(caught.value)
    assert "resnet5O" in message
    for name in BACKBONES:
        assert name in message


def test_input_size_below_the_backbone_minimum_is_rejected():
    with pytest.raises(ConfigError, match="--input-size 75 or more"):
        resolve_input_size("inception_v3", 32)
    assert resolve_input_size("inception_v3", None) == 299
    assert resolve_input_size("resnet50", 48) == 48


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_builds_headless_with_its_feature_dim_and_top_block(name):
    spec = get_backbone(name)
    size = _tiny(name)
    model = build_backbone(name, None, size)
    assert model.output_shape == (None, spec.feature_dim)
    features = model(np.zeros((2, size, size, 3), dtype=np.float32), training=False)
    assert tuple(features.shape) == (2, spec.feature_dim)
    start = fine_tune_start(model, name)
    assert 0 < start < len(model.layers) - 1
    assert model.layers[start].name == spec.fine_tune_at
    # the top block holds trainable weights, so unfreezing it means something
    assert any(layer.weights for layer in model.layers[start:])


@pytest.mark.backends  # also run on JAX by the test command
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_preprocess_layer_equals_the_backbones_own_preprocess_input(name):
    spec = get_backbone(name)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    expected = spec.preprocess_input(pixels.copy())
    got = keras.ops.convert_to_numpy(Preprocess(spec.preprocess_mode)(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_torch_mode_matches_keras_imagenet_utils():
    from keras.applications import imagenet_utils

    pixels = np.random.default_rng(1).uniform(0, 255, (1, 4, 4, 3)).astype(np.float32)
    expected = imagenet_utils.preprocess_input(pixels.copy(), mode="torch")
    got = keras.ops.convert_to_numpy(Preprocess("torch")(pixels))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnetv2b0", "convnext_tiny"])
def test_self_rescaling_backbones_rescale_exactly_once(name):
    """EfficientNetV2/ConvNeXt rescale inside the model, so our layer must be a pass-through."""
    spec = get_backbone(name)
    assert spec.preprocess_mode == "none"
    model = build_backbone(name, None, 32)
    first = [type(layer).__name__ for layer in model.layers[:3]]
    assert "Rescaling" in first or "Normalization" in first


def test_unknown_preprocess_mode_is_rejected():
    with pytest.raises(ConfigError, match="caffe"):
        Preprocess("bgr")


def test_weights_fingerprint_names_the_choice_and_a_file_by_content(tmp_path):
    assert weights_fingerprint(None) == "none"
    assert weights_fingerprint("imagenet") == "imagenet"
    first = tmp_path / "a.weights.h5"
    first.write_bytes(b"weights v1")
    moved = tmp_path / "elsewhere" / "b.weights.h5"
    moved.parent.mkdir()
    shutil.copy(first, moved)
    fingerprint = weights_fingerprint(str(first))
    assert fingerprint.startswith("file-") and len(fingerprint) == len("file-") + 12
    assert weights_fingerprint(moved) == fingerprint
    moved.write_bytes(b"weights v2")
    assert weights_fingerprint(moved) != fingerprint


def test_missing_weights_file_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere.weights.h5"
    with pytest.raises(ConfigError, match="nowhere.weights.h5"):
        weights_fingerprint(str(missing))
    with pytest.raises(ConfigError, match="nowhere.weights.h5"):
        build_backbone("mobilenet_v2", str(missing), 32)


@pytest.fixture(scope="module")
def mobilenet_weights(tmp_path_factory):
    """A local weights file saved from a weights=None backbone: what a firewalled user would bring."""
    model = build_backbone("mobilenet_v2", None, 32)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_notop.weights.h5"
    model.save_weights(str(path))
    return path, model


@pytest.mark.backends  # also run on JAX by the test command
def test_local_weights_file_loads_strictly_at_any_input_size(mobilenet_weights):
    path, source = mobilenet_weights
    loaded = build_backbone("mobilenet_v2", str(path), 48)
    for ours, theirs in zip(loaded.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(ours, theirs)
    fresh = build_backbone("mobilenet_v2", None, 48)
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_weights(), source.get_weights()))


def test_weights_file_of_another_architecture_is_a_config_error(mobilenet_weights):
    path, _ = mobilenet_weights
    with pytest.raises(ConfigError) as caught:
        build_backbone("vgg16", str(path), 32)
    assert str(path) in str(caught.value) and "vgg16" in str(caught.value)


def test_a_file_that_is_not_hdf5_is_a_config_error(tmp_path):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an hdf5 file")
    with pytest.raises(ConfigError, match="junk.weights.h5.*mobilenet_v2"):
        build_backbone("mobilenet_v2", str(junk), 32)


def test_fine_tune_start_rejects_a_model_without_the_layer():
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    with pytest.raises(ConfigError, match="conv5_block1_1_conv"):
        fine_tune_start(other, "resnet50")


def test_imagenet_weights_that_cannot_be_downloaded_give_one_actionable_sentence(monkeypatch):
    """Offline, Keras' download fails deep inside; the user must hear which file and what to do."""
    from keras.src.utils import file_utils

    from tasks.common.errors import AcquireError

    def no_internet(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x_notop.h5: None -- [Errno -2] Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", no_internet)
    with pytest.raises(AcquireError, match=r"ImageNet weights of 'mobilenet_v2'.*--weights PATH"):
        build_backbone("mobilenet_v2", "imagenet", 32)
