"""The typed results that flows return and pass on: the contracts between the three wings.

    prepare_data -> PrepareSummary          (tasks.data)
    train_model  -> TrainResult             (tasks.learning; one BackboneResult per backbone)
    retrain      -> RetrainSummary          (tasks.models; Promotion is the gate's verdict)
    audit        -> AuditSummary            (tasks.learning; one QualitySummary per backbone)
    predict      -> PredictSummary          (tasks.models)

They carry counts, metrics and paths, never arrays or models, so Prefect can persist and
show them and MLflow can log them. Fields have no defaults where a value is always known:
a reader that finds a field missing has found a bug, not an optional value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

Metrics = dict[str, Any]
"""Metric name -> value (floats, None where undefined, and the confusion matrix as a list)."""


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- prepare


class PreparePaths(_Result):
    data_dir: str
    manifest: str
    arranged: str
    validation_result: str
    data_docs: str
    summary: str


class LabelOverrides(_Result):
    """What the labels.csv overrides (in the source or the data folder) changed: a person's corrections."""

    files: list[str]
    """The override files read, source first (the data folder's wins where both name an image)."""
    digest: str
    """sha256 over the overrides as applied (image sha256 -> action), so equal corrections give equal digests."""
    relabelled: int
    excluded: int
    unmatched: int
    """Rows that named no image of this source (kept in the file, ignored here)."""

    def text(self) -> str:
        """`2 relabelled, 1 excluded by labels.csv`: one line for logs, summaries and the registry."""
        unmatched = f", {self.unmatched} naming no image" if self.unmatched else ""
        return f"{self.relabelled} relabelled, {self.excluded} excluded by labels.csv{unmatched}"


class PrepareSummary(_Result):
    """What prepare_data made of a source: facts about the data only, so equal data gives an equal summary."""

    layout: str
    classes: list[str] = ["cat", "dog"]
    """Class names in label order (index = label): the data folder's class map."""
    counts: dict[str, dict[str, int]]
    """{split: {class: n}} of arranged, labelled images."""
    unlabelled: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    fingerprint: str
    """sha256 over (sha256, label, split) of every kept labelled image: changes exactly when the data does."""
    paths: PreparePaths
    label_overrides: LabelOverrides | None = None
    """What labels.csv changed (None when there is none)."""


# --------------------------------------------------------------------------- train


class DeviceSetup(_Result):
    """Where and how the compute ran: recorded with every run and every feature cache."""

    backend: str
    """Keras backend: "tensorflow", "jax" or "torch"."""
    device: Literal["GPU", "CPU"]
    gpus: int
    device_name: str
    precision: Literal["bfloat16", "float32", "int8"]
    """Compute dtype of the backbone (int8: OpenVINO only); features and outputs are stored as float32 either way."""
    reason: str
    """Why this precision (the config's choice, a GPU's rule, or what was measured on this CPU)."""
    engine: Literal["keras", "openvino"]
    """What computes the backbone and the shipped model: Keras on its backend, or OpenVINO's CPU plugin."""
    engine_reason: str
    """Why this engine (the config's choice, Keras on a GPU, or what was measured on this CPU)."""


class HeadScores(_Result):
    """A trained head: where it is saved and how it did on the validation split."""

    head_path: str
    history_path: str
    val_accuracy: float
    val_loss: float
    val_auc: float | None
    epochs_run: int
    best_epoch: int
    val_tta: dict[str, float | None] | None = None
    """accuracy, log_loss and roc_auc on validation with test-time augmentation (None without `--tta flip`)."""


class Int8Check(_Result):
    """What int8 costs the head: a validation sample extracted both ways, the same head scoring each."""

    images: int
    calibration_images: int
    """Train images NNCF calibrated on (never validation or test)."""
    float32: dict[str, float | None]
    """The head's validation metrics (accuracy, roc_auc, log_loss) on float32 OpenVINO features."""
    int8: dict[str, float | None]
    """The same on the run's int8 features."""
    feature_relative_l2: float
    """||int8 - float32|| / ||float32|| over the sample's features."""
    max_probability_gap: float
    """Largest difference of the head's probability between the two."""


