"""labels.csv: a person's corrections, read, checked and applied to the manifest before splitting."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.common.errors import InputError
from tasks.common.labels import CATS_DOGS
from tasks.data.datafolder import DataFolder
from tasks.data.overrides import EXCLUDED, apply_overrides, override_files, read_override_file, read_overrides
from tasks.data.splits import assign_splits

SHA = {name: name * 64 for name in "abcde"}


def manifest() -> pd.DataFrame:
    """Five inspected images: a is also copied twice (same bytes), e is already quarantined, u unlabelled."""
    rows = [("a", "Cat/1.jpg", "cat", "ok", ""), ("a", "Cat/1 copy.jpg", "cat", "ok", ""), ("b", "Cat/2.jpg", "cat", "ok", ""),
            ("c", "Dog/3.jpg", "dog", "ok", ""), ("d", "Dog/4.jpg", "dog", "ok", ""),
            ("e", "Dog/5.jpg", "dog", "quarantined", "undecodable")]
    frame = pd.DataFrame([{"sha256": SHA[sha], "relative_path": path, "source_path": f"/src/{path}", "label": label, "status": status, "reason": reason,
                           "source_split": "", "split": "", "arranged_path": ""}
                          for sha, path, label, status, reason in rows])
    return frame


def write(path, text: str):
    path.write_text(text)
    return path


def test_relabel_exclude_keep_and_the_audits_own_csv_apply_to_every_copy(tmp_path):
    audit_csv = write(tmp_path / "audit.csv",  # the audit's columns, a person's decisions
                      "path,sha256,split,given_label,suggested_label,score,kind,other_path,other_sha256,other_split,decision\n"
                      f"arranged/x.jpg,{SHA['a']},train,cat,dog,0.9,label_issue,,,,relabel\n"
                      f"arranged/y.jpg,{SHA['b']},test,cat,,0.99,leakage,arranged/z.jpg,{SHA['c']},train,\n"
                      f"arranged/w.jpg,{SHA['d']},train,dog,,31.2,outlier,,,,Exclude\n")
    data_csv = write(tmp_path / "labels.csv", "path,label\nCat/2.jpg,Dog\nDog/missing.jpg,cat\nDog/5.jpg,exclude\n")
    files = [audit_csv, data_csv]
    frame, applied = apply_overrides(manifest(), read_overrides(files, CATS_DOGS), files)

    labels = dict(zip(frame["relative_path"], frame["label"]))
    assert labels["Cat/1.jpg"] == labels["Cat/1 copy.jpg"] == "dog"  # by content: both copies
    assert labels["Cat/2.jpg"] == "dog"  # by source path, class name normalised
    statuses = dict(zip(frame["relative_path"], zip(frame["status"], frame["reason"])))
    assert statuses["Dog/4.jpg"] == ("quarantined", EXCLUDED)
    assert statuses["Dog/5.jpg"] == ("quarantined", "undecodable")  # a fault keeps its reason
    assert (applied.relabelled, applied.excluded, applied.unmatched) == (2, 1, 1)
    assert applied.files == [str(audit_csv), str(data_csv)] and len(applied.digest) == 64
    assert applied.text() == "2 relabelled, 1 excluded by labels.csv, 1 naming no image"
    assert manifest().equals(manifest()) and (manifest()["label"] == ["cat", "cat", "cat", "dog", "dog", "dog"]).all()

    split = assign_splits(frame)  # the corrected labels are what deduplication sees: a's copies agree
    assert (split["reason"] == "duplicate").sum() == 1 and (split["reason"] == "label_conflict").sum() == 0


def test_the_data_folders_file_wins_over_the_sources_and_equal_decisions_give_equal_digests(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    folder = DataFolder(tmp_path / "data")
    folder.root.mkdir()
    write(source / "labels.csv", f"sha256,label\n{SHA['c']},cat\n")
    assert override_files(source, folder) == [source / "labels.csv"]
    write(folder.label_overrides, f"sha256,label\n{SHA['c']},dog\n")
    files = override_files(source, folder)
    assert files == [source / "labels.csv", folder.label_overrides]
    frame, applied = apply_overrides(manifest(), read_overrides(files, CATS_DOGS), files)
    assert frame.loc[frame["sha256"] == SHA["c"], "label"].tolist() == ["dog"] and applied.relabelled == 0
    _, unchanged = apply_overrides(manifest(), read_overrides(files, CATS_DOGS), files)
    assert unchanged.digest == applied.digest


@pytest.mark.parametrize("text, fragment", [
    ("sha256,label\nabc,dog\n", "line 2 has sha256 'abc', which is not a sha256"),
    (f"sha256,label\n{'a' * 64},horse\n", "line 2 names the class 'horse'"),
    ("path,decision\nCat/1.jpg,relabel\n", "line 2 says relabel but has no suggested_label"),
    ("image,label\nCat/1.jpg,dog\n", "needs a sha256 or path column and a label (or decision) column"),
    ("path,label\n,dog\n", "line 2 names no image"),
    (f"sha256,label\n{'a' * 64},dog\n{'a' * 64},exclude\n", "line 3 decides 'exclude' for an image that"),
])
def test_a_bad_row_is_one_sentence_naming_the_file_and_line(tmp_path, text, fragment):
    path = write(tmp_path / "labels.csv", text)
    with pytest.raises(InputError) as error:
        apply_overrides(manifest(), read_override_file(path, CATS_DOGS), [path])
    assert fragment in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)
