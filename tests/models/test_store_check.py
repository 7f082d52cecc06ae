"""A damaged sqlite store is named with its repair before a run relies on it, never half-used.

The damage is real: the last page of a real store is overwritten, as a disk fault or a copy
taken mid-write leaves it, so `PRAGMA integrity_check` fails while many reads still succeed.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.retrain import main
from tasks.common.databases import DamagedDatabase, integrity_problem
from tasks.common.errors import ConfigError
from tasks.models.store import check_store, check_writable_store, use_tracking
from tests.fake_training import seed_store
from tests.servers import REPO_ROOT, base_env
from tests.smalldisk import read_only_view


def damage_last_page(database: Path) -> Path:
    size = database.stat().st_size
    with open(database, "r+b") as handle:
        handle.seek(size - 4096)
        handle.write(bytes(range(256)) * 16)  # the same damage every time, so the same finding
    return database


@pytest.fixture
def damaged_store(tmp_path, monkeypatch) -> Path:
    uri = seed_store(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    database = Path(uri[len("sqlite:///"):])
    assert integrity_problem(database) is None
    damage_last_page(database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return database


def test_a_damaged_store_is_refused_with_its_repair_before_any_use(damaged_store):
    with pytest.raises(DamagedDatabase) as caught:
        use_tracking()
    message = str(caught.value)
    assert f"The MLflow store {damaged_store} is damaged (sqlite integrity check: " in message
    assert f"sqlite3 {damaged_store} .recover" in message and "restore it from a backup" in message
    assert len(message.splitlines()) == 1


def test_an_intact_store_passes(tmp_path):
    uri = seed_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert check_store(uri).endswith(": intact")


def test_a_forced_retrain_on_a_damaged_store_stops_before_training(damaged_store, tmp_path, capsys):
    data_dir = tmp_path / "data"
    code = main(["--source", str(tmp_path), "--data-dir", str(data_dir), "--weights", "none", "--force"])
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and str(damaged_store) in line and ".recover" in line and "Traceback" not in err
    assert not (data_dir / "training").exists() and not (data_dir / "manifest.parquet").exists()


def test_a_folder_an_empty_file_and_a_read_only_store_are_each_named(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "folder" / "mlflow.db"
    folder.mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"The MLflow store {folder} is a folder, not a sqlite file; point "
                                          f"MLFLOW_TRACKING_URI at the database file \\(sqlite:///{folder}/mlflow.db"):
        check_store(f"sqlite:///{folder}")

    empty = tmp_path / "empty" / "mlflow.db"
    empty.parent.mkdir()
    empty.touch()
    assert check_store(f"sqlite:///{empty}") == (
        f"MLflow store {empty}: it is empty (0 bytes): it holds no runs, models or champion, and a retrain starts a "
        "new store in its place; if it held them, restore it from a backup first")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{empty}")
    with pytest.raises(ConfigError, match="is empty \\(0 bytes\\); run a retrain first"):
        use_tracking(create=False)  # a reader never turns it into a new store
    assert empty.stat().st_size == 0
    caplog.set_level("WARNING", logger="tasks.models.store")
    check_writable_store()  # what a retrain checks before any work: it will start a new store in its place
    assert [record.getMessage() for record in caplog.records] == [
        f"The MLflow store {empty}: it is empty (0 bytes): it holds no runs, models or champion, and a retrain starts "
        "a new store in its place; if it held them, restore it from a backup first."]

    seed_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    with read_only_view(tmp_path / "store", tmp_path / "read-only") as view:
        assert check_store(f"sqlite:///{view / 'mlflow.db'}").endswith(
            ": intact, read-only here (prediction and serving read it; a retrain cannot)")


@pytest.mark.parametrize("kind", ["folder", "read-only"])
def test_a_retrain_on_a_store_it_cannot_write_stops_in_one_sentence_before_any_work(kind, tmp_path, monkeypatch,
                                                                                    capsys):
    data_dir = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        if kind == "folder":
            database = tmp_path / "mlruns" / "mlflow.db"
            database.mkdir(parents=True)
            expected = f"The MLflow store {database} is a folder, not a sqlite file"
        else:
            seed_store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
            database = stack.enter_context(read_only_view(tmp_path / "store", tmp_path / "read-only")) / "mlflow.db"
            expected = f"The MLflow store {database} is read-only here (a read-only disk or folder)"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
        code = main(["--source", str(tmp_path), "--data-dir", str(data_dir), "--weights", "none", "--force"])
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and expected in line and "Traceback" not in err
    assert not (data_dir / "training").exists() and not (data_dir / "manifest.parquet").exists()


def test_store_check_says_which_store_is_damaged_and_exits_2(damaged_store, tmp_path, capsys):
    assert main(["--store-check", "--data-dir", str(tmp_path / "data")]) == 2
    assert f"The MLflow store {damaged_store} is damaged" in capsys.readouterr().err


def test_store_check_on_intact_stores_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", seed_store(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert main(["--store-check", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert f"MLflow store {tmp_path / 'mlflow.db'}: intact" in out and "Prefect server" in out


def test_a_damaged_prefect_database_is_named_before_the_temporary_server_starts(tmp_path):
    home = tmp_path / "prefect"
    home.mkdir()
    with sqlite3.connect(home / "prefect.db") as db:  # any sqlite file of a few pages will do
        db.execute("create table flow_run (id integer primary key, name text)")
        db.executemany("insert into flow_run (name) values (?)", [("run " * 50,)] * 400)
    damage_last_page(home / "prefect.db")
    done = subprocess.run([sys.executable, "-m", "flows.retrain", "--store-check", "--data-dir", str(tmp_path / "data")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=base_env(PREFECT_API_URL=None, PREFECT_HOME=home,
                                       MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert f"Prefect's database {home / 'prefect.db'} is damaged" in line
    assert f"mv {home / 'prefect.db'} {home / 'prefect.db'}.damaged" in line
