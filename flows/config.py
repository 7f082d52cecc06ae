"""The configuration models: the flows' parameters, the Prefect forms and the command lines.

Each model is made of JSON-friendly fields so that Prefect renders it as a form, MLflow can
log it as parameters and a run can be reproduced from its `model_dump()`. The command lines
are generated from these fields (flows/cli.py), so a new field needs no second edit. Values
are checked here, before any image is read, so a typo in a backbone name costs a second
instead of a feature-extraction pass.

    DataConfig     where the data comes from and what the dataset must satisfy  (prepare)
    FeatureConfig  which feature space (backbones, weights, size, ...): part of TrainConfig
    TrainConfig    what to train and how; its fields alone make `config_hash()`  (train)
    GateConfig     when a trained model may become the champion
    QualityConfig  what the data audit flags and how much of it is too much     (train, audit)
    ComputeConfig  where feature shards are computed (never changes the model)
    RetrainConfig  all five, plus run options                                   (retrain)
    AuditConfig    a feature space and the audit's checks                       (audit)
    PredictConfig  what to score with which model                               (predict)
    ExportConfig   which model to write in which format, where                  (export)
    MonitorConfig  which model to watch, on what, and what counts as drift      (monitor)
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.common.errors import ConfigError
from tasks.data.splits import DEFAULT_FRACTIONS, check_fractions
from tasks.data.validate import ValidationThresholds
from tasks.learning.backbones import BACKBONES, get_backbone, weights_fingerprint
from tasks.learning.audit import MAX_LABEL_ISSUE_SHARE, MAX_LEAKED_TEST_SHARE
from tasks.learning.drift import MAX_CLASS_SHIFT, MAX_CONFIDENCE_DROP, MAX_P_VALUE, MAX_ROWS
from tasks.learning.neighbours import GAP_RATIO, NEAR_DUPLICATE_SIMILARITY, NEIGHBOURS, RELATIVE_DISTANCE
from tasks.models.naming import DEFAULT_DATA_DIR, DEFAULT_EXPERIMENT, DEFAULT_MODEL_URI, MODEL_NAME, \
    default_data_dir, parse_registry_uri


def _cli(*aliases: str) -> dict[str, Any]:
    """Extra option names of a field on the command line (besides --<field-name>)."""
    return {"cli_aliases": list(aliases)}


class _Section(BaseModel):
    """A config model that may be a part of a larger one (RetrainConfig is made of five)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def section(self, model: type[S]) -> S:
        """The fields of `model` alone, as that model (`retrain_config.section(DataConfig)`)."""
        dumped = self.model_dump(mode="json")
        return model.model_validate({name: dumped[name] for name in model.model_fields})


S = TypeVar("S", bound=_Section)


def _flat_threshold_properties(schema: dict[str, Any]) -> None:
    """The flat threshold names in the JSON schema too, so Prefect accepts them in `--params` and forms."""
    nested = ValidationThresholds.model_json_schema()["properties"]
    for name, spec in nested.items():
        spec = {key: value for key, value in spec.items() if key != "default"}  # absent means "not given"
        spec["description"] = f"Same as thresholds.{name}, spelled as on the command line: {spec.get('description', '')}"
        schema["properties"].setdefault(name, spec)


