"""The data folder's contract: one owner of the paths, one reader of the labelled rows."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import pandas as pd
import pytest

from tasks.common.errors import ConfigError, DatasetValidationError
from tasks.data.datafolder import DataFolder
from tasks.data.manifest import build_inspected
from tests.imagegen import write_class_folders
from tests.prepared import make_prepared_dir


def test_labelled_rows_reads_only_usable_rows_in_hash_order(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 3, "test": 2}, unlabelled=2, quarantined=2)
    folder = DataFolder(data_dir)
    rows = folder.labelled_rows("test")
    assert len(rows) == 4 and list(rows["sha256"]) == sorted(rows["sha256"])
    assert dict(zip(rows["label"], rows["y"])) == {"cat": 0, "dog": 1}
    assert all(folder.file(path).is_file() and str(folder.file(path)) == full
               for path, full in zip(rows["arranged_path"], rows["path"]))
    assert folder.labelled_rows("validation").empty
    assert len(folder.labelled_rows()) == 10 and set(folder.labelled_rows()["split"]) == {"train", "test"}


def test_a_folder_without_manifest_names_the_fix(tmp_path):
    with pytest.raises(DatasetValidationError, match="prepare_data"):
        DataFolder(tmp_path).labelled_rows("test")


def test_a_corrupt_manifest_names_the_file_and_the_fix(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 1})
    (data_dir / "manifest.parquet").write_bytes(b"PAR1 this is not parquet any more")
    with pytest.raises(DatasetValidationError, match=r"manifest.parquet cannot be read .*run prepare_data again"):
        DataFolder(data_dir).labelled_rows()


def test_unknown_labels_and_splits_are_refused(tmp_path):
    data_dir = make_prepared_dir(tmp_path, {"train": 1})
    frame = pd.read_parquet(data_dir / "manifest.parquet")
    frame.loc[0, "label"] = "hamster"
    frame.to_parquet(data_dir / "manifest.parquet", index=False)
    with pytest.raises(DatasetValidationError, match="hamster"):
        DataFolder(data_dir).labelled_rows()
    with pytest.raises(DatasetValidationError, match="unlabelled"):
        DataFolder(data_dir).labelled_rows("unlabelled")


def test_split_rows_and_counts_need_both_classes_in_every_split(tmp_path):
    data_dir = make_prepared_dir(tmp_path)
    folder = DataFolder(data_dir)
    assert folder.labelled_counts() == {"train": {"cat": 10, "dog": 10}, "validation": {"cat": 4, "dog": 4},
                                        "test": {"cat": 4, "dog": 4}}
    frame = pd.read_parquet(folder.manifest)
    frame.loc[(frame["split"] == "test") & (frame["label"] == "dog"), "status"] = "quarantined"
    frame.to_parquet(folder.manifest, index=False)
    with pytest.raises(DatasetValidationError, match="split 'test' .* has no dog images"):
        folder.labelled_counts()


def test_training_runs_get_a_hidden_partial_folder_and_never_share_a_name(tmp_path):
    folder = DataFolder(tmp_path)
    now = datetime(2026, 12, 1, 3, 0, 0, tzinfo=timezone.utc)
    first = folder.new_training_run("ab" * 32, now)
    second = folder.new_training_run("ab" * 32, now)
    assert first[1].name == "20261201T030000Z-abababab" and second[1].name == "20261201T030000Z-abababab-2"
    for partial, final in (first, second):
        assert partial.is_dir() and partial.name.startswith(".") and not final.exists()
    assert sorted(p.name for p in folder.training.iterdir() if not p.name.startswith(".")) == []


def test_paths_all_live_under_the_folder(tmp_path):
    folder = DataFolder.at(tmp_path / "data")
    paths = [folder.downloads, folder.extracted, folder.converted, folder.inspected, folder.splits, folder.manifest,
             folder.validation_result, folder.data_docs, folder.arranged, folder.unlabelled, folder.summary,
             folder.features, folder.random_weights("vgg16"), folder.feature_cache("k"), folder.training,
             folder.converted_file("0" * 64)]
    assert all(os.path.commonpath([folder.root, path]) == str(folder.root) for path in paths)
    assert len(set(paths)) == len(paths)


def test_a_folder_of_other_classes_is_not_rearranged_for_a_source_unless_asked(tmp_path):
    folder = DataFolder.at(tmp_path / "data")
    build_inspected(write_class_folders(tmp_path / "pets", ["cats", "dogs"], per_class=1), folder, workers=1)
    folder.classes_file.unlink()  # prepared before classes.json was written: cats vs. dogs all the same
    inspected = folder.inspected.read_bytes()
    flowers = write_class_folders(tmp_path / "flowers", ["daisy", "roses", "tulips"], per_class=1)
    with pytest.raises(ConfigError) as caught:
        build_inspected(flowers, folder, workers=1)
    assert str(caught.value) == (
        f"The data folder {folder.root} holds the classes cat, dog, but this source has daisy, roses, tulips; give "
        "them a data folder of their own (--data-dir, or a --model-name of their own, whose default folder is "
        "data-<model name>), or pass --replace-classes to rearrange this one for them.")
    assert folder.inspected.read_bytes() == inspected and not folder.classes_file.exists()  # nothing was touched
    build_inspected(flowers, folder, workers=1, replace_classes=True)
    assert folder.classes().names == ("daisy", "roses", "tulips")
    build_inspected(flowers, folder, workers=1)  # the same classes again: nothing to ask
