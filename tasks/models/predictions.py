"""Batch prediction: a folder or archive of images -> a Kaggle submission, errors on the side.

The submission is exactly Kaggle's format, `id,label` with label = p(dog): Kaggle's checker
rejects any other column. An image that cannot be scored still gets its row, with 0.5 (the
uninformative score, which costs the least log loss), and its reason goes to a side file
`<submission>.errors.csv`. A Kaggle submission carries Kaggle ids only, which are numbers
(`test1/123.jpg` is id 123), each once: in a folder of numbered images, a file whose name is not
a number, or whose number another file has (`1.png` beside `1.jpg`), is left out of the
submission and listed in the errors file instead; a folder with no numbered image at all (your
own photos) is scored by file stem, and by file name where two files share a stem (`one.jpg`,
`one.png`), as the log says. When the images came with Kaggle's
`sampleSubmission.csv`, the ids are checked against it (same ids, same order) before anything
is scored, and the written file again (same columns) before it is called done; the log says
whether one was found. Given the competition zip (or its extracted folder) as a whole, its
unlabelled `test1/` is what is scored. Nothing is written when the model or the input is
unusable, and a reader never sees half a file.

A model of other classes than cats and dogs writes `id,label,p_<class>...` instead: label is
the predicted class name, then one probability per class ("" for an image that failed, whose
reason goes to the errors file as above). Ids are the file stems (numbers where they are numbers),
or the file names where two files share a stem.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.common.errors import InputError
from tasks.common.files import atomic_path
from tasks.common.logs import run_logger
from tasks.common.results import PredictSummary
from tasks.common.labels import CATS_DOGS, ClassMap
from tasks.models.registry import load_pyfunc, logged_classes
from tasks.models.scoring import score_table

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Files scored in an images folder; other files (Thumbs.db, notes) are counted as skipped."""

SUBMISSION_COLUMNS: tuple[str, ...] = ("id", "label")
ERROR_COLUMNS: tuple[str, ...] = ("id", "file", "error")
ERROR_LABEL = 0.5
"""Label written for images that could not be scored: p(dog) = 0.5 costs the least log loss."""

SAMPLE_SUBMISSION = "sampleSubmission.csv"


def check_output_path(output_csv: str | os.PathLike[str]) -> Path:
    """Fail before any scoring when the submission cannot be written where asked."""
    target = Path(output_csv).expanduser().absolute()
    if target.is_dir():
        raise InputError(f"--output-csv {target} is a folder; pass a file name such as {target / 'submission.csv'}.")
    if not target.parent.is_dir():
        raise InputError(f"The folder of --output-csv {target} does not exist; create {target.parent} "
                         "or pass another path.")
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"Cannot write into {target.parent} (--output-csv); pass a path in a writable folder.")
    return target


def check_images(images: str | os.PathLike[str]) -> Path:
    """The images to score, refused in one sentence when they are not there (a command checks it before any work)."""
    source = Path(images).expanduser()
    if not source.exists():
        raise InputError(f"Images {source} do not exist; pass a folder or a .zip/.tar archive of images.")
    return source


def locate_images(images: str | os.PathLike[str], extracted_root: str | os.PathLike[str]) -> Path:
    """The folder of images: `images` itself, or where its archive was safely extracted.

    Archives go through tasks/data/extract.py (traversal, link and size checks;
    content-addressed, so predicting twice on one archive extracts it once) into
    `extracted_root` (the data folder's extracted/, beside the prepare flow's own extractions).
    """
    from tasks.data.extract import extract_archive
    from tasks.data.layout import kaggle_unlabelled_folder

    source = check_images(images)
    folder = extract_archive(source, Path(extracted_root))
    pool = kaggle_unlabelled_folder(folder)
    if pool is None:
        return folder
    run_logger(__name__).info("Images: %s is Kaggle's competition layout; scoring its unlabelled %s/ (%s)",
                              source.name, pool.name, pool)
    return pool


