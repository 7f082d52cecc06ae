"""The end-to-end model and fine-tuning: same numbers as the head, BatchNorm untouched, safe reload.

Uses MobileNetV2 (weights=None, 32 px) because it is full of BatchNormalization layers and
small enough to fine-tune in seconds; random weights are kept as a weights file exactly as
the flow does it.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

import tasks.learning.preprocess  # noqa: F401  (registers the Preprocess layer for loading)
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import fine_tune_start, random_weights_file
from tasks.learning.features import extract_features
from tasks.learning.finetune import (
    FineTuneParams,
    batchnorm_layers,
    build_end_to_end,
    find_backbone,
    fine_tune_model,
    head_agreement,
    keep_if_better,
    labelled_batches,
)
from tasks.learning.forward import compiled_forward, to_numpy
from tasks.learning.pixels import read_image
from tasks.learning.head import HeadParams, inference_copy, save_model, train_head
from tests.prepared import make_prepared_dir


BACKBONE = "mobilenet_v2"
SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A prepared folder, its kept random backbone, cached features and a trained head."""
    tmp_path = tmp_path_factory.mktemp("finetune")
    data_dir = make_prepared_dir(tmp_path, {"train": 6, "validation": 3, "test": 1})
    folder = DataFolder(data_dir)
    weights = str(random_weights_file(folder, BACKBONE))
    features = extract_features(data_dir, BACKBONE, weights, SIZE, batch_size=16)
    head = train_head(folder, Path(features.cache_dir), tmp_path / "run", BACKBONE,
                      HeadParams(dense_units=8, epochs=3, batch_size=8, seed=1))
    return {"data_dir": data_dir, "folder": folder, "weights": weights, "cache_dir": Path(features.cache_dir),
            "head_path": Path(head.head_path), "tmp": tmp_path}


def _pixels(setup, split="validation"):
    rows = setup["folder"].labelled_rows(split)
    return np.stack([read_image(path, SIZE) for path in rows["path"]]), rows


def _predict(model, pixels) -> np.ndarray:
    return to_numpy(compiled_forward(model)(pixels)).reshape(-1)


def _model(setup):
    return build_end_to_end(BACKBONE, setup["weights"], SIZE, setup["head_path"], seed=3)


@pytest.fixture(scope="module")
def model(setup):
    """The end-to-end model before fine-tuning (tests that use it must not change it)."""
    return _model(setup)


def _bn_stats(model) -> dict[str, np.ndarray]:
    return {v.path: np.array(v.numpy()) for layer in batchnorm_layers(model) for v in layer.non_trainable_weights
            if "moving" in v.path}


def test_random_weights_are_kept_once_per_data_folder(setup):
    path = Path(setup["weights"])
    stamp = path.stat().st_mtime_ns
    assert random_weights_file(setup["folder"], BACKBONE) == path and path.stat().st_mtime_ns == stamp
    assert "file-" in setup["cache_dir"].name  # the feature cache is keyed by the file's content


def test_training_batches_pair_each_image_with_its_label_and_reshuffle_each_epoch(setup):
    dataset = labelled_batches(setup["folder"], "train", SIZE, 4, shuffle_seed=9)
    epochs = []
    for _ in range(2):
        labels = []
        for index in range(len(dataset)):
            pixels, y, weight = dataset[index]
            assert pixels.dtype == np.uint8 and (weight == 1).all()
            warm = pixels[..., 0].mean(axis=(1, 2)) > pixels[..., 2].mean(axis=(1, 2))
            assert np.array_equal(warm, y.reshape(-1) == 0)  # warm cats are 0, cool dogs are 1
            labels.extend(y.reshape(-1).tolist())
        dataset.on_epoch_end()
        epochs.append(labels)
    dataset.decoder.close()
    assert sorted(epochs[0]) == [0.0] * 6 + [1.0] * 6
    assert epochs[0] != epochs[1]
    suspects = frozenset(setup["folder"].split_rows("train").groupby("label")["sha256"].first())  # one of each class
    fewer = labelled_batches(setup["folder"], "train", SIZE, 4, shuffle_seed=9, leave_out=suspects)
    assert sorted(label for index in range(len(fewer)) for label in fewer[index][1].reshape(-1)) == [0.0] * 5 + [1.0] * 5
    fewer.decoder.close()


def test_an_undecodable_training_image_weighs_nothing_instead_of_failing_the_epoch(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 2, "validation": 1, "test": 1})
    folder = DataFolder(data_dir)
    victim = Path(folder.labelled_rows("train")["path"].iloc[1])
    victim.write_bytes(b"broken")
    dataset = labelled_batches(folder, "train", SIZE, 4, shuffle_seed=None)
    _, _, weight = dataset[0]
    dataset.decoder.close()
    assert weight.tolist() == [1.0, 0.0, 1.0, 1.0]


@pytest.mark.backends  # also run on JAX by the test command
def test_end_to_end_model_computes_what_the_head_computed_on_cached_features(setup, model):
    pixels, rows = _pixels(setup)
    p_dog = _predict(model, pixels)
    assert head_agreement(p_dog, setup["head_path"], setup["cache_dir"], rows["sha256"].tolist()) < 1e-4
    assert model.input_shape == (None, SIZE, SIZE, 3) and model.output_shape == (None, 1)
    assert model.inputs[0].dtype == "uint8" and model.outputs[0].dtype == "float32"
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model._flatten_layers())


