"""The `predict` flow: score a folder or archive of images with a registered model.

    check the model URI -> locate the images (extract an archive) -> list them
    -> score in batches with the pyfunc model -> write the CSV atomically

The CSV is Kaggle's submission format, `id,label` with label = p(dog), plus an `error`
column: an image that cannot be decoded gets an error row (label 0.5, the uninformative
score, so the file stays a valid submission) and never stops the run. Nothing is written
when the model or the input is unusable, and a reader never sees half a file.

Run it from the command line:

    python -m flows.predict data/extracted/<...>/test1 --output-csv submission.csv
    python -m flows.predict test1.zip --model-uri models:/cats-vs-dogs/3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.errors import InputError, retry_unless_input_error

DEFAULT_MODEL_URI = "models:/cats-vs-dogs@champion"
DEFAULT_OUTPUT = "submission.csv"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Files scored in an images folder; other files (Thumbs.db, notes) are counted as skipped."""

CSV_COLUMNS: tuple[str, ...] = ("id", "label", "error")
ERROR_LABEL = 0.5
"""Label written for images that could not be scored: p(dog) = 0.5 costs the least log loss."""


# --------------------------------------------------------------------------- plain functions


def locate_images(images: str | Path, extracted_root: str | Path | None = None) -> Path:
    """The folder of images: `images` itself, or where its archive was safely extracted.

    Archives go through tasks/extract.py (traversal, link and size checks; content-addressed,
    so predicting twice on one archive extracts it once) into `extracted_root`, by default
    ./data/extracted beside the prepare flow's own extractions.
    """
    from tasks.extract import extract_archive

    source = Path(images).expanduser()
    if not source.exists():
        raise InputError(f"Images {source} do not exist; pass a folder or a .zip/.tar archive of images.")
    root = Path(extracted_root) if extracted_root else Path.cwd() / "data" / "extracted"
    return extract_archive(source, root)


def image_id(path: Path) -> int | str:
    """Kaggle's id: the numeric file stem (test1/123.jpg -> 123); other stems stay text."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def list_images(folder: Path) -> tuple[list[Path], int]:
    """(image files sorted by id, number of other files skipped); hidden files are ignored.

    Sorting numerically gives Kaggle's order (1, 2, ..., 10, not 1, 10, 2).
    """
    images, skipped = [], 0
    for path in folder.rglob("*"):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            skipped += 1
    images.sort(key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem, str(p)))
    return images, skipped


def csv_ids(images: list[Path], folder: Path) -> list[int | str]:
    """Ids for the CSV: numeric stems, or relative paths when two files share a stem."""
    ids = [image_id(path) for path in images]
    if len(set(ids)) == len(ids):
        return ids
    return [path.relative_to(folder).with_suffix("").as_posix() for path in images]


def score_files(model: Any, images: list[Path], batch_size: int) -> tuple[list[float], list[str]]:
    """p(dog) and an error message per file, batch by batch (memory stays flat).

    A file that cannot even be read becomes an error row like an undecodable one.
    """
    import pandas as pd

    scores: list[float] = []
    errors: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        payload: list[bytes | None] = []
        read_errors: dict[int, str] = {}
        for index, path in enumerate(chunk):
            try:
                payload.append(path.read_bytes())
            except OSError as exc:
                payload.append(b"")
                read_errors[index] = f"cannot read {path.name}: {exc.strerror or exc}"
        frame = model.predict(pd.DataFrame({"image": payload}))
        for index, (p_dog, error) in enumerate(zip(frame["p_dog"], frame["error"])):
            error = read_errors.get(index, error)
            scores.append(ERROR_LABEL if error else float(p_dog))
            errors.append(f"{chunk[index].name}: {error}" if error else "")
    return scores, errors


def write_submission(target: Path, ids: list[int | str], scores: list[float], errors: list[str]) -> Path:
    """Write `id,label,error` atomically (temporary file in the same folder, then rename)."""
    import pandas as pd

    from tasks.files import atomic_path

    frame = pd.DataFrame({"id": ids, "label": scores, "error": errors}, columns=list(CSV_COLUMNS))
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f")
    return target


# --------------------------------------------------------------------------- tasks


@task(name="check-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_input_error)
def check_model_task(model_uri: str) -> str:
    """Fail in a second, with one sentence, when the alias/version/model does not exist."""
    from tasks.registry import check_model_uri

    check_model_uri(model_uri)
    return model_uri


@task(name="locate-images", cache_policy=NO_CACHE)
def locate_images_task(images: str, extracted_root: str | None) -> str:
    """The folder to score (an archive is extracted safely, once)."""
    return str(locate_images(images, extracted_root))


@task(name="score-images", cache_policy=NO_CACHE)
def score_images_task(folder: str, model_uri: str, output_csv: str, batch_size: int) -> dict[str, Any]:
    """Score every image of `folder` and write the CSV; returns counts and the CSV path.

    Loading the model, scoring and writing stay in one task so that no image array or model
    travels between tasks; the CSV appears only when every row is ready.
    """
    from tasks.registry import load_pyfunc

    folder_path = Path(folder)
    images, skipped = list_images(folder_path)
    if not images:
        raise InputError(f"No images found in {folder_path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "pass a folder or archive that contains images.")
    model = load_pyfunc(model_uri)
    scores, errors = score_files(model, images, batch_size)
    target = write_submission(Path(output_csv), csv_ids(images, folder_path), scores, errors)
    return {"output_csv": str(target.resolve()), "n_images": len(images),
            "n_errors": sum(1 for error in errors if error), "n_skipped": skipped,
            "model_uri": model_uri, "images_dir": str(folder_path)}


# --------------------------------------------------------------------------- the flow


@flow(name="predict")
def predict(images: str, model_uri: str = DEFAULT_MODEL_URI, output_csv: str | None = None,
            batch_size: int = 64, extracted_root: str | None = None) -> dict[str, Any]:
    """Write a Kaggle submission CSV (`id,label,error`) of p(dog) for a folder or archive of images.

    Returns {"output_csv", "n_images", "n_errors", "n_skipped", "model_uri", "images_dir"}.
    Raises InputError/ConfigError (one sentence, nothing written) for a missing input, a
    folder without images, or a model URI that points nowhere.
    """
    logger = get_run_logger()
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size} must be at least 1.")
    target = str(Path(output_csv or DEFAULT_OUTPUT).expanduser().resolve())
    check_model_task(model_uri)
    folder = locate_images_task(images, extracted_root)
    summary = score_images_task(folder, model_uri, target, batch_size)
    logger.info("Scored %d images with %s (%d errors, %d other files skipped) -> %s",
                summary["n_images"], model_uri, summary["n_errors"], summary["n_skipped"], summary["output_csv"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m flows.predict IMAGES [--model-uri URI] [--output-csv PATH]`."""
    parser = argparse.ArgumentParser(prog="python -m flows.predict", description=predict.__doc__)
    parser.add_argument("images", help="folder or .zip/.tar archive of images (e.g. Kaggle's test1)")
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help=f"default {DEFAULT_MODEL_URI}")
    parser.add_argument("--output-csv", default=DEFAULT_OUTPUT, help=f"default ./{DEFAULT_OUTPUT}")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        summary = predict(args.images, args.model_uri, args.output_csv, args.batch_size)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {summary['output_csv']}: {summary['n_images']} images, {summary['n_errors']} errors.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
