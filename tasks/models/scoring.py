"""Scoring files with a logged pyfunc model: the gate's yardstick and batch prediction's engine.

Both go through the model exactly as a user loads it (`mlflow.pyfunc.load_model`), so the
gate measures what serves and a submission holds what the server would answer. Files are
read and scored batch by batch: memory stays flat however many there are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.common.errors import InputError
from tasks.data.datafolder import DataFolder
from tasks.models.registry import load_pyfunc

ProgressHook = Callable[[int], None]


def score_files(model: Any, paths: Sequence[Path], batch_size: int,
                on_progress: ProgressHook | None = None) -> tuple[np.ndarray, list[str]]:
    """(p(dog) with NaN for failures, error per file) for `paths`, in order.

    A file that cannot even be read becomes an error row like an undecodable one.
    """
    scores = np.full(len(paths), np.nan, dtype=np.float64)
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
        for index, (p_dog, error) in enumerate(zip(frame["p_dog"], frame["error"])):
            if errors[start + index]:
                continue
            if error:
                errors[start + index] = str(error)
            else:
                scores[start + index] = float(p_dog)
        if on_progress is not None:
            on_progress(len(chunk))
    return scores, errors


def evaluate_model_uri(model_uri: str, data_dir: str | Path, *, split: str = "test",
                       batch_size: int = 64) -> dict[str, float]:
    """Metrics of any pyfunc model URI on `data_dir`'s arranged split, through the serving code.

    Champion and candidate are scored on the same images (the data folder's one reader of
    labelled rows) by the pipeline that serves users, with tasks/learning/evaluate.py's
    metric definitions. Images that fail to decode are counted in `n_errors` and left out.
    Returns the scalar metrics ("accuracy", "roc_auc" (NaN with one class), "log_loss",
    per-class precision/recall/F1, ...) plus "n_images" and "n_errors".
    """
    from tasks.learning.evaluate import binary_metrics

    folder = DataFolder.at(data_dir)
    rows = folder.labelled_rows(split)
    if rows.empty:
        raise InputError(f"No arranged {split} images in {folder.manifest}; run prepare_data on it first.")
    from tasks.common.progress import Progress

    model = load_pyfunc(model_uri)
    progress = Progress(f"Scoring {model_uri} on the {split} split", len(rows), "images", logger_name=__name__)
    scores, errors = score_files(model, [Path(path) for path in rows["path"]], batch_size, progress.advance)
    progress.finish()
    ok = np.array([not error for error in errors], dtype=bool)
    if not ok.any():
        raise InputError(f"None of the {len(rows)} {split} images in {folder.root} could be scored by {model_uri}.")
    metrics = binary_metrics(rows["y"].to_numpy()[ok], scores[ok])
    values = {key: float(value) if value is not None else float("nan") for key, value in metrics.items()
              if not isinstance(value, list) and key != "threshold"}
    return {**values, "n_images": float(ok.sum()), "n_errors": float((~ok).sum())}
