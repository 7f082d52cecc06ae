"""Grad-CAM overlays for chosen images of a batch prediction (`python -m flows.predict ... --explain N`).

The first N images of the submission's order are explained by the registered model itself (the
Keras model inside its pyfunc, decoded with its own decoder and input size): where it looked for
the class it named, drawn over the image (tasks/learning/gradcam.py). The PNGs go beside the CSV,
in `<csv name>.explained/<id>.png`; an earlier run's overlays there are removed first, so every
file in the folder belongs to this run.
"""

from __future__ import annotations

from pathlib import Path

from tasks.common.logs import run_logger
from tasks.models.predictions import csv_rows, list_images
from tasks.models.registry import load_pyfunc


def explained_dir(output_csv: Path) -> Path:
    """Where a submission's overlays go: `<csv name>.explained/` beside it."""
    return Path(output_csv).with_name(f"{Path(output_csv).stem}.explained")


def explain_images(folder: Path, model_uri: str, output_csv: Path, count: int) -> tuple[str, int]:
    """Overlays of the first `count` images of `folder`; returns (their folder, how many were written)."""
    from tasks.learning.gradcam import explain_files

    target = explained_dir(output_csv)
    target.mkdir(exist_ok=True)
    for old in target.glob("*.png"):
        old.unlink()
    served = load_pyfunc(model_uri, prediction_log=False).unwrap_python_model()
    images, ids, _ = csv_rows(list_images(Path(folder))[0], Path(folder), served.classes)  # the CSV's rows, in order
    chosen, ids = images[:count], [str(image) for image in ids[:count]]
    rows = explain_files(served.keras_model, chosen, target, decoder=served.decoder, classes=served.classes,
                         names=[image.replace("/", "_") for image in ids])
    for row in rows:
        if row["error"]:
            run_logger(__name__).warning("Not explained: %s (%s).", Path(row["path"]).name, row["error"])
    return str(target), sum(1 for row in rows if row["overlay"])