def image_id(path: Path) -> int | str:
    """Kaggle's id: the numeric file stem (test1/123.jpg -> 123); other stems stay text."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def list_images(folder: Path) -> tuple[list[Path], int]:
    """(image files sorted by id, number of other files skipped); hidden files are ignored.

    Links are followed as in a source folder (tasks/data/layout.py `files_under`), folders and
    files alike; what is not a regular file in the end (a fifo, a link that leads nowhere) is
    skipped, never read. Sorting numerically gives Kaggle's order (1, 2, ..., 10, not 1, 10, 2).
    """
    from tasks.data.layout import files_under

    images, skipped = [], 0
    for path in files_under(folder):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            images.append(path)
        elif path.name != SAMPLE_SUBMISSION:
            skipped += 1
    images.sort(key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.stem, str(p)))
    return images, skipped


def csv_ids(images: list[Path], folder: Path) -> list[int | str]:
    """Ids for the CSV, unique: file stems (numbers where they are numbers), file names where stems collide.

    `one.jpg` and `one.png` are `one.jpg` and `one.png` (their paths under `folder`, with the
    extension: `a/one.jpg`, `b/one.jpg` in sub-folders); every other image keeps its stem.
    """
    stems = Counter(path.stem for path in images)
    return [image_id(path) if stems[path.stem] == 1 else path.relative_to(folder).as_posix() for path in images]


def log_named_ids(images: list[Path], ids: list[int | str]) -> None:
    """Say which images are named by their file names because another image has their stem."""
    named = [image for image, key in zip(images, ids) if key != image_id(image)]
    if named:
        shown = ", ".join(path.name for path in named[:5]) + (", ..." if len(named) > 5 else "")
        run_logger(__name__).warning("%d image(s) share their file stem with another, so their ids are their file "
                                     "names: %s", len(named), shown)


def find_sample_submission(folder: Path) -> Path | None:
    """Kaggle's sampleSubmission.csv beside or above the images (the competition zip has it at the top)."""
    for candidate in (folder, *folder.parents[:2]):
        path = candidate / SAMPLE_SUBMISSION
        if path.is_file():
            return path
    return None


NOT_A_KAGGLE_ID = "not a Kaggle id: its name is not a number, so it is left out of the submission"


def kaggle_numbered(images: list[Path], folder: Path) -> tuple[list[Path], list[tuple[str, Path, str]]]:
    """(images to score, (id, image, why) of each image left out): a Kaggle submission holds each number once.

    In a folder of numbered images, a file whose name is not a number is left out (a row
    `broken,0.5` would make the whole submission fail on Kaggle), and so is a second file of one
    number (`1.png` beside `1.jpg`, `007.jpg` beside `7.jpg`): the first in `images`' order
    keeps the id. A folder with no numbered image is not Kaggle's and keeps every image (ids
    are the names).
    """
    if not any(path.stem.isdigit() for path in images):
        return images, []
    kept: list[Path] = []
    left_out: list[tuple[str, Path, str]] = []
    owners: dict[int, Path] = {}
    for path in images:
        if not path.stem.isdigit():
            left_out.append((path.stem, path, NOT_A_KAGGLE_ID))
        elif (owner := owners.setdefault(int(path.stem), path)) is not path:
            left_out.append((path.relative_to(folder).as_posix(), path,
                             f"its Kaggle id {int(path.stem)} is {owner.relative_to(folder).as_posix()}'s, so it is "
                             "left out of the submission; rename one of them to score both"))
        else:
            kept.append(path)
    return kept, left_out


def check_ids_against_sample(ids: list[int | str], sample_path: Path) -> None:
    """Kaggle's check of the ids, before anything is scored: the same ids in the same order as its sample."""
    sample = pd.read_csv(sample_path)
    theirs = sample["id"].astype(str).tolist() if "id" in sample.columns else []
    ours = [str(image) for image in ids]
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))[:5]
        extra = sorted(set(ours) - set(theirs))[:5]
        raise InputError(f"The submission's ids differ from {sample_path} ({len(ours)} vs {len(theirs)} rows; "
                         f"missing e.g. {missing}, unexpected e.g. {extra}, or in another order); "
                         "score the whole test1 folder that came with it.")


def check_against_sample(frame: pd.DataFrame, sample_path: Path) -> None:
    """Kaggle's checks, before the file is called done: the same columns, ids and order as the sample."""
    sample = pd.read_csv(sample_path, nrows=0)
    if list(sample.columns) != list(frame.columns):
        raise InputError(f"The submission's columns {list(frame.columns)} differ from {sample_path}'s "
                         f"{list(sample.columns)}; score the folder the sample belongs to.")
    check_ids_against_sample(frame["id"].tolist(), sample_path)


def write_submission(target: Path, ids: list[int | str], scores: list[float], files: list[str],
                     errors: list[str], sample: Path | None = None,
                     left_out: list[tuple[str, Path, str]] = ()) -> tuple[Path, Path | None]:
    """Write `id,label` (and `<name>.errors.csv` when some image failed or was left out), each atomically."""
    frame = pd.DataFrame({"id": ids, "label": scores}, columns=list(SUBMISSION_COLUMNS))
    if sample is not None:
        check_against_sample(frame, sample)
    failed = [(image, file, error) for image, file, error in zip(ids, files, errors) if error]
    failed += [(image, path.name, why) for image, path, why in left_out]
    errors_path = target.with_name(f"{target.stem}.errors.csv")
    if failed:
        with atomic_path(errors_path, suffix=".csv") as tmp:
            pd.DataFrame(failed, columns=list(ERROR_COLUMNS)).to_csv(tmp, index=False)
    else:
        errors_path.unlink(missing_ok=True)  # an earlier run's errors must not pass for this run's
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f")
    return target, errors_path if failed else None


