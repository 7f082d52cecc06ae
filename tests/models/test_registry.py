"""The registry gate: real models, real evaluation on a prepared test split, real sqlite store.

Scenario tests walk the promotion rules with models whose quality is known (tests/fake_training:
INVERTED scores ROC AUC 0, MEDIOCRE 0.75, GOOD 1.0 on make_prepared_dir's test split, UNCALIBRATED 1.0
at chance accuracy), so "worse never becomes champion" is checked with numbers the gate computed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tasks.common.errors import ConfigError
from tasks.models.gate import at_chance, decide
from tasks.models.lock import promotion_lock
from tasks.models.naming import CHALLENGER, CHAMPION, MODEL_NAME
from tasks.models.promotion import register_and_gate
from tasks.models.registry import champion_summary, load_pyfunc
from tasks.models.scoring import evaluate_model_uri
from tasks.models.tracking import log_pyfunc_model
from tests.fake_training import mlflow_store  # noqa: F401 - fixture
from tests.fake_training import GOOD, INVERTED, MEDIOCRE, UNCALIBRATED, tiny_model
from tests.prepared import make_prepared_dir

FLOOR = 0.6


def _logged(tmp_path, name: str, rgb) -> tuple[str, str]:
    """A FINISHED run holding a pyfunc model with the given weights; returns (run_id, model_uri)."""
    from tasks.models.store import ensure_experiment, use_tracking

    use_tracking()
    model_path = tiny_model(tmp_path / name / "model.keras", rgb=rgb)
    with mlflow.start_run(experiment_id=ensure_experiment(), run_name=name,
                          tags={"dataset_fingerprint": "fp-" + name, "config_hash": "cfg-" + name}) as run:
        info = log_pyfunc_model(model_path, 32)
    return run.info.run_id, info.model_uri


def _champion_version() -> str | None:
    summary = champion_summary()
    return summary.version if summary else None


# ------------------------------------------------------------------ the rule itself


@pytest.mark.parametrize("candidate, champion, has_champion, promote, words", [
    (0.55, None, False, False, "below the floor"),
    (None, None, False, False, "no finite"),
    (float("nan"), 0.7, True, False, "no finite"),
    (0.65, None, False, True, "first version"),
    (0.90, 0.80, True, True, "beats the champion"),
    (0.805, 0.80, True, False, "does not beat"),     # gain below the margin
    (0.80, 0.80, True, False, "does not beat"),      # a tie never churns the alias
    (0.70, 0.90, True, False, "does not beat"),
    (0.90, None, True, False, "no comparable"),      # champion could not be scored: keep it
])
def test_decide(candidate, champion, has_champion, promote, words):
    decision = decide(candidate, champion, floor=FLOOR, margin=0.01, champion_version="1" if has_champion else None)
    assert decision.promote is promote
    assert words in " ".join(decision.reasons)
    assert decision.alias == (CHAMPION if promote else CHALLENGER)


@pytest.mark.parametrize("metrics, words", [
    ({"accuracy": 0.43, "chance_accuracy": 0.5, "roc_auc": 1.0, "score_min": 0.4999, "score_max": 0.5004},
     "0.4999..0.5004: the model is not calibrated"),
    ({"accuracy": 0.5, "chance_accuracy": 0.5, "roc_auc": 0.4}, "at chance"),
    ({"accuracy": 0.6, "chance_accuracy": 0.7}, "always answering the most frequent class scores 0.7000"),
    ({"accuracy": 0.51, "chance_accuracy": 0.5}, None),
    ({"roc_auc": 0.9}, None),
])
def test_a_model_at_chance_is_refused_whatever_the_floor(metrics, words):
    reason = at_chance(metrics)
    assert (reason is None) if words is None else (words in reason)
    decision = decide(0.99, None, floor=0.0, margin=0.0, chance=reason)
    assert decision.promote is (words is None)


# ------------------------------------------------------------------ the gate with real models


def test_gate_promotes_only_better_models_on_the_same_test_split(mlflow_store, tmp_path):
    data_dir = make_prepared_dir(tmp_path)
    evaluate = lambda uri: evaluate_model_uri(uri, data_dir)  # noqa: E731 - the callback G passes

    def attempt(name, rgb):
        run_id, model_uri = _logged(tmp_path, name, rgb)
        metrics = evaluate(model_uri)  # candidate through the very same pipeline
        return run_id, register_and_gate(run_id, model_uri, metrics, evaluate_champion=evaluate,
                                         floor=FLOOR, margin=0.01)

    _, inverted = attempt("inverted", INVERTED)
    assert inverted.alias == CHALLENGER and inverted.candidate_value == 0.0
    assert "test accuracy 0.0000 is at chance" in inverted.reasons[0]  # worse than chance is at chance too
    assert champion_summary() is None  # a failing first model is never promoted

    _, uncalibrated = attempt("uncalibrated", UNCALIBRATED)  # perfect ranking, every image called a cat
    assert uncalibrated.alias == CHALLENGER and uncalibrated.candidate_value == pytest.approx(1.0)
    [reason] = uncalibrated.reasons
    assert "test accuracy 0.5000 is at chance" in reason and "ROC AUC 1.0000" in reason and "not calibrated" in reason
    assert champion_summary() is None  # above any floor, yet at chance: never promoted

    mediocre_run, mediocre = attempt("mediocre", MEDIOCRE)
    assert mediocre.alias == CHAMPION and mediocre.candidate_value == pytest.approx(0.75)
    assert "first version" in " ".join(mediocre.reasons)

    _, worse = attempt("inverted-again", INVERTED)
    assert worse.alias == CHALLENGER and _champion_version() == mediocre.version

    good_run, good = attempt("good", GOOD)
    assert good.alias == CHAMPION and good.previous_champion_version == mediocre.version
    assert good.champion_value == pytest.approx(0.75)  # re-computed, not read from a tag
    assert "re-computed on the candidate's test split" in " ".join(good.reasons)

    superseded = MlflowClient().get_model_version(MODEL_NAME, mediocre.version).tags
    assert superseded["gate.superseded_by"] == good.version

    _, again = attempt("mediocre-again", MEDIOCRE)
    assert again.alias == CHALLENGER and again.champion_value == pytest.approx(1.0)
    assert _champion_version() == good.version

    client = MlflowClient()
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4, 5, 6]  # nothing deleted
    tags = client.get_model_version(MODEL_NAME, again.version).tags
    assert tags["gate.decision"] == CHALLENGER and "does not beat" in " ".join(again.reasons)
    assert set(tags) == {"dataset_fingerprint", "config_hash", "gate.decision", "gate.reason", "run"}  # readable
    assert tags["run"].endswith(f"/runs/{client.get_model_version(MODEL_NAME, again.version).run_id}")
    assert again.champion_metrics["roc_auc"] == pytest.approx(1.0)  # what the gate compared, for the summary
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHALLENGER).version) == again.version
    run_tags = client.get_run(good_run).data.tags
    assert run_tags["gate.decision"] == CHAMPION and run_tags["registered_model.version"] == good.version
    assert "gate/decision.json" in [a.path for a in client.list_artifacts(good_run, "gate")]

    summary = champion_summary()
    assert summary.run_id == good_run and summary.model_uri == f"models:/{MODEL_NAME}/{good.version}"
    assert summary.dataset_fingerprint == "fp-good" and summary.config_hash == "cfg-good"
    assert summary.metrics["roc_auc"] == pytest.approx(1.0)
    assert mediocre_run != good_run


def test_a_retried_registration_adds_no_version(mlflow_store, tmp_path, caplog):
    run_id, model_uri = _logged(tmp_path, "once", GOOD)
    caplog.set_level("INFO", logger="tasks")
    first = register_and_gate(run_id, model_uri, {"roc_auc": 0.9}, evaluate_champion=None, floor=FLOOR, margin=0.0)
    said = [record.getMessage() for record in caplog.records if "serialised by the" in record.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"Promotion of {MODEL_NAME} serialised by the ")  # once, held twice
    second = register_and_gate(run_id, model_uri, {"roc_auc": 0.9}, evaluate_champion=None, floor=FLOOR, margin=0.0)
    assert first.version == second.version == "1" and second.alias == CHAMPION
    assert len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")) == 1


def test_concurrent_promotions_leave_the_better_model_champion(mlflow_store, tmp_path):
    """The worse candidate reads the old champion, the better one is promoted meanwhile; the
    worse one must notice (re-read under the lock) instead of overwriting the alias."""
    base_run, base_uri = _logged(tmp_path, "base", MEDIOCRE)
    better_run, better_uri = _logged(tmp_path, "better", GOOD)
    worse_run, worse_uri = _logged(tmp_path, "worse", GOOD)
    register_and_gate(base_run, base_uri, {"roc_auc": 0.80}, evaluate_champion=None, floor=FLOOR, margin=0.0)

    scores = {"1": 0.80}  # what each version scores on the shared test split
    better_done = threading.Event()
    worse_has_read = threading.Event()
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def evaluate_slowly_for_worse(uri: str) -> dict:
        worse_has_read.set()
        better_done.wait(timeout=60)  # hold the stale view until the better one has promoted
        return {"roc_auc": scores[uri.rsplit("/", 1)[1]]}

    def evaluate_for_better(uri: str) -> dict:
        worse_has_read.wait(timeout=60)
        return {"roc_auc": scores[uri.rsplit("/", 1)[1]]}

    def promote(key, run_id, uri, value, evaluate, done=None):
        try:
            results[key] = register_and_gate(run_id, uri, {"roc_auc": value}, evaluate_champion=evaluate,
                                             floor=FLOOR, margin=0.01)
            scores[results[key].version] = value
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            if done is not None:
                done.set()

    worse = threading.Thread(target=promote, args=("worse", worse_run, worse_uri, 0.90, evaluate_slowly_for_worse))
    better = threading.Thread(target=promote, args=("better", better_run, better_uri, 0.95, evaluate_for_better,
                                                     better_done))
    # Version numbers are assigned under the lock at registration: register the better one first.
    better.start()
    time.sleep(0.2)
    worse.start()
    for thread in (better, worse):
        thread.join(timeout=120)
    assert not errors, errors
    assert results["better"].alias == CHAMPION
    assert results["worse"].alias == CHALLENGER
    assert results["worse"].previous_champion_version == results["better"].version
    assert "does not beat" in " ".join(results["worse"].reasons)
    assert _champion_version() == results["better"].version


def test_promotion_lock_excludes_another_process_until_released(mlflow_uri):
    """Two retrains are usually two processes (two flow runs): the lock must hold across them."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom tasks.models.lock import promotion_lock\n"
                               f"with promotion_lock({mlflow_uri!r}):\n"
                               "    print('locked', flush=True)\n    sys.stdin.readline()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TimeoutError, match="another promotion"):
            with promotion_lock(mlflow_uri, timeout_s=0.3):
                pass
        holder.stdin.write("release\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        with promotion_lock(mlflow_uri, timeout_s=5):  # free again once released
            pass
    finally:
        if holder.poll() is None:
            holder.kill()


def test_unknown_alias_and_model_give_one_clear_sentence(mlflow_store, tmp_path):
    with pytest.raises(ConfigError, match="Registered model 'cats-vs-dogs' does not exist"):
        load_pyfunc("models:/cats-vs-dogs@champion")
    run_id, model_uri = _logged(tmp_path, "only", INVERTED)
    register_and_gate(run_id, model_uri, {"roc_auc": 0.1}, evaluate_champion=None, floor=FLOOR, margin=0.0)
    with pytest.raises(ConfigError) as caught:
        load_pyfunc("models:/cats-vs-dogs@champion")
    assert str(caught.value) == ("No model version has alias 'champion' in registered model 'cats-vs-dogs'; "
                                 "run a retrain first (python -m flows.retrain) or pass --model-uri.")
    with pytest.raises(ConfigError, match="has no version 7"):
        load_pyfunc("models:/cats-vs-dogs/7")
    assert load_pyfunc("models:/cats-vs-dogs@challenger") is not None


def test_a_version_says_what_it_is_in_one_line_and_the_experiment_opens_on_its_runs(tmp_path):
    """The registry's description column and the MLflow 3 UI's experiment kind (runs, not its GenAI views)."""
    from tasks.models.store import EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT
    from tests.fake_training import promoted_champion

    uri, result = promoted_champion(tmp_path, backbones=("resnet50",), fine_tune=False)
    client = MlflowClient(tracking_uri=uri)
    described = client.get_model_version(MODEL_NAME, "1").description
    assert described == ("resnet50; test roc_auc 0.9700, accuracy 0.9000, log_loss 0.3000; gate: champion, "
                         "roc_auc 0.9700 passes the floor 0.5000; no champion yet: the first version to pass the "
                         "floor is promoted")
    experiment = client.get_experiment_by_name("cats-vs-dogs")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
