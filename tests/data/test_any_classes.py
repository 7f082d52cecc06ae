"""Any image classes in the data wing: the class map, the layouts that carry it, and the per-class GX checks."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tasks.common.errors import DatasetValidationError, LayoutError
from tasks.common.labels import CATS_DOGS, ClassMap, class_map, classes_of_files, classes_of_labels, \
    normalise_class_name
from tasks.data.arrange import arranged_paths, dataset_fingerprint
from tasks.data.datafolder import DataFolder
from tasks.data.layout import describe_layout, find_candidates
from tasks.data.validate import ValidationThresholds, class_counts_frame, validate_manifest
from tests.data.rows import frame, row
from tests.imagegen import write_class_folders

THREE = class_map(["Daisy", "Red Roses", "tulips"])


def test_class_names_are_normalised_sorted_and_cats_and_dogs_stay_kaggles():
    assert normalise_class_name(" Golden-Retriever (old) ") == "golden_retriever_old"
    assert THREE == ClassMap(("daisy", "red_roses", "tulips"), ("daisy", "red_roses", "tulips"))
    assert THREE.index("tulips") == 2 and not THREE.binary and THREE.probability_columns[1] == "p_red_roses"
    assert class_map(["Dog", "cat"]) is CATS_DOGS and CATS_DOGS.probability_columns == ("p_dog",)
    assert CATS_DOGS.positive == "dog" and CATS_DOGS.folder_of == {"cat": "cats", "dog": "dogs"}
    assert ClassMap.from_json(THREE.to_json()) == THREE and ClassMap.from_json(CATS_DOGS.to_json()) is CATS_DOGS
    assert classes_of_labels(["cat", "", "dog"]) is CATS_DOGS


@pytest.mark.parametrize("folders,message", [
    (["Roses", "roses", "tulips"], r"Roses/ and roses/ name the same class .*merge or rename"),
    (["!!!", "tulips"], r"'!!!' has no letters or digits.*rename it"),
    (["tulips"], r"Only one class \(tulips\).*at least two class folders"),
])
def test_unusable_class_folders_are_refused_in_one_sentence_naming_them(folders, message):
    with pytest.raises(LayoutError, match=message):
        class_map(folders)


@pytest.mark.parametrize("folders,splits,message", [
    (["cats"], None, r"No dog images were found in .*, only cat images; add the dog images \(a dogs/ folder beside cats/\)"),
    (["Dog"], {"train": 1, "validation": 1}, r"No cat images were found in .*, only dog images"),
    (["Daisy"], None, r"One class \(Daisy/\) was found in .*/wrapper: a classifier needs two or more; add a folder"),
    (["daisy"], {"train": 1, "validation": 1}, r"Only one class \(daisy\) was found"),
])
def test_a_source_of_one_class_says_so_in_one_sentence(tmp_path, folders, splits, message):
    write_class_folders(tmp_path / "source" / "wrapper", folders, per_class=1, splits=splits)
    with pytest.raises(LayoutError, match=message) as caught:
        find_candidates(tmp_path / "source")
    assert len(str(caught.value).splitlines()) == 1 and "--min" not in str(caught.value)  # no threshold helps


def test_any_class_folders_and_their_presplit_form_are_layouts(tmp_path):
    write_class_folders(tmp_path / "flat" / "wrapper", ["Daisy", "Red Roses", "tulips"], per_class=2)
    layout, candidates = find_candidates(tmp_path / "flat")
    assert layout == "any_classes"
    assert {(c.relative_path, c.label) for c in candidates} >= {("wrapper/Red Roses/0.jpg", "red_roses")}
    assert describe_layout(tmp_path / "flat").classes() == THREE

    write_class_folders(tmp_path / "split", ["a", "b", "c"], splits={"train": 2, "validation": 1})
    layout, candidates = find_candidates(tmp_path / "split")
    assert layout == "presplit_classes"
    assert {c.source_split for c in candidates} == {"train", "validation"}
    assert sorted({c.label for c in candidates}) == ["a", "b", "c"]


def test_classes_are_arranged_in_their_folders_as_on_disk(tmp_path):
    from tasks.data.arrange import arrange_folder
    from tasks.data.manifest import build_inspected
    from tasks.data.splits import assign_splits_file

    folder = DataFolder.at(tmp_path / "data")
    build_inspected(write_class_folders(tmp_path / "flowers", ["Daisy", "Red Roses", "tulips"], per_class=3), folder,
                    workers=1)
    recorded = json.loads(folder.classes_file.read_text())
    assert recorded == {"names": ["daisy", "red_roses", "tulips"], "folders": ["Daisy", "Red Roses", "tulips"]}
    assert folder.classes().folder_of["red_roses"] == "Red Roses"
    assign_splits_file(folder)
    arrange_folder(folder)
    assert sorted(path.name for path in (folder.arranged / "train").iterdir()) == ["Daisy", "Red Roses", "tulips"]
    assert folder.labelled_rows("train")["label"].tolist().count("red_roses") == 3  # 3 images: 80% rounds to all
    assert classes_of_files([("cat", "PetImages/Cat/1.jpg"), ("dog", "PetImages/Dog/1.jpg")]) is CATS_DOGS


def test_cats_and_dogs_beside_another_folder_say_how_to_mean_either(tmp_path):
    write_class_folders(tmp_path, ["cats", "dogs", "birds"], per_class=1)
    with pytest.raises(LayoutError, match=r"birds/ beside cats/ and dogs/: move birds/ out .* or rename"):
        find_candidates(tmp_path)


def _manifest(per_split: dict[str, dict[str, int]]) -> pd.DataFrame:
    rows = []
    for split, counts in per_split.items():
        for label, n in counts.items():
            for i in range(n):
                r = row(f"{label}/{split}/{i}.jpg", label)
                r["split"] = split
                rows.append(r)
    return frame(rows)


def test_the_class_map_names_the_arranged_folders_and_enters_the_fingerprint():
    manifest = _manifest({"train": {"daisy": 1, "red_roses": 1}})
    paths = arranged_paths(manifest, THREE)
    assert paths.str.startswith("arranged/train/red_roses/").sum() == 1
    assert dataset_fingerprint(manifest, THREE) != dataset_fingerprint(manifest, class_map(["daisy", "red_roses"]))
    cats = _manifest({"train": {"cat": 1, "dog": 1}})
    assert dataset_fingerprint(cats, CATS_DOGS) == dataset_fingerprint(cats)  # cats vs. dogs: as before


def test_the_data_folder_reads_its_class_map_and_refuses_labels_outside_it(tmp_path):
    folder = DataFolder.at(tmp_path)
    assert folder.classes() is CATS_DOGS  # a folder prepared before classes were recorded
    assert folder.record_classes(THREE) and not folder.record_classes(THREE)
    assert json.loads(folder.classes_file.read_text())["names"] == ["daisy", "red_roses", "tulips"]
    manifest = _manifest({"train": {"daisy": 1, "tulips": 1, "weeds": 1}})
    manifest["arranged_path"] = arranged_paths(manifest, THREE).where(manifest["label"] != "weeds", "arranged/x.jpg")
    manifest.to_parquet(folder.manifest)
    with pytest.raises(DatasetValidationError, match=r"labels \['weeds'\]; only \['daisy', 'red_roses', 'tulips'\]"):
        folder.labelled_rows()


def test_n_class_checks_name_a_class_missing_from_a_split_and_an_imbalanced_class(tmp_path):
    thresholds = ValidationThresholds(min_per_class=4, min_per_class_per_split=2, max_class_imbalance=2.0,
                                      max_quarantined_share=0.1)
    balanced = {"train": {"daisy": 6, "red_roses": 6, "tulips": 6}, "validation": {"daisy": 2, "red_roses": 2, "tulips": 2},
                "test": {"daisy": 2, "red_roses": 2, "tulips": 2}}
    assert validate_manifest(_manifest(balanced), tmp_path / "ok", thresholds, classes=THREE).success

    faulty = {**balanced, "train": {"daisy": 6, "red_roses": 2, "tulips": 6}, "test": {"daisy": 2, "red_roses": 2}}
    counts = class_counts_frame(_manifest(faulty), classes=THREE).set_index("key")
    assert counts.loc["test/tulips", "images"] == 0 and counts.loc["train/red_roses", "share_of_largest"] == 0.333333
    verdict = validate_manifest(_manifest(faulty), tmp_path / "bad", thresholds, classes=THREE)
    assert not verdict.success
    brief = "\n".join(verdict.brief)
    assert "enough_images_per_class_per_split: test/tulips 0 < 2" in brief
    assert "class_balance: train/red_roses share of largest 0.3333 < 0.5" in brief
    assert "test/tulips share of largest 0 < 0.5" in brief


def test_an_empty_class_folder_is_named_rather_than_dropped_from_the_classes(tmp_path):
    write_class_folders(tmp_path, ["daisy", "tulips"], per_class=1)
    (tmp_path / "roses").mkdir()
    (tmp_path / "roses" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(LayoutError, match=r"class folder .*roses holds no files; add its images or remove it"):
        find_candidates(tmp_path)