class DataConfig(_Section):
    """Where the data comes from and what the dataset must satisfy before anything trains.

    The dataset checks live in `thresholds`, but the names the command line uses are accepted
    at the top level too (`{"min_per_class": 10}` means `{"thresholds": {"min_per_class": 10}}`),
    so a deployment's `--params` can be written the way the options are; one value given both
    ways differently is refused.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              json_schema_extra=lambda schema, _: _flat_threshold_properties(schema))

    source: str = Field(
        default="petimages",
        description='"petimages" (Microsoft\'s public archive of Dogs vs. Cats), "kaggle", an https:// URL, '
                    "a local .zip/.tar(.gz) archive or an extracted folder; your own classes: one folder per class.")
    expected_sha256: str | None = Field(
        default=None, json_schema_extra=_cli("--sha256"),
        description="Pin the source archive's sha256 (otherwise trusted on first use and checked ever after).")
    data_dir: str = Field(default=DEFAULT_DATA_DIR,
                          description="Data folder (relative paths resolve against the working directory); a retrain's "
                                      "default is data-<model name> for any --model-name but cats-vs-dogs.")
    split_fractions: tuple[float, float, float] = Field(
        default=DEFAULT_FRACTIONS, description="Train/validation/test shares of each class (images keep the split "
                                               "the data folder gave them; other fractions split afresh).")
    respect_source_split: bool = Field(
        default=True, description="Keep a pre-split source's own train/validation folders (test is carved from "
                                  "each class's train images when it has none).")
    replace_classes: bool = Field(
        default=False, description="Let this source's classes replace the other set of classes the data folder "
                                   "holds (otherwise refused: give each set of classes its own data folder).")
    thresholds: ValidationThresholds = Field(
        default_factory=ValidationThresholds,
        description="Dataset-level checks before training (and the image size limits of the manifest); the "
                    "defaults suit the full 25,000-image dataset.")

    @model_validator(mode="before")
    @classmethod
    def _flat_thresholds(cls, values: Any) -> Any:
        """Move `min_per_class` & co. given at the top level into `thresholds`; refuse one given twice, differently."""
        if not isinstance(values, dict):
            return values
        flat = {name: values[name] for name in ValidationThresholds.model_fields if name in values}
        if not flat:
            return values
        nested = values.get("thresholds") or {}
        if isinstance(nested, ValidationThresholds):
            given = {name: getattr(nested, name) for name in nested.model_fields_set}
            nested = nested.model_dump()
        else:
            given = nested = dict(nested) if isinstance(nested, dict) else nested
        if not isinstance(nested, dict):
            return values  # not a mapping: pydantic says what is wrong with `thresholds`
        for name, value in flat.items():
            if name in given and given[name] != value:
                raise ValueError(f"{name} is given twice, {value!r} at the top and {given[name]!r} in thresholds; "
                                 "give it once")
        return {**{key: value for key, value in values.items() if key not in flat}, "thresholds": {**nested, **flat}}

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, fractions: tuple[float, float, float]) -> tuple[float, float, float]:
        try:
            return check_fractions(fractions)
        except ConfigError as error:
            raise ValueError(str(error)) from None


class FeatureConfig(_Section):
    """Which feature space: the backbones, their weights, input size, precision and decoder."""

    backbones: list[str] = Field(
        default_factory=lambda: ["resnet50"],
        description=f"Backbones to compare ({', '.join(BACKBONES)}); with several, a head on their concatenated "
                    "features competes too; the best by validation AUC is kept.")
    weights: str | None = Field(
        default="imagenet",
        description='"imagenet", a local Keras weights file (one backbone only), or "none" for random weights (tests).')
    input_size: int | None = Field(
        default=None, ge=16, le=1024, description="Square input side in pixels; none uses each backbone's native size.")
    precision: Literal["auto", "bfloat16", "float32", "int8"] = Field(
        default="auto",
        description="Backbone compute dtype: auto picks bfloat16 on Ampere+ GPUs, and on a CPU where it measured "
                    "at least 1.1x float32 for the backbone on its engine (timed once per host, cached in the data "
                    "folder); int8 (OpenVINO only, opt-in) quantizes the backbone with NNCF, calibrated on at most "
                    "300 train images, and reports the head's validation metrics on int8 vs float32 features.")
    engine: Literal["auto", "keras", "openvino"] = Field(
        default="auto",
        description="What computes features, evaluation and the served model: keras, or OpenVINO's CPU plugin "
                    "(the same Keras graph converted to OpenVINO IR); auto is Keras on GPUs, and on a CPU OpenVINO "
                    "where it measured at least 1.1x Keras for the backbone (timed once per host, cached).")
    decoder: Literal["auto", "opencv", "pillow"] = Field(
        default="auto",
        description="Image decoder of features, fine-tuning, evaluation and the served model: auto is OpenCV "
                    "where installed (2-3x faster per core), else Pillow; their pixels differ by a level or two.")
    batch_size: int | None = Field(
        default=None, ge=1, le=4096,
        description="Images per batch for features and fine-tuning; none picks 32 on CPU and probes a GPU.")
    seed: int = Field(default=42, ge=0, le=2**31 - 1,
                      description="Seed of random weights, the audit's folds, dropout and shuffling.")

    @field_validator("backbones", mode="before")
    @classmethod
    def _split_commas(cls, names: Any) -> Any:
        """`["vgg16,resnet50", "mobilenet_v2"]` (how people type lists) means three backbones."""
        if isinstance(names, str):
            names = [names]
        if isinstance(names, list | tuple):
            return [part for name in names for part in str(name).split(",") if part.strip()] if names else []
        return names

    @field_validator("backbones")
    @classmethod
    def _known_backbones(cls, names: list[str]) -> list[str]:
        """Reject unknown or repeated names with the list of choices (a ValueError pydantic reports)."""
        cleaned = [name.strip().lower() for name in names]
        if not cleaned:
            raise ValueError(f"backbones is empty; choose at least one of {sorted(BACKBONES)}")
        unknown = [name for name in cleaned if name not in BACKBONES]
        if unknown:
            raise ValueError(f"unknown backbone(s) {unknown}; choose from {sorted(BACKBONES)}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"backbones {cleaned} names one backbone twice; list each once")
        return cleaned

    @field_validator("weights")
    @classmethod
    def _weights_value(cls, weights: str | None) -> str | None:
        """Empty strings and the word "none" mean random weights, as a form user would expect."""
        if weights is None or weights.strip().lower() in ("", "none", "null"):
            return None
        return "imagenet" if weights.strip().lower() == "imagenet" else weights.strip()

    @model_validator(mode="after")
    def _consistent(self) -> FeatureConfig:
        """Cross-field rules: one weights file fits one architecture; inputs not below a backbone's minimum; int8 on OpenVINO."""
        if self.precision == "int8" and self.engine == "keras":
            raise ValueError("precision int8 runs only on OpenVINO; use --engine openvino (or auto) with it")
        if self.weights not in (None, "imagenet") and len(self.backbones) > 1:
            raise ValueError(
                f"weights file {self.weights!r} fits one architecture but backbones lists "
                f"{self.backbones}; name a single backbone or use weights='imagenet'")
        if self.input_size is not None:
            for name in self.backbones:
                minimum = get_backbone(name).min_size
                if self.input_size < minimum:
                    raise ValueError(
                        f"input_size {self.input_size} is below {name}'s minimum {minimum}; use >= {minimum}")
        return self

    def input_size_for(self, backbone: str) -> int:
        """The input side actually used for a backbone: the configured one or its native size."""
        return int(self.input_size or get_backbone(backbone).native_size)


