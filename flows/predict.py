"""The `predict` flow: score a folder or archive of images with a registered model.

    check the output path and the model URI -> locate the images (extract an archive)
    -> score in batches with the pyfunc model -> write the submission atomically

The CSV is exactly Kaggle's submission format, `id,label` with label = p(dog); images that
cannot be scored get 0.5 and their reason in `<name>.errors.csv` (tasks/models/predictions.py).
A model of other classes writes `id,label,p_<class>...` (label = the predicted class name).

    python -m flows.predict data/unlabelled --output-csv submission.csv
    python -m flows.predict test1.zip --model-uri models:/cats-vs-dogs/3
    python -m flows.predict data/unlabelled --explain 8     # and Grad-CAM overlays of the first 8 images

    check the output path and the model URI -> locate the images -> score -> write the submission
    -> with --explain N: Grad-CAM overlays of the first N images in <csv name>.explained/
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
    """Score a folder or archive of images: Kaggle's submission CSV (`id,label` = p(dog)) for cats vs. dogs,
    `id,label,p_<class>...` for a model of other classes.

    Raises InputError/ConfigError (one sentence, nothing written) for an output path that
    cannot be written, a missing input, a folder without images, or a model URI or MLflow
    store that points nowhere; all of them are checked before any image is scored.
    """
    logger = run_logger(__name__)
    target = str(check_output_path(config.output_csv))
    steps.check_model(config.model_uri)
    folder = steps.locate_images(config.images, str(DataFolder.at(config.data_dir).extracted))
    summary = steps.score_images(folder, config.model_uri, target, config.batch_size, config.engine)
    if config.explain:
        where, count = steps.explain_images(folder, config.model_uri, target, config.explain)
        summary = summary.model_copy(update={"explained_dir": where, "n_explained": count})
        logger.info("Grad-CAM overlays of %d image(s) -> %s", count, where)
    left_out = f", {summary.n_left_out} left out without a Kaggle id" if summary.n_left_out else ""
    logger.info("Scored %d images with %s (%d errors%s, %d other files skipped) -> %s", summary.n_images,
                config.model_uri, summary.n_errors, left_out, summary.n_skipped, summary.output_csv)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flows.predict IMAGES [--model-uri URI] [--output-csv PATH] [--batch-size N] [--data-dir DIR]`."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    parsed = parse(PredictConfig, build_parser(PredictConfig, "python -m flows.predict",
                                               "Score a folder or archive of images with a registered model: "
                                               "Kaggle's submission (id,label = p(dog)) for cats vs. dogs, "
                                               "id,label,p_<class>... (label = the class) for other classes."), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        summary = predict(config)
        left_out = f", {summary.n_left_out} left out (no Kaggle id of their own)" if summary.n_left_out else ""
        errors = f"; errors in {summary.errors_csv}" if summary.errors_csv else ""
        explained = f"; {summary.n_explained} Grad-CAM overlay(s) in {summary.explained_dir}" \
            if summary.explained_dir else ""
        print(f"Wrote {summary.output_csv}: {summary.n_images} images, {summary.n_errors} errors{left_out}{errors}"
              f"{explained}.")
        return 0

    def preflight() -> None:
        from tasks.models.naming import parse_registry_uri
        from tasks.models.predictions import check_images
        from tasks.models.store import check_store_exists

        check_output_path(config.output_csv)
        check_images(config.images)
        if parse_registry_uri(config.model_uri) or config.model_uri.startswith("runs:/"):
            check_store_exists()

    return run_main(work, log_path=log_path_for(config.data_dir, "predict"), verbose=args.verbose, preflight=preflight)


if __name__ == "__main__":
    raise SystemExit(main())