class QualitySummary(_Result):
    """The data audit of one feature space: what it found, where the findings are, what its checks said.

    Found on the cached features (tasks/learning/audit.py): suspected label errors (out-of-fold
    probabilities ranked by cleanlab), near-duplicate pairs within and across splits, test and
    validation images that are near-copies of training images (leakage), and outliers.
    """

    feature_space: str
    """The feature cache it was computed on (`<backbone>-<weights>-<size>-<precision>-<backend>-<decoder>`)."""
    report: str
    """Every finding as parquet: data/quality/<feature space>/audit.parquet."""
    csv: str
    """The same as CSV for people, with an empty `decision` column to fill (then pass it back as labels.csv)."""
    images: int
    label_issues: int
    near_duplicates: int
    """Near-duplicate pairs, within a split and across splits (leaking ones included)."""
    leaked_test_images: int
    leaked_validation_images: int
    outliers: int
    folds: int
    """Folds of the out-of-fold probabilities (0: a class too small to hold one out, no label issues sought)."""
    warnings: list[str]
    """The audit's expectations that failed at severity warning, in short."""
    checks: str
    """The Great Expectations result of the audit's checks (JSON)."""
    reused: bool

    def text(self) -> str:
        """One line for logs and summaries: what the audit found."""
        return (f"{self.label_issues} suspected label(s), {self.near_duplicates} near-duplicate pair(s) "
                f"({self.leaked_test_images} test and {self.leaked_validation_images} validation image(s) near a "
                f"training image), {self.outliers} outlier(s) among {self.images} images")


class BackboneResult(HeadScores):
    """One backbone of a training run: its cached features and the head trained on them."""

    backbone: str
    weights: str
    """"imagenet" or the weights file the features were computed with (the kept random draw for None)."""
    input_size: int
    precision: Literal["bfloat16", "float32", "int8"]
    """The backbone's compute dtype (under "auto" measured per backbone on a CPU)."""
    engine: Literal["keras", "openvino"] = "keras"
    """What computed its features (under "auto" measured per backbone on a CPU)."""
    int8_check: Int8Check | None = None
    """int8 only: the head's validation metrics on int8 vs float32 features of the same images."""
    feature_dim: int
    feature_cache_dir: str
    features_computed: int
    features_reused: int
    mirrored_cache_dir: str | None = None
    """The feature space of the mirrored images (`--tta flip`), else None."""
    quality: QualitySummary | None = None
    """The data audit on this backbone's features (None for results made before the audit existed)."""
    suspects_left_out: int = 0
    """Train images left out of its head (and fine-tuning) as suspected label errors (exclude_suspected_labels)."""


class FineTuneReport(_Result):
    """What fine-tuning did; `improved` False means the head-only weights were kept."""

    trainable_layers: int
    frozen_batchnorm: int
    trainable_weights: int
    baseline_val_loss: float
    improved: bool
    epochs_run: int
    params: dict[str, Any]


class CalibrationSummary(_Result):
    """Temperature scaling of the shipped model: fitted on validation, judged on test (tasks/learning/calibration.py)."""

    temperature: float
    """The temperature inside the shipped model (1.0 when none was applied)."""
    fitted_temperature: float
    """The best temperature on validation, applied or not."""
    applied: bool
    reason: str
    validation: dict[str, dict[str, float]]
    """{"before": {"ece", "log_loss", "brier"}, "after": {...}} on the validation split."""
    test: dict[str, dict[str, float]]
    """The same on the test split ({} until the shipped model is evaluated)."""
    reliability_plot: str | None


class EnsembleResult(HeadScores):
    """The head on the concatenated cached features of several backbones: one more candidate."""

    backbone: str
    """The candidate's name: its members joined by "+" (e.g. "vgg16+mobilenet_v2")."""
    members: list[str]
    input_size: int
    feature_dim: int


class Explanation(_Result):
    """One image explained by Grad-CAM: which, what the model said, and the overlay PNG."""

    path: str
    label: str
    predicted: str
    probability: float
    """The model's probability of the predicted class."""
    overlay: str