@pytest.mark.backends  # also run on JAX by the test command
def test_the_served_model_returns_its_head_input_in_the_same_forward_as_the_cache_holds_it(setup, model):
    """The prediction log's features (tasks/learning/head_input.py): the wrapped model's second output is the plain
    view's pooled features, which are the cached training features of the same images, so both summarise alike."""
    from tasks.learning.head_input import FeatureSummary, with_head_input
    from tasks.learning.layers import wrap
    from tasks.learning.shards import load_features

    pixels, rows = _pixels(setup)
    served = wrap(model, tta=True, temperature=1.7)
    p_dog, features = to_numpy(compiled_forward(with_head_input(served))(pixels))
    np.testing.assert_allclose(p_dog, to_numpy(compiled_forward(served)(pixels)), atol=1e-6)  # nothing else changed
    cached = load_features(setup["cache_dir"], rows["sha256"].tolist())
    np.testing.assert_allclose(features, cached, rtol=1e-4, atol=1e-4)
    summary = FeatureSummary.of(served)
    assert summary(features).shape == (len(rows), 32)
    np.testing.assert_allclose(summary(features), summary(cached), atol=1e-3)
    normalize = model.get_layer("head_normalize")  # standardised as the head standardises, then projected
    standardised = to_numpy(normalize(cached))
    np.testing.assert_allclose(summary(cached), standardised @ summary.matrix, rtol=1e-4, atol=1e-4)


def test_augmentation_is_off_at_inference(setup, model):
    pixels, _ = _pixels(setup)
    first = _predict(model, pixels)
    assert np.array_equal(first, _predict(model, pixels))
    floats = pixels.astype(np.float32)
    augmented = model.get_layer("augment_zoom")(model.get_layer("augment_flip")(floats, training=True), training=True)
    assert not np.allclose(to_numpy(augmented), floats)  # but it does change images when training


def test_unfreeze_top_opens_only_the_top_block_and_never_batchnorm(fine_tuned):
    model, _, _, (_, counts) = fine_tuned  # unfreeze_top ran inside fine_tune_model
    backbone = find_backbone(model)
    start = fine_tune_start(backbone, BACKBONE)
    assert counts.trainable_layers > 0 and counts.frozen_batchnorm > 10
    for index, layer in enumerate(backbone.layers):
        if isinstance(layer, keras.layers.BatchNormalization) or index < start:
            assert not layer.trainable, layer.name
    trainable = {v.path for v in model.trainable_weights}
    assert not any("bn" in path.lower() or "batch" in path.lower() for path in trainable)
    assert any(path.startswith("head_dense") for path in trainable)


@pytest.fixture(scope="module")
def fine_tuned(setup):
    """One real fine-tuning run (kept: baseline +inf), with weights snapshotted before it."""
    model = _model(setup)
    before = {v.path: np.array(v.numpy()) for v in model.weights}
    stats = _bn_stats(model)
    history, report = fine_tune_model(model, setup["folder"], BACKBONE, SIZE,
                                      FineTuneParams(epochs=1, learning_rate=1e-3, batch_size=6, seed=5), np.inf)
    return model, before, stats, (history, report)


def test_fine_tuning_changes_the_top_block_but_not_batchnorm_statistics(setup, fine_tuned):
    model, before, stats, (history, report) = fine_tuned
    assert report.improved and len(history["val_loss"]) == 1 and report.epochs_run == 1
    assert stats and all(np.array_equal(value, _bn_stats(model)[path]) for path, value in stats.items())
    after = {v.path: np.array(v.numpy()) for v in model.weights}
    backbone = find_backbone(model)
    start = fine_tune_start(backbone, BACKBONE)
    top = {v.path for layer in backbone.layers[start:] for v in layer.trainable_weights}
    bottom = {v.path for layer in backbone.layers[:start] for v in layer.weights}
    assert any(not np.array_equal(before[p], after[p]) for p in top), "the top block did not train"
    assert all(np.array_equal(before[p], after[p]) for p in bottom), "frozen layers changed"


@pytest.mark.backends  # also run on JAX by the test command
def test_fine_tuned_model_reloads_in_safe_mode_with_the_same_predictions(setup, fine_tuned):
    model = fine_tuned[0]
    path = save_model(inference_copy(model), setup["tmp"] / "fine_tuned.keras")
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert getattr(reloaded, "optimizer", None) is None  # shipped without optimizer state
    pixels, _ = _pixels(setup)
    np.testing.assert_allclose(_predict(reloaded, pixels), _predict(model, pixels), atol=1e-6)
    assert all(not layer.trainable for layer in batchnorm_layers(reloaded))


def test_fine_tuning_that_does_not_beat_the_head_is_undone():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    before = [np.array(w) for w in model.get_weights()]
    model.set_weights([w + 1.0 for w in before])  # what a fine-tuning run would have changed
    assert not keep_if_better(model, before, {"val_loss": [0.50, 0.45]}, baseline_val_loss=0.40)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    model.set_weights([w + 1.0 for w in before])
    assert keep_if_better(model, before, {"val_loss": [0.50, 0.35]}, baseline_val_loss=0.40)
    assert not np.array_equal(before[0], model.get_weights()[0])
