"""`prepare_data` end to end on generated archives, through a real (temporary) Prefect server.

Each test asserts where every file ended up. The second-run test snapshots every path under
data_dir (mtime_ns + inode) and counts the work done, instead of asserting wall-clock times.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tasks.common.errors import DatasetValidationError, InputError, UnsafeArchiveError
from tasks.common.files import sha256_file
from tasks.common.labels import SPLITS
from tasks.data.validate import ValidationThresholds
from tests.imagegen import FAULTS, ODDITIES, write_kaggle_tree, write_petimages_tree, write_presplit_tree, zip_tree


PER_CLASS = 30
FRACTIONS = (0.6, 0.2, 0.2)
SMALL = ValidationThresholds(min_per_class=10, min_per_class_per_split=1, max_class_imbalance=10.0,
                             max_quarantined_share=0.2)

# relative path under PetImages -> (status, reason)
EXPECTED_FAULTS = {
    **{f"Cat/{name}": (status, reason) for name, (_, status, reason) in FAULTS.items()},
    **{f"Dog/{name}": ("ok", "") for name in ODDITIES},
    "Cat/dup_of_0.jpg": ("quarantined", "duplicate"),
    "Cat/conflict.jpg": ("quarantined", "label_conflict"),
    "Dog/conflict.jpg": ("quarantined", "label_conflict"),
}


@pytest.fixture(scope="module")
def petimages_zip(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("petimages")
    write_petimages_tree(base / "tree", per_class=PER_CLASS, faults=True)
    return zip_tree(base / "tree", base / "kagglecatsanddogs.zip")


def prepare(source: Path, data_dir: Path, **kwargs):
    from flows.config import DataConfig
    from flows.prepare import prepare_data

    kwargs.setdefault("thresholds", SMALL)
    kwargs.setdefault("split_fractions", FRACTIONS)
    return prepare_data(DataConfig(source=str(source), data_dir=str(data_dir), **kwargs))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its mtime_ns and inode: any write, replace or delete shows."""
    return {p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.rglob("*"))}


def arranged_files(data_dir: Path) -> set[str]:
    return {p.relative_to(data_dir).as_posix() for p in (data_dir / "arranged").rglob("*") if p.is_file()}


def relative_to_pet(path: str) -> str:
    return path.split("PetImages/", 1)[1]