def chosen_members(chosen: str, ensemble: EnsembleResult | None) -> list[str]:
    """The backbones the chosen candidate runs: the ensemble's members, or the one backbone."""
    return list(ensemble.members) if ensemble is not None and chosen == ensemble.backbone else [chosen]


class TrainResult(_Result):
    """train_model's result, also written as `train_summary.json` in the run folder."""

    chosen_backbone: str
    backbones: dict[str, BackboneResult]
    test_metrics: Metrics
    val_metrics: Metrics
    model_path: str
    engine_model_path: str | None
    """The shipped model as OpenVINO IR (model.xml, beside model.keras) when the run's engine is OpenVINO."""
    input_size: int
    output_dir: str
    plots: dict[str, str]
    comparison_path: str
    history_paths: dict[str, str]
    """"head:<backbone>" -> Keras history JSON, and "fine_tune" when fine-tuning ran."""
    predictions_path: str
    metrics_path: str
    fine_tuned: bool
    """The shipped weights come from fine-tuning (it ran and beat the head-only model)."""
    fine_tune: FineTuneReport | None
    head_agreement: float
    """Largest p(dog) gap between the shipped model and the validated head (should be ~0)."""
    devices: DeviceSetup
    """Where the run computed, at the chosen backbone's precision."""
    decoder: Literal["opencv", "pillow"]
    """The image decoder of its features, evaluation and served model (config "auto" resolved)."""
    counts: dict[str, dict[str, int]]
    config: dict[str, Any]
    config_hash: str
    data_dir: str
    data_fingerprint: str | None
    ensemble: EnsembleResult | None = None
    """The ensemble candidate, when several backbones were given (chosen when `chosen_backbone` is its name)."""
    tta: Literal["none", "flip"] = "none"
    """Test-time augmentation inside the shipped model."""
    calibration: CalibrationSummary | None = None
    explanations: list[Explanation] = []
    """Grad-CAM overlays of the worst test mistakes of each class."""

    @property
    def chosen_members(self) -> list[str]:
        """The backbones the chosen candidate runs: the ensemble's members, or the one backbone."""
        return chosen_members(self.chosen_backbone, self.ensemble)

    @property
    def first_member(self) -> BackboneResult:
        """The chosen backbone, or an ensemble's first member: whose engine, precision, int8 check and audit the
        shipped model goes by."""
        return self.backbones[self.chosen_members[0]]

    @property
    def quality(self) -> QualitySummary | None:
        """The data audit on the chosen (first) backbone's features: what the run's MLflow metrics and the gate use."""
        return self.first_member.quality


# --------------------------------------------------------------------------- retrain


class ChampionInfo(_Result):
    """The registered champion as the registry records it."""

    version: str
    run_id: str | None
    model_uri: str
    dataset_fingerprint: str
    config_hash: str
    metrics: dict[str, float]
    """Test metrics recorded when it was registered (on its own test split)."""


class Promotion(_Result):
    """The gate's verdict on one registered version."""

    version: str
    model_name: str
    model_uri: str
    alias: Literal["champion", "challenger"]
    promoted: bool
    reasons: list[str]
    metric: str
    candidate_value: float | None
    champion_value: float | None
    """The champion's metric re-computed on the candidate's test split (None without a champion)."""
    champion_metrics: dict[str, float] | None
    """All the champion's metrics on the candidate's test split, as the gate compared them."""
    previous_champion_version: str | None


class MlflowRun(_Result):
    run_id: str
    experiment_id: str
    run_url: str
    tracking_uri: str
    model_uri: str | None = None
    """models:/<model id> of the logged pyfunc model (None for a skipped run)."""
    child_run_ids: dict[str, str] = {}


