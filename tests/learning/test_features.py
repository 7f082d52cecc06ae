"""Feature extraction and its cache: incremental, resumable, order-preserving, labels attached.

Uses VGG16 with weights=None at 32 px (the cheapest backbone here) on a few dozen generated
images; the cache logic is the same for every backbone.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.common.errors import ConfigError, DatasetValidationError, InputError
from tasks.data.datafolder import DataFolder
from tasks.learning.backbones import random_weights_file, weights_fingerprint
from tasks.learning.extractor import feature_model
from tasks.learning.features import PLANS_DIR, extract_features, extract_shard, load_plan
from tasks.learning.forward import compiled_forward, to_numpy
from tasks.learning.pixels import read_image
from tasks.learning.shards import feature_cache_dir, load_features, load_split_features, shard_index
from tests.imagegen import image_bytes
from tests.prepared import make_prepared_dir


BACKBONE = "vgg16"
SIZE = 32


def _snapshot(cache_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of every shard and meta file (plans are bookkeeping, not results)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in Path(cache_dir).iterdir() if p.is_file()}


def _rows(data_dir: Path):
    return DataFolder(data_dir).labelled_rows()


def _direct(model, paths) -> np.ndarray:
    """Features of `paths` straight from a model on the one input pipeline's pixels."""
    pixels = np.stack([read_image(path, SIZE) for path in paths])
    return to_numpy(compiled_forward(model)(pixels))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    # 36 labelled images plus rows that must never be read
    return make_prepared_dir(tmp_path, unlabelled=3, quarantined=2)


def test_only_ok_rows_of_labelled_splits_are_used(data_dir):
    rows = _rows(data_dir)
    assert len(rows) == 36
    assert set(rows["split"]) == {"train", "validation", "test"}
    assert rows["sha256"].is_unique and rows["sha256"].is_monotonic_increasing
    assert all(Path(p).is_file() for p in rows["path"])
    assert dict(zip(rows["label"], rows["y"])) == {"cat": 0, "dog": 1}


def test_missing_manifest_is_a_dataset_error(tmp_path):
    with pytest.raises(DatasetValidationError, match="prepare_data"):
        extract_features(tmp_path, BACKBONE, None, SIZE)
    assert not any(tmp_path.iterdir())  # no random draw or cache folder left behind


@pytest.mark.backends  # also run on JAX by the test command
def test_second_run_computes_nothing_and_writes_nothing(data_dir):
    first = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert first.computed == 36 and first.reused == 0 and first.feature_dim == 512 and first.failed == 0
    cache_dir = Path(first.cache_dir)
    folder = DataFolder(data_dir)
    assert cache_dir == feature_cache_dir(folder, BACKBONE, None, SIZE)
    kept = random_weights_file(folder, BACKBONE)  # weights=None: the folder's one kept random draw
    assert cache_dir.name == f"vgg16-{weights_fingerprint(str(kept))}-32-float32-{first.backend}-{first.decoder}"
    assert len(list(cache_dir.glob("shard-*.npz"))) == 3  # 16 + 16 + 4
    before = _snapshot(cache_dir)
    second = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert second.computed == 0 and second.reused == 36
    assert _snapshot(cache_dir) == before


def test_adding_ten_percent_computes_only_the_new_images(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 20})  # 40 images
    extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    cache_dir = feature_cache_dir(DataFolder(data_dir), BACKBONE, None, SIZE)
    before = _snapshot(cache_dir)
    make_prepared_dir(tmp_path, {"train": 2}, seed0=500)  # +4 images (10%)
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=16)
    assert (result.computed, result.reused) == (4, 40)
    after = _snapshot(cache_dir)
    assert {k: after[k] for k in before} == before  # old shards untouched
    assert len(after) == len(before) + 1


def test_interrupted_run_resumes_without_recomputing_finished_shards(data_dir):
    def crash_after_first_shard(path: Path, written: int) -> None:
        raise RuntimeError(f"simulated crash after {written}")

    with pytest.raises(RuntimeError, match="simulated crash after 8"):
        extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=8,
                         on_shard=crash_after_first_shard)
    cache_dir = feature_cache_dir(DataFolder(data_dir), BACKBONE, None, SIZE)
    kept = _snapshot(cache_dir)
    assert len(shard_index(cache_dir).rows) == 8
    resumed = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=8)
    assert (resumed.computed, resumed.reused) == (28, 8)
    assert {k: _snapshot(cache_dir)[k] for k in kept} == kept
    assert len(shard_index(cache_dir).rows) == 36


