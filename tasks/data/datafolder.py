"""The data folder's contract: every path under `data_dir`, and the one reader of labelled rows.

Everything the pipeline keeps for a dataset lives under one folder (default `data/`):

    downloads/                 verified archives, digests.json (trusted sha256s)
    extracted/<sha256[:16]>/   safely extracted archives (content-addressed)
    converted/<sha256>.jpg     RGB baseline JPEGs made from oddities (PNG-as-jpg, CMYK, rotated)
    classes.json               the class map (names in label order, their arranged folders); none = cats vs. dogs
    labels.csv                 a person's label corrections (sha256 or path -> class or `exclude`), if any
    inspected.parquet          one row per source file, inspected (input of dedupe and split)
    splits.parquet             after dedupe and split (what Great Expectations validates)
    splits.json                the rule and fractions splits.parquet was made with (its splits are kept while they hold)
    manifest.parquet           the final manifest, with `arranged_path`
    validation/                GX result.json and Data Docs
    arranged/<split>/<class folder>/   the images to learn from (links or copies; cats/, dogs/ by default)
    unlabelled/                Kaggle's test1/ pool, never trained on
    arranged.index.json        what arrange placed (stat keys, sha256), to notice writes through links
    prepare_summary.json       what prepare_data returned
    features/<cache key>/      bottleneck feature shards, one folder per feature space
    features/random_init/      the kept random draw of each backbone (weights=None)
    precision/<host>-<backbone>-<size>-<backend>[-openvino].json   what `--precision auto` measured on a host
    engine/<host>-<backbone>-<size>-<backend>.json      what `--engine auto` measured on a host
    precision/<host>-<backbone>-<size>-<backend>.json   what `--precision auto` measured on a host
    quality/<cache key>/       the data audit of one feature space: audit.parquet, audit.csv, checks
    training/<time>-<hash>/    one folder per training run: models, plots, metrics
    logs/<command>-<time>.log  the full log of each command-line run
    predictions/               the prediction log of models trained here (tasks/models/prediction_log.py)
    monitoring/<time>/         one folder per drift check of the champion: its report (flows/monitor.py)
    monitoring/reference-<run id>.npz   a fine-tuned or int8 model's own features of a train sample
    .lock                      held by the run that works in the folder (tasks/data/folderlock.py)

No other module builds these paths: they ask a `DataFolder`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from tasks.common.errors import ConfigError, DatasetValidationError
from tasks.common.files import is_unfinished_write, partial_path, write_if_changed
from tasks.common.labels import CATS_DOGS, SPLITS, ClassMap
from tasks.data.folderlock import WAIT_S, hold, holds

_ROW_COLUMNS = ["sha256", "label", "status", "split", "arranged_path"]


@dataclass(frozen=True)
class DataFolder:
    """The folder of one dataset; `DataFolder.at("data")` resolves it against the working directory."""

    root: Path

    ARRANGED: ClassVar[str] = "arranged"
    """Folder name of the labelled images (manifest `arranged_path` values start with it)."""
    UNLABELLED: ClassVar[str] = "unlabelled"
    """Folder name of the unlabelled pool."""

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> DataFolder:
        return cls(Path(path).expanduser().absolute())

    # ------------------------------------------------------------------ one run at a time
    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def lock(self, what: str, *, wait_s: float = WAIT_S, create: bool = True) -> Any:
        """Context manager: hold `.lock` for the block, waiting (and saying for whom) while another run holds it.

        Re-entrant within a run; see tasks/data/folderlock.py.
        """
        return hold(self.lock_file, what, wait_s=wait_s, create=create)

    def holds_lock(self) -> bool:
        """Whether this run holds the folder's lock (what makes removing leftovers safe)."""
        return holds(self.lock_file)

    def leftover_places(self) -> list[tuple[Path, bool]]:
        """(folder, recursive?) where a killed run's hidden half-written entries can be left.

        Never inside `extracted/<digest>/` or `arranged/`: those hold the archive's own names
        (an archive may well contain a file called `.x.tmp`), and arrange removes its own strays.
        """
        return [(self.root, False), (self.training, False), (self.extracted, False), (self.converted, False),
                (self.features, True), (self.validation, False), (self.precision_verdicts, False),
                (self.engine_verdicts, False), (self.quality_reports, False)]

    def remove_leftovers(self) -> list[str]:
        """Remove what killed runs left half-written (only while holding the lock); their relative paths.

        Holding the lock proves that no other run writes here, so every hidden `.partial`
        training folder, temporary extraction folder or temporary file is a dead run's.
        """
        if not self.holds_lock():
            raise RuntimeError(f"remove_leftovers needs the lock of {self.root}; call it inside DataFolder.lock()")
        removed: list[str] = []
        for base, recursive in self.leftover_places():
            if not base.is_dir():
                continue
            for current, dirs, files in os.walk(base):
                for name in [d for d in dirs if is_unfinished_write(d)]:
                    shutil.rmtree(Path(current) / name, ignore_errors=True)
                    removed.append(str((Path(current) / name).relative_to(self.root)))
                    dirs.remove(name)
                for name in files:
                    if is_unfinished_write(name):
                        (Path(current) / name).unlink(missing_ok=True)
                        removed.append(str((Path(current) / name).relative_to(self.root)))
                if not recursive:
                    break
        return sorted(removed)

    # ------------------------------------------------------------------ prepare
    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    @property
    def extracted(self) -> Path:
        return self.root / "extracted"

    @property
    def converted(self) -> Path:
        return self.root / "converted"

    def converted_file(self, sha256: str) -> Path:
        """Where the RGB JPEG made from the source image with this sha256 is kept."""
        return self.converted / f"{sha256}.jpg"

    @property
    def classes_file(self) -> Path:
        return self.root / "classes.json"

    def classes(self) -> ClassMap:
        """The folder's class map as prepare recorded it; cats vs. dogs when it recorded none (older folders)."""
        try:
            text = self.classes_file.read_text()
        except FileNotFoundError:
            return CATS_DOGS
        try:
            return ClassMap.from_json(text)
        except (ValueError, KeyError, TypeError):
            raise DatasetValidationError(f"{self.classes_file} is damaged; delete it and run prepare_data "
                                         "again to record the classes.") from None

    def held_classes(self) -> ClassMap | None:
        """The class map of what this folder holds, or None while it holds nothing (no classes.json, no manifest)."""
        return self.classes() if self.classes_file.is_file() or self.inspected.is_file() else None

    def record_classes(self, classes: ClassMap, *, replace: bool = False) -> bool:
        """Keep the class map as classes.json (atomically, rewritten only on change); whether it was written.

        A folder that holds another set of classes is not rearranged for these unless `replace`:
        one data folder silently serving two class sets would remove each other's images in turn.
        """
        held = self.held_classes()
        if held is not None and held.names != classes.names and not replace:
            raise ConfigError(
                f"The data folder {self.root} holds the classes {', '.join(held.names)}, but this source has "
                f"{', '.join(classes.names)}; give them a data folder of their own (--data-dir, or a --model-name "
                "of their own, whose default folder is data-<model name>), or pass --replace-classes to rearrange "
                "this one for them.")
        return write_if_changed(self.classes_file, classes.to_json().encode("utf-8"))

    @property
    def label_overrides(self) -> Path:
        """A person's label corrections for this folder (tasks/data/overrides.py); a source may hold one too."""
        return self.root / "labels.csv"

    @property
    def inspected(self) -> Path:
        return self.root / "inspected.parquet"

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def split_settings(self) -> Path:
        """The split rule and settings `splits.parquet` was made with: images keep those splits while they are the same."""
        return self.root / "splits.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def validation(self) -> Path:
        return self.root / "validation"

    @property
    def validation_result(self) -> Path:
        return self.validation / "result.json"

    @property
    def data_docs(self) -> Path:
        return self.validation / "data_docs" / "index.html"

    @property
    def arranged(self) -> Path:
        return self.root / self.ARRANGED

    @property
    def unlabelled(self) -> Path:
        return self.root / self.UNLABELLED

    @property
    def arranged_index(self) -> Path:
        """Stat keys and sha256 of every arranged file and its source, as the last arrange left them."""
        return self.root / "arranged.index.json"

    @property
    def summary(self) -> Path:
        return self.root / "prepare_summary.json"

    def summary_fingerprint(self) -> str | None:
        """The dataset fingerprint prepare_data recorded in prepare_summary.json, if it did."""
        try:
            return json.loads(self.summary.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            return None

    def file(self, relative: str) -> Path:
        """An arranged image from its manifest `arranged_path` (relative to the folder)."""
        return self.root / relative

    # ------------------------------------------------------------------ learn
    @property
    def features(self) -> Path:
        return self.root / "features"

    def feature_cache(self, key: str) -> Path:
        """The shard folder of one feature space (see tasks.learning.shards.cache_key)."""
        return self.features / key

    def random_weights(self, backbone: str) -> Path:
        """The weights=None draw of a backbone, kept so every step sees the same random backbone."""
        return self.features / "random_init" / f"{backbone}.weights.h5"

    @property
    def precision_verdicts(self) -> Path:
        return self.root / "precision"

    def precision_verdict(self, key: str) -> Path:
        """What `--precision auto` measured for one host, backbone, input size and backend (tasks/learning/precision.py)."""
        return self.precision_verdicts / f"{key}.json"

    @property
    def engine_verdicts(self) -> Path:
        return self.root / "engine"

    def engine_verdict(self, key: str) -> Path:
        """What `--engine auto` measured for one host, backbone, input size and backend (tasks/learning/engines.py)."""
        return self.engine_verdicts / f"{key}.json"

    @property
    def quality_reports(self) -> Path:
        return self.root / "quality"

    def quality(self, key: str) -> Path:
        """The data audit of one feature space (same key as its feature cache; tasks/learning/audit.py)."""
        return self.quality_reports / key

    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def logs(self) -> Path:
        """Full logs of command-line runs (the terminal shows only the pipeline's own lines)."""
        return self.root / "logs"

    @property
    def predictions(self) -> Path:
        """Where the served model and batch prediction log each scored row, by default (its config says)."""
        return self.root / "predictions"

    def monitoring_reference(self, run_id: str) -> Path:
        """The served model's own features of a train sample, kept for a model whose cached features are not its own."""
        return self.root / "monitoring" / f"reference-{run_id}.npz"

    def new_monitoring_run(self, now: datetime | None = None) -> Path:
        """The folder of one drift check: monitoring/<UTC time>/ (not created here)."""
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        return self.root / "monitoring" / stamp

    def new_training_run(self, config_hash: str, now: datetime | None = None) -> tuple[Path, Path]:
        """(partial, final) folders of a new training run: training/<UTC time>-<config hash[:8]>.

        The run writes into the hidden `partial` folder, created here, and `commit_directory`
        renames it to `final` when the run succeeds: a failed or killed run leaves nothing that
        looks like a result. Names sort by time, group by config, and are never shared: the
        partial folder is made with an atomic mkdir, so two runs in one second get two names.
        """
        stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        base = f"{stamp}-{config_hash[:8]}"
        self.training.mkdir(parents=True, exist_ok=True)
        for counter in range(1, 1000):
            name = base if counter == 1 else f"{base}-{counter}"
            final = self.training / name
            partial = partial_path(final)
            if final.exists():
                continue
            try:
                partial.mkdir()
            except FileExistsError:
                continue
            return partial, final
        raise RuntimeError(f"no free training folder name under {self.training}")

    # ------------------------------------------------------------------ the labelled rows
    def labelled_rows(self, split: str | None = None) -> pd.DataFrame:
        """The images to learn from: ok rows of labelled splits, one per sha256, in sha256 order.

        Columns: sha256, label (a class name: "cat"/"dog" by default), y (its index in the folder's
        class map), split, arranged_path (relative) and path (absolute). The order depends on content only, so every step (features, head,
        fine-tuning, evaluation, the gate) sees the same rows in the same order on every run.
        """
        if split is not None and split not in SPLITS:
            raise DatasetValidationError(f"Split {split!r} is not a labelled split; use one of {', '.join(SPLITS)}.")
        if not self.manifest.is_file():
            raise DatasetValidationError(f"Data folder {self.root} has no manifest.parquet; "
                                         "run prepare_data (python -m flows.prepare) on it first.")
        try:
            frame = pd.read_parquet(self.manifest, columns=_ROW_COLUMNS)
        except Exception as error:  # noqa: BLE001 - a damaged file shows up as many pyarrow errors
            raise DatasetValidationError(
                f"{self.manifest} cannot be read ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
                "delete it and run prepare_data again to rebuild it.") from None
        keep = (frame["status"] == "ok") & frame["split"].isin([split] if split else SPLITS) \
            & (frame["arranged_path"] != "")
        rows = frame[keep].drop_duplicates(subset="sha256").sort_values("sha256", kind="stable")
        classes = self.classes()
        unknown = sorted(set(rows["label"]) - set(classes.names))
        if unknown:
            raise DatasetValidationError(f"{self.manifest} has labels {unknown}; only {list(classes.names)} are allowed, "
                                         "run prepare_data again.")
        rows = rows.reset_index(drop=True).drop(columns="status")
        rows["y"] = rows["label"].map({name: index for index, name in enumerate(classes.names)}).astype("int64")
        rows["path"] = [str(self.root / relative) for relative in rows["arranged_path"]]
        return rows

    def split_rows(self, split: str) -> pd.DataFrame:
        """`labelled_rows(split)`, refused when a class is missing: learning and testing need every class."""
        rows = self.labelled_rows(split)
        missing = [name for name in self.classes().names if not (rows["label"] == name).any()]
        if missing:
            raise DatasetValidationError(
                f"split {split!r} of {self.manifest} has no {' or '.join(missing)} images; "
                "add images of every class and run prepare_data again.")
        return rows

    def labelled_counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}}; fails unless every labelled split has every class."""
        counts = {}
        names = self.classes().names
        for split in SPLITS:
            rows = self.split_rows(split)
            counts[split] = {name: int((rows["label"] == name).sum()) for name in names}
        return counts
