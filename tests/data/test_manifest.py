"""The manifest: contract schema, a verdict per file, conversions on disk, reuse on the second run."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tasks.data.layout import find_candidates
from tasks.data.manifest import (
    INT_COLUMNS,
    MANIFEST_COLUMNS,
    build_manifest,
    build_inspected,
    read_manifest,
    write_manifest,
)
from tasks.data.datafolder import DataFolder
from tests.imagegen import FAULTS, ODDITIES, image_bytes, write_kaggle_tree, write_petimages_tree


@pytest.fixture
def pet(tmp_path) -> tuple[Path, Path]:
    """A PetImages tree with every fault and oddity, and an empty data dir beside it."""
    write_petimages_tree(tmp_path / "source", per_class=3, faults=True)
    return tmp_path / "source", tmp_path / "data"


def _build(source: Path, data_dir: Path, **kwargs) -> pd.DataFrame:
    return build_manifest(find_candidates(source)[1], DataFolder(data_dir), **kwargs)


def _by_name(frame: pd.DataFrame) -> dict[str, dict]:
    return {row["relative_path"]: row for row in frame.to_dict("records")}


def _restamp(path: Path, data: bytes, mtime_ns: int) -> None:
    """Replace a file's bytes but keep its size and mtime: invisible to a stat, visible to a read."""
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_schema_and_types(pet):
    frame = _build(*pet)

    assert list(frame.columns) == MANIFEST_COLUMNS
    for column in MANIFEST_COLUMNS:
        if column in INT_COLUMNS:
            assert frame[column].dtype == "int64", column
        else:
            assert frame[column].map(type).eq(str).all(), column
    assert not frame.isna().any().any()
    assert list(frame["relative_path"]) == sorted(frame["relative_path"])
    assert (frame["split"] == "").all() and (frame["arranged_path"] == "").all()
    assert set(frame["label"]) == {"cat", "dog"} and set(frame["source_split"]) == {""}


def test_every_file_gets_its_verdict(pet):
    source, data_dir = pet
    rows = _by_name(_build(source, data_dir))

    for name, (_, status, reason) in FAULTS.items():
        row = rows[f"PetImages/Cat/{name}"]
        assert (row["status"], row["reason"], row["converted_path"]) == (status, reason, ""), name
    for name in ODDITIES:
        row = rows[f"PetImages/Dog/{name}"]
        assert (row["status"], row["reason"]) == ("ok", ""), name
        assert row["converted_path"] == str(DataFolder(data_dir).converted_file(row["sha256"]))
        assert Path(row["converted_path"]).is_file()
    plain = rows["PetImages/Dog/0.jpg"]
    assert (plain["status"], plain["converted_path"], plain["format"], plain["mode"]) == ("ok", "", "JPEG", "RGB")
    assert plain["source_path"] == str(source / "PetImages/Dog/0.jpg")
    assert plain["bytes"] == (source / "PetImages/Dog/0.jpg").stat().st_size
    assert len(rows) == len(find_candidates(source)[1])


def test_converted_files_decode_with_tensorflow(pet):
    import tensorflow as tf

    frame = _build(*pet)
    converted = frame[frame["converted_path"] != ""]
    assert len(converted) == len(ODDITIES)
    for row in converted.to_dict("records"):
        image = tf.io.decode_image(Path(row["converted_path"]).read_bytes(), expand_animations=False)
        assert tuple(image.shape) == (row["height"], row["width"], 3)


def test_second_build_reuses_rows_without_opening_files(pet):
    source, data_dir = pet
    first = _build(source, data_dir)
    assert first.attrs == {"inspected": len(first), "reused": 0}

    victim = source / "PetImages/Dog/1.jpg"
    stat = victim.stat()
    _restamp(victim, b"\0" * stat.st_size, stat.st_mtime_ns)  # no longer an image, same stat
    second = _build(source, data_dir, previous=first)

    assert second.attrs == {"inspected": 0, "reused": len(first)}
    pd.testing.assert_frame_equal(second, first)  # the zeroed file was never read

    os.utime(victim, ns=(stat.st_mtime_ns + 1, stat.st_mtime_ns + 1))  # a real change shows in the stat
    third = _build(source, data_dir, previous=second)
    assert third.attrs == {"inspected": 1, "reused": len(first) - 1}
    assert _by_name(third)["PetImages/Dog/1.jpg"]["reason"] == "not_an_image"


def test_changed_thresholds_reinspect_only_the_affected_rows(pet):
    source, data_dir = pet
    first = _build(source, data_dir)
    stricter = _build(source, data_dir, previous=first, min_side=41)  # the 48x40 images are now too small

    ok_before = (first.status == "ok").sum()
    assert stricter.attrs["inspected"] == ok_before
    assert (stricter["status"] == "ok").sum() == 0
    assert set(stricter.loc[first.status == "ok", "reason"]) == {"too_small"}


