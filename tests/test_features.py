"""Feature extraction and its cache: incremental, resumable, order-preserving, labels attached.

Uses VGG16 with weights=None at 32 px (the cheapest backbone here) on a few dozen generated
images; the cache logic is the same for every backbone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.backbones import random_weights_file, weights_fingerprint
from tasks.errors import ConfigError, InputError
from tasks.features import (
    extract_features,
    extract_features_task,
    feature_cache_dir,
    feature_model,
    image_dataset,
    labelled_images,
    load_features,
    load_split_features,
    shard_index,
)
from tests.imagegen import image_bytes
from tests.prepared import make_prepared_dir

BACKBONE = "vgg16"
SIZE = 32


def _snapshot(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every file, temporary ones included."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(cache_dir).iterdir()}


@pytest.fixture
def data_dir(tmp_path) -> Path:
    # 36 labelled images plus rows that must never be read
    return make_prepared_dir(tmp_path, unlabelled=3, quarantined=2)


def test_only_ok_rows_of_labelled_splits_are_used(data_dir):
    rows = labelled_images(data_dir)
    assert len(rows) == 36
    assert set(rows["split"]) == {"train", "validation", "test"}
    assert rows["sha256"].is_unique
    assert all(Path(p).is_file() for p in rows["path"])
    assert dict(zip(rows["label"], rows["label_index"])) == {"cat": 0, "dog": 1}


def test_missing_manifest_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="prepare_data"):
        extract_features(tmp_path, BACKBONE, None, SIZE)
    assert not any(tmp_path.iterdir())  # no random draw or cache folder left behind


def test_image_dataset_keeps_order_and_gives_float_pixels(tmp_path):
    paths = []
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250)] * 3):
        path = tmp_path / f"{i}.jpg"
        Image.new("RGB", (40, 30), colour).save(path, quality=95)
        paths.append(path)
    batches = list(image_dataset(paths, 16, batch_size=4))
    assert [tuple(b.shape) for b in batches] == [(4, 16, 16, 3), (4, 16, 16, 3), (1, 16, 16, 3)]
    pixels = np.concatenate([b.numpy() for b in batches])
    assert pixels.dtype == np.float32 and 0 <= pixels.min() and pixels.max() <= 255
    np.testing.assert_array_equal(pixels.mean(axis=(1, 2)).argmax(axis=1), [0, 1, 2] * 3)


def test_image_dataset_pixels_match_pillow_at_native_size(tmp_path):
    path = tmp_path / "cat.jpg"
    path.write_bytes(image_bytes("cat", 3, size=(32, 32)))
    (batch,) = list(image_dataset([path], 32, batch_size=1))
    expected = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert np.abs(batch.numpy()[0] - expected).mean() < 1.5  # IDCT rounding differs by a level or two


def test_second_run_computes_nothing_and_writes_nothing(data_dir):
    first = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert first["computed"] == 36 and first["reused"] == 0 and first["feature_dim"] == 512
    cache_dir = Path(first["cache_dir"])
    assert cache_dir == feature_cache_dir(data_dir, BACKBONE, None, SIZE)
    kept = random_weights_file(data_dir, BACKBONE)  # weights=None: the folder's one kept random draw
    assert cache_dir.name == f"vgg16-{weights_fingerprint(str(kept))}-32"
    assert len(list(cache_dir.glob("shard-*.npz"))) == 3  # 16 + 16 + 4
    before = _snapshot(cache_dir)
    second = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert second["computed"] == 0 and second["reused"] == 36
    assert _snapshot(cache_dir) == before


def test_adding_ten_percent_computes_only_the_new_images(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 20})  # 40 images
    extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    cache_dir = feature_cache_dir(data_dir, BACKBONE, None, SIZE)
    before = _snapshot(cache_dir)
    make_prepared_dir(tmp_path, {"train": 2}, seed0=500)  # +4 images (10%)
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert (result["computed"], result["reused"]) == (4, 40)
    after = _snapshot(cache_dir)
    assert {k: after[k] for k in before} == before  # old shards untouched
    assert len(after) == len(before) + 1


def test_interrupted_run_resumes_without_recomputing_finished_shards(data_dir):
    def crash_after_first_shard(path: Path, written: int) -> None:
        raise RuntimeError(f"simulated crash after {written}")

    with pytest.raises(RuntimeError, match="simulated crash after 8"):
        extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=8,
                         on_shard=crash_after_first_shard)
    cache_dir = feature_cache_dir(data_dir, BACKBONE, None, SIZE)
    kept = _snapshot(cache_dir)
    assert len(shard_index(cache_dir)) == 8
    resumed = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=8)
    assert (resumed["computed"], resumed["reused"]) == (28, 8)
    assert {k: _snapshot(cache_dir)[k] for k in kept} == kept
    assert len(shard_index(cache_dir)) == 36


def test_killed_process_keeps_finished_shards_and_the_next_run_continues(data_dir):
    """SIGKILL (no cleanup code runs) while a shard is pending: finished shards stay valid."""
    script = textwrap.dedent(f"""
        import time
        from tasks.features import extract_features
        def stall(path, written):
            print("shard", written, flush=True)
            time.sleep(120)  # the parent kills us here, with the next shard half-computed
        extract_features({str(data_dir)!r}, {BACKBONE!r}, None, {SIZE}, batch_size=4, shard_size=12,
                         on_shard=stall)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        line = child.stdout.readline()
        assert line.strip() == "shard 12", line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cache_dir = feature_cache_dir(data_dir, BACKBONE, None, SIZE)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # nothing half-written visible
    resumed = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=12)
    assert (resumed["computed"], resumed["reused"]) == (24, 12)


