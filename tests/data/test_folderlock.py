"""The data folder's lock between real processes: a second run waits and says for whom; a killed holder frees it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tasks.data.datafolder import DataFolder
from tasks.data.folderlock import DataFolderBusy
from tests.servers import REPO_ROOT

_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tasks.data.datafolder import DataFolder
    folder, marker, release = DataFolder.at(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    with folder.lock("holder"):
        partial, _ = folder.new_training_run("c" * 64)   # a run's hidden folder, as train_model makes it
        (partial / "model.keras").write_bytes(b"half")
        marker.write_text(str(partial))
        while not release.exists():
            time.sleep(0.05)
""")


def _start_holder(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    marker, release = tmp_path / "held", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "data"), str(marker), str(release)],
                            cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc, marker, release


def test_a_second_process_waits_for_the_first_and_says_for_whom(tmp_path, caplog):
    holder, _, release = _start_holder(tmp_path)
    try:
        entered = threading.Event()

        def second():
            with DataFolder.at(tmp_path / "data").lock("second run"):
                entered.set()

        with caplog.at_level(logging.INFO, logger="tasks.data.folderlock"):
            thread = threading.Thread(target=second)
            thread.start()
            time.sleep(1.5)
            assert not entered.is_set(), "the second run must wait while the first holds the folder"
            release.write_text("go")
            thread.join(timeout=60)
        assert entered.is_set()
        waits = [message for message in caplog.messages if "waits" in message]
        assert waits and f"pid {holder.pid}" in waits[0] and str(tmp_path / "data") in waits[0], caplog.messages
        assert any("goes on" in message for message in caplog.messages)
    finally:
        release.write_text("go")
        holder.wait(timeout=60)


def test_a_killed_holder_frees_the_folder_and_its_half_written_run_is_removed(tmp_path):
    holder, marker, _ = _start_holder(tmp_path)
    partial = Path(marker.read_text())
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    assert partial.is_dir() and partial.name.startswith(".") and partial.name.endswith(".partial")
    folder = DataFolder.at(tmp_path / "data")
    (folder.root / ".inspected.parquet.abc123.tmp.parquet").write_bytes(b"half")  # an atomic write cut short
    keep = folder.training / "20260101T000000Z-cccccccc"
    keep.mkdir()
    started = time.monotonic()
    with folder.lock("next run", wait_s=30):
        assert time.monotonic() - started < 5  # the kernel dropped the dead holder's lock
        removed = folder.remove_leftovers()
    assert removed == sorted([".inspected.parquet.abc123.tmp.parquet", f"training/{partial.name}"])
    assert not partial.exists() and keep.is_dir() and folder.lock_file.is_file()


def test_the_lock_is_reentrant_within_a_run_and_cleaning_needs_it(tmp_path):
    folder = DataFolder.at(tmp_path / "data")
    with pytest.raises(RuntimeError, match="needs the lock"):
        folder.remove_leftovers()
    with folder.lock("outer"):
        with folder.lock("subflow"):  # retrain holds it and calls prepare_data, which takes it again
            assert folder.holds_lock()
        assert folder.holds_lock()
    assert not folder.holds_lock()


def test_holding_writes_nothing_once_the_lock_file_exists(tmp_path):
    root = tmp_path / "data"
    with DataFolder.at(root).lock("first"):
        pass
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.iterdir()}
    dir_mtime = root.stat().st_mtime_ns
    with DataFolder.at(root).lock("second"):
        pass
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.iterdir()} == before
    assert root.stat().st_mtime_ns == dir_mtime


def test_a_missing_folder_is_not_created_when_asked_not_to(tmp_path):
    with DataFolder.at(tmp_path / "nowhere").lock("train_model", create=False) as held:
        assert held is False
    assert not (tmp_path / "nowhere").exists()


def test_waiting_too_long_is_one_sentence_naming_the_folder(tmp_path):
    holder, _, release = _start_holder(tmp_path)
    try:
        with pytest.raises(DataFolderBusy, match=f"Data folder {tmp_path / 'data'} has been in use by pid {holder.pid}"):
            with DataFolder.at(tmp_path / "data").lock("impatient", wait_s=0.5):
                pass
    finally:
        release.write_text("go")
        holder.wait(timeout=60)
