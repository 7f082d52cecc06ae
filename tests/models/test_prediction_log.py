"""The prediction log on its own: rows off the caller's thread, one file per process and hour, bounded, a full disk
that costs no request, corrupt files skipped and named.

Batches are plain arrays (what the served model hands over after scoring); the served model writing them
in process is tests/models/test_serving.py's, behind `mlflow models serve` with two workers the README walk's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from tasks.models import prediction_log
from tasks.models.prediction_log import LogSettings, ModelIdentity, PredictionLog, read_window, sweep

HOUR = 3600.0
START = datetime(2026, 3, 1, 12, 0, 5, tzinfo=timezone.utc).timestamp()
CLASSES = ("cat", "dog")


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _batch(n: int = 3, dim: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p_dog = np.linspace(0.1, 0.9, n)
    probabilities = np.stack([1 - p_dog, p_dog], axis=1)
    return probabilities, (p_dog >= 0.5).astype(np.int64), np.arange(n * dim, dtype=np.float32).reshape(n, dim)


def _log(folder: Path, clock: Clock, **settings) -> PredictionLog:
    return PredictionLog(LogSettings(folder, **settings), ModelIdentity("cats-vs-dogs", "4", "run-1"), CLASSES,
                         summary=lambda features: features[:, :2] * 2, clock=clock)


def _files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob("predictions-*.jsonl"))


def test_rows_are_written_by_the_writer_thread_one_file_per_process_and_hour(tmp_path):
    clock = Clock()
    log = _log(tmp_path / "log", clock)
    writers: list[str] = []
    log._lines = lambda batch, hour, lines=log._lines: (writers.append(threading.current_thread().name),
                                                        lines(batch, hour))[1]
    log.record(*_batch())
    clock.now += HOUR  # the next hour: a file of its own
    log.record(*_batch(1))
    log.flush()
    assert writers == ["prediction-log", "prediction-log"]  # never the caller's thread
    host, pid = os.uname().nodename, os.getpid()
    assert _files(tmp_path / "log") == [f"predictions-20260301T12-{host}-{pid}.jsonl",
                                        f"predictions-20260301T13-{host}-{pid}.jsonl"]
    window = read_window(tmp_path / "log")
    assert len(window.rows) == 4 and not window.skipped
    first = window.rows[0]
    assert first["time"] == "2026-03-01T12:00:05.000Z"
    assert (first["model"], first["version"], first["run_id"]) == ("cats-vs-dogs", "4", "run-1")
    assert (first["label"], first["label_index"], first["probability"]) == ("cat", 0, 0.9)
    assert first["probabilities"] == [0.9, 0.1] and first["features"] == [0.0, 2.0]  # the summary, not the input
    assert "image" not in first  # no image is kept unless asked
    hours = read_window(tmp_path / "log", since=datetime(2026, 3, 1, 13, tzinfo=timezone.utc))
    assert len(hours.rows) == 1 and len(hours.files) == 1


def test_images_are_kept_once_by_their_sha256_only_when_asked(tmp_path):
    import hashlib

    log = _log(tmp_path, Clock(), images=True)
    probabilities, indexes, features = _batch(2)
    log.record(probabilities, indexes, features, [("image", b"\xff\xd8 jpeg"), ("pixels", np.zeros((4, 4, 3)))])
    log.flush()
    rows = read_window(tmp_path).rows
    digest = hashlib.sha256(b"\xff\xd8 jpeg").hexdigest()
    assert rows[0]["image"] == digest and "image" not in rows[1]  # pixel rows have no encoded bytes
    assert (tmp_path / "images" / "20260301T12" / digest).read_bytes() == b"\xff\xd8 jpeg"


def test_the_folder_keeps_its_retention_window_and_budget_but_never_the_current_hour(tmp_path):
    settings = LogSettings(tmp_path, days=1, max_mb=3 / 1024)  # 3 KiB
    for name, size in (("predictions-20260227T12-h-1.jsonl", 100),  # two days old: past the window
                       ("predictions-20260301T09-h-1.jsonl", 1500), ("predictions-20260301T10-h-2.jsonl", 1500),
                       ("predictions-20260301T12-h-3.jsonl", 2000),  # the current hour, another process's
                       ("notes.txt", 10)):
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / "images" / "20260227T12").mkdir(parents=True)
    (tmp_path / "images" / "20260227T12" / "old").write_bytes(b"x")
    removed = sweep(settings, now=START)
    assert sorted(path.name for path in removed) == ["20260227T12", "predictions-20260227T12-h-1.jsonl",
                                                     "predictions-20260301T09-h-1.jsonl",
                                                     "predictions-20260301T10-h-2.jsonl"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["images", "notes.txt",
                                                                "predictions-20260301T12-h-3.jsonl"]


def test_a_full_file_waits_for_the_next_hour_with_one_warning(tmp_path, caplog):
    clock = Clock()
    log = _log(tmp_path, clock, max_mb=10 * 1024 / 2**20)  # 10 KiB: a file of an hour takes at most 1 KiB
    with caplog.at_level(logging.WARNING, logger=prediction_log.__name__):
        for _ in range(12):
            log.record(*_batch(1))
        log.flush()
        clock.now += HOUR
        log.record(*_batch(1))
        log.flush()
    files = sorted(tmp_path.glob("predictions-*.jsonl"))
    assert 0 < files[0].stat().st_size <= 1024 and len(files) == 2
    assert len(read_window(tmp_path).rows) < 13
    assert [record.message for record in caplog.records].count(caplog.records[0].message) == 1
    assert "reached a tenth of the folder's" in caplog.records[0].message


def test_a_full_disk_stops_the_log_with_one_warning_and_never_fails_the_caller(tmp_path, caplog):
    from tests.smalldisk import fill, small_disk

    clock = Clock()
    with small_disk(tmp_path / "disk", "1m") as disk:
        log = _log(disk / "log", clock)
        filler = fill(disk)
        with caplog.at_level(logging.WARNING, logger=prediction_log.__name__):
            for _ in range(5):
                log.record(*_batch(200))  # returns at once, whatever the disk says
            log.flush()
            warnings = [record.message for record in caplog.records]
            assert len(warnings) == 1 and "cannot be written" in warnings[0] and str(disk / "log") in warnings[0]
            filler.unlink()
            log.record(*_batch(1))  # the same hour: still paused
            clock.now += HOUR
            log.record(*_batch(1))  # the next hour: written again
            log.flush()
        assert len(read_window(disk / "log").rows) == 1
        assert len(caplog.records) == 1
        log.close()


def test_a_writer_that_falls_behind_drops_rows_and_never_keeps_the_caller_waiting(tmp_path, caplog):
    release = threading.Event()
    log = PredictionLog(LogSettings(tmp_path), ModelIdentity(), CLASSES,
                        summary=lambda features: (release.wait(), features)[1], clock=Clock())
    with caplog.at_level(logging.WARNING, logger=prediction_log.__name__):
        for _ in range(prediction_log.QUEUE_BATCHES + 10):  # a caller kept waiting would hang here
            log.record(*_batch(2))
        release.set()
        log.flush()
    assert log.dropped >= 2 * 9  # the writer was stuck on the first batch the whole time
    assert ["behind" in record.message for record in caplog.records] == [True]


def test_a_corrupt_file_is_skipped_and_named_and_a_last_line_cut_short_is_left_out(tmp_path):
    log = _log(tmp_path, Clock())
    log.record(*_batch(2))
    log.flush()
    [good] = list(tmp_path.glob("predictions-*.jsonl"))
    with open(good, "a") as file:
        file.write('{"time": "2026-03-01T12:00:06.000Z", "label_ind')  # a writer killed mid-line
    corrupt = tmp_path / "predictions-20260301T12-other-7.jsonl"
    corrupt.write_text(json.dumps({"time": "2026-03-01T12:00:00Z", "label_index": 0, "probabilities": [1, 0]})
                       + "\n\x00\x00\x00 garbage\n")
    not_rows = tmp_path / "predictions-20260301T12-other-8.jsonl"
    not_rows.write_text('{"hello": 1}\n')
    window = read_window(tmp_path)
    assert len(window.rows) == 2 and window.cut_short == 1 and window.files == [good]
    assert sorted((path.name, why) for path, why in window.skipped) == [
        (corrupt.name, "line 2 is not JSON"),
        (not_rows.name, "line 1 is not a prediction row (it needs time, label_index, probabilities)")]