@pytest.fixture
def extracted(data_dir):
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=10)
    return data_dir, Path(result["cache_dir"])


def test_load_features_follows_the_requested_order_and_names_missing_hashes(extracted):
    data_dir, cache_dir = extracted
    shas = labelled_images(data_dir)["sha256"].tolist()
    forward = load_features(cache_dir, shas)
    backward = load_features(cache_dir, shas[::-1])
    np.testing.assert_array_equal(backward, forward[::-1])
    assert len({row.tobytes() for row in forward}) == len(shas)  # distinct images, distinct rows
    assert load_features(cache_dir, []).shape == (0, 512)
    with pytest.raises(ConfigError, match="deadbeef"):
        load_features(cache_dir, [shas[0], "deadbeef" * 8])


def test_labels_stay_attached_cat_0_dog_1(extracted):
    """Cats are warm and dogs cool in the generated images: the label must agree with the pixels."""
    data_dir, cache_dir = extracted
    rows = labelled_images(data_dir).set_index("sha256")
    for split, per_class in (("train", 10), ("validation", 4), ("test", 4)):
        features, labels, shas = load_split_features(data_dir, cache_dir, split)
        assert features.shape == (2 * per_class, 512) and labels.dtype == np.int32
        assert sorted(labels.tolist()) == [0] * per_class + [1] * per_class
        for sha, label in zip(shas, labels):
            red, _, blue = np.asarray(Image.open(rows.loc[sha, "path"]), dtype=float).mean(axis=(0, 1))
            assert label == (0 if red > blue else 1)
            assert rows.loc[sha, "split"] == split
    with pytest.raises(ConfigError, match="unlabelled"):
        load_split_features(data_dir, cache_dir, "unlabelled")


def test_cache_is_keyed_by_weights_and_input_size(extracted, tmp_path):
    data_dir, cache_dir = extracted
    weights = tmp_path / "vgg.weights.h5"
    from tasks.backbones import build_backbone

    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    other_size = extract_features(data_dir, BACKBONE, None, 40, batch_size=16)
    from_file = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16)
    assert other_size["computed"] == 36 and from_file["computed"] == 36
    assert Path(other_size["cache_dir"]).name.endswith("-40")
    assert Path(other_size["cache_dir"]).name.startswith("vgg16-file-")
    assert Path(from_file["cache_dir"]).name.startswith("vgg16-file-")
    assert len({cache_dir, Path(other_size["cache_dir"]), Path(from_file["cache_dir"])}) == 3


def test_cached_rows_are_the_features_of_their_own_image(data_dir, tmp_path):
    """Rows from several shards, asked for in shuffled order, equal a direct forward pass of their image.

    A local weights file makes the cache's model and the direct model identical
    (weights=None would draw new random weights for each build).
    """
    from tasks.backbones import build_backbone

    weights = tmp_path / "vgg.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    result = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=8, shard_size=10)
    rows = labelled_images(data_dir).sample(frac=1.0, random_state=0).head(9)
    model = feature_model(BACKBONE, str(weights), SIZE)
    direct = np.concatenate([model(b, training=False).numpy() for b in image_dataset(rows["path"], SIZE, 8)])
    cached = load_features(result["cache_dir"], rows["sha256"].tolist())
    assert cached.dtype == np.float32
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-4)


