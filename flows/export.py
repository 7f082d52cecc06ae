"""`python -m flows.export MODEL_URI --format openvino|onnx|savedmodel --output DIR`: the model, standalone.

    load the logged model -> write it in the format (preprocessing, backbone, head: the saved
    Keras model as it is) -> score a few images with it and with the MLflow model -> give the
    folder its name only when they agree, and print the largest probability difference

A plain command, not a Prefect flow: one model, one folder, nothing to orchestrate or retry.
How to use what it writes without this project: README "Using an exported model".
"""

from __future__ import annotations

from collections.abc import Sequence

from flows.config import ExportConfig
from tasks.models.export import ExportResult, export_model


def export(config: ExportConfig) -> ExportResult:
    """Write `config.model_uri` in `config.format` to `config.output`; one sentence (nothing written) when it
    cannot be, or when the export does not reproduce the MLflow model's probabilities."""
    return export_model(config.model_uri, config.format, config.output)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; exit 0 written and checked, 2 bad input or failed parity (one sentence)."""
    from flows.cli import run_main
    from flows.console import log_path_for
    from flows.options import build_parser, parse

    parsed = parse(ExportConfig, build_parser(ExportConfig, "python -m flows.export",
                                              "Write a logged model as OpenVINO IR, ONNX or a TensorFlow "
                                              "SavedModel, checked against the MLflow model."), argv)
    if parsed is None:
        return 2
    args, config = parsed

    def work() -> int:
        result = export(config)
        served = "" if result.served_engine == "keras" else (
            f"; {result.max_difference_served:.2e} from the model as served ({result.served_engine}, "
            f"{result.served_precision})")
        print(f"Wrote {result.artifact}: max probability difference {result.max_difference:.2e} from the MLflow "
              f"model on {result.images} images (allowed {result.tolerance:g}){served}.")
        return 0

    return run_main(work, log_path=log_path_for(config.data_dir, "export"), verbose=args.verbose)


if __name__ == "__main__":
    raise SystemExit(main())
