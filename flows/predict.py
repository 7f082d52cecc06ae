"""The `predict` flow: score a folder or archive of images with a registered model.

    check the output path and the model URI -> locate the images (extract an archive)
    -> score in batches with the pyfunc model -> write the submission atomically

The CSV is exactly Kaggle's submission format, `id,label` with label = p(dog); images that
cannot be scored get 0.5 and their reason in `<name>.errors.csv` (tasks/models/predictions.py).

    python -m flows.predict data/unlabelled --output-csv submission.csv
    python -m flows.predict test1.zip --model-uri models:/cats-vs-dogs/3
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow

from tasks.common.errors import InputError
from tasks.common.logs import run_logger
from tasks.common.results import PredictSummary
from tasks.models import steps
from tasks.models.naming import DEFAULT_MODEL_URI
from tasks.models.predictions import ERROR_LABEL, check_output_path  # noqa: F401 - ERROR_LABEL is public here

DEFAULT_OUTPUT = "submission.csv"


@flow(name="predict")
def predict(images: str, model_uri: str = DEFAULT_MODEL_URI, output_csv: str | None = None,
            batch_size: int = 64, extracted_root: str | None = None) -> PredictSummary:
    """Write a Kaggle submission CSV (`id,label`) of p(dog) for a folder or archive of images.

    Raises InputError/ConfigError (one sentence, nothing written) for an output path that
    cannot be written, a missing input, a folder without images, or a model URI or MLflow
    store that points nowhere; all of them are checked before any image is scored.
    """
    logger = run_logger(__name__)
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size} must be at least 1 (--batch-size).")
    target = str(check_output_path(output_csv or DEFAULT_OUTPUT))
    steps.check_model(model_uri)
    folder = steps.locate_images(images, extracted_root)
    summary = steps.score_images(folder, model_uri, target, batch_size)
    logger.info("Scored %d images with %s (%d errors, %d other files skipped) -> %s", summary.n_images, model_uri,
                summary.n_errors, summary.n_skipped, summary.output_csv)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.predict IMAGES [--model-uri URI] [--output-csv PATH] [--batch-size N]`."""
    from flows.cli import build_parser, log_path_for, parse, run_main
    from flows.config import PredictConfig

    parsed = parse(PredictConfig, build_parser(PredictConfig, "python -m flows.predict",
                                               "Write a Kaggle submission (id,label = p(dog)) for a folder or "
                                               "archive of images."), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = predict(config.images, config.model_uri, config.output_csv, config.batch_size)
        errors = f"; errors in {summary.errors_csv}" if summary.errors_csv else ""
        print(f"Wrote {summary.output_csv}: {summary.n_images} images, {summary.n_errors} errors{errors}.")
        return 0

    return run_main(work, log_path=log_path_for("data", "predict"), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