def write_class_predictions(target: Path, ids: list[int | str], labels: list[str], columns: tuple[str, ...],
                            probabilities: Any, files: list[str], errors: list[str]) -> tuple[Path, Path | None]:
    """Write `id,label,p_<class>...` (and `<name>.errors.csv` when some image failed), each atomically."""
    frame = pd.DataFrame({"id": ids, "label": labels})
    for index, column in enumerate(columns):
        frame[column] = probabilities[:, index]
    failed = [(image, file, error) for image, file, error in zip(ids, files, errors) if error]
    errors_path = target.with_name(f"{target.stem}.errors.csv")
    if failed:
        with atomic_path(errors_path, suffix=".csv") as tmp:
            pd.DataFrame(failed, columns=list(ERROR_COLUMNS)).to_csv(tmp, index=False)
    else:
        errors_path.unlink(missing_ok=True)
    with atomic_path(target, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6f")
    return target, errors_path if failed else None


def csv_rows(images: list[Path], folder: Path, classes: ClassMap) -> tuple[list[Path], list[int | str],
                                                                          list[tuple[str, Path, str]]]:
    """(the images the CSV holds, in its order; their ids; (id, image, why) of each left out).

    A Kaggle submission (cats vs. dogs) holds each number once (`kaggle_numbered`); any other CSV
    holds every image. What predict writes and what `--explain` names come from here.
    """
    left_out: list[tuple[str, Path, str]] = []
    if classes.kaggle:
        images, left_out = kaggle_numbered(images, folder)
    return images, csv_ids(images, folder), left_out


def predict_classes(folder: Path, model: Any, model_uri: str, output_csv: Path, batch_size: int,
                    images: list[Path], skipped: int, classes: ClassMap) -> PredictSummary:
    """Score every image with a model of other classes and write `id,label,p_<class>...` (no Kaggle checks)."""
    from tasks.common.progress import Progress

    images, ids, _ = csv_rows(images, folder, classes)
    log_named_ids(images, ids)
    progress = Progress(f"Scoring {folder.name}", len(images), "images", logger_name=__name__)
    scored = score_table(model, images, batch_size, progress.advance)
    progress.finish()
    target, errors_path = write_class_predictions(output_csv, ids, scored.labels, scored.columns, scored.probabilities,
                                                  [path.name for path in images], scored.errors)
    return PredictSummary(output_csv=str(target), errors_csv=str(errors_path) if errors_path else None,
                          n_images=len(images), n_errors=sum(1 for error in scored.errors if error), n_skipped=skipped,
                          n_left_out=0, model_uri=model_uri, images_dir=str(folder), sample_submission=None)


def predict_folder(folder: Path, model_uri: str, output_csv: Path, batch_size: int,
                   engine: str = "auto") -> PredictSummary:
    """Score every image of `folder` with the model and write the submission; the ids are checked first.

    `engine` "auto" scores on the engine the model was logged with (as it is served), else the one named.
    """
    import numpy as np

    log = run_logger(__name__)
    images, skipped = list_images(folder)
    if not images:
        raise InputError(f"No images found in {folder} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                         "pass a folder or archive that contains images.")
    names = logged_classes(model_uri)
    classes = ClassMap.from_names(names) if names else CATS_DOGS
    if not classes.kaggle:
        log.info("Classes: %s; writing id,label and a probability per class", classes.text())
        return predict_classes(folder, load_pyfunc(model_uri, engine), model_uri, output_csv, batch_size, images,
                               skipped, classes)
    images, ids, left_out = csv_rows(images, folder, classes)
    if left_out:
        shown = ", ".join(path.name for _, path, _ in left_out[:5]) + (", ..." if len(left_out) > 5 else "")
        log.warning("%d image(s) without a Kaggle id of their own (a number no other file has) left out of the "
                    "submission, listed in its errors file: %s", len(left_out), shown)
    log_named_ids(images, ids)
    sample = find_sample_submission(folder)
    if sample is None:
        log.info("No %s beside or above %s: the ids are not checked against Kaggle's", SAMPLE_SUBMISSION, folder)
    else:
        check_ids_against_sample(ids, sample)
        log.info("Ids checked against Kaggle's %s: the same %d ids in the same order", sample, len(ids))
    from tasks.common.progress import Progress

    model = load_pyfunc(model_uri, engine)
    progress = Progress(f"Scoring {folder.name}", len(images), "images", logger_name=__name__)
    scored = score_table(model, images, batch_size, progress.advance)
    scores, errors = scored.probabilities[:, 0], scored.errors
    progress.finish()
    labels = [ERROR_LABEL if error else float(score) for score, error in zip(np.asarray(scores), errors)]
    target, errors_path = write_submission(output_csv, ids, labels, [path.name for path in images], errors, sample,
                                           left_out)
    return PredictSummary(output_csv=str(target), errors_csv=str(errors_path) if errors_path else None,
                          n_images=len(images), n_errors=sum(1 for error in errors if error), n_skipped=skipped,
                          n_left_out=len(left_out), model_uri=model_uri, images_dir=str(folder),
                          sample_submission=str(sample) if sample else None)
