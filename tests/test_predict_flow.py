"""The `predict` flow on a real Prefect server: submission CSV, archives, and inputs that must fail cleanly."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from flows.predict import ERROR_LABEL, main, predict
from tasks.errors import ConfigError, InputError
from tests.fake_training import promoted_champion
from tests.imagegen import image_bytes, truncated_jpeg, zip_tree

LABELS = {1: "cat", 2: "dog", 3: "cat", 10: "dog", 11: "dog"}


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory):
    """A store whose `cats-vs-dogs@champion` separates the generated cats and dogs."""
    root = tmp_path_factory.mktemp("predict")
    uri, _ = promoted_champion(root, backbones=("resnet50",), fine_tune=False)
    return SimpleNamespace(uri=uri, root=root)


@pytest.fixture
def store(champion_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    return champion_store


def _test1_folder(folder):
    """A Kaggle test1-like folder: numeric names, one corrupt JPEG, one file that is not an image."""
    folder.mkdir(parents=True)
    for image_id, label in LABELS.items():
        (folder / f"{image_id}.jpg").write_bytes(image_bytes(label, 100 + image_id))
    (folder / "4.jpg").write_bytes(truncated_jpeg())
    (folder / "notes.txt").write_text("not an image")
    return folder


def _check_submission(csv_path):
    frame = pd.read_csv(csv_path, keep_default_na=False)
    assert list(frame.columns) == ["id", "label", "error"]
    assert frame["id"].tolist() == [1, 2, 3, 4, 10, 11]  # Kaggle's numeric order
    scored = frame[frame["id"] != 4].set_index("id")
    for image_id, label in LABELS.items():
        assert (scored.loc[image_id, "label"] >= 0.5) == (label == "dog"), image_id
    assert (scored["error"] == "").all()
    corrupt = frame[frame["id"] == 4].iloc[0]
    assert corrupt["label"] == ERROR_LABEL and "4.jpg" in corrupt["error"] and "cannot be decoded" in corrupt["error"]


def test_predict_writes_a_kaggle_submission_with_error_rows(prefect_harness, store, tmp_path):
    out = tmp_path / "out" / "submission.csv"
    summary = predict(str(_test1_folder(tmp_path / "test1")), output_csv=str(out), batch_size=2)
    assert summary["n_images"] == 6 and summary["n_errors"] == 1 and summary["n_skipped"] == 1
    assert summary["output_csv"] == str(out.resolve())
    _check_submission(out)
    assert [p.name for p in out.parent.iterdir()] == ["submission.csv"]  # no temporary left behind


def test_predict_accepts_an_archive(prefect_harness, store, tmp_path):
    archive = zip_tree(_test1_folder(tmp_path / "test1"), tmp_path / "test1.zip", prefix="test1")
    out = tmp_path / "from_zip.csv"
    predict(str(archive), output_csv=str(out), extracted_root=str(tmp_path / "extracted"))
    _check_submission(out)


def test_unknown_alias_fails_in_one_sentence_and_keeps_the_old_csv(prefect_harness, store, tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("id,label\n1,0.5\n")
    with pytest.raises(ConfigError) as caught:
        predict(str(_test1_folder(tmp_path / "test1")), model_uri="models:/cats-vs-dogs@staging", output_csv=str(out))
    assert str(caught.value) == ("No model version has alias 'staging' in registered model 'cats-vs-dogs'; "
                                 "run the retrain flow first or pass --model-uri.")
    assert out.read_text() == "id,label\n1,0.5\n"
    with pytest.raises(ConfigError, match="Registered model 'dogs-only' does not exist"):
        predict(str(tmp_path / "test1"), model_uri="models:/dogs-only@champion", output_csv=str(out))


def test_empty_folder_or_missing_input_write_nothing(prefect_harness, store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "submission.csv"
    with pytest.raises(InputError, match="No images found in .*empty"):
        predict(str(empty), output_csv=str(out))
    with pytest.raises(InputError, match="do not exist"):
        predict(str(tmp_path / "nowhere"), output_csv=str(out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_prints_the_sentence_and_exits_2(prefect_harness, store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main([str(tmp_path / "empty"), "--output-csv", str(tmp_path / "s.csv")])
    assert code == 2
    assert "No images found in" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