class TrainConfig(FeatureConfig):
    """What to train and how; every field has a default that works on a CPU."""

    head_batch_size: int = Field(default=256, ge=1, le=65536, description="Feature vectors per batch for the head.")
    head_epochs: int = Field(default=30, ge=1, le=1000, json_schema_extra=_cli("--epochs"),
                             description="Maximum head epochs (early stopping ends sooner).")
    head_learning_rate: float = Field(default=1e-3, gt=0, le=1.0, description="Adam learning rate of the head.")
    dropout: float = Field(default=0.5, ge=0.0, lt=1.0, description="Dropout before the head's output.")
    dense_units: int = Field(default=256, ge=1, le=16384, description="Units of the head's hidden layer.")
    fine_tune: bool = Field(default=False, description="Unfreeze the top block and train end to end (slow on CPU).")
    fine_tune_epochs: int = Field(default=5, ge=1, le=1000, description="Maximum fine-tuning epochs.")
    fine_tune_learning_rate: float = Field(default=1e-5, gt=0, le=1.0, description="Learning rate of fine-tuning.")
    patience: int = Field(default=3, ge=1, le=100, description="Epochs without validation improvement before stopping.")
    tta: Literal["none", "flip"] = Field(
        default="none",
        description="Test-time augmentation: flip averages each image's probabilities with its mirror's, in "
                    "evaluation, the served model and batch prediction (the mirrors' features are cached too).")
    class_weight: Literal["none", "balanced"] = Field(
        default="none", description="Weigh classes in the loss: balanced gives each class the same total weight "
                                    "(n_images / (n_classes * class count), from the train split) for imbalanced data.")
    exclude_suspected_labels: bool = Field(
        default=False, description="Train without the train images the data audit suspects of a wrong label "
                                   "(data/quality/<feature space>/audit.csv); the gate decides whether that model wins.")

    def config_hash(self) -> str:
        """A stable sha256 (hex) of the training fields: equal configs hash equally across processes.

        Names run folders and tells whether "nothing changed" since the champion. A local
        weights file enters by its content (`weights_fingerprint`), not its path, so replacing
        the file at the same path counts as a change and moving it does not.
        """
        fields = self.section(TrainConfig).model_dump(mode="json")
        if self.weights not in (None, "imagenet"):
            fields["weights"] = weights_fingerprint(self.weights)
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class GateConfig(_Section):
    """When a trained model may replace the champion (see tasks/models/gate.py)."""

    metric: str = Field(
        default="roc_auc",
        description="Test metric of the promotion gate (higher is better): roc_auc (one-vs-rest macro for more "
                    "than two classes), accuracy, macro_f1 (more than two classes) or f1_<class>.")
    floor: float = Field(default=0.90, ge=0.0, le=1.0,
                         description="A model whose test metric is below this never becomes champion.")
    margin: float = Field(default=0.002, ge=0.0, le=1.0,
                          description="How much a candidate must beat the champion by, on the same test split.")
    model_name: str = Field(default=MODEL_NAME, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
                            description="Registered model in MLflow that versions, champion and gate belong to: "
                                        "one per set of classes (e.g. flowers); served as models:/<name>@champion.")

    @field_validator("metric")
    @classmethod
    def _gate_metric(cls, metric: str) -> str:
        """The shape of a gate metric; whether it exists for the data's classes is checked once they are known."""
        if not re.fullmatch(r"roc_auc|accuracy|macro_f1|f1_[a-z0-9_]+", metric):
            raise ValueError(f"{metric!r} is not a gate metric; use roc_auc, accuracy, macro_f1 or f1_<class> "
                             "(e.g. f1_dog)")
        return metric


