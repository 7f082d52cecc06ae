"""The `predict` flow on a real Prefect server: submission CSV, archives, and inputs that must fail cleanly."""

from __future__ import annotations


import pandas as pd
import pytest
from PIL import Image

from flows.config import PredictConfig
from flows.predict import main
from flows.predict import predict as predict_flow
from tasks.common.errors import ConfigError, InputError
from tasks.models.predictions import ERROR_LABEL
from tests.imagegen import image_bytes, tall_png, truncated_jpeg, zip_tree

LABELS = {1: "cat", 2: "dog", 3: "cat", 10: "dog", 11: "dog"}


def predict(images: str, **options):
    return predict_flow(PredictConfig(images=images, **options))


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
    assert list(frame.columns) == ["id", "label"]  # exactly Kaggle's columns: its checker rejects any other
    assert frame["id"].tolist() == [1, 2, 3, 4, 10, 11]  # Kaggle's numeric order
    scored = frame[frame["id"] != 4].set_index("id")
    for image_id, label in LABELS.items():
        assert (scored.loc[image_id, "label"] >= 0.5) == (label == "dog"), image_id
    assert frame.loc[frame["id"] == 4, "label"].item() == ERROR_LABEL  # a broken image still gets its row
    errors = pd.read_csv(csv_path.with_name(f"{csv_path.stem}.errors.csv"))
    assert list(errors.columns) == ["id", "file", "error"] and errors["id"].tolist() == [4]
    assert errors["file"].item() == "4.jpg" and "cannot be decoded" in errors["error"].item()


