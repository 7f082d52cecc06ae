"""Scoring files with a logged pyfunc model: the gate's yardstick and batch prediction's engine.

Both go through the model exactly as a user loads it (`mlflow.pyfunc.load_model`), so the
gate measures what serves and a submission holds what the server would answer. Files are
read and scored batch by batch: memory stays flat however many there are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import ClassesDiffer, InputError
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.data.datafolder import DataFolder
from tasks.models.registry import load_pyfunc, logged_classes

ProgressHook = Callable[[int], None]


@dataclass(frozen=True)
class Scored:
    """What a model answered for a list of files: its probability columns, one row per file, NaN where it failed."""

    columns: tuple[str, ...]
    probabilities: np.ndarray
    labels: list[str]
    errors: list[str]


def score_table(model: Any, paths: Sequence[Path], batch_size: int,
                on_progress: ProgressHook | None = None) -> Scored:
    """Every probability column the model answers (`p_dog`, or `p_<class>` each) and its label, for `paths` in order.

    A file that cannot even be read becomes an error row like an undecodable one.
    """
    columns: tuple[str, ...] = ()
    rows: list[np.ndarray] = []
    labels = [""] * len(paths)
    errors = [""] * len(paths)
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        payload: list[bytes] = []
        for index, path in enumerate(chunk):
            try:
                payload.append(Path(path).read_bytes())
            except OSError as exc:
                payload.append(b"")
                errors[start + index] = f"cannot read {Path(path).name}: {exc.strerror or exc}"
        frame = model.predict(pd.DataFrame({"image": payload}))
        columns = columns or tuple(column for column in frame.columns if column.startswith("p_"))
        values = frame[list(columns)].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)
        for index, (label, error) in enumerate(zip(frame["label"], frame["error"])):
            if not errors[start + index] and error:
                errors[start + index] = str(error)
            if errors[start + index]:
                values[index] = np.nan
            else:
                labels[start + index] = str(label)
        rows.append(values)
        if on_progress is not None:
            on_progress(len(chunk))
    probabilities = np.concatenate(rows) if rows else np.zeros((0, len(columns)))
    return Scored(columns, probabilities, labels, errors)


def score_files(model: Any, paths: Sequence[Path], batch_size: int,
                on_progress: ProgressHook | None = None) -> tuple[np.ndarray, list[str]]:
    """(p(dog) with NaN for failures, error per file) for `paths`, in order: `score_table` of a cats vs. dogs model.

    A file that cannot even be read becomes an error row like an undecodable one.
    """
    scored = score_table(model, paths, batch_size, on_progress)
    first = scored.probabilities[:, 0] if scored.probabilities.size else np.full(len(paths), np.nan)
    return first.astype(np.float64), scored.errors


def evaluate_model_uri(model_uri: str, data_dir: str | Path, *, split: str = "test",
                       batch_size: int = 64, leave_out: frozenset[str] = frozenset()) -> dict[str, float]:
    """Metrics of any pyfunc model URI on `data_dir`'s arranged split, through the serving code.

    Champion and candidate are scored on the same images (the data folder's one reader of
    labelled rows) by the pipeline that serves users, with tasks/learning/evaluate.py's
    metric definitions. Images that fail to decode are counted in `n_errors` and left out.
    Images whose sha256 is in `leave_out` (the data audit's leaked test images: near-copies of
    training images) are not scored at all, counted in `n_left_out`.
    Returns the scalar metrics ("accuracy", "roc_auc" (NaN with one class), "log_loss",
    per-class precision/recall/F1, ...) plus "n_images", "n_errors" and "n_left_out". A model of
    other classes than the folder's is refused (ClassesDiffer) before anything is scored.
    """
    from tasks.learning.evaluate import class_metrics

    folder = DataFolder.at(data_dir)
    rows = folder.labelled_rows(split)
    if rows.empty:
        raise InputError(f"No arranged {split} images in {folder.manifest}; run prepare_data on it first.")
    left_out = rows["sha256"].isin(leave_out)
    rows = rows[~left_out].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"Every {split} image in {folder.root} is a near-copy of a training image; the test split "
                         "measures nothing: remove the copies (labels.csv, decision exclude) and run again.")
    from tasks.common.progress import Progress

    classes = folder.classes()
    logged = ClassMap.from_names(logged_classes(model_uri) or CATS_DOGS.names)  # from MLmodel: no weights loaded
    if logged.names != classes.names:
        raise ClassesDiffer(f"{model_uri} answers the classes {logged.text()}, but {folder.root} holds "
                            f"{classes.text()}; score it on a data folder of its own classes, and give models of "
                            "other classes a --model-name of their own.")
    model = load_pyfunc(model_uri, prediction_log=False)  # the test split is not traffic
    progress = Progress(f"Scoring {model_uri} on the {split} split", len(rows), "images", logger_name=__name__)
    scored = score_table(model, [Path(path) for path in rows["path"]], batch_size, progress.advance)
    progress.finish()
    ok = np.array([not error for error in scored.errors], dtype=bool)
    if not ok.any():
        raise InputError(f"None of the {len(rows)} {split} images in {folder.root} could be scored by {model_uri}.")
    scores = scored.probabilities[:, -1] if classes.binary else scored.probabilities
    metrics = class_metrics(rows["y"].to_numpy()[ok], scores[ok], classes)
    values = {key: float(value) if value is not None else float("nan") for key, value in metrics.items()
              if not isinstance(value, list) and key != "threshold"}
    return {**values, "n_images": float(ok.sum()), "n_errors": float((~ok).sum()), "n_left_out": float(left_out.sum())}