class QualityConfig(_Section):
    """The data audit of every training run: what counts as a near-copy, and how much of each finding is too much.

    The audit (tasks/learning/audit.py) works on the cached features of each backbone and writes
    data/quality/<feature space>/; these checks judge its findings with Great Expectations
    (tasks/data/audit_checks.py) before any head is trained. None of them changes a model.
    """

    near_duplicate_similarity: float = Field(
        default=NEAR_DUPLICATE_SIMILARITY, ge=0.5, le=1.0,
        description="Smallest cosine similarity of two images' standardised features for a near-copy, which must "
                    f"also stand apart: at most {GAP_RATIO} x as far as the image's {NEIGHBOURS}th nearest, or "
                    f"{RELATIVE_DISTANCE} x the folder's median nearest-neighbour distance. A test image that is a "
                    "near-copy of a training image is left out of the gate's test metrics.")
    max_label_issue_share: float = Field(
        default=MAX_LABEL_ISSUE_SHARE, ge=0.0, le=1.0,
        description="Largest share of audited images suspected of a wrong label before the run warns.")
    max_leaked_test_share: float = Field(
        default=MAX_LEAKED_TEST_SHARE, ge=0.0, le=1.0,
        description="Largest share of test images that are near-copies of training images before the run stops "
                    "(below it they are only left out of the gate's test metrics).")


DASK_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss", "inproc")
"""Address schemes of a Dask scheduler (`tcp://host:8786` is what `dask scheduler` prints)."""


