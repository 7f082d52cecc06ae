"""Keras callbacks that report training progress the way the rest of the pipeline does.

Heads train in seconds per epoch, fine-tuning in minutes: both report through
tasks.common.progress (a line every few seconds with the rate and time left, the latest
epoch's validation numbers, and the run's progress artifact in Prefect).
"""

from __future__ import annotations

from typing import Any

from tasks.common.progress import Progress


def _epoch_detail(epoch: int, epochs: int, logs: dict[str, Any] | None) -> str:
    logs = logs or {}
    shown = ", ".join(f"{key} {logs[key]:.4f}" for key in ("loss", "val_loss", "val_auc") if key in logs)
    return f"epoch {epoch + 1}/{epochs}" + (f": {shown}" if shown else "")


def training_progress(what: str, epochs: int, steps_per_epoch: int | None = None, batch_size: int = 1) -> Any:
    """A callback reporting `what` per epoch, or per image within epochs when `steps_per_epoch` is given.

    The total is an upper bound (early stopping usually ends sooner); the last line says where it stopped.
    """
    import keras

    per_image = steps_per_epoch is not None
    total = epochs * steps_per_epoch * batch_size if per_image else epochs
    progress = Progress(what, total, "images" if per_image else "epochs", logger_name="tasks.learning")

    class TrainingProgress(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if per_image:
                progress.advance(batch_size)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            progress.detail = _epoch_detail(epoch, epochs, logs)
            if not per_image:
                progress.advance()

        def on_train_end(self, logs: dict | None = None) -> None:
            progress.finish()

    return TrainingProgress()