def test_missing_conversion_is_recreated(pet):
    source, data_dir = pet
    first = _build(source, data_dir)
    gone = Path(first.loc[first.converted_path != "", "converted_path"].iloc[0])
    gone.unlink()

    second = _build(source, data_dir, previous=first)

    assert second.attrs["inspected"] == 1 and gone.is_file()
    pd.testing.assert_frame_equal(second, first)


def test_conversions_are_written_once_and_atomically(pet):
    source, data_dir = pet
    _build(source, data_dir)
    converted_dir = data_dir / "converted"
    stamps = {p.name: p.stat().st_mtime_ns for p in converted_dir.iterdir()}

    _build(source, data_dir)  # no previous: everything inspected again, conversions skipped

    assert {p.name: p.stat().st_mtime_ns for p in converted_dir.iterdir()} == stamps
    assert all(name.endswith(".jpg") and not name.startswith(".") for name in stamps)
    assert len(stamps) == len(ODDITIES)


def test_backends_and_worker_counts_agree(pet):
    source, data_dir = pet
    serial = _build(source, data_dir, workers=1)
    threads = _build(source, data_dir, workers=3)
    processes = _build(source, data_dir, workers=2, backend="process")
    pd.testing.assert_frame_equal(threads, serial)
    pd.testing.assert_frame_equal(processes, serial)


def test_vanished_file_is_quarantined_and_the_run_goes_on(tmp_path):
    root = write_kaggle_tree(tmp_path / "source", per_class=2, unlabelled=1)
    _, candidates = find_candidates(root)
    (root / "train" / "cat.0.jpg").unlink()

    rows = _by_name(build_manifest(candidates, DataFolder(tmp_path / "data")))

    assert (rows["train/cat.0.jpg"]["status"], rows["train/cat.0.jpg"]["reason"]) == ("quarantined", "undecodable")
    assert rows["train/cat.1.jpg"]["status"] == "ok"
    assert rows["test1/1.jpg"]["source_split"] == "unlabelled" and rows["test1/1.jpg"]["label"] == ""


def test_no_candidates_gives_an_empty_manifest_with_the_schema(tmp_path):
    frame = build_manifest([], DataFolder(tmp_path))
    assert list(frame.columns) == MANIFEST_COLUMNS and frame.empty
    assert frame["bytes"].dtype == "int64"


def test_write_manifest_writes_only_changes(pet, tmp_path):
    frame = _build(*pet)
    path = tmp_path / "out" / "manifest.parquet"

    assert write_manifest(frame, path) is True
    stamp = path.stat().st_mtime_ns
    assert write_manifest(_build(*pet), path) is False  # same content from a fresh build
    assert path.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(read_manifest(path), frame)

    changed = frame.copy()
    changed.loc[0, "split"] = "train"
    assert write_manifest(changed, path) is True
    assert read_manifest(path).loc[0, "split"] == "train"
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.parquet"]  # no temp files left


def test_write_manifest_refuses_a_frame_without_the_contract_columns(tmp_path):
    with pytest.raises(ValueError, match="arranged_path"):
        write_manifest(pd.DataFrame({"source_path": ["a"]}), tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_task_writes_inspected_manifest_and_second_run_is_a_no_op(pet):
    source, data_dir = pet

    first = build_inspected(source, DataFolder(data_dir))
    stamp = Path(first.path).stat().st_mtime_ns
    second = build_inspected(source, DataFolder(data_dir))

    n = len(find_candidates(source)[1])
    assert first.path == str(data_dir / "inspected.parquet")
    assert (first.layout, first.rows, first.inspected, first.written) == ("petimages", n, n, True)
    assert first.quarantined == len(FAULTS)
    assert (second.inspected, second.reused, second.written) == (0, n, False)
    assert Path(second.path).stat().st_mtime_ns == stamp


def test_task_reinspects_when_the_cache_is_damaged(pet):
    source, data_dir = pet
    build_inspected(source, DataFolder(data_dir))
    (data_dir / "inspected.parquet").write_bytes(b"not parquet")

    again = build_inspected(source, DataFolder(data_dir))

    assert again.reused == 0 and again.written is True
    assert len(read_manifest(data_dir / "inspected.parquet")) == again.rows


def test_new_files_cost_only_their_own_inspection(pet):
    source, data_dir = pet
    first = build_inspected(source, DataFolder(data_dir))
    for i in range(2):
        (source / "PetImages/Cat" / f"new{i}.jpg").write_bytes(image_bytes("cat", 900 + i))

    second = build_inspected(source, DataFolder(data_dir))

    assert (second.inspected, second.reused) == (2, first.rows)