def test_missing_or_corrupt_arranged_images_are_input_errors_naming_the_file(data_dir):
    rows = labelled_images(data_dir)
    victim = Path(rows["path"].iloc[5])
    victim.unlink()
    with pytest.raises(InputError, match=victim.name):
        extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4)
    victim.write_bytes(b"not a jpeg at all")
    with pytest.raises(InputError, match="could not be decoded") as caught:
        extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=4)
    assert rows["path"].iloc[4].split("/")[-1] in str(caught.value)  # the failing batch is named
    assert len(shard_index(feature_cache_dir(data_dir, BACKBONE, None, SIZE))) == 4  # earlier shard kept


def test_an_unreadable_shard_is_recomputed_not_fatal(extracted):
    data_dir, cache_dir = extracted
    victim = sorted(cache_dir.glob("shard-*.npz"))[0]
    victim.write_bytes(b"bit rot")
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=10)
    assert (result["computed"], result["reused"]) == (10, 26)
    assert load_features(cache_dir, labelled_images(data_dir)["sha256"].tolist()).shape == (36, 512)


def test_a_weights_file_that_does_not_fit_leaves_no_cache_folder(data_dir, tmp_path):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not weights")
    with pytest.raises(ConfigError, match="junk.weights.h5"):
        extract_features(data_dir, BACKBONE, str(junk), SIZE)
    assert not (data_dir / "features").exists()


def test_bad_arguments_are_config_errors(data_dir):
    with pytest.raises(ConfigError, match="shard_size"):
        extract_features(data_dir, BACKBONE, None, SIZE, shard_size=0)
    with pytest.raises(ConfigError, match="resnet50"):
        extract_features(data_dir, "resnet", None, SIZE)


def test_prefect_task_returns_only_a_small_summary(data_dir):
    result = extract_features_task.fn(str(data_dir), BACKBONE, None, SIZE, batch_size=16)
    assert set(result) == {"cache_dir", "computed", "reused", "feature_dim", "images"}
    assert isinstance(result["cache_dir"], str) and result["computed"] == 36
    assert pd.Series(result).map(lambda v: isinstance(v, (str, int))).all()


def test_feature_model_saves_and_loads_in_safe_mode_with_preprocessing_inside(tmp_path):
    """The fine-tuned model starts from this graph: it must reload without Lambda layers or custom code flags."""
    import keras

    from tasks.backbones import Preprocess, get_backbone

    model = feature_model("mobilenet_v2", None, SIZE)
    assert [type(layer).__name__ for layer in model.layers[:2]] == ["InputLayer", "Preprocess"]
    assert isinstance(model.layers[-1], keras.Model)  # the backbone, for fine-tuning
    path = tmp_path / "features.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    pixels = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    np.testing.assert_allclose(reloaded(pixels, training=False), model(pixels, training=False), rtol=1e-5, atol=1e-5)
    backbone = model.layers[-1]
    spec = get_backbone("mobilenet_v2")
    np.testing.assert_allclose(model(pixels, training=False), backbone(spec.preprocess_input(pixels.copy())),
                               rtol=1e-4, atol=1e-4)
    assert isinstance(reloaded.get_layer("preprocess"), Preprocess)


def test_mixed_precision_features_are_stored_as_float32(data_dir):
    """The GPU path's float16 activations must land in the cache as float32 (float16 also runs on CPU)."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=16)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    features = load_features(result["cache_dir"], labelled_images(data_dir)["sha256"].tolist())
    assert features.dtype == np.float32 and features.shape == (36, 512)
    assert np.isfinite(features).all() and features.std() > 0


def test_random_weights_are_one_kept_draw_so_cached_features_can_be_recomputed(data_dir):
    """weights=None must name loadable weights: the cache rows equal a fresh model on the kept file."""
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8)
    kept = random_weights_file(data_dir, BACKBONE)
    rows = labelled_images(data_dir).head(4)
    cached = load_features(Path(result["cache_dir"]), rows["sha256"].tolist())
    model = feature_model(BACKBONE, str(kept), SIZE)
    fresh = np.concatenate([model(batch, training=False).numpy() for batch in image_dataset(rows["path"].tolist(), SIZE, 4)])
    np.testing.assert_allclose(cached, fresh, rtol=1e-4, atol=1e-5)
    assert extract_features(data_dir, BACKBONE, None, SIZE)["computed"] == 0  # a new process would reuse it too