class RetrainSummary(_Result):
    """What one retrain did, shown as the run's markdown artifact and printed by the CLI."""

    status: Literal["trained", "unchanged"]
    headline: str
    flow_run_id: str | None
    config_hash: str
    data: PrepareSummary
    champion_before: ChampionInfo | None
    mlflow: MlflowRun
    reason: str | None = None
    """Why training was skipped (status "unchanged")."""
    chosen_backbone: str | None = None
    test_metrics: dict[str, float] | None = None
    """The candidate's test metrics through the serving code (the gate's yardstick)."""
    decision: Promotion | None = None
    model_path: str | None = None
    devices: DeviceSetup | None = None
    report_path: str | None = None
    """The version's self-contained HTML report in the run folder (also the run's `report/index.html`)."""
    report_url: str | None = None
    """The report in the MLflow UI."""
    int8_check: Int8Check | None = None
    """At int8: the chosen backbone's head on int8 vs float32 features of a validation sample."""
    quality: QualitySummary | None = None
    """The data audit of the chosen feature space (None when nothing was trained)."""


# --------------------------------------------------------------------------- audit


class AuditSummary(_Result):
    """What `python -m flows.audit` found: the data audit on each backbone's features."""

    data_dir: str
    data_fingerprint: str | None
    audits: dict[str, QualitySummary]
    """Backbone name -> its audit (data/quality/<feature space>/)."""


# --------------------------------------------------------------------------- predict


class PredictSummary(_Result):
    output_csv: str
    errors_csv: str | None
    """Side file naming every image that could not be scored (None when there were none)."""
    n_images: int
    n_errors: int
    n_skipped: int
    n_left_out: int = 0
    """Images without a Kaggle id (a name that is not a number) in a folder of numbered ones: in the errors file only."""
    model_uri: str
    images_dir: str
    sample_submission: str | None = None
    """Kaggle's sampleSubmission.csv the ids were checked against (None when none was found)."""
    explained_dir: str | None = None
    """Where the Grad-CAM overlays of `--explain N` went (`<csv name>.explained/`), None without it."""
    n_explained: int = 0


# --------------------------------------------------------------------------- monitor


class DriftSummary(_Result):
    """One drift check of a served model (flows/monitor.py): its figures, the verdict and where they were kept."""

    model_uri: str
    model_name: str
    version: str
    run_id: str
    source: Literal["log", "images"]
    """What was compared with training: the recent window of the prediction log, or a folder of new images."""
    window: str
    """The window's description: its hours and folder, or the images' folder."""
    rows: int
    """Rows (scored images) of the window compared."""
    reference: str
    """What stands for the training data: the cached features or the model's own of the train split, and how many."""
    reference_rows: int
    status: Literal["drift", "no drift", "too few rows"]
    reasons: list[str]
    """Why drift was found, one sentence per figure past its threshold (empty without drift)."""
    mmd2: float | None = None
    p_value: float | None = None
    """Feature drift: the permutation p-value of the MMD (None where the rows carry no features)."""
    class_shares: dict[str, float] = {}
    training_shares: dict[str, float] = {}
    class_shift: float | None = None
    """Total variation distance between the predicted class shares and the training split's."""
    mean_confidence: float | None = None
    baseline_confidence: float | None = None
    """Mean probability of the predicted class on the test split when the model was trained."""
    confidence_drop: float | None = None
    thresholds: dict[str, float] = {}
    skipped_files: list[str] = []
    """Prediction log files left out as corrupt, each with why."""
    other_rows: int = 0
    """Rows of the window written by another model (another version or run), left out."""
    report_path: str | None = None
    report_url: str | None = None
    mlflow_run_id: str | None = None
    event_id: str | None = None
    """The Prefect event `catsdogs.drift.detected` emitted for it (None without drift)."""

    @property
    def drifted(self) -> bool:
        return self.status == "drift"

    def headline(self) -> str:
        """One line: the verdict and its figures."""
        figures = []
        if self.p_value is not None:
            figures.append(f"feature p-value {self.p_value:.3g}")
        if self.class_shift is not None:
            figures.append(f"class shift {self.class_shift:.2f}")
        if self.confidence_drop is not None:
            figures.append(f"confidence drop {self.confidence_drop:+.2f}")
        what = f"{self.model_name} version {self.version}" if self.version else self.model_uri
        return f"{self.status} for {what} on {self.rows} rows ({', '.join(figures) or 'no figures'})"