class ComputeConfig(_Section):
    """Where feature shards are computed: in this process, or on Dask workers (same features, faster).

    None of these fields changes a model (the feature cache is keyed by image content, not by
    who computed it), so they stay out of TrainConfig and out of `config_hash()`.
    flows/runners.py turns them into the flow's task runner.
    """

    workers: int = Field(
        default=0, ge=0, le=1024,
        description="Dask workers of a local cluster that compute feature shards; 0 computes them in this process.")
    dask_address: str | None = Field(
        default=None,
        description="An existing Dask scheduler (tcp://host:8786) to compute feature shards on; its workers "
                    "must see data_dir at the same path.")
    gpus: str | None = Field(
        default=None,
        description='GPUs of a local Dask cluster, one worker each: "auto" (each CUDA_VISIBLE_DEVICES entry, else '
                    'every GPU nvidia-smi lists) or ids such as "0,1".')
    threads_per_worker: int | None = Field(
        default=None, ge=1, le=1024,
        description="CPU threads each Dask worker gives its model and image decoder; none divides this "
                    "machine's cores among a local cluster's workers.")
    shard_size: int = Field(
        default=512, ge=1, le=1_000_000,
        description="Images per feature shard: the unit a worker computes, and all a dying worker loses.")

    @field_validator("dask_address")
    @classmethod
    def _dask_address(cls, address: str | None) -> str | None:
        """A scheduler address with its scheme, as `dask scheduler` prints it; empty means none."""
        if address is None or not address.strip() or address.strip().lower() == "none":
            return None
        address = address.strip()
        scheme, sep, rest = address.partition("://")
        if not sep or scheme not in DASK_SCHEMES or not rest:
            raise ValueError(f"dask_address {address!r} is not a Dask scheduler address; "
                             "use the one `dask scheduler` prints, e.g. tcp://scheduler-host:8786")
        return address

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, gpus: str | None) -> str | None:
        """"auto", or a comma-separated list of CUDA device ids or UUIDs, each named once."""
        if gpus is None or not gpus.strip() or gpus.strip().lower() == "none":
            return None
        if gpus.strip().lower() == "auto":
            return "auto"
        ids = [part.strip() for part in gpus.split(",") if part.strip()]
        if len(set(ids)) != len(ids):
            raise ValueError(f"gpus {gpus!r} names a GPU twice; list each once (one Dask worker per GPU)")
        return ",".join(ids)

    @model_validator(mode="after")
    def _one_cluster(self) -> ComputeConfig:
        """An existing cluster or a local one, never both; with GPUs, one worker per GPU."""
        if self.dask_address and (self.workers or self.gpus):
            raise ValueError("dask_address names an existing cluster, so workers and gpus cannot also start a "
                             "local one; give one or the other")
        if self.gpus and self.gpus != "auto" and self.workers not in (0, len(self.gpus.split(","))):
            raise ValueError(f"gpus {self.gpus!r} starts one Dask worker per GPU, but workers is {self.workers}; "
                             "leave workers out")
        return self

    @property
    def uses_dask(self) -> bool:
        """True when feature shards go to Dask workers rather than being computed in this process."""
        return bool(self.dask_address or self.workers or self.gpus)



class RetrainConfig(ComputeConfig, GateConfig, QualityConfig, TrainConfig, DataConfig):
    """A retrain's own options, on top of its data, training and gate settings.

    Everything a retrain needs: where the data comes from, how to train, when to promote. The TrainConfig fields decide the model (they alone make up `config_hash()`); the others
    decide where the data comes from and whether a model ships, so changing them never counts
    as "the config changed".
    """

    force: bool = Field(default=False, description="Train even when data and config equal a registered version's.")
    experiment: str = Field(default=DEFAULT_EXPERIMENT, min_length=1,
                            description="MLflow experiment of the runs; by default named after --model-name.")

    @model_validator(mode="before")
    @classmethod
    def _named_after_the_model(cls, values: Any) -> Any:
        """A model name carries its own data folder and experiment, unless they are given (cats-vs-dogs keeps `data`)."""
        if not isinstance(values, dict) or not isinstance(values.get("model_name"), str):
            return values
        name = values["model_name"]
        defaults = {"data_dir": default_data_dir(name), "experiment": name}
        return {**defaults, **{key: value for key, value in values.items() if value is not None or key not in defaults}}


