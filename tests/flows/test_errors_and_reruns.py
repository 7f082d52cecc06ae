"""Reruns that must not retrain, and errors that must come early, in one sentence, through the real flows.

- A retrain whose candidate ties the champion registers a challenger; rerunning it with the
  same data and config must not register that twin again and again.
- A corrupted manifest, a weights file of another architecture and `--epochs 0` are refused
  before any work, with one sentence that names the file or an option that exists.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.retrain import TRAINED, UNCHANGED, build_parser, main, retrain
from tasks.common.errors import DatasetValidationError
from tests.flows.test_retrain_flow import mlflow_client, petimages_zip, tiny_config, versions_by_alias  # noqa: F401
from tests.prepared import make_prepared_dir


@pytest.mark.slow
def test_rerunning_a_retrain_whose_candidate_tied_skips_and_names_the_versions(
        prefect_harness, mlflow_uri, petimages_zip, tmp_path):  # noqa: F811
    data_dir = tmp_path / "data"
    first = retrain(tiny_config(petimages_zip, data_dir))
    assert first.status == TRAINED and first.decision.alias == "champion"

    # Another config, a margin nothing beats: trained and registered, kept as challenger.
    tied = retrain(tiny_config(petimages_zip, data_dir, dense_units=16, margin=1.0))
    assert tied.status == TRAINED and tied.decision.version == "2" and tied.decision.alias == "challenger"
    trainings = sorted((data_dir / "training").iterdir())

    # The same again: the champion differs, but version 2 was built from exactly this.
    again = retrain(tiny_config(petimages_zip, data_dir, dense_units=16, margin=1.0))
    assert again.status == UNCHANGED, again.headline
    assert "registered version(s) 2" in again.reason and tied.config_hash[:12] in again.reason
    client = mlflow_client()
    assert len(client.search_model_versions("name='cats-vs-dogs'")) == 2  # no third, identical version
    assert versions_by_alias(client) == {"champion": "1", "challenger": "2"}
    assert sorted((data_dir / "training").iterdir()) == trainings


def test_train_model_on_a_corrupted_manifest_is_one_sentence_naming_the_file(prefect_harness, tmp_path):
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
        prefect_harness, mlflow_uri, petimages_zip, mobilenet_weights_file, tmp_path, capsys):  # noqa: F811
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


def test_epochs_0_names_an_option_that_exists(tmp_path, capsys):
    code = main(["--source", str(tmp_path), "--epochs", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    option = err.split("invalid ", 1)[1].split(":", 1)[0]
    assert option in ("--epochs", "--head-epochs"), err
    assert build_parser().parse_args([option, "3"]).head_epochs == 3  # the option named is one the CLI takes