def test_killed_process_keeps_finished_shards_and_the_next_run_continues(data_dir):
    """SIGKILL (no cleanup code runs) while a shard is pending: finished shards stay valid."""
    script = textwrap.dedent(f"""
        import time
        from tasks.learning.features import extract_features
        def stall(path, written):
            print("shard", written, flush=True)
            time.sleep(120)  # the parent kills us here, with the next shard half-computed
        extract_features({str(data_dir)!r}, {BACKBONE!r}, None, {SIZE}, batch_size=4, shard_size=12,
                         on_shard=stall)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        line = child.stdout.readline()
        assert line.strip() == "shard 12", line
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cache_dir = feature_cache_dir(DataFolder(data_dir), BACKBONE, None, SIZE)
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".") and p.is_file()]  # nothing half-written
    resumed = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=12)
    assert (resumed.computed, resumed.reused) == (24, 12)


@pytest.fixture
def extracted(data_dir):
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=10)
    return data_dir, Path(result.cache_dir)


def test_load_features_follows_the_requested_order_and_names_missing_hashes(extracted):
    data_dir, cache_dir = extracted
    shas = _rows(data_dir)["sha256"].tolist()
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
    folder = DataFolder(data_dir)
    rows = _rows(data_dir).set_index("sha256")
    for split, per_class in (("train", 10), ("validation", 4), ("test", 4)):
        features, labels, shas = load_split_features(folder, cache_dir, split)
        assert features.shape == (2 * per_class, 512) and labels.dtype == np.int32
        assert sorted(labels.tolist()) == [0] * per_class + [1] * per_class
        for sha, label in zip(shas, labels):
            red, _, blue = np.asarray(Image.open(rows.loc[sha, "path"]), dtype=float).mean(axis=(0, 1))
            assert label == (0 if red > blue else 1)
            assert rows.loc[sha, "split"] == split
    with pytest.raises(DatasetValidationError, match="unlabelled"):
        load_split_features(folder, cache_dir, "unlabelled")


def test_cache_is_keyed_by_weights_input_size_precision_and_decoder(extracted, tmp_path):
    data_dir, cache_dir = extracted
    weights = tmp_path / "vgg.weights.h5"
    from tasks.learning.backbones import build_backbone

    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    other_size = extract_features(data_dir, BACKBONE, None, 40, batch_size=16)
    from_file = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16)
    in_bf16 = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=16, precision="bfloat16")
    by_pillow = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=16, decoder="pillow")
    assert other_size.computed == from_file.computed == in_bf16.computed == by_pillow.computed == 36
    assert Path(cache_dir).name.endswith("-opencv") and Path(by_pillow.cache_dir).name.endswith("-pillow")
    assert json.loads((Path(by_pillow.cache_dir) / "meta.json").read_text())["decoder"] == "pillow"
    assert "-40-float32-" in Path(other_size.cache_dir).name
    assert Path(other_size.cache_dir).name.startswith("vgg16-file-")
    assert Path(from_file.cache_dir).name.startswith("vgg16-file-")
    assert "-32-bfloat16-" in Path(in_bf16.cache_dir).name and in_bf16.precision == "bfloat16"
    names = {cache_dir, Path(other_size.cache_dir), Path(from_file.cache_dir), Path(in_bf16.cache_dir),
             Path(by_pillow.cache_dir)}
    assert len(names) == 5  # features of another precision or decoder never mix with these


@pytest.mark.backends  # also run on JAX by the test command
def test_cached_rows_are_the_features_of_their_own_image(data_dir, tmp_path):
    """Rows from several shards, asked for in shuffled order, equal a direct forward pass of their image."""
    from tasks.learning.backbones import build_backbone

    weights = tmp_path / "vgg.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    result = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=8, shard_size=10)
    rows = _rows(data_dir).sample(frac=1.0, random_state=0).head(9)
    direct = _direct(feature_model(BACKBONE, str(weights), SIZE), rows["path"])
    cached = load_features(result.cache_dir, rows["sha256"].tolist())
    assert cached.dtype == np.float32
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-4)


def test_a_missing_image_is_an_input_error_and_a_corrupt_one_fails_alone(data_dir):
    rows = _rows(data_dir)
    victim = Path(rows["path"].iloc[5])
    victim.unlink()
    with pytest.raises(InputError, match=victim.name):
        extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4)
    victim.write_bytes(b"not a jpeg at all")
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=4)
    assert (result.computed, result.failed) == (35, 1)  # the batch and the run go on
    index = shard_index(result.cache_dir)
    assert len(index.rows) == 35 and "not an image" in index.failed[rows["sha256"].iloc[5]]
    split = rows["split"].iloc[5]
    features, _, shas = load_split_features(DataFolder(data_dir), result.cache_dir, split)
    assert rows["sha256"].iloc[5] not in shas and len(features) == (rows["split"] == split).sum() - 1
    victim.write_bytes(image_bytes("cat", 4242))  # repaired: the next run computes it
    again = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=4, shard_size=4)
    assert (again.computed, again.failed, again.reused) == (1, 0, 35)


def test_an_unreadable_shard_is_recomputed_not_fatal(extracted):
    data_dir, cache_dir = extracted
    victim = sorted(cache_dir.glob("shard-*.npz"))[0]
    victim.write_bytes(b"bit rot")
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=10)
    assert (result.computed, result.reused) == (10, 26)
    assert load_features(cache_dir, _rows(data_dir)["sha256"].tolist()).shape == (36, 512)


def test_a_shard_with_flipped_bytes_is_set_aside_and_recomputed(extracted, caplog):
    """Bit rot inside the features array (the zip CRC catches it) must not break every later run."""
    data_dir, cache_dir = extracted
    victim = sorted(cache_dir.glob("shard-*.npz"))[1]
    data = bytearray(victim.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    victim.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8, shard_size=10)
    assert result.computed == 10 and result.reused == 26
    assert (cache_dir / f".corrupt-{victim.name}").is_file()  # kept for inspection, never read again
    assert any(victim.name in record.getMessage() and "failed its check" in record.getMessage()
               for record in caplog.records)
    assert load_features(cache_dir, _rows(data_dir)["sha256"].tolist()).shape == (36, 512)


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


def test_prefect_steps_pass_only_small_summaries(data_dir):
    from tasks.learning import steps

    plan = steps.plan_features.fn(str(data_dir), BACKBONE, str(random_weights_file(DataFolder(data_dir), BACKBONE)),
                                  SIZE, "float32", "opencv", 16)
    assert plan.shards == 3 and plan.todo == 36 and Path(plan.plan_path).is_file()
    shards = [steps.extract_shard.fn(plan.plan_path, index, 16) for index in range(plan.shards)]
    summary = steps.feature_summary(plan, shards)
    assert summary.computed == 36 and summary.reused == 0 and summary.cache_dir == plan.cache_dir
    for value in (*plan.model_dump().values(), *summary.model_dump().values(), *shards[0].model_dump().values()):
        assert isinstance(value, (str, int, bool))  # paths and counts: nothing Prefect cannot persist
    again = steps.extract_shard.fn(plan.plan_path, 0, 16)  # a shard another worker already wrote
    assert again.reused and again.computed == 0


def test_extract_features_and_the_flow_steps_count_a_shard_another_worker_wrote_alike(tmp_path):
    """Same folder, same situation, both orchestrations: shard 1 lands from another worker mid-run.

    Its images are reused, not computed (its undecodable image is failed), and every image is
    counted once, whether the shards run in this process or as the train flow's Prefect steps.
    """
    from tasks.learning import steps

    dirs = [make_prepared_dir(tmp_path / name) for name in ("in_process", "steps")]
    for data_dir in dirs:
        Path(_rows(data_dir)["path"].iloc[20]).write_bytes(b"not a jpeg at all")  # shard 1 of 16 + 16 + 4

    def another_worker_writes_shard_1(path: Path, done: int) -> None:
        if done == 16:  # shard 0 is in place; this process has not reached shard 1 yet
            [plan_path] = (path.parent / PLANS_DIR).glob("plan-*.json")
            extract_shard(load_plan(plan_path), 1, 8)

    in_process = extract_features(dirs[0], BACKBONE, None, SIZE, batch_size=8, shard_size=16,
                                  on_shard=another_worker_writes_shard_1)

    weights = str(random_weights_file(DataFolder(dirs[1]), BACKBONE))
    plan = steps.plan_features.fn(str(dirs[1]), BACKBONE, weights, SIZE, "float32", "auto", 16)
    results = [steps.extract_shard.fn(plan.plan_path, 0, 8)]
    steps.extract_shard.fn(plan.plan_path, 1, 8)  # another worker (another flow run), before ours gets to shard 1
    results += [steps.extract_shard.fn(plan.plan_path, index, 8) for index in (1, 2)]
    as_steps = steps.feature_summary(plan, results)

    assert results[1].reused and (results[1].computed, results[1].failed) == (0, 1)
    assert (in_process.computed, in_process.reused, in_process.failed, in_process.images) == (20, 15, 1, 36)
    assert in_process.model_dump(exclude={"cache_dir"}) == as_steps.model_dump(exclude={"cache_dir"})


@pytest.mark.backends  # also run on JAX by the test command
def test_feature_model_takes_uint8_saves_and_loads_in_safe_mode_with_preprocessing_inside(tmp_path):
    """The fine-tuned model starts from this graph: it must reload without Lambda layers or custom code flags."""
    import keras

    from tasks.learning.backbones import get_backbone
    from tasks.learning.preprocess import Preprocess

    model = feature_model("mobilenet_v2", None, SIZE)
    assert [type(layer).__name__ for layer in model.layers[:2]] == ["InputLayer", "Preprocess"]
    assert model.inputs[0].dtype == "uint8"  # batches cross to the device as uint8
    assert isinstance(model.layers[-1], keras.Model)  # the backbone, for fine-tuning
    path = tmp_path / "features.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    pixels = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    np.testing.assert_allclose(to_numpy(reloaded(pixels, training=False)), to_numpy(model(pixels, training=False)),
                               rtol=1e-5, atol=1e-5)
    backbone = model.layers[-1]
    spec = get_backbone("mobilenet_v2")
    np.testing.assert_allclose(to_numpy(model(pixels, training=False)),
                               to_numpy(backbone(spec.preprocess_input(pixels.astype(np.float32)))),
                               rtol=1e-4, atol=1e-4)
    assert isinstance(reloaded.get_layer("preprocess"), Preprocess)


@pytest.mark.backends  # also run on JAX by the test command
def test_bfloat16_features_are_stored_as_float32_and_close_to_float32_ones(data_dir, tmp_path):
    from tasks.learning.backbones import build_backbone

    weights = tmp_path / "vgg.weights.h5"
    build_backbone(BACKBONE, None, SIZE).save_weights(str(weights))
    fp32 = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16)
    bf16 = extract_features(data_dir, BACKBONE, str(weights), SIZE, batch_size=16, precision="bfloat16")
    shas = _rows(data_dir)["sha256"].tolist()
    full, half = load_features(fp32.cache_dir, shas), load_features(bf16.cache_dir, shas)
    assert half.dtype == np.float32 and half.shape == (36, 512) and np.isfinite(half).all()
    assert not np.array_equal(full, half)  # really computed in bfloat16
    scale = np.abs(full).max()
    assert np.abs(full - half).max() < 0.05 * scale  # bf16 keeps ~3 significant digits


def test_random_weights_are_one_kept_draw_so_cached_features_can_be_recomputed(data_dir):
    """weights=None must name loadable weights: the cache rows equal a fresh model on the kept file."""
    result = extract_features(data_dir, BACKBONE, None, SIZE, batch_size=8)
    kept = random_weights_file(DataFolder(data_dir), BACKBONE)
    rows = _rows(data_dir).head(4)
    cached = load_features(Path(result.cache_dir), rows["sha256"].tolist())
    fresh = _direct(feature_model(BACKBONE, str(kept), SIZE), rows["path"])
    np.testing.assert_allclose(cached, fresh, rtol=1e-4, atol=1e-5)
    assert extract_features(data_dir, BACKBONE, None, SIZE).computed == 0  # a new process would reuse it too
