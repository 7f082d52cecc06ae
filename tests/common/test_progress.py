"""Progress of long steps: count, rate and time left in the log, a progress artifact in Prefect, silence when quick."""

from __future__ import annotations

import logging
import re

import pytest

from tasks.common.progress import Progress, duration


def test_durations_read_like_a_person_writes_them():
    assert [duration(s) for s in (3.2, 65, 3725)] == ["3s", "1m05s", "1h02m"]
    assert duration(float("inf")) == "?"


def test_lines_give_count_share_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="tasks")
    progress = Progress("Extracting resnet50 features", 1000, every_s=0)
    progress.advance(250)
    progress.detail = "val_loss 0.3000"
    progress.advance(750)
    progress.finish()  # nothing new since the last line: no repeat
    first, last = caplog.messages
    assert re.fullmatch(r"Extracting resnet50 features: 250/1,000 images \(25%\), [\d,.]+ images/s, \d+s left", first)
    assert last.startswith("Extracting resnet50 features: 1,000/1,000 images (100%)")
    assert "done in" in last and last.endswith("; val_loss 0.3000")
    assert all(getattr(record, "catsdogs", False) for record in caplog.records)  # shown on the quiet terminal


def test_a_resumed_download_counts_only_new_bytes_in_its_rate():
    progress = Progress("Downloading x.zip", 2_000_000, "MB", scale=1e6, done=1_000_000, every_s=3600)
    assert progress.line().startswith("Downloading x.zip: 1/2 MB (50%), 0.0 MB/s")


def test_a_quick_step_says_nothing(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tasks")
    monkeypatch.setenv("CATSDOGS_PROGRESS_SECONDS", "3600")
    progress = Progress("Inspecting images", 10, "files")
    progress.advance(10)
    progress.finish()
    assert caplog.messages == []


def test_inside_a_prefect_run_the_progress_artifact_reaches_100(monkeypatch):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    monkeypatch.setenv("CATSDOGS_PROGRESS_SECONDS", "0")

    @task
    def long_step() -> None:
        progress = Progress("Scoring probe", 4, "images")
        for _ in range(4):
            progress.advance()
        progress.finish()

    @flow
    def probe() -> str:
        long_step()
        from prefect.runtime import flow_run

        return str(flow_run.id)

    flow_run_id = probe()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    mine = [artifact for artifact in artifacts if str(artifact.flow_run_id) == flow_run_id]
    assert mine and mine[0].data == pytest.approx(100.0) and mine[0].description == "Scoring probe"
