"""A damaged sqlite store is named with its repair before a run relies on it, never half-used.

The damage is real: the last page of a real store is overwritten, as a disk fault or a copy
taken mid-write leaves it, so `PRAGMA integrity_check` fails while many reads still succeed.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from flows.retrain import main
from tasks.common.databases import DamagedDatabase, integrity_problem
from tasks.models.store import check_store, use_tracking
from tests.fake_training import seed_store
from tests.servers import REPO_ROOT, base_env


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