class WorkCounter:
    """Counts calls of a function while still calling it (monkeypatched in place)."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        original = getattr(module, name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def test_petimages_archive_arranges_exactly_the_good_images_and_a_second_run_writes_nothing(
        petimages_zip, tmp_path, monkeypatch):
    import tasks.data.arrange
    import tasks.data.manifest
    import tasks.data.validate

    data_dir = tmp_path / "data"
    inspected = WorkCounter(monkeypatch, tasks.data.manifest, "inspect_and_store")
    placed = WorkCounter(monkeypatch, tasks.data.arrange, "_place")
    validated = WorkCounter(monkeypatch, tasks.data.validate, "_run_suite")

    started = time.perf_counter()
    summary = prepare(petimages_zip, data_dir)
    first = time.perf_counter() - started

    # --- every file where it belongs
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    rows = {relative_to_pet(r.relative_path): r for r in manifest.itertuples()}
    good = {f"{folder}/{i}.jpg" for folder in ("Cat", "Dog") for i in range(PER_CLASS)} | {
        f"Dog/{name}" for name in ODDITIES}
    assert set(rows) == good | set(EXPECTED_FAULTS)
    for name, row in rows.items():
        expected = EXPECTED_FAULTS.get(name, ("ok", ""))
        assert (row.status, row.reason) == expected, name
        if row.status == "ok":
            assert row.split in SPLITS and row.label == ("cat" if name.startswith("Cat/") else "dog"), name
            assert row.arranged_path.startswith(f"arranged/{row.split}/{row.label}s/"), name
        else:
            assert row.split == "" and row.arranged_path == "", name
    assert arranged_files(data_dir) == {rows[name].arranged_path for name in good}
    assert manifest.loc[manifest["status"] == "ok", "sha256"].is_unique

    # --- each arranged file is its source's bytes (or its conversion) and decodes as RGB in TensorFlow
    import tensorflow as tf

    for name in good:
        row = rows[name]
        arranged = data_dir / row.arranged_path
        expected_file = Path(row.converted_path or row.source_path)
        assert arranged.samefile(expected_file) or sha256_file(arranged) == sha256_file(expected_file), name
        image = tf.io.decode_jpeg(tf.io.read_file(str(arranged)), channels=3)
        assert image.shape[-1] == 3 and min(image.shape[:2]) >= 32, name
    for name in ODDITIES:
        assert rows[f"Dog/{name}"].converted_path, name  # not a plain RGB JPEG: converted on the way in

    # --- the summary
    total = {label: sum(summary.counts[s][label] for s in SPLITS) for label in ("cat", "dog")}
    assert total == {"cat": PER_CLASS, "dog": PER_CLASS + len(ODDITIES)}
    assert summary.layout == "petimages" and summary.unlabelled == 0
    assert summary.quarantined == len(FAULTS) + 3
    assert summary.quarantine_reasons == {"duplicate": 1, "empty_file": 1, "label_conflict": 2,
                                             "not_an_image": 2, "too_large": 3, "too_small": 1, "undecodable": 2}
    assert json.loads((data_dir / "prepare_summary.json").read_text()) == summary.model_dump(mode="json")
    assert Path(summary.paths.validation_result).is_file()
    assert Path(summary.paths.data_docs).is_file()
    assert len(summary.fingerprint) == 64
    assert inspected.calls == len(rows) and placed.calls == len(good) and validated.calls == 2

    # --- second run: nothing inspected, linked, validated or written
    before = snapshot(data_dir)
    inspected.calls = placed.calls = validated.calls = 0
    started = time.perf_counter()
    again = prepare(petimages_zip, data_dir)
    second = time.perf_counter() - started
    assert again == summary
    assert (inspected.calls, placed.calls, validated.calls) == (0, 0, 0)
    assert snapshot(data_dir) == before
    print(f"\nprepare_data on {len(rows)} files: first run {first:.2f} s, second run {second:.2f} s "
          f"({first / second:.1f}x faster)")

    # --- a person's corrections in labels.csv: one dog by source path, one cat by content, one excluded
    dog, cat, dropped = rows["Dog/3.jpg"], rows["Cat/4.jpg"], rows["Cat/5.jpg"]
    (data_dir / "labels.csv").write_text(f"path,sha256,label\n{dog.relative_path},,cat\n,{cat.sha256},relabel?\n")
    with pytest.raises(InputError, match=r"labels.csv line 3 names the class 'relabel\?'"):
        prepare(petimages_zip, data_dir)  # a typo is one sentence, before anything is written
    assert snapshot(data_dir) == {**before, "labels.csv": snapshot(data_dir)["labels.csv"]}
    (data_dir / "labels.csv").write_text(f"path,sha256,label\n{dog.relative_path},,cat\n,{cat.sha256},dog\n"
                                         f"{dropped.arranged_path},,exclude\nPetImages/Cat/gone.jpg,,dog\n")
    corrected = prepare(petimages_zip, data_dir)
    assert corrected.fingerprint != summary.fingerprint
    assert corrected.label_overrides.text() == "2 relabelled, 1 excluded by labels.csv, 1 naming no image"
    assert corrected.quarantine_reasons["excluded"] == 1 and corrected.quarantined == summary.quarantined + 1
    manifest = pd.read_parquet(data_dir / "manifest.parquet").set_index("relative_path")
    assert manifest.at[dog.relative_path, "label"] == "cat" and manifest.at[cat.relative_path, "label"] == "dog"
    assert manifest.at[dog.relative_path, "arranged_path"].startswith(f"arranged/{dog.split}/cats/")
    assert (manifest.at[dropped.relative_path, "status"], manifest.at[dropped.relative_path, "reason"]) == \
        ("quarantined", "excluded") and not (data_dir / dropped.arranged_path).exists()
    assert prepare(petimages_zip, data_dir) == corrected  # applied again, the same data


def test_kaggle_competition_zip_keeps_test1_unlabelled_and_out_of_the_splits(tmp_path):
    tree = write_kaggle_tree(tmp_path / "kaggle", per_class=PER_CLASS, unlabelled=5)
    outer = tmp_path / "outer"
    outer.mkdir()
    with zipfile.ZipFile(outer / "train.zip", "w") as zf:
        for path in sorted((tree / "train").iterdir()):
            zf.write(path, f"train/{path.name}")
    with zipfile.ZipFile(outer / "test1.zip", "w") as zf:
        for path in sorted((tree / "test1").iterdir()):
            zf.write(path, f"test1/{path.name}")
    (outer / "sampleSubmission.csv").write_text("id,label\n1,0\n")
    competition = zip_tree(outer, tmp_path / "dogs-vs-cats.zip")

    data_dir = tmp_path / "data"
    summary = prepare(competition, data_dir)
    assert summary.layout == "kaggle"
    assert summary.unlabelled == 5 and summary.quarantined == 0
    assert {label: sum(summary.counts[s][label] for s in SPLITS) for label in ("cat", "dog")} == {
        "cat": PER_CLASS, "dog": PER_CLASS}

    unlabelled = {sha256_file(p) for p in (tree / "test1").iterdir()}
    assert sorted(p.name for p in (data_dir / "unlabelled").iterdir()) == [f"{i}.jpg" for i in range(1, 6)]
    assert {sha256_file(p) for p in (data_dir / "unlabelled").iterdir()} == unlabelled
    assert not unlabelled & {sha256_file(data_dir / p) for p in arranged_files(data_dir)}
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    pool = manifest[manifest["relative_path"].str.contains("test1/")]
    assert len(pool) == 5 and (pool["split"] == "unlabelled").all() and (pool["label"] == "").all()
    assert len(arranged_files(data_dir)) == 2 * PER_CLASS


def test_presplit_source_keeps_its_validation_split_and_carves_test_from_train(tmp_path):
    tree = write_presplit_tree(tmp_path / "filtered", {"train": 40, "validation": 8})
    data_dir = tmp_path / "data"
    summary = prepare(tree, data_dir, split_fractions=(0.8, 0.1, 0.1))   # an extracted folder as source
    assert summary.layout == "presplit"
    manifest = pd.read_parquet(data_dir / "manifest.parquet")
    source_validation = manifest[manifest["source_split"] == "validation"]
    assert (source_validation["split"] == "validation").all() and len(source_validation) == 16
    from_train = manifest[manifest["source_split"] == "train"]
    assert set(from_train["split"]) == {"train", "test"}
    assert summary.counts["validation"] == {"cat": 8, "dog": 8}
    assert sum(summary.counts["test"].values()) == (from_train["split"] == "test").sum() > 0
    assert not (data_dir / "extracted").exists()   # a folder source is read in place


def test_dataset_level_failure_stops_before_arranging(petimages_zip, tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(DatasetValidationError) as failure:
        prepare(petimages_zip, data_dir, thresholds=ValidationThresholds())   # real-data defaults
    message = str(failure.value)
    assert "enough_images_per_class" in message and "all/cat: 30" in message
    assert "quarantined_share" in message and "data_docs" in message
    assert not (data_dir / "arranged").exists()
    assert not (data_dir / "manifest.parquet").exists()
    assert not (data_dir / "prepare_summary.json").exists()
    assert json.loads((data_dir / "validation" / "result.json").read_text())["success"] is False


def test_hostile_archive_is_refused_and_nothing_escapes(tmp_path):
    hostile = tmp_path / "hostile.zip"
    with zipfile.ZipFile(hostile, "w") as zf:
        zf.writestr("PetImages/Cat/1.jpg", b"x")
        zf.writestr("../../escaped.jpg", b"evil")
    data_dir = tmp_path / "work" / "data"
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match="escaped.jpg"):
        prepare(hostile, data_dir)
    after = snapshot(tmp_path)
    new = {path for path in after if path not in before}
    assert all(path.startswith("work/data") or path == "work" for path in new), new
    assert not list(tmp_path.rglob("escaped.jpg"))
    assert not [p for p in (data_dir / "extracted").rglob("*") if p.is_file() and not p.name.startswith(".sha256")]
    assert not (data_dir / "arranged").exists()


def test_flow_parameters_are_json_friendly_for_the_prefect_form():
    from prefect.utilities.callables import parameter_schema

    from flows.prepare import prepare_data

    schema = parameter_schema(prepare_data.fn).model_dump_for_openapi()
    assert list(schema["properties"]) == ["config"] and not schema.get("required")
    fields = schema["definitions"]["DataConfig"]["properties"]
    flat = set(ValidationThresholds.model_fields)  # the command line's names, accepted at the top too
    assert {"source", "data_dir", "expected_sha256", "split_fractions", "respect_source_split", "replace_classes",
            "thresholds"} | flat == set(fields)
    thresholds = json.dumps(schema["definitions"]["ValidationThresholds"])
    assert "max_quarantined_share" in thresholds and "min_per_class_per_split" in thresholds