class _OfAModel(_Section):
    """A config about one logged model (predict, export, monitor): its data folder is, unless one is given, the
    model's own, as its retrain chose it (data-<model name>; cats-vs-dogs keeps `data`)."""

    @model_validator(mode="before")
    @classmethod
    def _data_dir_of_the_model(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("data_dir") is not None:
            return values
        parsed = parse_registry_uri(str(values.get("model_uri") or DEFAULT_MODEL_URI))
        return {**values, "data_dir": default_data_dir(parsed[1])} if parsed else values


class AuditConfig(QualityConfig, FeatureConfig):
    """The data audit on its own (`python -m flows.audit`): a prepared data folder, its features, no training."""

    data_dir: str = Field(default=DEFAULT_DATA_DIR, description="Prepared data folder (python -m flows.prepare).")


class PredictConfig(_OfAModel):
    """Batch prediction: which images, which model, where the CSV goes."""

    images: str = Field(description="Folder or .zip/.tar archive of images (e.g. Kaggle's test1).")
    model_uri: str = Field(default=DEFAULT_MODEL_URI, description="Any MLflow model URI.")
    output_csv: str = Field(default="submission.csv", description="Where the CSV goes (Kaggle's submission for "
                                                                  "cats vs. dogs).")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Images per scoring batch.")
    engine: Literal["auto", "keras", "openvino"] = Field(
        default="auto", description="What scores the images: auto is the engine the model was logged with; keras or "
                                    "openvino override it (an int8 model runs at float32 on keras).")
    explain: int = Field(default=0, ge=0, le=100_000,
                         description="Grad-CAM overlays of the first N images (where the model looked for the class "
                                     "it named), as PNGs in <csv name>.explained/ beside the CSV.")
    data_dir: str = Field(default=DEFAULT_DATA_DIR,
                          description="Data folder: an archive of images is extracted under its extracted/, and the "
                                      "command's log goes to its logs/; by default the model's (data-<model name> for "
                                      "any model but cats-vs-dogs).")


class ExportConfig(_OfAModel):
    """A logged model as a standalone artifact: which model, which format, where."""

    model_uri: str = Field(description="Any MLflow model URI of this project (e.g. models:/cats-vs-dogs@champion).")
    format: Literal["openvino", "onnx", "savedmodel"] = Field(
        default="openvino", description="openvino (IR: model.xml + model.bin), onnx (model.onnx; needs the export "
                                        "extra) or savedmodel (a TensorFlow SavedModel folder).")
    output: str = Field(default="exported", description="Folder to write (replaced whole, only once parity holds).")
    data_dir: str = Field(default=DEFAULT_DATA_DIR, description="Data folder: the command's log goes to its logs/; by "
                                                                "default the model's (data-<model name> for any model "
                                                                "but cats-vs-dogs).")


class MonitorConfig(_OfAModel):
    """A drift check of a served model: the recent prediction log (or a folder of new images) against its training data."""

    model_uri: str = Field(default=DEFAULT_MODEL_URI,
                           description="The registered model to watch (models:/<name>@champion or a version).")
    images: str | None = Field(
        default=None, description="A folder of new unlabelled images to compare with training instead of the "
                                  "prediction log (they are scored by the model as a request would be).")
    log_dir: str | None = Field(
        default=None, description="The prediction log folder; none reads where the model records its rows (its "
                                  "config's prediction_log: the data folder's predictions/ by default).")
    window_hours: float = Field(default=24.0, gt=0, le=24 * 366,
                                description="How many of the last hours of the prediction log to compare.")
    min_rows: int = Field(default=100, ge=2, le=10_000_000,
                          description="Fewest rows a check judges; with fewer it says so and raises nothing.")
    sample: int = Field(default=MAX_ROWS, ge=10, le=100_000,
                        description="Rows of each side (training, window) the feature test uses at most.")
    max_p_value: float = Field(default=MAX_P_VALUE, gt=0, lt=1,
                               description="Feature drift when the MMD permutation test's p-value is below this "
                                           "(the false-alarm rate of a check without drift).")
    max_class_shift: float = Field(default=MAX_CLASS_SHIFT, gt=0, le=1,
                                   description="Class drift when the predicted class shares are this far (total "
                                               "variation distance) from the training split's.")
    max_confidence_drop: float = Field(default=MAX_CONFIDENCE_DROP, gt=0, le=1,
                                       description="Confidence drift when the mean probability of the predicted "
                                                   "class fell this much below the test split's when trained.")
    emit_event: bool = Field(default=True, description="Emit the Prefect event catsdogs.drift.detected on drift "
                                                       "(a deployment trigger may start retrain on it).")
    experiment: str | None = Field(default=None, description="MLflow experiment of the checks; none: "
                                                             "<model name>-monitoring.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per scoring batch (--images).")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the samples and the permutation test.")
    data_dir: str = Field(default=DEFAULT_DATA_DIR,
                          description="The model's data folder: its train images are the reference, the checks go to "
                                      "its monitoring/, the command's log to its logs/; by default the model's "
                                      "(data-<model name> for any model but cats-vs-dogs).")
