"""The models wing for any classes: the served frame and signature, the gate's metric, champions of other classes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from tasks.common.errors import ClassesDiffer, ConfigError
from tasks.common.labels import CATS_DOGS, class_map
from tasks.data.arrange import arranged_paths
from tasks.data.datafolder import DataFolder
from tasks.models import packaging, pyfunc
from tasks.models.gate import at_chance, check_metric, decide
from tasks.models.promotion import score_champion
from tests.data.rows import frame, row

THREE = class_map(["daisy", "roses", "tulips"])


def test_the_served_frame_has_a_probability_per_class_and_null_ones_on_error():
    scores = [np.array([0.1, 0.7, 0.2], dtype=np.float32), None]
    answer = pyfunc.predictions_frame(scores, ["", "the image could not be read"], THREE)
    assert list(answer.columns) == ["p_daisy", "p_roses", "p_tulips", "label", "label_index", "error"]
    assert answer.loc[0, "label"] == "roses" and answer.loc[0, "label_index"] == 1
    assert answer.loc[0, "p_roses"] == pytest.approx(0.7) and answer.loc[1, "p_daisy"] is pd.NA
    assert answer.loc[1, "label"] == "" and answer.loc[1, "label_index"] == -1
    binary = pyfunc.predictions_frame([0.8], [""], class_map(["apples", "pears"]))
    assert list(binary.columns) == ["p_apples", "p_pears", "label", "label_index", "error"]
    assert binary.loc[0, "label"] == "pears" and binary.loc[0, "p_apples"] == pytest.approx(0.2)
    assert list(pyfunc.predictions_frame([0.8], [""]).columns) == list(pyfunc.OUTPUT_COLUMNS)  # cats vs. dogs


def test_the_signature_and_config_carry_the_classes():
    outputs = [spec.name for spec in packaging.model_signature(THREE).outputs.inputs]
    assert outputs == ["p_daisy", "p_roses", "p_tulips", "label", "label_index", "error"]
    assert [spec.name for spec in packaging.model_signature().outputs.inputs] == ["p_dog", "label", "label_index",
                                                                                  "error"]
    assert packaging.model_config(32, "pillow", THREE)["classes"] == ["daisy", "roses", "tulips"]
    assert packaging.model_config(32)["classes"] == ["cat", "dog"]


def test_the_gate_metric_must_exist_for_the_classes_and_chance_holds_for_n():
    assert check_metric("macro_f1", THREE.names) == "macro_f1" and check_metric("f1_roses", THREE.names)
    with pytest.raises(ConfigError, match=r"'f1_dog' is not measured for the classes daisy, roses, tulips; pass "
                                          r"--metric with one of roc_auc, accuracy, macro_f1, f1_daisy"):
        check_metric("f1_dog", THREE.names)
    with pytest.raises(ConfigError, match="macro_f1"):
        check_metric("macro_f1", CATS_DOGS.names)
    reason = at_chance({"accuracy": 0.34, "chance_accuracy": 0.34, "roc_auc": 0.9, "score_min": 0.3,
                        "score_max": 0.4})
    assert reason and "at chance" in reason
    assert not decide(0.9, None, floor=0.0, margin=0.0, chance=reason).promote


def test_a_champion_of_other_classes_is_not_compared_and_stays(champion_store, tmp_path, monkeypatch):
    from tasks.models.scoring import evaluate_model_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion_store.uri)
    folder = DataFolder.at(tmp_path / "data")
    folder.root.mkdir()
    folder.record_classes(THREE)
    rows = []
    for label in THREE.names:
        r = row(f"{label}/0.jpg", label)
        r["split"] = "test"
        rows.append(r)
    manifest = frame(rows)
    manifest["arranged_path"] = arranged_paths(manifest, THREE)
    manifest.to_parquet(folder.manifest)
    with pytest.raises(ClassesDiffer, match=r"answers the classes cat,dog, but .* holds daisy,roses,tulips"):
        evaluate_model_uri("models:/cats-vs-dogs@champion", folder.root)

    def other_classes(uri):
        raise ClassesDiffer("it answers the classes cat,dog")

    score = score_champion(other_classes, None, SimpleNamespace(version=1, run_id="r"), "cats-vs-dogs")
    assert score.metrics == {} and "cannot be compared" in score.how
    decision = decide(0.99, score.metrics.get("roc_auc"), floor=0.5, margin=0.0, champion_version="1")
    assert not decision.promote and "no comparable roc_auc; it stays champion" in decision.reasons[1]