def test_predict_writes_a_kaggle_submission_with_error_rows(store, tmp_path):
    out = tmp_path / "out" / "submission.csv"
    out.parent.mkdir()
    summary = predict(str(_test1_folder(tmp_path / "test1")), output_csv=str(out), batch_size=2)
    assert summary.n_images == 6 and summary.n_errors == 1 and summary.n_skipped == 1
    assert summary.output_csv == str(out.resolve()) and summary.errors_csv == str(out.with_name("submission.errors.csv"))
    _check_submission(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["submission.csv", "submission.errors.csv"]  # no temporary


def test_predict_accepts_an_archive(store, tmp_path):
    archive = zip_tree(_test1_folder(tmp_path / "test1"), tmp_path / "test1.zip", prefix="test1")
    out = tmp_path / "from_zip.csv"
    predict(str(archive), output_csv=str(out), data_dir=str(tmp_path / "data"))
    assert len(list((tmp_path / "data" / "extracted").glob("[0-9a-f]*"))) == 1  # the archive went to the data folder
    _check_submission(out)


def test_unknown_alias_fails_in_one_sentence_and_keeps_the_old_csv(store, tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("id,label\n1,0.5\n")
    with pytest.raises(ConfigError) as caught:
        predict(str(_test1_folder(tmp_path / "test1")), model_uri="models:/cats-vs-dogs@staging", output_csv=str(out))
    assert str(caught.value) == ("No model version has alias 'staging' in registered model 'cats-vs-dogs'; "
                                 "run a retrain first (python -m flows.retrain) or pass --model-uri.")
    assert out.read_text() == "id,label\n1,0.5\n"
    with pytest.raises(ConfigError, match="Registered model 'dogs-only' does not exist"):
        predict(str(tmp_path / "test1"), model_uri="models:/dogs-only@champion", output_csv=str(out))


def test_empty_folder_or_missing_input_write_nothing(store, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    out = tmp_path / "submission.csv"
    with pytest.raises(InputError, match="No images found in .*empty"):
        predict(str(empty), output_csv=str(out))
    with pytest.raises(InputError, match="do not exist"):
        predict(str(tmp_path / "nowhere"), output_csv=str(out))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_cli_prints_the_sentence_and_exits_2(store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main([str(tmp_path / "empty"), "--output-csv", str(tmp_path / "s.csv")])
    assert code == 2
    assert "No images found in" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()


def test_output_path_problems_fail_before_any_image_is_scored(store, tmp_path, monkeypatch):
    from tasks.models import scoring

    monkeypatch.setattr(scoring, "score_files", lambda *a, **k: pytest.fail("scored before checking the output"))
    images = str(_test1_folder(tmp_path / "test1"))
    with pytest.raises(InputError, match=r"--output-csv .* is a folder"):
        predict(images, output_csv=str(tmp_path))
    with pytest.raises(InputError, match=r"folder of --output-csv .* does not exist"):
        predict(images, output_csv=str(tmp_path / "missing" / "s.csv"))
    assert not (tmp_path / "missing").exists()  # a missing parent is not silently created


def test_a_store_that_does_not_exist_is_an_error_not_a_new_empty_one(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}")
    with pytest.raises(ConfigError, match="does not exist"):
        predict(str(_test1_folder(tmp_path / "test1")), output_csv=str(tmp_path / "s.csv"))
    assert not (tmp_path / "typo").exists()


def test_predict_reads_a_read_only_store(store, tmp_path, monkeypatch):
    """Prediction only reads: a store on a read-only disk (its runs' artifacts where they were logged) must do."""
    import shutil

    from tests.smalldisk import read_only_view

    (tmp_path / "store").mkdir()
    shutil.copyfile(store.uri[len("sqlite:///"):], tmp_path / "store" / "mlflow.db")
    out = tmp_path / "submission.csv"
    with read_only_view(tmp_path / "store", tmp_path / "read-only") as view:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{view / 'mlflow.db'}")
        predict(str(_test1_folder(tmp_path / "test1")), output_csv=str(out))
    _check_submission(out)


def test_the_submission_is_checked_against_kaggles_sample(store, tmp_path):
    folder = _test1_folder(tmp_path / "comp" / "test1")
    sample = tmp_path / "comp" / "sampleSubmission.csv"
    sample.write_text("id,label\n" + "".join(f"{i},0\n" for i in (1, 2, 3, 4, 10, 11)))
    out = tmp_path / "submission.csv"
    predict(str(folder), output_csv=str(out))
    assert pd.read_csv(out)["id"].tolist() == [1, 2, 3, 4, 10, 11]
    sample.write_text("id,label\n" + "".join(f"{i},0\n" for i in range(1, 13)))  # the sample wants 12 ids
    out.unlink()
    with pytest.raises(InputError, match="ids differ from .*sampleSubmission.csv"):
        predict(str(folder), output_csv=str(out))
    assert not out.exists()  # nothing that Kaggle would reject is called done


def _competition_zip(tmp_path):
    """Kaggle's dogs-vs-cats.zip: train.zip (cat.N.jpg, dog.N.jpg), test1.zip (N.jpg) and sampleSubmission.csv."""
    from tests.imagegen import write_kaggle_tree

    tree = write_kaggle_tree(tmp_path / "tree", per_class=4, unlabelled=6)
    outer = tmp_path / "outer"
    outer.mkdir()
    zip_tree(tree / "train", outer / "train.zip", prefix="train")
    zip_tree(tree / "test1", outer / "test1.zip", prefix="test1")
    (outer / "sampleSubmission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in range(1, 7)))
    return zip_tree(outer, tmp_path / "dogs-vs-cats.zip")


def test_the_competition_zip_itself_scores_its_test1_checked_against_its_sample(store, tmp_path, caplog):
    caplog.set_level("INFO", logger="prefect")
    out = tmp_path / "submission.csv"
    summary = predict(str(_competition_zip(tmp_path)), output_csv=str(out), data_dir=str(tmp_path / "data"))
    assert summary.n_images == 6 and summary.images_dir.endswith("test1")  # not train/'s labelled images
    assert summary.sample_submission.endswith("sampleSubmission.csv")
    assert pd.read_csv(out)["id"].tolist() == [1, 2, 3, 4, 5, 6]
    assert "is Kaggle's competition layout; scoring its unlabelled test1/" in caplog.text
    assert "Ids checked against Kaggle's " in caplog.text and "the same 6 ids in the same order" in caplog.text


def test_a_folder_without_kaggles_sample_says_its_ids_were_not_checked(store, tmp_path, caplog):
    caplog.set_level("INFO", logger="prefect")
    folder = _test1_folder(tmp_path / "unlabelled")
    summary = predict(str(folder), output_csv=str(tmp_path / "submission.csv"))
    assert summary.sample_submission is None
    assert f"No sampleSubmission.csv beside or above {folder}: the ids are not checked against Kaggle's" in caplog.text


def test_a_file_without_a_kaggle_id_is_left_out_and_named_in_the_errors(store, tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="prefect")  # an earlier main() in this process quietened Prefect for its exit
    folder = _test1_folder(tmp_path / "test1")
    (folder / "broken.jpg").write_bytes(truncated_jpeg())
    (folder / "my_cat.jpg").write_bytes(image_bytes("cat", 7))
    (folder / "1.png").write_bytes(image_bytes("dog", 8, fmt="PNG"))  # a second file of Kaggle id 1
    (folder / "5.png").write_bytes(tall_png())  # 2 KB, 1 x 1,000,000: its row's error, at once
    out = tmp_path / "submission.csv"
    stale = tmp_path / "submission.explained" / "99.png"  # an earlier run's overlay must not pass for this one's
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    code = main([str(folder), "--output-csv", str(out), "--explain", "3"])
    assert code == 0
    assert pd.read_csv(out)["id"].tolist() == [1, 2, 3, 4, 5, 10, 11]  # Kaggle ids only, each once
    overlays = sorted(path.name for path in stale.parent.iterdir())  # Grad-CAM of the first three, beside the CSV
    assert overlays == ["1.png", "2.png", "3.png"] and Image.open(stale.parent / "1.png").size == (192, 192)
    errors = pd.read_csv(out.with_name("submission.errors.csv")).set_index("file")
    assert errors.loc["broken.jpg", "error"].startswith("not a Kaggle id: its name is not a number")
    assert errors.loc["my_cat.jpg", "id"] == "my_cat"
    assert errors.loc["1.png", "error"].startswith("its Kaggle id 1 is 1.jpg's, so it is left out of the submission")
    assert "a side longer than the limit of 20,000" in errors.loc["5.png", "error"]
    captured = capsys.readouterr()
    assert "3 left out (no Kaggle id of their own)" in captured.out and "3 Grad-CAM overlay(s) in" in captured.out
    assert "3 image(s) without a Kaggle id of their own (a number no other file has) left out" in captured.err
    own = tmp_path / "own"  # no numbered image at all: your own photos, scored by name
    own.mkdir()
    (own / "my_cat.jpg").write_bytes(image_bytes("cat", 7))
    (own / "one.jpg").write_bytes(image_bytes("cat", 9))
    (own / "one.png").write_bytes(image_bytes("dog", 9, fmt="PNG"))
    caplog.set_level("INFO", logger="prefect")  # main() above quietened Prefect again for its exit
    predict(str(own), output_csv=str(tmp_path / "own.csv"))
    assert pd.read_csv(tmp_path / "own.csv")["id"].tolist() == ["my_cat", "one.jpg", "one.png"]  # unique, said so
    assert "2 image(s) share their file stem with another, so their ids are their file names" in caplog.text


def test_ids_that_differ_from_kaggles_sample_fail_before_any_image_is_scored(store, tmp_path, monkeypatch):
    from tasks.models import predictions

    folder = _test1_folder(tmp_path / "comp" / "test1")
    (tmp_path / "comp" / "sampleSubmission.csv").write_text("id,label\n" + "".join(f"{i},0\n" for i in range(1, 13)))
    monkeypatch.setattr(predictions, "load_pyfunc", lambda uri: pytest.fail("the model was loaded to score"))
    with pytest.raises(InputError, match="ids differ from .*sampleSubmission.csv"):
        predict(str(folder), output_csv=str(tmp_path / "submission.csv"))
