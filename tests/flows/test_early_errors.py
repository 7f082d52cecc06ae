"""Errors that must come early, in one sentence, through the real flows and command line.

A corrupted manifest, a weights file of another architecture and `--epochs 0` are refused
before any work, with one sentence that names the file or the option as it was typed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.retrain import main
from tasks.common.errors import DatasetValidationError
from tests.flows.test_retrain_flow import petimages_zip  # noqa: F401  (fixture)
from tests.prepared import make_prepared_dir


def test_train_model_on_a_corrupted_manifest_is_one_sentence_naming_the_file(tmp_path):
    from flows.train import train_model

    data_dir = make_prepared_dir(tmp_path)
    manifest = data_dir / "manifest.parquet"
    manifest.write_bytes(manifest.read_bytes()[:200] + b"\x00 bit rot \x00" * 40)
    with pytest.raises(DatasetValidationError) as caught:
        train_model(data_dir)
    message = str(caught.value)
    assert str(manifest) in message and "prepare" in message and len(message.splitlines()) == 1
    assert not (data_dir / "training").exists() or not list((data_dir / "training").iterdir())


@pytest.fixture(scope="module")
def mobilenet_weights_file(tmp_path_factory) -> Path:
    """A weights file saved from a mobilenet_v2 backbone (include_top=False), as a firewalled user brings one."""
    from tasks.learning.backbones import build_backbone

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_notop.weights.h5"
    build_backbone("mobilenet_v2", None, 32).save_weights(str(path))
    return path


def test_a_weights_file_of_another_architecture_fails_before_any_data_work(
        mlflow_uri, petimages_zip, mobilenet_weights_file, tmp_path, capsys):  # noqa: F811
    data_dir = tmp_path / "data"
    code = main(["--source", str(petimages_zip), "--data-dir", str(data_dir), "--backbones", "efficientnetv2b0",
                 "--weights", str(mobilenet_weights_file), "--input-size", "32"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # stderr also carries TensorFlow's start-up noise and the Prefect run log; the CLI's own word is one line
    [sentence] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert err.splitlines()[-1] == sentence and "Traceback" not in err
    assert str(mobilenet_weights_file) in sentence and "efficientnetv2b0" in sentence
    assert not (data_dir / "training").exists()
    assert not (data_dir / "extracted").exists() and not (data_dir / "manifest.parquet").exists()  # before prepare


def test_epochs_0_names_the_option_as_it_was_typed(tmp_path, capsys):
    code = main(["--source", str(tmp_path), "--epochs", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: invalid --epochs: ") and "greater than or equal to 1" in err, err
    code = main(["--source", str(tmp_path), "--head-epochs=0"])
    assert capsys.readouterr().err.startswith("error: invalid --head-epochs: ") and code == 2


def test_a_missing_source_images_or_store_is_said_before_any_server_or_flow_starts(tmp_path, capsys, monkeypatch):
    """What needs no work is checked first: as quick as a mistyped option, not after a server, a flow and MLflow."""
    from flows import cli, prefect_server
    from flows.predict import main as predict

    monkeypatch.setattr(prefect_server, "temporary_server", lambda *a, **k: pytest.fail("a server was started"))
    monkeypatch.setattr(cli, "check_prefect_api", lambda: pytest.fail("the Prefect API was asked"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'nowhere' / 'mlflow.db'}")
    missing = tmp_path / "flowers.zip"
    assert main(["--source", str(missing), "--data-dir", str(tmp_path / "data")]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: Source '{missing}' does not exist") and "full log" in line
    images = tmp_path / "photos"
    assert predict([str(images), "--data-dir", str(tmp_path / "data")]) == 2
    assert capsys.readouterr().err.startswith(f"error: Images {images} do not exist")
    images.mkdir()
    assert predict([str(images), "--data-dir", str(tmp_path / "data"), "--output-csv", str(tmp_path / "out.csv")]) == 2
    assert capsys.readouterr().err.startswith(f"error: The MLflow store {tmp_path / 'nowhere' / 'mlflow.db'} does "
                                              "not exist; run a retrain first")
    assert not (tmp_path / "nowhere").exists()
