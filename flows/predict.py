"""The `predict` flow: score a folder or archive of images with a registered model.

    check the output path and the model URI -> locate the images (extract an archive)
    -> score in batches with the pyfunc model -> write the submission atomically

The CSV is exactly Kaggle's submission format, `id,label` with label = p(dog); images that
cannot be scored get 0.5 and their reason in `<name>.errors.csv` (tasks/models/predictions.py).
A model of other classes writes `id,label,p_<class>...` (label = the predicted class name).

    python -m flows.predict data/unlabelled --output-csv submission.csv
    python -m flows.predict test1.zip --model-uri models:/cats-vs-dogs/3
"""

from __future__ import annotations

from collections.abc import Sequence

from prefect import flow

from flows.config import PredictConfig
from tasks.common.logs import run_logger
from tasks.common.results import PredictSummary
from tasks.data.datafolder import DataFolder
from tasks.models import steps
from tasks.models.predictions import check_output_path


@flow(name="predict")
def predict(config: PredictConfig) -> PredictSummary:
    """Write a Kaggle submission CSV (`id,label`) of p(dog) for a folder or archive of images.

    Raises InputError/ConfigError (one sentence, nothing written) for an output path that
    cannot be written, a missing input, a folder without images, or a model URI or MLflow
    store that points nowhere; all of them are checked before any image is scored.
    """
    logger = run_logger(__name__)
    target = str(check_output_path(config.output_csv))
    steps.check_model(config.model_uri)
    folder = steps.locate_images(config.images, str(DataFolder.at(config.data_dir).extracted))
    summary = steps.score_images(folder, config.model_uri, target, config.batch_size, config.engine)
    logger.info("Scored %d images with %s (%d errors, %d left out without a Kaggle id, %d other files skipped) -> %s",
                summary.n_images, config.model_uri, summary.n_errors, summary.n_left_out, summary.n_skipped,
                summary.output_csv)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.predict IMAGES [--model-uri URI] [--output-csv PATH] [--batch-size N] [--data-dir DIR]`."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    parsed = parse(PredictConfig, build_parser(PredictConfig, "python -m flows.predict",
                                               "Write a Kaggle submission (id,label = p(dog)) for a folder or "
                                               "archive of images."), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = predict(config)
        left_out = f", {summary.n_left_out} left out (no Kaggle id)" if summary.n_left_out else ""
        errors = f"; errors in {summary.errors_csv}" if summary.errors_csv else ""
        print(f"Wrote {summary.output_csv}: {summary.n_images} images, {summary.n_errors} errors{left_out}{errors}.")
        return 0

    return run_main(work, log_path=log_path_for(config.data_dir, "predict"), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
